"""Prometheus metrics for /metrics, in the server's own registry.

Two sources: the engine's counters and gauges are read from ``AsyncEngine.stats()`` when Prometheus
scrapes (``_EngineCollector``; nothing is copied between scrapes), and the latency histograms are
observed by the server as outputs reach it (``RequestTimer``).

KV pages: ``kiln_kv_pages_used`` = total - free, which includes ``kiln_kv_pages_cached`` (pages kept
only by the prefix cache, counted from its entries' own pages rather than from the free count). With no
request in flight, used == cached unless pages leaked.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..runtime.outputs import EngineStats, RequestOutput

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 30.0, 60.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats]):
        self.stats = stats

    def collect(self):
        s = self.stats()
        gauges = [
            ("kiln_num_requests_running", "Requests in the running batch", s.running),
            ("kiln_num_requests_waiting", "Requests waiting to be admitted", s.waiting),
            ("kiln_kv_pages_total", "KV cache pages", s.kv_pages_total),
            ("kiln_kv_pages_free", "KV cache pages free", s.kv_pages_free),
            ("kiln_kv_pages_used", "KV cache pages in use (running requests and the prefix cache)",
             s.kv_pages_total - s.kv_pages_free),
            ("kiln_kv_pages_cached", "KV cache pages held only by the prefix cache", s.kv_pages_cached),
            ("kiln_kv_sequences", "Sequences in the KV cache (running requests and prefix-cache entries)",
             s.kv_sequences),
            ("kiln_prefix_cache_sequences", "Finished sequences the prefix cache keeps in the KV cache",
             s.cached_sequences),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        counters = [
            ("kiln_prefix_cache_hits", "Requests that reused a cached prefix", s.prefix_cache_hits),
            ("kiln_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache", s.prefix_cache_hit_tokens),
            ("kiln_prompt_tokens", "Prompt tokens of admitted requests", s.prompt_tokens),
            ("kiln_prefill_tokens_computed", "Prompt tokens run through the model (incl. recompute)",
             s.prefill_tokens_computed),
            ("kiln_generation_tokens", "Tokens sampled", s.generation_tokens),
            ("kiln_preemptions", "Requests preempted for lack of KV pages", s.preemptions),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)  # exposed as <name>_total
        finished = CounterMetricFamily("kiln_requests_finished", "Finished choices by finish reason (an n=2 request counts twice)",
                                       labels=["reason"])
        for reason in sorted(set(s.requests_finished) | {"stop", "length", "abort"}):
            finished.add_metric([reason], s.requests_finished.get(reason, 0))
        yield finished


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats]):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats))
        self.time_to_first_token = Histogram(
            "kiln_time_to_first_token_seconds", "From the request's arrival to its first generated token",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram(
            "kiln_inter_token_latency_seconds", "Between successive outputs of a request",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.e2e_request_latency = Histogram(
            "kiln_e2e_request_latency_seconds", "From a request's arrival to its last output (finished requests)",
            buckets=_E2E_BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self) -> RequestTimer:
        return RequestTimer(self)


class RequestTimer:
    """One request's latencies: ``output()`` for each output as it reaches the server, ``finish()`` once
    the request ends normally (a request aborted by its client leaves no end-to-end sample)."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.arrival = time.monotonic()
        self.last: float | None = None

    def output(self, out: RequestOutput) -> None:
        if not any(o.token_ids for o in out.outputs):
            return
        now = time.monotonic()
        if self.last is None:
            self.metrics.time_to_first_token.observe(now - self.arrival)
        else:
            self.metrics.inter_token_latency.observe(now - self.last)
        self.last = now

    def finish(self) -> None:
        self.metrics.e2e_request_latency.observe(time.monotonic() - self.arrival)
