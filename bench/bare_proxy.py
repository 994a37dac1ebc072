"""A bare trio + h11 reverse proxy: the floor lbnode is measured against.

One upstream, keep-alive on both sides with one pooled upstream connection
per client connection, no header rewriting, no policy, no logging. It is what
"a bare trio + h11 proxy" means in docs/performance.md.

    python bench/bare_proxy.py --port 8000 --upstream 127.0.0.1:9000
"""

from __future__ import annotations

import argparse

import h11
import trio

HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"te"}


async def _next(conn: h11.Connection, stream: trio.SocketStream) -> object:
    while True:
        ev = conn.next_event()
        if ev is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
            continue
        return ev


async def handle(client: trio.SocketStream, host: str, port: int) -> None:
    down = h11.Connection(h11.SERVER)
    upstream: trio.SocketStream | None = None
    up: h11.Connection | None = None
    try:
        while True:
            req = await _next(down, client)
            if not isinstance(req, h11.Request):
                return
            assert isinstance(await _next(down, client), h11.EndOfMessage)
            if upstream is None:
                upstream = await trio.open_tcp_stream(host, port)
                up = h11.Connection(h11.CLIENT)
            assert up is not None
            headers = [(k, v) for k, v in req.headers if k not in HOP]
            await upstream.send_all(
                up.send(h11.Request(method=req.method, target=req.target, headers=headers))
                + up.send(h11.EndOfMessage())
            )
            resp = await _next(up, upstream)
            assert isinstance(resp, h11.Response)
            out = down.send(
                h11.Response(
                    status_code=resp.status_code,
                    headers=[(k, v) for k, v in resp.headers if k not in HOP],
                )
            )
            while True:
                ev = await _next(up, upstream)
                if isinstance(ev, h11.Data):
                    out += down.send(h11.Data(data=ev.data))
                elif isinstance(ev, h11.EndOfMessage):
                    out += down.send(h11.EndOfMessage())
                    break
            await client.send_all(out)
            up.start_next_cycle()
            down.start_next_cycle()
    except (trio.BrokenResourceError, h11.ProtocolError, AssertionError):
        pass
    finally:
        if upstream is not None:
            await trio.aclose_forcefully(upstream)
        await trio.aclose_forcefully(client)


async def main(port: int, upstream: str) -> None:
    host, _, uport = upstream.rpartition(":")

    async def handler(stream: trio.SocketStream) -> None:
        await handle(stream, host, int(uport))

    await trio.serve_tcp(handler, port, host="127.0.0.1")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    a = p.parse_args()
    trio.run(main, a.port, a.upstream)
