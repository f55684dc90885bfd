"""A Triton GEMV for one token against an unquantized (bf16 / fp16 / fp32) weight: y = x @ W.T.

**Status: opt-in and untimed.** Nothing calls it by default: decode keeps cuBLAS / Inductor
until this kernel is measured against them on the GPU (benchmarks/kernels_gpu.py). It exists as the
base for fusing work into the matrix-vector products of bf16 decode (an RMSNorm applied to x as it
is loaded, a residual add in the epilogue), which cuBLAS cannot take.

Design: one program = BLOCK_N rows x a range of K; the tile is [BLOCK_N, BLOCK_K] with K
contiguous, so each thread issues 16-byte loads along K (Triton's blocked layout puts 8 bf16 per
thread). Products accumulate in float32 per element of the tile and are reduced across K once, at
the end. Split-K (grid dim 1) adds fp32 atomics into a zeroed buffer, as in gemv.py. A K tail is
one masked tile.

    y = gemv_float.float_gemv(x, weight)   # x [..., K] with one row; y [..., N] in x's dtype
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import runtime
from .gemv import _device_sms


class FloatGemvConfig(NamedTuple):
    block_n: int  # rows per program
    num_warps: int
    block_k: int  # K elements per tile (a multiple of 8 * 32 * num_warps for 16-byte loads)
    split_k: int = 1


@triton.jit
def _float_gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_wn, tiles_per_split,
                       BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, HAS_TAIL: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    rnc = tl.minimum(rn, N - 1).to(tl.int64)  # clamp: loads stay in bounds, stores are masked
    rk = tl.arange(0, BK)
    w_ptrs = w_ptr + rnc[:, None] * stride_wn + rk[None, :]
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    n_full = K // BK
    t0 = pid_k * tiles_per_split
    t1 = t0 + tiles_per_split
    if t1 > n_full:
        t1 = n_full
    for t in range(t0, t1):
        w = tl.load(w_ptrs + t * BK)
        x = tl.load(x_ptr + t * BK + rk)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    if HAS_TAIL:
        if (t0 <= n_full) & (t0 + tiles_per_split > n_full):
            ok = n_full * BK + rk < K
            w = tl.load(w_ptrs + n_full * BK, mask=ok[None, :], other=0.0)
            x = tl.load(x_ptr + n_full * BK + rk, mask=ok, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)  # [BN]
    if SPLIT_K == 1:
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)
    else:
        tl.atomic_add(y_ptr + rn, y, mask=rn < N, sem="relaxed")


def choose_config(N: int, K: int, num_sms: int = 132) -> FloatGemvConfig:
    """A first guess (not measured): 4 rows x 4 warps, tiles of 1024 (K >= 1024) so each thread
    makes one 16-byte load per row and tile; split-K only while the grid has < 8 warps per SM."""
    nw = 4
    bk = 1024 if K >= 1024 else max(64, triton.next_power_of_2(K))
    block_n = 4
    blocks, tiles = -(-N // block_n), -(-K // bk)
    split_k = 1
    while blocks * nw * split_k < 8 * num_sms and split_k * 2 <= tiles:
        split_k *= 2
    return FloatGemvConfig(block_n, nw, bk, split_k)


def _identity(kernel):
    return kernel


def _impl(x: torch.Tensor, weight: torch.Tensor, launch, cfg: FloatGemvConfig | None = None,
          out: torch.Tensor | None = None) -> torch.Tensor:
    N, K = weight.shape
    if x.shape[-1] != K or x.numel() != K:
        raise ValueError(f"GEMV kernels take one token: x of shape {tuple(x.shape)}, K={K}")
    out_shape = (*x.shape[:-1], N)
    x1 = x.reshape(K).contiguous()
    weight = weight.contiguous()
    cfg = cfg or choose_config(N, K, _device_sms(x1))
    tiles = -(-K // cfg.block_k)
    tps = -(-tiles // max(1, cfg.split_k))
    split_k = -(-tiles // tps)
    if split_k == 1:
        y = out if out is not None else torch.empty(N, dtype=x1.dtype, device=x1.device)
    else:
        y = torch.zeros(N, dtype=torch.float32, device=x1.device)
    launch(_float_gemv_kernel)[(triton.cdiv(N, cfg.block_n), split_k)](
        x1, weight, y, N, K, weight.stride(0), tps,
        BN=cfg.block_n, BK=cfg.block_k, SPLIT_K=split_k, HAS_TAIL=K % cfg.block_k != 0,
        num_warps=cfg.num_warps)
    return (y if split_k == 1 else y.to(x1.dtype)).reshape(out_shape)


def float_gemv_raw(x, weight, cfg: FloatGemvConfig | None = None, out=None) -> torch.Tensor:
    """Launch directly (no torch.library; works on CPU tensors under TRITON_INTERPRET=1). ``out``
    ([N], x's dtype) receives the result when split_k == 1 (tests poison it)."""
    return _impl(x, weight, _identity, cfg, out)


def _register_op():
    if runtime.triton_interpret():
        return None  # the interpreter runs the raw launcher
    from .ops import linear_fake, opaque_op

    def float_gemv_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return _impl(x, weight, _identity)

    return opaque_op("blitzgen::float_gemv", float_gemv_op, linear_fake)


_op = _register_op()


def float_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y = x @ weight.T for one token (x [..., K] with one row), float32 accumulation."""
    if _op is None:
        return float_gemv_raw(x, weight)
    return torch.ops.blitzgen.float_gemv(x, weight)
