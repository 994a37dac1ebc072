"""``lbnode``: the proxy node's command line (DESIGN.md's contract).

Every flag also reads an environment variable (``LB_CONFIG``,
``LB_REDIS_URL``, ``LB_NODE_ID``, ``LB_BIND``, ``LB_ADMIN``,
``LB_ADMIN_TOKEN``, ``LB_HTTP``, ...); a flag given on the command line wins.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from importlib import resources
from pathlib import Path

import trio

from lbnode.admin import is_loopback, parse_hostport
from lbnode.http1 import CHOICES, resolve_impl
from lbnode.listeners import ListenError
from lbnode.node import DEFAULT_DRAIN_TIMEOUT, Node, NodeOptions
from lbshared.config import Config, ConfigError, load_config, parse_config
from lbshared.durations import parse_duration

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lbnode",
        description="A load balancer node. Without --redis it runs standalone on --config "
        "(or the embedded default); with --redis it joins the cluster.",
    )
    p.add_argument("--config", default=_env("LB_CONFIG"), metavar="FILE",
                   help="config file (YAML); env LB_CONFIG")
    p.add_argument("--redis", default=_env("LB_REDIS_URL"), metavar="URL",
                   help="Redis URL to join a cluster; env LB_REDIS_URL")
    p.add_argument("--node-id", default=_env("LB_NODE_ID"), metavar="ID",
                   help="node id (default HOSTNAME:ADMIN); env LB_NODE_ID")
    p.add_argument("--bind", default=_env("LB_BIND", "0.0.0.0"), metavar="HOST",
                   help="address every listener binds (default 0.0.0.0); env LB_BIND")
    p.add_argument("--admin", default=_env("LB_ADMIN", "127.0.0.1:9901"), metavar="HOST:PORT",
                   help="admin address (default 127.0.0.1:9901, 'off' to disable); env LB_ADMIN")
    p.add_argument("--admin-token", default=_env("LB_ADMIN_TOKEN"), metavar="TOKEN",
                   help="bearer token for the admin API; required off loopback; env LB_ADMIN_TOKEN")
    p.add_argument("--access-log", default=_env("LB_ACCESS_LOG", "-"), metavar="PATH|-|off",
                   help="access log: '-' stdout (default), a file path, or 'off'; env LB_ACCESS_LOG")
    p.add_argument("--log-level", default=_env("LB_LOG_LEVEL", "info"), metavar="LEVEL",
                   help="debug, info, warning or error (any case); env LB_LOG_LEVEL")
    p.add_argument("--log-format", default=_env("LB_LOG_FORMAT", "text"), metavar="text|json",
                   help="event log lines as text (default) or one JSON object a line; "
                   "env LB_LOG_FORMAT")
    p.add_argument("--workers", default=_env("LB_WORKERS", "1"), metavar="N|auto",
                   help="worker processes sharing the listeners (default 1); env LB_WORKERS")
    p.add_argument("--drain-timeout", default=_env("LB_DRAIN_TIMEOUT", f"{DEFAULT_DRAIN_TIMEOUT:g}s"),
                   metavar="DURATION",
                   help="how long SIGTERM waits for in-flight requests (default 30s)")
    p.add_argument("--http", "--http-impl", dest="http_impl", choices=CHOICES,
                   default=_env("LB_HTTP", _env("LB_HTTP_IMPL", "auto")),
                   help="HTTP/1.1 parser of the data path: httptools (llhttp), h11 (the "
                        "portable reference) or auto (httptools when installed, the "
                        "default); env LB_HTTP")
    p.add_argument("--check", action="store_true",
                   help="validate the config and exit (0 valid, 1 invalid)")
    return p


class JsonLogFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, node, msg (and exc)."""

    def __init__(self, node_id: str | None) -> None:
        super().__init__()
        self.node_id = node_id

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "node": self.node_id,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, separators=(",", ":"))


def default_config_text() -> str:
    return resources.files("lbnode").joinpath("default_config.yaml").read_text()


def _fail(message: str, code: int = 2) -> int:
    print(f"lbnode: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = str(args.log_level).strip().lower()
    if level not in LOG_LEVELS:
        return _fail(f"--log-level: {args.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    log_format = str(args.log_format).strip().lower()
    if log_format not in ("text", "json"):
        return _fail(f"--log-format: {args.log_format!r} is not text or json")
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonLogFormatter(args.node_id))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if args.http_impl not in CHOICES:  # a choice from the environment is not checked by argparse
        return _fail(f"--http: {args.http_impl!r} is not one of {', '.join(CHOICES)}")
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])

    config_path = Path(args.config) if args.config else None
    try:
        if config_path is not None:
            config: Config = load_config(config_path)
        else:
            config = parse_config(default_config_text(), source="<embedded default>")
    except ConfigError as exc:
        print(f"lbnode: invalid config {args.config or '<embedded default>'}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    except OSError as exc:
        return _fail(f"cannot read config {args.config!r}: {exc.strerror or exc}", 1)
    if args.check:
        print(f"{args.config or '<embedded default>'}: ok ({len(config.load_balancers)} load balancer(s))")
        return 0

    if args.redis:
        from lbshared.redis_url import parse_url

        try:
            parse_url(args.redis)
        except ValueError as exc:
            return _fail(f"--redis: {exc}")
    try:
        workers = (os.cpu_count() or 1) if args.workers == "auto" else int(args.workers)
    except ValueError:
        return _fail(f"--workers: {args.workers!r} is not a number or 'auto'")
    if workers < 1:
        return _fail("--workers: must be at least 1")

    admin: tuple[str, int] | None = None
    if str(args.admin).lower() != "off":
        try:
            admin = parse_hostport(args.admin)
        except ValueError as exc:
            return _fail(f"--admin: {exc}")
        if not is_loopback(admin[0]) and not args.admin_token:
            return _fail(
                f"--admin {args.admin}: a token (--admin-token or LB_ADMIN_TOKEN) is required "
                "to bind the admin API off loopback"
            )
    try:
        drain = parse_duration(args.drain_timeout)
    except ValueError as exc:
        return _fail(f"--drain-timeout: {exc}")
    access_log = args.access_log
    if access_log not in ("-", "off"):
        try:
            open(access_log, "a").close()
        except OSError as exc:
            return _fail(f"--access-log {access_log!r}: {exc.strerror or exc}")

    if workers > 1:
        from lbnode.workers import supervise

        node_id = args.node_id or f"{socket.gethostname()}:{args.admin}"
        return supervise(list(sys.argv[1:] if argv is None else argv), workers, admin, node_id)

    http_impl = resolve_impl(args.http_impl)
    logging.getLogger("lbnode").info("HTTP/1.1 implementation: %s", http_impl)
    options = NodeOptions(
        bind=args.bind,
        admin=admin,
        admin_token=args.admin_token,
        node_id=args.node_id,
        access_log=access_log,
        http_impl=http_impl,
        drain_timeout=drain,
        config_path=config_path,
        redis_url=args.redis or None,
        seed=config_path is not None,
    )
    node = Node(config, options)
    try:
        trio.run(node.run)
    except ListenError as exc:
        return _fail(str(exc), 1)
    except BaseExceptionGroup as group:  # raised inside the node's nursery
        failed, rest = group.split(ListenError)
        if failed is None or rest is not None:
            raise
        first: BaseException = failed
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        return _fail(str(first), 1)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
