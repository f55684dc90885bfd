"""Sampling: logits -> next token, as pure tensor functions with no host sync.

Temperature, top-k, top-p and min-p values travel as tensors, so changing them never recompiles a
compiled sampler; only *which* paths run (``SamplingParams.mode``: greedy, temperature, the sorted
top-k/top-p filter, each with or without min-p: five modes) is a static choice. top-k and top-p
share the sorted path, with neutral values (top_k 0 = all, top_p 1 = all) when one is off.
Random draws use the exponential-race trick (argmax(p / q), q ~ Exp(1)), which samples exactly
from p and needs no multinomial sync; the noise comes from a per-request torch.Generator so a
seed reproduces a sequence.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    seed: int | None = None

    def validate(self) -> "SamplingParams":
        def bad(param: str, msg: str):
            raise InvalidRequestError(f"invalid {param}: {msg}", param=param)

        t = self.temperature
        if not isinstance(t, (int, float)) or math.isnan(t) or t < 0 or t > 100:
            bad("temperature", f"{t!r} (must be between 0 and 100; 0 is greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", f"{self.top_k!r} (must be an integer >= 0; 0 disables it)")
        if not isinstance(self.top_p, (int, float)) or not (0 < self.top_p <= 1):
            bad("top_p", f"{self.top_p!r} (must be in (0, 1])")
        if not isinstance(self.min_p, (int, float)) or not (0 <= self.min_p <= 1):
            bad("min_p", f"{self.min_p!r} (must be in [0, 1])")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0 or self.seed >= 2**63):
            bad("seed", f"{self.seed!r} (must be a non-negative integer)")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def mode(self) -> tuple[bool, bool, bool]:
        """(greedy, sorted filter on (top-k or top-p), min_p on): the static part of a compiled sampler."""
        if self.greedy:
            return (True, False, False)
        return (False, self.top_k > 0 or self.top_p < 1.0, self.min_p > 0.0)

    def tensors(self, device) -> dict[str, Tensor]:
        return {
            "temperature": torch.tensor(max(self.temperature, 1e-5), dtype=torch.float32, device=device),
            "top_k": torch.tensor(self.top_k, dtype=torch.int64, device=device),
            "top_p": torch.tensor(self.top_p, dtype=torch.float32, device=device),
            "min_p": torch.tensor(self.min_p, dtype=torch.float32, device=device),
        }


def choice_sampling(sampling: SamplingParams, index: int) -> SamplingParams:
    """The sampling of choice ``index`` of one request: with a seed, choice i uses seed + i (mod
    2**63), so choices differ yet a request reproduces; choice 0 is the request's own seed."""
    if sampling.seed is None or index == 0:
        return sampling
    return dataclasses.replace(sampling, seed=(sampling.seed + index) % 2**63)


def sampler_modes() -> list[SamplingParams]:
    """One SamplingParams per distinct ``mode`` (greedy; then temperature alone or with the sorted
    top-k/top-p filter, each with and without min-p): five small compiled samplers, so a warm-up
    runs all of them."""
    modes = [SamplingParams(temperature=0.0)]
    for s, m in itertools.product((False, True), repeat=2):
        modes.append(SamplingParams(temperature=1.0, top_k=50 if s else 0, top_p=0.9 if s else 1.0,
                                    min_p=0.05 if m else 0.0))
    return modes


def filter_logits(logits: Tensor, t: dict[str, Tensor], mode: tuple[bool, bool, bool]) -> Tensor:
    """Apply temperature, then top-k, top-p and min-p (HF's order). logits: [B, V] float32.
    On the sorted path a filter that is off (top_k 0, top_p 1) keeps every token exactly."""
    _, use_sorted, use_min_p = mode
    logits = logits / t["temperature"]
    if use_sorted:
        sorted_logits, _ = logits.sort(dim=-1, descending=True)  # [B, V]
        ranks = torch.arange(sorted_logits.shape[-1], device=logits.device)
        keep = (ranks < t["top_k"]) | (t["top_k"] <= 0)  # [V]
        probs = sorted_logits.masked_fill(~keep, -float("inf")).softmax(-1)
        # keep a token while the mass before it is < top_p (the first token is always kept)
        keep = keep & (((probs.cumsum(-1) - probs) < t["top_p"]) | (t["top_p"] >= 1.0))  # [B, V]
        # the smallest kept logit is the threshold in the unsorted logits
        threshold = sorted_logits.masked_fill(~keep, float("inf")).amin(-1, keepdim=True)
        logits = logits.masked_fill(logits < threshold, -float("inf"))
    if use_min_p:
        probs = logits.softmax(-1)
        limit = t["min_p"] * probs.amax(-1, keepdim=True)
        logits = logits.masked_fill(probs < limit, -float("inf"))
    return logits


def sample(logits: Tensor, t: dict[str, Tensor], mode: tuple[bool, bool, bool],
           noise: Tensor | None) -> Tensor:
    """logits [B, V] -> token ids [B] (int64). noise: [B, V] Exp(1) draws, unused when greedy."""
    if mode[0]:
        return logits.argmax(-1)
    probs = filter_logits(logits, t, mode).softmax(-1)
    return (probs / noise).argmax(-1)


def make_generator(seed: int | None, device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def exponential_noise(shape, generator: torch.Generator, device) -> Tensor:
    return torch.empty(shape, dtype=torch.float32, device=device).exponential_(generator=generator)
