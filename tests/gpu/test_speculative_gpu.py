"""Speculative decoding on CUDA as shipped: the compiled verify of K+1 tokens, the plain and draft
steps as CUDA graphs, and the calibration, on the suite's random Llama-3-style model. n-gram runs in
float32 (compiled and eager agree to ~1e-6): its greedy tokens must equal plain eager decoding.
self-int4 runs in bf16 (tinygemm), checked tie-aware against the eager oracle. Then the same through
the tensor-parallel runner at --tp 1 (TPGenerator.speculative, rank 0's costs)."""

from __future__ import annotations

import random

import pytest
import torch

from blitzgen.generate import Generator
from blitzgen.speculative import NgramDraft, SelfInt4Draft, SpeculativeDecoder

from .common import GREEDY, check_greedy, random_model

pytestmark = pytest.mark.gpu

NEW = 40
TOL = 0.25  # as test_decode_gpu: bf16 near-ties may round either way


def _prompt() -> list[int]:
    """Repeats itself, so that n-gram matches come too."""
    rng = random.Random(3)
    x, y = [rng.randrange(1, 32000) for _ in range(12)], [rng.randrange(1, 32000) for _ in range(20)]
    return x + y + x


@pytest.mark.parametrize("kind", ["ngram", "self-int4"])
def test_compiled_speculation_matches_plain_decoding(kind, summary):
    dtype = torch.float32 if kind == "ngram" else torch.bfloat16
    prompt = _prompt()
    oracle = random_model(dtype=dtype, cache=512)
    want = list(Generator(oracle).generate_ids(prompt, NEW, GREEDY, stop_token_ids=()))
    model = random_model(dtype=dtype, cache=512)
    gen = Generator(model, compile=True)
    draft = NgramDraft(min_match=1) if kind == "ngram" else SelfInt4Draft(model)
    dec = SpeculativeDecoder(model, draft, k=4, gen=gen, adaptive=False)  # every proposal is verified
    dec.warmup([GREEDY], prompt_lens=[len(prompt)])
    dec._warming = True  # n-gram: a draft of zeros where nothing matches, so every step verifies
    got = list(dec.generate_ids(prompt, NEW, GREEDY))
    dec._warming = False
    st = dec.last_result_stats
    assert st.verify_steps > 0, st.summary()
    if kind == "ngram":
        assert got == want, st.summary()
        assert dec._graph is not None and dec._graph.captures >= 1  # rounds ran as one captured graph
        msg = "identical to eager plain decoding"
    else:
        msg = check_greedy(oracle, prompt, got, TOL, eager=want)
    cal = dec.calibration or {}
    summary(f"{kind}: {msg}; {st.summary()}; calibrated c_v {cal.get('verify_cost', float('nan')):.2f} "
            f"c_d {cal.get('draft_cost', float('nan')):.2f}")


def test_captured_ngram_rounds_match_the_uncaptured_ones(summary):
    """speculative_graph: greedy and seeded sampled rounds give the tokens of the torch.compile
    path; a grown KV cache drops the graphs and the next round captures again."""
    from blitzgen.sampling import SamplingParams

    prompt = _prompt()
    model = random_model(dtype=torch.float32, cache=512)
    gen = Generator(model, compile=True)
    hot = SamplingParams(temperature=0.8, top_k=50, seed=11)
    runs = {}
    for graphed in (False, True):
        dec = SpeculativeDecoder(model, NgramDraft(min_match=1), k=4, gen=gen, adaptive=False)
        dec.graph_rounds = graphed
        dec.warmup([GREEDY, hot])
        dec._warming = True  # every step verifies
        runs[graphed] = [list(dec.generate_ids(prompt, NEW, sp)) for sp in (GREEDY, hot)]
    assert runs[True] == runs[False]
    before = dec._graph.captures
    assert before >= 2 and not dec._graph.failed  # one graph per sampler mode
    dec.ensure_capacity(1024)  # a new cache: the graphs are stale
    assert list(dec.generate_ids(prompt, NEW, GREEDY)) == runs[False][0]
    assert dec._graph.captures == before + 1 and dec.graph_rounds
    summary("n-gram rounds as one CUDA graph: greedy and sampled tokens as through torch.compile; recaptured "
            "after the cache grew")


def test_speculation_through_the_tensor_parallel_runner_at_tp1(summary):
    from blitzgen.parallel import TPSpec, run

    prompt = [5, 17, 42, 99, 3, 250, 5, 17, 42, 99, 7, 8, 5, 17, 42]

    def lead(lm, gen):
        want = list(gen.generate_ids(prompt, 24, GREEDY, stop_token_ids=()))
        dec = gen.speculative("ngram", 4)
        dec.warmup([GREEDY], prompt_lens=[len(prompt)])
        got = list(dec.generate_ids(prompt, 24, GREEDY))
        return want, got, dec.last_result_stats.summary()

    want, got, line = run(1, TPSpec(shape="tiny", device="cuda", dtype="float32", compile=True), lead)
    assert got == want, line
    summary(f"--tp 1, compiled, n-gram: identical to plain; {line}")
