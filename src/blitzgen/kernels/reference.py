"""Plain-PyTorch oracles for the weight-only GEMV kernels (no Triton, any device).

Layouts (the quantized modules' storage format, see blitzgen.quant):

* int8: ``weight`` int8 [N, K] (out, in), ``scales`` [N]; y = (x @ weight.T) * scales.
* int4: ``qweight`` uint8 [N, K // 2], byte j of row n = q[n, 2j] | q[n, 2j + 1] << 4 (even k in the
  LOW nibble), q in 0..15; ``scales``, ``zeros`` [N, K // group_size];
  w[n, k] = (q[n, k] - 8) * scales[n, k // g] + zeros[n, k // g].
* float: ``weight`` [N, K] in any float dtype; y = x @ weight.T (``float_gemv_ref``).

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
