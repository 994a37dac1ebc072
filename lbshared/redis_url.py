"""Redis connection URLs: ``redis://[user[:password]@]host[:port][/db]`` and ``rediss://``.

A URL is parsed once, at the edge, into a frozen :class:`RedisAddress`; the
client never looks at the string again. Every refusal is a ``ValueError``
whose message names the problem and shows the URL with its password hidden,
so the message is safe to log and to print from ``lbctl``.

Accepted forms::

    redis://127.0.0.1                      host, port 6379, db 0, no auth
    redis://:secret@redis.internal:6380/2  requirepass-style password, db 2
    redis://lb:secret@[::1]/0              ACL user ``lb`` (Redis 6+)
    rediss://lb:secret@redis.internal      the same over TLS
    redis://host?db=3                      db as a query option (as redis-py accepts)

User names and passwords are percent-decoded (``p%40ss`` is ``p@ss``). A user
name without a password is refused: Redis has no password-less ``AUTH user``,
and ``redis://secret@host`` is a classic mistake for ``redis://:secret@host``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, unquote, urlsplit

__all__ = ["DEFAULT_PORT", "RedisAddress", "parse_url"]

#: Port used when the URL names none.
DEFAULT_PORT = 6379

_SCHEMES = {"redis": False, "rediss": True}  # scheme -> TLS
_QUERY_OPTIONS = ("db",)
_REDACTED = "***"


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """Where and how to reach one Redis server; ``str()`` is the URL with the password hidden."""

    host: str
    port: int = DEFAULT_PORT
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False

    @property
    def redacted(self) -> str:
        """The URL for logs: ``redis://lb:***@host:6379/0``."""
        return self._url(_REDACTED)

    def unredacted_url(self) -> str:
        """The full URL, password included (for handing to another client, never for logs)."""
        return self._url(None)

    def _url(self, mask: str | None) -> str:
        scheme = "rediss" if self.tls else "redis"
        auth = ""
        if self.password is not None:
            secret = mask if mask is not None else _quote(self.password)
            auth = f"{_quote(self.username or '')}:{secret}@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{auth}{host}:{self.port}/{self.db}"

    def __str__(self) -> str:
        return self.redacted


def _quote(text: str) -> str:
    return quote(text, safe="")


def _redact(url: str) -> str:
    """``url`` with anything between ``://`` and the last ``@`` of the authority masked."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, tail = rest.partition("/")
    userinfo, at, hostpart = authority.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    masked = f"{user}:{_REDACTED}" if colon else _REDACTED
    return f"{scheme}://{masked}@{hostpart}{slash}{tail}"


def parse_url(url: str) -> RedisAddress:
    """Parse a ``redis://`` or ``rediss://`` URL; ``ValueError`` with a clear message if bad."""
    if not isinstance(url, str):
        raise ValueError(f"a redis URL must be a string, not {type(url).__name__}")
    url = url.strip()
    shown = _redact(url)
    if not url:
        raise ValueError("empty redis URL: expected redis://[user[:password]@]host[:port][/db]")
    if "://" not in url:
        raise ValueError(
            f"redis URL {shown!r} has no scheme: expected redis://[user[:password]@]host[:port][/db]"
        )
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. an unbalanced '[' in an IPv6 host
        raise ValueError(f"malformed redis URL {shown!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError(
            f"unsupported scheme {parts.scheme!r} in redis URL {shown!r}: use redis:// or rediss://"
        )
    if parts.fragment:
        raise ValueError(f"redis URL {shown!r} has a '#' fragment; remove it")
    host = parts.hostname
    if not host:
        raise ValueError(f"redis URL {shown!r} names no host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(
            f"bad port in redis URL {shown!r}: expected an integer from 1 to 65535"
        ) from None
    if port is None:
        port = DEFAULT_PORT
    elif port == 0:
        raise ValueError(f"bad port in redis URL {shown!r}: expected an integer from 1 to 65535")

    db = _parse_db(parts.path.lstrip("/"), shown, "path") if parts.path not in ("", "/") else None
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in _QUERY_OPTIONS:
            raise ValueError(
                f"unsupported option {key!r} in redis URL {shown!r} (supported: "
                f"{', '.join(_QUERY_OPTIONS)})"
            )
        query_db = _parse_db(value, shown, "?db=")
        if db is not None and db != query_db:
            raise ValueError(f"redis URL {shown!r} names two databases ({db} and {query_db})")
        db = query_db

    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    if username is not None and password is None:
        raise ValueError(
            f"redis URL {shown!r} has a user name but no password "
            "(for a password alone write redis://:PASSWORD@host)"
        )
    return RedisAddress(
        host=host,
        port=port,
        db=db or 0,
        username=username,
        password=password,
        tls=_SCHEMES[scheme],
    )


def _parse_db(text: str, shown: str, where: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise ValueError(
            f"bad database {text!r} in redis URL {shown!r} ({where}): "
            "expected a non-negative integer such as /0"
        )
    return int(text)
