"""Tests for lbnode.policy.keys: parsing key specs and extracting keys."""

from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbnode.policy.keys import KeySpec, is_import_spec, is_key_spec, load_object
from lbnode.policy.request import RequestView


def request(
    target: bytes = b"/a/b?x=1&y=&x=2",
    headers: list[tuple[bytes, bytes]] | None = None,
    client_ip: str = "203.0.113.7",
) -> RequestView:
    if headers is None:
        headers = [
            (b"host", b"Example.COM:8080"),
            (b"x-api-key", b"k-123"),
            (b"x-empty", b""),
            (b"cookie", b"session_id=s1; theme=dark"),
            (b"cookie", b"session_id=ignored; lang=en"),
            (b"x-api-key", b"second"),
        ]
    return RequestView(b"GET", target, headers, client_ip)


# --------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "name", "canonical"),
    [
        ("client_ip", "client_ip", "", "client_ip"),
        ("path", "path", "", "path"),
        ("host", "host", "", "host"),
        ("header:X-Api-Key", "header", "X-Api-Key", "header:X-Api-Key"),
        ("cookie:session_id", "cookie", "session_id", "cookie:session_id"),
        ("query:user id", "query", "user id", "query:user id"),
        ("  client_ip ", "client_ip", "", "client_ip"),
        ("Header:X-User", "header", "X-User", "header:X-User"),  # prefix in any case
        ("QUERY:q", "query", "q", "query:q"),
    ],
)
def test_parse_table(text: str, kind: str, name: str, canonical: str) -> None:
    spec = KeySpec.parse(text)
    assert (spec.kind, spec.name, str(spec)) == (kind, name, canonical)
    assert KeySpec.parse(str(spec)) == spec
    assert is_key_spec(text.strip())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "",
            "invalid key '': expected client_ip, path, host, header:NAME, cookie:NAME, "
            "query:NAME or 'package.module:function'",
        ),
        (
            "client-ip",
            "invalid key 'client-ip': expected client_ip, path, host, header:NAME, "
            "cookie:NAME, query:NAME or 'package.module:function'",
        ),
        ("header:", "invalid key 'header:': header name is empty"),
        ("cookie:", "invalid key 'cookie:': cookie name is empty"),
        ("query:", "invalid key 'query:': query name is empty"),
        (
            "header:X Api",
            "invalid key 'header:X Api': header name contains invalid character ' '",
        ),
        ("cookie:a;b", "invalid key 'cookie:a;b': cookie name contains invalid character ';'"),
        (
            "Client_IP",
            "invalid key 'Client_IP': expected client_ip, path, host, header:NAME, cookie:NAME, "
            "query:NAME or 'package.module:function'",
        ),
        (
            "lbkeys_nope.mod:func",
            "cannot load key function 'lbkeys_nope.mod:func': module 'lbkeys_nope.mod' not found",
        ),
    ],
)
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        KeySpec.parse(text)
    assert str(exc.value) == message


def test_parse_rejects_non_strings() -> None:
    with pytest.raises(ValueError, match="expected a string"):
        KeySpec.parse(42)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("client_ip", True),
        ("header:X-Forwarded-User", True),
        ("pkg.mod:func", True),  # syntax only, nothing imported
        ("header", False),
        ("header:", False),
        ("pkg.mod:", False),
        ("pkg mod:func", False),
    ],
)
def test_is_key_spec(text: str, ok: bool) -> None:
    assert is_key_spec(text) is ok


def test_specs_compare_and_hash_by_kind_and_name() -> None:
    assert KeySpec.parse("header:A") == KeySpec.parse("header:A")
    assert KeySpec.parse("header:A") != KeySpec.parse("cookie:A")
    assert len({KeySpec.parse("path"), KeySpec.parse("path")}) == 1
    with pytest.raises(AttributeError):
        KeySpec.parse("path").kind = "host"  # type: ignore[misc]


def test_constructor_checks() -> None:
    with pytest.raises(ValueError, match="unknown key kind 'ip'"):
        KeySpec("ip")
    with pytest.raises(ValueError, match="needs a name"):
        KeySpec("header")
    with pytest.raises(ValueError, match="needs a function"):
        KeySpec("function", "m:f")


# --------------------------------------------------------------------------
# extraction
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("client_ip", "203.0.113.7"),
        ("path", "/a/b"),
        ("host", "example.com"),
        ("header:X-Api-Key", "k-123"),  # first value, name case-insensitive
        ("header:x-api-key", "k-123"),
        ("header:X-Empty", None),  # empty counts as missing
        ("header:X-Missing", None),
        ("cookie:session_id", "s1"),  # first cookie wins
        ("cookie:lang", "en"),  # from the second Cookie header
        ("cookie:Session_Id", None),  # cookie names are case-sensitive
        ("cookie:missing", None),
        ("query:x", "1"),  # first value wins
        ("query:y", None),  # empty
        ("query:z", None),
    ],
)
def test_extract_table(text: str, expected: str | None) -> None:
    assert KeySpec.parse(text).extract(request()) == expected


@pytest.mark.parametrize(
    ("text", "req"),
    [
        ("client_ip", request(client_ip="")),
        ("host", request(headers=[])),
        ("cookie:session_id", request(headers=[])),
        ("query:x", request(target=b"/no-query")),
    ],
)
def test_extract_missing(text: str, req: RequestView) -> None:
    assert KeySpec.parse(text).extract(req) is None


def test_header_values_decode_as_latin1() -> None:
    req = request(headers=[(b"x-user", "Zoë".encode("latin-1"))])
    assert KeySpec.parse("header:X-User").extract(req) == "Zoë"


@given(
    name=st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", min_size=1),
    value=st.binary(min_size=1, max_size=40),
)
def test_header_lookup_is_case_insensitive(name: str, value: bytes) -> None:
    req = request(headers=[(b"other", b"x"), (name.lower().encode(), value)])
    for written in (name, name.upper(), name.lower()):
        got = KeySpec.parse(f"header:{written}").extract(req)
        assert got == value.decode("latin-1")


# --------------------------------------------------------------------------
# key functions ("package.module:function")
# --------------------------------------------------------------------------

PLUGIN = """
    calls = []

    def tenant(req):
        calls.append(req.path)
        return req.path.split("/")[1] or None

    def empty(req):
        return ""

    def wrong_type(req):
        return 42

    class Holder:
        @staticmethod
        def user(req):
            return req.cookies.get("user")

    NOT_CALLABLE = "x"
"""


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    (tmp_path / "lbkeys_plugin.py").write_text(textwrap.dedent(PLUGIN))
    (tmp_path / "lbkeys_broken.py").write_text("raise ImportError('no luck')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield
    sys.modules.pop("lbkeys_plugin", None)
    sys.modules.pop("lbkeys_broken", None)


def test_function_key(plugin: None) -> None:
    spec = KeySpec.parse("lbkeys_plugin:tenant")
    assert (spec.kind, spec.name, str(spec)) == ("function", "lbkeys_plugin:tenant", spec.name)
    assert spec.extract(request(target=b"/acme/orders")) == "acme"
    assert spec.extract(request(target=b"/")) is None
    module = sys.modules["lbkeys_plugin"]
    assert module.calls == ["/acme/orders", "/"]
    # Loaded once: parsing again gives an equal spec bound to the same function.
    assert KeySpec.parse("lbkeys_plugin:tenant").function is spec.function


def test_function_key_nested_attribute(plugin: None) -> None:
    spec = KeySpec.parse("lbkeys_plugin:Holder.user")
    assert spec.extract(request(headers=[(b"cookie", b"user=u9")])) == "u9"


def test_function_key_results(plugin: None) -> None:
    assert KeySpec.parse("lbkeys_plugin:empty").extract(request()) is None
    with pytest.raises(TypeError) as exc:
        KeySpec.parse("lbkeys_plugin:wrong_type").extract(request())
    assert str(exc.value) == (
        "key function 'lbkeys_plugin:wrong_type' returned int, expected str or None"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lbkeys_plugin:nope", "module 'lbkeys_plugin' has no attribute 'nope'"),
        ("lbkeys_plugin:NOT_CALLABLE", "'NOT_CALLABLE' is not callable"),
        ("lbkeys_broken:f", "importing module 'lbkeys_broken' failed: ImportError: no luck"),
    ],
)
def test_function_key_load_errors(plugin: None, text: str, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        KeySpec.parse(text)
    assert str(exc.value) == f"cannot load key function {text!r}: {message}"


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("a:b", True),
        ("a.b.c:D.e", True),
        ("_x:_y", True),
        ("a:", False),
        (":b", False),
        ("a", False),
        ("a.:b", False),
        ("a:b:c", False),
        ("1a:b", False),
        ("a-b:c", False),
    ],
)
def test_is_import_spec(text: str, ok: bool) -> None:
    assert is_import_spec(text) is ok


def test_load_object_rejects_bad_syntax() -> None:
    with pytest.raises(ValueError) as exc:
        load_object("nocolon", "thing")
    assert str(exc.value) == "cannot load thing 'nocolon': expected 'package.module:Name'"
