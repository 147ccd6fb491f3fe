"""`GET /metrics`: the serving engine's state and request latencies in Prometheus' text format.

Names follow vLLM's (`vllm:num_requests_running`, `vllm:time_to_first_token_seconds`, ...), labelled with
`model_name`, so dashboards built for a vLLM server read a glmtorch one. Each app has its own registry (two
servers in one process, as in the tests, do not share counters). The engine reports to it through three calls
(`first_token`, `token`, `finished`) made from its loop; gauges are read from the engine when scraped.

What the loop feeds once per token (the token counters, the inter-token and first-token latencies) is kept in
plain numbers here and turned into metric families when scraped: prometheus_client's Histogram.observe and
Counter.inc take a lock and walk the buckets in Python, ~11 us a token together, a quarter of the served
engine's Python per token on the demo model (64 streams, two cores).
"""

from __future__ import annotations

import bisect
import math
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

# Buckets in seconds (vLLM's, shortened): a 2-core CPU serves in tens of milliseconds to tens of seconds.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class EngineCounters:
    """Counters the engine keeps itself, read when scraped: vLLM's prefix-cache counters (prompt tokens looked up,
    and found) and preemptions."""

    def __init__(self, engine, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name

    def collect(self):
        stats = getattr(self.engine, "prefix_cache_stats", lambda: {"queries": 0, "hits": 0})()
        for name, doc, value in (
                ("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", stats["queries"]),
                ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache (not prefilled).", stats["hits"]),
                ("vllm:num_preemptions", "Requests that gave their KV blocks up to older ones (recomputed later).",
                 getattr(self.engine, "preemptions", 0))):
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family


class LatencyHistogram:
    """A histogram fed from one thread (the engine's loop): a bisect and two additions per value. Read as a
    metric family when scraped, from a copy of its counts, so the buckets always add up to its count."""

    def __init__(self, name: str, doc: str, buckets: tuple[float, ...]) -> None:
        self.name, self.doc, self.bounds = name, doc, list(buckets)
        self.counts = [0] * (len(buckets) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # bucket "le": the first bound >= value
        self.sum += value

    def family(self, model_name: str) -> HistogramMetricFamily:
        counts, total = list(self.counts), self.sum
        cumulative, running = [], 0
        for bound, count in zip(self.bounds + [math.inf], counts):
            running += count
            cumulative.append((floatToGoString(bound), running))
        family = HistogramMetricFamily(self.name, self.doc, labels=["model_name"])
        family.add_metric([model_name], cumulative, total)
        return family


class ServingMetrics:
    def __init__(self, engine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        label = ["model_name"]

        def gauge(name, doc, read):
            g = Gauge(name, doc, label, registry=self.registry)
            g.labels(model_name).set_function(read)

        gauge("vllm:num_requests_running", "Requests decoding now.", lambda: engine.active)
        gauge("vllm:num_requests_waiting", "Requests waiting for KV blocks or a place among the running.",
              lambda: len(engine.waiting))
        gauge("vllm:kv_cache_usage_perc", "Fraction of the KV cache's blocks held by running requests (1 = full).",
              lambda: getattr(engine, "cache_usage", lambda: 0.0)())
        self.registry.register(EngineCounters(engine, model_name))
        self.model_name = model_name
        self.prompt_tokens = self.generation_tokens = 0
        self.ttft = LatencyHistogram("vllm:time_to_first_token_seconds", "Arrival to first token.", TTFT_BUCKETS)
        self.itl = LatencyHistogram("vllm:inter_token_latency_seconds", "Time between a request's tokens.",
                                    ITL_BUCKETS)
        self.e2e = LatencyHistogram("vllm:e2e_request_latency_seconds", "Arrival to the last token.", E2E_BUCKETS)
        self.registry.register(self)  # collect(): what the loop counts per token
        self.success = Counter("vllm:request_success", "Requests finished, by finish reason.",
                               label + ["finished_reason"], registry=self.registry)

    def collect(self):
        """The per-token counters and the latency histograms, as metric families (the registry's collector)."""
        for name, doc, value in (("vllm:prompt_tokens", "Prompt tokens prefilled.", self.prompt_tokens),
                                 ("vllm:generation_tokens", "Tokens generated.", self.generation_tokens)):
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family
        for histogram in (self.ttft, self.itl, self.e2e):
            yield histogram.family(self.model_name)

    # -- called from the engine's loop ---------------------------------------------------------------------
    def first_token(self, arrived: float, prompt_tokens: int) -> float:
        now = time.perf_counter()
        self.ttft.observe(now - arrived)
        self.prompt_tokens += prompt_tokens
        self.generation_tokens += 1
        return now

    def token(self, previous: float) -> float:
        now = time.perf_counter()
        self.itl.observe(now - previous)
        self.generation_tokens += 1
        return now

    def finished(self, arrived: float, reason: str) -> None:
        self.e2e.observe(time.perf_counter() - arrived)
        self.success.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
