"""Header rewriting between the two hops of a proxied request (pure).

A header is hop-by-hop if RFC 9110 says so (``HOP_BY_HOP``) or if the
message's own ``Connection`` header names it. Those never cross the proxy,
except ``Upgrade`` and ``Connection: upgrade`` on a protocol switch, which
the proxy re-creates on the far side. ``Expect`` is answered by the proxy
itself (it sends ``100 Continue`` once an upstream is connected) and is not
forwarded. ``Transfer-Encoding`` is re-done per hop by the serialiser.

Added towards the upstream: ``X-Forwarded-For`` (appended to what the
client sent), ``X-Forwarded-Proto`` and ``X-Forwarded-Host`` (replaced), and
``X-Request-Id`` (kept if the client sent one, else generated).
"""

from __future__ import annotations

import itertools
import os

from lbnode.http1 import HOP_BY_HOP, HeaderList, Headers

_UPGRADE_PAIR = [(b"connection", b"upgrade")]

# Request ids: a random per-process prefix and a counter, cheaper than uuid4
# per request and still unique across nodes and restarts.
_ID_PREFIX = os.urandom(6).hex().encode()
_id_counter = itertools.count(1)


def new_request_id() -> bytes:
    return b"%s-%08x" % (_ID_PREFIX, next(_id_counter))


def _connection_tokens(headers: Headers) -> frozenset[bytes] | None:
    tokens: set[bytes] | None = None
    for name, value in headers:
        if name == b"connection":
            if tokens is None:
                tokens = set()
            for tok in value.split(b","):
                tok = tok.strip().lower()
                if tok:
                    tokens.add(tok)
    return frozenset(tokens) if tokens else None


def wants_upgrade(headers: Headers) -> bytes | None:
    """The protocol a request asks to switch to (``Connection: upgrade`` plus
    ``Upgrade: X``), or None."""
    tokens = _connection_tokens(headers)
    if not tokens or b"upgrade" not in tokens:
        return None
    for name, value in headers:
        if name == b"upgrade":
            return value
    return None


def upstream_request_headers(
    headers: Headers,
    *,
    client_ip: bytes,
    scheme: bytes,
    upgrade: bytes | None = None,
    default_host: bytes = b"",
) -> tuple[HeaderList, bytes]:
    """Headers to send upstream, and the request id they carry."""
    drop = _connection_tokens(headers)
    out: HeaderList = []
    xff: bytes | None = None
    host: bytes | None = None
    request_id: bytes | None = None
    chunked = False
    for name, value in headers:
        if name == b"transfer-encoding":
            chunked = True
            continue
        if name in HOP_BY_HOP or name == b"expect" or (drop is not None and name in drop):
            continue
        if name == b"x-forwarded-for":
            xff = value if xff is None else xff + b", " + value
            continue
        if name == b"x-forwarded-proto" or name == b"x-forwarded-host":
            continue
        if name == b"host":
            if host is not None:
                continue  # a second Host never goes upstream
            host = value
        elif name == b"x-request-id":
            if request_id is not None or not value:
                continue
            request_id = value
        out.append((name, value))
    if host is None:
        host = default_host
        out.append((b"host", host))
    if request_id is None:
        request_id = new_request_id()
        out.append((b"x-request-id", request_id))
    out.append((b"x-forwarded-for", client_ip if xff is None else xff + b", " + client_ip))
    out.append((b"x-forwarded-proto", scheme))
    out.append((b"x-forwarded-host", host))
    if chunked:
        # The framing is re-done on this hop: still chunked, as the body's
        # length is not known in advance.
        out.append((b"transfer-encoding", b"chunked"))
    if upgrade is not None:
        out.append((b"upgrade", upgrade))
        out.extend(_UPGRADE_PAIR)
    return out, request_id


def downstream_response_headers(headers: Headers, *, upgrade: bytes | None = None) -> HeaderList:
    """Headers of an upstream response to send to the client."""
    drop = _connection_tokens(headers)
    if drop is None:
        out = [(n, v) for n, v in headers if n not in HOP_BY_HOP]
    else:
        out = [(n, v) for n, v in headers if n not in HOP_BY_HOP and n not in drop]
    if upgrade is not None:
        out.append((b"upgrade", upgrade))
        out.extend(_UPGRADE_PAIR)
    return out
