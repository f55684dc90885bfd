"""The official ``openai`` client against the live server (real SmolLM2 on CPU): a drop-in check."""

from __future__ import annotations

import openai
import pytest

from conftest import MAX_MODEL_LEN

pytestmark = pytest.mark.slow

HI = [{"role": "user", "content": "Hi"}]
GREEDY = {"temperature": 0, "max_tokens": 4}


def test_health_said_503_while_loading_then_200(server):
    assert server.health_codes[-1] == 200
    assert 503 in server.health_codes  # it answered while the model was still loading


def test_models(server):
    models = server.openai().models.list().data
    assert len(models) == 1 and models[0].id == "SmolLM2-135M-Instruct.Q4_1"
    assert models[0].model_extra["max_model_len"] == MAX_MODEL_LEN


def test_chat_streamed_and_not_agree_and_usage_is_exact(server, smol_tok):
    client = server.openai()
    whole = client.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", messages=HI, **GREEDY)
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens == len(smol_tok.encode_chat(HI))
    assert whole.usage.completion_tokens <= 4
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    # the same request streamed (content given as text parts) gives the same text and usage
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    chunks = list(client.chat.completions.create(messages=parts, stream=True, model="",
                                                 stream_options={"include_usage": True}, **GREEDY))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_streamed_and_not(server, smol_tok):
    client = server.openai()
    prompt = "The capital of France is"
    whole = client.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt=prompt, temperature=0, max_tokens=4)
    assert whole.usage.prompt_tokens == len(smol_tok.encode(prompt)) and whole.usage.completion_tokens == 4
    assert whole.choices[0].finish_reason == "length"
    streamed = client.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt=prompt, temperature=0,
                                         max_tokens=4, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text


def test_stop_string(server):
    client = server.openai()
    full = client.chat.completions.create(messages=HI, model="", **GREEDY).choices[0].message.content
    cut = full.index(" ", 1) if " " in full[1:] else len(full) - 1
    stop = full[cut:cut + 2]
    r = client.chat.completions.create(messages=HI, model="", stop=[stop, "@@@"], **GREEDY)
    assert r.choices[0].message.content == full[:cut]
    assert r.choices[0].finish_reason == "stop"


def test_n_choices_and_seeded_sampling_reproduces(server):
    client = server.openai()
    args = dict(messages=HI, model="", temperature=0.8, max_tokens=4, seed=1234)
    first = client.chat.completions.create(n=2, **args)
    assert [c.index for c in first.choices] == [0, 1]
    assert first.usage.completion_tokens <= 8
    again = client.chat.completions.create(**args)  # n=1: the same seed as choice 0
    assert again.choices[0].message.content == first.choices[0].message.content


def test_errors_map_to_the_client_exception_classes(server):
    client = server.openai()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(messages=HI, model="", temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="", prompt="hello " * (MAX_MODEL_LEN + 10), max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(messages=HI, model="gpt-4o")
    with pytest.raises(openai.AuthenticationError):
        server.openai(api_key="sk-wrong").models.list()
    # unknown fields are tolerated, and the server is fine after all that
    ok = client.chat.completions.create(messages=HI, model="", temperature=0, max_tokens=1,
                                        extra_body={"repetition_penalty": 1.0, "foo": "bar"})
    assert ok.usage.completion_tokens == 1


def test_server_generates_what_the_in_process_generator_does(server, smol):
    """The server path (queue, engine thread, detokenizing, SSE) against the plain Generator on the
    same float32 weights: the same greedy text."""
    from blitzgen.generate import Generator
    from blitzgen.sampling import SamplingParams

    prompt = "The capital of France is"
    want = Generator(smol.model, smol.tokenizer).complete(smol.tokenizer.encode(prompt), 8,
                                                           SamplingParams(temperature=0.0)).text
    got = server.openai().completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt=prompt, temperature=0,
                                             max_tokens=8)
    assert got.choices[0].text == want
