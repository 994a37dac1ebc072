"""Listening sockets, TLS contexts and the accept loop."""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger("lbnode.listeners")

BACKLOG = 4096
# accept() errors that mean "out of a resource, try again shortly", as trio's
# own serve_listeners treats them; anything else is a bug and propagates.
ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
# How long to back off after such an error before accepting again.
SLEEP_TIME = 0.1
# At most this many already-pending connections taken at once after an accept.
ACCEPT_BURST = 64


class ListenError(Exception):
    """A listener could not be opened; the message says which and why."""


def make_server_ssl_context(certificate: str, private_key: str) -> ssl.SSLContext:
    """A server context: TLS 1.2 minimum, HTTP/1.1 by ALPN."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certificate, private_key)
    except FileNotFoundError as exc:
        raise ListenError(f"cannot read {exc.filename!r}: no such file") from None
    except (ssl.SSLError, OSError) as exc:
        raise ListenError(
            f"cannot load certificate {certificate!r} with key {private_key!r}: {exc}"
        ) from None
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


async def open_listener(
    host: str, port: int, *, reuse_port: bool = True
) -> trio.SocketListener:
    """A listening socket with SO_REUSEADDR and SO_REUSEPORT set, so several
    nodes (or worker processes) can share an address and port. The admin
    port passes ``reuse_port=False``: two nodes on one admin port is a mistake
    to refuse, not a load to share."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        await sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return trio.SocketListener(sock)


async def accept_loop(
    listener: trio.SocketListener,
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    handler_nursery: trio.Nursery,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept until the listener is closed; each connection runs in
    ``handler_nursery`` so closing a listener does not cut its connections."""
    task_status.started()
    # The stdlib socket under trio's, to take every pending connection per
    # wake-up: trio's accept() takes one per scheduler round, so under load
    # new connections would queue behind the busy ones (tail latency).
    raw = getattr(listener.socket, "_sock", None)
    while True:
        try:
            stream = await listener.accept()
        except trio.ClosedResourceError:
            return
        except OSError as exc:
            if exc.errno in ACCEPT_CAPACITY_ERRNOS:
                log.error("accept failed (%s); retrying in %ss", exc.strerror, SLEEP_TIME)
                await trio.sleep(SLEEP_TIME)
                continue
            raise
        handler_nursery.start_soon(handler, stream)
        if raw is not None:
            for _ in range(ACCEPT_BURST):
                try:
                    sock, _addr = raw.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break  # the awaited accept() reports it on the next round
                more = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
                handler_nursery.start_soon(handler, more)
