"""Build the model on the meta device and assign weights onto it, with a shape check per tensor."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from ..config import ModelArgs
from ..errors import ModelLoadError
from ..model import Transformer
from .names import mapping


def build_model(
    args: ModelArgs,
    source: str,
    get_tensor: Callable[[str], torch.Tensor],
    available: Iterable[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
    quantize: object | None = None,
    quant_dtype: torch.dtype | None = None,
) -> tuple[Transformer, dict | None]:
    """Create ``Transformer(args)`` without allocating, then fill every parameter from the source.

    get_tensor(name) returns one source tensor; transform(name, tensor) may fix a source layout
    (GGUF's q/k permutation). Parts are concatenated along dim 0 (fused wqkv / w13).

    With ``quantize`` (a quant config), each target Linear is quantized as soon as its weight is
    on the device and the float weight is dropped, so the peak is the quantized model plus one
    float layer rather than the whole float model; scales and zeros are in ``quant_dtype``
    (default: dtype). Returns (model, quantization metadata or None).
    """
    available = set(available)
    tied = args.tie_word_embeddings
    if not tied and "output.weight" not in _ours_present(args, source, available):
        # Checkpoints that omit the output head share it with the embedding (SmolLM2, Llama 3.2).
        tied = True
        args.tie_word_embeddings = True
    with torch.device("meta"):
        model = Transformer(args)
    table = mapping(args.n_layers, source, args.qkv_bias, tied)
    missing = [p for parts in table.values() for p in parts if p not in available]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ModelLoadError(f"checkpoint is missing tensors: {', '.join(missing[:5])}{more}")
    expected = dict(model.named_parameters(remove_duplicate=False))
    handler, targets = None, {}
    qdtype = quant_dtype or dtype
    if quantize is not None:
        from ..quant.core import make_config, plan_quantization

        if isinstance(quantize, str):
            quantize = make_config(quantize)
        handler, targets = plan_quantization(model, quantize, qdtype)  # bad configs fail before loading
    pending: dict[str, dict[str, torch.Tensor]] = {}
    state: dict[str, torch.Tensor] = {}
    bar = tqdm(table.items(), desc="loading weights", unit="tensor", disable=not progress, leave=False)
    for ours, parts in bar:
        tensors = []
        for name in parts:
            t = get_tensor(name)
            if transform is not None:
                t = transform(name, t)
            tensors.append(t)
        t = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
        want = tuple(expected[ours].shape)
        if tuple(t.shape) != want:
            raise ModelLoadError(
                f"tensor {'+'.join(parts)} has shape {tuple(t.shape)}, expected {want} for {ours}"
            )
        t = t.to(device=device, dtype=dtype)
        module, _, pname = ours.rpartition(".")
        if module in targets:
            parts_in = pending.setdefault(module, {})
            parts_in[pname] = t
            if "weight" in parts_in and ("bias" in parts_in or not targets[module]):
                _swap_quantized(model, module, pending.pop(module), handler, quantize, qdtype)
            continue
        state[ours] = t
    if tied and "output" in targets:  # the head gets its own quantized copy; the embedding stays float
        _swap_quantized(model, "output", {"weight": state["tok_embeddings.weight"]}, handler, quantize, qdtype)
    elif tied:
        state["output.weight"] = state["tok_embeddings.weight"]
    done = tuple(name + "." for name in targets)
    result = model.load_state_dict(state, strict=False, assign=True)
    left = [k for k in result.missing_keys if not k.startswith(done)] + list(result.unexpected_keys)
    if left or pending:  # the name table and the model disagree: a bug, not a user error
        raise RuntimeError(f"weights not assigned: {left + sorted(pending)}")
    if tied and "output" not in targets:
        model.output.weight = model.tok_embeddings.weight
    meta = None
    if quantize is not None:
        from ..quant.core import quant_metadata

        meta = quant_metadata(quantize, qdtype, len(targets))
    return model.eval(), meta


def _swap_quantized(model, name, tensors, handler, config, dtype) -> None:
    from ..quant.core import quantize_weight, set_submodule

    set_submodule(model, name, quantize_weight(handler, config, tensors["weight"], tensors.get("bias"), dtype))


def _ours_present(args: ModelArgs, source: str, available: set[str]) -> set[str]:
    table = mapping(args.n_layers, source, args.qkv_bias, tied=False)
    return {ours for ours, parts in table.items() if all(p in available for p in parts)}
