"""``GET /events/health`` on the admin port: the health feed over a websocket.

The admin server parses the request with h11 and, for an upgrade to
``websocket`` on this path, checks the token and ``Origin`` *before*
upgrading, then hands the raw stream to wsproto (the handshake is replayed
into it). Messages are JSON objects ``{"id", "type", "lb", "target",
"reason", "at", "node"}``, one per text frame.

``?lb=NAME`` filters; ``?since=ID`` first sends the kept events after ``ID``
(``0``: the whole kept history) and then the live ones, with no gap and no
duplicate: the subscription starts before the history is read, and live
events already covered by the history are skipped by id. Without ``since``
only new events are sent. A subscriber that falls behind its bounded queue
is closed with code 1008 ("too slow"); it never slows the node.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import h11
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    Request,
)

from lbnode.feed import FeedOverflow, _id_key

if TYPE_CHECKING:
    from lbnode.feed import HealthFeed

log = logging.getLogger("lbnode.admin")

PING_INTERVAL = 20.0


def is_websocket_upgrade(req: h11.Request) -> bool:
    conn = upgrade = False
    for name, value in req.headers:
        if name == b"connection" and b"upgrade" in value.lower():
            conn = True
        elif name == b"upgrade" and value.lower() == b"websocket":
            upgrade = True
    return conn and upgrade


def origin_allowed(req: h11.Request) -> bool:
    """A browser's ``Origin`` must name the admin host itself (same host as
    the ``Host`` header); clients that send no ``Origin`` (curl, scripts) pass."""
    origin = host = None
    for name, value in req.headers:
        if name == b"origin":
            origin = value.decode("latin-1")
        elif name == b"host":
            host = value.decode("latin-1")
    if origin is None:
        return True
    if origin == "null" or host is None:
        return False
    return urlsplit(origin).netloc.lower() == host.lower()


def _raw_request(req: h11.Request) -> bytes:
    lines = [b"%s %s HTTP/1.1" % (req.method, req.target)]
    lines += [b"%s: %s" % (n, v) for n, v in req.headers.raw_items()]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def serve_feed(
    stream: trio.abc.Stream, req: h11.Request, trailing: bytes, feed: HealthFeed
) -> None:
    query = parse_qs(urlsplit(req.target.decode("latin-1")).query)
    lb = query.get("lb", [None])[0]
    since = query.get("since", [None])[0]
    ws = WSConnection(ConnectionType.SERVER)
    ws.receive_data(_raw_request(req) + trailing)
    if not any(isinstance(ev, Request) for ev in ws.events()):
        await stream.send_all(ws.send(RejectConnection(status_code=400)))
        return
    await stream.send_all(ws.send(AcceptConnection()))
    sub = feed.subscribe(lb)

    async def reader() -> None:
        # Answer pings, notice the close; client messages are ignored.
        try:
            while True:
                data = await stream.receive_some(4096)
                if not data:
                    break
                ws.receive_data(data)
                for ev in ws.events():
                    if isinstance(ev, Ping):
                        await stream.send_all(ws.send(ev.response()))  # noqa: ASYNC
                    elif isinstance(ev, CloseConnection):
                        try:
                            await stream.send_all(ws.send(ev.response()))
                        except Exception:
                            pass
                        return
                    elif isinstance(ev, Message):
                        pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            sub.close()

    async def send(event: dict[str, object]) -> None:
        await stream.send_all(ws.send(Message(data=json.dumps(event, separators=(",", ":")))))

    async def writer(cancel: trio.CancelScope) -> None:
        try:
            last = (0, 0)
            if since is not None:
                for event in await feed.history(since, lb):
                    await send(event)
                    last = max(last, _id_key(str(event["id"])))
            try:
                async for event in sub:
                    if _id_key(str(event["id"])) <= last:
                        continue  # already sent from the history
                    await send(event)
            except FeedOverflow:
                log.info("health feed: closing a subscriber that fell behind")
                with trio.move_on_after(1):
                    await stream.send_all(ws.send(CloseConnection(code=1008, reason="too slow")))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            cancel.cancel()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            nursery.start_soon(writer, nursery.cancel_scope)
    finally:
        sub.close()
