"""A long prefill through int8 / int4 weights: dequantize to a float scratch copy, then cuBLAS.

Past a few hundred rows a prefill is compute-bound, and cuBLAS on the tensor cores beats any
kernel that dequantizes its weight tile in the inner loop (mm_rows.py) or tinygemm (both several
times slower at 1800 rows on the H200: BENCHMARKS.md, rows_gpu.py). Writing the float weight once
costs tens of microseconds a layer, so from ``mm_rows.INT8_DEQUANT_ROWS`` / ``INT4_DEQUANT_ROWS``
rows ``int8_dequant_mm`` / ``int4_dequant_mm`` pay for it. The scratch copy is transient (the
caching allocator reuses it layer after layer); weights of more than ``CHUNK_ELEMS`` elements go
through it in slices of output rows, so it never passes 256 MB in bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

CHUNK_ELEMS = 1 << 27  # the largest scratch weight, in elements (Llama-3-8B's gate+up fits whole)
_BN, _BK = 32, 256  # a program's tile: rows x float outputs per row


@triton.jit
def _int8_dequant_kernel(w_ptr, s_ptr, out_ptr, N, K, stride_wn, stride_on, BN: tl.constexpr, BK: tl.constexpr):
    """out[n, k] = w[n, k] * s[n], computed in float32 (as quant.int8.dequantize_int8)."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rk = tl.program_id(1) * BK + tl.arange(0, BK)
    ok = (rn < N)[:, None] & (rk < K)[None, :]
    rn64 = rn.to(tl.int64)[:, None]
    w = tl.load(w_ptr + rn64 * stride_wn + rk[None, :], mask=ok, other=0)
    s = tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + rn64 * stride_on + rk[None, :], (w.to(tl.float32) * s[:, None]).to(out_ptr.dtype.element_ty),
             mask=ok)


@triton.jit
def _int4_dequant_kernel(q_ptr, s_ptr, z_ptr, out_ptr, N, KH, stride_qn, stride_sn, stride_on,
                         GS: tl.constexpr, BN: tl.constexpr, BKH: tl.constexpr):
    """out[n, k] = (q[n, k] - 8) * s[n, k // GS] + z[n, k // GS] in float32 (as
    quant.int4.dequantize_int4); byte j of a row holds k = 2j (low nibble) and 2j + 1 (high). The
    bytes are loaded as [BN, groups, GS // 2] so that each group's scale and zero is one load."""
    HG: tl.constexpr = GS // 2  # bytes per group
    NG: tl.constexpr = BKH // HG  # groups per tile
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rg = tl.program_id(1) * NG + tl.arange(0, NG)
    rn64 = rn.to(tl.int64)
    j = rg[None, :, None] * HG + tl.arange(0, HG)[None, None, :]  # byte index [1, NG, HG]
    ok = (rn < N)[:, None, None] & (j < KH)
    b = tl.load(q_ptr + rn64[:, None, None] * stride_qn + j, mask=ok, other=0).to(tl.int32)
    g_ok = (rn < N)[:, None] & (rg < KH // HG)[None, :]
    g_off = rn64[:, None] * stride_sn + rg[None, :]
    s = tl.load(s_ptr + g_off, mask=g_ok, other=0.0).to(tl.float32)[:, :, None]
    z = tl.load(z_ptr + g_off, mask=g_ok, other=0.0).to(tl.float32)[:, :, None]
    lo = ((b & 15) - 8).to(tl.float32) * s + z
    hi = ((b >> 4) - 8).to(tl.float32) * s + z
    w = tl.reshape(tl.join(lo, hi), (BN, 2 * BKH))  # interleave: k = 2j, 2j + 1
    rk = tl.program_id(1) * (2 * BKH) + tl.arange(0, 2 * BKH)
    out_ok = (rn < N)[:, None] & (rk < 2 * KH)[None, :]
    tl.store(out_ptr + rn64[:, None] * stride_on + rk[None, :], w.to(out_ptr.dtype.element_ty), mask=out_ok)


def int4_supported(group_size: int) -> bool:
    """The dequantize kernel's group sizes: powers of two (blitzgen quantizes with 32, 64, 128)."""
    return group_size >= 2 and group_size & (group_size - 1) == 0


def int8_dequant(weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float weight [N, K] of an int8 weight [N, K] with per-row scales [N]."""
    N, K = weight.shape
    out = torch.empty(N, K, dtype=dtype, device=weight.device)
    weight, scales = weight.contiguous(), scales.reshape(N).contiguous()
    _int8_dequant_kernel[(triton.cdiv(N, _BN), triton.cdiv(K, _BK))](
        weight, scales, out, N, K, weight.stride(0), out.stride(0), BN=_BN, BK=_BK, num_warps=4)
    return out


def int4_dequant(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """The float weight [N, K] of an int4 weight in the canonical layout (see kernels.int4_gemv)."""
    N, KH = qweight.shape
    if not int4_supported(group_size) or (2 * KH) % group_size:
        raise ValueError(f"int4 dequantize: group size {group_size} must be a power of two dividing K={2 * KH}")
    out = torch.empty(N, 2 * KH, dtype=dtype, device=qweight.device)
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    bkh = max(_BK // 2, group_size // 2)  # bytes per tile: whole groups
    _int4_dequant_kernel[(triton.cdiv(N, _BN), triton.cdiv(KH, bkh))](
        qweight, scales, zeros, out, N, KH, qweight.stride(0), scales.stride(0), out.stride(0),
        GS=group_size, BN=_BN, BKH=bkh, num_warps=4)
    return out


def _slices(N: int, K: int, chunk_elems: int):
    step = max(_BN, chunk_elems // K // _BN * _BN)
    return [(n0, min(N, n0 + step)) for n0 in range(0, N, step)]


def _dequant_mm(x: torch.Tensor, N: int, K: int, dequant, chunk_elems: int) -> torch.Tensor:
    x2 = x.reshape(-1, K)
    parts = [F.linear(x2, dequant(n0, n1)) for n0, n1 in _slices(N, K, chunk_elems)]
    y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    return y.reshape(*x.shape[:-1], N)


def int8_dequant_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                    chunk_elems: int = CHUNK_ELEMS) -> torch.Tensor:
    """y = (x @ weight.T) * scales for any number of rows of x [..., K], through a float copy."""
    N, K = weight.shape
    s = scales.reshape(N)
    return _dequant_mm(x, N, K, lambda a, b: int8_dequant(weight[a:b], s[a:b], x.dtype), chunk_elems)


def int4_dequant_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int, chunk_elems: int = CHUNK_ELEMS) -> torch.Tensor:
    """y = x @ dequant(qweight).T for any number of rows of x [..., K], through a float copy."""
    N, K = qweight.shape[0], qweight.shape[1] * 2
    return _dequant_mm(x, N, K, lambda a, b: int4_dequant(qweight[a:b], scales[a:b], zeros[a:b], group_size, x.dtype),
                       chunk_elems)
