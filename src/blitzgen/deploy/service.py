"""A deployed model's life cycle as plain Python (no Modal here, so it runs and is tested locally).

One ``Service`` owns one model. Everything that touches the model runs in the server engine's single
worker thread (compiled CUDA graphs belong to the thread that recorded them): loading the compile
cache, compiling, the warm-up, and every request, whether it comes from ``generate`` (the Modal
method) or from the OpenAI-compatible web app (which shares the same engine).

    svc = Service(ServiceConfig(model=None, device="cpu"))
    svc.load()       # weights (on the CPU first when a memory snapshot is taken in between)
    svc.start()      # compile cache -> compile -> warm-up -> save the cache; blocks until ready
    for ev in svc.generate("Hello", max_tokens=20): ...
    app = svc.web_app()
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator, Sequence

from ..errors import BlitzgenError
from ..startup import StartupReport

log = logging.getLogger("blitzgen.deploy")

WARM_CACHE_TOKENS = 8192


@dataclass
class ServiceConfig:
    model: str | None = None  # HF repo id or directory, GGUF file, quantized checkpoint; None: SmolLM2
    device: str | None = None  # default: cuda when present
    dtype: str = "bfloat16"
    compile: bool | None = None  # default: on for CUDA
    quantize: str | None = None
    group_size: int | None = None
    max_model_len: int | None = None
    max_queue: int = 16
    api_key: str | None = None
    served_model_name: str | None = None
    compile_cache: bool = True
    warmup: tuple[str, ...] = ("greedy", "sampled", "top_k", "top_p", "top_k+top_p")  # see WARMUP_MODES


def _engine_class():
    from ..server.engine import Engine

    class SharedEngine(Engine):
        """The server's engine, started once by the service: the web app's lifespan neither starts
        it a second time nor stops it (the service does, at container exit)."""

        _started = False

        def start(self) -> None:
            if not self._started:
                self._started = True
                super().start()

        def stop(self, timeout: float = 10.0) -> None:  # the app's shutdown: keep serving `generate`
            pass

        def shutdown(self, timeout: float = 10.0) -> None:
            super().stop(timeout)

    return SharedEngine


class Service:
    def __init__(self, config: ServiceConfig | None = None, *, report: StartupReport | None = None,
                 on_cache_saved: Callable[[], None] | None = None, load_fn: Callable | None = None):
        self.config = config or ServiceConfig()
        self.report = report or StartupReport()
        self.on_cache_saved = on_cache_saved  # e.g. commit the Modal volume the cache lives in
        self.load_fn = load_fn  # (device, options) -> LoadedModel; default: loading.load(config.model)
        self.lm = None
        self.gen = None
        self.engine = None
        self.cache_status = "off"
        self._app = None

    # ---- life cycle ---------------------------------------------------------------------------------
    def options(self):
        from ..runtime import RuntimeOptions

        c = self.config
        return RuntimeOptions.from_env(device=c.device, dtype=c.dtype, compile=c.compile, quantize=c.quantize,
                                       group_size=c.group_size, max_model_len=c.max_model_len).resolved()

    def load(self, device: str | None = None) -> None:
        """Load weights and tokenizer on ``device`` (default: the target device; ``start`` moves
        them there when they were loaded elsewhere, e.g. on the CPU before a memory snapshot)."""
        import torch

        from ..loading import load

        opts = self.options()
        self.report.mark("imports")
        quant = opts.quant_config()
        if self.load_fn is not None:
            self.lm = self.load_fn(device or opts.device, opts)
        else:
            self.lm = load(self.config.model, device=device or opts.device, dtype=opts.torch_dtype,
                           quantize=quant, progress=False)
        torch.manual_seed(0)
        self.report.mark("load")

    def to_device(self, device: str) -> None:
        """Move loaded weights (e.g. restored from a CPU memory snapshot) to the target device."""
        if self.lm is not None and str(self.lm.model.device) != device:
            self.lm.model.to(device)

    def _build(self):
        """Runs in the engine's thread: compile cache, Generator, warm-up, cache save."""
        from ..generate import Generator

        opts = self.options()
        self.to_device(opts.device)
        entry = None
        if opts.compile and self.config.compile_cache:
            from ..compile_cache import CompileCache, key_for, use_inductor_dir

            use_inductor_dir()
            entry = CompileCache(key_for(self.lm.args, opts, {"warmup": list(self.config.warmup)})).open()
            self.cache_status = entry.status
            self.report.mark("cache load")
        gen = Generator(self.lm.model, self.lm.tokenizer, options=opts, compile=bool(opts.compile),
                        max_seq_len=self.config.max_model_len)
        seconds = warm_up(gen, self.config.warmup)
        self.report.mark("compile + warm-up" if opts.compile else "warm-up")
        if opts.compile:
            self.report.add_compile_breakdown()
        log.info("warm-up done in %.2f seconds%s", seconds, " (compiled)" if gen.compiled else "")
        if entry is not None and entry.save() and self.on_cache_saved:
            self.on_cache_saved()
        self.gen = gen
        return self.lm, gen

    def start(self, timeout: float | None = None) -> StartupReport:
        """Compile (or load the compile cache) and warm up in the engine's thread; block until ready."""
        if self.lm is None:
            self.load()
        if self.engine is None:
            self.engine = _engine_class()(self._build, max_queue=self.config.max_queue, warmup=False,
                                          report=self.report)
            self.engine.start()
        t0 = time.monotonic()
        while self.engine.state == "loading":
            if timeout is not None and time.monotonic() - t0 > timeout:
                raise BlitzgenError(f"the model was not ready after {timeout:.0f} seconds")
            time.sleep(0.02)
        if self.engine.state == "failed":
            err = self.engine.error
            raise err if isinstance(err, BlitzgenError) else BlitzgenError(f"loading failed: {err!r}")
        self.report.mark("ready")
        log.info("%s", self.report.render())
        return self.report

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.drain()
            self.engine.shutdown()

    # ---- requests -----------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str, *, raw: bool = False, system: str | None = None) -> list[int]:
        tok = self.lm.tokenizer
        if raw or not getattr(tok, "chat_template", None):
            return tok.encode(prompt)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return tok.encode_chat(messages)

    async def agenerate(self, prompt: str, *, max_tokens: int = 200, temperature: float = 0.8, top_k: int = 200,
                        top_p: float = 1.0, min_p: float = 0.0, seed: int | None = None,
                        stop: Sequence[str] = (), raw: bool = False, system: str | None = None,
                        num_samples: int = 1) -> AsyncIterator[dict]:
        """Events of one request, as plain dicts: ``{"index", "text"}`` per delta, then per sample
        ``{"index", "finish_reason", "tokens"}``."""
        from ..errors import InvalidRequestError
        from ..sampling import SamplingParams
        from ..server.engine import Job

        if self.engine is None or self.engine.state != "ready":
            raise BlitzgenError("the model is not ready (call start() first)")
        if num_samples < 1:
            raise InvalidRequestError(f"num_samples must be >= 1, got {num_samples}", param="n")
        if not prompt.strip():
            raise InvalidRequestError("the prompt is empty", param="prompt")
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                  seed=seed).validate()
        ids = self.prompt_ids(prompt, raw=raw, system=system)
        self.engine.check_request(len(ids), max_tokens)
        job = Job(id=f"gen-{uuid.uuid4().hex[:12]}", prompt_ids=ids, max_tokens=max_tokens, sampling=sampling,
                  stop=list(stop), n=num_samples)
        self.engine.submit(job)
        async for ev in self.engine.events(job):
            if ev.kind == "delta":
                yield {"index": ev.index, "text": ev.text}
            elif ev.kind == "finish":
                yield {"index": ev.index, "finish_reason": ev.finish_reason, "tokens": ev.tokens}
            elif ev.kind == "error":
                raise BlitzgenError(ev.text)

    def generate(self, prompt: str, **kwargs) -> Iterator[dict]:
        """``agenerate`` for synchronous callers (a Modal method; a private event loop per call)."""
        loop = asyncio.new_event_loop()
        agen = self.agenerate(prompt, **kwargs)
        try:
            while True:
                try:
                    item = loop.run_until_complete(agen.__anext__())
                except StopAsyncIteration:
                    return
                yield item
        finally:
            loop.run_until_complete(agen.aclose())
            loop.close()

    def web_app(self):
        """The OpenAI-compatible FastAPI app with the chat page, on this service's engine, plus the
        start-up report's gauges on /metrics."""
        if self._app is None:
            from ..server.app import create_app

            if self.engine is None:
                raise BlitzgenError("start() the service before building its web app")
            self._app = create_app(self.engine, api_key=self.config.api_key,
                                   served_model_name=self.config.served_model_name)
            try:
                self.report.register(self.engine.metrics.registry)
            except ValueError:  # already registered on this registry
                pass
        return self._app


# ---- snapshots ---------------------------------------------------------------------------------------
SNAPSHOT_MODES = ("off", "memory", "gpu")


def before_snapshot(svc: Service, mode: str) -> None:
    """Work done once, before a snapshot is taken (each start when snapshots are off: then nothing).
    memory: imports and weights in host memory (int4 is loaded after the restore: its packed layout
    is device-specific). gpu: everything, compiled CUDA graphs and warm-up included."""
    if mode == "memory":
        import torch  # noqa: F401 - the import itself is much of what a snapshot saves

        from .. import generate, loading  # noqa: F401
        if svc.config.quantize != "int4":
            svc.load(device="cpu")
    elif mode == "gpu":
        svc.load()
        svc.start()


def after_snapshot(svc: Service, mode: str) -> None:
    """Work done on every container start, after a restore (or on a plain start)."""
    if svc.lm is None:
        svc.load()
    if svc.engine is None:
        svc.start()


# ---- warm-up policy ---------------------------------------------------------------------------------
WARMUP_MODES = {  # name -> sampler settings; compiled graphs are per sampler mode
    "greedy": dict(temperature=0.0),
    "sampled": dict(temperature=1.0),  # the OpenAI API's default
    "top_k": dict(temperature=0.8, top_k=200),  # `blitzgen generate`'s default
    "top_p": dict(temperature=0.8, top_p=0.9),
    "top_k+top_p": dict(temperature=0.8, top_k=50, top_p=0.9),
}


def warm_up(gen, modes: Sequence[str] = tuple(WARMUP_MODES)) -> float:
    """Compile what requests hit, at the serving cache size: the named sampler modes (eager: one
    greedy run). Returns seconds."""
    from ..sampling import SamplingParams

    if not gen.compiled:
        return gen.warmup([SamplingParams(temperature=0.0)])
    unknown = [m for m in modes if m not in WARMUP_MODES]
    if unknown:
        raise BlitzgenError(f"unknown warm-up mode(s) {', '.join(unknown)} (one of {', '.join(WARMUP_MODES)})")
    grow = getattr(gen, "ensure_capacity", None)
    if grow is not None:
        grow(min(gen.max_seq_len, WARM_CACHE_TOKENS))
    return gen.warmup([SamplingParams(**WARMUP_MODES[m]) for m in modes])


def config_from_dict(values: dict) -> ServiceConfig:
    names = {f.name for f in dataclasses.fields(ServiceConfig)}
    return ServiceConfig(**{k: v for k, v in values.items() if k in names})
