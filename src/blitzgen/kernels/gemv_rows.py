"""int8 weight-only GEMV for a few rows at once (2-8 tokens): speculative verify and short prefills.

Why: for more than one token the int8 layer used to dequantize its whole weight to bf16 and call
cuBLAS (``quant/int8.py``), which writes and reads the weight twice more than a GEMV: a K+1 = 4
token verify of the Llama-2-7B shape cost 6.2x a one-token step on an H200 (BENCHMARKS.md).
Here the one-token kernel's design (gemv.py: every lane along K, magic-number dequantization, fp32
accumulation) is kept, and each dequantized weight element is used for all MP rows from registers:
the accumulator is [MP, lanes, BLOCK_N], and per weight byte the cost is one shift + one LOP3 + MP
FFMAs instead of streaming the weight MP times. Rows past M are clamped on load and masked on store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import runtime
from . import INT8_ROWS_MAX as MAX_ROWS
from .gemv import (INT8_MAGIC, GemvConfig, _byte, _device_sms, _grid_and_split, _split_words, choose_config,
                   supported)


@triton.jit
def _split_row_words(xv, MP: tl.constexpr, L: tl.constexpr, WPT: tl.constexpr):
    """[MP, L, WPT, 4] activations -> WPT tensors [MP, L, 4] (for WPT 2 the last two are copies)."""
    xt = tl.permute(xv, (0, 1, 3, 2))  # [MP, L, 4, WPT]
    if WPT == 4:
        xt = tl.reshape(xt, [MP, L, 4, 2, 2])
        xa, xb = tl.split(xt)
        x0, x2 = tl.split(xa)
        x1, x3 = tl.split(xb)
    else:
        x0, x1 = tl.split(xt)
        x2 = x0
        x3 = x1
    return x0, x1, x2, x3


@triton.jit
def _int8_rows_word(acc, w, xw, magic, MP: tl.constexpr, L: tl.constexpr):
    """acc[m] += sum over the 4 bytes of w (int32 [L, BN]) of (192 + b / 2) * x[m]; xw [MP, L, 4]."""
    xr = tl.reshape(xw, [MP, L, 2, 2])  # byte = 2a + b
    xa, xb = tl.split(xr)
    x0, x2 = tl.split(xa)
    x1, x3 = tl.split(xb)
    acc += _byte(w, 0, magic)[None, :, :] * x0[:, :, None]
    acc += _byte(w, 1, magic)[None, :, :] * x1[:, :, None]
    acc += _byte(w, 2, magic)[None, :, :] * x2[:, :, None]
    acc += _byte(w, 3, magic)[None, :, :] * x3[:, :, None]
    return acc


@triton.jit
def _int8_rows_tile(acc, w_ptrs, x_ptrs, k0, K, rl, magic,
                    MP: tl.constexpr, L: tl.constexpr, BN: tl.constexpr, WPT: tl.constexpr,
                    MASKED: tl.constexpr):
    if MASKED:
        ok = (k0 + rl * (4 * WPT)) < K
        w = tl.load(w_ptrs + k0 // 4, mask=ok[:, None, None], other=0)
        xv = tl.load(x_ptrs + k0, mask=ok[None, :, None, None], other=0.0)
    else:
        w = tl.load(w_ptrs + k0 // 4)
        xv = tl.load(x_ptrs + k0)
    xv = tl.reshape(xv.to(tl.float32), [MP, L, WPT, 4])  # loaded as [MP, L, WPT // 2, 8]
    xs = tl.sum(tl.sum(xv, axis=3), axis=2)  # [MP, L]
    acc -= 192.0 * xs[:, :, None]
    w0, w1, w2, w3 = _split_words(w, L, BN, WPT)
    x0, x1, x2, x3 = _split_row_words(xv, MP, L, WPT)
    acc = _int8_rows_word(acc, w0, x0, magic, MP, L)
    acc = _int8_rows_word(acc, w1, x1, magic, MP, L)
    if WPT == 4:
        acc = _int8_rows_word(acc, w2, x2, magic, MP, L)
        acc = _int8_rows_word(acc, w3, x3, magic, MP, L)
    return acc


@triton.jit
def _int8_rows_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_ym, stride_wn,
                      tiles_per_split, magic,
                      MP: tl.constexpr, BN: tl.constexpr, L: tl.constexpr, WPT: tl.constexpr,
                      SPLIT_K: tl.constexpr, HAS_TAIL: tl.constexpr):
    """y[m, n] = s[n] * sum_k x[m, k] * w[n, k] for m < M <= MP; w_ptr: int32 view of int8 [N, K]."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    BK: tl.constexpr = 4 * WPT * L
    rn = pid_n * BN + tl.arange(0, BN)
    rnc = tl.minimum(rn, N - 1).to(tl.int64)
    rm = tl.arange(0, MP)
    rmc = tl.minimum(rm, M - 1).to(tl.int64)
    rl = tl.arange(0, L)
    rw = tl.arange(0, WPT)
    rh = tl.arange(0, WPT // 2)
    rj = tl.arange(0, 8)
    w_ptrs = w_ptr + rnc[None, :, None] * stride_wn + (WPT * rl)[:, None, None] + rw[None, None, :]
    x_ptrs = (x_ptr + rmc[:, None, None, None] * stride_xm + (4 * WPT * rl)[None, :, None, None]
              + (8 * rh)[None, None, :, None] + rj[None, None, None, :])
    acc = tl.zeros([MP, L, BN], dtype=tl.float32)
    n_full = K // BK
    t0 = pid_k * tiles_per_split
    t1 = t0 + tiles_per_split
    if t1 > n_full:
        t1 = n_full
    for t in range(t0, t1):
        acc = _int8_rows_tile(acc, w_ptrs, x_ptrs, t * BK, K, rl, magic, MP, L, BN, WPT, False)
    if HAS_TAIL:
        if (t0 <= n_full) & (t0 + tiles_per_split > n_full):
            acc = _int8_rows_tile(acc, w_ptrs, x_ptrs, n_full * BK, K, rl, magic, MP, L, BN, WPT, True)
    s = tl.load(s_ptr + rnc).to(tl.float32)
    y = tl.sum(acc, axis=1) * (2.0 * s)[None, :]  # [MP, BN]
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    ok = (rm < M)[:, None] & (rn < N)[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=ok)
    else:
        tl.atomic_add(y_ptrs, y, mask=ok, sem="relaxed")


def padded_rows(m: int) -> int:
    return max(2, triton.next_power_of_2(m))


def choose_rows_config(N: int, K: int, m: int, num_sms: int) -> GemvConfig:
    """The one-token heuristic's grid (warps along K, split-K) with at most 4 rows per program and
    8-byte words from 4 rows up (keeps the [MP, WPT, 4] fp32 activations in registers)."""
    base = choose_config("int8", N, K, None, num_sms)
    mp = padded_rows(m)
    wpt = 2 if mp >= 4 or K % 16 else 4
    return base._replace(block_n=min(base.block_n, 4 if mp <= 4 else 2), wpt=wpt, num_stages=1)


def int8_rows_raw(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                  cfg: GemvConfig | None = None) -> torch.Tensor:
    """y = (x @ weight.T) * scales for x [..., K] holding 1..MAX_ROWS rows (launched directly: also
    under TRITON_INTERPRET=1). Shapes the kernel does not take (K % 8) use plain PyTorch."""
    N, K = weight.shape
    x2 = x.reshape(-1, K).contiguous()
    m = x2.shape[0]
    if not 1 <= m <= MAX_ROWS or x.shape[-1] != K:
        raise ValueError(f"int8 row GEMV takes 1..{MAX_ROWS} rows of K={K}: got x of shape {tuple(x.shape)}")
    out_shape = (*x.shape[:-1], N)
    cfg = cfg or choose_rows_config(N, K, m, _device_sms(x))
    scales = scales.reshape(N).contiguous()
    if not supported("int8", K, None, cfg):
        y = (x2.to(torch.float32) @ weight.to(torch.float32).t()) * scales.to(torch.float32)
        return y.to(x.dtype).reshape(out_shape)
    w32 = weight.contiguous().view(torch.int32)
    grid, tps, split_k, has_tail = _grid_and_split("int8", N, K, cfg)
    if split_k == 1:
        y = torch.empty(m, N, dtype=x.dtype, device=x.device)
    else:
        y = torch.zeros(m, N, dtype=torch.float32, device=x.device)
    _int8_rows_kernel[grid](
        x2, w32, scales, y, m, N, K, x2.stride(0), y.stride(0), w32.stride(0), tps, INT8_MAGIC,
        MP=padded_rows(m), BN=cfg.block_n, L=32 * cfg.num_warps, WPT=cfg.wpt, SPLIT_K=split_k,
        HAS_TAIL=has_tail, num_warps=cfg.num_warps)
    return (y if split_k == 1 else y.to(x.dtype)).reshape(out_shape)


def _register_op():
    if runtime.triton_interpret():
        return None  # the interpreter runs the raw launcher
    from .ops import opaque_op

    def int8_gemv_rows_op(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return int8_rows_raw(x, weight, scales)

    def fake(x, weight, scales):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    return opaque_op("blitzgen::int8_gemv_rows", int8_gemv_rows_op, fake)


_op = _register_op()


def int8_gemv_rows(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """y = (x @ weight.T) * scales for x [..., K] holding 1..MAX_ROWS rows."""
    if _op is None:
        return int8_rows_raw(x, weight, scales)
    return torch.ops.blitzgen.int8_gemv_rows(x, weight, scales)
