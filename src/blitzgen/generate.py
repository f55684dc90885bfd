"""Prefill, decode and streaming generation. No printing, no globals.

``Generator`` runs one request at a time (batch size 1) on a model and its static KV cache. The
model owns the cache (``model.cache_len``); the Generator reads it and owns the policy: how the
cache grows, how prompts are bucketed, the default completion length and the warm-up.
``generate_ids`` yields token ids; ``stream`` yields text deltas (the final one carries the stats);
``complete`` collects a whole answer.

Three lengths, three names: ``context_len`` is what the model was trained for
(``args.max_seq_len``); ``max_model_len`` is the user's limit on prompt + completion (at most the
context); ``model.cache_len`` is how many positions the KV cache holds now.

On CUDA the decode loop launches step n+1 before it reads token n back to the host (the two only
meet through a pinned buffer and an event), so Python's per-token work overlaps the GPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor

from .attention import parse_decode_attention
from .errors import ContextLengthError, InvalidRequestError
from .model import Transformer
from .runtime import RuntimeOptions
from .sampling import SamplingParams, exponential_noise, make_generator, sample, sampler_modes

CACHE_ROUND = 256  # the KV cache grows in multiples of this many positions
MIN_PREFILL_BUCKET = 16


def prefill_bucket(n: int, steps_per_octave: int = 1) -> int:
    """The padded length of an n-token prompt: at least MIN_PREFILL_BUCKET, then powers of two
    split into steps_per_octave equal steps (1: 16, 32, 64...; 4: 16, 20, 24, 28, 32, 40...)."""
    if n <= MIN_PREFILL_BUCKET:
        return MIN_PREFILL_BUCKET
    low = 1 << (n - 1).bit_length() - 1  # the power of two below n
    step = max(1, low // steps_per_octave)
    return -(-n // step) * step


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
    stats: GenerationStats | None = None  # on the last delta


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: GenerationStats


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


def _decode_step(model: Transformer, tok: Tensor, pos: Tensor, samp: dict, mode: tuple, noise: Tensor | None) -> Tensor:
    """One decode step, model and sampler together: on CUDA this is one CUDA-graph replay."""
    logits = model(tok, pos)[:, -1]  # [B, V]
    return sample(logits, samp, mode, noise)  # [B]


def _prefill_logits(model: Transformer, ids: Tensor, pos: Tensor, last: Tensor) -> Tensor:
    return model(ids, pos, logits_at=last)[:, -1]  # [B, V]


class Generator:
    """Runs requests on one model, one at a time, reusing its static KV cache.

    ``options`` (RuntimeOptions) supplies compile, max_model_len, decode_attention, warm_cache_tokens
    and cache_dir; ``compile`` and ``max_seq_len`` (the user limit, i.e. max_model_len), when given,
    override it. compile=True compiles decode (CUDA graphs on GPU) and bucketed prefill; call
    ``warmup()`` so that no request pays a compile.
    """

    def __init__(self, model: Transformer, tokenizer=None, *, options: RuntimeOptions | None = None,
                 compile: bool | None = None, max_seq_len: int | None = None):
        opts = options or RuntimeOptions()
        self.model = model
        self.tokenizer = tokenizer
        self.options = opts
        self.device = model.device
        self.is_cuda = self.device.type == "cuda"
        if compile is None:  # no options: eager, as before; options: their rule (on for CUDA)
            compile = opts.compile if opts.compile is not None else (options is not None and self.is_cuda)
        self.compiled = bool(compile)
        self.context_len = model.args.max_seq_len
        self.max_model_len = min(max_seq_len or opts.max_model_len or self.context_len, self.context_len)
        self.warm_cache_tokens = opts.warm_cache_tokens
        if options is not None:
            impl = opts.decode_attention
            if impl == "triton" and not opts.kernels:
                impl = "auto"
            op = model.attention_op
            if parse_decode_attention(impl) != (op.decode_impl, op.chunks):
                model.set_decode_attention(impl)
        if self.compiled:
            from .compile import compile_decode, compile_static

            # Decode is one graph (model + sampler; one graph per sampler mode). Prefill's model
            # graph (per length bucket) is compiled apart from its sampler so that bucket graphs
            # are shared by every sampler mode; neither of those two uses CUDA graphs.
            dev = str(self.device)
            self._decode = compile_decode(_decode_step, dev, opts.cache_dir)
            self._prefill = compile_static(_prefill_logits, dev, opts.cache_dir)
            self._sample = compile_static(sample, dev, opts.cache_dir)
        else:
            self._decode, self._prefill, self._sample = _decode_step, _prefill_logits, sample
        self._host_tok = torch.empty(1, dtype=torch.int64, pin_memory=self.is_cuda)
        self._event = torch.cuda.Event() if self.is_cuda else None

    @property
    def max_seq_len(self) -> int:
        """The user limit on prompt + completion (the older name of ``max_model_len``)."""
        return self.max_model_len

    @property
    def cache_len(self) -> int:
        """Positions the model's KV cache holds now (the model owns it)."""
        return self.model.cache_len

    # ---- cache policy -----------------------------------------------------------------------------
    @property
    def warm_cache_len(self) -> int:
        """The cache a full warm-up allocates: warm_cache_tokens, at most max_model_len (a 128K
        context does not preallocate 128K positions; longer requests grow it)."""
        return min(self.max_model_len, self.warm_cache_tokens)

    def default_max_tokens(self, prompt_len: int) -> int:
        """Completion length for a request that sets none: fill the cache as allocated or warmed up
        (so such requests never grow it, nor recompile); the rest of the context when the prompt
        alone does not fit there."""
        room = min(self.max_model_len, max(self.cache_len, self.warm_cache_tokens)) - prompt_len
        return room if room > 0 else max(1, self.max_model_len - prompt_len)

    def check_request(self, prompt_len: int, max_new_tokens: int) -> None:
        """Raise InvalidRequestError / ContextLengthError when the request cannot run (pure check)."""
        if prompt_len == 0:
            raise InvalidRequestError("the prompt is empty")
        if max_new_tokens < 1:
            raise InvalidRequestError(f"the number of new tokens must be at least 1, got {max_new_tokens}")
        if prompt_len + max_new_tokens > self.max_model_len:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_len + max_new_tokens} tokens ({prompt_len} in the prompt, {max_new_tokens} for the "
                "completion). Please reduce the prompt or the number of new tokens.")

    def ensure_capacity(self, n_tokens: int) -> None:
        """Grow the model's KV cache to hold n_tokens: geometrically when compiled (each size is a
        recompile), else in steps of CACHE_ROUND; never past max_model_len."""
        if n_tokens <= self.cache_len:
            return
        if self.compiled:
            cap = max(CACHE_ROUND, 1 << (n_tokens - 1).bit_length())
        else:
            cap = -(-n_tokens // CACHE_ROUND) * CACHE_ROUND
        cap = max(min(cap, self.max_model_len), n_tokens)
        with torch.inference_mode(False):  # plain tensors, so the model still works outside inference mode
            self.model.setup_caches(1, cap)

    def _bucket(self, n: int) -> int:
        """Prompts are padded to a bucket on every path: compiled, one graph per bucket (powers of
        two); eager, a few shapes per octave, since each new shape costs memory in the CPU
        libraries' primitive caches. Padding positions are overwritten by decode and masked before."""
        return min(prefill_bucket(n, 1 if self.compiled else 4), self.cache_len)

    # ---- token generation -----------------------------------------------------------------------
    def generate_ids(self, prompt_ids: Sequence[int], max_new_tokens: int,
                     sampling: SamplingParams | None = None,
                     stop_token_ids: Sequence[int] | None = None,
                     stats: GenerationStats | None = None) -> Iterator[int]:
        """Yield new token ids; stops after a stop token (which is yielded) or max_new_tokens.
        ``stats``, when given, is filled in as tokens come."""
        sampling = (sampling or SamplingParams(temperature=0.0)).validate()
        self.check_request(len(prompt_ids), max_new_tokens)
        stop_set = set(stop_token_ids if stop_token_ids is not None else self._default_stop_ids())
        return self._generate(prompt_ids, max_new_tokens, sampling, stop_set,
                              stats if stats is not None else GenerationStats())

    @torch.inference_mode()
    def _generate(self, prompt_ids: Sequence[int], max_new_tokens: int, sampling: SamplingParams,
                  stop_set: set[int], stats: GenerationStats) -> Iterator[int]:
        prompt_len = len(prompt_ids)
        self.ensure_capacity(prompt_len + max_new_tokens)
        dev = self.device
        mode = sampling.mode
        samp = sampling.tensors(dev)
        vocab = self.model.args.vocab_size
        gen = None if mode[0] else make_generator(sampling.seed, dev)

        def noise():
            return None if gen is None else exponential_noise((1, vocab), gen, dev)

        stats.prompt_tokens = prompt_len
        t0 = time.perf_counter()
        tok = self._sample(self._run_prefill(prompt_ids), samp, mode, noise())  # [1] on device
        pos = torch.tensor([prompt_len], dtype=torch.int64, device=dev)
        first = True
        t_first = t0
        for i in range(max_new_tokens):
            last = i + 1 == max_new_tokens
            if self.is_cuda:
                self._host_tok.copy_(tok, non_blocking=True)
                self._event.record()
                if not last:  # launch the next step before reading this token back
                    nxt = self._decode(self.model, tok.view(1, 1), pos, samp, mode, noise())
                    if self.compiled:  # a CUDA-graph output is overwritten by the next replay
                        nxt = nxt.clone()
                    pos += 1
                self._event.synchronize()
                value = int(self._host_tok[0])
            else:
                value = int(tok[0])
                if not last:
                    nxt = self._decode(self.model, tok.view(1, 1), pos, samp, mode, noise())
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
        """Fill the cache with the prompt (padded to its bucket); returns the last token's logits [1, V]."""
        dev = self.device
        n = len(prompt_ids)
        bucket = self._bucket(n)
        ids = torch.zeros((1, bucket), dtype=torch.int64, device=dev)
        ids[0, :n] = torch.tensor(list(prompt_ids), dtype=torch.int64, device=dev)
        pos = torch.arange(bucket, device=dev)
        last = torch.tensor([n - 1], device=dev)
        return self._prefill(self.model, ids, pos, last)

    def _default_stop_ids(self) -> list[int]:
        return list(getattr(self.tokenizer, "eos_token_ids", []) or [])

    # ---- text ------------------------------------------------------------------------------------
    def stream(self, prompt_ids: Sequence[int], max_new_tokens: int, sampling: SamplingParams | None = None,
               stop: Sequence[str] = (), stop_token_ids: Sequence[int] | None = None) -> Iterator[Delta]:
        """Yield text deltas; the last one carries finish_reason and the stats. Stop strings and
        stop tokens are not emitted."""
        from .textstream import TextStream

        if self.tokenizer is None:
            raise RuntimeError("stream() needs a tokenizer")
        stop_ids = set(stop_token_ids if stop_token_ids is not None else self._default_stop_ids())
        text = TextStream(self.tokenizer, stop)
        stats = GenerationStats()
        ids: list[int] = []
        finish = "length"
        for tok in self.generate_ids(prompt_ids, max_new_tokens, sampling, stop_ids, stats):
            if tok in stop_ids:
                finish = "stop"
                break
            ids.append(tok)
            out = text.add(tok)
            if text.stopped:
                finish = "stop"
                yield Delta(out, ids, finish, stats)
                return
            if out:
                yield Delta(out, ids)
                ids = []
        out = text.finish()
        yield Delta(out, ids, "stop" if text.stopped else finish, stats)

    def complete(self, prompt_ids: Sequence[int], max_new_tokens: int, sampling: SamplingParams | None = None,
                 stop: Sequence[str] = ()) -> Completion:
        parts, ids = [], []
        for d in self.stream(prompt_ids, max_new_tokens, sampling, stop):
            parts.append(d.text)
            ids.extend(d.token_ids)
        return Completion("".join(parts), ids, d.finish_reason, d.stats)

    # ---- warm-up ---------------------------------------------------------------------------------
    def warmup(self, sampling_modes: Sequence[SamplingParams] | None = None, prompt_len: int | None = None,
               new_tokens: int = 4) -> float:
        """Run what requests would otherwise compile (and CUDA-graph capture) now; returns seconds.

        Default (the server's): grow the cache to ``warm_cache_len``, run every sampler mode
        (sampling.sampler_modes) and every prefill bucket a prompt can hit in that cache, so no
        request within ``default_max_tokens`` compiles. With ``prompt_len``: the current cache,
        that prompt's bucket and the given modes only (a one-shot CLI run). Eager: one short run."""
        t0 = time.perf_counter()
        if sampling_modes is None:
            sampling_modes = sampler_modes() if self.compiled else [SamplingParams(temperature=0.0)]
        full = prompt_len is None
        if full and self.compiled:
            self.ensure_capacity(self.warm_cache_len)
        room = max(self.cache_len, 2) if self.compiled else self.max_model_len
        new_tokens = max(1, min(new_tokens, room - 1))
        n = max(1, min(prompt_len or 8, room - new_tokens))
        for sp in sampling_modes:
            for _ in self.generate_ids([0] * n, new_tokens, sp, stop_token_ids=()):
                pass
        if full and self.compiled:
            with torch.inference_mode():
                for b in self.prefill_buckets():
                    self._run_prefill([0] * b)
        return time.perf_counter() - t0

    def prefill_buckets(self) -> list[int]:
        """Every padded prompt length the current cache allows (what a full warm-up compiles)."""
        out: list[int] = []
        for n in range(1, self.cache_len):
            b = self._bucket(n)
            if not out or b != out[-1]:
                out.append(b)
        return out
