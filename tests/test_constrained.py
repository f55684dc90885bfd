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
