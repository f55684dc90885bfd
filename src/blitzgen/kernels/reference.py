"""Plain-PyTorch oracles for the weight-only GEMV kernels (no Triton, any device).

Layouts (the quantized modules' storage format, see blitzgen.quant):

* int8: ``weight`` int8 [N, K] (out, in), ``scales`` [N]; y = (x @ weight.T) * scales.
* int4: ``qweight`` uint8 [N, K // 2], byte j of row n = q[n, 2j] | q[n, 2j + 1] << 4 (even k in the
  LOW nibble), q in 0..15; ``scales``, ``zeros`` [N, K // group_size];
  w[n, k] = (q[n, k] - 8) * scales[n, k // g] + zeros[n, k // g].
* float: ``weight`` [N, K] in any float dtype; y = x @ weight.T (``float_gemv_ref``).
* fused (``fused_*_gemv_ref``): RMSNorm before, SwiGLU / a residual add after, see below.

The references dequantize to float32, multiply in float32 and return x's dtype with x's leading
dims: y has shape (*x.shape[:-1], N).
"""

from __future__ import annotations

import torch


def unpack_int4_ref(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] -> int32 [N, K] nibbles (0..15), k even from the low nibble."""
    q = qweight.to(torch.int32)
    return torch.stack((q & 0xF, q >> 4), dim=-1).reshape(q.shape[0], q.shape[1] * 2)


def pack_int4_ref(q: torch.Tensor) -> torch.Tensor:
    """int [N, K] values in 0..15 -> uint8 [N, K // 2] (even k in the low nibble)."""
    q = q.to(torch.int32)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def dequantize_int4_ref(qweight, scales, zeros, group_size: int) -> torch.Tensor:
    """float32 [N, K] weights of the canonical int4 layout."""
    q = unpack_int4_ref(qweight).to(torch.float32)
    s = scales.to(torch.float32).repeat_interleave(group_size, dim=1)
    z = zeros.to(torch.float32).repeat_interleave(group_size, dim=1)
    return (q - 8.0) * s + z


def int8_gemv_ref(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    K = x.shape[-1]
    y = x.reshape(-1, K).to(torch.float32) @ weight.to(torch.float32).t()
    y = y * scales.to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def int4_gemv_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  group_size: int) -> torch.Tensor:
    K = x.shape[-1]
    w = dequantize_int4_ref(qweight, scales, zeros, group_size)
    y = x.reshape(-1, K).to(torch.float32) @ w.t()
    return y.to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])


def float_gemv_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y = x @ weight.T for a float weight [N, K] (kernels/gemv_float.py), float32 math."""
    K = x.shape[-1]
    y = x.reshape(-1, K).to(torch.float32) @ weight.to(torch.float32).t()
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


# ---- fused decode GEMVs (kernels/fused_gemv.py): the unfused computation, in float32 ------------


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """float32 weight * x / sqrt(mean(x^2) + eps) over the last dim."""
    x32 = x.to(torch.float32)
    return weight.to(torch.float32) * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))


def fused_gemv_ref(x: torch.Tensor, gemv, norm_weight: torch.Tensor | None = None, eps: float = 1e-5,
                   residual: torch.Tensor | None = None, swiglu: bool = False) -> torch.Tensor:
    """The fused op's meaning: ``gemv`` (a function of a float32 [1, K] activation returning [1, N]
    float32) applied to x (RMSNorm-ed first when ``norm_weight`` is given); with ``swiglu`` the N
    outputs are [gate, up] halves and the result is silu(gate) * up; then ``residual`` is added.
    One rounding, to x's dtype, at the end; shape (*x.shape[:-1], N or N // 2)."""
    K = x.shape[-1]
    a = x.reshape(1, K).to(torch.float32)
    if norm_weight is not None:
        a = rmsnorm_ref(a, norm_weight, eps)
    y = gemv(a)
    if swiglu:
        gate, up = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    if residual is not None:
        y = y + residual.reshape(1, -1).to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def fused_int8_gemv_ref(x, weight, scales, norm_weight=None, eps=1e-5, residual=None, swiglu=False):
    return fused_gemv_ref(x, lambda a: int8_gemv_ref(a, weight, scales), norm_weight, eps, residual, swiglu)


def fused_int4_gemv_ref(x, qweight, scales, zeros, group_size, norm_weight=None, eps=1e-5, residual=None,
                        swiglu=False):
    return fused_gemv_ref(x, lambda a: int4_gemv_ref(a, qweight, scales, zeros, group_size),
                          norm_weight, eps, residual, swiglu)


def fused_float_gemv_ref(x, weight, norm_weight=None, eps=1e-5, residual=None, swiglu=False):
    return fused_gemv_ref(x, lambda a: float_gemv_ref(a, weight), norm_weight, eps, residual, swiglu)
