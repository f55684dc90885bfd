"""Generation: KV-cache decode vs full forward, compiled vs eager, streaming, stops, limits."""

from __future__ import annotations

import pytest
import torch

from blitzgen.errors import ContextLengthError, InvalidRequestError
from blitzgen.generate import GenerationStats, Generator, weight_bytes
from blitzgen.sampling import SamplingParams

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
