"""int8 / int4 weight-only matmul for a few rows (2-16 tokens) on the tensor cores.

A speculative verify of K + 1 tokens, or a short prefill chunk, is too many rows for the GEMV
kernels (gemv.py: each weight byte costs one FFMA per row on the CUDA cores, so 8 rows are
issue-bound) and too few for dequantize + cuBLAS (the whole weight is written and read again in
bf16). Here each program dequantizes a [BK, BN] weight tile in registers (int8: a conversion;
int4: unpack, then (q - 8) * scale + zero per group) and feeds ``tl.dot`` with the activations
padded to 16 rows: the weight is read once, and the multiply-adds go to the tensor cores.
Split-K (fp32 atomics into a zeroed buffer, then a cast) keeps every SM busy on narrow shapes.

int4 tile decodes (``MmConfig.decode``, ``BLITZGEN_INT4_ROWS``), by static cost: sm_90 SASS of the
K loop compiled on the CPU, instructions per weight element weighted by their issue cost on Hopper
(conversions I2F/F2FP 8, shared memory 4, integer 2, float 1; BN 64, BK 128, g 32):
``convert`` (unpack, reorder the nibbles into k order, I2F) 7.5 instructions, 23 weighted;
``magic`` (the same tile, 128 + q by a shift and an OR instead of I2F) 8.0, 17.8; ``words``
(32-bit words, nibble i of every word is its own [BK / 8, BN] tile, multiplied by the activation
columns 8 j + i: 8 dots, nothing reordered, one shift and one LOP3 per nibble as in gemv.py) 6.8,
13.8. Not yet timed on a GPU: ``convert`` stays the default until benchmarks/rows_gpu.py has run.
``int8_mm`` / ``int4_mm`` take any number of rows (a prefill): more rows per program, and from
``INT8_DEQUANT_ROWS`` / ``INT4_DEQUANT_ROWS`` rows dequantize + cuBLAS (dequant.py).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import runtime
from . import dequant
from .gemv import INT4_MAGIC, _device_sms, _nibble, _split8  # the GEMV's nibble decode and activation split

MAX_ROWS = 16  # one tensor-core tile of rows
# From these many rows on, int8_mm / int4_mm dequantize to a float copy and call cuBLAS instead
# (kernels/dequant.py; the crossover measured with benchmarks/rows_gpu.py on the H200).
INT8_DEQUANT_ROWS = 192
INT4_DEQUANT_ROWS = 192


def int4_decode() -> str:
    """The int4 row kernel's tile decode: ``BLITZGEN_INT4_ROWS`` (convert, the default until the
    others are measured on the GPU; magic, words or words-xs; RuntimeOptions.validate reports a bad
    value). Read once per shape (choose_config is cached)."""
    return (runtime.env("BLITZGEN_INT4_ROWS") or "convert").lower()


class MmConfig(NamedTuple):
    block_n: int = 64
    block_k: int = 128  # int4: a multiple of the group size
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1
    block_m: int = 16  # rows per program: 16 up to MAX_ROWS, more for a long prefill (matmul)
    # int4 nibbles to floats: "convert" (I2F), "magic" (bit operations), "words" (32-bit words, 8 dots
    # of one nibble each, no tile reordering) or "words-xs" (the same, activation columns loaded apart)
    decode: str = "convert"


@triton.jit
def _store(y_ptr, acc, rm, rn, M, N, stride_ym, SPLIT_K: tl.constexpr):
    ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    ok = (rm < M)[:, None] & (rn < N)[None, :]
    if SPLIT_K == 1:
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=ok)
    else:
        tl.atomic_add(ptrs, acc, mask=ok, sem="relaxed")


@triton.jit
def _tile(M, BM: tl.constexpr, BN: tl.constexpr):
    """This program's rows, columns and K split. Axis 0 enumerates (row tile, column tile) with the
    row tiles fastest, so the programs that share a weight tile run together and can find it in L2
    (not yet measured against the other order); axis 1 is the K split."""
    num_m = tl.cdiv(M, BM)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    pid_n = pid // num_m
    rm = pid_m.to(tl.int64) * BM + tl.arange(0, BM)  # 64-bit: rows x N passes 2**31 at long prompts
    return rm, pid_n * BN + tl.arange(0, BN), tl.program_id(1)


@triton.jit
def _dot(acc, x, w, IEEE: tl.constexpr):
    if IEEE:
        return acc + tl.dot(x, w.to(x.dtype), input_precision="ieee")
    return acc + tl.dot(x, w.to(x.dtype))


@triton.jit
def _int8_mm_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_ym, stride_wn,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
                    EVEN_K: tl.constexpr, IEEE: tl.constexpr, NUM_STAGES: tl.constexpr):
    """y[m, n] = s[n] * sum_k x[m, k] * w[n, k]; w int8 [N, K] row-major."""
    rm, rn, pid_k = _tile(M, BM, BN)
    rnc = tl.minimum(rn, N - 1).to(tl.int64)
    rk = tl.arange(0, BK)
    x_ptrs = x_ptr + tl.minimum(rm, M - 1)[:, None] * stride_xm + rk[None, :]
    w_ptrs = w_ptr + rnc[None, :] * stride_wn + rk[:, None]  # [BK, BN]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for t in tl.range(pid_k, tl.cdiv(K, BK), SPLIT_K, num_stages=NUM_STAGES):
        k0 = t * BK
        if EVEN_K:
            x = tl.load(x_ptrs + k0)
            w = tl.load(w_ptrs + k0)
        else:
            ok = (k0 + rk) < K
            x = tl.load(x_ptrs + k0, mask=ok[None, :], other=0.0)
            w = tl.load(w_ptrs + k0, mask=ok[:, None], other=0)
        acc = _dot(acc, x, w, IEEE)
    s = tl.load(s_ptr + rnc).to(tl.float32)
    _store(y_ptr, acc * s[None, :], rm, rn, M, N, stride_ym, SPLIT_K)


@triton.jit
def _int4_mm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, stride_xm, stride_ym, stride_wn, stride_sn,
                    GS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
                    NUM_STAGES: tl.constexpr, MAGIC: tl.constexpr = False):
    """y[m, n] = sum_k x[m, k] * ((q[n, k] - 8) * s[n, k // GS] + z[n, k // GS]); q packed two per
    byte in w [N, K // 2] (even k in the low nibble). BK is a multiple of GS; K of GS. MAGIC:
    nibbles become floats as 128 + q by bit operations, and the -136 * scale goes into the zero."""
    rm, rn, pid_k = _tile(M, BM, BN)
    rnc = tl.minimum(rn, N - 1).to(tl.int64)
    rk = tl.arange(0, BK)
    rb = tl.arange(0, BK // 2)
    rg = tl.arange(0, BK // GS)
    x_ptrs = x_ptr + tl.minimum(rm, M - 1)[:, None] * stride_xm + rk[None, :]
    w_ptrs = w_ptr + rnc[None, :] * stride_wn + rb[:, None]  # [BK // 2, BN] bytes
    s_off = rnc[None, :] * stride_sn + rg[:, None]  # [BK // GS, BN]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for t in tl.range(pid_k, tl.cdiv(K, BK), SPLIT_K, num_stages=NUM_STAGES):
        k0 = t * BK
        if EVEN_K:
            x = tl.load(x_ptrs + k0)
            p = tl.load(w_ptrs + k0 // 2)
            s = tl.load(s_ptr + s_off + k0 // GS)
            z = tl.load(z_ptr + s_off + k0 // GS)
        else:
            ok = (k0 + rk) < K
            x = tl.load(x_ptrs + k0, mask=ok[None, :], other=0.0)
            p = tl.load(w_ptrs + k0 // 2, mask=((k0 + 2 * rb) < K)[:, None], other=0)
            gok = ((k0 + GS * rg) < K)[:, None]
            s = tl.load(s_ptr + s_off + k0 // GS, mask=gok, other=0.0)
            z = tl.load(z_ptr + s_off + k0 // GS, mask=gok, other=0.0)
        q = tl.join(p & 0xF, p >> 4)  # [BK // 2, BN, 2]: k = 2j + (0: low, 1: high nibble)
        q = tl.reshape(tl.permute(q, (0, 2, 1)), [BK // GS, GS, BN])
        s = s.to(tl.float32)
        if MAGIC:  # 128 + q by one shift and one OR (I2F runs at a quarter of the FMA rate)
            q = ((q.to(tl.int32) << 16) | 0x43000000).to(tl.float32, bitcast=True)  # gemv.INT4_MAGIC
            w = q * s[:, None, :] + (z.to(tl.float32) - 136.0 * s)[:, None, :]
        else:
            w = (q.to(tl.float32) - 8.0) * s[:, None, :] + z.to(tl.float32)[:, None, :]
        acc = _dot(acc, x, tl.reshape(w, [BK, BN]), IEEE)
    _store(y_ptr, acc, rm, rn, M, N, stride_ym, SPLIT_K)


@triton.jit
def _word_dot(acc, xi, w, s, zz, magic, i: tl.constexpr, IEEE: tl.constexpr):
    """acc += xi @ ((128 + nibble i of w) * s + zz), the nibble made a float as in the GEMV (a shift
    and one LOP3: magic, the bits of 128.0, is a kernel argument so that ptxas fuses AND and OR)."""
    return _dot(acc, xi, _nibble(w, i, magic) * s + zz, IEEE)


@triton.jit
def _int4_mm_words_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, stride_xm, stride_ym, stride_wn, stride_sn,
                          magic, GS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                          SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
                          NUM_STAGES: tl.constexpr, X_STRIDED: tl.constexpr = False):
    """As _int4_mm_kernel, with the weight read as 32-bit words (8 nibbles, k = 8 j + i) and no
    reordering of the tile: nibble i of every word is one [BK / 8, BN] tile, multiplied by the
    activation columns 8 j + i (8 dots of depth BK / 8). stride_wn counts words; GS >= 8."""
    rm, rn, pid_k = _tile(M, BM, BN)
    rnc = tl.minimum(rn, N - 1).to(tl.int64)
    rk = tl.arange(0, BK)
    L: tl.constexpr = BK // 8
    rj = tl.arange(0, L)
    x_ptrs = x_ptr + tl.minimum(rm, M - 1)[:, None] * stride_xm + rk[None, :]
    x_ptrs8 = x_ptr + tl.minimum(rm, M - 1)[:, None] * stride_xm + 8 * rj[None, :]
    w_ptrs = w_ptr + rnc[None, :] * stride_wn + rj[:, None]  # [L, BN] words
    s_ptrs = rnc[None, :] * stride_sn + (8 * rj[:, None]) // GS  # [L, BN]: each word's group
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for t in tl.range(pid_k, tl.cdiv(K, BK), SPLIT_K, num_stages=NUM_STAGES):
        k0 = t * BK
        if EVEN_K:
            x = tl.load(x_ptrs + k0)
            w = tl.load(w_ptrs + k0 // 8)
            s = tl.load(s_ptr + s_ptrs + k0 // GS).to(tl.float32)
            z = tl.load(z_ptr + s_ptrs + k0 // GS).to(tl.float32)
        else:
            ok = (k0 + rk) < K
            wok = ((k0 + 8 * rj) < K)[:, None]
            x = tl.load(x_ptrs + k0, mask=ok[None, :], other=0.0)
            w = tl.load(w_ptrs + k0 // 8, mask=wok, other=0)
            s = tl.load(s_ptr + s_ptrs + k0 // GS, mask=wok, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + s_ptrs + k0 // GS, mask=wok, other=0.0).to(tl.float32)
        zz = z - 136.0 * s
        if X_STRIDED:  # columns 8 j + i loaded apart (from L1: every program reads the same x)
            xs = x_ptrs8 + k0
            xok = ((k0 + 8 * rj) < K)[None, :]  # K is a multiple of 8: a word is whole or absent
            x0 = tl.load(xs, mask=xok, other=0.0)
            x1 = tl.load(xs + 1, mask=xok, other=0.0)
            x2 = tl.load(xs + 2, mask=xok, other=0.0)
            x3 = tl.load(xs + 3, mask=xok, other=0.0)
            x4 = tl.load(xs + 4, mask=xok, other=0.0)
            x5 = tl.load(xs + 5, mask=xok, other=0.0)
            x6 = tl.load(xs + 6, mask=xok, other=0.0)
            x7 = tl.load(xs + 7, mask=xok, other=0.0)
        else:
            x0, x1, x2, x3, x4, x5, x6, x7 = _split8(tl.reshape(x, [BM, L, 2, 2, 2]))  # columns 8 j + i
        acc = _word_dot(acc, x0, w, s, zz, magic, 0, IEEE)
        acc = _word_dot(acc, x1, w, s, zz, magic, 1, IEEE)
        acc = _word_dot(acc, x2, w, s, zz, magic, 2, IEEE)
        acc = _word_dot(acc, x3, w, s, zz, magic, 3, IEEE)
        acc = _word_dot(acc, x4, w, s, zz, magic, 4, IEEE)
        acc = _word_dot(acc, x5, w, s, zz, magic, 5, IEEE)
        acc = _word_dot(acc, x6, w, s, zz, magic, 6, IEEE)
        acc = _word_dot(acc, x7, w, s, zz, magic, 7, IEEE)
    _store(y_ptr, acc, rm, rn, M, N, stride_ym, SPLIT_K)


@functools.lru_cache(maxsize=1024)
def choose_config(N: int, K: int, num_sms: int, group_size: int | None = None, rows: int = MAX_ROWS) -> MmConfig:
    """64 output columns x 128 of K per tile (int4: at least one group), split along K until the
    grid has two programs per SM (a weight-streaming kernel needs several in flight per SM). More
    than MAX_ROWS rows (a prefill): 32, 64 or 128 rows per program (8 warps at 128)."""
    bk = max(128, group_size or 0)
    bm = 16 if rows <= 16 else 32 if rows <= 32 else 64 if rows <= 64 else 128
    cfg = MmConfig(block_n=64 if group_size else 128, block_k=bk, block_m=bm, num_warps=8 if bm == 128 else 4,
                   decode=int4_decode() if group_size else "convert")
    blocks, tiles = -(-N // cfg.block_n) * -(-rows // bm), -(-K // bk)
    split = 1
    while blocks * split < 1.5 * num_sms and split * 2 <= tiles:
        split *= 2
    return cfg._replace(split_k=split)


def _prepare(x: torch.Tensor, N: int, K: int, max_rows: int | None = MAX_ROWS):
    x2 = x.reshape(-1, K).contiguous()
    m = x2.shape[0]
    if m < 1 or (max_rows is not None and m > max_rows) or x.shape[-1] != K:
        raise ValueError(f"the row matmul takes 1..{max_rows or 'any number of'} rows of K={K}: got x of shape "
                         f"{tuple(x.shape)}")
    return x2, m


def _output(x2, m: int, N: int, split_k: int):
    if split_k == 1:
        return torch.empty(m, N, dtype=x2.dtype, device=x2.device)
    return torch.zeros(m, N, dtype=torch.float32, device=x2.device)


def _grid(m: int, N: int, cfg: MmConfig) -> tuple[int, int]:
    return (triton.cdiv(m, cfg.block_m) * triton.cdiv(N, cfg.block_n), cfg.split_k)


def _stages(x: torch.Tensor, cfg: MmConfig) -> int:
    """float32 activations at 128 rows per program: 64 KB a stage, so at most two fit in shared memory."""
    return min(cfg.num_stages, 2) if x.dtype == torch.float32 and cfg.block_m > 64 else cfg.num_stages


def int8_mm_rows_raw(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                     cfg: MmConfig | None = None, max_rows: int | None = MAX_ROWS) -> torch.Tensor:
    """y = (x @ weight.T) * scales for x [..., K] of 1..max_rows rows (None: any number; launched
    directly: also under TRITON_INTERPRET=1)."""
    N, K = weight.shape
    x2, m = _prepare(x, N, K, max_rows)
    cfg = cfg or choose_config(N, K, _device_sms(x), rows=m)
    y = _output(x2, m, N, cfg.split_k)
    _int8_mm_kernel[_grid(m, N, cfg)](
        x2, weight.contiguous(), scales.reshape(N).contiguous(), y, m, N, K, x2.stride(0), y.stride(0),
        weight.stride(0), BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, SPLIT_K=cfg.split_k,
        EVEN_K=K % cfg.block_k == 0, IEEE=x.dtype == torch.float32, NUM_STAGES=_stages(x, cfg),
        num_warps=cfg.num_warps)
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def int4_mm_rows_raw(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     group_size: int, cfg: MmConfig | None = None, max_rows: int | None = MAX_ROWS) -> torch.Tensor:
    """y = x @ dequant(qweight, scales, zeros).T for x [..., K] of 1..max_rows rows (None: any
    number; canonical int4 layout, see kernels.int4_gemv)."""
    N, K = qweight.shape[0], qweight.shape[1] * 2
    x2, m = _prepare(x, N, K, max_rows)
    cfg = cfg or choose_config(N, K, _device_sms(x), group_size, rows=m)
    if cfg.block_k % group_size or K % group_size:
        raise ValueError(f"int4 row matmul: block_k {cfg.block_k} and K {K} must be multiples of the group "
                         f"size {group_size}")
    y = _output(x2, m, N, cfg.split_k)
    scales, zeros = scales.contiguous(), zeros.contiguous()
    if cfg.decode.startswith("words") and K % 8 == 0 and group_size % 8 == 0 and cfg.block_k >= 128:
        # (words: whole 32-bit words per group, and dots of depth block_k / 8 >= 16; else "convert")
        words = qweight.contiguous().view(torch.int32)  # [N, K // 8]
        _int4_mm_words_kernel[_grid(m, N, cfg)](
            x2, words, scales, zeros, y, m, N, K, x2.stride(0), y.stride(0), words.stride(0), scales.stride(0),
            INT4_MAGIC, GS=group_size, BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, SPLIT_K=cfg.split_k,
            EVEN_K=K % cfg.block_k == 0, IEEE=x.dtype == torch.float32, NUM_STAGES=_stages(x, cfg),
            X_STRIDED=cfg.decode == "words-xs", num_warps=cfg.num_warps)
        return y.to(x.dtype).reshape(*x.shape[:-1], N)
    _int4_mm_kernel[_grid(m, N, cfg)](
        x2, qweight.contiguous(), scales, zeros, y, m, N, K, x2.stride(0), y.stride(0), qweight.stride(0),
        scales.stride(0), GS=group_size, BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, SPLIT_K=cfg.split_k,
        EVEN_K=K % cfg.block_k == 0, IEEE=x.dtype == torch.float32, NUM_STAGES=_stages(x, cfg),
        MAGIC=cfg.decode == "magic", num_warps=cfg.num_warps)
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def int8_mm_raw(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 x any number of rows: the row kernel, or dequantize + cuBLAS from INT8_DEQUANT_ROWS rows."""
    if x.numel() >= INT8_DEQUANT_ROWS * x.shape[-1]:
        return dequant.int8_dequant_mm(x, weight, scales)
    return int8_mm_rows_raw(x, weight, scales, max_rows=None)


def int4_mm_raw(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """int4 x any number of rows: the row kernel, or dequantize + cuBLAS from INT4_DEQUANT_ROWS rows."""
    if x.numel() >= INT4_DEQUANT_ROWS * x.shape[-1] and dequant.int4_supported(group_size):
        return dequant.int4_dequant_mm(x, qweight, scales, zeros, group_size)
    return int4_mm_rows_raw(x, qweight, scales, zeros, group_size, max_rows=None)


def _register_ops():
    if runtime.triton_interpret():
        return None  # the interpreter runs the raw launchers
    from .ops import linear_fake, opaque_op

    def int8_op(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return int8_mm_rows_raw(x, weight, scales)

    def int4_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int) -> torch.Tensor:
        return int4_mm_rows_raw(x, qweight, scales, zeros, group_size)

    return (opaque_op("blitzgen::int8_mm_rows", int8_op, linear_fake),
            opaque_op("blitzgen::int4_mm_rows", int4_op, linear_fake),
            opaque_op("blitzgen::int8_mm", int8_mm_raw, linear_fake),
            opaque_op("blitzgen::int4_mm", int4_mm_raw, linear_fake))


_int8_op, _int4_op, _int8_mm_op, _int4_mm_op = _register_ops() or (None, None, None, None)


def int8_mm_rows(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    if _int8_op is None:
        return int8_mm_rows_raw(x, weight, scales)
    return torch.ops.blitzgen.int8_mm_rows(x, weight, scales)


def int4_mm_rows(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int) -> torch.Tensor:
    if _int4_op is None:
        return int4_mm_rows_raw(x, qweight, scales, zeros, group_size)
    return torch.ops.blitzgen.int4_mm_rows(x, qweight, scales, zeros, int(group_size))


def int8_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """As ``int8_mm_rows`` for any number of rows (a prefill)."""
    if _int8_mm_op is None:
        return int8_mm_raw(x, weight, scales)
    return torch.ops.blitzgen.int8_mm(x, weight, scales)


def int4_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
            group_size: int) -> torch.Tensor:
    """As ``int4_mm_rows`` for any number of rows (a prefill without tinygemm's packed copy)."""
    if _int4_mm_op is None:
        return int4_mm_raw(x, qweight, scales, zeros, group_size)
    return torch.ops.blitzgen.int4_mm(x, qweight, scales, zeros, int(group_size))
