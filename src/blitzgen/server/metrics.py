"""Prometheus metrics of one server, in a registry of its own (so several apps can live in one process).

Names follow vLLM's (with a ``blitzgen_`` prefix): latency histograms for time to first token,
inter-token latency, end-to-end latency and queue time; token counters; finished requests by
finish reason (``stop``, ``length``, ``abort`` for a client that went away, ``error``); gauges for
requests running and waiting and for the decode speed of the last request. Prompt cache: lookups,
hits and hit tokens (counters), the hit rate (a gauge: hits over lookups), restores from saved
prefixes, saves and evictions (counters), entries and bytes held (gauges). Speculative decoding,
per draft source (label ``source``): drafted, accepted and verify-step counters, the acceptance
rate and mean tokens per verify step over the server's life, and a histogram of accepted lengths
(drafts accepted per verify step).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

FINISH_REASONS = ("stop", "length", "abort", "error")
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
_ACCEPTED_BUCKETS = tuple(range(33))  # accepted drafts per verify step, 0..32 (the largest --speculate-k)
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
        self.cache_hit_rate = Gauge("blitzgen_prompt_cache_hit_rate", "Prompt cache hits over lookups, over the "
                                    "server's life", registry=r)
        self.cache_restores = Counter("blitzgen_prompt_cache_restores", "Hits served from a saved prefix (copied "
                                      "into the live KV cache)", registry=r)
        self.cache_saves = Counter("blitzgen_prompt_cache_saves", "Prefixes saved from the live KV cache", registry=r)
        self.cache_evictions = Counter("blitzgen_prompt_cache_evictions", "Saved prefixes evicted (least recently "
                                       "used first)", registry=r)
        self.cache_entries = Gauge("blitzgen_prompt_cache_entries", "Saved prefixes held now", registry=r)
        self.cache_bytes = Gauge("blitzgen_prompt_cache_bytes", "Bytes of KV held by saved prefixes now", registry=r)
        self._store_seen = {"saves": 0, "restores": 0, "evictions": 0}
        self._lookups = [0, 0]  # lookups, hits (for the hit-rate gauge)
        self.info = Gauge("blitzgen_model_info", "The served model (value 1)", ["model"], registry=r)
        self._init_speculation(r)
        if model_name:
            self.set_model(model_name)

    def set_model(self, name: str) -> None:
        self.info.labels(name).set(1)

    def observe_prompt_cache(self, prompt_tokens: int, cached_tokens: int) -> None:
        """One lookup of the prompt cache (hit rate: hits_total / queries_total, also the hit-rate
        gauge; the token hit rate: hit_tokens_total / prompt_tokens_total)."""
        self.cache_queries.inc()
        if cached_tokens > 0:
            self.cache_hits.inc()
            self.cached_tokens.inc(cached_tokens)
        self._lookups[0] += 1
        self._lookups[1] += cached_tokens > 0
        self.cache_hit_rate.set(self._lookups[1] / self._lookups[0])

    def observe_prefix_store(self, snapshot: dict) -> None:
        """The saved-prefix store's state (PrefixStore.snapshot()): its life counters become ours."""
        for key, counter in (("saves", self.cache_saves), ("restores", self.cache_restores),
                             ("evictions", self.cache_evictions)):
            new = snapshot.get(key, 0) - self._store_seen[key]
            if new > 0:
                counter.inc(new)
            self._store_seen[key] = snapshot.get(key, 0)
        self.cache_entries.set(snapshot.get("entries", 0))
        self.cache_bytes.set(snapshot.get("bytes", 0))

    def observe_gaps(self, gap: float, tokens: int) -> None:
        """Record `tokens` inter-token latencies that together took `gap` seconds."""
        for _ in range(tokens):
            self.itl.observe(gap / tokens)

    # ---- speculative decoding ---------------------------------------------------------------------
    def _init_speculation(self, r: CollectorRegistry) -> None:
        src = ["source"]
        self.spec_requests = Counter("blitzgen_spec_decode_requests", "Generations decoded speculatively", src,
                                     registry=r)
        self.spec_drafted = Counter("blitzgen_spec_decode_draft_tokens", "Draft tokens proposed for verification",
                                    src, registry=r)
        self.spec_accepted = Counter("blitzgen_spec_decode_accepted_tokens", "Draft tokens accepted", src,
                                     registry=r)
        self.spec_verify = Counter("blitzgen_spec_decode_verify_steps", "Target verify steps (K+1 tokens each)",
                                   src, registry=r)
        self.spec_plain = Counter("blitzgen_spec_decode_plain_steps",
                                  "One-token steps taken while speculating did not pay", src, registry=r)
        self.spec_acceptance = Gauge("blitzgen_spec_decode_acceptance_rate",
                                     "Accepted over drafted tokens, over the server's life", src, registry=r)
        self.spec_tokens_per_verify = Gauge("blitzgen_spec_decode_mean_tokens_per_verify",
                                            "Tokens emitted per verify step, over the server's life", src, registry=r)
        self.spec_verify_cost = Gauge("blitzgen_spec_decode_verify_cost",
                                      "A verify round's cost in plain tokens, as the last speculative generation "
                                      "saw it: measured, or the fixed cost of a seeded request (speculation pays "
                                      "when tokens per verify exceed it)", src,
                                      registry=r)
        self.spec_accepted_len = Histogram("blitzgen_spec_decode_accepted_length",
                                           "Draft tokens accepted per verify step", src, buckets=_ACCEPTED_BUCKETS,
                                           registry=r)
        self._spec_totals: dict = {}

    def observe_speculation(self, stats) -> None:
        """Add one generation's SpeculationStats."""
        source = stats.source or "unknown"
        self.spec_requests.labels(source).inc()
        self.spec_drafted.labels(source).inc(stats.drafted)
        self.spec_accepted.labels(source).inc(stats.accepted)
        self.spec_verify.labels(source).inc(stats.verify_steps)
        self.spec_plain.labels(source).inc(stats.plain_steps)
        hist = self.spec_accepted_len.labels(source)
        for n, count in enumerate(stats.accepted_hist):
            for _ in range(count):
                hist.observe(n)
        total = self._spec_totals.get(source)
        if total is None:
            total = self._spec_totals[source] = type(stats)()
        total.merge(stats)
        if stats.verify_cost:
            self.spec_verify_cost.labels(source).set(stats.verify_cost)
        self.spec_acceptance.labels(source).set(total.acceptance_rate)
        self.spec_tokens_per_verify.labels(source).set(total.mean_tokens_per_verify)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
