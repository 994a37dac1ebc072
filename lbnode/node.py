"""The node supervisor: one trio nursery tree per process.

::

    Node.run
     ├── admin server                (GET /healthz, /status)
     ├── signal handler              (SIGTERM/SIGINT: drain and exit; SIGHUP: reload)
     ├── access-log flusher
     ├── one accept loop per listener (in its own cancel scope, so one can close alone)
     └── one task per client connection (outlives its listener: drains, then ends)

``apply(config)`` is the only way configuration changes: it builds the new
runtimes and listeners first and commits only if all of them could be built,
so a bad reload leaves the node serving the old config, whole.
"""

from __future__ import annotations

import logging
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from lbnode.accesslog import AccessLog
from lbnode.fastsock import fast_stream
from lbnode.feed import HealthFeed
from lbnode.health import HealthManager
from lbnode.http1 import resolve_impl
from lbnode.admin import AdminServer
from lbnode.api import HttpRequest, HttpResponse, LoadBalancerHandle, LoadBalancerManager, route
from lbnode.listeners import ListenError, accept_loop, make_server_ssl_context, open_listener
from lbnode.proxy import DownstreamConnection, ListenerSlot, Services
from lbnode.runtime import LOCAL_POLICIES, LbRuntime, Policies, PoolRegistry
from lbshared import __version__
from lbshared.config import Config, ConfigError, Listener, load_config

if TYPE_CHECKING:
    from lbnode.cluster.agent import ClusterAgent

log = logging.getLogger("lbnode")

DEFAULT_DRAIN_TIMEOUT = 30.0


@dataclass
class NodeOptions:
    bind: str = "0.0.0.0"
    admin: tuple[str, int] | None = ("127.0.0.1", 9901)
    admin_token: str | None = None
    node_id: str | None = None
    access_log: str = "-"
    http_impl: str = "auto"  # httptools when importable, else h11
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    config_path: Path | None = None
    redis_url: str | None = None
    seed: bool = False  # cluster mode: --config seeds a cluster that has no config
    extra: dict[str, Any] = field(default_factory=dict)


class _ListenerRecord:
    __slots__ = ("key", "lb_name", "cfg", "slot", "listener", "scope", "ssl_ctx")

    def __init__(self, key: tuple[str, int], lb_name: str, cfg: Listener, slot: ListenerSlot) -> None:
        self.key = key
        self.lb_name = lb_name
        self.cfg = cfg
        self.slot = slot
        self.listener: trio.SocketListener | None = None
        self.scope = trio.CancelScope()
        self.ssl_ctx: Any = None


class Node:
    """A standalone load balancer node (the cluster mode builds on it)."""

    def __init__(self, config: Config, options: NodeOptions | None = None) -> None:
        self.options = opts = options or NodeOptions()
        admin_desc = f"{opts.admin[0]}:{opts.admin[1]}" if opts.admin else "noadmin"
        self.node_id = opts.node_id or f"{socket.gethostname()}:{admin_desc}"
        self.config = config
        self.config_version = 0
        self.http_impl = resolve_impl(opts.http_impl)  # "auto" decided once
        self.pools = PoolRegistry(self.http_impl)
        self.runtimes: dict[str, LbRuntime] = {}
        self._listeners: dict[tuple[str, int], _ListenerRecord] = {}
        self.access_log = AccessLog(opts.access_log) if opts.access_log != "off" else None
        self.services = Services(self.node_id, http_impl=self.http_impl, access_log=self.access_log)
        self.started_at = time.time()
        self.admin: AdminServer | None = None
        self._nursery: trio.Nursery | None = None
        self._stop = trio.Event()
        self._apply_lock = trio.Lock()
        self.manager = LoadBalancerManager(self)
        self.feed = HealthFeed(self.node_id)
        self.health = HealthManager(self)
        self.services.health = self.health
        self.cluster: ClusterAgent | None = None
        self.policies: Policies = LOCAL_POLICIES
        if opts.redis_url:
            from lbnode.cluster.agent import ClusterAgent

            self.cluster = ClusterAgent(self, opts.redis_url, seed=config if opts.seed else None)
            self.policies = self.cluster.policies
            self.config = Config(load_balancers=[])  # until the cluster's log says otherwise

    # -- Python API ------------------------------------------------------------

    def lb(self, name: str) -> LoadBalancerHandle:
        """The reference document's per-load-balancer handle."""
        return LoadBalancerHandle(self, name)

    async def route(self, request: HttpRequest, lb: str | None = None) -> HttpResponse:
        """Route a request object through the data path, in-process."""
        return await route(self, request, lb)

    # -- lifecycle -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._run(task_status)
        finally:
            # Also when cancelled from outside: pooled sockets and the log file.
            self.pools.close_all()
            if self.access_log is not None:
                self.access_log.close()

    async def _run(self, task_status: trio.TaskStatus[Node]) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self.services.run_timers)
            if self.options.admin is not None:
                host, port = self.options.admin
                self.admin = AdminServer(self, host, port, self.options.admin_token)
                await nursery.start(self.admin.run)
            await nursery.start(self.health.run)
            if self.cluster is not None:
                await nursery.start(self.cluster.run)
            else:
                await self.apply(self.config)
            nursery.start_soon(self._signals)
            if self.access_log is not None:
                nursery.start_soon(self.access_log.flusher)
            log.info(
                "node %s serving %d load balancer(s), config version %d",
                self.node_id,
                len(self.runtimes),
                self.config_version,
            )
            task_status.started(self)
            await self._stop.wait()
            await self._drain()
            if self.cluster is not None:
                await self.cluster.close()
            nursery.cancel_scope.cancel()

    def stop(self) -> None:
        """Begin a graceful shutdown (what SIGTERM does)."""
        self._stop.set()

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await self.reload()
                elif self._stop.is_set():
                    log.warning("second stop signal: exiting without waiting")
                    assert self._nursery is not None
                    self._nursery.cancel_scope.cancel()
                else:
                    log.info("%s: draining", signal.Signals(signum).name)
                    self._stop.set()

    async def _drain(self) -> None:
        svc = self.services
        svc.start_drain()
        for rec in list(self._listeners.values()):
            self._close_listener(rec)
        deadline = trio.current_time() + self.options.drain_timeout
        while svc.active_connections and trio.current_time() < deadline:
            await trio.sleep(0.02)
        if svc.active_connections:
            log.warning(
                "drain deadline (%gs) passed with %d connection(s) open; closing them",
                self.options.drain_timeout,
                svc.active_connections,
            )
        else:
            log.info("drained")

    async def reload(self) -> bool:
        """Re-read ``--config`` and apply it (SIGHUP). False if it was refused."""
        if self.access_log is not None:
            self.access_log.reopen()
        if self.cluster is not None:
            log.warning("SIGHUP: a cluster node takes its config from Redis; use lbctl apply")
            return False
        path = self.options.config_path
        if path is None:
            log.warning("SIGHUP: no --config file to reload")
            return False
        try:
            config = load_config(path)
        except ConfigError as exc:
            log.error("reload refused, still serving version %d:\n%s", self.config_version, exc)
            return False
        try:
            await self.apply(config)
        except ListenError as exc:
            log.error("reload refused, still serving version %d: %s", self.config_version, exc)
            return False
        log.info("reloaded %s: config version %d", path, self.config_version)
        return True

    # -- configuration ---------------------------------------------------------

    async def apply(self, config: Config, *, version: int | None = None) -> None:
        """Serve ``config``: open, repoint and close listeners to match it.

        All new listeners are opened before anything is committed; on a
        failure they are closed again and ``ListenError`` propagates.
        """
        async with self._apply_lock:
            if version is None:
                version = self.config_version + 1
            runtimes = {
                lb.name: LbRuntime(
                    lb, self.pools, self.runtimes.get(lb.name), version, self.policies
                )
                for lb in config.load_balancers
            }
            wanted: dict[tuple[str, int], tuple[str, Listener]] = {}
            for i, lb in enumerate(config.load_balancers):
                for j, lst in enumerate(lb.listeners):
                    wanted[(lb.name, lst.port)] = (f"load_balancers[{i}].listeners[{j}]", lst)
            opened: list[_ListenerRecord] = []
            keep: dict[tuple[str, int], _ListenerRecord] = {}
            try:
                for key, (where, lst) in wanted.items():
                    old = self._listeners.get(key)
                    if old is not None and old.cfg == lst:
                        keep[key] = old
                        continue
                    rec = _ListenerRecord(key, key[0], lst, self._make_slot(runtimes[key[0]], lst))
                    try:
                        if lst.ssl is not None:
                            rec.ssl_ctx = make_server_ssl_context(
                                lst.ssl.certificate, lst.ssl.private_key
                            )
                        rec.listener = await open_listener(self.options.bind, lst.port)
                    except ListenError as exc:
                        raise ListenError(f"{where}: {exc}") from None
                    opened.append(rec)
            except BaseException:
                for rec in opened:
                    if rec.listener is not None:
                        rec.listener.socket.close()
                raise
            # Commit: repoint kept listeners, start new ones, close the rest.
            for key, rec in keep.items():
                rec.slot.lb = runtimes[key[0]]
            new_map = dict(keep)
            for rec in opened:
                old = self._listeners.get(rec.key)
                new_map[rec.key] = rec
                assert self._nursery is not None
                await self._nursery.start(self._serve_listener, rec)
                if old is not None:
                    self._close_listener(old)
            for key, rec in self._listeners.items():
                if key not in new_map:
                    self._close_listener(rec)
            self._listeners = new_map
            self.runtimes = runtimes
            self.health.sync(runtimes)
            self.config = config
            self.config_version = version
            log.info(
                "applied config version %d: %s",
                version,
                ", ".join(sorted(runtimes)) or "no load balancers",
            )

    def _make_slot(self, rt: LbRuntime, lst: Listener) -> ListenerSlot:
        scheme = b"https" if lst.protocol == "https" else b"http"
        return ListenerSlot(rt, scheme, lst.port, lst.proxy_protocol)

    async def _serve_listener(
        self, rec: _ListenerRecord, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        assert rec.listener is not None and self._nursery is not None
        slot, ssl_ctx, svc = rec.slot, rec.ssl_ctx, self.services
        timeout = slot.lb.request_headers_timeout

        async def handle(stream: trio.SocketStream) -> None:
            try:
                peer = stream.socket.getpeername()[0]
            except OSError:
                await trio.aclose_forcefully(stream)
                return
            s: trio.abc.Stream = fast_stream(stream) if ssl_ctx is None else stream
            if ssl_ctx is not None:
                s = trio.SSLStream(stream, ssl_ctx, server_side=True, https_compatible=True)
                try:
                    with trio.fail_after(timeout):
                        # With proxy_protocol the PROXY header precedes the TLS
                        # handshake: the connection reads it from the raw stream
                        # first, and the handshake runs on first use.
                        if not slot.proxy_protocol:
                            await s.do_handshake()
                except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
                    await trio.aclose_forcefully(s)
                    return
            try:
                await DownstreamConnection(s, slot, svc, peer).serve()
            except Exception:
                log.exception("connection from %s failed", peer)

        log.info(
            "lb %s: listening on %s:%d (%s)",
            rec.lb_name,
            self.options.bind,
            rec.cfg.port,
            rec.cfg.protocol,
        )
        with rec.scope:
            await accept_loop(rec.listener, handle, self._nursery, task_status=task_status)

    def _close_listener(self, rec: _ListenerRecord) -> None:
        rec.slot.closed = True
        rec.scope.cancel()
        if rec.listener is not None:
            rec.listener.socket.close()
        # Its idle keep-alive connections end now (in-flight requests finish, then close).
        for conn in list(self.services.idle):
            if conn.slot is rec.slot:
                conn.wake_idle()
        log.info("lb %s: closed listener on port %d", rec.lb_name, rec.cfg.port)

    # -- views -----------------------------------------------------------------

    def healthz(self) -> dict[str, Any]:
        return {
            "status": "draining" if self.services.draining else "serving",
            "degraded": self.degraded,
            "node": self.node_id,
            "config_version": self.config_version,
        }

    def status(self) -> dict[str, Any]:
        svc = self.services
        lbs = []
        for name, rt in self.runtimes.items():
            lbs.append(
                {
                    "name": name,
                    "version": rt.version,
                    "listeners": [
                        {"port": rec.cfg.port, "protocol": rec.cfg.protocol}
                        for key, rec in self._listeners.items()
                        if key[0] == name
                    ],
                    "targets": [
                        {
                            "id": t.id,
                            "address": t.address,
                            "weight": t.weight,
                            "health": "healthy" if t.healthy else "unhealthy",
                            "breaker": t.breaker.state if t.breaker is not None else "disabled",
                            "ejected": t.ejected_until > time.monotonic(),
                            "active_requests": t.active,
                            "requests_total": t.requests,
                            "pool_open": t.pool.open_connections,
                            "pool_idle": t.pool.idle_connections,
                        }
                        for t in rt.targets
                    ],
                    # Refusals and sticky re-pins by (kind, rule); rule "" is the LB itself.
                    "counters": [
                        {"kind": kind, "rule": rule, "count": n}
                        for (kind, rule), n in sorted(rt.counters.items())
                    ],
                }
            )
        return {
            "node": self.node_id,
            "version": __version__,
            "config_version": self.config_version,
            "draining": svc.draining,
            "degraded": self.degraded,
            "uptime_s": round(time.time() - self.started_at, 3),
            "bind": self.options.bind,
            "active_connections": svc.active_connections,
            "active_requests": svc.active_requests,
            "requests_total": svc.requests_total,
            "responses": {f"{i}xx": n for i, n in enumerate(svc.status_classes) if i},
            "load_balancers": lbs,
        }

    def extra_metrics(self) -> list[Any]:
        """Metric families of subsystems (Redis, event streams) when present."""
        return self.cluster.metrics() if self.cluster is not None else []

    @property
    def degraded(self) -> bool:
        """True while a cluster node cannot reach Redis."""
        return self.cluster is not None and self.cluster.view.degraded

    def listener_ports(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for (lb, _), rec in self._listeners.items():
            assert rec.listener is not None
            out.setdefault(lb, []).append(rec.listener.socket.getsockname()[1])
        return out
