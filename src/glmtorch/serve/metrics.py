"""`GET /metrics`: the serving engine's state and request latencies in Prometheus' text format.

Names follow vLLM's (`vllm:num_requests_running`, `vllm:time_to_first_token_seconds`, ...), labelled with
`model_name`, so dashboards built for a vLLM server read a glmtorch one. Each app has its own registry (two
servers in one process, as in the tests, do not share counters). The engine reports to it through three calls
(`first_token`, `token`, `finished`) made from its loop; gauges are read from the engine when scraped.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

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
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens prefilled.", label,
                                     registry=self.registry).labels(model_name)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", label,
                                         registry=self.registry).labels(model_name)
        self.success = Counter("vllm:request_success", "Requests finished, by finish reason.",
                               label + ["finished_reason"], registry=self.registry)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Arrival to first token.", label,
                              buckets=TTFT_BUCKETS, registry=self.registry).labels(model_name)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between a request's tokens.", label,
                             buckets=ITL_BUCKETS, registry=self.registry).labels(model_name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Arrival to the last token.", label,
                             buckets=E2E_BUCKETS, registry=self.registry).labels(model_name)
        self.model_name = model_name

    # -- called from the engine's loop ---------------------------------------------------------------------
    def first_token(self, arrived: float, prompt_tokens: int) -> float:
        now = time.perf_counter()
        self.ttft.observe(now - arrived)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc()
        return now

    def token(self, previous: float) -> float:
        now = time.perf_counter()
        self.itl.observe(now - previous)
        self.generation_tokens.inc()
        return now

    def finished(self, arrived: float, reason: str) -> None:
        self.e2e.observe(time.perf_counter() - arrived)
        self.success.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
