"""How close a quantized model's logits stay to the float model's (tests and benchmarks/quant_quality.py).

Teacher-forced: one forward pass over a fixed text; at every position compare the next-token
distributions. Greedy agreement = share of positions whose argmax is the same; KL = mean over
positions of KL(reference || quantized) in nats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# A fixed English passage (Charles Dickens, A Tale of Two Cities, public domain), ~128 tokens.
QUALITY_TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair, we had "
    "everything before us, we had nothing before us, we were all going direct to Heaven, we were all "
    "going direct the other way - in short, the period was so far like the present period, that some of "
    "its noisiest authorities insisted on its being received."
)


@torch.inference_mode()
def teacher_forced_logits(model, ids: list[int] | Tensor) -> Tensor:
    """Float32 logits [T, V] of one forward pass over ids (the model's caches are (re)set up)."""
    ids = torch.as_tensor(ids, dtype=torch.int64, device=model.device).view(1, -1)
    n = ids.shape[1]
    if model.cache_len < n:
        model.setup_caches(1, n)
    return model(ids, torch.arange(n, device=model.device))[0].float()


def logit_metrics(ref: Tensor, other: Tensor) -> dict:
    """{"agreement": share of equal argmax, "kl": mean KL(ref || other), "max_kl", "positions"}."""
    ref, other = ref.float(), other.float()
    lp, lq = F.log_softmax(ref, dim=-1), F.log_softmax(other, dim=-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    agree = (ref.argmax(-1) == other.argmax(-1)).float().mean().item()
    return {"agreement": agree, "kl": kl.mean().item(), "max_kl": kl.max().item(), "positions": ref.shape[0]}
