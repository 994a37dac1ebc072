"""The data path: one downstream connection, its requests, their upstreams.

Theory of operation
-------------------
Each accepted connection runs ``DownstreamConnection.serve`` in one task. A
request goes through these phases, in order (the same order as HAProxy's
and Pingora's, drawn once here)::

    read head -> decide (LbRuntime: rules, limits, target)
      -> acquire upstream (pool; on connect failure retry once elsewhere)
      -> send head (+ body, streamed)  -> read response head
         (no byte back on a bodiless idempotent request: once elsewhere)
      -> stream response body          -> release upstream, log

Nothing is buffered beyond one receive (64 KiB) per direction: bodies are
streamed chunk by chunk with back-pressure from ``send_all``. Writes are
coalesced: everything the parsers have ready is serialised and sent with one
``send_all`` before the next read, so a small request costs one write each
way.

Errors are classified once, where they happen: ``ClientGone`` (the
downstream broke or stalled: nothing to answer), ``UpstreamFailed`` (502:
closed, reset, or spoke bad HTTP), ``UpstreamTimeout`` (504). Once response
bytes have been sent, an upstream failure can only be signalled by closing
the client connection.

A request body is never replayed: the only retries are a connect failure
(nothing was sent) and a request without body on a reused pooled connection
that the upstream had closed (nothing was processed).
"""

from __future__ import annotations

import json
import math
from http import HTTPStatus
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from lbnode.headers import downstream_response_headers, upstream_request_headers, wants_upgrade
from lbnode.http1 import (
    NEED_DATA,
    PAUSED,
    ConnectionClosed,
    Data,
    EndOfMessage,
    InformationalResponse,
    ProtocolError,
    Request,
    Response,
    ServerProtocol,
    make_server,
)
from lbnode.policy.balancing import Metrics
from lbnode.policy.proxy_protocol import ProxyHeader, ProxyProtocolError, parse_proxy_header
from lbnode.policy.request import RequestView
from lbnode.policy.sticky import CookieAction, StickyPolicy
from lbnode.policy.timers import TimerWheel
from lbnode.runtime import LbRuntime, TargetGroup, TargetState
from lbnode.upstream import ConnectError, UpstreamConn

if TYPE_CHECKING:
    from lbnode.health import HealthManager

log = logging.getLogger("lbnode.proxy")

RECEIVE_SIZE = 65536
# Flush coalesced response bytes to the client once this much is pending.
FLUSH_THRESHOLD = 65536
TEXT_PLAIN = (b"content-type", b"text/plain; charset=utf-8")
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class _TryElsewhere(Exception):
    """Nothing was processed by this target: another one may serve the request.

    Raised for a request without body whose pooled connection's target refused
    a fresh connect, or for an idempotent request without body whose target
    closed or reset the connection before answering a byte (nginx's default
    ``proxy_next_upstream error``, HAProxy's ``retry-on empty-response``).
    """

    def __init__(self, reason: str, kind: str = "connect") -> None:
        super().__init__(reason)
        self.kind = kind


#: Methods whose request may be sent twice (RFC 9110 section 9.2.2).
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))


class ClientGone(Exception):
    """The downstream client closed, reset or stalled: nobody to answer."""


class UpstreamFailed(Exception):
    def __init__(self, reason: str, *, got_response: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.got_response = got_response


class UpstreamTimeout(Exception):
    pass


class ListenerSlot:
    """What a listener serves; repointed (not mutated) on reload."""

    __slots__ = ("lb", "scheme", "port", "closed", "proxy_protocol")

    def __init__(self, lb: LbRuntime, scheme: bytes, port: int, proxy_protocol: bool = False) -> None:
        self.lb = lb
        self.scheme = scheme
        self.port = port
        self.closed = False
        self.proxy_protocol = proxy_protocol


class Services:
    """Node-wide things every connection shares."""

    def __init__(
        self,
        node_id: str,
        *,
        http_impl: str = "h11",
        access_log: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.node_id = node_id
        self.http_impl = http_impl
        self.access_log = access_log
        self.health: HealthManager | None = None  # set by the node
        # The deadlines of every connection's waits; run_timers() fires them.
        self.timers = TimerWheel(time.monotonic())
        self.draining = False
        self.idle: set[DownstreamConnection] = set()
        self.active_connections = 0
        self.active_requests = 0
        self.requests_total = 0
        self.status_classes = [0, 0, 0, 0, 0, 0]  # index: status // 100

    def start_drain(self) -> None:
        self.draining = True
        for conn in list(self.idle):
            conn.wake_idle()

    async def run_timers(self) -> None:
        """Fire the connections' expired deadlines, forever (a node task)."""
        wheel = self.timers
        while True:
            await trio.sleep(wheel.resolution)
            for conn in wheel.expire(time.monotonic()):
                conn.fire()


def _body_framing(headers: list[tuple[bytes, bytes]]) -> tuple[bool, bool]:
    """(has a body, asks for 100-continue) from a request head."""
    body = expect = False
    for name, value in headers:
        if name == b"content-length":
            body = value.strip() != b"0"
        elif name == b"transfer-encoding":
            body = True
        elif name == b"expect":
            expect = value.strip().lower() == b"100-continue"
    return body, expect


def error_body(status: int, message: str) -> bytes:
    return f"{status} {message}\n".encode()


class DownstreamConnection:
    __slots__ = (
        "stream",
        "slot",
        "svc",
        "client_ip",
        "client_ip_b",
        "proto",
        "timer_slot",
        "timed_out",
        "_scope",
        "_closing",
    )

    def __init__(self, stream: trio.abc.Stream, slot: ListenerSlot, svc: Services, peer: str) -> None:
        self.stream = stream
        self.slot = slot
        self.svc = svc
        self.client_ip = peer
        self.client_ip_b = peer.encode()
        lb = slot.lb
        self.proto: ServerProtocol = make_server(
            svc.http_impl, max_header_bytes=lb.max_header_bytes, max_headers=lb.max_headers
        )
        # One cancel scope for the connection's life: its waits arm a deadline
        # on the node's timer wheel instead of entering a scope each
        # (lbnode/policy/timers.py says why); a deadline that passes, or a
        # drain, cancels it.
        self.timer_slot = 0
        self.timed_out = False
        self._scope = trio.CancelScope()
        self._closing = False

    def fire(self) -> None:
        """The armed wait's deadline passed (called by the timer task)."""
        self.timed_out = True
        self._scope.cancel()

    def wake_idle(self) -> None:
        """End this connection now: it is waiting for a request (drain, reload)."""
        self._scope.cancel()

    # -- downstream I/O ------------------------------------------------------

    async def _down_recv(self) -> bytes:
        try:
            return await self.stream.receive_some(RECEIVE_SIZE)
        except _BROKEN as exc:
            raise ClientGone(str(exc)) from None

    async def _down_send(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except _BROKEN as exc:
            raise ClientGone(str(exc)) from None

    # -- connection loop -----------------------------------------------------

    async def serve(self) -> None:
        svc = self.svc
        svc.active_connections += 1
        first = True
        try:
            with self._scope:
                if self.slot.proxy_protocol and not await self._read_proxy_header():
                    return
                while not self._closing:
                    try:
                        req = await self._next_request(first)
                    except ProtocolError as exc:
                        await self._fatal_error(exc.status, str(exc))
                        return
                    if req is None:
                        return
                    first = False
                    svc.active_requests += 1
                    try:
                        keep = await self._handle(req)
                    finally:
                        svc.active_requests -= 1
                    if not keep or svc.draining or self.slot.closed or not self.proto.can_reuse:
                        return
                    self.proto.start_next_cycle()
        except ClientGone:
            pass
        finally:
            svc.active_connections -= 1
            svc.idle.discard(self)
            svc.timers.disarm(self)
            await trio.aclose_forcefully(self.stream)

    async def _read_proxy_header(self) -> bool:
        """Read the PROXY protocol v1/v2 header a listener with
        ``proxy_protocol: true`` requires; False to drop the connection."""
        lb = self.slot.lb
        buf = b""
        # On TLS the header comes before the handshake: read it from the raw
        # transport, exactly (``at_least`` never overshoots the header), so the
        # first TLS byte is left for the handshake.
        raw = self.stream.transport_stream if isinstance(self.stream, trio.SSLStream) else None
        with trio.move_on_after(lb.request_headers_timeout):
            while True:
                try:
                    res = parse_proxy_header(buf)
                except ProxyProtocolError as exc:
                    log.info("lb %s: bad PROXY header from %s: %s", lb.name, self.client_ip, exc)
                    return False
                if isinstance(res, ProxyHeader):
                    break
                if raw is not None:
                    try:
                        data = await raw.receive_some(res.at_least - len(buf))
                    except _BROKEN:
                        return False
                else:
                    data = await self._down_recv()
                if not data:
                    return False
                buf += data
            if res.src_ip is not None and lb.believes_proxy_header(self.client_ip):
                self.client_ip = res.src_ip
                self.client_ip_b = res.src_ip.encode()
            if len(buf) > res.consumed:
                self.proto.receive_data(buf[res.consumed :])
            return True
        log.info("lb %s: no PROXY header from %s in time", lb.name, self.client_ip)
        return False

    async def _next_request(self, first: bool) -> Request | None:
        proto = self.proto
        ev = proto.next_event()
        if ev is NEED_DATA:
            lb = self.slot.lb
            if self.svc.draining:
                return None
            # Waiting for the first byte of a request: the idle timeout on a
            # kept-alive connection, the header timeout on a new one. Either
            # (or a drain, which wakes connections parked here) cancels the
            # connection's scope: it closes without a word.
            wait = lb.request_headers_timeout if first else lb.idle_timeout
            svc = self.svc
            svc.idle.add(self)
            svc.timers.arm(self, time.monotonic() + wait)
            try:
                data = await self._down_recv()
            finally:
                svc.timers.disarm(self)
                svc.idle.discard(self)
            proto.receive_data(data)
            ev = proto.next_event()
            if ev is NEED_DATA:
                with trio.move_on_after(lb.request_headers_timeout) as scope:
                    while ev is NEED_DATA:
                        proto.receive_data(await self._down_recv())
                        ev = proto.next_event()
                if scope.cancelled_caught:
                    await self._fatal_error(408, "request header timeout")
                    return None
        if type(ev) is Request:
            return ev
        return None  # ConnectionClosed, or nothing more to read

    async def _fatal_error(self, status: int, message: str) -> None:
        """Answer a request we cannot go on with, then close."""
        body = error_body(status, message)
        headers = [TEXT_PLAIN, (b"content-length", b"%d" % len(body)), (b"connection", b"close")]
        try:
            data = self.proto.send_response(status, headers, _reason(status)) + self.proto.send_data(body)
            data += self.proto.send_end()
        except Exception:
            data = b"HTTP/1.1 %d %s\r\n" % (status, _reason(status))
            data += b"".join(b"%s: %s\r\n" % h for h in headers) + b"\r\n" + body
        self._count(status)
        try:
            await self.stream.send_all(data)
        except _BROKEN:
            pass
        self._closing = True

    async def _send_error(
        self, status: int, message: str, extra: list[tuple[bytes, bytes]] | None = None, close: bool = False
    ) -> int:
        body = error_body(status, message)
        headers = [TEXT_PLAIN, (b"content-length", b"%d" % len(body))]
        if extra:
            headers.extend(extra)
        if (close or self.svc.draining or self.slot.closed) and (b"connection", b"close") not in headers:
            headers.append((b"connection", b"close"))
        proto = self.proto
        data = proto.send_response(status, headers, _reason(status))
        await self._down_send(data + proto.send_data(body) + proto.send_end())
        return len(body)

    def _count(self, status: int) -> None:
        svc = self.svc
        svc.requests_total += 1
        svc.status_classes[min(status // 100, 5)] += 1

    # -- one request ----------------------------------------------------------

    async def _handle(self, req: Request) -> bool:
        """Serve one request; False when the connection must close."""
        t0 = time.monotonic()
        lb = self.slot.lb  # the whole request uses this snapshot
        client = lb.client_ip(self.client_ip, req.headers) if lb.trusted is not None else self.client_ip
        view = RequestView(req.method, req.target, req.headers, client, "")
        record = _Outcome()
        record.client = client
        try:
            await self._forward(req, lb, view, record)
        except ClientGone:
            record.status = record.status or 499
            return False
        finally:
            status = record.status or 499
            self._count(status)
            up = record.upstream_ms
            lb.stats.observe(
                record.rule, record.target, status, time.monotonic() - t0,
                None if up is None else up / 1000.0,
            )
            if self.svc.access_log is not None:
                self._log(req, lb, record, t0)
        return not record.close

    async def _refuse(
        self, rec: _Outcome, status: int, message: str, extra: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        rec.status = status
        if extra is None:  # admitted by a rate limit (then 502/503): its headers still apply
            extra = rec.extra_headers
        # A request without body is complete once its end is read, and the
        # connection stays usable; a body is not read: say that we close.
        try:
            done = type(self.proto.next_event()) is EndOfMessage
        except ProtocolError:
            done = False
        if not done:
            extra = [*(extra or ()), (b"connection", b"close")]
        rec.bytes_out = await self._send_error(status, message, extra)

    async def _forward(self, req: Request, lb: LbRuntime, view: RequestView, rec: _Outcome) -> None:
        # Order of checks: access, rule match, rate limit, sticky, balancing.
        ip = view.client_ip
        if lb.access is not None and not lb.access.allows(ip):
            lb.count("access_denied", None)
            return await self._refuse(rec, 403, "access denied")
        match = lb.rules.match(view) if lb.has_rules else None
        if match is not None:
            rec.rule = match.name
            if match.access is not None and not match.access.allows(ip):
                lb.count("access_denied", match.name)
                return await self._refuse(rec, 403, "access denied")
            group = lb.rule_groups[match.index]
            limiter = lb.rule_limiters.get(match.index, lb.limiter)
            sticky = match.sticky
        else:
            group = lb.default_group
            limiter = lb.limiter
            sticky = lb.sticky
        now = time.monotonic()
        if limiter is not None:
            if limiter.is_async:  # strict mode: one atomic decision in Redis
                decision = await limiter.acheck_request(view, now)  # type: ignore[attr-defined]
            else:
                decision = limiter.check_request(view, now)
            if not decision.allowed:
                lb.count("rate_limited", rec.rule)
                return await self._refuse(rec, 429, "rate limit exceeded", decision.headers())
            rec.extra_headers = decision.headers()
        target: TargetState | None = None
        if sticky is not None:
            session = sticky.session_of_request(view)
            if session:
                rec.sticky = sticky
                rec.pin_key = key = sticky.key(session)
                pinned = await lb.pins.get(key, now)
                if pinned is not None:
                    t = group.by_id.get(pinned)
                    if t is not None and t.available(now):
                        target = t
                        rec.pinned = True
                        await lb.pins.refresh(key, sticky.ttl, now)
                    else:  # its target is gone or unhealthy: re-pin below
                        await lb.pins.unpin(key)
                        lb.count("sticky_repin", rec.rule)
            else:
                rec.sticky = sticky  # learn the session from the response
        has_body, expect = _body_framing(req.headers)
        if target is None:
            target = group.pick(view)
        if target is None:
            if any(t.healthy and t.breaker is not None and t.breaker.state != "closed"
                   for t in group.targets):  # fmt: skip
                return await self._refuse(rec, 503, "circuit breaker open")
            return await self._refuse(rec, 503, "no healthy target")
        health = self.svc.health
        try:
            conn = await target.pool.acquire(lb.connect_timeout)
        except ConnectError as exc:
            log.warning("lb %s: connect to %s (%s) failed: %s", lb.name, target.id, target.address, exc.reason)
            if health is not None:
                health.record(lb, target, 502, "connect", False)
            alt = group.pick(view, exclude=target)
            if alt is None:
                return await self._refuse(rec, 502, f"bad gateway: {target.id}: {exc.reason}")
            target = alt
            if rec.pinned:  # the pinned target is unreachable: re-pin to the one that answers
                assert rec.pin_key is not None
                await lb.pins.unpin(rec.pin_key)
                lb.count("sticky_repin", rec.rule)
                rec.pinned = False
            try:
                conn = await target.pool.acquire(lb.connect_timeout)
            except ConnectError as exc2:
                log.warning("lb %s: connect to %s (%s) failed: %s", lb.name, target.id, target.address, exc2.reason)
                if health is not None:
                    health.record(lb, target, 502, "connect", False)
                return await self._refuse(rec, 502, f"bad gateway: {target.id}: {exc2.reason}")
        upgrade = wants_upgrade(req.headers)
        headers, rec.request_id = upstream_request_headers(
            req.headers,
            client_ip=self.client_ip_b,
            scheme=self.slot.scheme,
            upgrade=upgrade,
            default_host=target.address.encode(),
        )
        rec.target = target.id
        breaker = target.breaker
        trial = breaker is not None and breaker.state == "half_open" and breaker.allow_trial()
        target.active += 1
        target.requests += 1
        t_start = time.monotonic()
        try:
            if group.wants_record:  # a custom algorithm that tracks its own metrics
                _record(group, target, Metrics(target.active))
            try:
                await self._exchange(conn, target, lb, req, headers, has_body, expect, upgrade, rec)
            except _TryElsewhere as gone:
                # A request without body whose target died under its pooled
                # connection: nothing was processed, so another target may serve it.
                if health is not None:
                    health.record(lb, target, 502, gone.kind, False)
                alt = group.pick(view, exclude=target)
                alt_conn = None
                if alt is not None:
                    try:
                        alt_conn = await alt.pool.acquire(lb.connect_timeout)
                    except ConnectError:
                        alt_conn = None
                if alt is None or alt_conn is None:
                    return await self._refuse(rec, 502, f"bad gateway: {target.id}: {gone}")
                target.active -= 1
                target = alt
                target.active += 1
                target.requests += 1
                rec.target = target.id
                rec.close = False  # nothing was answered yet: the client's connection lives on
                trial = False
                await self._exchange(
                    alt_conn, target, lb, req, headers, has_body, expect, upgrade, rec, again=True
                )
        finally:
            target.active -= 1
            status = rec.status
            if health is not None and status and status != 499:
                kind = "ok" if status < 500 else "timeout" if status == 504 else "5xx"
                health.record(lb, target, status, kind, trial)
            if group.wants_record:
                _record(
                    group,
                    target,
                    Metrics(target.active, time.monotonic() - t_start, not 0 < rec.status < 500),
                )

    async def _exchange(
        self,
        conn: UpstreamConn,
        target: TargetState,
        lb: LbRuntime,
        req: Request,
        headers: list[tuple[bytes, bytes]],
        has_body: bool,
        expect: bool,
        upgrade: bytes | None,
        rec: _Outcome,
        *,
        again: bool = False,
    ) -> None:
        dproto = self.proto
        released = False
        t_up = time.monotonic()
        try:
            up = conn.proto
            head = up.send_request(req.method, req.target, headers)
            body_sent = True
            if not has_body:
                if not again:
                    ev = dproto.next_event()  # the empty body's EndOfMessage
                    if type(ev) is not EndOfMessage:
                        raise ClientGone("unexpected event after a request without body")
                try:
                    await _up_send(conn, head + up.send_end())
                    resp = await self._response_head(conn, lb, upgrade)
                except UpstreamFailed as exc:
                    if exc.got_response:
                        raise
                    # One other target at most (``again``: this is it).
                    retry = not again and req.method in IDEMPOTENT and upgrade is None
                    if not conn.reused and not retry:
                        raise  # the upstream may have acted on it
                    conn.pool.release(conn, False)
                    released = True
                    if not conn.reused:  # idempotent: nothing answered, try another target
                        raise _TryElsewhere(exc.reason, "5xx") from None
                    # A pooled connection the upstream had closed: nothing was
                    # processed, so one fresh attempt is safe.
                    try:
                        conn = await self._reconnect(target, lb)
                    except ConnectError as cexc:  # the target died: another one may serve it
                        if again:
                            raise
                        raise _TryElsewhere(cexc.reason) from None
                    released = False
                    up = conn.proto
                    try:
                        await _up_send(conn, up.send_request(req.method, req.target, headers) + up.send_end())
                        resp = await self._response_head(conn, lb, upgrade)
                    except UpstreamFailed as exc2:
                        if exc2.got_response or not retry:
                            raise
                        conn.pool.release(conn, False)
                        released = True
                        raise _TryElsewhere(exc2.reason, "5xx") from None
            else:
                await _up_send(conn, head)
                if expect and self.proto.client_http_version == b"1.1":
                    await self._down_send(dproto.send_informational(100, [], b"Continue"))
                # The body goes up while the response comes down: an upstream
                # may answer (and stream) before it has read everything.
                pump = _Pump()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump_task, conn, lb, rec, pump, nursery.cancel_scope)
                    try:
                        resp = await self._response_head(conn, lb, None, pump)
                        rec.upstream_ms = round((time.monotonic() - t_up) * 1000.0, 3)
                        await self._stream_response(conn, resp, lb, rec)
                    except Exception as exc:
                        pump.error = pump.error or exc
                    nursery.cancel_scope.cancel()
                # Checked once the pump has stopped: it may have written the
                # body's end (so the upstream could answer) and not yet run again.
                if not pump.done:
                    # Answered before the body was all sent: the rest of
                    # the body is not read, so neither connection is reusable.
                    body_sent = False
                if pump.error is not None:
                    raise pump.error
                if not body_sent:
                    rec.close = True
                released = True
                conn.pool.release(conn, body_sent and conn.proto.can_reuse)
                return
            rec.upstream_ms = round((time.monotonic() - t_up) * 1000.0, 3)
            if type(resp) is InformationalResponse:  # 101: switch protocols
                released = True
                await self._tunnel(conn, resp, upgrade, rec)
                return
            await self._stream_response(conn, resp, lb, rec)
            if not body_sent:
                rec.close = True
            released = True
            conn.pool.release(conn, conn.proto.can_reuse)
        except UpstreamTimeout:
            if dproto.response_started:
                rec.close = True
            else:
                rec.status = 504
                message = f"gateway timeout: {target.id} did not answer in {lb.upstream_timeout:g}s"
                # After the timer wheel fired, this connection's scope is
                # cancelled: answer from a shielded one (bounded by the idle
                # timeout), then close. (A body upload's own scope leaves it intact.)
                shield = self.timed_out
                rec.close = shield
                deadline = trio.current_time() + lb.idle_timeout if shield else math.inf
                with trio.CancelScope(shield=shield, deadline=deadline):
                    rec.bytes_out = await self._send_error(504, message, rec.extra_headers, close=shield)
        except UpstreamFailed as exc:
            log.info("lb %s: upstream %s failed: %s", lb.name, target.id, exc.reason)
            if dproto.response_started:
                rec.close = True
            else:
                rec.status = 502
                rec.bytes_out = await self._send_error(502, f"bad gateway: {target.id}: {exc.reason}", rec.extra_headers)
        except ProtocolError as exc:  # we could not serialise for the upstream
            log.info("lb %s: upstream %s: %s", lb.name, target.id, exc)
            if dproto.response_started:
                rec.close = True
            else:
                rec.status = 502
                rec.bytes_out = await self._send_error(502, f"bad gateway: {exc}", rec.extra_headers)
        except ConnectError as exc:
            rec.status = 502
            rec.bytes_out = await self._send_error(502, f"bad gateway: {target.id}: {exc.reason}", rec.extra_headers)
        finally:
            if not released:
                conn.pool.release(conn, False)
            if not dproto.can_reuse:
                rec.close = True

    async def _reconnect(self, target: TargetState, lb: LbRuntime) -> UpstreamConn:
        return await target.pool.acquire(lb.connect_timeout)

    async def _pump_task(
        self, conn: UpstreamConn, lb: LbRuntime, rec: _Outcome, pump: _Pump, scope: trio.CancelScope
    ) -> None:
        try:
            rec.bytes_in = await self._pump_request_body(conn, lb, rec)
            pump.done = True
        except UpstreamFailed:
            # The upstream stopped reading; it may still answer (413, 401...):
            # the response side decides.
            pass
        except Exception as exc:  # ClientGone, or a bug: either ends the exchange
            pump.error = exc
            scope.cancel()
        finally:
            pump.finished = True
            # The response timeout runs from the end of the request body.
            if pump.head_scope is not None:
                pump.head_scope.deadline = trio.current_time() + lb.upstream_timeout

    async def _pump_request_body(self, conn: UpstreamConn, lb: LbRuntime, rec: _Outcome) -> int:
        dproto = self.proto
        up = conn.proto
        total = 0
        while True:
            try:
                ev = dproto.next_event()
            except ProtocolError as exc:  # a malformed chunked body
                raise ClientGone(str(exc)) from None
            if ev is NEED_DATA:
                with trio.move_on_after(lb.idle_timeout) as scope:
                    data = await self._down_recv()
                if scope.cancelled_caught:
                    raise ClientGone("request body timeout")
                try:
                    dproto.receive_data(data)
                except ProtocolError as exc:
                    raise ClientGone(str(exc)) from None
                continue
            t = type(ev)
            try:
                if t is Data:
                    total += len(ev.data)
                    rec.bytes_in = total
                    out = up.send_data(ev.data)
                elif t is EndOfMessage:
                    out = up.send_end(ev.trailers)
                else:
                    raise ClientGone(f"unexpected {ev!r} in a request body")
            except ProtocolError as exc:
                raise UpstreamFailed(str(exc)) from None
            if out:  # nothing to write for the end of a Content-Length body:
                # no checkpoint there, where the finished response would cancel us
                await _up_send(conn, out)
            if t is EndOfMessage:
                return total

    async def _response_head(
        self, conn: UpstreamConn, lb: LbRuntime, upgrade: bytes | None, pump: _Pump | None = None
    ) -> Response:
        up = conn.proto
        got = False
        timeout = lb.upstream_timeout
        while True:
            try:
                ev = up.next_event()
            except ProtocolError as exc:
                raise UpstreamFailed(str(exc), got_response=got) from None
            if ev is NEED_DATA:
                if pump is None:  # the common case: a deadline on the timer wheel
                    timers = self.svc.timers
                    timers.arm(self, time.monotonic() + timeout)
                    try:
                        data = await _up_recv(conn)
                    except trio.Cancelled:
                        if not self.timed_out:
                            raise
                        raise UpstreamTimeout() from None
                    finally:
                        timers.disarm(self)
                else:
                    with trio.move_on_after(timeout) as scope:
                        if not pump.finished:
                            # Still uploading: no response deadline until the body is sent.
                            scope.deadline = math.inf
                            pump.head_scope = scope
                        data = await _up_recv(conn)
                    pump.head_scope = None
                    if scope.cancelled_caught:
                        raise UpstreamTimeout()
                if not data and not got:
                    raise UpstreamFailed("upstream closed the connection without answering")
                got = True
                try:
                    up.receive_data(data)
                except ProtocolError as exc:
                    raise UpstreamFailed(str(exc), got_response=True) from None
                continue
            t = type(ev)
            if t is Response:
                return ev
            if t is InformationalResponse:
                if ev.status == 101 and upgrade is not None:
                    return ev
                continue  # 100 Continue (we answered the client ourselves), 103...
            if t is ConnectionClosed or ev is PAUSED:
                raise UpstreamFailed("upstream closed the connection without answering", got_response=got)
            raise UpstreamFailed(f"unexpected {ev!r} from upstream", got_response=True)

    async def _stream_response(
        self, conn: UpstreamConn, resp: Response, lb: LbRuntime, rec: _Outcome
    ) -> None:
        dproto = self.proto
        up = conn.proto
        rec.status = resp.status
        out_headers = downstream_response_headers(resp.headers)
        if rec.extra_headers:
            out_headers.extend(rec.extra_headers)
        if rec.sticky is not None and resp.status < 500:
            await _learn_pin(lb, rec, resp.headers)
        if self.svc.draining or self.slot.closed:  # we close after this response: say so
            out_headers.append((b"connection", b"close"))
        chunks = [dproto.send_response(resp.status, out_headers, resp.reason)]
        pending = len(chunks[0])
        out = 0
        timeout = lb.upstream_timeout
        while True:
            try:
                ev = up.next_event()
            except ProtocolError as exc:
                await self._flush(chunks)
                raise UpstreamFailed(str(exc), got_response=True) from None
            if ev is NEED_DATA:
                if chunks:
                    await self._flush(chunks)
                    chunks = []
                    pending = 0
                with trio.move_on_after(timeout) as scope:
                    data = await _up_recv(conn)
                if scope.cancelled_caught:
                    raise UpstreamTimeout()
                try:
                    up.receive_data(data)
                except ProtocolError as exc:
                    raise UpstreamFailed(str(exc), got_response=True) from None
                continue
            t = type(ev)
            if t is Data:
                out += len(ev.data)
                piece = dproto.send_data(ev.data)
                chunks.append(piece)
                pending += len(piece)
                if pending >= FLUSH_THRESHOLD:
                    await self._flush(chunks)
                    chunks = []
                    pending = 0
            elif t is EndOfMessage:
                chunks.append(dproto.send_end(ev.trailers))
                await self._flush(chunks)
                rec.bytes_out = out
                return
            else:
                raise UpstreamFailed(f"unexpected {ev!r} in a response body", got_response=True)

    async def _flush(self, chunks: list[bytes]) -> None:
        if chunks:
            await self._down_send(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    async def _tunnel(
        self, conn: UpstreamConn, resp: Response, upgrade: bytes | None, rec: _Outcome
    ) -> None:
        """After a 101: copy bytes both ways until both sides are done."""
        dproto = self.proto
        rec.status = 101
        rec.close = True
        head = dproto.send_informational(
            101,
            downstream_response_headers(resp.headers, upgrade=upgrade or b"websocket"),
            resp.reason or b"Switching Protocols",
        )
        up_extra = conn.proto.trailing_data
        down_extra = dproto.trailing_data
        counts = [len(down_extra), len(up_extra)]
        try:  # the upstream connection is released whatever happens from here
            await self._down_send(head + up_extra if up_extra else head)
            if down_extra:
                await _up_send(conn, down_extra)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_copy, self.stream, conn.stream, counts, 0)
                nursery.start_soon(_copy, conn.stream, self.stream, counts, 1)
        except UpstreamFailed:
            pass
        finally:
            conn.pool.release(conn, False)
            rec.bytes_in, rec.bytes_out = counts

    def _log(self, req: Request, lb: LbRuntime, rec: _Outcome, t0: float) -> None:
        now = time.monotonic()
        assert self.svc.access_log is not None
        rid = rec.request_id
        if rid is None:  # refused before the upstream head was built: the client's id, if any
            rid = next((v for n, v in req.headers if n == b"x-request-id"), None)
        self.svc.access_log(
            {
                "ts": round(time.time(), 3),
                "node": self.svc.node_id,
                "lb": lb.name,
                "rule": rec.rule,
                "client": rec.client,
                "method": req.method.decode("latin-1"),
                "path": req.target.decode("latin-1"),
                "status": rec.status or 499,
                "target": rec.target,
                "upstream_ms": rec.upstream_ms,
                "total_ms": round((now - t0) * 1000.0, 3),
                "bytes_in": rec.bytes_in,
                "bytes_out": rec.bytes_out,
                "request_id": rid.decode("latin-1") if rid else None,
            }
        )


class _Pump:
    """Shared between a request-body pump task and the response side."""

    __slots__ = ("done", "finished", "error", "head_scope")

    def __init__(self) -> None:
        self.done = False  # the whole body went up
        self.finished = False  # the pump stopped, for whatever reason
        self.error: BaseException | None = None
        self.head_scope: trio.CancelScope | None = None


async def _learn_pin(lb: LbRuntime, rec: _Outcome, headers: list[tuple[bytes, bytes]]) -> None:
    """Sticky sessions from the response: a Set-Cookie of the session cookie
    pins the new session to the target that set it (HAProxy's ``stick
    store-response``); a request that carried an unpinned session pins it."""
    sticky = rec.sticky
    assert sticky is not None and rec.target is not None
    now = time.monotonic()
    change = sticky.response_cookie(headers)
    if change is not None:
        key = sticky.key(change.session)
        if change.action is CookieAction.SET:
            if key == rec.pin_key and not rec.pinned:
                await lb.pins.unpin(key)
            await lb.pins.pin_if_absent(key, rec.target, sticky.ttl, now)
        else:
            await lb.pins.unpin(key)
    elif rec.pin_key is not None and not rec.pinned:
        await lb.pins.pin_if_absent(rec.pin_key, rec.target, sticky.ttl, now)


class _Outcome:
    """What the access log and the counters learn about one request."""

    __slots__ = (
        "status",
        "target",
        "rule",
        "client",
        "upstream_ms",
        "bytes_in",
        "bytes_out",
        "request_id",
        "close",
        "extra_headers",
        "sticky",
        "pin_key",
        "pinned",
    )

    def __init__(self) -> None:
        self.client = ""
        self.extra_headers: list[tuple[bytes, bytes]] | None = None
        self.sticky: StickyPolicy | None = None
        self.pin_key: str | None = None
        self.pinned = False
        self.status = 0
        self.target: str | None = None
        self.rule: str | None = None
        self.upstream_ms: float | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.request_id: bytes | None = None
        self.close = False


def _record(group: TargetGroup, target: TargetState, metrics: Metrics) -> None:
    """Report to a custom algorithm; its bugs are logged, never fail a request."""
    try:
        group.algorithm.record(target, metrics)
    except Exception:
        log.exception("custom algorithm %r failed in record()", group.algorithm)


async def _up_send(conn: UpstreamConn, data: bytes) -> None:
    try:
        await conn.stream.send_all(data)
    except _BROKEN as exc:
        raise UpstreamFailed(f"send failed: {exc}") from None


async def _up_recv(conn: UpstreamConn) -> bytes:
    try:
        return await conn.stream.receive_some(RECEIVE_SIZE)
    except _BROKEN as exc:
        raise UpstreamFailed(f"receive failed: {exc}") from None


async def _copy(src: trio.abc.Stream, dst: trio.abc.Stream, counts: list[int], idx: int) -> None:
    """One direction of a tunnel; half-closes ``dst`` at EOF."""
    try:
        while True:
            data = await src.receive_some(RECEIVE_SIZE)
            if not data:
                break
            counts[idx] += len(data)
            await dst.send_all(data)
        send_eof = getattr(dst, "send_eof", None)
        if send_eof is not None:
            try:
                await send_eof()
            except (*_BROKEN, trio.BusyResourceError):
                pass
        else:
            await trio.aclose_forcefully(dst)
    except _BROKEN:
        await trio.aclose_forcefully(dst)
        await trio.aclose_forcefully(src)


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""



def format_access_record(record: dict[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":"))
