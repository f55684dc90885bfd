"""The serving engine: one worker thread owns the model and runs queued jobs one at a time.

The Generator is synchronous and not thread-safe, so everything that touches the model (loading,
compiling, the warm-up and every request) happens in a single dedicated thread; on CUDA this also
keeps compiled CUDA graphs in the thread that recorded them. Requests wait in a bounded FIFO queue.
The worker hands each job's text to the asyncio side through an ``asyncio.Queue`` fed with
``loop.call_soon_threadsafe``; a consumer that goes away cancels its job, which the worker notices
before it computes the next token (a waiting job is dropped from the queue at once).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

from ..errors import BlitzgenError, InvalidRequestError
from ..sampling import SamplingParams, choice_sampling
from .metrics import Metrics

log = logging.getLogger("blitzgen.server")

DISCONNECT_POLL_SECONDS = 0.5


class Unavailable(Exception):
    """The engine takes no work now: it is loading, draining for shutdown, or failed to load."""

    def __init__(self, state: str):
        super().__init__(state)
        self.state = state


class Overloaded(Exception):
    """The waiting queue is full."""


@dataclass
class Event:
    """What a job's consumer receives, in order: per choice its ``delta`` texts then one ``finish``;
    then one ``done`` (or an ``error`` instead, at any point)."""

    kind: str  # "delta" | "finish" | "done" | "error" ("gone": internal, the client left)
    index: int = 0  # the choice
    text: str = ""  # delta: the new text; error: the message
    finish_reason: str | None = None  # finish: "stop" | "length"
    tokens: int = 0  # finish: tokens generated for this choice; done: for all choices
    cached_tokens: int = 0  # finish: prompt tokens reused from the KV cache; done: the first choice's
    logprobs: list | None = None  # delta: the logprob steps of its tokens (requests that asked for them)


@dataclass(eq=False)
class Job:
    """One request: n completions of one prompt, generated one after another."""

    id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str] = field(default_factory=list)
    n: int = 1
    # a decoder other than Generator.stream (grammar and/or logprobs): decode(gen, prompt_ids, max_tokens,
    # sampling, stop) -> Iterator[Delta], each Delta possibly with a `logprobs` list
    decode: Callable | None = None
    arrival: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: bool = False  # the consumer saw "done" or "error"
    speculate: str | None = None  # a loaded draft source, "off", or None: the server's default
    _loop: asyncio.AbstractEventLoop | None = None
    _events: asyncio.Queue | None = None

    def emit(self, event: Event) -> None:
        """Called by the worker thread: hand an event to the consumer's event loop."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


class Engine:
    """Owns the model (through ``loader``, called in the worker thread) and runs jobs FIFO.

    ``state`` is "loading", then "ready" (or "failed"); ``drain()`` makes it "draining": new jobs
    are refused while accepted ones still run.
    """

    def __init__(self, loader: Callable[[], tuple], *, max_queue: int = 16, metrics: Metrics | None = None,
                 warmup: bool = True, report=None,
                 speculation: Callable[[object, object], tuple[dict, str | None]] | None = None,
                 prompt_cache: tuple[int, int] | None = None):
        self._loader = loader
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        from ..startup import REPORT

        self.report = report or REPORT  # the start-up report, exported as blitzgen_startup_seconds{phase}
        try:
            self.report.register(self.metrics.registry)
        except ValueError:  # this registry has it already
            pass
        self._warmup = warmup
        self.state = "loading"
        self.error: BaseException | None = None
        self.on_failure: Callable[[], None] | None = None  # called (in the worker) when loading fails
        self.lm = self.gen = None
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._main, name="blitzgen-engine", daemon=True)
        # speculation(lm, gen) -> ({source: SpeculativeDecoder}, default source or None), in the worker
        self._speculation = speculation
        self.decoders: dict = {}
        self.default_speculate: str | None = None
        self._prompt_cache = prompt_cache  # (entries, bytes) of saved prefixes; None: the Generator's defaults

    # ---- facts about the loaded model -------------------------------------------------------------
    @property
    def model_name(self) -> str | None:
        return self.lm.name if self.lm is not None else None

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.gen.max_seq_len

    @property
    def vocab_size(self) -> int:
        return self.lm.args.vocab_size

    def default_max_tokens(self, prompt_len: int) -> int:
        """max_tokens for a request that sets none (the Generator's cache policy)."""
        return self.gen.default_max_tokens(prompt_len)

    def check_request(self, prompt_len: int, max_tokens: int) -> None:
        """Raise InvalidRequestError / ContextLengthError when the request cannot run (pure check)."""
        self.gen.check_request(prompt_len, max_tokens)

    # ---- life cycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def drain(self) -> None:
        """Refuse new work from now on; accepted jobs still run."""
        with self._cond:
            if self.state in ("loading", "ready"):
                self.state = "draining"
                log.info("draining: no new requests are accepted")

    def stop(self, timeout: float = 10.0) -> None:
        """Let the worker finish the queue and exit; wait up to `timeout` seconds for it."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return int(self._running is not None)

    @property
    def worker_alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def idle(self) -> bool:
        return self._running is None and not self._waiting

    def abort_all(self, message: str) -> int:
        """Stop every job, waiting or running, telling each consumer `message`; return how many."""
        with self._cond:
            jobs = [*self._waiting, *([self._running] if self._running else [])]
            for job in self._waiting:
                self.metrics.finished.labels("abort").inc()
            self._waiting.clear()
            self.metrics.waiting.set(0)
            for job in jobs:
                job.cancelled.set()
        for job in jobs:
            job.emit(Event("error", text=message))
        return len(jobs)

    # ---- the asyncio side -------------------------------------------------------------------------
    def submit(self, job: Job) -> int:
        """Queue a job (from the event loop); return how many requests are ahead of it.
        Raises Unavailable or Overloaded."""
        with self._cond:
            if self.state != "ready":
                raise Unavailable(self.state)
            self._check_speculate(job)
            ahead = len(self._waiting) + (self._running is not None)
            if ahead > self.max_queue:
                raise Overloaded(f"{len(self._waiting)} requests are waiting")
            job._loop = asyncio.get_running_loop()
            job._events = asyncio.Queue()
            self._waiting.append(job)
            self.metrics.waiting.set(len(self._waiting))
            self._cond.notify()
            return ahead

    async def events(self, job: Job, disconnected: Callable[[], Awaitable[bool]] | None = None
                     ) -> AsyncIterator[Event]:
        """The job's events until "done" or "error". Leaving early (the consumer was cancelled or
        closed it) cancels the job; so does `disconnected()` returning true: it runs in a task of its
        own, whatever the token flow, either waiting for the disconnect or polled every
        DISCONNECT_POLL_SECONDS."""
        watcher = asyncio.create_task(self._watch(job, disconnected)) if disconnected is not None else None
        try:
            while True:
                event = await job._events.get()
                if event.kind == "gone":
                    return
                if event.kind in ("done", "error"):
                    job.finished = True
                    if watcher is not None:  # the response is about to end: that is no disconnect
                        watcher.cancel()
                yield event
                if job.finished:
                    return
        finally:
            if watcher is not None:
                watcher.cancel()
            if not job.finished:
                self.cancel(job)

    async def _watch(self, job: Job, disconnected: Callable[[], Awaitable[bool]]) -> None:
        while not await disconnected():
            await asyncio.sleep(DISCONNECT_POLL_SECONDS)
        if job.finished:
            return
        log.info("%s: the client went away", job.id)
        self.cancel(job)  # the worker stops before its next token, even with events still queued
        job._events.put_nowait(Event("gone"))

    def cancel(self, job: Job) -> None:
        """Stop a job: a waiting one leaves the queue now, a running one before its next token
        (a no-op for a job whose consumer saw it end)."""
        with self._cond:
            if job.cancelled.is_set() or job.finished:
                return
            job.cancelled.set()
            if job in self._waiting:
                self._waiting.remove(job)
                self.metrics.waiting.set(len(self._waiting))
                self.metrics.finished.labels("abort").inc()
                log.info("%s aborted while waiting", job.id)

    # ---- the worker thread ------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self.lm, self.gen = self._loader()
            self.metrics.set_model(self.lm.name)
            if self._prompt_cache is not None and hasattr(self.gen, "configure_prompt_cache"):
                self.gen.configure_prompt_cache(*self._prompt_cache)
            if self._speculation is not None:
                self.decoders, self.default_speculate = self._speculation(self.lm, self.gen)
            if self._warmup:
                self._warm_up()
                self._warm_up_speculation()
        except BaseException as e:  # noqa: BLE001 - reported, then the server exits
            if isinstance(e, BlitzgenError):
                log.error("loading failed: %s", e)
            else:
                log.exception("loading failed")
            with self._cond:
                self.state, self.error = "failed", e
            if self.on_failure:
                self.on_failure()
            return
        with self._cond:
            if self.state == "loading":
                self.state = "ready"
        log.info("ready: serving %s (max model length %d, queue %d)", self.lm.name, self.max_model_len,
                 self.max_queue)
        if self._warmup:  # this engine built the model: it says when the start was done
            self.report.mark("ready")
            log.info("%s", self.report.render())
        while True:
            with self._cond:
                while not self._waiting and not self._stop:
                    self._cond.wait()
                if not self._waiting:
                    return
                job = self._running = self._waiting.popleft()
                self.metrics.waiting.set(len(self._waiting))
                self.metrics.running.set(1)
            try:
                self._run(job)
            finally:
                with self._cond:
                    self._running = None
                    self.metrics.running.set(0)

    def _warm_up(self) -> None:
        """Every sampler mode (and, when prefill compiles, every prefill bucket) in the warm cache, so
        no request pays a compile; compiled, inside the compile-cache entry (loaded, then saved)."""
        gen = self.gen
        if gen.compiled and getattr(gen, "options", None) is not None and self.lm is not None:
            from ..compile_cache import warm_up

            seconds = warm_up(self.lm, gen)
        else:
            seconds = gen.warmup()
        log.info("warm-up done in %.2f seconds%s", seconds, " (compiled)" if gen.compiled else "")

    def _run(self, job: Job) -> None:
        m, gen = self.metrics, self.gen
        start = time.perf_counter()
        m.queue_time.observe(start - job.arrival)
        m.prompt_tokens.inc(len(job.prompt_ids))
        total, finish, first_at, cached = 0, "abort", None, None
        try:
            for index in range(job.n):
                if job.cancelled.is_set():  # gone before this choice began: skip its prefill
                    finish = "abort"
                    break
                sampling = choice_sampling(job.sampling, index)
                finish, last, stats, seen = "abort", time.perf_counter(), None, 0
                stream = self._token_source(job, sampling)
                try:
                    for delta in stream:
                        if job.cancelled.is_set():
                            break
                        now = time.perf_counter()
                        if first_at is None:
                            first_at = now
                            m.ttft.observe(now - job.arrival)
                        elif delta.token_ids:
                            m.observe_gaps(now - last, len(delta.token_ids))
                        last = now
                        lps = getattr(delta, "logprobs", None)
                        if delta.text or lps:
                            job.emit(Event("delta", index, delta.text, logprobs=lps))
                        finish = delta.finish_reason or finish
                        seen += len(delta.token_ids)
                        stats = delta.stats or stats
                finally:
                    stream.close()  # stops generation when we left early
                total += stats.generated_tokens if stats is not None else seen
                if index == 0 and stats is not None:  # the prompt cache's hit rate: first choices only
                    m.observe_prompt_cache(len(job.prompt_ids), stats.cached_tokens)
                if job.cancelled.is_set():
                    finish = "abort"
                    break
                if stats.decode_tokens_per_second > 0:
                    m.decode_tps.set(stats.decode_tokens_per_second)
                cached = stats.cached_tokens if cached is None else cached
                job.emit(Event("finish", index, finish_reason=finish, tokens=stats.generated_tokens,
                               cached_tokens=stats.cached_tokens))
            else:
                job.emit(Event("done", tokens=total, cached_tokens=cached or 0))
        except Exception as e:  # noqa: BLE001 - a failed request must not take the engine down
            log.exception("%s failed", job.id)
            finish = "error"
            job.emit(Event("error", text=f"generation failed: {type(e).__name__}: {e}"))
        store = getattr(gen, "prefixes", None)
        if store is not None:
            m.observe_prefix_store(store.snapshot())
        end = time.perf_counter()
        m.generation_tokens.inc(total)
        m.finished.labels(finish).inc()
        if finish != "abort":
            m.e2e.observe(end - job.arrival)
        ttft = f"{first_at - job.arrival:.2f} s" if first_at else "-"
        log.info("%s %s: %d prompt + %d generated tokens, queued %.2f s, first token %s, %.1f tokens/s, "
                 "total %.2f s", job.id, "aborted" if finish == "abort" else f"finished ({finish})",
                 len(job.prompt_ids), total, start - job.arrival, ttft,
                 total / (end - start) if end > start else 0.0, end - job.arrival)

    # ---- speculative decoding ---------------------------------------------------------------------
    def _check_speculate(self, job: Job) -> None:
        """A request may ask only for a source this server loaded (else a 400 naming "speculate")."""
        if job.speculate not in (None, "off") and job.speculate not in self.decoders:
            loaded = ", ".join(self.decoders) or "none"
            raise InvalidRequestError(f"speculate={job.speculate!r}: this server did not load that draft source "
                                      f"(loaded: {loaded}; start it with --speculate)", param="speculate")

    def _token_source(self, job: Job, sampling: SamplingParams):
        """The job's text deltas: from the speculative decoder it asks for (or the server's default
        one), else from plain decoding. A job with its own decoder (grammar, logprobs) uses that."""
        if job.decode is not None:
            return job.decode(self.gen, job.prompt_ids, job.max_tokens, sampling, job.stop)
        name = self.default_speculate if job.speculate is None else job.speculate
        dec = self.decoders.get(name) if name not in (None, "off") else None
        if dec is None:
            return self.gen.stream(job.prompt_ids, job.max_tokens, sampling, job.stop)
        return self._speculative_stream(dec, job, sampling)

    def _speculative_stream(self, dec, job: Job, sampling: SamplingParams):
        from ..speculative import stream_speculative
        from ..speculative import SpeculationStats

        stats = SpeculationStats()
        stash = getattr(self.gen, "stash_prefix", None)  # the decoder rewrites the KV cache: save its prefix first
        if stash is not None:
            stash()
        try:
            yield from stream_speculative(dec, self.gen, job.prompt_ids, job.max_tokens, sampling, job.stop,
                                          spec_stats=stats)
        finally:
            if stats.generated_tokens:
                self.metrics.observe_speculation(stats)

    def _warm_up_speculation(self) -> float:
        """Compile each loaded decoder's steps for every sampler mode (compiled only)."""
        if not self.decoders or not self.gen.compiled:
            return 0.0
        from ..sampling import sampler_modes

        seconds = 0.0
        for name, dec in self.decoders.items():
            t = dec.warmup(sampler_modes(), prompt_lens=dec.prefill_lengths(self.gen.warm_cache_len))
            log.info("speculation %s warmed up in %.2f seconds", name, t)
            seconds += t
        forget = getattr(self.gen, "forget_prefix", None)  # the warm-up rewrote the shared KV cache
        if forget is not None:
            forget()
        return seconds
