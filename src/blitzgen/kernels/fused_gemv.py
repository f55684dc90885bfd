"""Fused decode GEMVs: one kernel for "RMSNorm -> matrix-vector product -> SwiGLU or residual add".

Why: at batch 1 with int4 weights a token's weights stream in ~0.9 ms on an H200 but a decode step
took ~2.65 ms; the rest is per-kernel fixed cost (~10 kernels per layer inside the CUDA graph). A
Llama block is, unfused: add+norm, wqkv, RoPE/cache, attention, wo, add+norm, w13, silu*up, w2.
With these ops it is: wqkv(norm), RoPE/cache, attention, wo(+x), w13(norm, SwiGLU), w2(+h): the
two add+norm kernels and the silu*up kernel (3 per layer, 96 per 7B token) are gone.

What each flag does (all compile-time constants of the kernel, so the plain GEMV is unchanged):

* ``norm_weight`` (RMSNorm prologue): the activation is ``x * norm_weight``; ``rstd =
  1 / sqrt(mean(x^2) + eps)`` is a scalar, so it is factored out of the sum and applied once per
  output (``y = rstd * W (x * g)``). Each program accumulates ``sum(x^2)`` from the x values it
  loads anyway (no extra pass); with split-K a program sees only part of K, so it first reads the
  whole x once (8 KB from L2) for the norm.
* ``swiglu`` (epilogue, for w13 = [gate; up] of 2I rows): a program takes BN/2 gate rows and the
  matching BN/2 up rows (rows j and j + I, interleaved in the tile; no change of the weight
  layout), reduces them and writes silu(gate) * up: I outputs. silu runs once per output, not once
  per program (a SwiGLU prologue on w2 would recompute silu over all 11008 inputs in each of its
  ~1000 programs). With split-K the 2I partial sums go through the fp32 buffer and the SwiGLU is
  a torch op after (correct, one kernel more; never picked at 7B shapes).
* ``residual`` (epilogue): ``y += residual`` in fp32 before the one rounding to x's dtype (split-K:
  the fp32 buffer starts as the residual instead of zeros).

Precision: float32 throughout, one rounding at the end. The unfused model rounds to bf16 after the
norm, after silu, after the product and after the add; the difference is within bf16 rounding.

Kernels: the int8 / int4 ones are gemv.py's (same tiles, magic-number dequantization, configs
from ``gemv.choose_config`` for the weight's shape) with the flags added; the float one is
gemv_float.py's. Ops: ``torch.ops.blitzgen.fused_{int8,int4,float}_gemv`` (opaque custom ops, as
gemv.py). Raw launchers (``*_raw``) run without torch.library, e.g. under TRITON_INTERPRET=1. The
plain-PyTorch meaning is ``reference.fused_*_gemv_ref``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import runtime
from . import gemv as _g
from .gemv import INT4_MAGIC, INT8_MAGIC, GemvConfig, _int4_word, _int8_word, _split_words, _split_xwords
from .gemv_float import FloatGemvConfig
from .gemv_float import choose_config as _float_config

# ---------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------


@triton.jit
def _rows(pid_n, N, HALF, BN: tl.constexpr, SWIGLU: tl.constexpr):
    """Weight rows of this program ([BN], clamped in bounds) and whether each is real. SWIGLU:
    row j of the tile is gate row o (j even) or up row o + HALF (j odd), o = pid * BN / 2 + j // 2."""
    j = tl.arange(0, BN)
    if SWIGLU:
        o = pid_n * (BN // 2) + j // 2
        ok = o < HALF
        rn = tl.minimum(o, HALF - 1) + (j % 2) * HALF
    else:
        rn = pid_n * BN + j
        ok = rn < N
        rn = tl.minimum(rn, N - 1)
    return rn.to(tl.int64), ok


@triton.jit
def _epilogue(y, rn, ok, pid_n, y_ptr, r_ptr, HALF,
              BN: tl.constexpr, SPLIT_K: tl.constexpr, RES: tl.constexpr, SWIGLU: tl.constexpr):
    """y: [BN] fp32 sums of the weight rows rn. Store (or atomically add, split-K) the result."""
    if SPLIT_K > 1:
        tl.atomic_add(y_ptr + rn, y, mask=ok, sem="relaxed")  # fp32 buffer [N]; SwiGLU after
    elif SWIGLU:
        gate, up = tl.split(tl.reshape(y, [BN // 2, 2]))
        act = gate / (1.0 + tl.exp(-gate)) * up
        o = pid_n * (BN // 2) + tl.arange(0, BN // 2)
        tl.store(y_ptr + o, act.to(y_ptr.dtype.element_ty), mask=o < HALF)
    else:
        if RES:
            y += tl.load(r_ptr + rn).to(tl.float32)
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _sumsq_all(x_ptrs, K, BK: tl.constexpr, offs):
    """sum(x^2) over all of x (split-K norm): x_ptrs/offs shaped like the kernel's activation tile."""
    ss = tl.zeros(offs.shape, dtype=tl.float32)
    for t in range(0, tl.cdiv(K, BK)):
        xv = tl.load(x_ptrs + t * BK, mask=(t * BK + offs) < K, other=0.0).to(tl.float32)
        ss += xv * xv
    return tl.sum(ss)


# ---------------------------------------------------------------------------------------------
# int4
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fused_int4_tile(acc, ss, w_ptrs, x_ptrs, g_ptrs, s_ptrs, z_ptrs, k0, K, rl, magic,
                     L: tl.constexpr, BN: tl.constexpr, WPT: tl.constexpr, GS: tl.constexpr,
                     MASKED: tl.constexpr, NORM: tl.constexpr):
    if MASKED:
        ok = (k0 + rl * (8 * WPT)) < K
        w = tl.load(w_ptrs + k0 // 8, mask=ok[:, None, None], other=0)
        s = tl.load(s_ptrs + k0 // GS, mask=ok[:, None], other=0.0)
        z = tl.load(z_ptrs + k0 // GS, mask=ok[:, None], other=0.0)
        xv = tl.load(x_ptrs + k0, mask=ok[:, None, None], other=0.0).to(tl.float32)
        if NORM:
            gv = tl.load(g_ptrs + k0, mask=ok[:, None, None], other=0.0).to(tl.float32)
    else:
        w = tl.load(w_ptrs + k0 // 8)
        s = tl.load(s_ptrs + k0 // GS)
        z = tl.load(z_ptrs + k0 // GS)
        xv = tl.load(x_ptrs + k0).to(tl.float32)
        if NORM:
            gv = tl.load(g_ptrs + k0).to(tl.float32)
    if NORM:
        ss += tl.sum(tl.sum(xv * xv, axis=2), axis=1)
        xv = xv * gv
    xs = tl.sum(tl.sum(xv, axis=2), axis=1)
    p = tl.broadcast_to((-136.0 * xs)[:, None], [L, BN])
    w0, w1, w2, w3 = _split_words(w, L, BN, WPT)
    x0, x1, x2, x3 = _split_xwords(xv, L, 8, WPT)
    p = _int4_word(p, w0, x0, magic, L)
    p = _int4_word(p, w1, x1, magic, L)
    if WPT == 4:
        p = _int4_word(p, w2, x2, magic, L)
        p = _int4_word(p, w3, x3, magic, L)
    acc += s.to(tl.float32) * p + z.to(tl.float32) * xs[:, None]
    return acc, ss


@triton.jit
def _fused_int4_kernel(x_ptr, g_ptr, r_ptr, w_ptr, s_ptr, z_ptr, y_ptr, N, HALF, K, stride_wn,
                       stride_sn, tiles_per_split, magic, eps,
                       BN: tl.constexpr, L: tl.constexpr, WPT: tl.constexpr, GS: tl.constexpr,
                       SPLIT_K: tl.constexpr, HAS_TAIL: tl.constexpr, NORM: tl.constexpr,
                       RES: tl.constexpr, SWIGLU: tl.constexpr):
    """gemv._int4_gemv_kernel with the RMSNorm prologue / SwiGLU / residual epilogue flags."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    BK: tl.constexpr = 8 * WPT * L
    rn, ok = _rows(pid_n, N, HALF, BN, SWIGLU)
    rl = tl.arange(0, L)
    rw = tl.arange(0, WPT)
    ri = tl.arange(0, 8)
    w_ptrs = w_ptr + rn[None, :, None] * stride_wn + (WPT * rl)[:, None, None] + rw[None, None, :]
    xo = (8 * WPT * rl)[:, None, None] + (8 * rw)[None, :, None] + ri[None, None, :]
    x_ptrs = x_ptr + xo
    g_ptrs = g_ptr + xo
    lg = (rl * (8 * WPT)) // GS
    s_off = rn[None, :] * stride_sn + lg[:, None]
    acc = tl.zeros([L, BN], dtype=tl.float32)
    ss = tl.zeros([L], dtype=tl.float32)
    n_full = K // BK
    t0 = pid_k * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_full)
    for t in tl.range(t0, t1, num_stages=1):  # as gemv.py (cp.async pipelining lost there)
        acc, ss = _fused_int4_tile(acc, ss, w_ptrs, x_ptrs, g_ptrs, s_ptr + s_off, z_ptr + s_off,
                                   t * BK, K, rl, magic, L, BN, WPT, GS, False, NORM)
    if HAS_TAIL:
        if (t0 <= n_full) & (t0 + tiles_per_split > n_full):
            acc, ss = _fused_int4_tile(acc, ss, w_ptrs, x_ptrs, g_ptrs, s_ptr + s_off, z_ptr + s_off,
                                       n_full * BK, K, rl, magic, L, BN, WPT, GS, True, NORM)
    y = tl.sum(acc, axis=0)
    if NORM:
        if SPLIT_K > 1:
            sq = _sumsq_all(x_ptrs, K, BK, xo)
        else:
            sq = tl.sum(ss)
        y = y * (1.0 / tl.sqrt(sq / K + eps))
    _epilogue(y, rn, ok, pid_n, y_ptr, r_ptr, HALF, BN, SPLIT_K, RES, SWIGLU)


# ---------------------------------------------------------------------------------------------
# int8
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fused_int8_tile(acc, ss, w_ptrs, x_ptrs, g_ptrs, k0, K, rl, magic,
                     L: tl.constexpr, BN: tl.constexpr, WPT: tl.constexpr, MASKED: tl.constexpr,
                     NORM: tl.constexpr):
    if MASKED:
        ok = (k0 + rl * (4 * WPT)) < K
        w = tl.load(w_ptrs + k0 // 4, mask=ok[:, None, None], other=0)
        xv = tl.load(x_ptrs + k0, mask=ok[:, None, None], other=0.0).to(tl.float32)
        if NORM:
            gv = tl.load(g_ptrs + k0, mask=ok[:, None, None], other=0.0).to(tl.float32)
    else:
        w = tl.load(w_ptrs + k0 // 4)
        xv = tl.load(x_ptrs + k0).to(tl.float32)
        if NORM:
            gv = tl.load(g_ptrs + k0).to(tl.float32)
    if NORM:
        ss += tl.sum(tl.sum(xv * xv, axis=2), axis=1)
        xv = xv * gv
    xv = tl.reshape(xv, [L, WPT, 4])
    xs = tl.sum(tl.sum(xv, axis=2), axis=1)
    acc -= 192.0 * xs[:, None]
    w0, w1, w2, w3 = _split_words(w, L, BN, WPT)
    x0, x1, x2, x3 = _split_xwords(xv, L, 4, WPT)
    acc = _int8_word(acc, w0, x0, magic, L)
    acc = _int8_word(acc, w1, x1, magic, L)
    if WPT == 4:
        acc = _int8_word(acc, w2, x2, magic, L)
        acc = _int8_word(acc, w3, x3, magic, L)
    return acc, ss


@triton.jit
def _fused_int8_kernel(x_ptr, g_ptr, r_ptr, w_ptr, s_ptr, y_ptr, N, HALF, K, stride_wn,
                       tiles_per_split, magic, eps,
                       BN: tl.constexpr, L: tl.constexpr, WPT: tl.constexpr, SPLIT_K: tl.constexpr,
                       HAS_TAIL: tl.constexpr, NORM: tl.constexpr, RES: tl.constexpr,
                       SWIGLU: tl.constexpr):
    """gemv._int8_gemv_kernel with the RMSNorm prologue / SwiGLU / residual epilogue flags."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    BK: tl.constexpr = 4 * WPT * L
    rn, ok = _rows(pid_n, N, HALF, BN, SWIGLU)
    rl = tl.arange(0, L)
    rw = tl.arange(0, WPT)
    rh = tl.arange(0, WPT // 2)
    rj = tl.arange(0, 8)
    w_ptrs = w_ptr + rn[None, :, None] * stride_wn + (WPT * rl)[:, None, None] + rw[None, None, :]
    xo = (4 * WPT * rl)[:, None, None] + (8 * rh)[None, :, None] + rj[None, None, :]
    acc = tl.zeros([L, BN], dtype=tl.float32)
    ss = tl.zeros([L], dtype=tl.float32)
    n_full = K // BK
    t0 = pid_k * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_full)
    for t in tl.range(t0, t1, num_stages=1):  # as gemv.py (cp.async pipelining lost there)
        acc, ss = _fused_int8_tile(acc, ss, w_ptrs, x_ptr + xo, g_ptr + xo, t * BK, K, rl, magic,
                                   L, BN, WPT, False, NORM)
    if HAS_TAIL:
        if (t0 <= n_full) & (t0 + tiles_per_split > n_full):
            acc, ss = _fused_int8_tile(acc, ss, w_ptrs, x_ptr + xo, g_ptr + xo, n_full * BK, K, rl,
                                       magic, L, BN, WPT, True, NORM)
    s = tl.load(s_ptr + rn).to(tl.float32)
    y = tl.sum(acc, axis=0) * (2.0 * s)
    if NORM:
        if SPLIT_K > 1:
            sq = _sumsq_all(x_ptr + xo, K, BK, xo)
        else:
            sq = tl.sum(ss)
        y = y * (1.0 / tl.sqrt(sq / K + eps))
    _epilogue(y, rn, ok, pid_n, y_ptr, r_ptr, HALF, BN, SPLIT_K, RES, SWIGLU)


# ---------------------------------------------------------------------------------------------
# float (bf16 / fp16 / fp32 weights)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fused_float_kernel(x_ptr, g_ptr, r_ptr, w_ptr, y_ptr, N, HALF, K, stride_wn, tiles_per_split, eps,
                        BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
                        HAS_TAIL: tl.constexpr, NORM: tl.constexpr, RES: tl.constexpr,
                        SWIGLU: tl.constexpr):
    """gemv_float._float_gemv_kernel with the RMSNorm prologue / SwiGLU / residual flags."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn, ok = _rows(pid_n, N, HALF, BN, SWIGLU)
    rk = tl.arange(0, BK)
    w_ptrs = w_ptr + rn[:, None] * stride_wn + rk[None, :]
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    ssv = tl.zeros([BK], dtype=tl.float32)
    n_full = K // BK
    t0 = pid_k * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_full)
    for t in range(t0, t1):
        w = tl.load(w_ptrs + t * BK)
        x = tl.load(x_ptr + t * BK + rk).to(tl.float32)
        if NORM:
            ssv += x * x
            x = x * tl.load(g_ptr + t * BK + rk).to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
    if HAS_TAIL:
        if (t0 <= n_full) & (t0 + tiles_per_split > n_full):
            kk = n_full * BK + rk
            w = tl.load(w_ptrs + n_full * BK, mask=(kk < K)[None, :], other=0.0)
            x = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
            if NORM:
                ssv += x * x
                x = x * tl.load(g_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
            acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if NORM:
        if SPLIT_K > 1:
            sq = _sumsq_all(x_ptr + rk, K, BK, rk)
        else:
            sq = tl.sum(ssv)
        y = y * (1.0 / tl.sqrt(sq / K + eps))
    _epilogue(y, rn, ok, pid_n, y_ptr, r_ptr, HALF, BN, SPLIT_K, RES, SWIGLU)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------


def _identity(kernel):
    return kernel


def _prep(x, N, K, norm_weight, residual, swiglu):
    """Flatten and check the inputs; the output's shape; dummy pointers for absent tensors."""
    if x.shape[-1] != K or x.numel() != K:
        raise ValueError(f"fused GEMV takes one token: x of shape {tuple(x.shape)}, K={K}")
    if swiglu and (N % 2 or residual is not None):
        raise ValueError("swiglu needs an even number of weight rows and no residual")
    n_out = N // 2 if swiglu else N
    x1 = x.reshape(K).contiguous()
    g = norm_weight.reshape(K).contiguous() if norm_weight is not None else x1
    r = residual.reshape(n_out).contiguous() if residual is not None else x1
    return x1, g, r, n_out, (*x.shape[:-1], n_out)


def _grid(N, swiglu, block_n, tiles, split_k):
    tps = -(-tiles // max(1, split_k))
    split_k = -(-tiles // tps)
    blocks = triton.cdiv(N // 2, block_n // 2) if swiglu else triton.cdiv(N, block_n)
    return (blocks, split_k), tps, split_k


def _out(x1, N, n_out, residual, r, split_k, out):
    if split_k == 1:
        return out if out is not None else torch.empty(n_out, dtype=x1.dtype, device=x1.device)
    if residual is not None:
        return r.to(torch.float32).clone()
    return torch.zeros(N, dtype=torch.float32, device=x1.device)


def _finish(y, split_k, swiglu, dtype, shape):
    if split_k > 1:
        if swiglu:
            gate, up = y.chunk(2)
            y = torch.nn.functional.silu(gate) * up
        y = y.to(dtype)
    return y.reshape(shape)


def _even(cfg):
    return cfg if cfg.block_n % 2 == 0 else cfg._replace(block_n=2 * cfg.block_n)


_CONFIGS: dict[tuple, object] = {}  # (kind, N, K, group, sms) -> config (eager decode asks every call)


def _config(kind, N, K, g, x1, swiglu):
    sms = _g._device_sms(x1)
    key = (kind, N, K, g, sms, swiglu)
    cfg = _CONFIGS.get(key)
    if cfg is None:
        cfg = (_float_config(N, K, sms) if kind == "float"  # the fused int4 kernel is gemv.py's fp32 one
               else _g.choose_config(kind, N, K, g, sms, kernel="fp32" if kind == "int4" else None))
        _CONFIGS[key] = cfg = _even(cfg) if swiglu else cfg
    return cfg


def _int4_impl(x, qweight, scales, zeros, group_size, norm_weight, eps, residual, swiglu, launch,
               cfg: GemvConfig | None = None, out=None):
    N, K = qweight.shape[0], qweight.shape[1] * 2
    x1, g, r, n_out, shape = _prep(x, N, K, norm_weight, residual, swiglu)
    cfg = cfg or _config("int4", N, K, group_size, x1, swiglu)
    if swiglu:
        cfg = _even(cfg)
    if not _g.supported("int4", K, group_size, cfg):
        _g._report_unsupported("fused int4", N, K, group_size)
        from .reference import fused_int4_gemv_ref

        return fused_int4_gemv_ref(x, qweight, scales, zeros, group_size, norm_weight, eps, residual, swiglu)
    w32 = qweight.contiguous().view(torch.int32)
    scales, zeros = scales.contiguous(), zeros.contiguous()
    bk = _g.tile_k("int4", cfg)
    grid, tps, split_k = _grid(N, swiglu, cfg.block_n, -(-K // bk), cfg.split_k)
    y = _out(x1, N, n_out, residual, r, split_k, out)
    launch(_fused_int4_kernel)[grid](
        x1, g, r, w32, scales, zeros, y, N, N // 2, K, w32.stride(0), scales.stride(0), tps, INT4_MAGIC,
        float(eps), BN=cfg.block_n, L=32 * cfg.num_warps, WPT=cfg.wpt, GS=group_size, SPLIT_K=split_k,
        HAS_TAIL=K % bk != 0, NORM=norm_weight is not None, RES=residual is not None, SWIGLU=swiglu,
        num_warps=cfg.num_warps)
    return _finish(y, split_k, swiglu, x1.dtype, shape)


def _int8_impl(x, weight, scales, norm_weight, eps, residual, swiglu, launch,
               cfg: GemvConfig | None = None, out=None):
    N, K = weight.shape
    x1, g, r, n_out, shape = _prep(x, N, K, norm_weight, residual, swiglu)
    cfg = cfg or _config("int8", N, K, None, x1, swiglu)
    if swiglu:
        cfg = _even(cfg)
    if not _g.supported("int8", K, None, cfg):
        _g._report_unsupported("fused int8", N, K, None)
        from .reference import fused_int8_gemv_ref

        return fused_int8_gemv_ref(x, weight, scales, norm_weight, eps, residual, swiglu)
    w32 = weight.contiguous().view(torch.int32)
    scales = scales.reshape(N).contiguous()
    bk = _g.tile_k("int8", cfg)
    grid, tps, split_k = _grid(N, swiglu, cfg.block_n, -(-K // bk), cfg.split_k)
    y = _out(x1, N, n_out, residual, r, split_k, out)
    launch(_fused_int8_kernel)[grid](
        x1, g, r, w32, scales, y, N, N // 2, K, w32.stride(0), tps, INT8_MAGIC, float(eps),
        BN=cfg.block_n, L=32 * cfg.num_warps, WPT=cfg.wpt, SPLIT_K=split_k, HAS_TAIL=K % bk != 0,
        NORM=norm_weight is not None, RES=residual is not None, SWIGLU=swiglu, num_warps=cfg.num_warps)
    return _finish(y, split_k, swiglu, x1.dtype, shape)


def _float_impl(x, weight, norm_weight, eps, residual, swiglu, launch,
                cfg: FloatGemvConfig | None = None, out=None):
    N, K = weight.shape
    x1, g, r, n_out, shape = _prep(x, N, K, norm_weight, residual, swiglu)
    cfg = cfg or _config("float", N, K, None, x1, swiglu)
    if swiglu:
        cfg = _even(cfg)
    weight = weight.contiguous()
    grid, tps, split_k = _grid(N, swiglu, cfg.block_n, -(-K // cfg.block_k), cfg.split_k)
    y = _out(x1, N, n_out, residual, r, split_k, out)
    launch(_fused_float_kernel)[grid](
        x1, g, r, weight, y, N, N // 2, K, weight.stride(0), tps, float(eps),
        BN=cfg.block_n, BK=cfg.block_k, SPLIT_K=split_k, HAS_TAIL=K % cfg.block_k != 0,
        NORM=norm_weight is not None, RES=residual is not None, SWIGLU=swiglu, num_warps=cfg.num_warps)
    return _finish(y, split_k, swiglu, x1.dtype, shape)


def fused_int4_gemv_raw(x, qweight, scales, zeros, group_size, norm_weight=None, eps=1e-5, residual=None,
                        swiglu=False, cfg=None, out=None):
    """Launch directly (no torch.library; works on CPU tensors under TRITON_INTERPRET=1). ``out``
    receives the result when the config has split_k == 1 (tests poison it)."""
    return _int4_impl(x, qweight, scales, zeros, group_size, norm_weight, eps, residual, swiglu,
                      _identity, cfg, out)


def fused_int8_gemv_raw(x, weight, scales, norm_weight=None, eps=1e-5, residual=None, swiglu=False,
                        cfg=None, out=None):
    return _int8_impl(x, weight, scales, norm_weight, eps, residual, swiglu, _identity, cfg, out)


def fused_float_gemv_raw(x, weight, norm_weight=None, eps=1e-5, residual=None, swiglu=False, cfg=None,
                         out=None):
    return _float_impl(x, weight, norm_weight, eps, residual, swiglu, _identity, cfg, out)


# ---------------------------------------------------------------------------------------------
# torch.library custom ops
# ---------------------------------------------------------------------------------------------


def _fake(x, weight_rows: int, swiglu: bool):
    return x.new_empty((*x.shape[:-1], weight_rows // 2 if swiglu else weight_rows))


def _register_ops():
    if runtime.triton_interpret():
        return None  # the interpreter runs the raw launchers
    from .ops import opaque_op

    def fused_int4_gemv_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                           group_size: int, norm_weight: Optional[torch.Tensor], eps: float,
                           residual: Optional[torch.Tensor], swiglu: bool) -> torch.Tensor:
        return _int4_impl(x, qweight, scales, zeros, group_size, norm_weight, eps, residual, swiglu,
                          _identity)

    def fused_int8_gemv_op(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                           norm_weight: Optional[torch.Tensor], eps: float, residual: Optional[torch.Tensor],
                           swiglu: bool) -> torch.Tensor:
        return _int8_impl(x, weight, scales, norm_weight, eps, residual, swiglu, _identity)

    def fused_float_gemv_op(x: torch.Tensor, weight: torch.Tensor, norm_weight: Optional[torch.Tensor],
                            eps: float, residual: Optional[torch.Tensor], swiglu: bool) -> torch.Tensor:
        return _float_impl(x, weight, norm_weight, eps, residual, swiglu, _identity)

    opaque_op("blitzgen::fused_int4_gemv", fused_int4_gemv_op,
              lambda x, qweight, *a: _fake(x, qweight.shape[0], a[-1]))
    opaque_op("blitzgen::fused_int8_gemv", fused_int8_gemv_op, lambda x, weight, *a: _fake(x, weight.shape[0], a[-1]))
    opaque_op("blitzgen::fused_float_gemv", fused_float_gemv_op, lambda x, weight, *a: _fake(x, weight.shape[0], a[-1]))
    return True


_REGISTERED = _register_ops()


def fused_int4_gemv(x, qweight, scales, zeros, group_size: int, norm_weight=None, eps: float = 1e-5,
                    residual=None, swiglu: bool = False) -> torch.Tensor:
    if _REGISTERED is None:
        return fused_int4_gemv_raw(x, qweight, scales, zeros, group_size, norm_weight, eps, residual, swiglu)
    return torch.ops.blitzgen.fused_int4_gemv(x, qweight, scales, zeros, int(group_size), norm_weight,
                                              float(eps), residual, bool(swiglu))


def fused_int8_gemv(x, weight, scales, norm_weight=None, eps: float = 1e-5, residual=None,
                    swiglu: bool = False) -> torch.Tensor:
    if _REGISTERED is None:
        return fused_int8_gemv_raw(x, weight, scales, norm_weight, eps, residual, swiglu)
    return torch.ops.blitzgen.fused_int8_gemv(x, weight, scales, norm_weight, float(eps), residual, bool(swiglu))


def fused_float_gemv(x, weight, norm_weight=None, eps: float = 1e-5, residual=None,
                     swiglu: bool = False) -> torch.Tensor:
    if _REGISTERED is None:
        return fused_float_gemv_raw(x, weight, norm_weight, eps, residual, swiglu)
    return torch.ops.blitzgen.fused_float_gemv(x, weight, norm_weight, float(eps), residual, bool(swiglu))
