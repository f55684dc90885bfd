"""Logprobs: on-device rows against a float64 log-softmax, and OpenAI's chat and completions shapes."""

import pytest
import torch

from blitzgen.errors import InvalidRequestError
from blitzgen.logprobs import (
    MAX_TOP_LOGPROBS,
    CompletionLogprobs,
    TokenText,
    chat_content,
    logprob_rows,
    unpack,
    validate_top_logprobs,
)


@pytest.fixture(scope="module")
def tok():
    from blitzgen.loading import default_model_path
    from blitzgen.loading import gguf as gguf_src
    from blitzgen.tokenizer import Tokenizer

    return Tokenizer.from_gguf(gguf_src.open_reader(default_model_path()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_match_float64_log_softmax(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 49152, generator=g) * 4).to(dtype)
    token = torch.tensor([5, 49151, 123])
    rows = logprob_rows(logits, token, MAX_TOP_LOGPROBS)
    assert rows.shape == (3, 1 + 2 * MAX_TOP_LOGPROBS) and rows.dtype == torch.float32
    ref = torch.log_softmax(logits.double(), -1)
    for b in range(3):
        step = unpack(rows[b], int(token[b]), 5)
        assert step.logprob == pytest.approx(float(ref[b, token[b]]), abs=1e-4)
        want_lp = ref[b].topk(5).values
        for t, lp in step.top:  # bf16 logits tie: compare values, and each id with its own logprob
            assert lp == pytest.approx(float(ref[b, t]), abs=1e-4)
        assert [lp for _, lp in step.top] == pytest.approx(want_lp.tolist(), abs=1e-4)
    assert logprob_rows(logits, token, 0).shape == (3, 1)
    assert unpack(rows[0], 5, 0).top == []


def test_rows_compile_as_one_graph():
    fn = torch.compile(logprob_rows, fullgraph=True, dynamic=False)
    logits, token = torch.randn(1, 1000), torch.tensor([7])
    torch.testing.assert_close(fn(logits, token, 20), logprob_rows(logits, token, 20))


def test_validate_top_logprobs():
    assert validate_top_logprobs(None) == 0 and validate_top_logprobs(20) == 20
    for bad in (-1, 21, 2.5, True):
        with pytest.raises(InvalidRequestError):
            validate_top_logprobs(bad)
    with pytest.raises(InvalidRequestError, match="logprobs"):
        validate_top_logprobs(3, logprobs=False)


def test_token_bytes_and_text(tok):
    tt = TokenText(tok)
    ids = tok.encode("Hello wörld ✓", add_special_tokens=False)
    assert b"".join(tt.bytes(i) for i in ids) == "Hello wörld ✓".encode()
    assert tt.text(ids[1]).startswith(" ")  # a leading space belongs to the token
    for i in ids:  # a piece of a multi-byte character shows as \xNN, its bytes stay exact
        try:
            tt.bytes(i).decode()
        except UnicodeDecodeError:
            assert "\\x" in tt.text(i)
    assert tt.text(tok.eos_token_ids[0]) == "<|im_end|>"


def test_chat_shape(tok):
    tt = TokenText(tok)
    a, b = tok.encode(" yes no", add_special_tokens=False)
    [entry] = chat_content([unpack([-0.1, -0.1, -2.5, float(a), float(b)], a, 2)], tt)
    assert entry == {"token": " yes", "logprob": pytest.approx(-0.1), "bytes": list(b" yes"),
                     "top_logprobs": [{"token": " yes", "logprob": pytest.approx(-0.1), "bytes": list(b" yes")},
                                      {"token": " no", "logprob": pytest.approx(-2.5), "bytes": list(b" no")}]}


def test_completions_shape_streamed_equals_whole(tok):
    tt = TokenText(tok)
    text = "The café ✓ ok"
    ids = tok.encode(text, add_special_tokens=False)
    steps = [unpack([-1.0 - j, -1.0 - j, float(i)], i, 1) for j, i in enumerate(ids)]
    whole = CompletionLogprobs(tt, offset=4)
    for s in steps:
        whole.add(s)
    whole = whole.take()
    assert "".join(whole["tokens"]).replace("\\xe2\\x9c", "").startswith("The caf")
    assert whole["token_logprobs"] == [-1.0 - j for j in range(len(ids))]
    assert whole["top_logprobs"][0] == {whole["tokens"][0]: -1.0}
    # offsets index the decoded text (shifted by the prompt's 4 characters), also across a split character
    for k, i in enumerate(ids):
        prefix = tok.decode(ids[:k])
        if "\ufffd" not in prefix:
            assert whole["text_offset"][k] == 4 + len(prefix)
    streamed = CompletionLogprobs(tt, offset=4)
    chunks = []
    for s in steps:
        streamed.add(s)
        chunks.append(streamed.take())
    assert sum((c["tokens"] for c in chunks), []) == whole["tokens"]
    assert sum((c["text_offset"] for c in chunks), []) == whole["text_offset"]
