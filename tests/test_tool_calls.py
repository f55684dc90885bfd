"""Tool calls: rendering through the chat template, parsing each format (whole and streamed), forcing."""

import json

import pytest
import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer

from blitzgen.errors import InvalidRequestError
from blitzgen.tokenizer import Tokenizer, _bytes_to_unicode
from blitzgen.tool_calls import (
    ToolCallStreamParser,
    detect_format,
    forced_schema,
    parse_forced,
    parse_tool_calls,
    render_prompt,
    supports_tools,
    validate_tools,
)
from tests.conftest import tiny_model

# A trimmed Qwen2.5 chat template: tools in the system turn, <tool_call> blocks, <tool_response> results.
QWEN = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are helpful.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n<tools>' }}{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\nReturn <tool_call>\\n{\"name\": <name>, \"arguments\": <args>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}"
    "{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
PLAIN = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo"]},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string", "enum": ["UTC"]}},
                                       "required": ["tz"], "additionalProperties": False}}}


def byte_tokenizer(template: str) -> Tokenizer:
    """A byte-level tokenizer: 256 byte tokens, two special tokens, and Qwen's non-special tool tags."""
    rust = RustTokenizer(models.BPE({c: b for b, c in _bytes_to_unicode().items()}, []))
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    rust.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    rust.add_tokens([AddedToken("<tool_call>", special=False), AddedToken("</tool_call>", special=False)])
    return Tokenizer(rust, bos_token_id=None, eos_token_ids=[257], add_bos=False, chat_template=template,
                     special_ids={256, 257}, vocab_size=260)


def test_template_detection():
    assert supports_tools(QWEN) and not supports_tools(PLAIN) and not supports_tools(None)
    assert detect_format(QWEN) == "hermes"
    assert detect_format("{{ '<|python_tag|>' }}{% if tools %}{% endif %}") == "llama3"
    assert detect_format("[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS]") == "mistral"


def test_render_tools_and_results_through_the_template():
    tok = byte_tokenizer(QWEN)
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"C\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"}]
    text = tok.decode(render_prompt(tok, msgs, tools=[WEATHER]))
    assert json.dumps(WEATHER, ensure_ascii=False) in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>' in text
    assert text.endswith('<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>\n<|im_start|>assistant\n')
    # tool_choice "none" leaves the tools out
    assert "<tools>" not in tok.decode(render_prompt(tok, msgs[:1], tools=[WEATHER], tool_choice="none"))


def test_a_template_without_tools_is_a_clear_error():
    tok = byte_tokenizer(PLAIN)
    with pytest.raises(InvalidRequestError, match="does not support tools") as e:
        render_prompt(tok, [{"role": "user", "content": "hi"}], tools=[WEATHER])
    assert e.value.param == "tools"
    assert render_prompt(tok, [{"role": "user", "content": "hi"}])  # no tools: fine


def test_validate_tools():
    assert validate_tools([WEATHER], None)[1] == "auto" and validate_tools(None, None) == ([], "none")
    named = {"type": "function", "function": {"name": "get_time"}}
    assert validate_tools([WEATHER, TIME], named)[1] == named
    for tools, choice in [([{"type": "function"}], "auto"), ([WEATHER], "maybe"), ([], "required"),
                          ([WEATHER], {"type": "function", "function": {"name": "nope"}})]:
        with pytest.raises(InvalidRequestError):
            validate_tools(tools, choice)


def _fn(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


CASES = [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>', "Let me check."),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {"tz": "UTC"}}',
     None),
    ("llama3", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}'
               '{"name": "get_time", "parameters": {"tz": "UTC"}}', None),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                '{"name": "get_time", "arguments": {"tz": "UTC"}}]', None),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{"tz": "UTC"}', None),
]
WANT = [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "UTC"})]


@pytest.mark.parametrize("fmt,text,content", CASES)
def test_parse_each_format(fmt, text, content):
    got_content, calls = parse_tool_calls(text, fmt)
    assert got_content == content and _fn(calls) == WANT
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert len({c["id"] for c in calls}) == 2


@pytest.mark.parametrize("fmt", ["hermes", "llama3", "mistral"])
def test_plain_answers_and_broken_calls_stay_content(fmt):
    for text in ["The weather is nice.", "<tool_call>\n{\"name\": oops", "[TOOL_CALLS][{]", '{"a": 1}']:
        assert parse_tool_calls(text, fmt) == (text, [])


def _stream(fmt, text, step):
    p = ToolCallStreamParser(fmt)
    deltas = []
    for i in range(0, len(text), step):
        deltas += p.feed(text[i:i + step])
    return deltas + p.finish()


@pytest.mark.parametrize("step", [1, 3, 1000])
@pytest.mark.parametrize("fmt,text,content", CASES)
def test_streamed_deltas_match_the_whole_parse(fmt, text, content, step):
    deltas = _stream(fmt, text, step)
    streamed_content = "".join(d.get("content", "") for d in deltas)
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert [c["index"] for c in calls] == [0, 1]
    assert _fn(calls) == WANT
    assert streamed_content.strip() == (content or "")
    assert not any("<tool_call>" in d.get("content", "") or "[TOOL_CALLS]" in d.get("content", "") for d in deltas)


def test_streamed_plain_text_passes_through():
    text = "No tools needed: 2 < 3 and [x] is fine."
    for fmt in ("hermes", "llama3", "mistral"):
        deltas = _stream(fmt, text, 2)
        assert "".join(d["content"] for d in deltas) == text and all("tool_calls" not in d for d in deltas)


def test_hermes_stream_sends_each_call_when_it_closes():
    p = ToolCallStreamParser("hermes")
    assert p.feed("<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"tz\": \"UTC\"}}") == []
    [d] = p.feed("\n</tool_call>")
    assert d["tool_calls"][0]["function"]["name"] == "get_time" and p.called


def test_forced_schemas():
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert forced_schema([WEATHER], named) == WEATHER["function"]["parameters"]
    assert forced_schema([WEATHER], "auto") is None
    req = forced_schema([WEATHER, TIME], "required", parallel_tool_calls=False)
    assert req["minItems"] == req["maxItems"] == 1 and len(req["items"]["anyOf"]) == 2
    assert _fn(parse_forced('{"city": "Tokyo", "unit": "F"}', named)) == [("get_weather", {"city": "Tokyo", "unit": "F"})]
    assert _fn(parse_forced('[{"name": "get_time", "arguments": {"tz": "UTC"}}]', "required")) == [
        ("get_time", {"tz": "UTC"})]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tiny_random_model_makes_a_valid_call_when_forced(choice):
    """Even a random model writes a well-formed call of an allowed tool when the grammar forces it."""
    pytest.importorskip("xgrammar")
    jsonschema = pytest.importorskip("jsonschema")
    from blitzgen.structured import GrammarConstraint

    tok = byte_tokenizer(QWEN)
    model = tiny_model(seed=3, max_seq_len=1024)  # vocab 512: wider than the tokenizer's 260
    tools = [WEATHER, TIME]
    ids = render_prompt(tok, [{"role": "user", "content": "Weather in Paris?"}], tools=tools, tool_choice=choice)
    schema = forced_schema(tools, choice, parallel_tool_calls=False)
    c = GrammarConstraint.from_json_schema(schema, tok, vocab_size=model.args.vocab_size, param="tool_choice")
    out, pos = [], len(ids)
    with torch.inference_mode():
        logits = model(torch.tensor([ids]), torch.arange(pos))[:, -1]
        for _ in range(120):
            t = int(c.apply(logits).argmax(-1))
            assert c.advance(t)
            if t in tok.eos_token_ids:
                break
            out.append(t)
            logits = model(torch.tensor([[t]]), torch.tensor([pos]))[:, -1]
            pos += 1
    assert c.is_terminated()
    text = tok.decode(out)
    jsonschema.validate(json.loads(text), schema)
    calls = parse_forced(text, choice)
    assert len(calls) == 1 and calls[0]["function"]["name"] in ("get_weather", "get_time")
