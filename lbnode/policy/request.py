"""The request as the decision code sees it.

The data path builds one ``RequestView`` per request from the parsed head and
passes it to every decision (access control, rule match, rate-limit key,
balancing key). Header names are lower-case bytes, as the HTTP/1.1 seam
delivers them; lookups are lazy so a decision that reads nothing costs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import parse_qsl

Headers = Sequence[tuple[bytes, bytes]]


class RequestView:
    """A read-only view of a request head plus the client address."""

    __slots__ = ("method", "target", "headers", "client_ip", "scheme", "_path", "_query", "_cookies")

    def __init__(
        self,
        method: bytes,
        target: bytes,
        headers: Headers,
        client_ip: str,
        scheme: str = "http",
    ) -> None:
        self.method = method  # upper-case bytes, e.g. b"GET"
        self.target = target  # the raw request-target, e.g. b"/a/b?x=1"
        self.headers = headers  # [(lower-case name, value), ...]
        self.client_ip = client_ip
        self.scheme = scheme
        self._path: str | None = None
        self._query: dict[str, str] | None = None
        self._cookies: dict[str, str] | None = None

    @property
    def path(self) -> str:
        """The path without the query string, as text (latin-1, undecoded)."""
        if self._path is None:
            raw = self.target.split(b"?", 1)[0]
            self._path = raw.decode("latin-1")
        return self._path

    @property
    def query(self) -> dict[str, str]:
        """Query parameters; the first value wins when a name repeats."""
        if self._query is None:
            q: dict[str, str] = {}
            _, sep, raw = self.target.partition(b"?")
            if sep:
                for k, v in parse_qsl(raw.decode("latin-1"), keep_blank_values=True):
                    q.setdefault(k, v)
            self._query = q
        return self._query

    def header(self, name: bytes) -> bytes | None:
        """First value of header ``name`` (lower-case bytes), or None."""
        for k, v in self.headers:
            if k == name:
                return v
        return None

    @property
    def host(self) -> str:
        """The Host header without its port, lower-cased ('' if absent)."""
        h = self.header(b"host")
        if not h:
            return ""
        text = h.decode("latin-1").lower()
        if text.startswith("["):  # [v6]:port
            return text.split("]", 1)[0] + "]"
        return text.rsplit(":", 1)[0] if ":" in text else text

    @property
    def cookies(self) -> dict[str, str]:
        """Cookies of every Cookie header; the first value wins."""
        if self._cookies is None:
            jar: dict[str, str] = {}
            for k, v in self.headers:
                if k == b"cookie":
                    for part in v.decode("latin-1").split(";"):
                        name, eq, val = part.strip().partition("=")
                        if eq and name:
                            jar.setdefault(name, val)
            self._cookies = jar
        return self._cookies
