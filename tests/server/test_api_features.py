"""Tool calls, logprobs, structured output and usage details through the app, with the official client.

Fast tests serve a tiny model in-process (a scripted generator or a tiny random Transformer, with a
byte-level tokenizer whose chat template supports tools); the slow ones use the shared live server.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import openai
import pytest
from fake_model import FakeGenerator
from starlette.testclient import TestClient

from blitzgen.generate import Delta, GenerationStats
from blitzgen.server.app import create_app
from blitzgen.server.engine import Engine
from tests.test_tool_calls import PLAIN, QWEN, TIME, WEATHER, byte_tokenizer

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>'
ASK = [{"role": "user", "content": "Weather in Paris?"}]


class ScriptedGen(FakeGenerator):
    """Writes `script` three characters per delta, then stops (finish_reason "stop")."""

    def __init__(self, script: str, cached_tokens: int = 0):
        super().__init__(max_seq_len=4096)
        self.script = script
        self.cached_tokens = cached_tokens
        self.prompts: list[list[int]] = []

    def stream(self, prompt_ids, max_new_tokens, sampling=None, stop=()):
        self.prompts.append(list(prompt_ids))
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        stats.cached_tokens = self.cached_tokens
        t0 = time.perf_counter()
        pieces = [self.script[i:i + 3] for i in range(0, len(self.script), 3)]
        for i, p in enumerate(pieces):
            stats.generated_tokens = i + 1
            stats.total_seconds = stats.decode_seconds = time.perf_counter() - t0
            yield Delta(p, [i])
        yield Delta("", [], "stop", stats)


def client_for(gen, tokenizer, name: str = "tiny") -> openai.OpenAI:
    lm = SimpleNamespace(name=name, tokenizer=tokenizer, args=SimpleNamespace(vocab_size=tokenizer.vocab_size))
    engine = Engine(lambda: (lm, gen), warmup=False)
    http = TestClient(create_app(engine))
    http.__enter__()
    deadline = time.monotonic() + 30
    while http.get("/health").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)
    client.http = http  # the app itself, for /metrics
    return client


# ---- tool calls -----------------------------------------------------------------------------------------
def test_auto_tool_call_is_parsed_whole():
    gen = ScriptedGen("Let me check.\n" + CALL)
    client = client_for(gen, byte_tokenizer(QWEN))
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, TIME])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "C"}
    prompt = byte_tokenizer(QWEN).decode(gen.prompts[-1])
    assert "# Tools" in prompt and '"get_weather"' in prompt  # the tools went through the template


def test_auto_tool_call_is_streamed_as_tool_call_deltas():
    gen = ScriptedGen("Let me check.\n" + CALL)
    client = client_for(gen, byte_tokenizer(QWEN))
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert content.strip() == "Let me check."
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "unit": "C"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_plain_answer_with_tools_stays_content():
    client = client_for(ScriptedGen("It is sunny."), byte_tokenizer(QWEN))
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER])
    assert r.choices[0].message.content == "It is sunny." and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"


def test_tool_choice_none_leaves_tools_out_and_does_not_parse():
    gen = ScriptedGen(CALL)
    client = client_for(gen, byte_tokenizer(QWEN))
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], tool_choice="none")
    assert r.choices[0].message.content == CALL and r.choices[0].finish_reason == "stop"
    assert "# Tools" not in byte_tokenizer(QWEN).decode(gen.prompts[-1])


def test_tool_results_feed_back_through_the_template():
    gen = ScriptedGen("It is 21 C in Paris.")
    client = client_for(gen, byte_tokenizer(QWEN))
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21"}]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER])
    assert r.choices[0].message.content == "It is 21 C in Paris."
    prompt = byte_tokenizer(QWEN).decode(gen.prompts[-1])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>' in prompt
    assert "<tool_response>\n21\n</tool_response>" in prompt


def test_template_without_tools_is_400_naming_tools():
    client = client_for(ScriptedGen("x"), byte_tokenizer(PLAIN))
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER])
    assert e.value.body["param"] == "tools" and "does not support tools" in e.value.body["message"]


@pytest.mark.parametrize("kw, param", [
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "sometimes", "tools": [WEATHER]}, "tool_choice"),
])
def test_bad_tools_are_400(kw, param):
    client = client_for(ScriptedGen("x"), byte_tokenizer(QWEN))
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=ASK, **kw)
    assert e.value.body["param"] == param


@pytest.mark.slow
def test_default_model_template_lacks_tools_400(server):
    with pytest.raises(openai.BadRequestError) as e:
        server.openai().chat.completions.create(model="", messages=ASK, tools=[WEATHER], max_tokens=2)
    assert e.value.body["param"] == "tools"


# ---- logprobs (a tiny random model through the app) ------------------------------------------------------
def tiny_client(seed: int = 5):
    import torch  # noqa: F401

    from blitzgen.generate import Generator
    from tests.conftest import tiny_model

    tok = byte_tokenizer(QWEN)
    model = tiny_model(seed=seed, max_seq_len=1024, vocab_size=tok.vocab_size)
    return client_for(Generator(model, tok), tok), tok, tiny_model(seed=seed, max_seq_len=1024,
                                                                  vocab_size=tok.vocab_size)


def reference_logprobs(model, ids: list[int], out: list[int]):
    """float64 log-softmax of the plain model's logits (full forward each step, no cache reuse)."""
    import torch

    rows = []
    with torch.inference_mode():
        for i in range(len(out)):
            seq = ids + out[:i]
            logits = model(torch.tensor([seq]), torch.arange(len(seq)))[0, -1]
            rows.append(torch.log_softmax(logits.double(), -1))
    return rows


def test_chat_logprobs_match_a_float64_log_softmax():
    from blitzgen.logprobs import TokenText

    client, tok, ref_model = tiny_client()
    msgs = [{"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert 0 < len(content) <= 6
    ids, chosen, text = tok.encode_chat(msgs), [], TokenText(tok)
    for c in content:  # greedy: the chosen token is the reference's argmax
        row = reference_logprobs(ref_model, ids + chosen, [0])[0]
        top = row.topk(3)
        best = int(top.indices[0])
        chosen.append(best)
        assert abs(c.logprob - float(row[best])) < 1e-4 and bytes(c.bytes) == text.bytes(best)
        assert [t.token for t in c.top_logprobs] == [text.text(int(i)) for i in top.indices]
        assert all(abs(t.logprob - float(v)) < 1e-4 for t, v in zip(c.top_logprobs, top.values))
    assert r.choices[0].message.content == tok.decode(chosen, skip_special_tokens=True)


def test_greedy_text_is_the_same_with_and_without_logprobs_streamed_or_not():
    client, tok, _ = tiny_client(seed=7)
    kw = {"model": "tiny", "prompt": "Hello there", "max_tokens": 12, "temperature": 0}
    plain = client.completions.create(**kw)
    with_lp = client.completions.create(**kw, logprobs=2)
    assert with_lp.choices[0].text == plain.choices[0].text
    lp = with_lp.choices[0].logprobs
    n = with_lp.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert n - 1 <= len(lp.tokens) <= n  # a stop token is not listed
    assert all(len(t) <= 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0
    chunks = list(client.completions.create(**kw, logprobs=2, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs]
    assert streamed == lp.token_logprobs

    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0}
    a = client.chat.completions.create(**chat)
    b = client.chat.completions.create(**chat, logprobs=True)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert b.choices[0].logprobs.content and b.choices[0].logprobs.content[0].top_logprobs == []
    chunks = list(client.chat.completions.create(**chat, logprobs=True, top_logprobs=2, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == a.choices[0].message.content
    steps = [s.logprob for c in chunks if c.choices and c.choices[0].logprobs for s in c.choices[0].logprobs.content]
    assert steps == [s.logprob for s in b.choices[0].logprobs.content]


def test_seeded_sampling_is_the_same_with_and_without_logprobs():
    client, _, _ = tiny_client(seed=9)
    kw = {"model": "tiny", "prompt": "Hello", "max_tokens": 10, "temperature": 1.0, "seed": 123}
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw, logprobs=0).choices[0].text


@pytest.mark.parametrize("kw, param", [
    ({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": "yes"}, "logprobs"),
])
def test_bad_chat_logprobs_are_400(kw, param):
    client = client_for(ScriptedGen("x"), byte_tokenizer(QWEN))
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=ASK, **kw)
    assert e.value.body["param"] == param


def test_bad_completion_logprobs_are_400():
    client = client_for(ScriptedGen("x"), byte_tokenizer(QWEN))
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", logprobs=6)
    assert e.value.body["param"] == "logprobs"


# ---- structured output and forced tool calls -------------------------------------------------------------
SCHEMA = {"type": "object", "properties": {
    "kind": {"type": "string", "enum": ["cat", "dog"]},
    "ok": {"type": "boolean"},
    "owner": {"type": "object", "properties": {"role": {"type": "string", "enum": ["admin", "guest"]}},
              "required": ["role"], "additionalProperties": False},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 3}},
    "required": ["kind", "ok", "owner", "tags"], "additionalProperties": False}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output_validates_on_a_random_model(stream):
    pytest.importorskip("xgrammar")
    jsonschema = pytest.importorskip("jsonschema")
    client, _, _ = tiny_client(seed=13)
    kw = {"model": "tiny", "messages": ASK, "max_tokens": 150, "temperature": 1.0, "response_format": JSON_SCHEMA,
          "n": 2, "seed": 1}
    if stream:
        chunks = list(client.chat.completions.create(**kw, stream=True))
        texts = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
                 for i in range(2)]
    else:
        texts = [c.message.content for c in client.chat.completions.create(**kw).choices]
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_on_completions():
    pytest.importorskip("xgrammar")
    client, _, _ = tiny_client(seed=17)
    r = client.completions.create(model="tiny", prompt="JSON:", max_tokens=200, temperature=0,
                                  extra_body={"response_format": {"type": "json_object"}})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].text), dict)
    else:  # a random model may write a long string: what it wrote is still a JSON prefix
        assert r.choices[0].text.startswith("{")


@pytest.mark.parametrize("schema, words", [({"type": "banana"}, "banana"), ({"$ref": "#/definitions/nope"}, "nope")])
def test_a_rejected_schema_is_400_with_the_library_message(schema, words):
    pytest.importorskip("xgrammar")
    client, _, _ = tiny_client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=ASK, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert e.value.body["param"] == "response_format" and words in e.value.body["message"]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_calls_are_valid_calls(choice, stream):
    pytest.importorskip("xgrammar")
    jsonschema = pytest.importorskip("jsonschema")
    client, _, _ = tiny_client(seed=3)
    kw = {"model": "tiny", "messages": ASK, "tools": [WEATHER, TIME], "tool_choice": choice, "max_tokens": 150,
          "temperature": 0.7, "seed": 5, "parallel_tool_calls": False}
    if stream:
        chunks = list(client.chat.completions.create(**kw, stream=True))
        calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
        finish = chunks[-1].choices[0].finish_reason
    else:
        r = client.chat.completions.create(**kw)
        calls, finish = r.choices[0].message.tool_calls, r.choices[0].finish_reason
        assert r.choices[0].message.content is None
    assert finish == "tool_calls" and len(calls) == 1
    fn = {"get_weather": WEATHER, "get_time": TIME}[calls[0].function.name]["function"]
    if isinstance(choice, dict):
        assert calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), fn["parameters"])


@pytest.mark.slow
def test_default_model_json_schema_objects_validate_at_temperature_1(server):
    jsonschema = pytest.importorskip("jsonschema")
    client = server.openai().with_options(timeout=1200)  # ~200 tokens: minutes on a loaded CPU
    r = client.chat.completions.create(
        model="", messages=[{"role": "user", "content": "Describe a pet as JSON."}], response_format=JSON_SCHEMA,
        temperature=1.0, seed=42, n=4, max_tokens=60)  # (n=10 took 40-127 s of CI; the library test samples 50)
    assert len(r.choices) == 4
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), SCHEMA)


@pytest.mark.slow
def test_default_model_logprobs_and_greedy_text_unchanged(server):
    client = server.openai()
    kw = {"model": "", "messages": ASK, "max_tokens": 12, "temperature": 0}
    plain = client.chat.completions.create(**kw)
    with_lp = client.chat.completions.create(**kw, logprobs=True, top_logprobs=5)
    assert with_lp.choices[0].message.content == plain.choices[0].message.content
    content = with_lp.choices[0].logprobs.content
    assert content and all(len(c.top_logprobs) == 5 and c.logprob <= 0 for c in content)
    assert "".join(c.token for c in content).startswith(plain.choices[0].message.content[:5])


# ---- usage details ---------------------------------------------------------------------------------------
def test_cached_tokens_in_usage_and_the_hit_rate_in_metrics():
    client = client_for(ScriptedGen("Hello.", cached_tokens=5), byte_tokenizer(QWEN))
    r = client.chat.completions.create(model="tiny", messages=ASK)
    assert r.usage.prompt_tokens_details.cached_tokens == 5
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens_details.cached_tokens == 5
    assert chunks[-1].usage.completion_tokens == 2
    text = client.http.get("/metrics").text
    assert "blitzgen_prompt_cache_queries_total 2.0" in text and "blitzgen_prompt_cache_hits_total 2.0" in text
    assert "blitzgen_prompt_cache_hit_tokens_total 10.0" in text
    miss = client_for(ScriptedGen("Hello."), byte_tokenizer(QWEN))
    assert miss.chat.completions.create(model="tiny", messages=ASK).usage.prompt_tokens_details.cached_tokens == 0
    text = miss.http.get("/metrics").text
    assert "blitzgen_prompt_cache_queries_total 1.0" in text and "blitzgen_prompt_cache_hits_total 0.0" in text
