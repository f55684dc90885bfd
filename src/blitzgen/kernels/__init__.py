"""Custom Triton kernels for batch-1 decode: weight-only int8 / int4 GEMV (see gemv.py), and a
split-K attention for one query token over the KV cache (attention.py: opt-in, imported on use).

    from blitzgen import kernels
    if kernels.available():                      # Triton importable, CUDA present, not disabled
        y = kernels.int8_gemv(x, weight, scales)   # x: [..., K] holding ONE token
        y = kernels.int4_gemv(x, qweight, scales, zeros, group_size)

``int8_gemv`` / ``int4_gemv`` dispatch to the ``torch.ops.blitzgen.*`` custom ops (built with
``torch.library.triton_op``, so torch.compile traces through them). On tensors that are not on
CUDA, or when the kernels are unavailable, they fall back to plain PyTorch (int8: the module's
``F.linear(x, w.to(x.dtype)) * s``; int4: dequantize + matmul, slow), so callers never break;
callers should check ``available()`` (once, eagerly) before routing decode through them.
Importing this package decides ``available()`` once: on machines without CUDA it never imports
Triton; ``BLITZGEN_KERNELS=0`` (set before the import) disables the kernels.
"""

from __future__ import annotations

import os

import torch

from .reference import int4_gemv_ref, int8_gemv_ref

__all__ = ["available", "int8_gemv", "int4_gemv", "int8_gemv_ref", "int4_gemv_ref"]


def _disabled() -> bool:
    return os.environ.get("BLITZGEN_KERNELS", "1").strip().lower() in ("0", "false", "no", "off")


# Plain module globals (no lru_cache) so that torch.compile/dynamo can trace int8_gemv/int4_gemv
# once available() has run eagerly (the quantized modules call it when they are built).
_GEMV = None  # the blitzgen.kernels.gemv module once imported
_AVAILABLE = None  # cached result of available()


def _gemv_module():
    """blitzgen.kernels.gemv, or None when Triton can't be imported (or the import fails)."""
    global _GEMV
    if _GEMV is None:
        try:
            from . import gemv
        except Exception:  # ImportError, or a broken Triton install
            return None
        _GEMV = gemv
    return _GEMV


def available() -> bool:
    """True when the Triton kernels can run here: not disabled, CUDA present, Triton importable.

    Cached for the process (computed when the package is imported)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        ok = False
        if not _disabled():
            try:
                ok = torch.cuda.is_available() and _gemv_module() is not None
            except Exception:
                ok = False
        _AVAILABLE = ok
    return _AVAILABLE


def _use_kernels(*tensors: torch.Tensor) -> bool:
    return all(t.is_cuda for t in tensors) and available()


def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """y = (x @ weight.T) * scales; x [..., K] with one row, weight int8 [N, K], scales [N]."""
    if _use_kernels(x, weight, scales):
        return _GEMV.int8_gemv(x, weight, scales)
    # fallback (CPU tensors, or kernels unavailable): the quantized module's own math
    return torch.nn.functional.linear(x, weight.to(x.dtype)) * scales.to(x.dtype)


def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              group_size: int) -> torch.Tensor:
    """y = x @ dequant(qweight).T; qweight uint8 [N, K // 2] (even k low nibble), scales/zeros
    [N, K // group_size]; w = (q - 8) * scale + zero."""
    if _use_kernels(x, qweight, scales, zeros):
        return _GEMV.int4_gemv(x, qweight, scales, zeros, group_size)
    return int4_gemv_ref(x, qweight, scales, zeros, group_size)


# Decide now (eagerly, outside any torch.compile trace): on CPU-only machines this is a cheap False
# that never imports Triton; on CUDA machines it imports gemv.py (Triton) and registers the ops.
try:
    available()
except Exception:  # pragma: no cover - never let the import fail
    _AVAILABLE = False
