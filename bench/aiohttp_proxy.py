"""An aiohttp reverse proxy: the asyncio peer lbnode is compared with.

It is the proxy a Python team would write with aiohttp, done properly and no
more: an ``aiohttp.web`` server whose one handler forwards every request to
one upstream through a single ``ClientSession``, created once, whose
``TCPConnector`` keeps upstream connections alive and pools them without a
limit. The method, the path and query as received, and the headers minus the
hop-by-hop ones go upstream (a request body is streamed); the status, the
headers minus the hop-by-hop ones and the body come back. A response body
with a ``Content-Length`` of at most ``READ_LIMIT`` is read whole and sent in
one piece (aiohttp's fast path, what the benchmark's 14-byte answers take);
any other body is streamed. Bodies are forwarded as they are (no
decompression, no ``Accept-Encoding`` added). Access log off; 502 when the
upstream cannot be reached or breaks, 504 when it times out.

It runs on asyncio's default event loop, not uvloop, even where uvloop is
installed: that is aiohttp's typical deployment (``web.run_app`` with no
loop policy), and it is the setup the comparison is about. aiohttp's C HTTP
parser is used when its wheel ships it, as it does on the usual platforms.

    python bench/aiohttp_proxy.py --port 8000 --upstream 127.0.0.1:9000
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, web
from multidict import CIMultiDict
from yarl import URL

#: Hop-by-hop headers (RFC 9110 7.6.1), never forwarded in either direction.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
     "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
)  # fmt: skip
#: Response bodies with a Content-Length up to this are read whole, larger ones streamed.
READ_LIMIT = 1 << 20
#: Upstream timeouts: connecting, and between two reads of a response.
CONNECT_TIMEOUT = 2.0
READ_TIMEOUT = 30.0
#: Idle upstream connections are kept this long.
UPSTREAM_KEEPALIVE = 60.0

SESSION = web.AppKey("session", ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def forward(request: web.Request) -> web.StreamResponse:
    """Send ``request`` upstream and relay the answer."""
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
    url = URL(request.app[UPSTREAM] + request.raw_path, encoded=True)
    response: web.StreamResponse | None = None
    try:
        async with request.app[SESSION].request(
            request.method, url, headers=headers, allow_redirects=False,
            data=request.content if request.body_exists else None,
        ) as upstream:  # fmt: skip
            out = CIMultiDict(
                (k, v) for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP
            )
            length = upstream.content_length
            if length is not None and length <= READ_LIMIT:
                body = await upstream.read()
                out.popall("Content-Length", None)  # aiohttp sets it from the body
                return web.Response(status=upstream.status, headers=out, body=body)
            response = web.StreamResponse(status=upstream.status, headers=out)
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
    except (TimeoutError, ClientError) as exc:
        if response is not None:
            raise  # the head is sent: aiohttp cuts the connection, the client sees it
        if isinstance(exc, TimeoutError):
            return web.Response(status=504, text="upstream timed out\n")
        return web.Response(status=502, text="upstream failed\n")


async def session_context(app: web.Application) -> AsyncIterator[None]:
    """The one ClientSession (and its connection pool) for the app's lifetime."""
    connector = TCPConnector(limit=0, keepalive_timeout=UPSTREAM_KEEPALIVE)
    timeout = ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT)
    async with ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False,
        skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent"),
    ) as session:  # fmt: skip
        app[SESSION] = session
        yield


def make_app(upstream: str) -> web.Application:
    """The proxy application for ``upstream`` (``host:port``)."""
    app = web.Application()
    app[UPSTREAM] = f"http://{upstream}"
    app.cleanup_ctx.append(session_context)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, metavar="HOST:PORT")
    a = p.parse_args()
    web.run_app(make_app(a.upstream), host=a.host, port=a.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
