"""Speculative decoding for the verbs: the option group, its torch-free checks, building the
decoder(s) after the model is loaded, and a streaming adapter that turns the decoder's token ids
into the same text deltas (stop strings, held-back partial characters, final stats) as
``Generator.stream``.

    speculation   --speculate ngram|self-int4|draft-model  --draft-model M  --speculate-k K

Rules: ``--draft-model M`` implies ``--speculate draft-model``; ``--speculate draft-model`` needs
``--draft-model``; ``--draft-model`` with another source, or ``--speculate-k`` without a source,
is an error. ``serve`` takes a comma list (``--speculate ngram,self-int4``): every source named
is loaded and may be asked for per request; the first is the default (``off,ngram``: loaded,
but only for requests that ask).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

from ..errors import InvalidRequestError

SOURCES = ("ngram", "self-int4", "draft-model")  # speculative.SOURCES, without importing torch
K_RANGE = (1, 32)
DEFAULT_K = 4


def add_speculation_args(p: argparse.ArgumentParser, *, sources: Sequence[str] = SOURCES, draft_model: bool = True,
                         multi: bool = False, help_note: str = ""):
    """The speculation group. ``multi`` (serve): --speculate takes a comma list, "off" allowed first."""
    g = p.add_argument_group("speculation")
    what = ("a comma list of sources to load, the first being the default for requests that do not set "
            "\"speculate\" ('off' first: loaded, used only when a request asks); " if multi else "")
    g.add_argument("--speculate", default=None, metavar="|".join(sources),
                   type=_sources_type(sources, multi),
                   help=f"speculative decoding (exact: the same output as plain decoding): {what}ngram = prompt "
                        "lookup, no second model; self-int4 = the model quantized to int4 drafts for itself"
                        + ("; draft-model = a smaller model with the same tokenizer (--draft-model)" if draft_model
                           else "") + " (default: off)" + help_note)
    if draft_model:
        g.add_argument("--draft-model", default=None, metavar="M",
                       help="a smaller model with the same tokenizer as the draft (implies --speculate "
                            "draft-model; same forms as --model)")
    g.add_argument("--speculate-k", type=int, default=None, metavar="K",
                   help=f"draft length, {K_RANGE[0]}..{K_RANGE[1]}; adapted down (and speculation switched off) "
                        f"when drafts are rejected (default: {DEFAULT_K})")
    return g


def _sources_type(sources: Sequence[str], multi: bool):
    allowed = tuple(sources) + (("off",) if multi else ())

    def parse(value: str) -> list[str]:
        items = [v.strip() for v in value.split(",")] if multi else [value.strip()]
        for v in items:
            if v not in allowed:
                raise argparse.ArgumentTypeError(f"invalid choice: {v!r} (choose from {', '.join(allowed)})")
        if "off" in items[1:]:
            raise argparse.ArgumentTypeError("'off' may only come first")
        if len(set(items)) != len(items):
            raise argparse.ArgumentTypeError(f"a source is named twice in {value!r}")
        return items

    return parse


def check_speculation_args(args) -> None:
    """The torch-free checks (run by commands.common.check_args for every verb). Normalises
    ``args.speculate`` to a list of sources (or None) and ``args.speculate_k`` to an int."""
    if not hasattr(args, "speculate"):
        return
    spec = args.speculate
    if isinstance(spec, str):  # set programmatically
        spec = args.speculate = [spec]
    draft = getattr(args, "draft_model", None)
    k = getattr(args, "speculate_k", None)
    if draft is not None:
        if not spec:
            spec = args.speculate = ["draft-model"]
        elif "draft-model" not in spec:
            raise InvalidRequestError(f"--draft-model implies --speculate draft-model, not --speculate "
                                      f"{','.join(spec)} (drop one of them)", param="draft_model")
    elif spec and "draft-model" in spec:
        raise InvalidRequestError("--speculate draft-model needs --draft-model M (a smaller model with the same "
                                  "tokenizer)", param="draft_model")
    if k is not None:
        if not spec or spec == ["off"]:
            raise InvalidRequestError("--speculate-k needs a speculation source (--speculate ngram|self-int4 or "
                                      "--draft-model M)", param="speculate_k")
        if not K_RANGE[0] <= k <= K_RANGE[1]:
            raise InvalidRequestError(f"--speculate-k must be between {K_RANGE[0]} and {K_RANGE[1]}, got {k}",
                                      param="speculate_k")
    if not spec:
        return
    if getattr(args, "url", None):
        raise InvalidRequestError("--speculate applies to a model loaded here; with --url the server's settings "
                                  "apply (drop --speculate or --url)", param="speculate")
    if "self-int4" in spec and getattr(args, "quantize", None) == "int4":
        raise InvalidRequestError("--speculate self-int4 drafts with an int4 copy of the model; with --quantize "
                                  "int4 the model is that already (use ngram, or --quantize int8)",
                                  param="speculate")
    args.speculate_k = k if k is not None else DEFAULT_K


def speculation_sources(args) -> list[str]:
    """The sources to load (without "off")."""
    return [s for s in (getattr(args, "speculate", None) or []) if s != "off"]


def default_source(args) -> str | None:
    spec = getattr(args, "speculate", None) or []
    return spec[0] if spec and spec[0] != "off" else None


# ---- building -----------------------------------------------------------------------------------
def build_decoders(args, lm, gen, *, log=None) -> dict:
    """{source: SpeculativeDecoder} on ``lm``'s model, sharing its KV cache and the Generator's
    compile setting and length limit (``speculative.build_decoder``; under --tp, on every rank). A
    draft model is loaded like --model (same device and dtype); one with another tokenizer is a
    one-line error."""
    from ..parallel.runner import TPGenerator
    from ..speculative import build_decoder

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = {}
    group_size = getattr(args, "group_size", None) or 32
    draft_model = getattr(args, "draft_model", None)
    for source in speculation_sources(args):
        t0 = time.perf_counter()
        if isinstance(gen, TPGenerator):
            out[source] = gen.speculative(source, args.speculate_k, group_size, draft_model)
        else:
            out[source] = build_decoder(gen, source, args.speculate_k, group_size=group_size, draft_model=draft_model)
        ranks = f", {gen.group.world} ranks" if isinstance(gen, TPGenerator) else ""
        log(f"Speculation {source} (k<={args.speculate_k}{', draft ' + draft_model if source == 'draft-model' else ''}"
            f"{ranks}) ready in {time.perf_counter() - t0:.2f} seconds")
    return out


def warm_up_speculative(lm, gen, dec, sampling_modes, prompt_lens: Sequence[int] = ()) -> float:
    """``compile_cache.warm_up`` for a decoder: its warm-up inside a compile-cache entry of its own
    (the source and K in the key), marking the start-up report; eager: 0.0."""
    if not dec.compiled:
        return 0.0
    from ..compile_cache import cached
    from ..startup import REPORT

    extra = {**gen.warmup_plan(), "speculate": dec.draft.name, "k": dec.k_max, "cache_len": gen.cache_len,
             "warmup": sorted({tuple(sp.mode) for sp in sampling_modes}), "prompt_lens": sorted(prompt_lens)}
    with cached(lm.args, gen.options, extra, root=gen.options.cache_dir):
        REPORT.mark("cache load")
        secs = dec.warmup(sampling_modes, prompt_lens=prompt_lens)
        REPORT.mark("compile + warm-up")
        REPORT.add_compile_breakdown()
    return secs


def speculative_decoder(args, lm, gen, sampling_modes=None):
    """The decoder of the one source --speculate names (warmed up when compiled), or None."""
    source = default_source(args)
    if source is None:
        return None
    dec = build_decoders(args, lm, gen)[source]
    if gen.compiled:
        from ..sampling import sampler_modes

        secs = warm_up_speculative(lm, gen, dec, sampling_modes or sampler_modes())
        print(f"Speculation compiled in {secs:.2f} seconds", file=sys.stderr, flush=True)
    return dec


def server_speculation(args, *, log=None):
    """For ``Engine(speculation=...)``: builds the decoders in the engine's thread after loading
    (None when --speculate was not given)."""
    if not speculation_sources(args):
        return None
    return lambda lm, gen: (build_decoders(args, lm, gen, log=log), default_source(args))


class SpeculativeRun:
    """``blitzgen generate --speculate ...`` for commands.generate.run_loaded's print path: the
    decoder, warmed up for this sampler and prompt when compiled; after each sample the speculation
    summary (acceptance, tokens per verify, accepted-length histogram), after several the total."""

    def __init__(self, args, lm, gen, ids: list[int], sampling):
        from ..speculative import SpeculationStats

        self.gen, self.spec, self.total = gen, SpeculationStats(), SpeculationStats()
        self.dec = build_decoders(args, lm, gen)[default_source(args)]
        self.dec.ensure_capacity(len(ids) + args.max_new_tokens)  # before warming up: growing recompiles
        if gen.compiled:  # this sampler mode, and this prompt's prefill bucket when prefill compiles
            secs = warm_up_speculative(lm, gen, self.dec, [sampling], prompt_lens=[len(ids)])
            print(f"Compilation time: {secs:.2f} seconds", file=sys.stderr, flush=True)

    def stream(self, ids, max_new_tokens: int, sampling, stop):
        from ..speculative import SpeculationStats, stream_speculative

        self.spec = SpeculationStats()
        return stream_speculative(self.dec, self.gen, ids, max_new_tokens, sampling, stop, spec_stats=self.spec)

    def sample_done(self) -> None:
        self.total.merge(self.spec)
        print(f"Speculation: {self.spec.summary().removeprefix('speculation ')}", file=sys.stderr, flush=True)

    def all_done(self, num_samples: int) -> None:
        if num_samples > 1:
            print(f"Speculation, all samples: {self.total.summary().removeprefix('speculation ')}", file=sys.stderr)
