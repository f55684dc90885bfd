"""int4 weight-only: group-wise asymmetric 4-bit, the tinygemm / gpt-fast convention.

Storage (persistent buffers, what checkpoints hold and what blitzgen.kernels consume):

- ``qweight`` uint8 [out, in // 2]: byte j of a row holds k = 2j in its LOW nibble and k = 2j + 1
  in its HIGH nibble; values q in 0..15.
- ``scales``, ``zeros`` [out, in // group_size] in the compute dtype.
- dequantization: ``w[n, k] = (q[n, k] - 8) * scales[n, k // g] + zeros[n, k // g]``, where
  ``scale = (max - min) / 15`` and ``zero = min + 8 * scale`` over each group of g inputs.

Matmul paths, chosen per call (the choice is static per shape, so torch.compile sees one path):

1. CUDA, one token, and ``blitzgen.kernels.int4_gemv`` exists: that kernel,
   ``int4_gemv(x, qweight, scales, zeros, group_size) -> y``.
2. CUDA, ``kernels.INT4_ROWS_MIN``..``kernels.ROWS_MAX`` tokens (speculative verify, short prefill
   chunks) and
   ``blitzgen.kernels.int4_rows`` exists: that kernel (tensor cores, kernels/mm_rows.py).
3. CUDA, more rows (a prefill): ``blitzgen.kernels.int4_matmul``, path 2's kernel with more rows
   per program, or from ``mm_rows.INT4_DEQUANT_ROWS`` rows a float copy and cuBLAS; 2-4 rows take
   path 2. One copy of the weights. With ``BLITZGEN_INT4_PREFILL=tinygemm`` (the default until
   session 14; 13x slower to the first token of 1800, BENCHMARKS.md): aten's tinygemm
   ``_weight_int4pack_mm`` (bf16 activations) on a packed copy built once by ``prepare()``
   (non-persistent buffers ``packed_weight``, ``packed_scales_zeros`` [in // g, out, 2]), a second
   copy of the weights, for 2-4 rows and more than ``ROWS_MAX``.
4. CPU, bf16: aten's ``_weight_int4pack_mm_for_cpu`` on its own packed copy for up to 128 rows,
   where it beats dequantizing by far; longer inputs, and float32, dequantize + F.linear.
5. Anything else (shapes or dtypes the packed ops refuse, or a packed op that fails its one-time
   self-check against the dequantized reference on this torch build): dequantize + F.linear.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import BlitzgenError
from ..kernels import INT4_ROWS_MIN, ROWS_MAX  # the package imports Triton only on CUDA hosts
from .core import (INT4_GROUP_SIZES, Handler, Int4Config, QuantizedLinear, get_kernel, is_single_token,
                   register_handler, scale_eps)

# On CPU the packed int4 op beats dequantize + F.linear in bf16 up to this many rows (4 cores of the
# H200 host, torch 2.11: 4096x4096 bf16 0.58 ms vs 60 ms at 1 row, 7.8 ms vs 62 ms at 32 rows). In
# float32 it is no faster for SmolLM2's shapes (1.27 ms both, 576x3072, 1 row) and far slower for
# several rows, so float32 (and float16, unmeasured) always dequantize.
CPU_PACKED_MAX_TOKENS = {torch.bfloat16: 128}
TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)


# ------------------------------------------------------------------------------------------------
# packing and quantization math


def pack_int4(q: Tensor) -> Tensor:
    """uint8 [N, K] of values 0..15 -> uint8 [N, K // 2]; even k in the low nibble."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(qweight: Tensor) -> Tensor:
    """uint8 [N, K // 2] -> uint8 [N, K] of values 0..15 (inverse of pack_int4)."""
    return torch.stack([qweight & 0x0F, qweight >> 4], dim=-1).reshape(qweight.shape[0], -1)


@torch.no_grad()
def quantize_int4(w: Tensor, group_size: int, dtype: torch.dtype | None = None,
                  symmetric: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(qweight, scales, zeros) for a float weight [N, K]: min/max per group (``symmetric``: the
    largest-magnitude weight / -8, zero 0), round-to-nearest, in float32 on w's device. Values are
    quantized against scales/zeros as rounded to dtype."""
    dtype = dtype or w.dtype
    n, k = w.shape
    if k % group_size:
        raise BlitzgenError(f"group size {group_size} does not divide in_features {k}")
    wf = w.detach().float().reshape(n, k // group_size, group_size)
    scales, zeros = symmetric_params(wf, dtype) if symmetric else group_params(wf, dtype)
    s, z = scales.float()[..., None], zeros.float()[..., None]
    q = torch.sub(wf, z).div_(s).round_().add_(8.0).clamp_(0, 15).to(torch.uint8).reshape(n, k)
    return pack_int4(q), scales, zeros


def group_params(wf: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(scales, zeros) in dtype for float32 groups along the last dim: min/max, 15 steps."""
    lo, hi = torch.aminmax(wf, dim=-1)
    scales = ((hi - lo).clamp(min=1e-6) / 15.0).clamp(min=scale_eps(dtype)).to(dtype)
    return scales, (lo + 8.0 * scales.float()).to(dtype)


def symmetric_params(wf: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(scales, zeros) in dtype, llama.cpp's Q4_0 grid: the largest-magnitude weight m of a group
    is code 0, so scale = m / -8 (negative when m > 0) and zero 0. For weights that came from Q4_0
    blocks this recovers each block's scale exactly (m = -8 d), and rounding recovers its codes."""
    idx = wf.abs().argmax(dim=-1, keepdim=True)
    scales = wf.gather(-1, idx).squeeze(-1) / -8.0
    eps = scale_eps(dtype)
    scales = torch.where(scales.abs() < eps, torch.full_like(scales, eps), scales).to(dtype)
    return scales, torch.zeros_like(scales)


def dequantize_int4(qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                    dtype: torch.dtype | None = None) -> Tensor:
    """Float weight [N, K] in dtype (default: the scales' dtype); the math is done in float32."""
    dtype = dtype or scales.dtype
    n, g = scales.shape
    q = unpack_int4(qweight).reshape(n, g, group_size).float()
    s = scales.float()[..., None]
    w = torch.addcmul(zeros.float()[..., None] - 8.0 * s, q, s)  # (q - 8) * s + z
    return w.reshape(n, g * group_size).to(dtype)


def _scales_and_zeros(scales: Tensor, zeros: Tensor) -> Tensor:
    """tinygemm's [K // g, N, 2] table of (scale, zero)."""
    return torch.stack([scales.t(), zeros.t()], dim=-1).contiguous()


def _inner_k_tiles(k: int) -> int | None:
    return next((t for t in (8, 4, 2) if k % (t * 16) == 0), None)


def to_tinygemm(qweight: Tensor, scales: Tensor, zeros: Tensor, inner_k_tiles: int) -> tuple[Tensor, Tensor]:
    """Our layout -> (packed weight, scales_and_zeros) for aten._weight_int4pack_mm (CUDA).

    Since torch 2.5 _convert_weight_to_int4pack takes uint8 [N, K // 2] with the EVEN k in the
    HIGH nibble (gpt-fast: ``w[:, ::2] << 4 | w[:, 1::2]``), the opposite of ours: swap nibbles.
    """
    swapped = ((qweight & 0x0F) << 4) | (qweight >> 4)
    packed = torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(), inner_k_tiles)
    return packed, _scales_and_zeros(scales, zeros)


def to_cpu_pack(qweight: Tensor, scales: Tensor, zeros: Tensor, inner_k_tiles: int) -> tuple[Tensor, Tensor]:
    """Our layout -> (packed weight, scales_and_zeros) for aten._weight_int4pack_mm_for_cpu."""
    q32 = unpack_int4(qweight).to(torch.int32).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q32, inner_k_tiles)
    return packed, _scales_and_zeros(scales, zeros)


def _int4_mm_cuda(x: Tensor, packed_weight: Tensor, scales_and_zeros: Tensor, group_size: int) -> Tensor:
    """The CUDA int4 matmul for 2-D/3-D x (bf16): tinygemm. Swap this function to change kernels."""
    shape = x.shape
    y = torch.ops.aten._weight_int4pack_mm(x.reshape(-1, shape[-1]), packed_weight, group_size, scales_and_zeros)
    return y.reshape(*shape[:-1], y.shape[-1])


@torch.library.custom_op("blitzgen_quant::int4_mm_cpu", mutates_args=())
def int4_mm_cpu_op(x: Tensor, packed_weight: Tensor, group_size: int, scales_and_zeros: Tensor) -> Tensor:
    """aten's ``_weight_int4pack_mm_for_cpu`` for 2-D x, opaque to torch.compile: Inductor lowers the
    aten op to ``quantized.int4mm_packed_weight_cpu`` with the group size as a constant tensor,
    which inside a compile region (one block traced for all layers) reaches the kernel malformed
    ("group size must be a scalar", torch 2.13). As an opaque op it runs the same kernel."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed_weight, group_size, scales_and_zeros)


@int4_mm_cpu_op.register_fake
def _(x: Tensor, packed_weight: Tensor, group_size: int, scales_and_zeros: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], scales_and_zeros.shape[1])


def _int4_mm_cpu(x: Tensor, packed_weight: Tensor, scales_and_zeros: Tensor, group_size: int) -> Tensor:
    shape = x.shape
    # eager calls aten directly: a custom op's first call imports torch.distributed & co (~1.9 s)
    op = int4_mm_cpu_op if torch.compiler.is_compiling() else torch.ops.aten._weight_int4pack_mm_for_cpu
    y = op(x.reshape(-1, shape[-1]), packed_weight, group_size, scales_and_zeros)
    return y.reshape(*shape[:-1], y.shape[-1])


_PACKERS = {"cuda": (to_tinygemm, _int4_mm_cuda), "cpu": (to_cpu_pack, _int4_mm_cpu)}


@functools.lru_cache(maxsize=None)
def packed_op_works(device: str, dtype: torch.dtype, group_size: int, inner_k_tiles: int) -> bool:
    """Whether this torch build's packed int4 op for device runs and matches the dequantized
    reference (guards against the aten ops' layout or signature changing across versions)."""
    pack, mm = _PACKERS[device]
    n, k = 64, inner_k_tiles * 16 * max(1, 256 // (inner_k_tiles * 16))
    k = max(k, 2 * group_size)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen)
    x = torch.randn(3, k, generator=gen)
    try:
        qw, s, z = (t.to(device) for t in quantize_int4(w, group_size, dtype))
        packed, sz = pack(qw, s, z, inner_k_tiles)
        y = mm(x.to(device, dtype), packed, sz, group_size).float().cpu()
    except Exception as e:  # noqa: BLE001 - any failure means "do not use this op"
        warnings.warn(f"blitzgen: int4 {device} packed matmul unavailable ({type(e).__name__}: {e}); "
                      "falling back to dequantize + F.linear", stacklevel=2)
        return False
    ref = F.linear(x.to(dtype).float(), dequantize_int4(qw.cpu(), s.cpu(), z.cpu(), group_size, torch.float32))
    err = (y - ref).abs().max().item()
    ok = err <= 0.03 * ref.abs().max().item() + 1e-3
    if not ok:
        warnings.warn(f"blitzgen: int4 {device} packed matmul disagrees with the reference (max err {err:.3g}); "
                      "falling back to dequantize + F.linear", stacklevel=2)
    return ok


def prefill_choice() -> str:
    """What takes more than a few rows on CUDA: ``BLITZGEN_INT4_PREFILL`` (triton, the default, or
    tinygemm; RuntimeOptions.validate reports a bad value first)."""
    from ..runtime import env

    return (env("BLITZGEN_INT4_PREFILL") or "triton").lower()


# ------------------------------------------------------------------------------------------------
# the module


class Int4Linear(QuantizedLinear):
    STORAGE = ("qweight", "scales", "zeros")

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, group_size: int = 32,
                 dtype: torch.dtype = torch.bfloat16, device=None):
        if in_features % group_size or group_size % 2:
            raise BlitzgenError(f"group size {group_size} does not divide in_features {in_features}")
        super().__init__(in_features, out_features, bias, dtype, device)
        self.group_size = group_size
        n_groups = in_features // group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, n_groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.empty(out_features, n_groups, dtype=dtype, device=device))
        # device-specific caches, rebuilt by prepare(); never saved
        self.register_buffer("packed_weight", None, persistent=False)
        self.register_buffer("packed_scales_zeros", None, persistent=False)
        self._packed_for: tuple[str, torch.dtype] | None = None
        self._gemv = None
        self._rows = None  # blitzgen.kernels.int4_rows on CUDA when available
        self._matmul = None  # blitzgen.kernels.int4_matmul on CUDA unless BLITZGEN_INT4_PREFILL=tinygemm
        self._rows_min = INT4_ROWS_MIN  # fewer rows (but > 1) take tinygemm's packed copy
        self._cpu_rows = 0

    @classmethod
    @torch.no_grad()
    def from_linear(cls, lin: nn.Linear, group_size: int, dtype: torch.dtype | None = None,
                    symmetric: bool = False) -> "Int4Linear":
        dtype = dtype or lin.weight.dtype
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, group_size=group_size, dtype=dtype,
                device="meta")
        m.qweight, m.scales, m.zeros = quantize_int4(lin.weight, group_size, dtype, symmetric)
        m._copy_bias(lin, dtype)
        m.prepare()
        return m

    @torch.no_grad()
    def prepare(self) -> None:
        """(Re)build the packed copy for the current device and dtype, and look up the GEMV hook."""
        self.packed_weight = self.packed_scales_zeros = None
        self._packed_for, self._gemv, self._rows, self._matmul = None, None, None, None
        self._rows_min = INT4_ROWS_MIN
        self._cpu_rows = 0  # rows the CPU packed op takes (an int: no dict lookup for Dynamo to guard)
        dev, dtype = self.qweight.device.type, self.scales.dtype
        if dev not in _PACKERS:
            return
        if dev == "cuda":
            self._gemv = get_kernel("int4_gemv")
            self._rows = get_kernel("int4_rows")
            if self._rows is not None and prefill_choice() == "triton":
                self._matmul = get_kernel("int4_matmul")
                self._rows_min = 2
                return  # one copy of the weights
            shape_ok = self.out_features % 8 == 0 and dtype == torch.bfloat16
        else:  # the CPU op only pays off in bf16 (float32: no faster than dequantizing, see above)
            shape_ok = self.out_features % 16 == 0 and dtype in CPU_PACKED_MAX_TOKENS
        tiles = _inner_k_tiles(self.in_features)
        if not (shape_ok and tiles and self.group_size in TINYGEMM_GROUP_SIZES):
            return
        if not packed_op_works(dev, dtype, self.group_size, tiles):
            return
        pack, _ = _PACKERS[dev]
        self.packed_weight, self.packed_scales_zeros = pack(self.qweight, self.scales, self.zeros, tiles)
        self._packed_for = (dev, dtype)
        self._cpu_rows = CPU_PACKED_MAX_TOKENS.get(dtype, 0) if dev == "cpu" else 0

    def split_unit(self) -> int:
        return self.group_size

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize_int4(self.qweight, self.scales, self.zeros, self.group_size, dtype)

    def forward(self, x: Tensor) -> Tensor:
        packed = self._packed_for is not None and self._packed_for == (x.device.type, x.dtype)
        g = self.in_features // self.scales.shape[-1]  # = group_size, but a shape: a constant in a shared region
        if x.is_cuda and self._gemv is not None and is_single_token(x):
            y = self._gemv(x, self.qweight, self.scales, self.zeros, g)
        elif (x.is_cuda and self._rows is not None
              and self._rows_min * x.shape[-1] <= x.numel() <= ROWS_MAX * x.shape[-1]):
            y = self._rows(x, self.qweight, self.scales, self.zeros, g)
        elif x.is_cuda and self._matmul is not None:
            y = self._matmul(x, self.qweight, self.scales, self.zeros, g)
        elif packed and x.is_cuda:
            y = _int4_mm_cuda(x, self.packed_weight, self.packed_scales_zeros, g)
        elif packed and x.numel() <= self._cpu_rows * x.shape[-1]:
            y = _int4_mm_cpu(x, self.packed_weight, self.packed_scales_zeros, g)
        else:
            y = F.linear(x, dequantize_int4(self.qweight, self.scales, self.zeros, g, x.dtype))
        return self._finish(y, x)

    def describe(self) -> str:
        return f"int4, group_size={self.group_size}"


def _check(name: str, lin: nn.Linear, config: Int4Config) -> None:
    if not lin.weight.dtype.is_floating_point:
        raise BlitzgenError(f"cannot quantize {name}: its weight is {lin.weight.dtype}, not a float type")
    if lin.in_features % config.group_size:
        fits = ", ".join(str(g) for g in INT4_GROUP_SIZES if lin.in_features % g == 0) or "none"
        raise BlitzgenError(
            f"int4 group size {config.group_size} does not divide {name}'s in_features ({lin.in_features}); "
            f"use a group size that divides it (one of {fits})"
        )


def _empty(in_features: int, out_features: int, bias: bool, config: Int4Config, dtype, device) -> Int4Linear:
    return Int4Linear(in_features, out_features, bias, group_size=config.group_size, dtype=dtype, device=device)


def _quantize(lin: nn.Linear, config: Int4Config, dtype: torch.dtype) -> Int4Linear:
    return Int4Linear.from_linear(lin, config.group_size, dtype, config.symmetric)


register_handler(Int4Config, Handler(Int4Linear, _check, _quantize, _empty))
