"""int4 GEMV with a packed fp16x2 dequantize: two weights per instruction (CUDA, sm_80+).

gemv.py's int4 kernel spends ~3.6 instructions per weight in its K loop (shift, LOP3 into a
fp32 magic number, FFMA: one weight at a time), and runs at ~53% of the H200's
copy bandwidth (BENCHMARKS.md, session 8 profile). This kernel keeps gemv.py's tiling (one program
= BN rows x a K range, every lane along K, 16-byte weight loads, the same configs) and changes the
inner product, in inline PTX on 32-bit registers that hold two fp16 values:

* word w holds nibbles k = 8j + i at bits 4i. ``(w >> 4p) & 0x000F000F | 0x4C004C00`` is the
  fp16 pair (16 + q[p] / 64, 16 + q[p + 4] / 64) (one LOP3; 3 shifts per word). ``sub.f16x2``
  of 16.125 gives (q - 8) / 64 exactly, and ``fma.rn.f16x2`` multiplies it by the activations
  paired the same way, (x[p], x[p + 4]) in fp16, and accumulates: 15 instructions per 8 weights
  instead of ~23. The activation pairs are built once per tile and lane for all BN rows.
* The 1/64 keeps a tile's 16 products per half-register (each at most |x| / 8) below fp16's
  65504 for |x| below ~32760; activations convert to fp16 without overflow below 65504. Past
  that, a program whose rows come out inf or NaN redoes them with gemv.py's fp32 tiles (a branch
  taken only then), so large activations cost speed, never correctness.
* Per tile the fp16 partial sums are widened to fp32 and the group's scale (times 64) and zero
  are applied as in gemv.py: ``acc += s * sum(x * (q - 8)) + z * sum(x)``.

Precision: each product is rounded to fp16 (2^-12 relative; coarser for |x| < 6e-5, where fp16
is subnormal) and each fp16 accumulator sums 16 products (one tile), then fp32 takes over. That is finer than tinygemm's dequantize-to-bf16 (2^-9 per weight) and
coarser than gemv.py's exact fp32 products; tests/gpu compare both against the fp32 reference.

Reference: FasterTransformer / Marlin's LOP3 int4 -> fp16x2 conversion (0x64006400 magic).
The int4 default on sm_80+ (``BLITZGEN_INT4_GEMV=fp32`` takes gemv.py's kernel): with one-warp
configs, where the overflow branch's flag needs one barrier instead of five, it runs Llama-2-7B at
406 against 387 decode tok/s on the H200 (BENCHMARKS.md, session 13). CPU: not run (inline PTX);
``gemv.int4_gemv`` picks it only on CUDA. tests/test_kernels.py compiles it for sm_90 on the CPU and checks the
emulated arithmetic (``emulate``) against the fp32 reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gemv import _int4_load as _load, _int4_word, _split_words

W_SCALE = 64.0  # the fp16 weights are (q - 8) / 64


# pairs (16 + q[p] / 64, 16 + q[p + 4] / 64) of one word, minus 16.125 -> acc += (q - 8) / 64 * x
_WORD_ASM = tl.constexpr("""
{
.reg .b32 m, mag, off, t0, t1, t2, t3, a;
mov.b32 m, 0x000F000F;
mov.b32 mag, 0x4C004C00;
mov.b32 off, 0x4C084C08;
lop3.b32 t0, $1, m, mag, 0xEA;
shr.u32 t1, $1, 4;
lop3.b32 t1, t1, m, mag, 0xEA;
shr.u32 t2, $1, 8;
lop3.b32 t2, t2, m, mag, 0xEA;
shr.u32 t3, $1, 12;
lop3.b32 t3, t3, m, mag, 0xEA;
sub.rn.f16x2 t0, t0, off;
sub.rn.f16x2 t1, t1, off;
sub.rn.f16x2 t2, t2, off;
sub.rn.f16x2 t3, t3, off;
fma.rn.f16x2 a, t0, $2, $6;
fma.rn.f16x2 a, t1, $3, a;
fma.rn.f16x2 a, t2, $4, a;
fma.rn.f16x2 a, t3, $5, a;
mov.b32 $0, a;
}
""")


@triton.jit
def _pack_f16x2(lo, hi):
    """Two fp32 tensors -> int32 holding (fp16(lo), fp16(hi)) as (low, high) halves."""
    return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $1, $2;", "=r,f,f", [hi, lo],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _widen_sum(h):
    """int32 holding an fp16 pair -> fp32 low + high."""
    return tl.inline_asm_elementwise(
        "{ .reg .b16 l, h; .reg .f32 a, b; mov.b32 {l, h}, $1; cvt.f32.f16 a, l; "
        "cvt.f32.f16 b, h; add.f32 $0, a, b; }",
        "=f,r", [h], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _word(acc2, w, x0, x1, x2, x3):
    """acc2 (fp16x2 in int32 [L, BN]) += sum over p of (q - 8) pairs of word w times x pairs p."""
    return tl.inline_asm_elementwise(_WORD_ASM, "=r,r,r,r,r,r,r",
                                     [w, x0[:, None], x1[:, None], x2[:, None], x3[:, None], acc2],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _split4(t, L: tl.constexpr):
    """[L, 4] -> four [L] tensors (columns 0..3)."""
    a, b = tl.split(tl.reshape(t, [L, 2, 2]))  # column = 2u + v; v = 0 / 1
    c0, c2 = tl.split(a)
    c1, c3 = tl.split(b)
    return c0, c1, c2, c3


@triton.jit
def _tile(acc, w, s, z, xv, L: tl.constexpr, BN: tl.constexpr, WPT: tl.constexpr):
    xv = xv.to(tl.float32)  # [L, WPT, 8]
    xs = tl.sum(tl.sum(xv, axis=2), axis=1)  # [L]
    # pairs (x[p], x[p + 4]) of each word as fp16: [L, WPT, 4] int32
    lo, hi = tl.split(tl.permute(tl.reshape(xv, [L, WPT, 2, 4]), (0, 1, 3, 2)))
    xp = tl.permute(_pack_f16x2(lo, hi), (0, 2, 1))  # [L, 4 pairs, WPT words]
    if WPT == 4:
        xa, xb = tl.split(tl.reshape(xp, [L, 4, 2, 2]))  # word = 2u + v
        xw0, xw2 = tl.split(xa)
        xw1, xw3 = tl.split(xb)
    else:
        xw0, xw1 = tl.split(xp)
    w0, w1, w2, w3 = _split_words(w, L, BN, WPT)
    acc2 = tl.zeros([L, BN], dtype=tl.int32)  # fp16 pair (0, 0)
    a0, a1, a2, a3 = _split4(xw0, L)
    acc2 = _word(acc2, w0, a0, a1, a2, a3)
    a0, a1, a2, a3 = _split4(xw1, L)
    acc2 = _word(acc2, w1, a0, a1, a2, a3)
    if WPT == 4:
        a0, a1, a2, a3 = _split4(xw2, L)
        acc2 = _word(acc2, w2, a0, a1, a2, a3)
        a0, a1, a2, a3 = _split4(xw3, L)
        acc2 = _word(acc2, w3, a0, a1, a2, a3)
    p = _widen_sum(acc2)  # sum x * (q - 8) / 64 over the lane's nibbles (one group)
    acc += (s.to(tl.float32) * 64.0) * p + z.to(tl.float32) * xs[:, None]
    return acc


@triton.jit
def _fp32_rows(w_ptr, x_ptr, s_ptrs, z_ptrs, rnc, stride_wn, rl, t0, t1, K, magic,
               L: tl.constexpr, BN: tl.constexpr, WPT: tl.constexpr, GS: tl.constexpr):
    """The rows' sums over tiles t0..t1 with gemv.py's exact fp32 products, one word at a time (few
    registers, so the fallback does not lower the main loop's occupancy)."""
    BK: tl.constexpr = 8 * WPT * L
    ri = tl.arange(0, 8)
    acc = tl.zeros([L, BN], dtype=tl.float32)
    for t in range(t0, t1):
        k0 = t * BK
        ok = (k0 + rl * (8 * WPT)) < K
        xs = tl.zeros([L], dtype=tl.float32)
        p = tl.zeros([L, BN], dtype=tl.float32)
        for j in tl.static_range(WPT):
            w = tl.load(w_ptr + rnc[None, :] * stride_wn + (k0 // 8 + WPT * rl + j)[:, None],
                        mask=ok[:, None], other=0)
            xv = tl.load(x_ptr + (k0 + 8 * WPT * rl + 8 * j)[:, None] + ri[None, :],
                         mask=ok[:, None], other=0.0).to(tl.float32)  # [L, 8]
            xs += tl.sum(xv, axis=1)
            p = _int4_word(p, w, xv, magic, L)  # sum (128 + q) * x
        s = tl.load(s_ptrs + k0 // GS, mask=ok[:, None], other=0.0).to(tl.float32)
        z = tl.load(z_ptrs + k0 // GS, mask=ok[:, None], other=0.0).to(tl.float32)
        acc += s * (p - 136.0 * xs[:, None]) + z * xs[:, None]
    return tl.sum(acc, axis=0)


@triton.jit
def int4_h2_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, N, K, stride_wn, stride_sn,
                        tiles_per_split, magic,
                        BN: tl.constexpr, L: tl.constexpr, WPT: tl.constexpr, GS: tl.constexpr,
                        SPLIT_K: tl.constexpr, NUM_STAGES: tl.constexpr, HAS_TAIL: tl.constexpr,
                        PREFETCH: tl.constexpr = False, GUARD: tl.constexpr = True):
    """As gemv._int4_gemv_kernel (same arguments; ``magic`` is for the fp32 fallback). PREFETCH:
    load tile t + 1 into registers before the arithmetic of tile t. A program whose rows come out
    non-finite (fp16 overflow) recomputes them with gemv.py's exact fp32 tiles."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    BK: tl.constexpr = 8 * WPT * L
    rn = pid_n * BN + tl.arange(0, BN)
    rnc = tl.minimum(rn, N - 1).to(tl.int64)
    rl = tl.arange(0, L)
    rw = tl.arange(0, WPT)
    ri = tl.arange(0, 8)
    w_ptrs = w_ptr + rnc[None, :, None] * stride_wn + (WPT * rl)[:, None, None] + rw[None, None, :]
    x_ptrs = x_ptr + (8 * WPT * rl)[:, None, None] + (8 * rw)[None, :, None] + ri[None, None, :]
    lg = (rl * (8 * WPT)) // GS
    s_off = rnc[None, :] * stride_sn + lg[:, None]
    s_ptrs = s_ptr + s_off
    z_ptrs = z_ptr + s_off
    acc = tl.zeros([L, BN], dtype=tl.float32)
    n_full = K // BK
    t0 = pid_k * tiles_per_split
    t1 = t0 + tiles_per_split
    if t1 > n_full:
        t1 = n_full
    if PREFETCH:  # the next tile's loads are issued before this tile's arithmetic
        if t0 < t1:
            w, s, z, xv = _load(w_ptrs, x_ptrs, s_ptrs, z_ptrs, t0 * BK, K, rl, WPT, GS, False)
            for t in range(t0, t1 - 1):
                wn, sn, zn, xn = _load(w_ptrs, x_ptrs, s_ptrs, z_ptrs, (t + 1) * BK, K, rl, WPT, GS, False)
                acc = _tile(acc, w, s, z, xv, L, BN, WPT)
                w, s, z, xv = wn, sn, zn, xn
            acc = _tile(acc, w, s, z, xv, L, BN, WPT)
    else:
        for t in tl.range(t0, t1, num_stages=NUM_STAGES):
            w, s, z, xv = _load(w_ptrs, x_ptrs, s_ptrs, z_ptrs, t * BK, K, rl, WPT, GS, False)
            acc = _tile(acc, w, s, z, xv, L, BN, WPT)
    if HAS_TAIL:
        if (t0 <= n_full) & (t0 + tiles_per_split > n_full):
            w, s, z, xv = _load(w_ptrs, x_ptrs, s_ptrs, z_ptrs, n_full * BK, K, rl, WPT, GS, True)
            acc = _tile(acc, w, s, z, xv, L, BN, WPT)
    y = tl.sum(acc, axis=0)
    if GUARD and tl.sum(((y != y) | (tl.abs(y) == float("inf"))).to(tl.int32)) > 0:
        # an fp16 overflow (|x| past ~32760) or a non-finite input: redo this program's rows in fp32
        y = _fp32_rows(w_ptr, x_ptr, s_ptrs, z_ptrs, rnc, stride_wn, rl, t0,
                       tl.minimum(t0 + tiles_per_split, tl.cdiv(K, BK)), K, magic, L, BN, WPT, GS)
    if SPLIT_K == 1:
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)
    else:
        tl.atomic_add(y_ptr + rn, y, mask=rn < N, sem="relaxed")


def emulate(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
            group_size: int, tile_words: int = 4) -> torch.Tensor:
    """The kernel's arithmetic in PyTorch (CPU tests): fp16 products and per-lane fp16 sums over
    ``tile_words`` words (each fma rounded once, as ``fma.rn.f16x2``), then fp32 scale and zero.

    x [K], qweight uint8 [N, K // 2] (canonical layout: k even in the low nibble), scales / zeros
    [N, K // group_size]. Returns fp32 [N]."""
    N, K = qweight.shape[0], qweight.shape[1] * 2
    lo = (qweight & 0xF).to(torch.int64)
    hi = (qweight >> 4).to(torch.int64)
    q = torch.stack([lo, hi], dim=-1).reshape(N, K)
    qm8 = (q - 8).to(torch.float64) / W_SCALE
    xf = x.to(torch.float32)
    xh = xf.to(torch.float16).to(torch.float64)  # [K]
    span = 8 * tile_words  # one lane's nibbles per tile
    qv = qm8.reshape(N, K // span, tile_words, 2, 4)  # word j, half h, pair p: k = 8j + 4h + p
    xv = xh.reshape(K // span, tile_words, 2, 4)
    acc = torch.zeros(N, K // span, 2, dtype=torch.float64)  # per lane: the two fp16 halves
    for j in range(tile_words):
        for p in range(4):
            prod = qv[:, :, j, :, p] * xv[None, :, j, :, p]  # exact in fp64
            acc = (acc + prod).to(torch.float16).to(torch.float64)  # one rounding, as fma.rn
    part = (acc[..., 0].float() + acc[..., 1].float()) * W_SCALE  # [N, lanes]
    xs = xf.reshape(K // span, span).sum(-1)
    g = torch.arange(K // span) * span // group_size
    s = scales.to(torch.float32)[:, g]
    z = zeros.to(torch.float32)[:, g]
    return (s * part + z * xs[None, :]).sum(-1)
