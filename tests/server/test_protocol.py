"""protocol.py on its own: request parsing and validation, response and chunk building."""

from __future__ import annotations

import json

import pytest

from blitzgen.server.protocol import (
    MAX_N, SSE_DONE, APIError, ResponseBuilder, parse_chat_request, parse_completion_request, sse,
)

MSGS = [{"role": "user", "content": "Hi"}]


def test_chat_defaults():
    req = parse_chat_request({"messages": MSGS})
    assert (req.kind, req.model, req.max_tokens, req.n, req.stream, req.include_usage) == \
        ("chat", None, None, 1, False, False)
    assert req.sampling.temperature == 1.0 and req.sampling.top_p == 1.0 and req.sampling.seed is None
    assert req.stop == [] and req.messages == MSGS


def test_chat_fields_are_read():
    req = parse_chat_request({
        "model": "m", "messages": MSGS, "max_tokens": 5, "max_completion_tokens": 7, "temperature": 0,
        "top_p": 0.9, "top_k": -1, "min_p": 0.05, "seed": 3, "stop": "\n", "n": 2, "stream": True,
        "stream_options": {"include_usage": True}, "presence_penalty": 0, "tools": None, "whatever": [1],
    })
    assert req.max_tokens == 7  # max_completion_tokens wins
    s = req.sampling
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.seed) == (0.0, 0.9, 0, 0.05, 3)
    assert s.greedy
    assert req.stop == ["\n"] and req.n == 2 and req.stream and req.include_usage and req.model == "m"


def test_nulls_mean_defaults_and_integral_floats_are_integers():
    req = parse_chat_request({"messages": MSGS, "max_tokens": 4.0, "temperature": None, "n": None,
                              "stop": None, "seed": None, "stream": None})
    assert req.max_tokens == 4 and req.sampling.temperature == 1.0 and req.n == 1 and req.stop == []


def test_stop_lists_drop_empty_strings():
    assert parse_chat_request({"messages": MSGS, "stop": ["a", "", "bc"]}).stop == ["a", "bc"]


@pytest.mark.parametrize("field, value", [
    ("max_tokens", True), ("max_tokens", 1.5), ("max_tokens", -1), ("temperature", "hot"),
    ("temperature", float("nan")), ("temperature", 101), ("top_p", 1.5), ("top_k", -2), ("min_p", 2),
    ("n", 0), ("n", MAX_N + 1), ("stop", ["a", 1]), ("stop", ["s"] * 17), ("seed", 2**64), ("stream", 1),
    ("logprobs", "yes"), ("top_logprobs", 2), ("top_logprobs", 21), ("response_format", {"type": "xml"}),
])
def test_bad_values_name_their_param(field, value):
    with pytest.raises(APIError) as e:
        parse_chat_request({"messages": MSGS, field: value})
    param = field
    assert e.value.status == 400 and e.value.param == param
    assert e.value.body()["error"]["type"] == "invalid_request_error"


def test_messages_are_checked():
    for bad in (None, [], "Hi", [{"role": 1, "content": "x"}], [{"role": "user", "content": 5}], ["Hi"]):
        with pytest.raises(APIError) as e:
            parse_chat_request({"messages": bad})
        assert e.value.param == "messages"
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}]}, {"role": "assistant", "content": None}]
    assert parse_chat_request({"messages": parts}).messages == parts


@pytest.mark.parametrize("prompt, expected", [
    ("Hello", "Hello"), (["Hello"], "Hello"), ([1, 2, 3], [1, 2, 3]), ([[4, 5]], [4, 5]),
])
def test_completion_prompts(prompt, expected):
    req = parse_completion_request({"prompt": prompt})
    assert req.kind == "completion" and req.prompt == expected


@pytest.mark.parametrize("body", [
    {}, {"prompt": ""}, {"prompt": []}, {"prompt": ["a", "b"]}, {"prompt": [1, -2]}, {"prompt": [True]},
    {"prompt": 5}, {"prompt": "x", "echo": True}, {"prompt": "x", "suffix": "y"}, {"prompt": "x", "logprobs": 6},
])
def test_bad_completion_requests(body):
    with pytest.raises(APIError) as e:
        parse_completion_request(body)
    assert e.value.status == 400 and e.value.param


def test_chat_chunks():
    b = ResponseBuilder("chat", "m")
    assert b.id.startswith("chatcmpl-") and isinstance(b.created, int)
    opener = b.chunk(0, role=True)
    assert opener["object"] == "chat.completion.chunk" and "usage" not in opener
    assert opener["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]
    assert b.chunk(1, "hé")["choices"][0]["delta"] == {"content": "hé"}
    last = b.chunk(0, finish_reason="stop")["choices"][0]
    assert last["delta"] == {} and last["finish_reason"] == "stop"
    assert {b.chunk(0, "x")["id"], opener["id"]} == {b.id}


def test_usage_chunks_and_responses():
    b = ResponseBuilder("completion", "m", include_usage=True)
    assert b.id.startswith("cmpl-")
    chunk = b.chunk(0, "abc")
    assert chunk["object"] == "text_completion" and chunk["usage"] is None
    assert chunk["choices"][0] == {"index": 0, "text": "abc", "logprobs": None, "finish_reason": None}
    final = b.usage_chunk(5, 3, 2)
    assert final["choices"] == [] and final["usage"] == {"prompt_tokens": 5, "completion_tokens": 3,
                                                          "total_tokens": 8, "prompt_tokens_details": {"cached_tokens": 2}}
    resp = b.response([("a", "stop"), ("b", "length")], 5, 4)
    assert [c["text"] for c in resp["choices"]] == ["a", "b"] and resp["usage"]["total_tokens"] == 9
    chat = ResponseBuilder("chat", "m").response([("hi", "stop")], 1, 1)
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "hi"}


def test_sse_encoding():
    event = sse({"text": "é\n"})
    assert event.startswith(b"data: ") and event.endswith(b"\n\n") and event.count(b"\n") == 2
    assert json.loads(event[6:]) == {"text": "é\n"}
    assert SSE_DONE == b"data: [DONE]\n\n"
