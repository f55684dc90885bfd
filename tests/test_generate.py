"""Generation: KV-cache decode vs full forward, compiled vs eager, streaming, stops, limits."""

from __future__ import annotations

import pytest
import torch

from blitzgen.errors import ContextLengthError, InvalidRequestError
from blitzgen.generate import GenerationStats, Generator, prefill_bucket, weight_bytes
from blitzgen.runtime import RuntimeOptions
from blitzgen.sampling import SamplingParams, sampler_modes

from .conftest import tiny_model

GREEDY = SamplingParams(temperature=0.0)


def full_forward_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Reference: recompute the whole sequence every step, no cache reuse."""
    ids = list(prompt)
    out = []
    for _ in range(n):
        model.setup_caches(1, model.args.max_seq_len)  # fresh cache each time
        with torch.no_grad():
            logits = model(torch.tensor([ids]), torch.arange(len(ids)))
        tok = int(logits[0, -1].argmax())
        ids.append(tok)
        out.append(tok)
    return out


def test_kv_cache_decode_equals_full_forward():
    model = tiny_model(seed=1)
    prompt = [5, 17, 42, 99, 3, 250]
    want = full_forward_greedy(model, prompt, 10)
    gen = Generator(model)
    got = list(gen.generate_ids(prompt, 10, GREEDY, stop_token_ids=()))
    assert got == want


def test_decode_logits_equal_full_forward_logits():
    model = tiny_model(seed=2)
    seq = torch.randint(0, model.args.vocab_size, (1, 12))
    with torch.no_grad():
        full = model(seq, torch.arange(12))
        model.setup_caches(1, 64)
        model(seq[:, :8], torch.arange(8))
        steps = [model(seq[:, i:i + 1], torch.tensor([i])) for i in range(8, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 8:], atol=1e-5, rtol=1e-5)


def test_compiled_equals_eager():
    """CPU inductor on a tiny config: the compiled decode and bucketed prefill give the same tokens."""
    prompt = [7, 8, 9, 10, 11]
    eager = list(Generator(tiny_model(seed=3)).generate_ids(prompt, 8, GREEDY, stop_token_ids=()))
    gen = Generator(tiny_model(seed=3), compile=True, max_seq_len=64)
    gen.ensure_capacity(64)
    got = list(gen.generate_ids(prompt, 8, GREEDY, stop_token_ids=()))
    assert got == eager
    # sampled, same seed -> same tokens in both paths
    sp = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, seed=123)
    eager_s = list(Generator(tiny_model(seed=3)).generate_ids(prompt, 8, sp, stop_token_ids=()))
    assert list(gen.generate_ids(prompt, 8, sp, stop_token_ids=())) == eager_s


def test_stop_token_and_length():
    model = tiny_model(seed=4)
    gen = Generator(model)
    stats = GenerationStats()
    ids = list(gen.generate_ids([1, 2, 3], 6, GREEDY, stop_token_ids=(), stats=stats))
    assert len(ids) == 6 and stats.generated_tokens == 6 and stats.prompt_tokens == 3
    stop_at = ids[2]
    first = ids.index(stop_at)
    got = list(gen.generate_ids([1, 2, 3], 6, GREEDY, stop_token_ids=[stop_at]))
    assert got == ids[: first + 1]


def test_seed_reproducible_and_varies():
    gen = Generator(tiny_model(seed=5))
    a = list(gen.generate_ids([1, 2], 16, SamplingParams(temperature=1.5, seed=7), stop_token_ids=()))
    b = list(gen.generate_ids([1, 2], 16, SamplingParams(temperature=1.5, seed=7), stop_token_ids=()))
    c = list(gen.generate_ids([1, 2], 16, SamplingParams(temperature=1.5, seed=8), stop_token_ids=()))
    assert a == b and a != c


def test_context_limits():
    gen = Generator(tiny_model(seed=6), max_seq_len=32)
    with pytest.raises(ContextLengthError, match="maximum context length is 32 tokens"):
        list(gen.generate_ids(list(range(30)), 5, GREEDY))
    with pytest.raises(InvalidRequestError, match="empty"):
        list(gen.generate_ids([], 5, GREEDY))
    with pytest.raises(InvalidRequestError, match="new tokens must be at least 1"):
        list(gen.generate_ids([1], 0, GREEDY))
    # the cache grows on demand, up to max_seq_len
    assert len(list(gen.generate_ids(list(range(20)), 12, GREEDY, stop_token_ids=()))) == 12


def test_weight_bytes_counts_tied_output_once(smol):
    m = smol.model
    n = sum(p.numel() for p in m.parameters()) * 4  # parameters() yields the tied weight once
    assert weight_bytes(m) == n


# ---- text streaming on the real model -----------------------------------------------------------
def test_stream_deltas_concatenate_to_decode(smol):
    tok = smol.tokenizer
    gen = Generator(smol.model, tok)
    ids = tok.encode_chat([{"role": "user", "content": "Write a haiku about snow, with an emoji."}])
    deltas = list(gen.stream(ids, 40, GREEDY))
    text = "".join(d.text for d in deltas)
    out_ids = [i for d in deltas for i in d.token_ids]
    assert deltas[-1].finish_reason in ("stop", "length")
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert text == tok.decode(out_ids, skip_special_tokens=True)
    assert "\ufffd" not in text


def test_stream_stop_string(smol):
    tok = smol.tokenizer
    gen = Generator(smol.model, tok)
    ids = tok.encode_chat([{"role": "user", "content": "Implement fibonacci in python"}])
    full = gen.complete(ids, 40, GREEDY)
    assert len(full.text) > 20
    stop = full.text[10:14]
    cut = gen.complete(ids, 40, GREEDY, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]


# ---- the generation contract --------------------------------------------------------------------
def test_generator_follows_the_models_cache_size():
    """The model owns its cache: shrinking it behind a Generator's back (as GPTQ and the quality
    check do with setup_caches) must not leave the Generator indexing past its end."""
    model = tiny_model(seed=7)
    gen = Generator(model, max_seq_len=512)
    want = list(gen.generate_ids([3, 4, 5], 20, GREEDY, stop_token_ids=()))
    model.setup_caches(1, 16)
    assert list(gen.generate_ids([3, 4, 5], 20, GREEDY, stop_token_ids=())) == want
    assert model.cache_len >= 23


def test_final_delta_and_completion_carry_the_stats():
    from types import SimpleNamespace

    class CharTok:  # token id i is the character chr(97 + i % 26)
        eos_token_ids = []

        def detokenizer(self, skip_special_tokens=True):
            return SimpleNamespace(add=lambda i: chr(97 + i % 26), flush=lambda: "")

    gen = Generator(tiny_model(seed=8), CharTok())
    deltas = list(gen.stream([1, 2, 3], 5, GREEDY))
    assert all(d.stats is None for d in deltas[:-1])
    last = deltas[-1]
    assert last.finish_reason == "length" and last.stats.generated_tokens == 5 and last.stats.prompt_tokens == 3
    done = gen.complete([1, 2, 3], 5, GREEDY)
    assert done.stats.generated_tokens == 5 and done.text == "".join(d.text for d in deltas)
    assert not hasattr(gen, "last_stats") and not hasattr(gen, "capacity")


def test_lengths_have_distinct_names():
    model = tiny_model(seed=9)
    gen = Generator(model, max_seq_len=100)
    assert (gen.context_len, gen.max_model_len, gen.max_seq_len) == (model.args.max_seq_len, 100, 100)
    model.setup_caches(1, 32)
    assert gen.cache_len == model.cache_len == model.max_seq_len == 32
    opts = RuntimeOptions(max_model_len=64, warm_cache_tokens=48)
    gen = Generator(model, options=opts)
    assert gen.max_model_len == 64 and gen.warm_cache_len == 48 and not gen.compiled
    assert Generator(model, options=opts, max_seq_len=80).max_model_len == 80  # the keyword wins


def test_default_max_tokens_stays_in_the_warm_cache():
    model = tiny_model(seed=9)
    gen = Generator(model, options=RuntimeOptions(warm_cache_tokens=64))
    model.setup_caches(1, 32)
    assert gen.default_max_tokens(10) == 54  # fills the warm cache size, not the whole context
    model.setup_caches(1, 128)
    assert gen.default_max_tokens(10) == 118  # or the cache as allocated, when larger
    assert gen.default_max_tokens(200) == model.args.max_seq_len - 200  # past it: the rest of the context


def test_request_errors_name_no_api_field():
    gen = Generator(tiny_model(seed=6), max_seq_len=32)
    for prompt, n in (([], 5), ([1], 0), (list(range(30)), 5)):
        with pytest.raises(InvalidRequestError) as e:
            gen.check_request(len(prompt), n)
        assert e.value.param is None


def test_warmup_covers_every_sampler_mode_and_prefill_bucket():
    """What a compiled warm-up runs is a superset of what any request within default_max_tokens
    runs: the same sampler modes, prefill buckets and cache size (recorded, not compiled, here)."""
    model = tiny_model(seed=10)
    model.setup_caches(1, 16)
    gen = Generator(model, options=RuntimeOptions(warm_cache_tokens=256, compile_prefill=True))
    gen.compiled = gen.prefill_compiled = True  # the compiled policy (geometric cache, power-of-two buckets)
    seen: set = set()

    def record(kind, fn):
        def wrapped(model, *args):  # step: (tok, pos); prefill: (ids, pos, last)
            seen.add((kind, model.cache_len, args[0].shape[1]))
            return fn(model, *args)
        return wrapped

    gen._step = record("step", gen._step)
    gen._prefill = record("prefill", gen._prefill)
    sample = gen._sample
    gen._sample = lambda logits, samp, mode, noise: (seen.add(("sample", mode)), sample(logits, samp, mode, noise))[1]
    gen.warmup()
    assert model.cache_len == 256 and gen.prefill_buckets() == [16, 32, 64, 128, 256]
    warmed = set(seen)
    assert {k[1] for k in warmed if k[0] == "sample"} == {sp.mode for sp in sampler_modes()}
    assert len(sampler_modes()) == 5
    seen.clear()
    for n in (1, 16, 17, 64, 65, 200, 255):
        for sp in (GREEDY, SamplingParams(temperature=0.7, top_k=5, min_p=0.1, seed=1),
                   SamplingParams(temperature=0.7, top_p=0.5, seed=2)):
            assert n + gen.default_max_tokens(n) <= model.cache_len  # such requests never grow the cache
            list(gen.generate_ids(list(range(1, n + 1)), min(3, gen.default_max_tokens(n)), sp, stop_token_ids=()))
    assert seen <= warmed, seen - warmed


def test_multi_token_input_at_any_position_equals_full_forward():
    """model(idx, input_pos) with several tokens after a prefix (a speculative verify step)."""
    model = tiny_model(seed=11)
    seq = torch.randint(0, model.args.vocab_size, (1, 20))
    with torch.no_grad():
        full = model(seq, torch.arange(20))
        model(seq[:, :9], torch.arange(9))
        part = model(seq[:, 9:14], torch.arange(9, 14))
    torch.testing.assert_close(part, full[:, 9:14], atol=1e-5, rtol=1e-5)


def test_eager_prompts_are_bucketed():
    """Eager prefill pads prompts to a few shapes per octave (each new shape costs memory in the
    CPU libraries' primitive caches); the tokens are those of an unpadded full forward."""
    assert [prefill_bucket(n, 4) for n in (1, 16, 17, 20, 21, 33, 100, 1000)] == [16, 16, 20, 20, 24, 40, 112, 1024]
    assert [prefill_bucket(n) for n in (1, 17, 100, 1000)] == [16, 32, 128, 1024]
    model = tiny_model(seed=12)
    gen = Generator(model)
    lengths = []
    prefill = gen._prefill
    gen._prefill = lambda m, ids, *a: (lengths.append(ids.shape[1]), prefill(m, ids, *a))[1]
    prompt = list(range(5, 26))  # 21 tokens
    assert list(gen.generate_ids(prompt, 6, GREEDY, stop_token_ids=())) == full_forward_greedy(model, prompt, 6)
    assert lengths == [24]


@pytest.mark.slow
def test_stream_cut_inside_a_character_ends_clean(smol):
    """max_tokens that ends inside a multi-byte character: the text stops before it, no U+FFFD."""
    tok = smol.tokenizer
    gen = Generator(smol.model, tok)
    ids = tok.encode_chat([{"role": "user", "content": "Answer only with emoji and Japanese: 🎉🍣 こんにちは、東京!"}])
    out = list(gen.generate_ids(ids, 48, GREEDY))
    cuts = [k for k in range(1, len(out) + 1) if tok.decode(out[:k], skip_special_tokens=True).endswith("\ufffd")]
    if not cuts:
        pytest.skip("the model's answer split no character across tokens")
    k = cuts[0]
    done = gen.complete(ids, k, GREEDY)
    assert done.finish_reason == "length" and "\ufffd" not in done.text
    assert done.text == tok.decode(out[:k], skip_special_tokens=True).rstrip("\ufffd")
