"""constrained.py's token loop against the Generator's own decoding (same model, same sampler)."""

import pytest
import torch

from blitzgen import constrained
from blitzgen.generate import Generator
from blitzgen.sampling import SamplingParams
from tests.conftest import tiny_model
from tests.test_tool_calls import QWEN, byte_tokenizer


@pytest.mark.parametrize("sampling", [SamplingParams(temperature=0.0),
                                      SamplingParams(temperature=1.0, top_p=0.9, seed=11),
                                      SamplingParams(temperature=0.8, top_k=20, min_p=0.05, seed=3)])
def test_same_tokens_and_text_as_plain_decoding(sampling):
    tok = byte_tokenizer(QWEN)
    gen = Generator(tiny_model(seed=2, max_seq_len=256, vocab_size=tok.vocab_size), tok)
    prompt = tok.encode("Once upon a time")
    plain = list(gen.stream(prompt, 20, sampling, stop=["zz"]))
    mine = list(constrained.stream(gen, prompt, 20, sampling, stop=["zz"], top_logprobs=4))
    assert [d.text for d in mine] == [d.text for d in plain]
    assert [d.token_ids for d in mine] == [d.token_ids for d in plain]
    assert mine[-1].finish_reason == plain[-1].finish_reason
    assert mine[-1].stats.generated_tokens == plain[-1].stats.generated_tokens
    steps = [s for d in mine for s in d.logprobs]
    assert [s.token_id for s in steps] == [t for d in plain for t in d.token_ids]
    assert all(len(s.top) == 4 and s.top[0][1] >= s.logprob - 1e-6 for s in steps)


def test_logprobs_are_the_raw_distribution():
    tok = byte_tokenizer(QWEN)
    model = tiny_model(seed=4, max_seq_len=256, vocab_size=tok.vocab_size)
    gen = Generator(model, tok)
    prompt = tok.encode("abc")
    deltas = list(constrained.stream(gen, prompt, 3, SamplingParams(temperature=0.0), top_logprobs=2))
    first = [s for d in deltas for s in d.logprobs][0]
    ref = tiny_model(seed=4, max_seq_len=256, vocab_size=tok.vocab_size)
    with torch.inference_mode():
        lp = torch.log_softmax(ref(torch.tensor([prompt]), torch.arange(len(prompt)))[0, -1].double(), -1)
    assert first.token_id == int(lp.argmax()) and abs(first.logprob - float(lp.max())) < 1e-5


def test_keep_special_keeps_tool_markers_in_the_text():
    from blitzgen.generate import GenerationStats
    from blitzgen.server.protocol import parse_chat_request
    from blitzgen.server.responses import ChoiceShaper
    from tests.test_tool_calls import WEATHER

    tok = byte_tokenizer(QWEN)
    gen = Generator(tiny_model(seed=2, max_seq_len=64, vocab_size=tok.vocab_size), tok)
    ids = [256, *tok.encode("hi", add_special_tokens=False), 257]
    kept = gen.stream_tokens(iter(ids), GenerationStats(), (), {257}, skip_special_tokens=False)
    assert "".join(d.text for d in kept) == "<|im_start|>hi"
    dropped = gen.stream_tokens(iter(ids), GenerationStats(), (), {257})
    assert "".join(d.text for d in dropped) == "hi"
    req = parse_chat_request({"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER]})
    shaper = ChoiceShaper(req, tok)
    assert not shaper.keep_special(tok)  # Qwen's <tool_call> is an ordinary token
    shaper.fmt = "mistral"
    tok._tok.add_special_tokens(["[TOOL_CALLS]"])
    tok._special_ids = {*tok._special_ids, tok._tok.token_to_id("[TOOL_CALLS]")}
    assert shaper.keep_special(tok) and shaper.decoder(tok) is not None
