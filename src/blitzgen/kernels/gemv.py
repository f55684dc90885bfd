"""Hand-written Triton GEMV kernels for batch-1 decode with weight-only int8 / int4 weights.

Why hand-written
----------------
At batch 1 a linear layer is a GEMV: every weight byte is read once and used for one multiply-add,
so the kernel should run at the speed of HBM. The gpt-fast recipes do not: inductor's fused
``F.linear(x, w.to(bf16)) * s`` reaches ~36% of the H200 copy bandwidth for int8 and tinygemm's
``_weight_int4pack_mm`` ~28% for int4 (measured on this project's H200). Likely costs: generic
integer->float conversions (``I2F`` runs at 16 results per clock per SM on Hopper, a quarter of
the integer rate) and tilings made for matrix-matrix work (tensor-core tiles with 1 useful row of
16, shared-memory staging) or, for inductor, a generic reduction schedule.

Design (the same for both kernels)
----------------------------------
* **One program = BLOCK_N output rows x a K range; every warp and every lane lies along K.**
  Lane ``l`` of the program reads WPT 32-bit words (8 or 16 contiguous bytes) of each of its
  BLOCK_N rows per tile, so a warp reads 32 x 16 = 512 contiguous bytes of a row per load
  instruction (fully coalesced, ``LDG.E.128``), and one tile of a program covers
  ``32 * num_warps * WPT`` words of K. Holding all BLOCK_N rows in each thread lets every
  activation value loaded (and converted to fp32) by a lane be reused BLOCK_N times from registers.
  The activation tile is loaded as [lanes, WPT, 8] with 16-byte vector loads; its layout then
  matches the weight tile's exactly, so Triton needs no shared-memory layout conversion in the loop
  (checked in the TTGIR: the inner loop has no ``local_alloc``/``ld.shared``).
* **Dequantization with magic numbers, not I2F** (the FasterTransformer / "Who Says Elephants
  Can't Run" trick). int4: nibble i of a word is shifted to bits 16..19 and OR-ed into the bits of
  128.0f (one LOP3, the magic is passed as a kernel argument so that ptxas can fuse the AND and the
  OR into a single LOP3 with a register operand): the float is exactly ``128 + q``. The fp32 chain
  ``p = -136 * sum(x) + sum(x * (128 + q))`` is then ``sum(x * (q - 8))`` exactly up to fp32
  rounding. int8: byte b is shifted to bits 15..22 and XOR-ed into 128.0f with the byte's sign bit
  flipped, giving ``192 + b / 2``; ``p = sum(x * f) - 192 * sum(x)`` = ``sum(x * b) / 2``.
  Per weight element that is one shift, one LOP3 and one FFMA (the nibble already at bits 16..19
  needs no shift). Products are exact in fp32 (8-bit x 9-bit mantissas); accumulation is fp32.
* **Group-wise int4 scales**: a lane's 8*WPT nibbles lie inside one group (g >= 8*WPT), so per
  tile and row a lane applies its group's scale and zero to its partial sum:
  ``acc += s * sum(x * (q - 8)) + z * sum(x)``. The per-lane scale loads are made deliberately
  non-vectorizable (the group index is computed as ``(lane * 8 * WPT) // g``, which Triton's axis
  analysis cannot see as contiguous) so that they land in the weight tile's layout.
* The cross-lane / cross-warp reduction happens once per program, at the end.
* **Split-K** (grid dim 1) for shapes with few output blocks: partial sums are ``atomic_add``-ed
  (fp32) into a zero-filled buffer allocated inside the op, then cast (CUDA-graph safe: nothing
  persists between calls). K tails (K not a multiple of the tile) are handled by one masked tile.
* ``num_stages > 1`` turns on Triton's software pipelining of the K loop (``tl.range``), which
  streams the weight tiles through shared memory with ``cp.async``.

Static cost (sm_90 SASS from Triton 3.6, block_n=8, wpt=4; tests/test_kernels.py compiles it on
CPU): the K loop is ~3.6 instructions per weight element for both kernels (1 FFMA + 1 LOP3 +
~0.9 shift + per-tile overhead), i.e. ~3.6 per byte for int8 and ~7.2 per byte for int4; 16-byte
weight loads, no spills, no shared memory in the loop. At ~3 TB/s an H100 SM must consume
~12 bytes/clock, so int8 needs ~1/3 of the issue rate (memory-bound) and int4 ~2/3 (close to
balanced; on an H200 int4 is likely issue-bound before the copy roofline). Next lever if int4 is
issue-bound: extract two nibbles per shifted copy (bits 12..15 and 16..19: 4 shifts per word
instead of 7, ~-10% instructions, at ~1e-4 relative precision instead of ~1e-6).

Configs (gemv_configs.py) come from a deterministic heuristic table (``choose_config``), overridable per shape with
the JSON file named by ``BLITZGEN_GEMV_CONFIGS`` (written by benchmarks/kernels_gpu.py), or tuned
on the first eager call per shape when ``BLITZGEN_GEMV_AUTOTUNE=1`` (never during torch.compile
tracing or CUDA-graph capture; the engine's warm-up is eager).

The kernels are exposed as ``torch.ops.blitzgen.int8_gemv`` / ``torch.ops.blitzgen.int4_gemv``,
custom ops opaque to torch.compile (``ops.opaque_op``: fullgraph and CUDA graphs keep them as one
call each; the compiler never re-analyses the kernel). The raw launchers (``int8_gemv_raw`` / ``int4_gemv_raw``) run without torch.library, e.g. on CPU
tensors under ``TRITON_INTERPRET=1`` (tests).

References: gpt-fast (``WeightOnlyInt8Linear``, int4 with tinygemm), tinygemm
(``_weight_int4pack_mm``), FasterTransformer's fast int4->fp16 conversion (LOP3 magic numbers),
GemLite's Triton GEMV / split-K GEMV kernels (mobiusml/gemlite), Triton tutorials.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import runtime
from .gemv_configs import (INT4_DEFAULT, INT4_KERNELS, GemvConfig, _config_key, _device_sms,  # noqa: F401
                           _num_sms, _overrides, _pick_config, candidate_configs, choose_config,
                           int4_kernel_choice, supported, tile_k)


def _patch_interpreter_for_numpy2() -> None:
    """Triton 3.6's interpreter turns loop bounds into Python ints with ``int(array)``, which
    NumPy >= 2.4 refuses for 1-element 1-D arrays; convert through ``.reshape(-1)[0]`` instead."""
    try:
        import triton.runtime.interpreter as ti
    except Exception:  # pragma: no cover - other Triton versions
        return
    orig = getattr(ti, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_blitzgen", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._blitzgen = True
    ti._patch_lang_tensor = patched


if runtime.triton_interpret():
    _patch_interpreter_for_numpy2()

# float 128.0: OR a nibble into bits 16..19 -> 128 + q
INT4_MAGIC = 0x43000000
# float 128.0 with bit 22 set: XOR a byte placed at bits 15..22 -> 128 + (b + 128) / 2 = 192 + b / 2
INT8_MAGIC = 0x43400000




# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _nibble(w, i: tl.constexpr, magic):
    """Nibble i (bits 4i..4i+3) of each int32 word as the float 128 + q."""
    if i < 4:
        v = w << (16 - 4 * i)
    elif i == 4:
        v = w
    else:
        v = w >> (4 * i - 16)
    return ((v & 0x000F0000) | magic).to(tl.float32, bitcast=True)


@triton.jit
def _byte(w, b: tl.constexpr, magic):
    """Signed byte b of each int32 word as the float 192 + byte / 2."""
    if b == 0:
        v = w << 15
    elif b == 1:
        v = w << 7
    elif b == 2:
        v = w >> 1
    else:
        v = w >> 9
    return ((v & 0x007F8000) ^ magic).to(tl.float32, bitcast=True)


@triton.jit
def _split_words(w, L: tl.constexpr, BN: tl.constexpr, WPT: tl.constexpr):
    """[L, BN, WPT] -> WPT tensors [L, BN] (WPT in {2, 4}; for 2 the last two are copies)."""
    if WPT == 4:
        w = tl.reshape(w, [L, BN, 2, 2])  # word = 2a + b
        wa, wb = tl.split(w)  # b = 0 / 1
        w0, w2 = tl.split(wa)
        w1, w3 = tl.split(wb)
    else:
        w0, w1 = tl.split(w)
        w2 = w0
        w3 = w1
    return w0, w1, w2, w3


@triton.jit
def _split_xwords(xv, L: tl.constexpr, E: tl.constexpr, WPT: tl.constexpr):
    """[L, WPT, E] activations -> WPT tensors [L, E] (one per word)."""
    xt = tl.permute(xv, (0, 2, 1))  # [L, E, WPT]
    if WPT == 4:
        xt = tl.reshape(xt, [L, E, 2, 2])
        xa, xb = tl.split(xt)
        x0, x2 = tl.split(xa)
        x1, x3 = tl.split(xb)
    else:
        x0, x1 = tl.split(xt)
        x2 = x0
        x3 = x1
    return x0, x1, x2, x3


@triton.jit
def _split8(xr):
    """xr [..., 2, 2, 2] (index i = 4a + 2b + c in the last three) -> its 8 slices [...], i = 0..7."""
    c0, c1 = tl.split(xr)
    b00, b01 = tl.split(c0)
    b10, b11 = tl.split(c1)
    x0, x4 = tl.split(b00)
    x2, x6 = tl.split(b01)
    x1, x5 = tl.split(b10)
    x3, x7 = tl.split(b11)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _int4_word(p, w, xw, magic, L: tl.constexpr):
    """p += sum over the 8 nibbles of w (int32 [L, BN]) of (128 + q) * x; xw: [L, 8] fp32."""
    x0, x1, x2, x3, x4, x5, x6, x7 = _split8(tl.reshape(xw, [L, 2, 2, 2]))  # nibble i = 4a + 2b + c
    p += _nibble(w, 0, magic) * x0[:, None]
    p += _nibble(w, 1, magic) * x1[:, None]
    p += _nibble(w, 2, magic) * x2[:, None]
    p += _nibble(w, 3, magic) * x3[:, None]
    p += _nibble(w, 4, magic) * x4[:, None]
    p += _nibble(w, 5, magic) * x5[:, None]
    p += _nibble(w, 6, magic) * x6[:, None]
    p += _nibble(w, 7, magic) * x7[:, None]
    return p


@triton.jit
def _int8_word(p, w, xw, magic, L: tl.constexpr):
    """p += sum over the 4 bytes of w (int32 [L, BN]) of (192 + b / 2) * x; xw: [L, 4] fp32."""
    xr = tl.reshape(xw, [L, 2, 2])  # byte = 2a + b
    xa, xb = tl.split(xr)
    x0, x2 = tl.split(xa)
    x1, x3 = tl.split(xb)
    p += _byte(w, 0, magic) * x0[:, None]
    p += _byte(w, 1, magic) * x1[:, None]
    p += _byte(w, 2, magic) * x2[:, None]
    p += _byte(w, 3, magic) * x3[:, None]
    return p


@triton.jit
def _int4_load(w_ptrs, x_ptrs, s_ptrs, z_ptrs, k0, K, rl, WPT: tl.constexpr, GS: tl.constexpr,
               MASKED: tl.constexpr):
    """One int4 tile's weights, scales, zeros and activations (also gemv_int4_h2's)."""
    if MASKED:
        ok = (k0 + rl * (8 * WPT)) < K  # whole lanes: K % (8 * WPT) == 0
        w = tl.load(w_ptrs + k0 // 8, mask=ok[:, None, None], other=0)
        s = tl.load(s_ptrs + k0 // GS, mask=ok[:, None], other=0.0)
        z = tl.load(z_ptrs + k0 // GS, mask=ok[:, None], other=0.0)
        xv = tl.load(x_ptrs + k0, mask=ok[:, None, None], other=0.0)
    else:
        w = tl.load(w_ptrs + k0 // 8)
        s = tl.load(s_ptrs + k0 // GS)
        z = tl.load(z_ptrs + k0 // GS)
        xv = tl.load(x_ptrs + k0)
    return w, s, z, xv


@triton.jit
def _int4_tile(acc, w_ptrs, x_ptrs, s_ptrs, z_ptrs, k0, K, rl, magic,
               L: tl.constexpr, BN: tl.constexpr, WPT: tl.constexpr, GS: tl.constexpr,
               MASKED: tl.constexpr):
    w, s, z, xv = _int4_load(w_ptrs, x_ptrs, s_ptrs, z_ptrs, k0, K, rl, WPT, GS, MASKED)
    xv = xv.to(tl.float32)  # [L, WPT, 8]
    xs = tl.sum(tl.sum(xv, axis=2), axis=1)  # [L]: sum of this lane's activations
    p = tl.broadcast_to((-136.0 * xs)[:, None], [L, BN])
    w0, w1, w2, w3 = _split_words(w, L, BN, WPT)
    x0, x1, x2, x3 = _split_xwords(xv, L, 8, WPT)
    p = _int4_word(p, w0, x0, magic, L)
    p = _int4_word(p, w1, x1, magic, L)
    if WPT == 4:
        p = _int4_word(p, w2, x2, magic, L)
        p = _int4_word(p, w3, x3, magic, L)
    # p = sum x * (q - 8) over the lane's nibbles (one group): apply the group's scale and zero
    acc += s.to(tl.float32) * p + z.to(tl.float32) * xs[:, None]
    return acc


@triton.jit
def _int4_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, N, K, stride_wn, stride_sn,
                      tiles_per_split, magic,
                      BN: tl.constexpr, L: tl.constexpr, WPT: tl.constexpr, GS: tl.constexpr,
                      SPLIT_K: tl.constexpr, NUM_STAGES: tl.constexpr, HAS_TAIL: tl.constexpr):
    """y[n] = sum_k x[k] * ((q[n, k] - 8) * s[n, k // GS] + z[n, k // GS]).

    w_ptr: int32 view of the uint8 [N, K // 2] qweight (8 nibbles per word, k = 8j + i at bits 4i).
    Tile = [L lanes, BN rows, WPT words]; lane l covers k in [k0 + 8*WPT*l, k0 + 8*WPT*(l+1)).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    BK: tl.constexpr = 8 * WPT * L
    rn = pid_n * BN + tl.arange(0, BN)
    rnc = tl.minimum(rn, N - 1).to(tl.int64)  # clamp: loads stay in bounds, stores are masked
    rl = tl.arange(0, L)
    rw = tl.arange(0, WPT)
    ri = tl.arange(0, 8)
    w_ptrs = w_ptr + rnc[None, :, None] * stride_wn + (WPT * rl)[:, None, None] + rw[None, None, :]
    x_ptrs = x_ptr + (8 * WPT * rl)[:, None, None] + (8 * rw)[None, :, None] + ri[None, None, :]
    lg = (rl * (8 * WPT)) // GS  # the lane's group within the tile (kept non-contiguous on purpose)
    s_off = rnc[None, :] * stride_sn + lg[:, None]  # [L, BN]
    s_ptrs = s_ptr + s_off
    z_ptrs = z_ptr + s_off
    acc = tl.zeros([L, BN], dtype=tl.float32)
    n_full = K // BK
    t0 = pid_k * tiles_per_split
    t1 = t0 + tiles_per_split
    if t1 > n_full:
        t1 = n_full
    for t in tl.range(t0, t1, num_stages=NUM_STAGES):
        acc = _int4_tile(acc, w_ptrs, x_ptrs, s_ptrs, z_ptrs, t * BK, K, rl, magic,
                         L, BN, WPT, GS, False)
    if HAS_TAIL:
        if (t0 <= n_full) & (t0 + tiles_per_split > n_full):
            acc = _int4_tile(acc, w_ptrs, x_ptrs, s_ptrs, z_ptrs, n_full * BK, K, rl, magic,
                             L, BN, WPT, GS, True)
    y = tl.sum(acc, axis=0)  # [BN]
    if SPLIT_K == 1:
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)
    else:
        tl.atomic_add(y_ptr + rn, y, mask=rn < N, sem="relaxed")


@triton.jit
def _int8_tile(acc, w_ptrs, x_ptrs, k0, K, rl, magic,
               L: tl.constexpr, BN: tl.constexpr, WPT: tl.constexpr, MASKED: tl.constexpr):
    if MASKED:
        ok = (k0 + rl * (4 * WPT)) < K  # whole lanes: K % (4 * WPT) == 0
        w = tl.load(w_ptrs + k0 // 4, mask=ok[:, None, None], other=0)
        xv = tl.load(x_ptrs + k0, mask=ok[:, None, None], other=0.0)
    else:
        w = tl.load(w_ptrs + k0 // 4)
        xv = tl.load(x_ptrs + k0)
    xv = tl.reshape(xv.to(tl.float32), [L, WPT, 4])  # loaded as [L, WPT // 2, 8]
    xs = tl.sum(tl.sum(xv, axis=2), axis=1)  # [L]
    acc -= 192.0 * xs[:, None]
    w0, w1, w2, w3 = _split_words(w, L, BN, WPT)
    x0, x1, x2, x3 = _split_xwords(xv, L, 4, WPT)
    acc = _int8_word(acc, w0, x0, magic, L)
    acc = _int8_word(acc, w1, x1, magic, L)
    if WPT == 4:
        acc = _int8_word(acc, w2, x2, magic, L)
        acc = _int8_word(acc, w3, x3, magic, L)
    return acc  # += sum x * b / 2


@triton.jit
def _int8_gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, stride_wn, tiles_per_split, magic,
                      BN: tl.constexpr, L: tl.constexpr, WPT: tl.constexpr,
                      SPLIT_K: tl.constexpr, NUM_STAGES: tl.constexpr, HAS_TAIL: tl.constexpr):
    """y[n] = s[n] * sum_k x[k] * w[n, k]; w_ptr: int32 view of the int8 [N, K] weight."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    BK: tl.constexpr = 4 * WPT * L
    rn = pid_n * BN + tl.arange(0, BN)
    rnc = tl.minimum(rn, N - 1).to(tl.int64)
    rl = tl.arange(0, L)
    rw = tl.arange(0, WPT)
    rh = tl.arange(0, WPT // 2)
    rj = tl.arange(0, 8)
    w_ptrs = w_ptr + rnc[None, :, None] * stride_wn + (WPT * rl)[:, None, None] + rw[None, None, :]
    # activations as [L, WPT // 2, 8]: 16-byte loads, reshaped to [L, WPT, 4] in registers
    x_ptrs = x_ptr + (4 * WPT * rl)[:, None, None] + (8 * rh)[None, :, None] + rj[None, None, :]
    acc = tl.zeros([L, BN], dtype=tl.float32)
    n_full = K // BK
    t0 = pid_k * tiles_per_split
    t1 = t0 + tiles_per_split
    if t1 > n_full:
        t1 = n_full
    for t in tl.range(t0, t1, num_stages=NUM_STAGES):
        acc = _int8_tile(acc, w_ptrs, x_ptrs, t * BK, K, rl, magic, L, BN, WPT, False)
    if HAS_TAIL:
        if (t0 <= n_full) & (t0 + tiles_per_split > n_full):
            acc = _int8_tile(acc, w_ptrs, x_ptrs, n_full * BK, K, rl, magic, L, BN, WPT, True)
    s = tl.load(s_ptr + rnc).to(tl.float32)
    y = tl.sum(acc, axis=0) * (2.0 * s)
    if SPLIT_K == 1:
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)
    else:
        tl.atomic_add(y_ptr + rn, y, mask=rn < N, sem="relaxed")


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _identity(kernel):
    return kernel


def _grid_and_split(kind: str, N: int, K: int, cfg: GemvConfig):
    bk = tile_k(kind, cfg)
    tiles = -(-K // bk)
    tps = -(-tiles // max(1, cfg.split_k))
    split_k = -(-tiles // tps)
    return (triton.cdiv(N, cfg.block_n), split_k), tps, split_k, K % bk != 0


def _launch_int8(x1, weight, scales, cfg: GemvConfig, launch=_identity, out=None) -> torch.Tensor:
    N, K = weight.shape
    w32 = weight.view(torch.int32)
    grid, tps, split_k, has_tail = _grid_and_split("int8", N, K, cfg)
    if split_k == 1:
        y = out if out is not None else torch.empty(N, dtype=x1.dtype, device=x1.device)
    else:
        y = torch.zeros(N, dtype=torch.float32, device=x1.device)
    launch(_int8_gemv_kernel)[grid](
        x1, w32, scales, y, N, K, w32.stride(0), tps, INT8_MAGIC,
        BN=cfg.block_n, L=32 * cfg.num_warps, WPT=cfg.wpt, SPLIT_K=split_k,
        NUM_STAGES=cfg.num_stages, HAS_TAIL=has_tail, num_warps=cfg.num_warps)
    return y if split_k == 1 else y.to(x1.dtype)


def _int4_kernel_and_extra(choice: str | None):
    choice = choice or int4_kernel_choice()
    if choice == "fp32":
        return _int4_gemv_kernel, {}
    from .gemv_int4_h2 import int4_h2_gemv_kernel

    # "h2-noguard" (benchmarks only): without the fp16-overflow fallback, to price it
    return int4_h2_gemv_kernel, {"PREFETCH": choice == "h2p", "GUARD": choice != "h2-noguard"}


def _launch_int4(x1, qweight, scales, zeros, group_size: int, cfg: GemvConfig,
                 launch=_identity, out=None, kernel: str | None = None) -> torch.Tensor:
    N = qweight.shape[0]
    K = qweight.shape[1] * 2
    w32 = qweight.view(torch.int32)
    grid, tps, split_k, has_tail = _grid_and_split("int4", N, K, cfg)
    if split_k == 1:
        y = out if out is not None else torch.empty(N, dtype=x1.dtype, device=x1.device)
    else:
        y = torch.zeros(N, dtype=torch.float32, device=x1.device)
    fn, extra = _int4_kernel_and_extra(kernel)
    launch(fn)[grid](
        x1, w32, scales, zeros, y, N, K, w32.stride(0), scales.stride(0), tps, INT4_MAGIC,
        BN=cfg.block_n, L=32 * cfg.num_warps, WPT=cfg.wpt, GS=group_size, SPLIT_K=split_k,
        NUM_STAGES=cfg.num_stages, HAS_TAIL=has_tail, num_warps=cfg.num_warps, **extra)
    return y if split_k == 1 else y.to(x1.dtype)


def _report_unsupported(kind: str, N: int, K: int, group_size: int | None) -> None:
    if not torch.compiler.is_compiling():
        g = f", group {group_size}" if group_size else ""
        runtime.fallback(f"{kind} GEMV [{N}x{K}{g}]", "the Triton kernel does not take this shape "
                         "(int8: K % 8; int4: a power-of-two group >= 16 dividing K); plain PyTorch")


def _check_x(x: torch.Tensor, K: int) -> None:
    if x.shape[-1] != K or x.numel() != K:
        raise ValueError(f"GEMV kernels take one token: x of shape {tuple(x.shape)}, K={K}")


def _int8_impl(x, weight, scales, launch, cfg: GemvConfig | None = None, out=None):
    N, K = weight.shape
    _check_x(x, K)
    out_shape = (*x.shape[:-1], N)
    x1 = x.reshape(K).contiguous()
    weight = weight.contiguous()
    scales = scales.reshape(N).contiguous()
    if cfg is None:
        cfg = _pick_config("int8", N, K, None, x1,
                           lambda c: _launch_int8(x1, weight, scales, c), (x1, weight, scales))
    if not supported("int8", K, None, cfg):
        _report_unsupported("int8", N, K, None)
        y = (x1.to(torch.float32) @ weight.to(torch.float32).t()) * scales.to(torch.float32)
        return y.to(x.dtype).reshape(out_shape)
    return _launch_int8(x1, weight, scales, cfg, launch, out).reshape(out_shape)


def _int4_impl(x, qweight, scales, zeros, group_size: int, launch, cfg: GemvConfig | None = None,
               out=None, kernel: str | None = None):
    N = qweight.shape[0]
    K = qweight.shape[1] * 2
    _check_x(x, K)
    out_shape = (*x.shape[:-1], N)
    x1 = x.reshape(K).contiguous()
    qweight = qweight.contiguous()
    scales = scales.contiguous()
    zeros = zeros.contiguous()
    kernel = kernel or int4_kernel_choice()
    if cfg is None and supported("int4", K, group_size):
        cfg = _pick_config("int4", N, K, group_size, x1,
                           lambda c: _launch_int4(x1, qweight, scales, zeros, group_size, c, kernel=kernel),
                           (x1, qweight, scales, zeros), kernel)
    if cfg is None or not supported("int4", K, group_size, cfg):
        _report_unsupported("int4", N, K, group_size)
        from .reference import int4_gemv_ref

        return int4_gemv_ref(x, qweight, scales, zeros, group_size)
    return _launch_int4(x1, qweight, scales, zeros, group_size, cfg, launch, out,
                        kernel).reshape(out_shape)


def int8_gemv_raw(x, weight, scales, cfg: GemvConfig | None = None, out=None) -> torch.Tensor:
    """Launch the int8 kernel directly (no torch.library; works under TRITON_INTERPRET=1).

    ``out`` (optional, [N] in x's dtype) receives the result when the config has split_k == 1
    (tests poison it to check that every element is written)."""
    return _int8_impl(x, weight, scales, _identity, cfg, out)


def int4_gemv_raw(x, qweight, scales, zeros, group_size: int, cfg: GemvConfig | None = None,
                  out=None, kernel: str | None = None) -> torch.Tensor:
    """Launch the int4 kernel directly (no torch.library; the fp32 kernel also runs under
    TRITON_INTERPRET=1). ``kernel``: one of INT4_KERNELS (default: ``int4_kernel_choice()``)."""
    return _int4_impl(x, qweight, scales, zeros, group_size, _identity, cfg, out, kernel)


# ---------------------------------------------------------------------------------------------
# torch.library custom ops (opaque to torch.compile)
# ---------------------------------------------------------------------------------------------


def _register_ops():
    if runtime.triton_interpret():
        return None, None  # the interpreter runs the raw launchers
    from .ops import linear_fake, opaque_op

    def int8_gemv_op(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return _int8_impl(x, weight, scales, _identity)

    def int4_gemv_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                     zeros: torch.Tensor, group_size: int) -> torch.Tensor:
        return _int4_impl(x, qweight, scales, zeros, group_size, _identity)

    return (opaque_op("blitzgen::int8_gemv", int8_gemv_op, linear_fake),
            opaque_op("blitzgen::int4_gemv", int4_gemv_op, linear_fake))


_int8_op, _int4_op = _register_ops()


def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """y = (x @ weight.T) * scales for one token (x: [..., K] with one row), bf16 out, fp32 math."""
    if _int8_op is None:
        return int8_gemv_raw(x, weight, scales)
    return torch.ops.blitzgen.int8_gemv(x, weight, scales)


def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              group_size: int) -> torch.Tensor:
    """y = x @ dequant(qweight, scales, zeros).T for one token (canonical int4 layout)."""
    if _int4_op is None:
        return int4_gemv_raw(x, qweight, scales, zeros, group_size)
    return torch.ops.blitzgen.int4_gemv(x, qweight, scales, zeros, int(group_size))
