"""Prometheus metrics through Ray's metrics API (exported by every Ray node's metrics agent).

Request-level figures (TTFT, time per output token, tokens in and out) are measured at the Ingress, as
a client sees them; pool-level figures (queue depth, running sequences, KV-cache use, prefix-cache hit
rate) are sampled from each replica's engine.
"""

from __future__ import annotations

import time

from ray.util import metrics

from r1serve.runtime.engine.outputs import EngineStats

# Seconds; from a few ms (tiny models, short prompts) to minutes (long R1 prompts under load).
TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
TPOT_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5]
HANDOFF_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]


class IngressMetrics:
    def __init__(self, model: str):
        tags = {"model": model}
        self.ttft = metrics.Histogram("r1serve_time_to_first_token_seconds", "Time from request to first token.",
                                      boundaries=TTFT_BUCKETS, tag_keys=("model",)).set_default_tags(tags)
        self.tpot = metrics.Histogram("r1serve_time_per_output_token_seconds",
                                      "Mean time between output tokens after the first, per request.",
                                      boundaries=TPOT_BUCKETS, tag_keys=("model",)).set_default_tags(tags)
        self.prompt_tokens = metrics.Counter("r1serve_prompt_tokens_total", "Prompt tokens of finished requests.",
                                             tag_keys=("model",)).set_default_tags(tags)
        self.generation_tokens = metrics.Counter("r1serve_generation_tokens_total", "Tokens generated.",
                                                 tag_keys=("model",)).set_default_tags(tags)
        self.requests = metrics.Counter("r1serve_requests_total", "Requests by outcome (a gRPC status code name).",
                                        tag_keys=("model", "status")).set_default_tags(tags)

    def request(self) -> RequestTimer:
        return RequestTimer(self)


class RequestTimer:
    """Times one request's stream: call `tokens(n)` per output, `finish(status)` once."""

    def __init__(self, sink: IngressMetrics):
        self._sink = sink
        self._start = time.perf_counter()
        self._first: float | None = None
        self._last: float | None = None
        self._generated = 0
        self._prompt = 0

    def tokens(self, count: int, prompt_tokens: int) -> None:
        if count <= 0:
            return
        now = time.perf_counter()
        if self._first is None:
            self._first = now
            self._sink.ttft.observe(now - self._start)
        self._last = now
        self._generated += count
        self._prompt = prompt_tokens

    def finish(self, status: str) -> None:
        # Counted once per request: a metrics call per streamed message is a measurable share of its cost.
        self._sink.requests.inc(tags={"status": status})
        if self._prompt:
            self._sink.prompt_tokens.inc(self._prompt)
        if self._generated:
            self._sink.generation_tokens.inc(self._generated)
        if self._first is not None and self._generated > 1:
            self._sink.tpot.observe((self._last - self._first) / (self._generated - 1))


class PoolMetrics:
    """Gauges of one pool replica's engine, refreshed by `update` (the replica calls it periodically)."""

    def __init__(self, pool: str):
        keys = ("pool",)
        tags = {"pool": pool}

        def gauge(name: str, doc: str) -> metrics.Gauge:
            return metrics.Gauge(name, doc, tag_keys=keys).set_default_tags(tags)

        self.waiting = gauge("r1serve_pool_waiting_requests", "Requests queued in the engine, not yet running.")
        self.queued_tokens = gauge("r1serve_pool_queued_prompt_tokens", "Prompt tokens not yet prefilled.")
        self.running = gauge("r1serve_pool_running_sequences", "Sequences being batched.")
        self.kv_usage = gauge("r1serve_pool_kv_cache_usage", "Fraction of KV-cache blocks in use (0-1).")
        self.prefix_hit_rate = gauge("r1serve_pool_prefix_cache_hit_rate",
                                     "Prompt tokens served from the prefix cache / prompt tokens looked up.")
        self.handoff_waiting = gauge("r1serve_pool_kv_handoff_waiting_bytes",
                                     "Hand-off latents held on prefill ranks that no decode rank has read yet.")
        self.admission_held = gauge("r1serve_pool_admission_held",
                                    "1 while a prefill rank's unread hand-off latents are at their bound and new "
                                    "prompts wait for decode ranks to read them.")
        self.ranks_alive = gauge("r1serve_pool_ranks_alive",
                                 "Ranks serving in the replica's expert-parallel group (fewer than "
                                 "r1serve_pool_ranks after it lost one and went on without it).")
        self.ranks = gauge("r1serve_pool_ranks", "Ranks the replica's expert-parallel group started with.")
        self.draft_acceptance = metrics.Gauge(
            "r1serve_pool_draft_acceptance_rate", "Speculative decoding: draft tokens the model kept / draft tokens "
            "it verified, since the replica started, by draft position (1: the token after the last known).",
            tag_keys=("pool", "position")).set_default_tags(tags)
        self.handoff_bytes = metrics.Counter(
            "r1serve_kv_handoff_bytes_total", "Bytes of prompt latents handed from prefill to decode, by connector.",
            tag_keys=("pool", "connector")).set_default_tags(tags)
        self.handoff_seconds = metrics.Histogram(
            "r1serve_kv_handoff_seconds", "From a decode replica taking a hand-off to its first output (the "
            "latents received and written to the cache), by connector.", boundaries=HANDOFF_BUCKETS,
            tag_keys=("pool", "connector")).set_default_tags(tags)

    def handoff(self, connector: str, nbytes: int, seconds: float) -> None:
        self.handoff_bytes.inc(nbytes, tags={"connector": connector})
        self.handoff_seconds.observe(seconds, tags={"connector": connector})

    def update(self, stats: EngineStats) -> None:
        self.waiting.set(stats.waiting)
        self.queued_tokens.set(stats.queued_prompt_tokens)
        self.running.set(stats.running)
        self.kv_usage.set(stats.kv_usage)
        self.prefix_hit_rate.set(stats.prefix_hit_rate)
        self.handoff_waiting.set(stats.handoff_bytes_waiting)
        self.admission_held.set(int(stats.admission_held))
        self.ranks_alive.set(stats.ranks_alive)
        self.ranks.set(stats.ranks)
        if stats.draft_tokens:
            self.draft_acceptance.set(stats.draft_acceptance, tags={"position": "1"})
