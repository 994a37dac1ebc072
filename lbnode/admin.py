"""The node's admin port: ``GET /healthz`` and ``GET /status``.

A small h11 server, separate from the data path. With a token set, every
path but ``/healthz`` wants ``Authorization: Bearer TOKEN`` (401 without);
nothing changes state over GET.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
from urllib.parse import parse_qs
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import trio

from lbnode.admin_ws import is_websocket_upgrade, origin_allowed, serve_feed

log = logging.getLogger("lbnode.admin")

Handler = Callable[[], Awaitable[tuple[int, Any]] | tuple[int, Any]]
ADMIN_TIMEOUT = 10.0
FEED_PATH = b"/events/health"
MAX_HEAD = 16384


def parse_hostport(text: str, default_port: int = 9901) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT``, ``[V6]:PORT`` or ``HOST``."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_s = rest.lstrip(":")
    elif text.count(":") == 1:
        host, _, port_s = text.partition(":")
    else:
        host, port_s = text, ""
    host = host or "127.0.0.1"
    try:
        port = int(port_s) if port_s else default_port
    except ValueError:
        raise ValueError(f"{text!r} is not HOST:PORT") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{text!r}: port out of range")
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AdminServer:
    def __init__(self, node: Any, host: str, port: int, token: str | None = None) -> None:
        self.node = node
        self.host = host
        self.port = port
        self.token = token
        self._expected = f"Bearer {token}".encode() if token else None
        self.bound_port = port

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        from lbnode.listeners import open_listener

        listener = await open_listener(self.host, self.port, reuse_port=False)
        self.bound_port = listener.socket.getsockname()[1]
        task_status.started(self.bound_port)
        async with listener:
            await trio.serve_listeners(self._handle, [listener])

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            while True:
                with trio.move_on_after(ADMIN_TIMEOUT) as scope:
                    ev = await _next(conn, stream)
                if scope.cancelled_caught or not isinstance(ev, h11.Request):
                    return
                while not isinstance(await _next(conn, stream), h11.EndOfMessage):
                    pass
                if ev.target.split(b"?", 1)[0] == FEED_PATH and is_websocket_upgrade(ev):
                    refusal = self._feed_refusal(ev)
                    if refusal is None:
                        await serve_feed(stream, ev, bytes(conn.trailing_data[0]), self.node.feed)
                        return
                    status, body, ctype = refusal
                else:
                    status, body, ctype = self._dispatch(ev)
                headers = [("content-type", ctype), ("content-length", str(len(body)))]
                if status == 401:
                    headers.append(("www-authenticate", 'Bearer realm="lbnode-admin"'))
                await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
                await stream.send_all(conn.send(h11.Data(data=body)))
                await stream.send_all(conn.send(h11.EndOfMessage()))
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            log.exception("admin request failed")
        finally:
            await trio.aclose_forcefully(stream)

    def _authorised(self, req: h11.Request) -> bool:
        if self._expected is None:
            return True
        for name, value in req.headers:
            if name == b"authorization":
                return hmac.compare_digest(value, self._expected)
        # Browsers cannot set headers on a websocket: ?token= is accepted too.
        assert self.token is not None
        tokens = parse_qs(req.target.partition(b"?")[2].decode("latin-1")).get("token", [])
        return any(hmac.compare_digest(t.encode(), self.token.encode()) for t in tokens)

    def _feed_refusal(self, req: h11.Request) -> tuple[int, bytes, str] | None:
        """Why a websocket upgrade is refused (checked before upgrading), or None."""
        if not self._authorised(req):
            return _json(401, {"error": "missing or wrong bearer token"})
        if not origin_allowed(req):
            return _json(403, {"error": "websocket Origin does not match the admin host"})
        return None

    def _dispatch(self, req: h11.Request) -> tuple[int, bytes, str]:
        path = req.target.split(b"?", 1)[0]
        if req.method not in (b"GET", b"HEAD"):
            return _json(405, {"error": "method not allowed: the admin API changes nothing over HTTP"})
        if path == b"/healthz":
            body = self.node.healthz()
            return _json(503 if body["status"] == "draining" else 200, body)
        if not self._authorised(req):
            return _json(401, {"error": "missing or wrong bearer token"})
        if path == b"/status":
            return _json(200, self.node.status())
        if path == FEED_PATH:
            return _json(426, {"error": "GET /events/health is a websocket: send Upgrade: websocket"})
        if path == b"/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST

            from lbnode.metrics import render

            return 200, render(self.node), CONTENT_TYPE_LATEST
        return _json(404, {"error": f"no such admin path {path.decode('latin-1')!r}"})


def _json(status: int, obj: Any) -> tuple[int, bytes, str]:
    return status, (json.dumps(obj, indent=1) + "\n").encode(), "application/json"


async def _next(conn: h11.Connection, stream: trio.SocketStream) -> Any:
    while True:
        ev = conn.next_event()
        if ev is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
            continue
        return ev
