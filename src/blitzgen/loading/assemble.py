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
) -> Transformer:
    """Create ``Transformer(args)`` without allocating, then fill every parameter from the source.

    get_tensor(name) returns one source tensor; transform(name, tensor) may fix a source layout
    (GGUF's q/k permutation). Parts are concatenated along dim 0 (fused wqkv / w13).
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
        state[ours] = t.to(device=device, dtype=dtype)
    if tied:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if tied:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def _ours_present(args: ModelArgs, source: str, available: set[str]) -> set[str]:
    table = mapping(args.n_layers, source, args.qkv_bias, tied=False)
    return {ours for ours, parts in table.items() if all(p in available for p in parts)}
