"""A Llama block for ONE decode token through the fused GEMVs (fused_gemv.py): 4 GEMV kernels
instead of 4 GEMVs + 2 add/RMSNorm kernels + 1 SwiGLU kernel.

    h   = x + wo(attend(wqkv(rmsnorm(x))))          # wqkv: norm prologue; wo: residual epilogue
    out = h + w2(silu(gate) * up), [gate; up] = w13(rmsnorm(h))   # w13: norm + SwiGLU; w2: residual

Off by default: ``RuntimeOptions.fused_decode`` (``BLITZGEN_FUSED=1``) turns it on through
``enable(model, True)``, which sets ``TransformerBlock.fused_decode`` to ``block_forward``; the block takes this path only
for one token (B = T = 1), so prefill and speculative verification keep the plain path. A layer
that is not nn.Linear / Int8Linear / Int4Linear (e.g. tensor parallelism's RowParallel, whose
all-reduce must come before the residual add) or a w13 with a bias runs unfused, layer by layer.
On CPU tensors the fused ops compute their plain-PyTorch references (tests).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import kernels, runtime
from ..quant.int4 import Int4Linear
from ..quant.int8 import Int8Linear


def fused_linear(mod: nn.Module, x: Tensor, norm: nn.Module | None = None, residual: Tensor | None = None,
                 swiglu: bool = False) -> Tensor | None:
    """``mod(norm(x))`` (then silu(gate) * up, or + residual) as one fused op, or None when ``mod``
    is not a layer the fused kernels take."""
    kind = type(mod)
    if kind not in (nn.Linear, Int8Linear, Int4Linear):
        return None
    bias = mod.bias
    if bias is not None and swiglu:
        return None
    g, eps = (norm.weight, float(norm.eps)) if norm is not None else (None, 1e-5)
    res = residual if bias is None else None
    if kind is Int4Linear:
        y = kernels.fused_int4_gemv(x, mod.qweight, mod.scales, mod.zeros, mod.group_size, g, eps, res, swiglu)
    elif kind is Int8Linear:
        y = kernels.fused_int8_gemv(x, mod.weight, mod.scales, g, eps, res, swiglu)
    else:
        y = kernels.fused_float_gemv(x, mod.weight, g, eps, res, swiglu)
    if bias is not None:
        y = y + bias.to(y.dtype)
        if residual is not None:
            y = residual + y
    return y


def block_forward(layer: nn.Module, x: Tensor, rope: Tensor, mask: Tensor, input_pos: Tensor) -> Tensor:
    """model.TransformerBlock.forward for x [1, 1, dim], through the fused GEMVs where possible."""
    attn, ff = layer.attention, layer.feed_forward
    qkv = fused_linear(attn.wqkv, x, norm=layer.attention_norm)
    if qkv is None:
        qkv = attn.wqkv(layer.attention_norm(x))
    y = attn.attend(qkv, rope, mask, input_pos)
    h = fused_linear(attn.wo, y, residual=x)
    if h is None:
        h = x + attn.wo(y)
    act = fused_linear(ff.w13, h, norm=layer.ffn_norm, swiglu=True)
    if act is None:
        gate, up = ff.w13(layer.ffn_norm(h)).split(ff.intermediate_size, dim=-1)
        act = F.silu(gate) * up
    out = fused_linear(ff.w2, act, residual=h)
    return out if out is not None else h + ff.w2(act)


def enable(model: nn.Module, on: bool) -> bool:
    """Turn the fused one-token path of every block on or off (before compiling). On CUDA without
    the Triton kernels it stays off (reported once: the references would be far slower). Returns
    whether it is on."""
    if on and torch.device(model.device).type == "cuda" and not kernels.available():
        runtime.fallback("fused decode (BLITZGEN_FUSED)", kernels.unavailable_reason() or "unknown")
        on = False
    for layer in model.layers:
        layer.fused_decode = block_forward if on else None
    return bool(on)
