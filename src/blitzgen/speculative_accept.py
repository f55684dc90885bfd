"""Speculative decoding's tensor functions: the target's sampling distribution, the rejection
rule, and the step functions compiled into the verify and draft graphs (speculative.py runs them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .model import Transformer
from .sampling import filter_logits


# ---- probabilities and acceptance (pure tensor functions, compiled into the verify graph) ------
def sampling_probs(logits: Tensor, t: dict[str, Tensor], mode: tuple) -> Tensor:
    """logits [N, V] -> the distribution sampling.sample draws from, [N, V] float32: one-hot at
    the argmax when greedy, else softmax of sampling.filter_logits."""
    if mode[0]:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    if mode[1] and logits.shape[0] > 1:  # row by row, [1, V] each as the sampler runs them (an
        # H200's Inductor, torch 2.11, failed to generate top-p's split cumsum over [5, 32000])
        return torch.cat([filter_logits(row, t, mode) for row in logits.split(1)]).softmax(-1)
    return filter_logits(logits, t, mode).softmax(-1)


def accept_tokens(p: Tensor, q: Tensor, draft: Tensor, k_eff: Tensor, u: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """Speculative rejection sampling for one round.

    p: [K+1, V] target probabilities at the K+1 verify positions; q: [K, V] the draft's
    probabilities of its K tokens (one-hot for deterministic drafts); draft: [K] tokens; k_eff: []
    how many drafts are real (the rest is padding); u: [K] uniforms in [0, 1); noise: [V] Exp(1)
    draws. Returns (n accepted drafts [], next token []): x_i is accepted iff u_i q(x_i) < p(x_i),
    the next token is drawn from max(0, p_n - q_n) (or p_n after k_eff accepts) by the exponential
    race, which needs no normalisation. Greedy: u = 0, noise = 1.
    """
    K = draft.shape[0]
    live = torch.arange(K, device=draft.device) < k_eff  # [K]
    px = p[:K].gather(1, draft[:, None]).squeeze(1)
    qx = q.gather(1, draft[:, None]).squeeze(1)
    ok = (u * qx < px) & live
    n = ok.long().cumprod(0).sum()  # leading accepts
    q_rows = torch.cat([q * live[:, None], torch.zeros_like(q[:1])])  # no q row after the drafts
    pn = p.index_select(0, n.view(1))[0]
    r = (pn - q_rows.index_select(0, n.view(1))[0]).clamp_min(0)
    r = torch.where(r.sum() > 0, r, pn)
    return n, (r / noise).argmax()


# ---- step functions (compiled: model forwards as CUDA graphs, sampler/acceptance as small graphs) --
def _fit_vocab(logits: Tensor, vocab: int) -> Tensor:
    """A draft model's logits cut or padded (with -inf) to the target's vocabulary size."""
    V = logits.shape[-1]
    if V == vocab:
        return logits
    if V > vocab:
        return logits[..., :vocab]
    return F.pad(logits, (0, vocab - V), value=-float("inf"))


def _verify_logits(model: Transformer, idx: Tensor, pos: Tensor) -> Tensor:
    """Target forward on idx [1, K+1] (last token + K drafts) at pos [K+1] -> logits [K+1, V]."""
    return model(idx, pos)[0]


def _accept(logits: Tensor, q: Tensor, draft: Tensor, k_eff: Tensor, u: Tensor, noise: Tensor, samp: dict,
            mode: tuple) -> Tensor:
    """A verify's acceptance: [n accepted drafts, next token] (one read back)."""
    return torch.stack(accept_tokens(sampling_probs(logits, samp, mode), q, draft, k_eff, u, noise))


def _accept_host(logits: Tensor, draft: Tensor, k_eff: Tensor, u: Tensor, noise: Tensor, samp: dict,
                 mode: tuple) -> Tensor:
    """``_accept`` for a deterministic (host) draft: q is one-hot at the drafted tokens."""
    q = F.one_hot(draft, logits.shape[-1]).float()
    return torch.stack(accept_tokens(sampling_probs(logits, samp, mode), q, draft, k_eff, u, noise))


def _draft_pick(logits: Tensor, samp: dict, mode: tuple, noise: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    """A draft step's token [1] and its distribution q [1, V_target] from the draft's logits [1, V]."""
    q = sampling_probs(_fit_vocab(logits, vocab), samp, mode)
    return (q / noise).argmax(-1), q


# ---- the decoder -------------------------------------------------------------------------------
