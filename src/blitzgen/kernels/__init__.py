"""Custom Triton kernels for batch-1 decode: weight-only int8 / int4 GEMV (see gemv.py), and a
split-K attention for one query token over the KV cache (attention.py: the default for grouped
heads, imported on use).
Fused decode GEMVs (fused_gemv.py: RMSNorm prologue, SwiGLU or residual-add epilogue, for int8,
int4 and float weights) and the one-token block built on them (fused_decode.py) are opt-in too
(``RuntimeOptions.fused_decode``, BLITZGEN_FUSED=1): ``fused_int8_gemv`` / ``fused_int4_gemv`` /
``fused_float_gemv`` below, with their references in reference.py as the CPU path.

    from blitzgen import kernels
    if kernels.available():                      # not disabled, CUDA present, Triton importable
        y = kernels.int8_gemv(x, weight, scales)   # x: [..., K] holding ONE token
        y = kernels.int4_gemv(x, qweight, scales, zeros, group_size)

``int8_gemv`` / ``int4_gemv`` dispatch to the ``torch.ops.blitzgen.*`` custom ops (opaque to
torch.compile, see ``ops.opaque_op``). On tensors that are not on
CUDA, or when the kernels are unavailable, they compute the same result in plain PyTorch (int8:
the module's ``F.linear(x, w.to(x.dtype)) * s``; int4: dequantize + matmul, slow), so callers never
break. A CUDA call that takes that slower path is reported once, with ``unavailable_reason()``
(``runtime.fallback``). Importing this package decides ``available()`` once: on machines without
CUDA it never imports Triton; ``BLITZGEN_KERNELS=0`` (read through ``blitzgen.runtime``, set before
the import) disables the kernels.
"""

from __future__ import annotations

import torch

from .. import runtime
from .reference import (fused_float_gemv_ref, fused_int4_gemv_ref, fused_int8_gemv_ref, int4_gemv_ref,
                        int8_gemv_ref)

__all__ = ["available", "unavailable_reason", "int8_gemv", "int8_rows", "int8_matmul", "int4_gemv", "int4_rows", "int4_matmul", "int8_gemv_ref", "int4_gemv_ref",
           "fused_int8_gemv", "fused_int4_gemv", "fused_float_gemv"]

# Plain module globals (no lru_cache) so that torch.compile/dynamo can trace int8_gemv/int4_gemv
# once available() has run eagerly (this module calls it on import).
_GEMV = None  # the blitzgen.kernels.gemv module once imported
_ROWS = None  # the blitzgen.kernels.mm_rows module once imported
_FUSED = None  # the blitzgen.kernels.fused_gemv module once imported
_REASON: str | None = None  # why the kernels cannot run here (None: they can)
_AVAILABLE: bool | None = None  # cached result of available()
ROWS_MAX = 16  # int8_rows / int4_rows take up to this many tokens (more: int8_matmul / int4_matmul)
INT4_ROWS_MIN = 5  # with BLITZGEN_INT4_PREFILL=tinygemm, fewer rows stay on tinygemm (faster there on the H200)


def _probe() -> str | None:
    """None when the kernels can run, else the reason they cannot (imports Triton on CUDA hosts)."""
    global _GEMV, _FUSED, _ROWS
    if not runtime.env_flag("BLITZGEN_KERNELS", True):
        return "disabled by the user (BLITZGEN_KERNELS=0)"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        from . import gemv
        from . import fused_gemv
        from . import mm_rows
    except Exception as e:  # ImportError, or a broken Triton install: reported, never swallowed
        return f"Triton kernels could not be imported ({type(e).__name__}: {e})"
    _GEMV, _FUSED, _ROWS = gemv, fused_gemv, mm_rows
    return None


def available() -> bool:
    """True when the Triton kernels can run here: not disabled, CUDA present, Triton importable.

    Cached for the process (computed when the package is imported)."""
    global _AVAILABLE, _REASON
    if _AVAILABLE is None:
        _REASON = _probe()
        _AVAILABLE = _REASON is None
    return _AVAILABLE


def disable(reason: str) -> None:
    """Switch the kernels off for the rest of the process (RuntimeOptions.kernels=False): layers
    prepared after this take the plain-PyTorch paths."""
    global _AVAILABLE, _REASON
    _AVAILABLE, _REASON = False, reason


def unavailable_reason() -> str | None:
    """Why ``available()`` is False (one line, with the import error's text), or None."""
    available()
    return _REASON


def report_unavailable(what: str) -> bool:
    """Report once that ``what`` takes a slower path because the kernels are unavailable; returns
    True when they are (nothing to report)."""
    if available():
        return True
    runtime.fallback(what, unavailable_reason() or "unknown")
    return False


def _use_kernels(what: str, *tensors: torch.Tensor) -> bool:
    if not all(t.is_cuda for t in tensors):
        return False  # CPU tensors: plain PyTorch is this device's path, not a fallback
    if available():
        return True
    if not torch.compiler.is_compiling():
        report_unavailable(what)
    return False


def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """y = (x @ weight.T) * scales; x [..., K] with one row, weight int8 [N, K], scales [N]."""
    if _use_kernels("int8 GEMV", x, weight, scales):
        return _GEMV.int8_gemv(x, weight, scales)
    return torch.nn.functional.linear(x, weight.to(x.dtype)) * scales.to(x.dtype)


def int8_rows(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """As ``int8_gemv`` for x [..., K] holding 1..ROWS_MAX rows (speculative verify, short prefill
    chunks): the tensor-core kernel of mm_rows.py."""
    if _use_kernels("int8 row matmul", x, weight, scales):
        return _ROWS.int8_mm_rows(x, weight, scales)
    return torch.nn.functional.linear(x, weight.to(x.dtype)) * scales.to(x.dtype)


def int4_rows(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              group_size: int) -> torch.Tensor:
    """As ``int4_gemv`` for x [..., K] holding 1..ROWS_MAX rows (mm_rows.py)."""
    if _use_kernels("int4 row matmul", x, qweight, scales, zeros):
        return _ROWS.int4_mm_rows(x, qweight, scales, zeros, group_size)
    return int4_gemv_ref(x, qweight, scales, zeros, group_size)


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """As ``int8_rows`` for any number of rows (a prefill): the row kernel with more rows per
    program, or from ``mm_rows.INT8_DEQUANT_ROWS`` rows a float copy and cuBLAS (dequant.py)."""
    if _use_kernels("int8 matmul", x, weight, scales):
        return _ROWS.int8_mm(x, weight, scales)
    from ..quant.int8 import int8_linear_op  # opaque: Inductor's fused mixed matmul is far slower here

    return int8_linear_op(x, weight, scales)


def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """As ``int4_rows`` for any number of rows: a prefill from the canonical layout (the weight tile
    dequantized in registers, or from ``mm_rows.INT4_DEQUANT_ROWS`` rows a float copy and cuBLAS),
    instead of tinygemm's packed copy."""
    if _use_kernels("int4 matmul", x, qweight, scales, zeros):
        return _ROWS.int4_mm(x, qweight, scales, zeros, group_size)
    return int4_gemv_ref(x, qweight, scales, zeros, group_size)


def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              group_size: int) -> torch.Tensor:
    """y = x @ dequant(qweight).T; qweight uint8 [N, K // 2] (even k low nibble), scales/zeros
    [N, K // group_size]; w = (q - 8) * scale + zero."""
    if _use_kernels("int4 GEMV", x, qweight, scales, zeros):
        return _GEMV.int4_gemv(x, qweight, scales, zeros, group_size)
    return int4_gemv_ref(x, qweight, scales, zeros, group_size)


def fused_int8_gemv(x, weight, scales, norm_weight=None, eps: float = 1e-5, residual=None,
                    swiglu: bool = False) -> torch.Tensor:
    """One decode token through an int8 layer with an optional RMSNorm of x first (``norm_weight``,
    ``eps``), then SwiGLU over the [gate; up] outputs (``swiglu``) or ``+ residual``: one kernel on
    CUDA (kernels/fused_gemv.py), the plain-PyTorch reference elsewhere."""
    if _use_kernels("fused int8 GEMV", x, weight, scales):
        return _FUSED.fused_int8_gemv(x, weight, scales, norm_weight, eps, residual, swiglu)
    return fused_int8_gemv_ref(x, weight, scales, norm_weight, eps, residual, swiglu)


def fused_int4_gemv(x, qweight, scales, zeros, group_size: int, norm_weight=None, eps: float = 1e-5,
                    residual=None, swiglu: bool = False) -> torch.Tensor:
    """As ``fused_int8_gemv`` for an int4 layer (canonical layout, see ``int4_gemv``)."""
    if _use_kernels("fused int4 GEMV", x, qweight, scales, zeros):
        return _FUSED.fused_int4_gemv(x, qweight, scales, zeros, group_size, norm_weight, eps, residual, swiglu)
    return fused_int4_gemv_ref(x, qweight, scales, zeros, group_size, norm_weight, eps, residual, swiglu)


def fused_float_gemv(x, weight, norm_weight=None, eps: float = 1e-5, residual=None,
                     swiglu: bool = False) -> torch.Tensor:
    """As ``fused_int8_gemv`` for an unquantized (bf16 / fp16 / fp32) weight [N, K]."""
    if _use_kernels("fused float GEMV", x, weight):
        return _FUSED.fused_float_gemv(x, weight, norm_weight, eps, residual, swiglu)
    return fused_float_gemv_ref(x, weight, norm_weight, eps, residual, swiglu)


# Decide now (eagerly, outside any torch.compile trace): on CPU-only machines this is a cheap False
# that never imports Triton; on CUDA machines it imports gemv.py (Triton) and registers the ops.
available()
