"""The raw SSE stream of the live server, read with httpx: the protocol invariants clients rely on."""

from __future__ import annotations

import json

import httpx
import pytest

pytestmark = pytest.mark.slow


def read_sse(resp: httpx.Response) -> list:
    """Every `data:` payload in order (JSON-decoded; "[DONE]" kept as is). Nothing may follow [DONE]."""
    events = []
    for line in resp.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        assert not events or events[-1] != "[DONE]", "data after [DONE]"
        data = line[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_chat_stream_invariants(server):
    body = {"messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 5, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=server.auth,
                      timeout=300) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = read_sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"] == r.headers["x-request-id"]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    choice_chunks = [c for c in chunks if c["choices"]]
    assert choice_chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in choice_chunks[1:])
    finishes = [c["choices"][0]["finish_reason"] for c in choice_chunks]
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] <= 5
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + usage["usage"]["completion_tokens"]


def test_completion_stream_invariants(server):
    body = {"prompt": "1, 2, 3,", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=server.auth, timeout=300) as r:
        events = read_sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in chunks).strip()


def test_bad_requests_get_clean_errors_and_the_server_keeps_serving(server):
    url = server.url + "/v1/chat/completions"
    with httpx.Client(timeout=60, headers={**server.auth, "Content-Type": "application/json"}) as c:
        assert c.post(url, content=b"{oops").status_code == 400
        assert c.post(url, json={"messages": "not a list"}).status_code == 400
        assert c.post(url, json={"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}
                      ).json()["error"]["param"] == "max_tokens"
        big = c.post(url, content=b'{"messages": "' + b"a" * (5 * 1024 * 1024) + b'"}')
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
        assert httpx.post(url, json={"messages": []}, timeout=60).status_code == 401  # no key
        assert c.get(server.url + "/v1/models").status_code == 200
