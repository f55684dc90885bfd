"""The one place that touches torch.compile and inductor settings.

Decode is compiled with fullgraph=True and static shapes; on CUDA with mode="reduce-overhead" so
each decode step is one CUDA-graph replay. Prefill is compiled per length bucket (see
generate.py), so a new prompt length never triggers a recompile beyond its bucket. Inductor's FX
graph cache and AOT autograd cache are on, so a second process reuses the first one's work.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from . import runtime

_configured: set[str] = set()  # device types configured so far


def configure_inductor(device: str, cache_dir: str | None = None) -> None:
    """Global inductor settings, applied before the first compile for each device type (a CUDA
    compile after a CPU one still gets the CUDA settings). Inductor's cache goes under cache_dir
    (default: runtime.cache_root()) unless TORCHINDUCTOR_CACHE_DIR is set."""
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
        inductor_config.coordinate_descent_tuning = True
        inductor_config.triton.unique_kernel_names = True
    # Several sampler modes and prefill buckets each compile once; allow enough of them.
    dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, 64)
    dynamo_config.accumulated_cache_size_limit = max(dynamo_config.accumulated_cache_size_limit, 512)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(cache_dir or runtime.cache_root(), "inductor"))
    _configured.add(kind)


def compile_decode(fn: Callable, device: str, cache_dir: str | None = None) -> Callable:
    configure_inductor(device, cache_dir)
    if device.startswith("cuda"):
        return torch.compile(fn, mode="reduce-overhead", fullgraph=True, dynamic=False)
    return torch.compile(fn, fullgraph=True, dynamic=False)


def compile_static(fn: Callable, device: str, cache_dir: str | None = None) -> Callable:
    """Prefill (one graph per length bucket) and the sampler after it (one per sampler mode):
    fullgraph, static shapes, no CUDA graphs (each runs once per request, and a graph's output
    would be overwritten by the next replay)."""
    configure_inductor(device, cache_dir)
    return torch.compile(fn, fullgraph=True, dynamic=False)
