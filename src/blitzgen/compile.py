"""The one place that touches torch.compile and inductor settings.

The model's decode step is compiled once (fullgraph, static shapes; on CUDA mode="reduce-overhead",
so each step is one CUDA-graph replay), whatever the sampler; each sampler mode is a small graph of
its own. Prefill is eager unless asked for; then it is compiled per length bucket (see
generate.py), so a new prompt length never triggers a recompile beyond its bucket. Inductor's FX
graph cache and AOT autograd cache are on, so a second process reuses the first one's work.
"""

from __future__ import annotations

from typing import Callable

import torch


_configured: set[str] = set()  # device types configured so far


def configure_inductor(device: str, cache_dir: str | None = None, autotune: bool = False) -> None:
    """Global inductor settings, applied before the first compile for each device type (a CUDA
    compile after a CPU one still gets the CUDA settings). Inductor's cache goes under cache_dir
    (default: BLITZGEN_CACHE) unless TORCHINDUCTOR_CACHE_DIR is set. ``autotune`` turns on
    coordinate-descent tuning (CUDA): ~45 s more per cold 7B start, re-run on warm starts, for a
    few % of decode speed, so it is off unless asked for."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if kind in _configured:
        return
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    try:
        import torch._functorch.config as functorch_config

        functorch_config.enable_autograd_cache = True
    except (ImportError, AttributeError):
        pass
    if device.startswith("cuda"):
        inductor_config.triton.unique_kernel_names = True
    if autotune and device.startswith("cuda"):
        inductor_config.coordinate_descent_tuning = True
    # Several sampler modes and prefill buckets each compile once; allow enough of them.
    dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, 64)
    dynamo_config.accumulated_cache_size_limit = max(dynamo_config.accumulated_cache_size_limit, 512)
    from .compile_cache import use_inductor_dir

    use_inductor_dir(cache_dir)  # Inductor's and Triton's caches under BLITZGEN_CACHE
    if kind == "cpu":  # its vector-ISA probe, ~1.4 s a start, answered from the cache
        from . import isa_probe
        from .runtime import cache_root

        isa_probe.install(cache_dir or cache_root())
    _configured.add(kind)


class _LazyCompile:
    """``torch.compile(fn, **kw)``, made on the first call. The AOT-saved functions keep the plain
    compiled one as their fallback; creating it imports Dynamo's backend and debug modules (~0.3 s),
    which a start whose saved functions load never needs."""

    def __init__(self, fn: Callable, **kw):
        self.fn, self.kw = fn, kw
        self._compiled: Callable | None = None

    def __call__(self, *args, **kwargs):
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, **self.kw)
        return self._compiled(*args, **kwargs)


def _aot_wanted(options) -> bool:
    if options is None or not options.aot_decode:
        return False
    from . import aot_decode

    if aot_decode.supported():
        return True
    from .runtime import fallback

    fallback("AOT decode step", f"torch {torch.__version__} has no load_compiled_function")
    return False


def compile_decode(fn: Callable, device: str, cache_dir: str | None = None, autotune: bool = False,
                   options=None) -> Callable:
    """The model's decode step: one CUDA-graph replay on CUDA (its output is overwritten by the
    next replay). ``options.aot_decode``: saved and loaded whole with torch's AOT precompile
    (aot_decode.py), the plain compiled step as its fallback."""
    configure_inductor(device, cache_dir, autotune)
    kw = dict(mode="reduce-overhead") if device.startswith("cuda") else {}
    if _aot_wanted(options):
        from . import aot_decode

        return aot_decode.AOTDecodeStep(fn, device, options, cache_dir,
                                        fallback=_LazyCompile(fn, fullgraph=True, dynamic=False, **kw))
    return torch.compile(fn, fullgraph=True, dynamic=False, **kw)


def compile_static(fn: Callable, device: str, cache_dir: str | None = None, autotune: bool = False) -> Callable:
    """The samplers (one small graph per sampler mode) and, when asked, prefill (one graph per
    length bucket): fullgraph, static shapes, no CUDA graphs (outputs stay valid)."""
    configure_inductor(device, cache_dir, autotune)
    return torch.compile(fn, fullgraph=True, dynamic=False)


def compile_sampler(fn: Callable, device: str, cache_dir: str | None = None, autotune: bool = False,
                    options=None) -> Callable:
    """``sampling.sample`` as compile_static does it; with ``options.aot_decode`` each mode's graph
    is saved and loaded whole too (aot_decode.AOTSampler), so a warm start traces nothing."""
    if _aot_wanted(options):
        from . import aot_decode

        configure_inductor(device, cache_dir, autotune)
        return aot_decode.AOTSampler(fn, device, options, cache_dir,
                                     fallback=_LazyCompile(fn, fullgraph=True, dynamic=False))
    return compile_static(fn, device, cache_dir, autotune)
