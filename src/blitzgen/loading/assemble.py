"""The one assemble step every source goes through: build the model on the meta device, map
names through the one table, check each tensor's shape and dtype, quantize each layer as its
weights arrive (or put in a checkpoint's quantized modules), tie the head, assign."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
from typing import Iterator, Protocol

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..config import ModelArgs
from ..errors import ModelLoadError
from ..model import Transformer
from ..quant.core import (make_config, module_config, plan_quantization, prepare_model, quant_metadata,
                          quantize_weight, set_submodule, target_linears)
from .names import mapping


class Source(Protocol):
    """A weight source. ``column``: its naming ("hf", "gguf", or "ours": our own state-dict names)."""

    column: str

    def names(self) -> list[str]: ...

    def get(self, name: str) -> torch.Tensor: ...


def assemble(
    args: ModelArgs,
    source: Source,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    quantize: object | None = None,
    quant_dtype: torch.dtype | None = None,
    prequantized: object | None = None,
    progress: bool = True,
    where: str = "checkpoint",
    shard=None,
    record=None,
) -> tuple[Transformer, ModelArgs, dict | None]:
    """``Transformer(args)`` filled from ``source``; returns (model, args, quantization metadata).

    ``args`` is never changed: a source without an output head gets a copy with a tied head
    (SmolLM2, Llama 3.2). Float tensors are cast to ``dtype``; integer ones are kept as they are.

    quantize: a quant config (or "int8"/"int4"). Each target Linear is quantized as soon as its
    weight is on the device and the float weight is dropped, so the peak is the quantized model
    plus one float layer; scales and zeros in ``quant_dtype`` (default: dtype). Bad configs fail
    before anything is read.
    prequantized: the config of a checkpoint whose tensors are already quantized (our names):
    the quantized modules are put in empty and filled as they are, never re-quantized.
    shard: a tensor-parallel plan (parallel.tp.TPPlan): the model is this rank's
    (``shard.rank_args``) and each tensor is read through ``shard.read``, which reads only this
    rank's rows or columns, so a rank never holds the whole model.
    """
    if shard is not None:
        args = shard.rank_args(args)
    names = set(source.names())
    column = source.column
    model = meta_model(args)
    if not args.tie_word_embeddings and prequantized is None:  # no head in the file: it shares the embedding
        head = _table(args, column, model, tied=False).get("output.weight")
        if head is not None and not all(p in names for p in head):
            args = dataclasses.replace(args, tie_word_embeddings=True)
            model = meta_model(args)
    tied = args.tie_word_embeddings
    qdtype = quant_dtype or dtype
    targets, config = {}, quantize
    if prequantized is not None:
        for name, lin in target_linears(model):
            if name == "output" and not getattr(prequantized, "head", True):
                continue  # the head was left float
            h, c = module_config(prequantized, name)
            set_submodule(model, name, h.empty(lin.in_features, lin.out_features, lin.bias is not None,
                                               c, dtype, "meta"))
    elif quantize is not None:
        config = make_config(quantize) if isinstance(quantize, str) else quantize
        _, targets = plan_quantization(model, config, qdtype)
    expected = model.state_dict(keep_vars=True)
    table = _table(args, column, model, tied)
    missing = [p for parts in table.values() for p in parts if p not in names]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ModelLoadError(f"{where} is missing tensors: {', '.join(missing[:5])}{more}")
    if column == "ours":  # our own files must match the model exactly
        extra = sorted(names - {p for parts in table.values() for p in parts})
        if extra:
            more = f" (and {len(extra) - 5} more)" if len(extra) > 5 else ""
            raise ModelLoadError(f"{where} has tensors this model does not use: {', '.join(extra[:5])}{more} "
                                 "(config.json does not match the weights)")
    transform = getattr(source, "transform", None)
    pending: dict[str, dict[str, torch.Tensor]] = {}
    state: dict[str, torch.Tensor] = {}
    total = sum(expected[k].numel() * _size(expected[k], dtype) for k in table)
    bar = tqdm(total=total, desc="loading weights", unit="B", unit_scale=True, leave=False,
               disable=not (progress and sys.stderr.isatty()))
    if record is not None:
        record.begin([(k, expected[k].shape, dtype if expected[k].is_floating_point() else expected[k].dtype)
                      for k in table])
    for ours, parts in table.items():
        tensors = []
        if shard is not None:
            tensors.append(shard.read(ours, parts, source))
        for name in parts if shard is None else ():
            t = source.get(name)
            tensors.append(transform(name, t) if transform is not None else t)
        t = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
        want = expected[ours]
        if tuple(t.shape) != tuple(want.shape):
            raise ModelLoadError(f"tensor {'+'.join(parts)} has shape {tuple(t.shape)}, expected "
                                 f"{tuple(want.shape)} for {ours}")
        if want.is_floating_point() != t.is_floating_point() or (not want.is_floating_point() and t.dtype != want.dtype):
            raise ModelLoadError(f"tensor {'+'.join(parts)} in {where} is {t.dtype}, expected {want.dtype}")
        t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        if record is not None:
            record.add(ours, t)
        bar.update(t.numel() * t.element_size())
        module, _, pname = ours.rpartition(".")
        if module in targets:
            got = pending.setdefault(module, {})
            got[pname] = t
            if "weight" in got and ("bias" in got or not targets[module]):
                got = pending.pop(module)
                set_submodule(model, module, quantize_weight(*module_config(config, module), got["weight"],
                                                             got.get("bias"), qdtype))
            continue
        state[ours] = t
        del t, tensors
    bar.close()
    if tied and "output" in targets:  # the head gets its own quantized copy; the embedding stays float
        set_submodule(model, "output", quantize_weight(*module_config(config, "output"),
                                                       state["tok_embeddings.weight"], None, qdtype))
    elif tied and isinstance(model.output, nn.Linear):
        state["output.weight"] = state["tok_embeddings.weight"]
    done = tuple(name + "." for name in targets)
    result = model.load_state_dict(state, strict=False, assign=True)
    left = [k for k in result.missing_keys if not k.startswith(done)] + list(result.unexpected_keys)
    if left or pending:  # the name table and the model disagree: a bug, not a user error
        raise RuntimeError(f"weights not assigned: {left + sorted(pending)}")
    if tied and isinstance(model.output, nn.Linear):
        model.output.weight = model.tok_embeddings.weight
    if prequantized is not None:
        prepare_model(model)  # assigned buffers: build the packed copies and kernel hooks
    meta = quant_metadata(config, qdtype, len(targets)) if targets else None
    return model.eval(), args, meta


_INIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """nn.init's initializers as no-ops (meta tensors have no values to initialize); one thread at
    a time, so that the originals are always what gets restored."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]
    with _INIT_LOCK:
        saved = {n: getattr(nn.init, n) for n in names}
        try:
            for n in names:
                setattr(nn.init, n, lambda tensor, *a, **k: tensor)
            yield
        finally:
            for n, f in saved.items():
                setattr(nn.init, n, f)


def meta_model(args: ModelArgs) -> Transformer:
    """``Transformer(args)`` on the meta device without running the initializers: on a meta tensor
    ``nn.init.normal_`` (the embedding's) runs a Dynamo-guarded reference op whose first call imports
    torch._dynamo, ~1.5 s of an eager start on 2 cores."""
    with torch.device("meta"), _no_init():
        return Transformer(args)


def _table(args: ModelArgs, column: str, model: nn.Module, tied: bool) -> dict[str, list[str]]:
    """{our state-dict name: [source tensors concatenated along dim 0]}."""
    if column != "ours":
        return mapping(args.n_layers, column, args.qkv_bias, tied)
    shared = tied and isinstance(model.output, nn.Linear)  # a float tied head is the embedding itself
    return {k: [k] for k in model.state_dict(keep_vars=True) if not (shared and k == "output.weight")}


def record_model(record, model: nn.Module, args: ModelArgs) -> None:
    """Stream a whole assembled model's tensors (quantized buffers included) to a recorder
    (loading/converted.Recorder), in the names and layout that ``assemble(prequantized=...)`` reads
    back: what a converted-weights entry of a quantized load holds."""
    table = _table(args, "ours", model, args.tie_word_embeddings)
    state = model.state_dict()
    record.begin([(k, state[k].shape, state[k].dtype) for k in table])
    for k in table:
        record.add(k, state[k])


def _size(t: torch.Tensor, dtype: torch.dtype) -> int:
    return (dtype if t.is_floating_point() else t.dtype).itemsize
