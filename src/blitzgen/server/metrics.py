"""Prometheus metrics of one server, in a registry of its own (so several apps can live in one process).

Names follow vLLM's (with a ``blitzgen_`` prefix): latency histograms for time to first token,
inter-token latency, end-to-end latency and queue time; token counters; finished requests by
finish reason (``stop``, ``length``, ``abort`` for a client that went away, ``error``); gauges for
requests running and waiting and for the decode speed of the last request.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

FINISH_REASONS = ("stop", "length", "abort", "error")
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """The server's metrics; every method is safe to call from the engine's worker thread."""

    def __init__(self, model_name: str = ""):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft = Histogram("blitzgen_time_to_first_token_seconds",
                              "Time from a request's arrival to its first generated text", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("blitzgen_inter_token_latency_seconds", "Time between two generated tokens",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("blitzgen_e2e_request_latency_seconds",
                             "Time from a request's arrival to its last token", buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("blitzgen_request_queue_time_seconds",
                                    "Time a request waited in the queue before generation began",
                                    buckets=(0.0, *_LATENCY_BUCKETS), registry=r)
        self.prompt_tokens = Counter("blitzgen_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("blitzgen_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter("blitzgen_request_finished", "Finished requests by finish reason",
                                ["finish_reason"], registry=r)
        for reason in FINISH_REASONS:
            self.finished.labels(reason)
        self.running = Gauge("blitzgen_num_requests_running", "Requests being generated (0 or 1)", registry=r)
        self.waiting = Gauge("blitzgen_num_requests_waiting", "Requests waiting in the queue", registry=r)
        self.decode_tps = Gauge("blitzgen_last_decode_tokens_per_second",
                                "Decode speed of the last finished generation", registry=r)
        self.cache_queries = Counter("blitzgen_prompt_cache_queries", "Generations that looked up the prompt "
                                     "cache", registry=r)
        self.cache_hits = Counter("blitzgen_prompt_cache_hits", "Generations that reused a cached prompt prefix",
                                  registry=r)
        self.cached_tokens = Counter("blitzgen_prompt_cache_hit_tokens", "Prompt tokens read from the KV cache "
                                     "instead of prefilled", registry=r)
        self.info = Gauge("blitzgen_model_info", "The served model (value 1)", ["model"], registry=r)
        if model_name:
            self.set_model(model_name)

    def set_model(self, name: str) -> None:
        self.info.labels(name).set(1)

    def observe_prompt_cache(self, prompt_tokens: int, cached_tokens: int) -> None:
        """One lookup of the prompt cache (hit rate: hits_total / queries_total)."""
        self.cache_queries.inc()
        if cached_tokens > 0:
            self.cache_hits.inc()
            self.cached_tokens.inc(cached_tokens)

    def observe_gaps(self, gap: float, tokens: int) -> None:
        """Record `tokens` inter-token latencies that together took `gap` seconds."""
        for _ in range(tokens):
            self.itl.observe(gap / tokens)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
