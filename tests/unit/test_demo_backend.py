"""The demo backend, served in-process on a free port and driven by a small h11 client."""

from __future__ import annotations

import json
from functools import partial
from collections.abc import AsyncIterator

import h11
import pytest
import trio
from wsproto.connection import Connection as WSConnection
from wsproto.connection import ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from lbnode.demo_backend import BackendState, expected_bytes, serve_backend

BACKEND_ID = "api-t"
# Every exchange finishes in well under this; a hang fails instead of blocking the run.
TEST_DEADLINE = 5.0


class Reply:
    __slots__ = ("status", "headers", "body", "informational", "chunks")

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.body = b""
        self.informational: list[int] = []
        self.chunks = 0


class Client:
    """One HTTP/1.1 client connection (h11) to the backend under test."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def _send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            await self.stream.send_all(data)

    async def _next(self) -> h11.Event:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
                continue
            return event  # type: ignore[return-value]

    async def request(self, method: str, target: str, **kw: object) -> Reply:
        """Send one request and read the whole response (bounded by TEST_DEADLINE)."""
        with trio.fail_after(TEST_DEADLINE):
            return await self._request(method, target, **kw)  # type: ignore[arg-type]

    async def _request(
        self,
        method: str,
        target: str,
        *,
        headers: list[tuple[str, str]] | None = None,
        body: bytes | None = None,
        wait_for_continue: bool = False,
    ) -> Reply:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        hdrs = [("Host", "backend.test"), *(headers or [])]
        if body is not None and not any(k.lower() == "transfer-encoding" for k, _ in hdrs):
            hdrs.append(("Content-Length", str(len(body))))
        await self._send(h11.Request(method=method, target=target, headers=hdrs))
        reply = Reply()
        event: h11.Event | None = None
        if wait_for_continue:
            event = await self._next()
            assert type(event) is h11.InformationalResponse
            reply.informational.append(event.status_code)
            event = None

        async def send_body() -> None:
            if body:
                await self._send(h11.Data(data=body))
            await self._send(h11.EndOfMessage())

        parts = []
        # The body goes up while the reply comes down: /echo streams it back
        # as it arrives, so writing it all first would deadlock on big bodies.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_body)
            while True:
                event = await self._next()
                if type(event) is h11.InformationalResponse:
                    reply.informational.append(event.status_code)
                elif type(event) is h11.Response:
                    reply.status = event.status_code
                    reply.headers = dict(event.headers)
                elif type(event) is h11.Data:
                    parts.append(bytes(event.data))
                    reply.chunks += 1
                elif type(event) is h11.EndOfMessage:
                    break
                else:
                    raise AssertionError(f"unexpected {event!r}")
        reply.body = b"".join(parts)
        return reply

    async def peer_closed(self) -> bool:
        """True once the server has closed its side (bounded by TEST_DEADLINE)."""
        with trio.fail_after(TEST_DEADLINE):
            return await self.stream.receive_some(65536) == b""


@pytest.fixture
async def port(nursery: trio.Nursery) -> int:
    return await nursery.start(serve_backend, "127.0.0.1", 0, BACKEND_ID)


@pytest.fixture
async def client(port: int) -> AsyncIterator[Client]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        yield Client(stream)
    finally:
        await stream.aclose()


async def test_root_names_the_backend_path_and_method(client: Client) -> None:
    reply = await client.request("GET", "/")
    assert reply.status == 200
    assert reply.headers[b"x-backend"] == BACKEND_ID.encode()
    assert reply.headers[b"content-type"] == b"application/json"
    assert json.loads(reply.body) == {"backend": BACKEND_ID, "path": "/", "method": "GET"}


async def test_unknown_paths_answer_like_root(client: Client) -> None:
    reply = await client.request("DELETE", "/api/v2/users/7?x=1", body=b"ignored")
    assert reply.status == 200
    assert json.loads(reply.body) == {
        "backend": BACKEND_ID,
        "path": "/api/v2/users/7",
        "method": "DELETE",
    }


async def test_one_connection_serves_many_requests_and_stats_counts_them(client: Client) -> None:
    paths = ["/", "/a", "/a", "/health", "/status/404", "/a"]
    for path in paths:
        reply = await client.request("GET", path)
        assert reply.headers[b"x-backend"] == BACKEND_ID.encode()
    stats = json.loads((await client.request("GET", "/stats")).body)
    assert stats == {
        "backend": BACKEND_ID,
        "total": 6,
        "paths": {"/": 1, "/a": 3, "/health": 1, "/status/404": 1},
    }
    reset = json.loads((await client.request("DELETE", "/stats")).body)
    assert reset["total"] == 0 and reset["paths"] == {}


async def test_health_flips_down_and_up(client: Client) -> None:
    assert (await client.request("GET", "/health")).status == 200
    flip = await client.request("POST", "/admin/health/down")
    assert json.loads(flip.body) == {"backend": BACKEND_ID, "healthy": False}
    down = await client.request("GET", "/health")
    assert (down.status, down.body) == (503, b"down\n")
    assert (await client.request("POST", "/admin/health/up")).status == 200
    up = await client.request("GET", "/health")
    assert (up.status, up.body) == (200, b"ok\n")
    assert (await client.request("GET", "/admin/health/down")).status == 404


async def test_state_object_is_shared_with_the_caller(nursery: trio.Nursery) -> None:
    state = BackendState("api-s")
    port = await nursery.start(partial(serve_backend, state=state), "127.0.0.1", 0, "api-s")
    state.healthy = False
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    with trio.fail_after(TEST_DEADLINE):
        reply = await Client(stream).request("GET", "/health")
    await stream.aclose()
    assert reply.status == 503
    assert state.counts["/health"] == 1


@pytest.mark.parametrize(
    ("body", "headers", "framing"),
    [
        (b"hello, echo", [("Content-Type", "text/x-demo")], b"content-length"),
        (b"", [("Content-Type", "text/x-demo")], b"content-length"),
        (b"x" * 300_000, [("Content-Type", "text/x-demo")], b"content-length"),
        (b"chunky" * 1000, [("Content-Type", "text/x-demo"), ("Transfer-Encoding", "chunked")],
         b"transfer-encoding"),
    ],
)
async def test_echo_round_trip(
    client: Client, body: bytes, headers: list[tuple[str, str]], framing: bytes
) -> None:
    reply = await client.request("POST", "/echo", headers=headers, body=body)
    assert reply.status == 200
    assert reply.body == body
    assert reply.headers[b"content-type"] == b"text/x-demo"
    assert framing in reply.headers
    # The connection stays usable after a streamed exchange.
    assert (await client.request("GET", "/")).status == 200


async def test_echo_honours_100_continue(client: Client) -> None:
    reply = await client.request(
        "PUT",
        "/echo",
        headers=[("Expect", "100-continue")],
        body=b"after continue",
        wait_for_continue=True,
    )
    assert reply.informational == [100]
    assert reply.body == b"after continue"


async def test_sink_counts_the_body_after_100_continue(client: Client) -> None:
    reply = await client.request(
        "POST", "/sink", headers=[("Expect", "100-continue")], body=b"z" * 200_000,
        wait_for_continue=True,
    )
    assert reply.informational == [100]
    assert json.loads(reply.body) == {"backend": BACKEND_ID, "received": 200_000}


@pytest.mark.parametrize("n", [0, 1, 65536, 65537, 200_000])
@pytest.mark.parametrize("chunked", [False, True])
async def test_bytes_streams_n_bytes(client: Client, n: int, chunked: bool) -> None:
    target = f"/bytes/{n}?chunked=1" if chunked else f"/bytes/{n}"
    reply = await client.request("GET", target)
    assert reply.status == 200
    assert reply.body == expected_bytes(n)
    if chunked:
        assert reply.headers[b"transfer-encoding"] == b"chunked"
        assert b"content-length" not in reply.headers
    else:
        assert reply.headers[b"content-length"] == str(n).encode()


@pytest.mark.parametrize("target", ["/bytes/-1", "/bytes/many", "/status/99", "/status/x",
                                    "/slow?delay=-1", "/slow?delay=soon"])
async def test_bad_arguments_answer_400(client: Client, target: str) -> None:
    reply = await client.request("GET", target)
    assert reply.status == 400
    assert reply.headers[b"x-backend"] == BACKEND_ID.encode()


@pytest.mark.parametrize(
    ("status", "body"),
    [(200, b"200 OK\n"), (404, b"404 Not Found\n"), (503, b"503 Service Unavailable\n"),
     (204, b""), (599, b"599 \n")],
)
async def test_status_answers_the_asked_status(client: Client, status: int, body: bytes) -> None:
    reply = await client.request("GET", f"/status/{status}")
    assert (reply.status, reply.body) == (status, body)
    assert reply.headers[b"x-backend"] == BACKEND_ID.encode()


async def test_head_gets_headers_without_body(client: Client) -> None:
    reply = await client.request("HEAD", "/bytes/1000")
    assert reply.headers[b"content-length"] == b"1000"
    assert reply.body == b""
    assert (await client.request("GET", "/")).status == 200


async def test_headers_lists_duplicates_in_order(client: Client) -> None:
    reply = await client.request(
        "GET", "/headers?q=1", headers=[("X-Dup", "one"), ("x-dup", "two"), ("X-Other", "3")]
    )
    doc = json.loads(reply.body)
    assert doc["method"] == "GET"
    assert doc["target"] == "/headers?q=1"
    assert doc["http_version"] == "1.1"
    assert doc["headers"] == [
        ["Host", "backend.test"], ["X-Dup", "one"], ["x-dup", "two"], ["X-Other", "3"]
    ]


async def test_set_cookie(client: Client) -> None:
    reply = await client.request("GET", "/set-cookie?name=session_id&value=abc123")
    assert reply.headers[b"set-cookie"] == b"session_id=abc123; Path=/"
    assert json.loads(reply.body)["cookie"] == {"name": "session_id", "value": "abc123"}
    generated = await client.request("GET", "/set-cookie")
    name, _, rest = generated.headers[b"set-cookie"].partition(b"=")
    assert name == b"session_id" and rest.endswith(b"; Path=/") and len(rest) > len(b"; Path=/")
    assert (await client.request("GET", "/set-cookie?value=a;b")).status == 400


async def test_slow_waits_at_least_the_delay(client: Client) -> None:
    start = trio.current_time()
    reply = await client.request("GET", "/slow?delay=0.05")
    assert trio.current_time() - start >= 0.05
    assert json.loads(reply.body) == {"backend": BACKEND_ID, "delay": 0.05}


async def test_close_answers_then_closes(client: Client) -> None:
    reply = await client.request("GET", "/close")
    assert reply.status == 200
    assert reply.headers[b"connection"] == b"close"
    assert await client.peer_closed()


async def test_http10_request_is_answered_and_closed(port: int) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    with trio.fail_after(TEST_DEADLINE):
        await stream.send_all(b"GET /status/201 HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    await stream.aclose()
    assert data.startswith(b"HTTP/1.1 201 Created\r\n")
    assert data.endswith(b"\r\n\r\n201 Created\n")


async def test_malformed_request_gets_400_and_close(port: int) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    with trio.fail_after(TEST_DEADLINE):
        await stream.send_all(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    await stream.aclose()
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"\r\nx-backend: api-t\r\n" in data
    assert b"\r\nconnection: close\r\n" in data


async def test_ws_without_upgrade_answers_426(client: Client) -> None:
    reply = await client.request("GET", "/ws")
    assert reply.status == 426
    assert reply.headers[b"upgrade"] == b"websocket"


async def test_websocket_echo(port: int) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    ws = WSConnection(ConnectionType.CLIENT)
    key = b"dGhlIHNhbXBsZSBub25jZQ=="
    with trio.fail_after(TEST_DEADLINE):
        # The first frame rides in the same segment as the handshake: the server
        # must pick it up from the bytes h11 read past the request.
        await stream.send_all(
            b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
            + ws.send(TextMessage(data="early"))
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(1)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert b"\r\nsec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in head
        assert b"\r\nx-backend: api-t\r\n" in head
        await stream.send_all(
            ws.send(BytesMessage(data=b"\x00\xff" * 40_000)) + ws.send(Ping(payload=b"p"))
        )
        texts: list[str] = []
        binary = bytearray()
        binary_done = False
        pongs: list[bytes] = []
        while not (texts and binary_done and pongs):
            ws.receive_data(await stream.receive_some(65536))
            for event in ws.events():
                if isinstance(event, TextMessage):
                    texts.append(event.data)
                elif isinstance(event, BytesMessage):
                    binary += event.data
                    binary_done = event.message_finished
                elif isinstance(event, Pong):
                    pongs.append(bytes(event.payload))
        assert texts == ["early"]
        assert binary == b"\x00\xff" * 40_000
        assert pongs == [b"p"]
        await stream.send_all(ws.send(CloseConnection(code=1000)))
        closed = False
        while not closed:
            data = await stream.receive_some(65536)
            if not data:
                break
            ws.receive_data(data)
            closed = any(isinstance(e, CloseConnection) for e in ws.events())
        assert closed
    await stream.aclose()
