"""Prompt caching: a request prefills only what the live KV cache or a saved prefix (PrefixStore)
does not hold yet, and its greedy tokens equal those of a Generator that never reuses anything."""

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


def test_cache_growth_keeps_the_prefix_through_the_store():
    model = tiny_model(seed=21)
    model.setup_caches(1, 32)
    gen = Generator(model)
    prompt = SYSTEM + [33] * 10
    out, _ = run(gen, prompt, 4)
    longer = prompt + out + [34] * 30
    got, cached = run(gen, longer, 4)  # the cache grows (reallocated): its prefix is saved, then copied back
    assert cached == len(prompt) + 3 and got == fresh(longer, 4)
    assert gen.prefixes.restores == 1


def test_cache_growth_without_the_store_forgets_the_prefix():
    model = tiny_model(seed=21)
    model.setup_caches(1, 32)
    gen = Generator(model, prompt_cache_entries=0)
    prompt = SYSTEM + [33] * 10
    run(gen, prompt, 4)
    longer = prompt + [34] * 30
    out, cached = run(gen, longer, 4)
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


# ---- saved prefixes (prefix_cache.PrefixStore) ----------------------------------------------------
def chat(first: int, n: int = 40) -> list[int]:
    """A conversation's prompt: its own first token, then n tokens."""
    return [first] + [(first * 7 + i) % 500 + 1 for i in range(n)]


def test_a_then_b_then_a_again_restores_a():
    gen = Generator(tiny_model(seed=21))
    a, b = SYSTEM + chat(100), SYSTEM + chat(200)
    out_a, _ = run(gen, a)
    out_b, cached_b = run(gen, b)
    assert cached_b == len(SYSTEM)  # the shared system prompt, from the live cache
    assert len(gen.prefixes.entries) == 1  # a's prefix was saved before b overwrote it
    a2 = a + out_a + [300, 301]
    out_a2, cached = run(gen, a2)
    assert cached == len(a) + len(out_a) - 1 and gen.prefixes.restores == 1
    assert out_a2 == fresh(a2)
    b2 = b + out_b + [302]
    out_b2, cached = run(gen, b2)  # b was saved when a came back
    assert cached == len(b) + len(out_b) - 1 and out_b2 == fresh(b2)
    # without the store only the shared system prompt is reused
    off = Generator(tiny_model(seed=21), prompt_cache_entries=0)
    for p in (a, b):
        run(off, p)
    assert run(off, a2)[1] == len(SYSTEM) and not off.prefixes.entries


def test_eviction_is_least_recently_used():
    gen = Generator(tiny_model(seed=21), prompt_cache_entries=2)
    a, b, c, d = (chat(k) for k in (1, 2, 3, 4))
    for p in (a, b, c):
        run(gen, p)
    firsts = lambda: [e.ids[0] for e in gen.prefixes.entries.values()]  # noqa: E731
    assert firsts() == [1, 2]  # c is live, not saved yet
    assert run(gen, a)[1] == len(a) - 1  # a restored: now the most recent (c saved, b the oldest)
    assert firsts() == [2, 3, 1][-2:] == [3, 1] and gen.prefixes.evictions == 1
    run(gen, d)  # saves a's extended prefix, which supersedes a's entry; then evicts c
    assert firsts() == [3, 1] and gen.prefixes.evictions == 1
    run(gen, b)  # b was evicted: a miss; d saved, c evicted
    assert firsts() == [1, 4] and gen.prefixes.evictions == 2
    # the byte budget evicts too: room for one 51-token entry of 512 bytes per token only
    one = Generator(tiny_model(seed=21), prompt_cache_bytes=60 * 512)
    for p in (a, b, c):
        run(one, p)
    assert [e.ids[0] for e in one.prefixes.entries.values()] == [2] and one.prefixes.nbytes <= 60 * 512
    one.configure_prompt_cache(8, 0)
    assert not one.prefixes.entries


def test_changed_system_prompt_misses_the_store():
    gen = Generator(tiny_model(seed=21))
    a = SYSTEM + chat(5)
    run(gen, a)
    run(gen, chat(6))  # a saved
    changed = [99] + a[1:]
    out, cached = run(gen, changed)
    assert cached == 0 and gen.prefixes.restores == 0 and out == fresh(changed)


def test_a_saved_prefix_restores_only_when_it_gains_enough():
    from blitzgen.prefix_cache import MIN_GAIN

    gen = Generator(tiny_model(seed=21))
    long_a = SYSTEM + chat(7, 60)
    run(gen, long_a)
    near = long_a[:len(SYSTEM) + MIN_GAIN - 2] + chat(8)  # shares few tokens beyond the system prompt
    run(gen, near)  # long_a saved; near is live and shares its first len(SYSTEM) + 14 tokens
    probe = long_a[:len(SYSTEM) + MIN_GAIN + 5] + [401, 402]
    assert gen.reuse_prefix(probe) == len(SYSTEM) + MIN_GAIN - 2  # the saved one gains 7 < MIN_GAIN: live
    probe = long_a[:len(SYSTEM) + 2 * MIN_GAIN] + [401, 402]
    assert gen.reuse_prefix(probe) == len(SYSTEM) + 2 * MIN_GAIN and gen.prefixes.restores == 1
    assert run(gen, probe)[0] == fresh(probe)


def test_prefix_of_a_saved_one_and_extensions_are_not_duplicated():
    gen = Generator(tiny_model(seed=21))
    a = chat(9, 60)
    out, _ = run(gen, a)
    run(gen, chat(10))  # a + out[:-1] saved
    run(gen, a[:30] + [7, 7])  # restores a's first 30 tokens; the live chat(10) is saved
    assert len(gen.prefixes.entries) == 2
    run(gen, chat(11))  # the live a[:30] + 7 tokens: only 7 beyond a's entry, not saved
    assert len(gen.prefixes.entries) == 2
    a2 = a + out + [5] * 20
    run(gen, a2)  # restores a; chat(11) saved
    run(gen, chat(12))  # a2's live prefix extends a's entry: it replaces it
    ids = [e.ids for e in gen.prefixes.entries.values()]
    assert sum(1 for e in ids if e[:len(a)] == a) == 1


def test_failure_mid_prefill_keeps_the_store_consistent():
    """A request cancelled inside prefill (after one layer wrote its KV, after the live prefix was
    saved) leaves no live claim; the saved prefix is a copy and restores exactly."""
    gen = Generator(tiny_model(seed=21))
    a = SYSTEM + chat(13)
    out, _ = run(gen, a)
    layer = gen.model.layers[1]

    def boom(*args, **kw):
        raise KeyboardInterrupt("cancelled")

    layer.forward, original = boom, layer.forward
    with pytest.raises(KeyboardInterrupt):
        run(gen, SYSTEM + chat(14))  # a's prefix saved, then the prefill dies
    layer.forward = original
    assert gen.prefixes.live == [] and len(gen.prefixes.entries) == 1
    a2 = a + out + [15]
    got, cached = run(gen, a2)
    assert cached == len(a) + len(out) - 1 and got == fresh(a2)


def test_failure_mid_restore_or_save_leaves_no_wrong_claim(monkeypatch):
    from blitzgen import prefix_cache

    gen = Generator(tiny_model(seed=21))
    a = SYSTEM + chat(16)
    run(gen, a)
    run(gen, SYSTEM + chat(17))  # a saved
    real_restore = prefix_cache.PrefixStore.restore

    def half_restore(self, entry, n, caches, start=0):
        caches[0].k_cache[:, :, start:n].copy_(entry.kv[0][0][:, :, start:n])
        self.live = []
        raise RuntimeError("device error")

    monkeypatch.setattr(prefix_cache.PrefixStore, "restore", half_restore)
    with pytest.raises(RuntimeError):
        run(gen, a + [18])
    assert gen.prefixes.live == []
    monkeypatch.setattr(prefix_cache.PrefixStore, "restore", real_restore)
    assert run(gen, a + [18]) == (fresh(a + [18]), len(a))  # a's entry is intact
    # out of memory while saving: nothing saved, the request still runs
    monkeypatch.setattr(torch.Tensor, "clone", lambda self: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
    before = len(gen.prefixes.entries)
    out, cached = run(gen, SYSTEM + chat(19))
    monkeypatch.undo()
    assert len(gen.prefixes.entries) == before and cached == len(SYSTEM)
    assert out == fresh(SYSTEM + chat(19))


def test_constrained_loop_keeps_the_live_prefix():
    """Grammar/logprobs decoding (constrained.token_loop) extends the live prefix as plain decoding does."""
    from blitzgen.constrained import token_loop

    gen = Generator(tiny_model(seed=21))
    prompt = SYSTEM + chat(20)
    stats = GenerationStats()
    out = list(token_loop(gen, prompt, 5, GREEDY, set(), stats, top_logprobs=2, rows=[]))
    assert out == fresh(prompt, 5)
    nxt = prompt + out + [21]
    assert gen.reuse_prefix(nxt) == len(prompt) + len(out) - 1
    assert run(gen, nxt)[0] == fresh(nxt)


def test_stash_prefix_saves_before_another_decoder_writes():
    gen = Generator(tiny_model(seed=21))
    a = chat(22)
    out, _ = run(gen, a)
    gen.stash_prefix()
    assert gen.prefixes.live == [] and gen.prefixes.entries
    gen.model.layers[0].attention.kv_cache.k_cache.normal_()  # another decoder writes the cache
    gen.model.layers[1].attention.kv_cache.v_cache.normal_()
    nxt = a + out + [23]
    got, cached = run(gen, nxt)
    assert cached == len(a) + len(out) - 1 and got == fresh(nxt)


def test_quantized_model_restores_exactly():
    from blitzgen.quant import make_config, quantize_model

    def model():
        m = tiny_model(seed=21)
        quantize_model(m, make_config("int8"))
        return m

    gen = Generator(model())
    a, b = SYSTEM + chat(24), SYSTEM + chat(25)
    out_a, _ = run(gen, a)
    run(gen, b)
    a2 = a + out_a + [26]
    got, cached = run(gen, a2)
    assert cached == len(a) + len(out_a) - 1
    assert got == run(Generator(model()), a2)[0]


def test_store_units():
    from blitzgen.prefix_cache import PrefixStore, common_prefix, parse_bytes

    assert common_prefix([1, 2, 3, 4], (1, 2, 9)) == 2 and common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix(list(range(999)), list(range(500)) + [0], 300) == 300
    assert parse_bytes("512MiB") == 512 << 20 and parse_bytes("2G") == 2 << 30 and parse_bytes("0") == 0
    for bad in ("-1", "lots", "1 X"):
        with pytest.raises(ValueError):
            parse_bytes(bad)
    with pytest.raises(ValueError):
        PrefixStore(-1, 10)
    assert not PrefixStore(0, 10).enabled and not PrefixStore(4, 0).enabled


@pytest.mark.slow
def test_compiled_decode_restores_in_place():
    """Compiled decode (on CPU: inductor graphs over the cache buffers): restores copy into the same
    cache tensors, and the tokens equal the eager oracle's."""
    gen = Generator(tiny_model(seed=21), compile=True, max_seq_len=256)
    gen.ensure_capacity(256)
    ptrs = [layer.attention.kv_cache.k_cache.data_ptr() for layer in gen.model.layers]
    a, b = SYSTEM + chat(27), SYSTEM + chat(28)
    out_a, _ = run(gen, a)
    run(gen, b)
    a2 = a + out_a + [29]
    got, cached = run(gen, a2)
    assert cached == len(a) + len(out_a) - 1 and got == fresh(a2)
    assert [layer.attention.kv_cache.k_cache.data_ptr() for layer in gen.model.layers] == ptrs


@pytest.mark.slow
def test_real_model_prefix_inside_a_word_and_a_chat_history(smol):
    """SmolLM2 (float32): a saved prompt that ends inside a multi-token word, then the whole word;
    a chat's next turn; each with the same greedy tokens as a fresh Generator."""
    tok = smol.tokenizer
    gen = Generator(smol.model, tok)
    system = "You are a helpful assistant who answers in one short sentence. " * 3
    word = tok.encode(system + "Describe the word antidisestablishmentarianism")
    cut = tok.encode(system + "Describe the word antidisestablishmentar")  # ...|ment|ar vs ...|ment|arianism
    assert word[:len(cut) - 1] == cut[:-1] and word[len(cut) - 1] != cut[-1]
    run(gen, cut, 4)
    run(gen, tok.encode("Something else entirely, long enough to be saved as its own prefix. " * 2), 4)
    got, cached = run(gen, word, 4)
    assert cached == len(cut) - 1 and gen.prefixes.restores == 1
    gen2 = Generator(smol.model, tok, prompt_cache_entries=0)
    gen2.forget_prefix()
    assert got == run(gen2, word, 4)[0]
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Name a colour."}]
    ids = tok.encode_chat(msgs)
    out, _ = run(gen, ids, 8)
    msgs += [{"role": "assistant", "content": tok.decode(out)}, {"role": "user", "content": "Another one?"}]
    ids2 = tok.encode_chat(msgs)
    got, cached = run(gen, ids2, 8)
    assert cached >= len(ids) and got == run(Generator(smol.model, tok), ids2, 8)[0]
