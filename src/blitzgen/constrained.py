"""Decoding with a grammar and/or logprobs: a token loop on the Generator's model-only step.

Plain requests keep the Generator's fused decode step (model + sampler in one compiled graph). A request
that needs a grammar mask or per-token logprobs runs this loop instead; per token:

    logits = model step                           (Generator.model_logits / prefill)
    masked = constraint.apply(logits)             (structured.GrammarConstraint: a bitmask, on device)
    token  = sampling.sample(masked, ...)         (the same sampler and seeded noise as plain decoding)
    row    = logprobs.logprob_rows(logits, token) (on device: one small row read back with the token)

Logprobs are those of the raw logits (the model's own distribution, before temperature and mask), as
OpenAI and vLLM report them. With no grammar, greedy or seeded output equals plain decoding's.
Text comes from ``Generator.stream_tokens``, so stop strings and the final stats behave the same.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .generate import Delta, GenerationStats
from .logprobs import TokenLogprob, logprob_rows, unpack
from .sampling import SamplingParams, exponential_noise, make_generator, sample


@dataclass
class LogprobDelta(Delta):
    """A Delta with the logprob steps of the tokens generated since the previous delta."""

    logprobs: list[TokenLogprob] | None = None


@torch.inference_mode()
def token_loop(gen, prompt_ids: Sequence[int], max_new_tokens: int, sampling: SamplingParams,
               stop_ids: set[int], stats: GenerationStats, *, top_logprobs: int | None = None,
               constraint=None, rows: list | None = None) -> Iterator[int]:
    """Yield token ids (a stop token is yielded, then the loop ends). top_logprobs None: no logprobs;
    else each token's TokenLogprob is appended to `rows` before the token is yielded. `constraint`: a
    structured.GrammarConstraint, advanced with every token; the loop ends when it terminates."""
    sampling = sampling.validate()
    gen.check_request(len(prompt_ids), max_new_tokens)
    gen.ensure_capacity(len(prompt_ids) + max_new_tokens)
    dev = gen.device
    mode, samp = sampling.mode, sampling.tensors(dev)
    noise_gen = None if mode[0] else make_generator(sampling.seed, dev)
    k = top_logprobs
    stats.prompt_tokens = len(prompt_ids)
    t0 = time.perf_counter()
    start = gen.reuse_prefix(prompt_ids)  # prompt caching, as in plain decoding
    stats.cached_tokens = start
    logits = gen.prefill(prompt_ids, start)
    pos = torch.tensor([len(prompt_ids)], dtype=torch.int64, device=dev)
    cuda = dev.type == "cuda"
    host_tok = torch.empty(1, dtype=torch.int64, pin_memory=cuda)
    host_row = torch.empty(1 + 2 * k if k else 1, dtype=torch.float32, pin_memory=cuda) if k is not None else None
    event = torch.cuda.Event() if cuda else None
    for i in range(max_new_tokens):
        last = i + 1 == max_new_tokens
        masked = constraint.apply(logits) if constraint is not None else logits
        noise = None if noise_gen is None else exponential_noise(masked.shape, noise_gen, dev)
        tok = sample(masked, samp, mode, noise)  # [1]
        row = logprob_rows(logits, tok, k)[0] if k is not None else None  # chosen + top-k logprobs
        if cuda:  # as Generator.generate_ids: queue the next step before reading this token back
            host_tok.copy_(tok, non_blocking=True)
            if row is not None:
                host_row.copy_(row, non_blocking=True)
            event.record()
        if not last:  # the step needs only tok on the device; its KV lands after the live prefix
            logits = gen.model_logits(tok.view(1, 1), pos, continues=True)
            pos += 1
        if cuda:
            event.synchronize()
            value = int(host_tok[0])
        else:
            value = int(tok[0])
            if row is not None:
                host_row = row.cpu()
        if not last:  # its KV is (being) written right after the live prefix
            gen.prefixes.extend(value)
        if k is not None:
            rows.append(unpack(host_row, value, k))
        if constraint is not None and not constraint.advance(value):
            raise RuntimeError(f"the grammar refused token {value} it allowed")
        stats.record_token(i, t0)
        yield value
        if value in stop_ids or last:
            break
        if constraint is not None and constraint.is_terminated():
            break

def stream(gen, prompt_ids: Sequence[int], max_new_tokens: int, sampling: SamplingParams | None = None,
           stop: Sequence[str] = (), *, top_logprobs: int | None = None, constraint=None,
           keep_special: bool = False) -> Iterator[Delta]:
    """Like Generator.stream, with a grammar and/or logprobs: each delta is a LogprobDelta whose
    `logprobs` holds the steps of the tokens generated since the previous one (stop tokens left out)
    when top_logprobs is not None."""
    sampling = sampling or SamplingParams(temperature=0.0)
    stop_ids = set(getattr(gen.tokenizer, "eos_token_ids", []) or [])
    stats = GenerationStats()
    rows: list[TokenLogprob] = []
    tokens = token_loop(gen, prompt_ids, max_new_tokens, sampling, stop_ids, stats, top_logprobs=top_logprobs,
                        constraint=constraint, rows=rows)
    for d in gen.stream_tokens(tokens, stats, stop, stop_ids, skip_special_tokens=not keep_special):
        steps = None
        if top_logprobs is not None:
            steps = [r for r in rows if r.token_id not in stop_ids]
            rows.clear()
        yield LogprobDelta(d.text, d.token_ids, d.finish_reason, d.stats, logprobs=steps)


def decoder(*, top_logprobs: int | None = None, constraint=None, keep_special: bool = False):
    """A server Job's `decode` callable: (gen, prompt_ids, max_tokens, sampling, stop) -> deltas. A
    grammar is stateful: each choice after the first starts from a reset one."""
    used = []

    def decode(gen, prompt_ids, max_tokens, sampling, stop):
        if constraint is not None:
            if used:
                constraint.reset()
            used.append(1)
        return stream(gen, prompt_ids, max_tokens, sampling, stop, top_logprobs=top_logprobs,
                      constraint=constraint, keep_special=keep_special)

    return decode
