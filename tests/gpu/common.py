"""Shared helpers of the GPU suite: a random Llama-3-style model and a tie-aware greedy check."""

from __future__ import annotations

import torch

from blitzgen.config import ModelArgs
from blitzgen.model import Transformer
from blitzgen.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)
# Llama-3-style: GQA (16 query heads over 4 KV heads), rope theta 500k with llama3 scaling.
SHAPE = dict(vocab_size=32000, dim=1024, n_layers=4, n_heads=16, n_kv_heads=4, intermediate_size=2816,
             rope_theta=500000.0, max_seq_len=1024,
             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 256})
LOGIT_STD = 2.0  # output head scale: logits of std ~2, the largest near 8 (bf16 rounds them to 1/16)


def random_model(dtype=torch.bfloat16, quantize: str | None = None, group_size: int | None = None,
                 cache: int = 256, seed: int = 0, device: str = "cuda", **overrides) -> Transformer:
    """A random model (on CUDA by default) with a KV cache of ``cache`` positions. Built on the CPU from a seed,
    so two calls give the same weights (an eager oracle and a compiled copy)."""
    from blitzgen.quant import make_config, quantize_model

    args = ModelArgs(**{**SHAPE, **overrides})
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name == "tok_embeddings.weight":
                p.normal_(0.0, 1.0)
            elif name == "output.weight":
                p.normal_(0.0, LOGIT_STD / args.dim ** 0.5)
            else:
                p.normal_(0.0, 0.02)
    model = model.to(device=device, dtype=dtype).eval()
    if quantize:
        quantize_model(model, make_config(quantize, group_size))
    model.setup_caches(1, cache)
    return model


@torch.inference_mode()
def teacher_forced_logits(model: Transformer, ids: list[int]) -> torch.Tensor:
    """Eager logits [len(ids), V] (float32) of one forward over the whole sequence."""
    n = len(ids)
    assert n <= model.max_seq_len, (n, model.max_seq_len)
    x = torch.tensor([ids], device=model.device)
    return model(x, torch.arange(n, device=model.device))[0].float()


def check_greedy(oracle: Transformer, prompt: list[int], got: list[int], tol: float,
                 eager: list[int] | None = None) -> str:
    """Every token of ``got`` must be the oracle's argmax, up to ``tol`` in logit, given the tokens
    before it (teacher forcing: one divergence does not hide later errors). With ``eager`` (the
    oracle's own greedy tokens), ``got`` must equal it up to the first step where the oracle's top
    two are within ``tol`` (a near-tie that rounding may break either way). Returns a summary."""
    logits = teacher_forced_logits(oracle, prompt + got[:-1])[len(prompt) - 1:]  # [len(got), V]
    assert logits.shape[0] == len(got)
    top2 = logits.topk(2, dim=-1).values
    chosen = logits.gather(1, torch.tensor(got, device=logits.device)[:, None])[:, 0]
    deficit = (top2[:, 0] - chosen).cpu()
    bad = [(i, got[i], float(deficit[i])) for i in range(len(got)) if deficit[i] > tol]
    assert not bad, f"tokens that are not the oracle's argmax (step, token, logit deficit): {bad[:8]}"
    msg = f"{len(got)} tokens within {tol} of argmax (max deficit {float(deficit.max()):.3f})"
    if eager is not None:
        gaps = (top2[:, 0] - top2[:, 1]).cpu()
        same = next((i for i, (a, b) in enumerate(zip(got, eager)) if a != b), min(len(got), len(eager)))
        tie = next((i for i in range(len(got)) if gaps[i] <= tol), len(got))
        assert same >= min(tie, len(eager)), (
            f"differs from eager at step {same} before any near-tie (first near-tie at {tie}): "
            f"{got[:same + 1]} vs {eager[:same + 1]}")
        msg += f"; identical to eager for {same}/{len(got)} (first near-tie at {tie})"
    return msg


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
