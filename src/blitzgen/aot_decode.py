"""The compiled decode step saved whole (Dynamo's trace, guards and Inductor's code) with PyTorch's
AOT precompile, so a warm start loads it instead of re-tracing (opt-in: BLITZGEN_AOT_DECODE=1).

``torch.compile(fn, fullgraph=True).aot_compile(((model, tok, pos), {}))`` (torch >= 2.10) traces
and compiles once and returns an ``AOTCompiledFunction``; ``save_compiled_function(path)`` writes
it (Dynamo's guards, the rewritten bytecode and the bundled AOTAutograd/Inductor entry, kernels
included); ``torch.compiler.load_compiled_function`` reads it back in a fresh process without
running Dynamo. The model is an argument, so its parameters and buffers (the KV cache, mutated in
place) are read from whatever model is passed at each call, never baked in; guards that cannot be
serialized (ID_MATCH on modules, globals) are dropped, the rest (shapes, dtypes, devices,
grad/inference mode, constant attributes such as ``compile_regions`` or the attention op's
``decode_impl``) are checked on every call (~8 us on the CPU).

One file per (model, options, KV-cache length) under ``<cache root>/aot/``. A missing, unreadable
or non-matching file is (re)compiled and written; a guard failure later falls back to the ordinary
``torch.compile`` step (Dynamo as before). Things to know:

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
import time
from typing import Callable

import torch

log = logging.getLogger("blitzgen")


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
    return {"aot_decode": 1, "source": source_digest(), "cache_len": model.cache_len, "batch": getattr(model, "max_batch", 1),
            "dtype": str(model.dtype), "device": str(model.device), "regions": bool(model.compile_regions),
            "attention": repr(op), "modules": quant,
            "fused": any(getattr(b, "fused_decode", None) is not None for b in getattr(model, "layers", ()))}


class AOTDecodeStep:
    """A drop-in for the compiled ``_model_step``: ``step(model, tok, pos) -> logits``."""

    def __init__(self, fn: Callable, device: str, options=None, cache_dir: str | None = None,
                 fallback: Callable | None = None):
        self.fn, self.device, self.options, self.cache_dir = fn, device, options, cache_dir
        self.fallback = fallback  # the ordinary torch.compile'd step
        self.cuda = device.startswith("cuda")
        self._fns: dict[tuple, Callable] = {}  # (id(model), cache_len) -> AOTCompiledFunction
        self.status = ""  # "loaded" | "compiled" | "fallback: ..." for the last (model, cache) seen
        self._unproven: set[tuple] = set()  # loaded from a file, not yet called
        self.guard_misses = 0  # calls that failed the saved step's guards and ran the ordinary step
        self.seconds = 0.0

    def path_for(self, model) -> str:
        from . import compile_cache as cc

        parts = cc.key_for(model.args, self.options, _signature(model))
        root = self.cache_dir or (self.options.cache_dir if self.options is not None else None)
        return os.path.join(cc.aot_root(root), cc.key_hash(parts) + ".pt2")

    def _cudagraph_config(self):
        if not self.cuda:
            return contextlib.nullcontext()
        import torch._inductor.config as inductor_config

        return inductor_config.patch({"triton.cudagraphs": True})

    def _get(self, model, tok, pos) -> Callable:
        key = (id(model), model.cache_len)
        fn = self._fns.get(key)
        if fn is not None:
            return fn
        t0 = time.perf_counter()
        path = self.path_for(model)
        fn = None
        if os.path.exists(path):
            try:
                with open(path, "rb") as f, self._cudagraph_config():
                    fn = torch.compiler.load_compiled_function(f)
                if not fn.guard_check(model, tok, pos):
                    raise ValueError("guards fail on this model/inputs")
                self.status = "loaded"
                self._unproven.add(key)
            except Exception as e:  # noqa: BLE001 - a stale or foreign file: compile afresh
                log.warning("blitzgen: AOT decode step %s unusable (%s: %s); recompiling", path,
                            type(e).__name__, e)
                fn = None
        if fn is None:
            try:
                mode = "reduce-overhead" if self.cuda else None
                compiled = torch.compile(self.fn, fullgraph=True, dynamic=False, mode=mode)
                fn = compiled.aot_compile(((model, tok, pos), {}))
                self.status = "compiled"
                self._save(fn, path)
            except Exception as e:  # noqa: BLE001
                if self.fallback is None:
                    raise
                log.warning("blitzgen: AOT decode step failed (%s: %s); using torch.compile",
                            type(e).__name__, e)
                self.status, fn = f"fallback: {type(e).__name__}", self.fallback
        self.seconds += time.perf_counter() - t0
        self._fns[key] = fn
        return fn

    def _save(self, fn, path: str) -> None:
        """Write the step atomically under the cache's lock; a failed write (a read-only or full
        cache) is logged and the compiled step kept."""
        try:
            from .compile_cache import locked, write_atomic

            data = type(fn).serialize(fn).serialized_data  # = save_compiled_function, atomic on 2.11 too
            with locked(os.path.dirname(path)):
                write_atomic(path, data)
        except Exception as e:  # noqa: BLE001
            log.warning("blitzgen: could not save the AOT decode step to %s (%s: %s)", path, type(e).__name__, e)

    def _drop(self, model, error: Exception) -> Callable:
        """A loaded step that fails on its first call: remove its file, use the ordinary step."""
        path = self.path_for(model)
        log.warning("blitzgen: AOT decode step %s failed on its first call (%s: %s); using torch.compile",
                    path, type(error).__name__, error)
        with contextlib.suppress(OSError):
            os.remove(path)
        self.status = f"fallback: {type(error).__name__}"
        fn = self.fallback or torch.compile(self.fn, fullgraph=True, dynamic=False)
        self._fns[(id(model), model.cache_len)] = fn
        return fn

    def __call__(self, model, tok, pos):
        fn = self._get(model, tok, pos)
        if fn is self.fallback:
            return fn(model, tok, pos)
        if not fn.guard_check(model, tok, pos):  # ~8 us; another grad mode, a changed attribute
            self.guard_misses += 1
            return (self.fallback or self.fn)(model, tok, pos)
        fn.disable_guard_check()  # checked just above
        key = (id(model), model.cache_len)
        if key not in self._unproven:
            return fn(model, tok, pos)
        try:  # a loaded file's first call (CUDA-graph capture, kernels): never let it end a start
            out = fn(model, tok, pos)
        except Exception as e:  # noqa: BLE001
            return self._drop(model, e)(model, tok, pos)
        self._unproven.discard(key)
        return out
