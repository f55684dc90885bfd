"""Prefill, decode and streaming generation. No printing, no globals.

``Generator`` owns one loaded model and its static KV cache and runs one request at a time
(batch size 1). ``generate_ids`` yields token ids; ``stream`` yields text deltas with stop-string
handling and correct incremental detokenization; ``complete`` collects a whole answer.

On CUDA the decode loop launches step n+1 before it reads token n back to the host (the two only
meet through a pinned buffer and an event), so Python's per-token work overlaps the GPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import Tensor

from .errors import ContextLengthError, InvalidRequestError
from .model import Transformer
from .sampling import SamplingParams, exponential_noise, make_generator, sample

CACHE_ROUND = 256  # the KV cache grows in multiples of this many positions
MIN_PREFILL_BUCKET = 16


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token: float = 0.0  # prefill + first sample, seconds
    decode_seconds: float = 0.0
    total_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens over the whole request time (gpt-fast's figure)."""
        return self.generated_tokens / self.total_seconds if self.total_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        n = self.generated_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" on the last delta


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: GenerationStats = field(default_factory=GenerationStats)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights read per decoded token: every parameter and persistent buffer once (tied
    weights once), without the embedding table (one row is read per token). Non-persistent
    buffers are caches, tables or derived copies (KV cache, RoPE table, mask, packed int4)."""
    emb = getattr(model, "tok_embeddings", None)
    emb_ptr = emb.weight.data_ptr() if emb is not None else None
    out = getattr(model, "output", None)
    tied = emb_ptr is not None and out is not None and getattr(out, "weight", None) is not None \
        and out.weight.data_ptr() == emb_ptr
    tensors = list(model.parameters())
    for mod in model.modules():
        tensors += [b for n, b in mod.named_buffers(recurse=False)
                    if b is not None and n not in mod._non_persistent_buffers_set]
    seen: set[int] = set()
    total = 0
    for t in tensors:
        ptr = t.data_ptr()
        if t.device.type == "meta" or ptr in seen or (ptr == emb_ptr and not tied):
            continue
        seen.add(ptr)
        total += t.numel() * t.element_size()
    return total


def _decode_step(model: Transformer, tok: Tensor, pos: Tensor, samp: dict, mode: tuple, noise: Tensor | None,
                 kv_len: int | None = None) -> Tensor:
    """One decode step, model and sampler together: on CUDA this is one CUDA-graph replay."""
    logits = model(tok, pos, kv_len=kv_len)[:, -1]  # [B, V]
    return sample(logits, samp, mode, noise)  # [B]


def _prefill_logits(model: Transformer, ids: Tensor, pos: Tensor, last: Tensor, kv_len: int | None = None) -> Tensor:
    return model(ids, pos, kv_len=kv_len, logits_at=last)[:, -1]  # [B, V]


class Generator:
    """Runs requests on one model, one at a time, reusing its static KV cache.

    compile=True compiles decode (CUDA graphs on GPU) and bucketed prefill; the first request of a
    given cache size and sampler mode pays the compile (see ``warmup``).
    """

    def __init__(self, model: Transformer, tokenizer=None, *, compile: bool = False,
                 max_seq_len: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = model.device
        self.is_cuda = self.device.type == "cuda"
        self.compiled = compile
        self.context = model.args.max_seq_len
        self.max_seq_len = min(max_seq_len or self.context, self.context)
        self.capacity = model.max_seq_len
        self.compile_seconds = 0.0
        self.last_stats = GenerationStats()
        if compile:
            from .compile import compile_decode, compile_static

            # Decode is one graph (model + sampler; one graph per sampler mode). Prefill's model
            # graph (per length bucket) is compiled apart from its sampler so that bucket graphs
            # are shared by every sampler mode; neither of those two uses CUDA graphs.
            self._decode = compile_decode(_decode_step, str(self.device))
            self._prefill = compile_static(_prefill_logits, str(self.device))
            self._sample = compile_static(sample, str(self.device))
        else:
            self._decode, self._prefill, self._sample = _decode_step, _prefill_logits, sample
        self._host_tok = torch.empty(1, dtype=torch.int64, pin_memory=self.is_cuda)
        self._event = torch.cuda.Event() if self.is_cuda else None

    # ---- capacity -------------------------------------------------------------------------------
    def check_request(self, prompt_len: int, max_new_tokens: int) -> None:
        if prompt_len == 0:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if max_new_tokens < 1:
            raise InvalidRequestError(f"max_new_tokens must be >= 1, got {max_new_tokens}", param="max_tokens")
        if prompt_len + max_new_tokens > self.max_seq_len:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_seq_len} tokens. However, you requested "
                f"{prompt_len + max_new_tokens} tokens ({prompt_len} in the prompt, {max_new_tokens} for the "
                "completion). Please reduce the prompt or the number of new tokens.",
                param="messages",
            )

    def ensure_capacity(self, n_tokens: int) -> None:
        """Grow the static KV cache to hold n_tokens (rounded up; a recompile when compiled)."""
        if n_tokens <= self.capacity:
            return
        if self.compiled:  # each size is a recompile: grow geometrically so there are few
            cap = max(CACHE_ROUND, 1 << (n_tokens - 1).bit_length())
        else:
            cap = -(-n_tokens // CACHE_ROUND) * CACHE_ROUND
        cap = min(cap, self.max_seq_len)
        with torch.inference_mode(False):  # plain tensors, so the model still works outside inference mode
            self.model.setup_caches(1, cap)
        self.capacity = cap

    # ---- token generation -----------------------------------------------------------------------
    @torch.inference_mode()
    def generate_ids(self, prompt_ids: Sequence[int], max_new_tokens: int,
                     sampling: SamplingParams | None = None,
                     stop_token_ids: Sequence[int] | None = None) -> Iterator[int]:
        """Yield new token ids; stops after a stop token (which is yielded) or max_new_tokens."""
        sampling = (sampling or SamplingParams(temperature=0.0)).validate()
        prompt_len = len(prompt_ids)
        self.check_request(prompt_len, max_new_tokens)
        self.ensure_capacity(prompt_len + max_new_tokens)
        stop_set = set(stop_token_ids if stop_token_ids is not None else self._default_stop_ids())
        dev = self.device
        mode = sampling.mode
        samp = sampling.tensors(dev)
        vocab = self.model.args.vocab_size
        gen = None if mode[0] else make_generator(sampling.seed, dev)

        def noise():
            return None if gen is None else exponential_noise((1, vocab), gen, dev)

        stats = GenerationStats(prompt_tokens=prompt_len)
        self.last_stats = stats
        t0 = time.perf_counter()
        tok = self._sample(self._run_prefill(prompt_ids), samp, mode, noise())  # [1] on device
        pos = torch.tensor([prompt_len], dtype=torch.int64, device=dev)
        first = True
        t_first = t0
        for i in range(max_new_tokens):
            last = i + 1 == max_new_tokens
            kv = None if self.compiled else prompt_len + i + 1  # eager: attend to the filled prefix only
            if self.is_cuda:
                self._host_tok.copy_(tok, non_blocking=True)
                self._event.record()
                if not last:  # launch the next step before reading this token back
                    nxt = self._decode(self.model, tok.view(1, 1), pos, samp, mode, noise(), kv)
                    if self.compiled:  # a CUDA-graph output is overwritten by the next replay
                        nxt = nxt.clone()
                    pos += 1
                self._event.synchronize()
                value = int(self._host_tok[0])
            else:
                value = int(tok[0])
                if not last:
                    nxt = self._decode(self.model, tok.view(1, 1), pos, samp, mode, noise(), kv)
                    pos += 1
            now = time.perf_counter()
            if first:
                stats.time_to_first_token = now - t0
                t_first, first = now, False
            stats.generated_tokens = i + 1
            stats.decode_seconds = now - t_first
            stats.total_seconds = now - t0
            yield value
            if value in stop_set or last:
                break
            tok = nxt

    def _run_prefill(self, prompt_ids: Sequence[int]) -> Tensor:
        """Fill the cache with the prompt; returns the logits of its last token [1, V]."""
        dev = self.device
        n = len(prompt_ids)
        if self.compiled:  # pad to a length bucket so prompt lengths share compiled graphs
            bucket = max(MIN_PREFILL_BUCKET, 1 << (n - 1).bit_length())
            bucket = min(bucket, self.capacity)
            ids = torch.zeros((1, bucket), dtype=torch.int64, device=dev)
            ids[0, :n] = torch.tensor(list(prompt_ids), dtype=torch.int64, device=dev)
            pos = torch.arange(bucket, device=dev)
            kv = None
        else:
            ids = torch.tensor([list(prompt_ids)], dtype=torch.int64, device=dev)
            pos = torch.arange(n, device=dev)
            kv = n
        last = torch.tensor([n - 1], device=dev)
        return self._prefill(self.model, ids, pos, last, kv)

    def _default_stop_ids(self) -> list[int]:
        return list(getattr(self.tokenizer, "eos_token_ids", []) or [])

    # ---- text ------------------------------------------------------------------------------------
    def stream(self, prompt_ids: Sequence[int], max_new_tokens: int, sampling: SamplingParams | None = None,
               stop: Sequence[str] = (), stop_token_ids: Sequence[int] | None = None) -> Iterator[Delta]:
        """Yield text deltas; the last one carries finish_reason. Stop strings are not emitted."""
        from .tokenizer import find_stop, stop_holdback

        if self.tokenizer is None:
            raise RuntimeError("stream() needs a tokenizer")
        stops = [s for s in stop if s]
        detok = self.tokenizer.detokenizer()
        stop_ids = set(stop_token_ids if stop_token_ids is not None else self._default_stop_ids())
        pending = ""  # text held back because it may be the start of a stop string
        ids: list[int] = []
        finish = "length"
        for tok in self.generate_ids(prompt_ids, max_new_tokens, sampling, stop_ids):
            if tok in stop_ids:
                finish = "stop"
                break
            ids.append(tok)
            pending += detok.add(tok)
            if stops:
                cut = find_stop(pending, stops)
                if cut >= 0:
                    finish = "stop"
                    pending = pending[:cut]
                    break
                hold = stop_holdback(pending, stops)
                out, pending = pending[: len(pending) - hold], pending[len(pending) - hold:]
            else:
                out, pending = pending, ""
            if out:
                yield Delta(out, ids)
                ids = []
        if finish == "length":
            pending += detok.flush()
            if stops:
                cut = find_stop(pending, stops)
                if cut >= 0:
                    pending, finish = pending[:cut], "stop"
        yield Delta(pending, ids, finish)

    def complete(self, prompt_ids: Sequence[int], max_new_tokens: int, sampling: SamplingParams | None = None,
                 stop: Sequence[str] = ()) -> Completion:
        parts, ids, finish = [], [], "length"
        for d in self.stream(prompt_ids, max_new_tokens, sampling, stop):
            parts.append(d.text)
            ids.extend(d.token_ids)
            finish = d.finish_reason or finish
        return Completion("".join(parts), ids, finish, self.last_stats)

    def warmup(self, sampling_modes: Sequence[SamplingParams] = (SamplingParams(temperature=0.0),),
               prompt_len: int = 8, new_tokens: int = 4) -> float:
        """Run short generations so compilation (and CUDA graph capture) happens now; returns seconds."""
        t0 = time.perf_counter()
        new_tokens = max(1, min(new_tokens, self.max_seq_len - 1))
        prompt = [0] * max(1, min(prompt_len, self.max_seq_len - new_tokens))
        for sp in sampling_modes:
            for _ in self.generate_ids(prompt, new_tokens, sp, stop_token_ids=()):
                pass
        dt = time.perf_counter() - t0
        if self.compiled:
            self.compile_seconds += dt
        return dt

