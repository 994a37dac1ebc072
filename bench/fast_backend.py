"""A fixed-response HTTP/1.1 backend that is never the bottleneck of a benchmark.

Theory of operation
===================

The proxy benchmark compares "client -> backend" with "client -> lbnode ->
backend"; the backend must therefore be much faster than the proxy, or the
ratio measures the backend. This server does the least HTTP that is still
correct for benchmark traffic: an ``asyncio.Protocol`` that buffers bytes,
cuts requests at ``b"\\r\\n\\r\\n"``, skips a ``Content-Length`` body if there is
one, and answers every request with the same precomputed 200 response. All
responses produced by one ``data_received`` call go out in one ``write``, so
pipelined keep-alive requests cost one syscall per batch.

Not supported (answered 501 and closed): chunked request bodies. A request
with ``Connection: close`` (or HTTP/1.0 without keep-alive) is answered and
closed. Header names are matched case-insensitively by substring search on
the lower-cased head (a few hundred nanoseconds per request).

``--workers N`` forks N processes sharing the port with ``SO_REUSEPORT``.

Usage: ``python bench/fast_backend.py --port 9000 [--host 127.0.0.1] [--workers 1]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys

BODY = b"Hello, world!\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: " + str(len(BODY)).encode() + b"\r\n"
    b"X-Backend: fast\r\n"
    b"\r\n" + BODY
)
RESPONSE_CLOSE = RESPONSE.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
NOT_IMPLEMENTED = (
    b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
)
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
# A head larger than this without its terminating blank line is refused.
MAX_HEAD = 65536


class FastHTTP(asyncio.Protocol):
    """One client connection: parse heads, skip bodies, answer the fixed response."""

    __slots__ = ("transport", "buf", "skip")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.skip = 0  # body bytes of the current request still to discard

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos = 0
        out: list[bytes] = []
        close = False
        n = len(buf)
        while pos < n:
            if self.skip:
                take = min(self.skip, n - pos)
                self.skip -= take
                pos += take
                continue
            end = buf.find(b"\r\n\r\n", pos)
            if end < 0:
                if n - pos > MAX_HEAD:
                    out.append(BAD_REQUEST)
                    close = True
                break
            head = buf[pos:end]
            pos = end + 4
            answer = RESPONSE
            lower = head.lower()
            if b"\r\ntransfer-encoding:" in lower:
                out.append(NOT_IMPLEMENTED)
                close = True
                break
            i = lower.find(b"\r\ncontent-length:")
            if i >= 0:
                j = lower.find(b"\r\n", i + 17)
                try:
                    self.skip = int(lower[i + 17 : j if j >= 0 else len(lower)])
                except ValueError:
                    out.append(BAD_REQUEST)
                    close = True
                    break
            line_end = lower.find(b"\r\n")
            http10 = (lower[:line_end] if line_end >= 0 else lower).endswith(b"http/1.0")
            if b"\r\nconnection: close" in lower or (
                http10 and b"\r\nconnection: keep-alive" not in lower
            ):
                answer = RESPONSE_CLOSE
                close = True
            out.append(answer)
            if close:
                break
        self.buf = b"" if close or pos >= n else buf[pos:]
        transport = self.transport
        assert transport is not None
        if out:
            transport.write(out[0] if len(out) == 1 else b"".join(out))
        if close:
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


def _listen_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def _serve(sock: socket.socket) -> None:
    try:
        import uvloop  # type: ignore[import-not-found]

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    server = loop.run_until_complete(loop.create_server(FastHTTP, sock=sock, backlog=4096))
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, loop.stop)
    try:
        loop.run_forever()
    finally:
        server.close()
        loop.close()


def main(argv: list[str] | None = None) -> int:
    """Run the server; ``--port 0`` prints the chosen port on stdout."""
    parser = argparse.ArgumentParser(description="fixed-response HTTP/1.1 benchmark backend")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    args = parser.parse_args(argv)
    try:
        sock = _listen_socket(args.host, args.port, reuse_port=args.workers > 1)
    except OSError as exc:
        print(f"fast_backend: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    print(f"fast_backend listening on {args.host}:{sock.getsockname()[1]}", flush=True)
    children: list[int] = []
    for _ in range(args.workers - 1):
        pid = os.fork()
        if pid == 0:
            _serve(sock)
            os._exit(0)
        children.append(pid)
    try:
        _serve(sock)
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
