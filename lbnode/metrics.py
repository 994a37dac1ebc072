"""Request statistics and the Prometheus view of a node.

The request path only bumps plain counters and fixed-bucket histograms kept
per load balancer, rule and target (a dict lookup, an index into a list, a
``bisect``): no label lookups or locks per request. ``NodeCollector`` turns
them into Prometheus metric families when ``/metrics`` is scraped, through
``prometheus_client``'s own types and text encoder.

Histograms share one bucket layout everywhere, so histograms from several
nodes merge by adding counts: that is how cluster-wide percentiles are
computed (never by averaging percentiles).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

if TYPE_CHECKING:
    from lbnode.node import Node

# Upper bounds in seconds; the last bucket is +Inf.
BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class Histogram:
    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def merge(self, other: Histogram) -> None:
        for i, n in enumerate(other.counts):
            self.counts[i] += n
        self.sum += other.sum

    def cumulative(self) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        total = 0
        for bound, n in zip((*BUCKETS, float("inf")), self.counts, strict=True):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out

    def quantile(self, q: float) -> float | None:
        """The q-quantile (0..1), interpolated linearly inside its bucket."""
        total = self.count
        if total == 0:
            return None
        rank = q * total
        seen = 0
        lower = 0.0
        for i, n in enumerate(self.counts):
            upper = BUCKETS[i] if i < len(BUCKETS) else BUCKETS[-1]
            if n and seen + n >= rank:
                return lower + (upper - lower) * ((rank - seen) / n)
            seen += n
            lower = upper
        return BUCKETS[-1]

    def to_list(self) -> list[int]:
        return list(self.counts)

    @classmethod
    def from_list(cls, counts: Iterable[int], total: float = 0.0) -> Histogram:
        h = cls()
        counts = list(counts)
        if len(counts) != len(h.counts):
            raise ValueError("histogram bucket layout differs")
        h.counts = counts
        h.sum = total
        return h


class RequestStats:
    """Counts for one (rule, target) of one load balancer."""

    __slots__ = ("classes", "errors", "request", "upstream")

    def __init__(self) -> None:
        self.classes = [0, 0, 0, 0, 0, 0]  # index: status // 100 (0 unused)
        self.errors = 0
        self.request = Histogram()
        self.upstream = Histogram()

    @property
    def total(self) -> int:
        return sum(self.classes)


class LbStats:
    """Per-load-balancer statistics; survives config rebuilds."""

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], RequestStats] = {}

    def observe(
        self, rule: str | None, target: str | None, status: int, total: float, upstream: float | None
    ) -> None:
        key = (rule or "", target or "")
        st = self.entries.get(key)
        if st is None:
            st = self.entries[key] = RequestStats()
        st.classes[min(max(status // 100, 1), 5)] += 1
        if status >= 500:
            st.errors += 1
        st.request.observe(total)
        if upstream is not None:
            st.upstream.observe(upstream)

    def target_requests(self, target: str) -> int:
        return sum(st.total for (_, t), st in self.entries.items() if t == target)


def _hist(name: str, doc: str, labels: list[str]) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, labels=labels)


class NodeCollector:
    """A prometheus_client collector over a live node."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def describe(self) -> list[Metric]:
        return []  # collected fresh on every scrape

    def collect(self) -> Iterator[Metric]:
        node = self.node
        svc = node.services
        labels = ["lb", "rule", "target"]
        requests = CounterMetricFamily(
            "lbnode_requests", "Requests answered, by status class.", labels=[*labels, "code"]
        )
        errors = CounterMetricFamily(
            "lbnode_request_errors", "Requests answered with a 5xx (upstream's or ours).", labels=labels
        )
        req_hist = _hist("lbnode_request_duration_seconds", "Request head to last byte.", labels)
        up_hist = _hist(
            "lbnode_upstream_response_seconds", "Request sent upstream to response head.", labels
        )
        refusals = CounterMetricFamily(
            "lbnode_refusals", "Requests refused before any upstream work.", labels=["lb", "rule", "reason"]
        )
        repins = CounterMetricFamily(
            "lbnode_sticky_repins", "Sticky sessions moved off a gone or unhealthy target.", labels=["lb", "rule"]
        )
        active = GaugeMetricFamily(
            "lbnode_target_active_requests", "Requests in flight to a target.", labels=["lb", "target"]
        )
        healthy = GaugeMetricFamily(
            "lbnode_target_healthy", "1 if the target takes traffic, else 0.", labels=["lb", "target"]
        )
        pool = GaugeMetricFamily(
            "lbnode_upstream_connections", "Upstream connections by state.", labels=["lb", "target", "state"]
        )
        for name, rt in node.runtimes.items():
            for (rule, target), st in rt.stats.entries.items():
                for i, cls in enumerate(CLASSES, start=1):
                    if st.classes[i]:
                        requests.add_metric([name, rule, target, cls], st.classes[i])
                errors.add_metric([name, rule, target], st.errors)
                _add_hist(req_hist, [name, rule, target], st.request)
                if st.upstream.count:
                    _add_hist(up_hist, [name, rule, target], st.upstream)
            for (kind, rule), n in rt.counters.items():
                if kind == "sticky_repin":
                    repins.add_metric([name, rule], n)
                else:
                    reason = {"access_denied": "access", "rate_limited": "rate_limit"}.get(kind, kind)
                    refusals.add_metric([name, rule, reason], n)
            for t in rt.targets:
                active.add_metric([name, t.id], t.active)
                healthy.add_metric([name, t.id], 1 if t.healthy else 0)
                pool.add_metric([name, t.id, "open"], t.pool.open_connections)
                pool.add_metric([name, t.id, "idle"], t.pool.idle_connections)
        yield from (requests, errors, req_hist, up_hist, refusals, repins, active, healthy, pool)
        yield GaugeMetricFamily(
            "lbnode_active_connections", "Client connections open.", value=svc.active_connections
        )
        yield GaugeMetricFamily(
            "lbnode_config_version", "Version of the configuration applied.", value=node.config_version
        )
        yield GaugeMetricFamily(
            "lbnode_draining", "1 while the node drains for shutdown.", value=1 if svc.draining else 0
        )
        yield from node.extra_metrics()


def _add_hist(family: HistogramMetricFamily, labels: list[str], h: Histogram) -> None:
    family.add_metric(labels, h.cumulative(), h.sum)


def render(node: Node) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))  # type: ignore[arg-type]
    return generate_latest(registry)


def summary(stats: LbStats) -> dict[str, Any]:
    """A compact, mergeable form of one load balancer's statistics."""
    out: dict[str, Any] = {}
    for (rule, target), st in stats.entries.items():
        out[f"{rule}|{target}"] = {
            "classes": st.classes[1:],
            "errors": st.errors,
            "hist": st.request.to_list(),
            "sum": st.request.sum,
        }
    return out
