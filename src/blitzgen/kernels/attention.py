"""Split-K ("flash-decoding") attention for one query token over a static KV cache, in Triton.

Why: for one token, SDPA's fused kernels run one thread block per (batch, head), so a model with 8
KV heads puts 8 blocks on a 132-SM H100. benchmarks/attention_gpu.py measured 6% of the copy
bandwidth at 4256 positions, and 27% for blitzgen's split-in-4 matmuls. This kernel cuts the
cache into slices: one program per (KV head, slice). Each program attends the G query heads that
share its KV head to its slice, with an online softmax, and writes a partial output with its
running max and sum. One small kernel then merges the slices (the log-sum-exp trick; none for a
single slice; ``merge="torch"``: a few torch ops instead). Every cache entry is read once,
and only where the mask is set (masked loads fetch nothing), except with ``pos_loads``, which reads
every row up to the position so that the mask, K and V loads do not wait on each other.

    out = decode_attention(q, k, v, mask, pos)   # q [B, Hkv, G, D], k/v [B, Hkv, S, D], mask [1, 1, 1, S] bool

Given the query's position ``pos`` (a device tensor, read at run time, so CUDA graphs keep
working), no slice visits a key past it: the keys read are the filled ones, though the number of
slices and their merge still follow the static cache length (BENCHMARKS.md: a Llama-3-8B layer
stack at 200 filled of 8192 took 427 us against 241 us at a 205-position cache).

**Status:** the default one-token attention for grouped heads on CUDA (attention.decode_attention,
"auto"; measured with benchmarks/attention_gpu.py). Tested against float64 under Triton's
interpreter (tests/test_attention_kernel.py) and on the GPU (tests/gpu). The slice length is a
compile-time constant that follows the cache length: the compiled decode graph sees one static
cache length, but eager decode over a growing ``kv_len`` compiles a new variant each time the
slice length changes (about every thousand tokens).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .gemv import _num_sms  # SM count (an H100's without a GPU)

BLOCK_N = 64


@triton.jit
def _split_kernel(Q, K, V, MASK, POS, OUT, MAX, SUM, Y,
                  stride_qb, stride_qh, stride_qg,
                  stride_kb, stride_kh, stride_ks,
                  stride_vb, stride_vh, stride_vs,
                  G, S, HKV, scale,
                  SPLIT_LEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                  PRECISION: tl.constexpr, HAS_POS: tl.constexpr, POS_LOADS: tl.constexpr,
                  ONE_SPLIT: tl.constexpr, SKIP_DEAD: tl.constexpr):
    bh = tl.program_id(0)  # b * HKV + h
    sp = tl.program_id(1)
    n_splits = tl.num_programs(1)
    b = bh // HKV
    h = bh % HKV
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_g[:, None] * stride_qg + offs_d[None, :],
                mask=offs_g[:, None] < G, other=0.0).to(tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    start = sp * SPLIT_LEN
    end = SPLIT_LEN
    n_keys = S
    if HAS_POS:  # causal decode: no key past the query's position is valid; stop there
        n_keys = tl.minimum(tl.load(POS).to(tl.int32) + 1, S)
        end = tl.minimum(n_keys - start, SPLIT_LEN)
    for off in range(0, end, BLOCK_N):
        offs_n = start + off + tl.arange(0, BLOCK_N)
        inb = offs_n < n_keys
        valid = tl.load(MASK + offs_n, mask=inb, other=0) != 0
        # POS_LOADS: K and V rows up to the position are read whatever the mask says, so the three
        # loads do not wait on each other; masked rows are then ignored (scores) and zeroed (V).
        k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :],
                    mask=(inb if POS_LOADS else valid)[:, None], other=0.0)
        # float32 operands: the kernel is bound by reading the cache, not by the dots, and Triton's
        # CPU interpreter gets bf16 dots wrong. PRECISION is "tf32" for 16-bit caches (q.k exact:
        # bf16/fp16 values fit tf32; p rounded to tf32, finer than the bf16 p of flash kernels) and
        # "ieee" for float32 caches.
        # [BLOCK_G, BLOCK_N]; cast back: under Inductor, scale arrives as fp64
        if BLOCK_G < 16:  # one or two query rows: products on the CUDA cores, no 16-row padding
            s = (tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], 2) * scale).to(tl.float32)
        else:
            s = (tl.dot(q, tl.trans(k.to(tl.float32)), input_precision=PRECISION) * scale).to(tl.float32)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if POS_LOADS:
            v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=inb[:, None], other=0.0)
            v = tl.where(valid[:, None], v, 0.0)  # a masked row may hold anything, NaN included
        else:
            v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=valid[:, None], other=0.0)
        if BLOCK_G < 16:
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], 1)
        else:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision=PRECISION)
        m_i = m_new
    real = offs_g < G
    if ONE_SPLIT:  # the whole cache in one slice: normalize and write the answer, no merge
        y = acc / l_i[:, None]
        tl.store(Y + (bh * G + offs_g)[:, None] * D + offs_d[None, :], y.to(Y.dtype.element_ty), mask=real[:, None])
        return
    if SKIP_DEAD:  # a slice past the position: the Triton merge never reads it
        real = real & (start < n_keys)
    row = (bh * n_splits + sp) * G + offs_g  # partials: [B * HKV, n_splits, G, (D)]: the real rows only
    tl.store(OUT + row[:, None] * D + offs_d[None, :], acc, mask=real[:, None])
    tl.store(MAX + row, m_i, mask=real)
    tl.store(SUM + row, l_i, mask=real)


@triton.jit
def _merge_kernel(OUT, MAX, SUM, Y, POS, n_splits, split_len, S, G, D: tl.constexpr, BLOCK_S: tl.constexpr,
                  HAS_POS: tl.constexpr):
    """y[row] = sum_s w_s out[s] / sum_s w_s sum[s], w_s = exp(max_s - max over s): one program
    per (b * HKV + h, g) row (the torch merge in one launch), BLOCK_S slices at a time with a
    running max. Given the position, only the slices that start at or before it are read."""
    row = tl.program_id(0)
    bh = row // G
    g = row % G
    n_live = n_splits
    if HAS_POS:
        n_live = tl.minimum(tl.minimum(tl.load(POS).to(tl.int32), S - 1) // split_len + 1, n_splits)
    offs_d = tl.arange(0, D)
    m_run = tl.full([], float("-inf"), tl.float32)
    den = tl.zeros([], tl.float32)
    num = tl.zeros([D], tl.float32)
    for c in range(0, n_live, BLOCK_S):
        offs_s = c + tl.arange(0, BLOCK_S)
        ok = offs_s < n_live
        idx = (bh * n_splits + offs_s) * G + g
        m = tl.load(MAX + idx, mask=ok, other=float("-inf"))
        l_s = tl.load(SUM + idx, mask=ok, other=0.0)
        o = tl.load(OUT + idx[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.where(m_run == float("-inf"), 0.0, tl.exp(m_run - m_safe))
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_safe))
        num = num * alpha + tl.sum(o * w[:, None], 0)
        den = den * alpha + tl.sum(l_s * w, 0)
        m_run = m_new
    tl.store(Y + row * D + offs_d, (num / den).to(Y.dtype.element_ty))


PROGRAMS_PER_SM = 4
NUM_WARPS = 4
POS_LOADS = False  # the split kernel's loads (see _split_kernel); benchmarks/attention_gpu.py sweeps it
# "triton": _merge_kernel (none for one slice); "torch": a few torch ops. In the compiled decode the
# op is not traced through, so the torch merge ran as ~10 eager kernels a layer: Llama-3-8B bf16 on
# the H200 decoded 16-18% slower with it (BENCHMARKS.md, session 18)
MERGE = "triton"


def plan(batch_heads: int, S: int, device: torch.device, programs_per_sm: int = PROGRAMS_PER_SM,
         block_n: int = BLOCK_N) -> tuple[int, int]:
    """(slice length, number of slices): about programs_per_sm programs per SM, slices a multiple
    of block_n."""
    want = max(1, math.ceil(programs_per_sm * _num_sms(device.index if device.type == "cuda" else None)
                            / batch_heads))
    splits = max(1, min(want, math.ceil(S / block_n)))
    split_len = math.ceil(math.ceil(S / splits) / block_n) * block_n
    return split_len, math.ceil(S / split_len)


def _impl(q, k, v, mask, launch, pos=None, programs_per_sm: int | None = None,
          block_n: int | None = None, num_warps: int | None = None, pos_loads: bool | None = None,
          merge: str | None = None, elementwise: bool = False) -> torch.Tensor:
    # unset: the module's defaults, read at call time (benchmarks/decode_profile_gpu.py sets them)
    programs_per_sm = PROGRAMS_PER_SM if programs_per_sm is None else programs_per_sm
    block_n = block_n or BLOCK_N
    num_warps = num_warps or NUM_WARPS
    pos_loads = POS_LOADS if pos_loads is None else pos_loads
    merge = merge or MERGE
    B, Hkv, G, D = q.shape
    S = k.shape[2]
    if k.stride(-1) != 1 or v.stride(-1) != 1 or q.stride(-1) != 1 or D not in (16, 32, 64, 128, 256):
        raise ValueError("decode_attention: head_dim must be a power of two in 16..256 with contiguous rows")
    flat_mask = mask.reshape(-1)
    if flat_mask.numel() != S:
        raise ValueError(f"decode_attention: the mask must hold one flag per cache position ({S})")
    block_g = triton.next_power_of_2(G) if elementwise and G <= 2 else max(16, triton.next_power_of_2(G))
    split_len, splits = plan(B * Hkv, S, q.device, programs_per_sm, block_n)
    one = splits == 1 and merge == "triton"
    out = torch.empty(B * Hkv, 1 if one else splits, G, D, device=q.device, dtype=torch.float32)
    mx = torch.empty(B * Hkv, 1 if one else splits, G, device=q.device, dtype=torch.float32)
    sm = torch.empty_like(mx)
    # Y is written only with the Triton merge; otherwise q stands in (never written, and no alias of
    # a written argument, which would keep Inductor from reusing the partials' buffers in place)
    y = torch.empty(B * Hkv, G, D, device=q.device, dtype=q.dtype) if merge == "triton" else q
    launch(_split_kernel)[(B * Hkv, splits)](
        q, k, v, flat_mask, flat_mask if pos is None else pos, out, mx, sm, y,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), G, S, Hkv, 1.0 / math.sqrt(D),
        SPLIT_LEN=split_len, BLOCK_N=block_n, BLOCK_G=block_g, D=D,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", HAS_POS=pos is not None,
        POS_LOADS=pos_loads and pos is not None, ONE_SPLIT=one, SKIP_DEAD=merge == "triton" and pos is not None,
        num_warps=num_warps)
    if merge == "triton":
        if not one:
            launch(_merge_kernel)[(B * Hkv * G,)](
                out, mx, sm, y, flat_mask if pos is None else pos, splits, split_len, S, G, D=D,
                BLOCK_S=min(32, max(2, triton.next_power_of_2(splits))), HAS_POS=pos is not None, num_warps=4)
        return y.reshape(B, Hkv, G, D)
    # merge the slices: weights exp(m_s - max_s m_s); a slice that saw no unmasked key has m = -inf
    m_all = mx.amax(1, keepdim=True)
    w = torch.exp(mx - m_all.clamp(min=torch.finfo(torch.float32).min))
    w = torch.where(mx == float("-inf"), torch.zeros_like(w), w)
    num = (out * w[..., None]).sum(1)  # [B * Hkv, G, D]
    den = (sm * w).sum(1)  # [B * Hkv, G]
    y = num / den[..., None]
    return y.reshape(B, Hkv, G, D).to(q.dtype)


def _identity(fn):
    return fn


def decode_attention_raw(q, k, v, mask, pos=None, **plan_kw) -> torch.Tensor:
    """Launch directly (no torch.library; works on CPU tensors under TRITON_INTERPRET=1).
    plan_kw: programs_per_sm, block_n, num_warps, pos_loads, merge, elementwise (1-2 query rows
    without tensor-core padding; benchmarks/attention_gpu.py sweeps them)."""
    return _impl(q, k, v, mask, _identity, pos, **plan_kw)


def _register_op():
    if not isinstance(_split_kernel, triton.runtime.jit.JITFunction):
        return None  # the interpreter has no JITFunction for wrap_triton
    from torch.library import triton_op, wrap_triton

    @triton_op("blitzgen::decode_attention", mutates_args=())
    def decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                            pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _impl(q, k, v, mask, wrap_triton, pos)

    return decode_attention_op


_op = _register_op()


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     pos: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) masked) v for q [B, Hkv, G, D] against k, v [B, Hkv, S, D]; mask
    [..., S] bool, the same for every query row. Output [B, Hkv, G, D] in q's dtype.

    pos (optional, a one-element integer tensor on the device): the query's position. No key past
    it is read or even visited (the mask must already hide those keys: causal decoding)."""
    if _op is None or not q.is_cuda:
        return decode_attention_raw(q, k, v, mask, pos)
    return torch.ops.blitzgen.decode_attention(q, k, v, mask, pos)
