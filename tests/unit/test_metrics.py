"""Request statistics and their Prometheus rendering."""

from __future__ import annotations

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from lbnode.api import HttpRequest
from lbnode.demo_backend import serve_backend
from lbnode.metrics import BUCKETS, Histogram, LbStats, render
from lbnode.node import Node, NodeOptions
from lbshared.config import parse_config


def test_histogram_buckets_and_cumulative() -> None:
    h = Histogram()
    for v in (0.0001, 0.0007, 0.003, 0.003, 100.0):
        h.observe(v)
    cum = dict(h.cumulative())
    assert cum["0.0005"] == 1
    assert cum["0.001"] == 2
    assert cum["0.005"] == 4
    assert cum["60.0"] == 4
    assert cum["+Inf"] == 5
    assert h.count == 5
    assert h.sum == pytest.approx(100.0068)


def test_histogram_merge_equals_observing_everything() -> None:
    values_a = [0.001 * i for i in range(1, 200)]
    values_b = [0.05 * i for i in range(1, 50)]
    a, b, both = Histogram(), Histogram(), Histogram()
    for v in values_a:
        a.observe(v)
        both.observe(v)
    for v in values_b:
        b.observe(v)
        both.observe(v)
    a.merge(b)
    assert a.counts == both.counts
    assert a.sum == pytest.approx(both.sum)


def test_quantile_lies_in_the_right_bucket() -> None:
    h = Histogram()
    for _ in range(90):
        h.observe(0.002)  # bucket (0.001, 0.0025]
    for _ in range(10):
        h.observe(0.4)  # bucket (0.25, 0.5]
    p50 = h.quantile(0.5)
    p99 = h.quantile(0.99)
    assert p50 is not None and 0.001 < p50 <= 0.0025
    assert p99 is not None and 0.25 < p99 <= 0.5
    assert Histogram().quantile(0.5) is None


def test_round_trip_through_lists() -> None:
    h = Histogram()
    h.observe(0.3)
    again = Histogram.from_list(h.to_list(), h.sum)
    assert again.counts == h.counts
    with pytest.raises(ValueError):
        Histogram.from_list([1, 2, 3])


def test_lb_stats_by_rule_target_and_class() -> None:
    s = LbStats()
    s.observe("r", "a", 200, 0.01, 0.005)
    s.observe("r", "a", 503, 0.02, None)
    s.observe(None, None, 429, 0.0001, None)
    st = s.entries[("r", "a")]
    assert st.classes[2] == 1 and st.classes[5] == 1 and st.errors == 1
    assert st.upstream.count == 1 and st.request.count == 2
    assert s.entries[("", "")].classes[4] == 1
    assert s.target_requests("a") == 2
    assert len(BUCKETS) + 1 == len(st.request.counts)


async def test_metrics_endpoint_text_parses_with_prometheus_parser() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_backend, "127.0.0.1", 0, "a")
        cfg = parse_config(
            {
                "load_balancers": [
                    {
                        "name": "m",
                        "targets": [{"id": "a", "address": f"127.0.0.1:{port}"}],
                        "rate_limit": {"limit": 2, "interval": "60s"},
                    }
                ]
            }
        )
        node = await nursery.start(Node(cfg, NodeOptions(admin=None, access_log="off")).run)
        statuses = [(await node.route(HttpRequest(path="/"))).status for _ in range(3)]
        assert statuses == [200, 200, 429]
        families = {f.name: f for f in text_string_to_metric_families(render(node).decode())}
        node.stop()
        nursery.cancel_scope.cancel()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    assert samples[("lbnode_requests_total", (("code", "2xx"), ("lb", "m"), ("rule", ""), ("target", "a")))] == 2
    assert samples[("lbnode_refusals_total", (("lb", "m"), ("reason", "rate_limit"), ("rule", "")))] == 1
    assert samples[("lbnode_request_duration_seconds_count", (("lb", "m"), ("rule", ""), ("target", "a")))] == 2
    assert samples[("lbnode_config_version", ())] == 1
    assert samples[("lbnode_target_healthy", (("lb", "m"), ("target", "a")))] == 1
    assert "lbnode_upstream_response_seconds" in families
