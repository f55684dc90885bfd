"""int8 weight-only: per-output-channel symmetric, gpt-fast's ``WeightOnlyInt8Linear``.

``weight`` int8 [out, in], ``scales`` [out] in the compute dtype; w ~= weight * scales[:, None].
forward is gpt-fast's ``F.linear(x, weight.to(x.dtype)) * scales``, except eager on the CPU for up
to ``CPU_PACK_ROWS`` tokens (``torch._weight_int8pack_mm``), and with these CUDA exceptions
measured on an H200 with torch 2.11 (one 11008x4096 layer, bf16 dense = 26 us):

- one token and ``blitzgen.kernels.int8_gemv`` exists: that kernel (decode);
- 2..``kernels.ROWS_MAX`` tokens (speculative verify, short prefill chunks): ``kernels.int8_rows``,
  the weight tile dequantized in registers and multiplied on the tensor cores (kernels/mm_rows.py);
- more tokens (prefill): ``kernels.int8_matmul``, the same kernel with more rows per program, or
  from ``mm_rows.INT8_DEQUANT_ROWS`` rows a Triton dequantize into a float copy, then cuBLAS.
  Without the kernels: the formula behind a custom op, so inductor runs it as written (dequantize +
  cuBLAS, 151 us at 16 tokens) instead of fusing the conversion into its own mixed matmul (1834 us
  at 16 tokens). For one token inductor's fused kernel is kept (87 us with coordinate-descent
  tuning, vs 150 us eager).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import BlitzgenError
from ..kernels import ROWS_MAX  # the package imports Triton only on CUDA hosts
from .core import (Handler, Int8Config, QuantizedLinear, get_kernel, is_single_token, register_handler,
                   scale_eps)


@torch.library.custom_op("blitzgen_quant::int8_linear", mutates_args=())
def int8_linear_op(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """F.linear(x, weight.to(x.dtype)) * scales as one opaque op (see the module docstring), in x's
    dtype (what its fake implementation promises) whatever the scales' dtype."""
    return F.linear(x, weight.to(x.dtype)) * scales.to(x.dtype)


@int8_linear_op.register_fake
def _(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.no_grad()
def quantize_int8(w: Tensor, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """(int8 weight [out, in], scales [out] in dtype) for a float weight, round-to-nearest in float32
    on w's device. Values are quantized against the scales as rounded to dtype."""
    dtype = dtype or w.dtype
    wf = w.detach().float()
    scales = (wf.abs().amax(dim=1) / 127.0).clamp(min=scale_eps(dtype)).to(dtype)
    q = torch.div(wf, scales.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(weight: Tensor, scales: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    dtype = dtype or scales.dtype
    return (weight.float() * scales.float()[:, None]).to(dtype)


# Eager CPU, up to this many rows: torch._weight_int8pack_mm (no float copy of the weight). A
# 2-core Intel Xeon (AMX), bf16: a 49152x576 head 1.0 ms against the formula's 25.6 ms for one
# row; 3456x576 0.24 against 0.41 ms at 5 rows but 1.9 against 1.0 ms at 64 (it grows with the
# rows). Compiled, Inductor's own int8 pass takes the formula.
CPU_PACK_ROWS = 16
_CPU_ALIGN = 64
_HAS_PACK = hasattr(torch, "_weight_int8pack_mm")


def _cpu_pack_ok(x: Tensor) -> bool:
    # K % 16: with bf16 inputs the op faulted or returned inf / NaN for other widths (torch 2.13, AVX-512)
    return (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and x.shape[-1] % 16 == 0
            and x.numel() <= CPU_PACK_ROWS * x.shape[-1] and not torch.compiler.is_compiling() and _HAS_PACK)


def _aligned(t: Tensor) -> Tensor:
    t = t.contiguous()
    return t if t.data_ptr() % _CPU_ALIGN == 0 else t.clone()


class Int8Linear(QuantizedLinear):
    STORAGE = ("weight", "scales")

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self._gemv = None  # blitzgen.kernels.int8_gemv(x, weight, scales) when available, on CUDA
        self._rows = None  # blitzgen.kernels.int8_rows, likewise
        self._matmul = None  # blitzgen.kernels.int8_matmul (more rows: a prefill), likewise

    @classmethod
    @torch.no_grad()
    def from_linear(cls, lin: nn.Linear, dtype: torch.dtype | None = None) -> "Int8Linear":
        dtype = dtype or lin.weight.dtype
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, dtype=dtype, device="meta")
        m.weight, m.scales = quantize_int8(lin.weight, dtype)
        m._copy_bias(lin, dtype)
        m.prepare()
        return m

    def prepare(self) -> None:
        cuda = self.weight.device.type == "cuda"
        if self.weight.device.type == "cpu":  # _weight_int8pack_mm faults on misaligned buffers, such
            for name in ("weight", "scales"):  # as a checkpoint's mmapped tensors: an aligned copy
                t = getattr(self, name)
                if t.data_ptr() % _CPU_ALIGN:
                    setattr(self, name, t.clone())
        self._gemv = get_kernel("int8_gemv") if cuda else None
        self._rows = get_kernel("int8_rows") if cuda else None
        self._matmul = get_kernel("int8_matmul") if cuda else None

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize_int8(self.weight, self.scales, dtype)

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cuda and is_single_token(x) and self._gemv is not None:
            y = self._gemv(x, self.weight, self.scales)
        elif x.is_cuda and self._rows is not None and x.numel() <= ROWS_MAX * x.shape[-1]:
            y = self._rows(x, self.weight, self.scales)
        elif x.is_cuda and self._matmul is not None and not is_single_token(x):
            y = self._matmul(x, self.weight, self.scales)
        elif x.is_cuda and not is_single_token(x):
            y = int8_linear_op(x, self.weight, self.scales)
        elif _cpu_pack_ok(x) and not (self.weight.data_ptr() | self.scales.data_ptr()) % _CPU_ALIGN:
            y = torch._weight_int8pack_mm(_aligned(x.reshape(-1, x.shape[-1])), self.weight,
                                          self.scales.to(x.dtype)).reshape(*x.shape[:-1], -1)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales
        return self._finish(y, x)

    def describe(self) -> str:
        return "int8"


def _check(name: str, lin: nn.Linear, config: Int8Config) -> None:
    if not lin.weight.dtype.is_floating_point:
        raise BlitzgenError(f"cannot quantize {name}: its weight is {lin.weight.dtype}, not a float type")


def _quantize(lin: nn.Linear, config: Int8Config, dtype: torch.dtype) -> Int8Linear:
    return Int8Linear.from_linear(lin, dtype)


def _empty(in_features: int, out_features: int, bias: bool, config: Int8Config, dtype, device) -> Int8Linear:
    return Int8Linear(in_features, out_features, bias, dtype=dtype, device=device)


register_handler(Int8Config, Handler(Int8Linear, _check, _quantize, _empty))
