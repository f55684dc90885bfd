"""Prefill, decode and streaming generation. No printing, no globals.

``Generator`` runs one request at a time (batch size 1) on a model and its static KV cache. The
model owns the cache (``model.cache_len``); the Generator reads it and owns the policy: how the
cache grows, how prompts are bucketed, the default completion length and the warm-up.
``generate_ids`` yields token ids; ``stream`` yields text deltas (the final one carries the stats);
``complete`` collects a whole answer.

Three lengths, three names: ``context_len`` is what the model was trained for
(``args.max_seq_len``); ``max_model_len`` is the user's limit on prompt + completion (at most the
context); ``model.cache_len`` is how many positions the KV cache holds now.

Compiled, the model's decode step is one graph (a CUDA-graph replay on CUDA) shared by every
sampler; each sampler mode is a small graph of its own; prefill is eager unless
``options.compile_prefill``. On CUDA the decode loop launches step n+1 before it reads token n back
to the host (the two only meet through a pinned buffer and an event), so Python's per-token work
overlaps the GPU.

Prompt caching (prefix_cache.PrefixStore, ``self.prefixes``): the Generator knows which token ids
its KV cache holds and keeps a few saved copies of earlier prefixes; a request whose prompt starts
with some of them prefills only the rest (``reuse_prefix``).
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
from .prefix_cache import DEFAULT_BYTES, DEFAULT_ENTRIES, MIN_GAIN, PrefixStore, kv_caches
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
    cached_tokens: int = 0  # prompt tokens whose KV the cache already held (not prefilled)
    generated_tokens: int = 0
    time_to_first_token: float = 0.0  # prefill + first sample, seconds
    decode_seconds: float = 0.0
    total_seconds: float = 0.0

    def record_token(self, i: int, t0: float) -> None:
        """Token i (0-based) of a request that started at t0 (time.perf_counter) is out now."""
        now = time.perf_counter()
        if i == 0:
            self.time_to_first_token = now - t0
        self.generated_tokens = i + 1
        self.decode_seconds = now - t0 - self.time_to_first_token
        self.total_seconds = now - t0

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


def _model_step(model: Transformer, tok: Tensor, pos: Tensor) -> Tensor:
    """One decode step of the model alone: [B, 1] ids at positions [1] -> logits [B, V] float32."""
    return model(tok, pos)[:, -1]


def _prefill_logits(model: Transformer, ids: Tensor, pos: Tensor, last: Tensor) -> Tensor:
    return model(ids, pos, logits_at=last)[:, -1]  # [B, V]


def timed_tokens(tokens: Iterator[int], stats: GenerationStats) -> Iterator[int]:
    """Pass token ids through, filling stats' timing fields as Generator.generate_ids does (for
    decoders of their own: speculative, constrained)."""
    t0 = time.perf_counter()
    try:
        for i, tok in enumerate(tokens):
            stats.record_token(i, t0)
            yield tok
    finally:
        close = getattr(tokens, "close", None)
        if close is not None:
            close()


def _quantized(model) -> bool:
    from .quant.core import QuantizedLinear

    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def compiled_capacity(n_tokens: int, max_model_len: int) -> int:
    """The KV cache a compiled Generator allocates for n_tokens: powers of two (each size is a
    recompile), at least CACHE_ROUND, at most max_model_len."""
    return max(min(max(CACHE_ROUND, 1 << (n_tokens - 1).bit_length()), max_model_len), n_tokens)


class Generator:
    """Runs requests on one model, one at a time, reusing its static KV cache.

    ``options`` (RuntimeOptions) supplies compile, compile_prefill, autotune, max_model_len,
    decode_attention, warm_cache_tokens and cache_dir; ``compile`` and ``max_seq_len`` (the user
    limit, i.e. max_model_len), when given, override it. compile=True compiles the model's decode
    step (CUDA graphs on GPU) and the samplers, and with compile_prefill the bucketed prefill; call
    ``warmup()`` so that no request pays a compile. ``prompt_cache_entries`` and
    ``prompt_cache_bytes`` bound the saved prefixes (prefix_cache; 0 disables saving).
    """

    def __init__(self, model: Transformer, tokenizer=None, *, options: RuntimeOptions | None = None,
                 compile: bool | None = None, max_seq_len: int | None = None,
                 prompt_cache_entries: int = DEFAULT_ENTRIES, prompt_cache_bytes: int = DEFAULT_BYTES):
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
            fused = self.is_cuda and opts.kernels and opts.fused_for(self.device.type, _quantized(model))
            if fused or any(getattr(m, "fused_decode", None) for m in model.layers):
                from .kernels.fused_decode import enable  # imported only when used (Triton on CUDA)

                enable(model, fused)
        self.prefill_compiled = self.compiled and opts.compile_prefill
        self._step, self._prefill, self._sample = _model_step, _prefill_logits, sample
        if self.compiled:
            from .compile import compile_decode, compile_sampler, compile_static

            # The model step is one graph whatever the sampler (a CUDA graph on CUDA: its logits
            # are overwritten by the next replay, so the sampler reads them before that); each
            # sampler mode is a small plain graph whose output stays valid.
            dev, kw = str(self.device), dict(cache_dir=opts.cache_dir, autotune=opts.autotune)
            self._step = compile_decode(_model_step, dev, options=opts, **kw)
            self._sample = compile_sampler(sample, dev, options=opts, **kw)
            if self.prefill_compiled:
                self._prefill = compile_static(_prefill_logits, dev, **kw)
        self._host_tok = torch.empty(1, dtype=torch.int64, pin_memory=self.is_cuda)
        self._event = torch.cuda.Event() if self.is_cuda else None
        self.prefixes = PrefixStore(prompt_cache_entries, prompt_cache_bytes)  # the one owner of prompt caching

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
        cap = self._capacity_for(n_tokens)
        self.stash_prefix()  # the new cache starts empty: keep the live prefix in the store
        with torch.inference_mode(False):  # plain tensors, so the model still works outside inference mode
            self.model.setup_caches(1, cap)

    def _capacity_for(self, n_tokens: int) -> int:
        """The cache size ensure_capacity(n_tokens) allocates when it grows."""
        if self.compiled:
            return compiled_capacity(n_tokens, self.max_model_len)
        return max(min(-(-n_tokens // CACHE_ROUND) * CACHE_ROUND, self.max_model_len), n_tokens)

    def _bucket(self, n: int) -> int:
        """Prompts are padded to a bucket on every path: compiled prefill, one graph per bucket
        (powers of two); eager, a few shapes per octave, since each new shape costs memory in the
        CPU libraries' primitive caches. Padding positions are overwritten by decode and masked before."""
        return min(prefill_bucket(n, 1 if self.prefill_compiled else 4), self.cache_len)

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
        return self._guarded(self._generate(prompt_ids, max_new_tokens, sampling, stop_set,
                                            stats if stats is not None else GenerationStats()))

    def _guarded(self, tokens: Iterator[int]) -> Iterator[int]:
        """An exception mid-request leaves the cache's contents unknown: forget the live prefix (saved
        ones are copies, still valid). Closing early is fine: every token in the prefix had its step
        launched."""
        try:
            yield from tokens
        except Exception:
            self.prefixes.drop_live()
            raise

    @torch.inference_mode()
    def _generate(self, prompt_ids: Sequence[int], max_new_tokens: int, sampling: SamplingParams,
                  stop_set: set[int], stats: GenerationStats) -> Iterator[int]:
        prompt_len = len(prompt_ids)
        self.ensure_capacity(prompt_len + max_new_tokens)  # growing saves the live prefix in the store
        dev = self.device
        mode = sampling.mode
        samp = sampling.tensors(dev)
        vocab = self.model.args.vocab_size
        gen = None if mode[0] else make_generator(sampling.seed, dev)

        def noise():
            return None if gen is None else exponential_noise((1, vocab), gen, dev)

        stats.prompt_tokens = prompt_len
        t0 = time.perf_counter()
        start = self.reuse_prefix(prompt_ids)
        stats.cached_tokens = start
        tok = self._sample(self.prefill(prompt_ids, start), samp, mode, noise())  # [1] on device
        pos = torch.tensor([prompt_len], dtype=torch.int64, device=dev)
        cached = self.prefixes.live  # grows as tokens enter the cache
        for i in range(max_new_tokens):
            last = i + 1 == max_new_tokens
            if self.is_cuda:
                self._host_tok.copy_(tok, non_blocking=True)
                self._event.record()
                if not last:  # launch the next step before reading this token back
                    nxt = self._sample(self._step(self.model, tok.view(1, 1), pos), samp, mode, noise())
                    pos += 1
                self._event.synchronize()
                value = int(self._host_tok[0])
            else:
                value = int(tok[0])
                if not last:
                    nxt = self._sample(self._step(self.model, tok.view(1, 1), pos), samp, mode, noise())
                    pos += 1
            if not last:  # its KV is (being) written at position prompt_len + i
                cached.append(value)
            stats.record_token(i, t0)
            yield value
            if value in stop_set or last:
                break
            tok = nxt

    # ---- hooks for other decoders (speculative, constrained) -------------------------------------
    def model_logits(self, tok: Tensor, pos: Tensor, *, extends: int | None = None,
                     continues: bool = False) -> Tensor:
        """One decode step of the model alone: tok [1, 1] at pos [1] -> logits [1, V] float32 (the
        compiled CUDA-graph step when compiled: valid only until the next call; clone to keep it).
        ``extends``: tok's id, when pos is the position right after the live prefix (a decode loop
        continuing a prefill); the prefix then grows by it. ``continues``: the same, with the id not
        read back yet (the caller appends it to ``prefixes.live`` once it has it). Otherwise the live
        prefix is forgotten (the caller decides what the cache holds)."""
        if extends is None and not continues:
            self.prefixes.drop_live()
        logits = self._step(self.model, tok, pos)
        if extends is not None:  # written at len(live): the claim held until now
            self.prefixes.extend(extends)
        return logits

    def prefill(self, prompt_ids: Sequence[int], start: int = 0) -> Tensor:
        """Fill the cache with prompt_ids[start:] at positions start.. (earlier positions must hold
        prompt_ids[:start] already), padded to a bucket; returns the last token's logits [1, V].
        Afterwards the cache is known to hold prompt_ids."""
        n = len(prompt_ids)
        if not 0 <= start < n:
            raise ValueError(f"prefill start {start} outside a prompt of {n} tokens")
        if n > self.cache_len:
            self.ensure_capacity(n)
        bucket = self._bucket(n - start)
        if start + bucket > self.cache_len:  # the padded suffix does not fit: prefill from 0
            start, bucket = 0, self._bucket(n)
        self.prefixes.drop_live()  # until the prefill is done (an exception leaves no claim)
        dev = self.device
        with torch.inference_mode():
            ids = torch.zeros((1, bucket), dtype=torch.int64, device=dev)
            ids[0, :n - start] = torch.tensor(list(prompt_ids[start:]), dtype=torch.int64, device=dev)
            pos = torch.arange(start, start + bucket, device=dev)
            last = torch.tensor([n - start - 1], device=dev)
            logits = self._prefill(self.model, ids, pos, last)
        self.prefixes.claim(prompt_ids)
        return logits

    def reuse_prefix(self, prompt_ids: Sequence[int]) -> int:
        """Make the KV cache hold the longest prefix of prompt_ids it can and return its length: the
        live cache's match, or a saved prefix's when it is MIN_GAIN tokens longer (copied in). At most
        len - 1 (the last prompt token always runs, for its logits), and only where the rest's
        prefill bucket fits the cache. Live content the request would overwrite (MIN_GAIN tokens or
        more) is saved in the store first. Call after ensure_capacity."""
        store, n = self.prefixes, len(prompt_ids)
        live = store.live_match(prompt_ids, n - 1)
        if not self._fits(live, n):
            live = 0
        entry, saved = store.best_entry(prompt_ids, n - 1) if store.entries else (None, 0)
        use = saved if entry is not None and saved >= live + MIN_GAIN and self._fits(saved, n) else live
        if use > live:
            store.touch(entry)  # used now: saving the live prefix must not evict it
        if len(store.live) - live >= MIN_GAIN:  # the request overwrites the live prefix from `live` on
            store.save_live(kv_caches(self.model))
        if use > live:
            store.restore(entry, use, kv_caches(self.model), start=live)
        return use

    def _fits(self, start: int, n: int) -> bool:
        """Whether prompt positions start..n-1, padded to their bucket, fit the cache."""
        return start == 0 or start + self._bucket(n - start) <= self.cache_len

    def forget_prefix(self) -> None:
        """Say the KV cache holds nothing reusable (call after writing it by other means; saved
        prefixes are copies and stay)."""
        self.prefixes.drop_live()

    def stash_prefix(self) -> None:
        """Save the live prefix in the store, then forget it: call BEFORE writing the cache by other
        means (another decoder), so that a later request can still restore it."""
        if self.prefixes.live and self.cache_len:
            self.prefixes.save_live(kv_caches(self.model))
        self.prefixes.drop_live()

    def configure_prompt_cache(self, entries: int, nbytes: int) -> None:
        """Bound the saved prefixes: at most ``entries`` of them and ``nbytes`` bytes (0: none)."""
        self.prefixes.configure(entries, nbytes)

    def _run_prefill(self, prompt_ids: Sequence[int]) -> Tensor:
        return self.prefill(prompt_ids, 0)

    def _default_stop_ids(self) -> list[int]:
        return list(getattr(self.tokenizer, "eos_token_ids", []) or [])

    # ---- text ------------------------------------------------------------------------------------
    def stream(self, prompt_ids: Sequence[int], max_new_tokens: int, sampling: SamplingParams | None = None,
               stop: Sequence[str] = (), stop_token_ids: Sequence[int] | None = None) -> Iterator[Delta]:
        """Yield text deltas; the last one carries finish_reason and the stats. Stop strings and
        stop tokens are not emitted."""
        if self.tokenizer is None:
            raise RuntimeError("stream() needs a tokenizer")
        stop_ids = set(stop_token_ids if stop_token_ids is not None else self._default_stop_ids())
        stats = GenerationStats()
        tokens = self.generate_ids(prompt_ids, max_new_tokens, sampling, stop_ids, stats)
        return self.stream_tokens(tokens, stats, stop, stop_ids)

    def stream_tokens(self, token_iter, stats: GenerationStats, stop: Sequence[str] = (),
                      stop_token_ids: Sequence[int] | None = None, *,
                      skip_special_tokens: bool = True) -> Iterator[Delta]:
        """Text deltas of any token-id iterator (this Generator's, a speculative or a constrained
        decoder's): stop strings and stop tokens end it unemitted; the final Delta carries
        finish_reason and ``stats`` (which the iterator fills in). Closing it closes token_iter."""
        from .textstream import TextStream

        if self.tokenizer is None:
            raise RuntimeError("stream_tokens() needs a tokenizer")
        stop_ids = set(stop_token_ids if stop_token_ids is not None else self._default_stop_ids())
        text = TextStream(self.tokenizer, stop, skip_special_tokens)
        ids: list[int] = []
        finish = "length"
        try:
            for tok in token_iter:
                if tok in stop_ids:
                    finish = "stop"
                    break
                ids.append(tok)
                out = text.add(tok)
                if text.stopped:
                    yield Delta(out, ids, "stop", stats)
                    return
                if out:
                    yield Delta(out, ids)
                    ids = []
            out = text.finish()
            yield Delta(out, ids, "stop" if text.stopped else finish, stats)
        finally:
            close = getattr(token_iter, "close", None)
            if close is not None:
                close()

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

        Default (the server's "ready means ready"): grow the cache to ``warm_cache_len``, run the
        model step and every sampler mode (sampling.sampler_modes: five small graphs) and, with
        compile_prefill, every prefill bucket a prompt can hit in that cache, so no request within
        ``default_max_tokens`` compiles. With ``prompt_len``: the current cache, that prompt's
        bucket and the given modes only (a one-shot CLI run). Eager: one short run."""
        t0 = time.perf_counter()
        self.stash_prefix()  # the warm-up overwrites the cache
        if sampling_modes is None:
            sampling_modes = sampler_modes() if self.compiled else [SamplingParams(temperature=0.0)]
        full = prompt_len is None
        if full and self.compiled:
            self.ensure_capacity(self.warm_cache_len)
        room = max(self.cache_len, 2) if self.compiled else self.max_model_len
        new_tokens = max(1, min(new_tokens, room - 1))
        n = max(1, min(prompt_len or 8, room - new_tokens))
        for sp in sampling_modes:
            self.forget_prefix()  # every run prefills its whole prompt
            for _ in self.generate_ids([0] * n, new_tokens, sp, stop_token_ids=()):
                pass
        if full and self.prefill_compiled:
            for b in self.prefill_buckets():
                self.prefill([0] * b)
        self.forget_prefix()
        return time.perf_counter() - t0

    def warmup_plan(self) -> dict:
        """What a full warm-up compiles (the compile-cache key's ``extra``)."""
        cache = max(self.cache_len, self._capacity_for(self.warm_cache_len)) if self.compiled else None
        return {"warmup": [list(sp.mode) for sp in sampler_modes()] if self.compiled else [],
                "prefill": self.prefill_buckets_at(cache) if self.prefill_compiled else "eager",
                "cache_len": cache}

    def prefill_buckets(self) -> list[int]:
        """Every padded prompt length the current cache allows (what a full warm-up compiles)."""
        return self.prefill_buckets_at(self.cache_len)

    def prefill_buckets_at(self, cache_len: int) -> list[int]:
        out: list[int] = []
        steps = 1 if self.prefill_compiled else 4
        for n in range(1, cache_len):
            b = min(prefill_bucket(n, steps), cache_len)
            if not out or b != out[-1]:
                out.append(b)
        return out
