"""Speculative decoding: draft K tokens, verify them with one target forward of K_max+1 tokens.

    from blitzgen.speculative import SpeculativeDecoder, NgramDraft, SelfInt4Draft, DraftModel
    dec = SpeculativeDecoder(model, NgramDraft(), k=4, compile=False, adaptive=True)
    for tok in dec.generate_ids(prompt_ids, 200, SamplingParams(temperature=0), stop_token_ids=[2]):
        ...
    dec.last_result_stats  # or pass stats=SpeculationStats() to generate_ids

Exactness (Leviathan et al. 2023, Chen et al. 2023): the target's distribution p at each drafted
position comes from ``sampling_probs`` (temperature, top-k, top-p, min-p exactly as sampling.py
filters; greedy is a one-hot at the argmax). Draft token x, drawn from the draft's q (filtered the
same way; one-hot for deterministic drafts such as n-gram), is accepted with probability
min(1, p(x)/q(x)); at the first rejection the token is drawn from max(0, p - q) (normalised);
if all drafts pass, a bonus token is drawn from p at the last position. Each emitted token is then
distributed exactly as p. In greedy mode p and q are one-hot: a draft is accepted iff it equals
the target's argmax and the correction is that argmax, so the output equals plain decoding.

KV cache: verify writes positions [P, P+K_max]; entries past the accepted prefix are stale but
invisible (the mask is by position) and are overwritten before any query can see them. The draft
model's cache is kept in step the same way (it is caught up on tokens it has not seen).

Shapes are static: the verify always takes K_max+1 tokens (padded), draft steps are one-token
decode steps, a compiled prefill is padded to power-of-two buckets; nothing recompiles per accepted
length. Compiled, each model forward (target step, verify, draft step) is one graph whatever the
sampler, and the target step and prefill are the Generator's own when one is given (``gen=``), so
speculation adds the verify graph (and the draft's step) to what plain decoding compiles.
"""

from __future__ import annotations

import time
from typing import Iterator, Sequence

import torch
from torch import Tensor

from . import runtime
from .errors import BlitzgenError, ContextLengthError, InvalidRequestError
from .generate import _model_step, _prefill_logits
from .model import Transformer
from .sampling import SamplingParams, exponential_noise, make_generator, sample
from .speculative_accept import _accept, _accept_host, _draft_pick, _verify_logits, accept_tokens, sampling_probs
from .speculative_control import AdaptiveK, SpeculationStats
from .speculative_graph import HostVerifyGraph
from .speculative_graph import usable as usable_for_graph
from .speculative_draft import (DraftMismatchError, DraftModel, DraftSource, NgramDraft, SelfInt4Draft,
                                check_draft_model, check_same_tokenizer)

__all__ = ["SpeculativeDecoder", "SpeculationStats", "AdaptiveK", "DraftSource", "NgramDraft", "DraftModel",
           "SelfInt4Draft", "DraftMismatchError", "check_same_tokenizer", "sampling_probs", "accept_tokens",
           "make_draft", "SOURCES"]

SOURCES = ("ngram", "self-int4", "draft-model")
CACHE_ROUND = 256
MIN_PREFILL_BUCKET = 16
RETRY_OFF_STARTS = 16  # requests kept off by the draft's catch-up cost before one runs it again
LEARN_ROUNDS = 4  # timed verify rounds before a request's measured cost becomes the next one's start


def make_draft(kind: str, target: Transformer, *, draft_model: Transformer | None = None, draft_tokenizer=None,
               target_tokenizer=None, group_size: int = 32) -> DraftSource:
    """The draft source for a CLI/server name: "ngram", "self-int4" or "draft-model"."""
    if kind == "ngram":
        return NgramDraft()
    if kind == "self-int4":
        return SelfInt4Draft(target, group_size)
    if kind == "draft-model":
        if draft_model is None:
            raise BlitzgenError("--speculate draft-model needs --draft-model")
        return DraftModel(draft_model, draft_tokenizer, target_tokenizer)
    raise BlitzgenError(f"unknown speculation source {kind!r} (known: {', '.join(SOURCES)})")


def build_decoder(gen, source: str, k: int, *, group_size: int = 32, draft_model: str | None = None,
                  group=None) -> "SpeculativeDecoder":
    """The decoder of a CLI/server source on a Generator, sharing its model, KV cache, compile setting
    and length limit. A draft model is loaded from ``draft_model`` on the Generator's device and
    dtype; with ``group`` (a tensor-parallel rank), only its slices, all-reducing like the target."""
    dmodel = dtok = None
    if source == "draft-model":
        from .loading import load

        if draft_model is None:
            raise BlitzgenError("--speculate draft-model needs --draft-model")
        shard = None
        if group is not None:
            from .parallel.tp import Sharding

            shard = Sharding(group.rank, group.world)
        dlm = load(draft_model, device=str(gen.device), dtype=gen.model.dtype, progress=False, shard=shard)
        if group is not None:
            from .parallel.tp import wrap

            wrap(dlm.model, gen.model.layers[0].attention.wo.all_reduce)  # the target's all-reduce
        dmodel, dtok = dlm.model, dlm.tokenizer
    draft = make_draft(source, gen.model, draft_model=dmodel, draft_tokenizer=dtok, target_tokenizer=gen.tokenizer,
                       group_size=group_size)
    dec = SpeculativeDecoder(gen.model, draft, k=k, gen=gen, max_seq_len=gen.max_seq_len)
    dec.follows_clock = group is None
    return dec


_COMPILED: dict = {}


def _compiled(fn, decode: bool, device: str, kw: dict):
    """One compiled wrapper per function and settings, shared by every decoder in the process (a
    server's n-gram and self-int4 decoders run the same verify graph on the same model)."""
    from .compile import compile_decode, compile_static

    key = (fn, decode, device, tuple(sorted(kw.items())))
    if key not in _COMPILED:
        _COMPILED[key] = (compile_decode if decode else compile_static)(fn, device, **kw)
    return _COMPILED[key]


class SpeculativeDecoder:
    """Runs requests on a target model with a draft source, one at a time (batch size 1)."""

    def __init__(self, target: Transformer, draft: DraftSource, *, k: int = 4, compile: bool | None = None,
                 adaptive: bool = True, verify_cost: float | None = None, draft_cost: float | None = None,
                 min_gain: float = 1.05, max_seq_len: int | None = None, gen=None, compile_prefill: bool = False):
        if not isinstance(k, int) or not 1 <= k <= 32:
            raise InvalidRequestError(f"speculation length k must be an integer in 1..32, got {k!r}", param="k")
        if not isinstance(draft, DraftSource):
            raise BlitzgenError(f"not a draft source: {type(draft).__name__}")
        if gen is not None and gen.model is not target:
            raise BlitzgenError("the Generator given to SpeculativeDecoder runs another model")
        self.model, self.draft, self.k_max, self.gen = target, draft, k, gen
        self.dmodel = draft.model
        if self.dmodel is not None:
            check_draft_model(target, self.dmodel)
        self.device = target.device
        self.vocab = target.args.vocab_size
        self.context = target.args.max_seq_len
        if self.dmodel is not None:
            self.context = min(self.context, self.dmodel.args.max_seq_len)
        self.max_seq_len = min(max_seq_len or self.context, self.context)
        if compile is None:
            compile = gen.compiled if gen is not None else False
        self.compiled, self.adaptive = bool(compile), adaptive
        self.verify_cost = verify_cost if verify_cost is not None else (1.3 if self.device.type == "cuda" else 1.5)
        self.draft_cost = draft_cost if draft_cost is not None else draft.estimate_cost(target)
        self.plain_seconds: float | None = None  # a plain token's seconds, calibrated
        # what requests measured (AdaptiveK.time_round): where the next unseeded request starts.
        # A seeded sampled request runs on the fixed costs and times nothing: its draft lengths,
        # hence its random stream and text, do not depend on the clock.
        self.measured: dict[str, float] = {}
        self._off_starts = 0  # requests in a row kept off by the measured catch-up cost
        # False on a tensor-parallel rank: every rank's controller must choose the same draft
        # lengths, and each rank's clock differs, so all run on rank 0's fixed (calibrated) costs
        self.follows_clock = True
        self.min_gain = min_gain
        # compiled on CUDA, warm-up measures the costs unless they were given
        self.auto_calibrate = (verify_cost is None and draft_cost is None and self.compiled
                               and self.device.type == "cuda")
        self.calibration: dict | None = None
        self.last_result_stats = SpeculationStats()
        self._mark_step = self.compiled and self.device.type == "cuda"
        is_cuda = self.device.type == "cuda"
        self._host_tok = torch.empty(1, dtype=torch.int64, pin_memory=is_cuda)
        self._event = torch.cuda.Event() if is_cuda else None
        self._warming = False
        self._graph: HostVerifyGraph | None = None
        self.graph_rounds = (self.compiled and self.dmodel is None and usable_for_graph(target)
                             and runtime.spec_graph())
        # Model forwards (one graph each, whatever the sampler; CUDA graphs on CUDA): the target's
        # one-token step (the Generator's own graph when one is given), its (K+1)-token verify and the
        # draft's step. Sampler, acceptance and draft pick: small graphs per sampler mode. Prefill:
        # the Generator's, or eager unless compile_prefill (then one graph per power-of-two bucket).
        self._step, self._vstep, self._dstep, self._chunk = _model_step, _verify_logits, _model_step, _prefill_logits
        self._sample, self._accept, self._accept_host, self._pick = sample, _accept, _accept_host, _draft_pick
        self.prefill_compiled = self.compiled and (gen.prefill_compiled if gen is not None else compile_prefill)
        if self.compiled:
            opts = getattr(gen, "options", None)
            kw = dict(cache_dir=opts.cache_dir, autotune=opts.autotune) if opts is not None else {}

            def comp(fn, decode=False):
                return _compiled(fn, decode, str(self.device), kw)

            if gen is None:
                self._step = comp(_model_step, decode=True)
            self._vstep = comp(_verify_logits, decode=True)
            if self.dmodel is not None:
                self._dstep = comp(_model_step, decode=True)
                self._accept, self._pick = comp(_accept), comp(_draft_pick)
            else:
                self._accept_host = comp(_accept_host)
                self._vstep_plain = comp(_verify_logits)  # captured with the acceptance (speculative_graph)
            if self.prefill_compiled:
                self._chunk = comp(_prefill_logits)
            self._sample = comp(sample)

    def _mark(self) -> None:
        if self._mark_step:
            torch.compiler.cudagraph_mark_step_begin()  # the previous graph's outputs are all consumed

    def _plain_step(self, tok: Tensor, pos: Tensor, samp: dict, mode: tuple, noise: Tensor | None) -> Tensor:
        """One-token target step: tok [1, 1] at pos [1] -> next token [1]."""
        self._mark()
        logits = self.gen.model_logits(tok, pos) if self.gen is not None else self._step(self.model, tok, pos)
        return self._sample(logits, samp, mode, noise)

    def _verify(self, idx: Tensor, pos: Tensor, q: Tensor | None, k_eff: Tensor, u: Tensor, noise: Tensor, samp: dict,
                mode: tuple) -> Tensor:
        """Target forward of K+1 tokens and acceptance -> [n accepted, next token]; q None: a host
        draft's (one-hot)."""
        self._mark()
        logits = self._vstep(self.model, idx, pos)
        if q is None:
            return self._accept_host(logits, idx[0, 1:], k_eff, u, noise, samp, mode)
        return self._accept(logits, q, idx[0, 1:], k_eff, u, noise, samp, mode)

    def _draft_step(self, tok: Tensor, pos: Tensor, samp: dict, mode: tuple, noise: Tensor) -> tuple[Tensor, Tensor]:
        """One draft-model step -> (token [1], its distribution q [1, V_target])."""
        self._mark()
        return self._pick(self._dstep(self.dmodel, tok, pos), samp, mode, noise, self.vocab)

    def _host_graph(self) -> HostVerifyGraph | None:
        """The captured verify round of a host draft (speculative_graph), or None where it is not used."""
        if not self.graph_rounds:
            return None
        if self._graph is None:
            self._graph = HostVerifyGraph(self.model, self.k_max, self.vocab, self._vstep_plain, self._accept_host)
        if self._graph.failed:
            self.graph_rounds = False
            return None
        return self._graph

    # ---- capacity -------------------------------------------------------------------------------
    def _ensure_capacity(self, model: Transformer, n: int) -> None:
        """The Generator's growth rule (so a server's cache sizes, and compiled graphs, are shared)."""
        if n <= model.max_seq_len:
            return
        if self.gen is not None and model is self.model:
            self.gen.ensure_capacity(n)
            return
        if self.compiled:
            cap = max(CACHE_ROUND, 1 << (n - 1).bit_length())
        else:
            cap = -(-n // CACHE_ROUND) * CACHE_ROUND
        cap = min(max(min(cap, self.max_seq_len), n), model.args.max_seq_len)
        with torch.inference_mode(False):
            model.setup_caches(1, cap)

    def ensure_capacity(self, n: int) -> None:
        """Grow both models' caches for n positions (before warming up: growing recompiles)."""
        self._ensure_capacity(self.model, n)
        if self.dmodel is not None:
            self._ensure_capacity(self.dmodel, n)

    def _check(self, prompt_len: int, max_new_tokens: int) -> None:
        if prompt_len == 0:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if max_new_tokens < 1:
            raise InvalidRequestError(f"max_new_tokens must be >= 1, got {max_new_tokens}", param="max_tokens")
        if prompt_len + max_new_tokens > self.max_seq_len:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_seq_len} tokens. However, you requested "
                f"{prompt_len + max_new_tokens} tokens ({prompt_len} in the prompt, {max_new_tokens} for the "
                "completion). Please reduce the prompt or the number of new tokens.", param="messages")

    # ---- pieces ---------------------------------------------------------------------------------
    def _run_chunk(self, model: Transformer, ids: Sequence[int], start: int) -> Tensor:
        """Write ids at positions start.. into model's cache; logits of the last one [1, V]. The
        target's prompt goes through the Generator when there is one. A compiled prefill is padded
        to a power-of-two bucket (padding lands past the real positions, or on the last cache slot,
        which is overwritten before any query sees it)."""
        if self.gen is not None and model is self.model and start == 0:
            return self.gen.prefill(list(ids))
        dev, n = self.device, len(ids)
        cap = model.max_seq_len
        T = n
        if self.prefill_compiled:
            T = min(max(MIN_PREFILL_BUCKET, 1 << (n - 1).bit_length()), cap)
        idx = torch.zeros((1, T), dtype=torch.int64, device=dev)
        idx[0, :n] = torch.tensor(list(ids), dtype=torch.int64, device=dev)
        pos = (torch.arange(T, device=dev) + start).clamp_max(cap - 1)
        return self._chunk(model, idx, pos, torch.tensor([n - 1], device=dev))

    def calibrate(self, reps: int = 5, prompt_len: int = 64, sampling: SamplingParams | None = None) -> dict:
        """Time a verify, a plain step and a draft step on this device (after warm-up, in a sampler
        mode already compiled) and use the ratios as the controller's costs. A plain step is timed
        within a run of chained steps, as decode runs them (one synchronized step costs more: on a
        launch-bound model that made a verify look 1.07x a step where plain decode ran at 1.41x
        less, and n-gram ran at 0.80x of plain). Returns
        {"verify_cost", "draft_cost", seconds...}."""
        dev, K = self.device, self.k_max
        sampling = sampling or SamplingParams(temperature=0.0)
        with torch.inference_mode():
            self._ensure_capacity(self.model, prompt_len + K + 8)
            if self.dmodel is not None:
                self._ensure_capacity(self.dmodel, prompt_len + K + 8)
            samp, mode = sampling.tensors(dev), sampling.mode
            tok = torch.zeros((1, 1), dtype=torch.int64, device=dev)
            pos = torch.tensor([prompt_len], device=dev)
            idx = torch.zeros((1, K + 1), dtype=torch.int64, device=dev)
            vpos = torch.arange(K + 1, device=dev) + prompt_len
            q = torch.zeros((K, self.vocab), device=dev)
            kk, u, ones = torch.tensor(K, device=dev), torch.zeros(K, device=dev), torch.ones(self.vocab, device=dev)

            def timed(fn):
                for _ in range(2):
                    fn()
                ts = []
                for _ in range(reps):
                    _sync(dev)
                    t = time.perf_counter()
                    fn()
                    _sync(dev)
                    ts.append(time.perf_counter() - t)
                return sorted(ts)[len(ts) // 2]

            def plain_run(n: int = 8):  # chained like decode (step i+1 queued before token i is read)
                t = tok
                for _ in range(n):
                    t = self._plain_step(t.view(1, 1), pos, samp, mode, None if mode[0] else ones[None])

            t_step = timed(plain_run) / 8
            graph = self._host_graph()
            if graph is not None:  # what a host draft's round runs
                t_verify = timed(lambda: graph(0, [0] * K, prompt_len, mode, samp, u, ones))
            if graph is None or graph.failed:
                t_verify = timed(lambda: self._verify(idx, vpos, q if self.dmodel is not None else None, kk, u,
                                                      ones, samp, mode))
            t_draft = 0.0
            if self.dmodel is not None:
                t_draft = timed(lambda: self._draft_step(tok, pos, samp, mode, ones[None]))
        self.verify_cost, self.draft_cost, self.plain_seconds = t_verify / t_step, t_draft / t_step, t_step
        self.measured = {}
        self.calibration = {"verify_cost": self.verify_cost, "draft_cost": self.draft_cost, "step_s": t_step,
                "verify_s": t_verify, "draft_s": t_draft}
        return self.calibration

    def prefill_lengths(self, max_len: int) -> list[int]:
        """One prompt length per prefill bucket up to max_len (for ``warmup(prompt_lens=...)``)."""
        if not self.prefill_compiled:
            return []
        out, n = [], MIN_PREFILL_BUCKET
        while n < max_len:
            out.append(n)
            n *= 2
        return out

    def warmup(self, sampling_modes: Sequence[SamplingParams] = (SamplingParams(temperature=0.0),),
               prompt_lens: Sequence[int] = ()) -> float:
        """Compile (and capture) every step a request can hit, per sampler mode: prefill bucket,
        draft step, verify and the plain step; then the prefill of each length in prompt_lens
        (both models); then, compiled on CUDA, ``calibrate`` (the controller's costs measured, so
        that speculation switches off where it does not pay). Returns seconds."""
        t0 = time.perf_counter()
        adaptive, self.adaptive = self.adaptive, False  # always speculate, so verify runs
        self._warming = True  # host drafts propose something even without a match
        try:
            prompt = [1, 2, 3] * 3  # repeats, so the n-gram lookup proposes
            for sp in sampling_modes:
                for _ in self.generate_ids(prompt, self.k_max + 2, sp):
                    pass
        finally:
            self.adaptive, self._warming = adaptive, False
        with torch.inference_mode():
            for n in prompt_lens:  # eager too: a first call at a new length can tune kernels
                for model in (self.model, self.dmodel):
                    if model is not None and n < min(model.max_seq_len, self.max_seq_len):
                        self._run_chunk(model, [0] * n, 0)
        if self.auto_calibrate and sampling_modes:
            self.calibrate(sampling=sampling_modes[0])
        return time.perf_counter() - t0

    # ---- generation -----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate_ids(self, prompt_ids: Sequence[int], max_new_tokens: int, sampling: SamplingParams | None = None,
                     stop_token_ids: Sequence[int] | None = (), stats: SpeculationStats | None = None) -> Iterator[int]:
        """Yield new token ids, stopping after a stop token (yielded) or max_new_tokens (pass the
        tokenizer's EOS ids as stop_token_ids: the decoder has no tokenizer). ``stats``
        (or ``self.last_result_stats``) is filled as tokens come; the generator returns it too."""
        sampling = (sampling or SamplingParams(temperature=0.0)).validate()
        prompt = list(prompt_ids)
        n0 = len(prompt)
        self._check(n0, max_new_tokens)
        K, dev, V = self.k_max, self.device, self.vocab
        # a verify writes K+1 positions from the last token: near the cache's end plain steps take over,
        # so requests never grow the cache past what plain decoding would
        self.ensure_capacity(n0 + max_new_tokens)
        cap = self.model.max_seq_len if self.dmodel is None else min(self.model.max_seq_len, self.dmodel.max_seq_len)
        stop_set = set(stop_token_ids or ())
        mode, samp = sampling.mode, sampling.tensors(dev)
        greedy = mode[0]
        gen = None if greedy else make_generator(sampling.seed, dev)
        ones_v = torch.ones(V, device=dev)
        zeros_k = torch.zeros(K, device=dev)

        def noise(shape):
            return exponential_noise(shape, gen, dev) if gen is not None else None

        st = stats if stats is not None else SpeculationStats()
        st.__init__(source=self.draft.name, k_max=K, prompt_tokens=n0, accepted_hist=[0] * (K + 1),
                    k_hist=[0] * (K + 1))
        self.last_result_stats = st
        timed = self.follows_clock and (greedy or sampling.seed is None) and not self._warming
        m = self.measured if timed else {}
        ctl = AdaptiveK(K, verify_cost=m.get("verify_cost", self.verify_cost), draft_cost=self.draft_cost,
                        min_gain=self.min_gain, adaptive=self.adaptive,
                        plain_seconds=m.get("plain_seconds", self.plain_seconds),
                        catch_up_seconds=m.get("catch_up_seconds", 0.0))
        self.controller = ctl
        st.verify_cost = ctl.verify_cost
        t0 = time.perf_counter()

        # prefill both models; the first token comes from the target
        logits = self._run_chunk(self.model, prompt, 0)
        first = int(self._sample(logits, samp, mode, noise((1, V)))[0])
        seq = prompt + [first]
        dvalid = 0  # draft-model cache positions [0, dvalid) hold seq's tokens
        if self.dmodel is not None:  # off when its prefill alone would cost too much of this request;
            if self._off_starts >= RETRY_OFF_STARTS:  # but now and then one measures it again
                self._off_starts = 0
            elif ctl.start(max_new_tokens):
                self._off_starts += 1
        if self.dmodel is not None and ctl.on:  # a draft that cannot pay is never prefilled (nor run)
            t = time.perf_counter()
            self._run_chunk(self.dmodel, prompt, 0)
            dvalid = n0
            if timed:
                self._price_catch_up(ctl, t)
        self.draft.adapt(ctl.verify_cost)  # e.g. the shortest n-gram match worth a verify
        self.draft.reset(prompt)
        self.draft.extend([first])
        self.draft_valid = dvalid  # for tests: the draft cache is exact on [0, draft_valid)
        idx = torch.zeros((1, K + 1), dtype=torch.int64, device=dev)  # a model draft's tokens
        q = torch.zeros((K, V), device=dev) if self.dmodel is not None else None
        k_t = [torch.tensor(i, device=dev) for i in range(K + 1)]
        emitted = 0

        def emit(toks):
            nonlocal emitted
            for tok in toks:
                emitted += 1
                st.generated_tokens = emitted
                if emitted == 1:
                    st.time_to_first_token = time.perf_counter() - t0
                st.total_seconds = time.perf_counter() - t0
                yield tok
                if tok in stop_set or emitted >= max_new_tokens:
                    return True
            return False

        if (yield from emit([first])):
            return st
        while True:
            t_round = time.perf_counter()
            t_catch_up = 0.0  # priced apart from the round (AdaptiveK.time_catch_up)
            P = len(seq) - 1  # position of the last token, not yet in the target's cache
            k = ctl.next_k() if P + K + 1 <= cap else 0
            k = min(k, max_new_tokens - emitted - 1)  # no point drafting past the end
            drafts: list[int] | None = None
            if k > 0 and self.dmodel is None:
                drafts = self.draft.propose(k) or ([0] * k if self._warming else [])
                k = len(drafts)
                if ctl.on and self.adaptive and k and ctl.gain(k) < ctl.min_gain:
                    k = 0  # too short a proposal to pay for a verify
            if k <= 0:
                if (yield from self._plain_run(seq, ctl, emit, st, cap, lambda: max_new_tokens - emitted, samp, mode,
                                               noise, timed)):
                    return st
                continue
            else:
                graph = self._host_graph() if drafts is not None else None
                res = None if graph is None else graph(  # the whole round: one copy in, one graph, one read back
                    seq[-1], drafts, P, mode, samp, zeros_k if greedy else torch.rand(K, generator=gen, device=dev),
                    ones_v if greedy else noise((V,)))
                if res is not None:
                    n, tok = res
                    new = drafts[:n] + [tok]
                elif drafts is not None:  # one copy to the device
                    vidx = torch.tensor([[seq[-1]] + drafts + [0] * (K - k)], dtype=torch.int64, device=dev)
                else:
                    vidx = idx
                    idx.zero_()
                    q.zero_()
                    idx[0, 0] = seq[-1]
                    t, chunk = time.perf_counter(), P - dvalid > 2  # more than two tokens: a chunk forward
                    dvalid = self._catch_up(seq, dvalid, P, samp, mode, ones_v)
                    if timed and chunk:
                        t_catch_up = self._price_catch_up(ctl, t)
                    for i in range(k):
                        d, qi = self._draft_step(idx[0, i].view(1, 1).clone(), torch.tensor([P + i], device=dev),
                                                 samp, mode, ones_v[None] if greedy else noise((1, V)))
                        idx[0, i + 1] = d[0]
                        q[i] = qi[0]
                    st.draft_steps += k
                    dvalid = P + k
                if res is None:
                    u = zeros_k if greedy else torch.rand(K, generator=gen, device=dev)
                    out = self._verify(vidx, torch.arange(P, P + K + 1, device=dev), q, k_t[k], u,
                                       ones_v if greedy else noise((V,)), samp, mode)
                    if drafts is not None:
                        n, tok = out.tolist()  # one read back
                        new = drafts[:n] + [tok]
                    else:
                        n, tok, *drafted = torch.cat([out, idx[0, 1:]]).tolist()
                        new = drafted[:n] + [tok]
                if self.dmodel is not None:
                    dvalid = min(dvalid, P + 1 + n)  # drafts past the first rejection are stale
                st.record(k, n)
            st.switched_off = ctl.switched_off
            self.draft_valid = dvalid
            seq.extend(new)
            self.draft.extend(new)
            if (yield from emit(new)):
                return st
            if timed:
                ctl.time_round(k, time.perf_counter() - t_round - t_catch_up)
                self._learn(ctl, st)
            ctl.update(k, n)
            st.switched_off = ctl.switched_off

    def _price_catch_up(self, ctl: AdaptiveK, t0: float) -> float:
        """The draft's cache chunk begun at ``t0`` is done: its seconds go to the controller and to
        what the next request starts from. Returns them."""
        _sync(self.device)
        seconds = time.perf_counter() - t0
        ctl.time_catch_up(seconds)
        self.measured["catch_up_seconds"] = ctl.catch_up_seconds
        return seconds

    def _learn(self, ctl: AdaptiveK, st: SpeculationStats) -> None:
        """The costs measured so far: in the stats, and (after LEARN_ROUNDS rounds) where the next
        request's controller starts."""
        st.verify_cost = ctl.verify_cost
        if ctl.timed_rounds >= LEARN_ROUNDS:  # kept under what lets a full-acceptance round pay, so
            # that the next request can still probe and measure again
            self.measured["verify_cost"] = min(ctl.verify_cost, max(0.99 * ctl.max_payable_cost(), 1.0))
        if ctl.t_plain is not None:
            self.measured["plain_seconds"] = ctl.t_plain

    def _plain_run(self, seq: list[int], ctl: AdaptiveK, emit, st: SpeculationStats, cap: int, left, samp: dict,
                   mode: tuple, noise, timed: bool) -> Iterator[int]:
        """Plain steps, pipelined like the Generator's (on CUDA the next step is queued before this
        token is read back), until speculation should resume; yields the tokens through ``emit``
        and returns True when the request is over. While speculation is off a host draft's guess
        is checked against each token for free (``AdaptiveK.observe``); when a host draft has a
        proposal again, the queued token is taken and the run ends."""
        dev, K, V = self.device, self.k_max, self.vocab
        shadows = self.dmodel is None and self.adaptive
        cur = self._plain_step(torch.tensor([[seq[-1]]], device=dev), torch.tensor([len(seq) - 1], device=dev),
                               samp, mode, noise((1, V)))
        pos = torch.tensor([len(seq)], device=dev)
        last = False
        t_prev = None  # the previous token's delivery: the intervals after it are plain tokens' cost
        while True:
            P = len(seq)  # where cur's token lands; the next step reads it there
            shadow = self.draft.propose(1) if shadows and not ctl.on else []
            if self._event is not None:
                self._host_tok.copy_(cur, non_blocking=True)
                self._event.record()
            nxt = None
            if not last and left() >= 2 and P < cap and (P + K + 1 > cap or (
                    self.dmodel is None if ctl.on else ctl.next_k() == 0)):
                nxt = self._plain_step(cur.view(1, 1), pos, samp, mode, noise((1, V)))
                pos += 1
            if self._event is not None:
                self._event.synchronize()
                new = int(self._host_tok[0])
            else:
                new = int(cur[0])
            st.plain_steps += 1
            if shadow:
                ctl.observe(1, int(shadow[0] == new))
            st.switched_off = ctl.switched_off
            seq.append(new)
            self.draft.extend([new])
            if (yield from emit([new])):
                return True
            now = time.perf_counter()
            if t_prev is not None and timed:
                ctl.time_plain(now - t_prev)
            t_prev = now
            if nxt is None:
                return False
            cur = nxt
            last = last or (ctl.on and self.dmodel is None and bool(self.draft.propose(1)))

    def _catch_up(self, seq: list[int], dvalid: int, P: int, samp: dict, mode: tuple, ones_v: Tensor) -> int:
        """Bring the draft model's cache to positions [0, P): one-token steps for one or two
        missing tokens, a padded chunk forward for more."""
        missing = P - dvalid
        dev = self.device
        if missing <= 0:
            return dvalid
        if missing <= 2:
            for i in range(dvalid, P):
                self._draft_step(torch.tensor([[seq[i]]], device=dev), torch.tensor([i], device=dev),
                                 samp, mode, ones_v[None])
        else:
            self._run_chunk(self.dmodel, seq[dvalid:P], dvalid)
        self.last_result_stats.draft_steps += missing
        return P


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def stream_speculative(dec, gen, prompt_ids: Sequence[int], max_new_tokens: int, sampling=None,
                       stop: Sequence[str] = (), stop_token_ids: Sequence[int] | None = None,
                       spec_stats=None) -> Iterator:
    """``Generator.stream`` with the speculative decoder's tokens: yields Delta objects, the last
    one carrying finish_reason and GenerationStats. ``spec_stats`` (a SpeculationStats), when
    given, is filled in as tokens come."""
    from .generate import GenerationStats, timed_tokens

    gen.check_request(len(prompt_ids), max_new_tokens)
    stop_ids = list(stop_token_ids if stop_token_ids is not None else gen._default_stop_ids())
    st = spec_stats if spec_stats is not None else SpeculationStats()
    stats = GenerationStats(prompt_tokens=len(prompt_ids))
    forget = getattr(gen, "forget_prefix", None)  # the decoder rewrites the KV cache the Generator may reuse
    if forget is not None:
        forget()
    tokens = dec.generate_ids(prompt_ids, max_new_tokens, sampling, stop_token_ids=stop_ids, stats=st)
    yield from gen.stream_tokens(timed_tokens(tokens, stats), stats, stop=stop, stop_token_ids=stop_ids)
