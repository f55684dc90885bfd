"""Prompt caching on the live KV cache: a request prefills only what the cache does not hold yet,
and its greedy tokens equal those of a Generator that never reuses anything."""

from __future__ import annotations

import pytest
import torch

from blitzgen.generate import GenerationStats, Generator
from blitzgen.sampling import SamplingParams

from .conftest import tiny_model

GREEDY = SamplingParams(temperature=0.0)
SYSTEM = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]


def run(gen, prompt, n=6, sampling=GREEDY):
    stats = GenerationStats()
    ids = list(gen.generate_ids(prompt, n, sampling, stop_token_ids=(), stats=stats))
    return ids, stats.cached_tokens


def fresh(prompt, n=6, sampling=GREEDY):
    """The oracle: a new Generator (nothing cached) on the same weights."""
    return run(Generator(tiny_model(seed=21)), prompt, n, sampling)[0]


@pytest.fixture
def gen():
    return Generator(tiny_model(seed=21))


def test_second_turn_reuses_the_first_turns_tokens(gen):
    turn1 = SYSTEM + [30, 31, 32]
    out1, cached1 = run(gen, turn1)
    assert cached1 == 0 and out1 == fresh(turn1)
    # the next turn's prompt: the previous prompt, the answer, then a new user message
    turn2 = turn1 + out1 + [40, 41]
    assert gen.reuse_prefix(turn2) == len(turn1) + len(out1) - 1  # the last answer token never entered the cache
    out2, cached2 = run(gen, turn2)
    assert cached2 == len(turn1) + len(out1) - 1
    assert out2 == fresh(turn2)


def test_same_prompt_again_reruns_only_its_last_token(gen):
    prompt = SYSTEM + [50]
    first, _ = run(gen, prompt)
    assert gen.reuse_prefix(prompt) == len(prompt) - 1
    again, cached = run(gen, prompt)
    assert cached == len(prompt) - 1 and again == first
    # a sampled request with a seed reproduces with and without reuse
    sp = SamplingParams(temperature=0.9, top_k=20, seed=5)
    assert run(gen, prompt, 6, sp)[0] == fresh(prompt, 6, sp)


def test_prefix_ending_inside_a_word_matches_by_token_id(gen):
    """"hello wor" then "hello world": the token ids differ where the word was split, so only the
    ids before the split are reused."""
    run(gen, SYSTEM + [60, 61])  # ...[60, 61] = "wor" split as two tokens
    prompt = SYSTEM + [60, 62, 63]  # [60, 62] = "world" tokenized differently
    assert gen.reuse_prefix(prompt) == len(SYSTEM) + 1
    assert run(gen, prompt)[0] == fresh(prompt)


def test_changed_system_prompt_is_a_miss(gen):
    run(gen, SYSTEM + [70])
    prompt = [99] + SYSTEM[1:] + [70]
    assert gen.reuse_prefix(prompt) == 0
    out, cached = run(gen, prompt)
    assert cached == 0 and out == fresh(prompt)


def test_failure_mid_prefill_forgets_the_cache(gen):
    """A request that dies inside prefill (after some layers wrote their KV) leaves no claim; the
    next request is still exact."""
    prompt = SYSTEM + [80, 81]
    run(gen, prompt)
    layer = gen.model.layers[1]

    def boom(*a, **kw):
        raise KeyboardInterrupt("cancelled")

    layer.forward, original = boom, layer.forward
    other = SYSTEM[:4] + [90, 91, 92]
    with pytest.raises(KeyboardInterrupt):
        run(gen, other)
    layer.forward = original
    assert gen.reuse_prefix(prompt) == 0
    assert run(gen, prompt)[0] == fresh(prompt)


def test_closing_a_request_early_keeps_what_the_cache_holds(gen):
    prompt = SYSTEM + [85]
    it = gen.generate_ids(prompt, 20, GREEDY, stop_token_ids=())
    got = [next(it) for _ in range(3)]
    it.close()
    nxt = prompt + got + [86]
    assert gen.reuse_prefix(nxt) == len(prompt) + len(got)  # the third token's step ran too
    assert run(gen, nxt)[0] == fresh(nxt)


def test_cache_growth_forgets_the_prefix():
    model = tiny_model(seed=21)
    model.setup_caches(1, 32)
    gen = Generator(model)
    prompt = SYSTEM + [33]
    run(gen, prompt, 4)
    longer = prompt + [34] * 30
    assert gen.reuse_prefix(longer) == len(prompt)
    out, cached = run(gen, longer, 4)  # the cache grows (reallocated): nothing reusable
    assert cached == 0 and out == fresh(longer, 4)


def test_hooks_prefill_and_model_logits_equal_generate(gen):
    prompt = SYSTEM + [7]
    want = fresh(prompt, 3)
    with torch.inference_mode():
        logits = gen.prefill(prompt)
        toks = [int(logits.argmax(-1))]
        pos = torch.tensor([len(prompt)])
        for _ in range(2):
            logits = gen.model_logits(torch.tensor([[toks[-1]]]), pos)
            toks.append(int(logits.argmax(-1)))
            pos += 1
    assert toks == want
    assert gen.reuse_prefix(prompt + [1]) == 0  # model_logits leaves the cache to its caller
    with torch.inference_mode():
        gen.prefill(prompt[:5])
        logits = gen.prefill(prompt, start=5)  # the rest only, at positions 5..
    assert int(logits.argmax(-1)) == want[0]


def test_stream_tokens_detokenizes_any_iterator(smol_path):
    """What speculative and constrained decoders hand their token ids to."""
    from blitzgen.loading import gguf as gguf_src
    from blitzgen.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(gguf_src.open_reader(smol_path))
    gen = Generator(tiny_model(seed=21), tok)
    ids = tok.encode("hello world, again")
    stats = GenerationStats(generated_tokens=len(ids))
    eos = tok.eos_token_ids[0]
    deltas = list(gen.stream_tokens(iter(ids + [eos, ids[0]]), stats))
    assert "".join(d.text for d in deltas) == "hello world, again"
    assert deltas[-1].finish_reason == "stop" and deltas[-1].stats is stats
    deltas = list(gen.stream_tokens(iter(ids), stats, stop=[", "]))
    assert "".join(d.text for d in deltas) == "hello world" and deltas[-1].finish_reason == "stop"
    assert list(gen.stream_tokens(iter(ids), stats))[-1].finish_reason == "length"
