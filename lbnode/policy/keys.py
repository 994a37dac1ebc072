"""Request keys: which part of a request identifies "the same client".

Theory of operation
-------------------
Consistent hashing (``hash_key``), rate limiting (``rate_limit.key``) and canary
splits (``split_key``) all need the same thing: a short string taken from the
request, equal for requests that belong together. The config names that string
with a small language::

    client_ip            the client address (after trusted-proxy resolution,
                         which the data path does before building the view)
    path                 the path without the query string
    host                 the Host header, port stripped, lower-cased
    header:NAME          the first value of header NAME (case-insensitive)
    cookie:NAME          the value of cookie NAME (case-sensitive, as browsers do)
    query:NAME           the first value of query parameter NAME
    package.module:func  func(request_view) -> str | None, imported once

``KeySpec.parse`` turns the text into a frozen spec once, at config load; the
spec precomputes everything a lookup needs (the lower-case header name as
bytes, the imported function) and binds the matching extractor, so
``extract`` on the hot path is one call with no branching on the kind.

A key that is absent *or empty* extracts as ``None``; callers decide what
``None`` means (consistent hashing falls back to round robin, rate limiting
applies ``on_missing_key``). The three prefixes ``header``, ``cookie`` and
``query`` (in any case) win over the import form, so a top-level module literally named
``header`` cannot be used as a key function (``pkg.header:f`` can).

This module also holds the ``"package.module:attribute"`` loader shared with
custom balancing algorithms, so both report bad specs in the same words.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from .request import RequestView

__all__ = [
    "KEY_KINDS",
    "KeySpec",
    "is_import_spec",
    "is_key_spec",
    "load_object",
]

#: The kinds of key a spec can name; ``"function"`` is the import form.
KEY_KINDS: Final = ("client_ip", "path", "host", "header", "cookie", "query", "function")

_SIMPLE_KINDS: Final = frozenset({"client_ip", "path", "host"})
_NAMED_KINDS: Final = frozenset({"header", "cookie", "query"})

# RFC 9110 token characters: valid header and cookie names.
_TCHAR: Final = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)

KeyFunction = Callable[[RequestView], "str | None"]


# --------------------------------------------------------------------------
# "package.module:attribute" specs (shared with custom algorithms)
# --------------------------------------------------------------------------


def is_import_spec(text: str) -> bool:
    """True if ``text`` is syntactically ``package.module:Attribute``.

    Both sides are dotted Python identifiers; nothing is imported.
    """
    module, sep, attr = text.partition(":")
    if not sep or not module or not attr:
        return False
    return all(p.isidentifier() for p in module.split(".")) and all(
        p.isidentifier() for p in attr.split(".")
    )


def load_object(spec: str, what: str) -> object:
    """Import ``package.module:Attribute`` and return the attribute.

    ``what`` names the thing being loaded for error messages ("algorithm",
    "key function"). Every failure is a ``ValueError`` whose message starts
    with ``cannot load <what> '<spec>': `` and says what went wrong in one
    line; an exception raised while importing the module is chained.
    """
    prefix = f"cannot load {what} {spec!r}: "
    if not is_import_spec(spec):
        raise ValueError(prefix + "expected 'package.module:Name'")
    module_name, _, attr_path = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only "not found" if the missing module is the one named (or a parent
        # of it); a module that exists but imports something missing is a
        # broken module, and saying "not found" would send the user astray.
        missing = exc.name or ""
        if missing == module_name or module_name.startswith(missing + "."):
            raise ValueError(prefix + f"module {module_name!r} not found") from None
        raise ValueError(
            prefix + f"importing module {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    except Exception as exc:
        raise ValueError(
            prefix + f"importing module {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    obj: object = module
    where = f"module {module_name!r}"
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(prefix + f"{where} has no attribute {part!r}") from None
        where = repr(part)
    if not callable(obj):
        raise ValueError(prefix + f"{attr_path!r} is not callable")
    return obj


# --------------------------------------------------------------------------
# Key specs
# --------------------------------------------------------------------------


def _bad(text: str, why: str) -> ValueError:
    return ValueError(f"invalid key {text!r}: {why}")


def _syntax(text: str) -> tuple[str, str]:
    """Split and check ``text``; return (kind, name). Imports nothing."""
    if text in _SIMPLE_KINDS:
        return text, ""
    prefix, sep, name = text.partition(":")
    prefix = prefix.lower()  # "Header:X-User" is what people write
    if sep and prefix in _NAMED_KINDS:
        if not name:
            raise _bad(text, f"{prefix} name is empty")
        if prefix != "query":
            bad = sorted(set(name) - _TCHAR)
            if bad:
                raise _bad(text, f"{prefix} name contains invalid character {bad[0]!r}")
        return prefix, name
    if is_import_spec(text):
        return "function", text
    raise _bad(
        text,
        "expected client_ip, path, host, header:NAME, cookie:NAME, query:NAME "
        "or 'package.module:function'",
    )


def is_key_spec(text: str) -> bool:
    """True if ``text`` is a syntactically valid key (no import is attempted)."""
    try:
        _syntax(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class KeySpec:
    """A parsed request key; ``extract`` pulls it out of a ``RequestView``.

    ``kind`` is one of ``KEY_KINDS``; ``name`` is the header, cookie or query
    parameter name as written, the import spec for ``function``, and ``""``
    for the simple kinds. Build instances with ``KeySpec.parse``.
    """

    kind: str
    name: str = ""
    function: KeyFunction | None = field(default=None, compare=False, repr=False)
    # The kind's extractor as a plain function (not a bound method: no cycle).
    _extract: Callable[[KeySpec, RequestView], str | None] = field(
        init=False, compare=False, repr=False
    )
    _bname: bytes = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KEY_KINDS:
            raise ValueError(f"unknown key kind {self.kind!r}")
        if self.kind in _NAMED_KINDS and not self.name:
            raise ValueError(f"key kind {self.kind!r} needs a name")
        if self.kind == "function" and self.function is None:
            raise ValueError("key kind 'function' needs a function")
        # Precomputed once so extract() does no string work per request.
        object.__setattr__(self, "_bname", self.name.lower().encode("latin-1", "replace"))
        object.__setattr__(self, "_extract", getattr(KeySpec, "_x_" + self.kind))

    @classmethod
    def parse(cls, text: str) -> KeySpec:
        """Parse a key as written in the config.

        Raises ``ValueError`` with a one-line message on bad syntax, and (for
        the import form) when the function cannot be loaded.
        """
        if not isinstance(text, str):
            raise ValueError(f"invalid key {text!r}: expected a string")
        text = text.strip()
        kind, name = _syntax(text)
        if kind != "function":
            return cls(kind, name)
        func = load_object(name, "key function")
        return cls(kind, name, function=func)  # type: ignore[arg-type]

    def extract(self, req: RequestView) -> str | None:
        """The key of ``req``, or None when it is missing or empty."""
        return self._extract(self, req)

    def __str__(self) -> str:
        if self.kind in _SIMPLE_KINDS:
            return self.kind
        if self.kind == "function":
            return self.name
        return f"{self.kind}:{self.name}"

    # One extractor per kind, bound in __post_init__.

    def _x_client_ip(self, req: RequestView) -> str | None:
        return req.client_ip or None

    def _x_path(self, req: RequestView) -> str | None:
        return req.path or None

    def _x_host(self, req: RequestView) -> str | None:
        return req.host or None

    def _x_header(self, req: RequestView) -> str | None:
        value = req.header(self._bname)
        return value.decode("latin-1") if value else None

    def _x_cookie(self, req: RequestView) -> str | None:
        return req.cookies.get(self.name) or None

    def _x_query(self, req: RequestView) -> str | None:
        return req.query.get(self.name) or None

    def _x_function(self, req: RequestView) -> str | None:
        assert self.function is not None
        value = self.function(req)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise TypeError(
                f"key function {self.name!r} returned {type(value).__name__}, expected str or None"
            )
        return value
