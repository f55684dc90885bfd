"""The compiled decode step and samplers saved whole (Dynamo's trace, guards and Inductor's code)
with PyTorch's AOT precompile, so a warm start loads them instead of re-tracing (opt-in:
BLITZGEN_AOT_DECODE=1).

``torch.compile(fn, fullgraph=True).aot_compile(((model, tok, pos), {}))`` (torch >= 2.10) traces
and compiles once and returns an ``AOTCompiledFunction``; ``save_compiled_function(path)`` writes
it (Dynamo's guards, the rewritten bytecode and the bundled AOTAutograd/Inductor entry, kernels
included); ``torch.compiler.load_compiled_function`` reads it back in a fresh process without
running Dynamo. The model is an argument, so its parameters and buffers (the KV cache, mutated in
place) are read from whatever model is passed at each call, never baked in; guards that cannot be
serialized (ID_MATCH on modules, globals) are dropped, the rest (shapes, dtypes, devices,
grad/inference mode, constant attributes such as ``compile_regions`` or the attention op's
``decode_impl``) are checked on every call (~8 us on the CPU).

One file per (model, options, KV-cache length) under ``<cache root>/aot/`` (``AOTDecodeStep``),
and one per sampler mode and logits shape (``AOTSampler``), so a warm start traces nothing. A
missing, unreadable or non-matching file is (re)compiled and written; a guard failure later falls
back to the ordinary ``torch.compile`` function (Dynamo as before). Things to know:

* Load in the grad mode of the calls (the Generator's decode runs under inference_mode): the
  guard manager captures the dispatch-key state when it is built at load time.
* CUDA graphs: whether a loaded graph is CUDA-graphed is decided at load time by the global
  ``torch._inductor.config.triton.cudagraphs`` (torch 2.11 and 2.13,
  _functorch/_aot_autograd/aot_autograd_result.py, deserialize_bundled_cache_entry), not by the
  mode the function was compiled with, so the load is wrapped in that config patch.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable

import torch

log = logging.getLogger("blitzgen")


def _aot_enabled():
    """``torch.compile`` attaches ``.aot_compile`` only under ``torch._dynamo.config.enable_aot_compile``,
    which is off by default on torch 2.11 (on by default on 2.13)."""
    import torch._dynamo.config as dynamo_config

    return dynamo_config.patch(enable_aot_compile=True)


def supported() -> bool:
    return hasattr(torch.compiler, "load_compiled_function")


_SOURCE_DIGEST: str | None = None


def source_digest() -> str:
    """sha256 of blitzgen's own Python sources: torch checks only its own version when it loads a
    saved step, and guards do not see code, so an edit to the model or a kernel must change the key."""
    global _SOURCE_DIGEST
    if _SOURCE_DIGEST is None:
        import hashlib
        from pathlib import Path

        h = hashlib.sha256()
        root = Path(__file__).resolve().parent
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
        _SOURCE_DIGEST = h.hexdigest()[:16]
    return _SOURCE_DIGEST


def _signature(model) -> dict:
    """What the traced step depends on beyond model.args and options (part of the file's key)."""
    quant = sorted({type(m).__name__ for m in model.modules()} - {"Transformer", "TransformerBlock"})
    op = getattr(model, "attention_op", None)
    return {"aot_decode": 1, "source": source_digest(), "cache_len": model.cache_len,
            "batch": getattr(model, "max_batch", 1), "dtype": str(model.dtype), "device": str(model.device),
            "regions": bool(model.compile_regions), "attention": repr(op), "modules": quant,
            "fused": any(getattr(b, "fused_decode", None) is not None for b in getattr(model, "layers", ()))}


def step_key(args: tuple) -> tuple:
    """In-process key of a decode step call ``(model, tok, pos)`` (cheap: checked every call)."""
    return id(args[0]), args[0].cache_len


def step_parts(args: tuple) -> tuple[object, dict]:
    """(model args, signature) for the step's file name."""
    return args[0].args, _signature(args[0])


def sample_key(args: tuple) -> tuple:
    """The same for ``sampling.sample(logits, tensors, mode, noise)``: one file per mode and shape."""
    logits, _, mode, noise = args
    return tuple(logits.shape), logits.dtype, logits.device, tuple(mode), noise is None


def sample_parts(args: tuple) -> tuple[object, dict]:
    shape, dtype, device, mode, no_noise = sample_key(args)
    return {}, {"aot_fn": "sample", "source": source_digest(), "shape": list(shape), "dtype": str(dtype),
                "device": str(device), "mode": list(mode), "noise": not no_noise}


class AOTFunction:
    """A drop-in for a ``torch.compile``d function, saved and loaded whole (see the module doc).
    ``key(args)``: a call's in-process key (cheap); ``parts(args)``: the model args and signature
    its file is named by."""

    def __init__(self, fn: Callable, device: str, options=None, cache_dir: str | None = None,
                 fallback: Callable | None = None, key: Callable = step_key, parts: Callable = step_parts,
                 cudagraphs: bool = False, what: str = "decode step"):
        self.fn, self.device, self.options, self.cache_dir = fn, device, options, cache_dir
        self.fallback = fallback  # the ordinary torch.compile'd function
        self.key, self.parts, self.what = key, parts, what
        self.cudagraphs = cudagraphs and device.startswith("cuda")
        self._fns: dict[tuple, Callable] = {}  # in-process key -> AOTCompiledFunction (or the fallback)
        self.status = ""  # "loaded" | "compiled" | "fallback: ..." for the last new key seen
        self._unproven: set[tuple] = set()  # loaded from a file, not yet called
        self.guard_misses = 0  # calls that failed the saved function's guards and ran the ordinary one
        self.before_compile: Callable | None = None  # called before any compile (compile_cache.warm_up's lazy entry)
        self.files: set[str] = set()  # the files this process loaded or saved (warm_state records them)

    def path_for(self, *args) -> str:
        from . import compile_cache as cc

        model_args, sig = self.parts(args)
        parts = cc.key_for(model_args, self.options, sig)
        root = self.cache_dir or (self.options.cache_dir if self.options is not None else None)
        return os.path.join(cc.aot_root(root), cc.key_hash(parts) + ".pt2")

    @staticmethod
    def _no_compile_pool():
        """A saved function's load and first call compile nothing, but the Inductor code they load
        asks for Inductor's compile-worker pool at its first kernel (a sidecar process and a worker
        per core, each importing torch): on a warm start that took CPU from the start itself, and its
        shutdown held the process's exit ~3 s (BENCHMARKS.md). One compile thread means no pool; a
        compile after the load (a fallback) gets the pool as before."""
        import torch._inductor.config as inductor_config

        return inductor_config.patch(compile_threads=1)

    def _cudagraph_config(self):
        if not self.cudagraphs:
            return contextlib.nullcontext()
        import torch._inductor.config as inductor_config

        return inductor_config.patch({"triton.cudagraphs": True})

    def _get(self, key, args) -> Callable:
        fn = self._fns.get(key)
        if fn is not None:
            return fn
        path = self.path_for(*args)
        fn = None
        if os.path.exists(path):
            try:
                with open(path, "rb") as f, self._cudagraph_config(), self._no_compile_pool():
                    fn = torch.compiler.load_compiled_function(f)
                if not fn.guard_check(*args):
                    raise ValueError("guards fail on these inputs")
                self.status = "loaded"
                self._unproven.add(key)
                self.files.add(path)
            except Exception as e:  # noqa: BLE001 - a stale or foreign file: compile afresh
                log.warning("blitzgen: AOT %s %s unusable (%s: %s); recompiling", self.what, path,
                            type(e).__name__, e)
                fn = None
        if fn is None:
            if self.before_compile is not None:
                self.before_compile()
            try:
                mode = "reduce-overhead" if self.cudagraphs else None
                with _aot_enabled():
                    compiled = torch.compile(self.fn, fullgraph=True, dynamic=False, mode=mode)
                    fn = compiled.aot_compile((args, {}))
                self.status = "compiled"
                self._save(fn, path)
            except Exception as e:  # noqa: BLE001
                if self.fallback is None:
                    raise
                log.warning("blitzgen: AOT %s failed (%s: %s); using torch.compile", self.what,
                            type(e).__name__, e)
                self.status, fn = f"fallback: {type(e).__name__}", self.fallback
        self._fns[key] = fn
        return fn

    def _save(self, fn, path: str) -> None:
        """Write atomically under the cache's lock; a failed write (a read-only or full cache) is
        logged and the compiled function kept."""
        try:
            from .compile_cache import locked, write_atomic

            data = type(fn).serialize(fn).serialized_data  # = save_compiled_function, atomic on 2.11 too
            with locked(os.path.dirname(path)):
                write_atomic(path, data)
            self.files.add(path)
        except Exception as e:  # noqa: BLE001
            log.warning("blitzgen: could not save the AOT %s to %s (%s: %s)", self.what, path, type(e).__name__, e)

    def _drop(self, key, args, error: Exception) -> Callable:
        """A loaded function that fails on its first call: remove its file, use the ordinary one."""
        path = self.path_for(*args)
        log.warning("blitzgen: AOT %s %s failed on its first call (%s: %s); using torch.compile",
                    self.what, path, type(error).__name__, error)
        with contextlib.suppress(OSError):
            os.remove(path)
        self.files.discard(path)
        self.status = f"fallback: {type(error).__name__}"
        if self.before_compile is not None:
            self.before_compile()
        fn = self.fallback or torch.compile(self.fn, fullgraph=True, dynamic=False)
        self._fns[key] = fn
        self._unproven.discard(key)
        return fn

    def __call__(self, *args):
        key = self.key(args)
        fn = self._get(key, args)
        if fn is self.fallback:
            return fn(*args)
        if not fn.guard_check(*args):  # ~8 us; another grad mode, a changed attribute
            self.guard_misses += 1
            if self.guard_misses == 1 and self.before_compile is not None:
                self.before_compile()  # the ordinary function compiles on its first call
            return (self.fallback or self.fn)(*args)
        fn.disable_guard_check()  # checked just above
        if key not in self._unproven:
            return fn(*args)
        try:  # a loaded file's first call (CUDA-graph capture, kernels): never let it end a start
            with self._no_compile_pool():
                out = fn(*args)
        except Exception as e:  # noqa: BLE001
            return self._drop(key, args, e)(*args)
        self._unproven.discard(key)
        return out


def AOTDecodeStep(fn: Callable, device: str, options=None, cache_dir: str | None = None,
                  fallback: Callable | None = None) -> AOTFunction:
    """The model's decode step ``step(model, tok, pos) -> logits``, CUDA-graphed on CUDA."""
    return AOTFunction(fn, device, options, cache_dir, fallback, step_key, step_parts, cudagraphs=True)


def AOTSampler(fn: Callable, device: str, options=None, cache_dir: str | None = None,
               fallback: Callable | None = None) -> AOTFunction:
    """``sampling.sample``, one saved graph per mode and logits shape (no CUDA graphs)."""
    return AOTFunction(fn, device, options, cache_dir, fallback, sample_key, sample_parts, what="sampler")
