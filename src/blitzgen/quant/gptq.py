"""GPTQ for int4: quantize each Linear column by column, pushing every column's rounding error onto
the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs (Frantar et
al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers").

The result is an ordinary blitzgen int4 layout (qweight, scales, zeros per group; see int4.py), so
checkpoints, kernels and loading are the same as for round-to-nearest; only the chosen codes and
the group ranges differ. Group parameters (min/max, as in ``quantize_int4``) are taken from the
error-updated columns when each group starts. Layers are processed in order: block by block, and
inside a block wqkv, wo, w13, w2 in turn, each seeing the inputs that the already-quantized layers
before it produce (GPTQ's "true sequential" order); the output head last.

Written here rather than taken from a library: GPTQ implementations (auto-gptq, gptqmodel,
torchao's prototype) each emit their own packed format and model classes; ours must emit the
layout our kernels and checkpoints read, and the algorithm is ~60 lines.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import BlitzgenError
from .core import (Int4Config, handler_for, is_quantized, module_config, plan_quantization, quant_metadata,
                   set_submodule, target_linears)
from .int4 import Int4Linear, group_params, pack_int4, quantize_int4

BLOCK_TARGETS = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")  # in this order


@torch.no_grad()
def gptq_quantize_weight(w: Tensor, H: Tensor, group_size: int, dtype: torch.dtype, *,
                         damp: float = 0.01, block: int = 128) -> tuple[Tensor, Tensor, Tensor]:
    """(qweight, scales, zeros) in blitzgen's int4 layout for weight [N, K], given H = sum x x^T
    [K, K] over calibration inputs x of this layer. Float32 math on w's device."""
    n, k = w.shape
    if k % group_size:
        raise BlitzgenError(f"group size {group_size} does not divide in_features {k}")
    block = max(group_size, block // group_size * group_size)  # groups never straddle a block
    W = w.detach().float().clone()
    H = H.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += torch.eye(k, device=H.device) * (damp * torch.diag(H).mean())
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except RuntimeError:  # not positive definite even with damping: round to nearest instead
        return quantize_int4(w, group_size, dtype)
    q = torch.empty(n, k, dtype=torch.uint8, device=W.device)
    scales = torch.empty(n, k // group_size, dtype=dtype, device=W.device)
    zeros = torch.empty_like(scales)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                s_, z_ = group_params(W1[:, i:i + group_size], dtype)
                scales[:, col // group_size], zeros[:, col // group_size] = s_, z_
                s, z = s_.float(), z_.float()
            x = W1[:, i]
            code = torch.round((x - z) / s).add_(8.0).clamp_(0, 15)
            q[:, col] = code.to(torch.uint8)
            err = (x - ((code - 8.0) * s + z)) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return pack_int4(q), scales, zeros


class _HessianHook:
    """Forward pre-hook summing x^T x over every input row of one Linear."""

    def __init__(self, k: int, device):
        self.H = torch.zeros(k, k, dtype=torch.float32, device=device)

    def __call__(self, module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        self.H.addmm_(x.t(), x)


def _quantized_linear(lin: nn.Linear, H: Tensor, config: Int4Config, dtype: torch.dtype, damp: float) -> Int4Linear:
    m = handler_for(config).empty(lin.in_features, lin.out_features, lin.bias is not None, config, dtype, "meta")
    m.qweight, m.scales, m.zeros = gptq_quantize_weight(lin.weight, H, config.group_size, dtype, damp=damp)
    if lin.bias is not None:
        m.bias = lin.bias.detach().to(dtype=dtype, copy=True)
    m.prepare()
    return m


@torch.no_grad()
def gptq_quantize_model(model, config: Int4Config, samples: Sequence[Sequence[int]], *, damp: float = 0.01,
                        dtype: torch.dtype | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Quantize a loaded float model's Linear layers to int4 in place with GPTQ, calibrated on
    ``samples`` (lists of token ids, run one at a time). Scales and zeros are in ``dtype`` (default:
    the weights' dtype). Returns quantization metadata. The model is changed layer by layer: after
    an error part way (out of memory, say) it is partly quantized and should be reloaded."""
    if not isinstance(config, Int4Config):
        raise BlitzgenError("GPTQ applies to int4 only")
    if is_quantized(model):
        raise BlitzgenError("the model is already quantized")
    samples = [list(s) for s in samples if len(s) > 0]
    if not samples:
        raise BlitzgenError("GPTQ needs calibration text (no tokens given)")
    targets = target_linears(model)
    dtype = dtype or (targets[0][1].weight.dtype if targets else torch.float32)
    _, names = plan_quantization(model, config, dtype)  # every layer checked before any is changed
    device = model.tok_embeddings.weight.device
    longest = max(len(s) for s in samples)
    if longest > model.args.max_seq_len:
        raise BlitzgenError(f"calibration samples of {longest} tokens exceed the model's context length "
                            f"({model.args.max_seq_len}); use shorter samples")
    if model.cache_len < longest:
        model.setup_caches(1, longest)
    t0 = time.perf_counter()

    def block_inputs(ids: list[int]):
        pos = torch.arange(len(ids), device=device)
        return (pos, *model.rope_and_mask(pos))

    xs = [model.tok_embeddings(torch.tensor([ids], device=device)) for ids in samples]
    ctx = [block_inputs(ids) for ids in samples]
    for li, layer in enumerate(model.layers):
        for name in BLOCK_TARGETS:
            hook = _HessianHook(layer.get_submodule(name).in_features, device)
            handle = layer.get_submodule(name).register_forward_pre_hook(hook)
            try:
                for x, (pos, rope, mask) in zip(xs, ctx):
                    layer(x, rope, mask, pos)
            finally:
                handle.remove()
            set_submodule(layer, name, _quantized_linear(layer.get_submodule(name), hook.H, config, dtype, damp))
        xs = [layer(x, rope, mask, pos) for x, (pos, rope, mask) in zip(xs, ctx)]
        if log:
            log(f"GPTQ: block {li + 1}/{len(model.layers)} ({time.perf_counter() - t0:.0f} s)")
    if getattr(config, "head", True) == "int8":  # round to nearest, as an int8 layer
        h, c = module_config(config, "output")
        model.output = h.quantize(model.output, c, dtype)
    elif getattr(config, "head", True):
        hook = _HessianHook(model.output.in_features, device)
        for x in xs:
            hook(None, (model.norm(x),))
        # a tied head gets its own quantized copy; the embedding stays float
        model.output = _quantized_linear(model.output, hook.H, config, dtype, damp)
    return {**quant_metadata(config, dtype, len(names)), "method": "gptq",
            "calibration_tokens": sum(len(s) for s in samples), "damp": damp}


def calibration_samples(tokenizer, path, *, max_tokens: int = 8192, seq_len: int = 512) -> list[list[int]]:
    """Token-id samples of at most seq_len from a calibration file: plain text, or JSON Lines with a
    "text" field per line (each document tokenized on its own), up to max_tokens in all."""
    import json
    from pathlib import Path

    path = Path(path).expanduser()
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BlitzgenError(f"cannot read the calibration file {path}: {e}") from None
    if path.suffix.lower() == ".jsonl":
        docs = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                docs.append(str(obj["text"]))
            except (ValueError, KeyError, TypeError):
                raise BlitzgenError(f"{path}:{n}: expected a JSON object with a \"text\" field per line") from None
    else:
        docs = [raw]
    samples: list[list[int]] = []
    total = 0
    for doc in docs:
        ids = tokenizer.encode(doc)
        for i in range(0, len(ids), seq_len):
            chunk = ids[i:i + seq_len][: max_tokens - total]
            if chunk:
                samples.append(chunk)
                total += len(chunk)
            if total >= max_tokens:
                return samples
    if not samples:
        raise BlitzgenError(f"the calibration file {path} has no text")
    return samples
