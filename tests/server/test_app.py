"""The HTTP layer on a fake model (no weights, in-process): status codes, error shapes, SSE framing."""

from __future__ import annotations

import json
import threading
import time

import pytest
from fake_model import FakeGenerator, fake_loader
from starlette.testclient import TestClient

from blitzgen.server.app import create_app
from blitzgen.server.engine import Engine

KEY = "sk-fake"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}


def make_client(gen: FakeGenerator, loader=None, **kw) -> TestClient:
    engine = Engine(loader or fake_loader(gen), max_queue=2, warmup=False)
    return TestClient(create_app(engine, api_key=KEY, max_body_bytes=64 * 1024, **kw))


def wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + 10
    while client.get("/health").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.fixture
def client(fake_gen):
    with make_client(fake_gen) as c:
        wait_ready(c)
        yield c


def sse_events(text: str) -> list:
    """The data payloads of an SSE body, JSON-decoded ([DONE] kept as the string)."""
    out = []
    for block in text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def assert_error(resp, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


def test_health_and_v1_answer_503_while_loading(fake_gen):
    release = threading.Event()
    load = fake_loader(fake_gen)

    def slow_loader():
        release.wait(10)
        return load()

    with make_client(fake_gen, loader=slow_loader) as c:
        assert c.get("/health").status_code == 503 and c.get("/health").json()["status"] == "loading"
        r = c.post("/v1/chat/completions", json=CHAT, headers=AUTH)
        assert_error(r, 503, code="model_loading")
        assert r.headers["retry-after"]
        release.set()
        wait_ready(c)
        assert c.get("/health").json() == {"status": "ok"}


def test_chat_response_shape_and_usage(client):
    r = client.post("/v1/chat/completions", json={**CHAT, "model": "fake-model"}, headers=AUTH)
    body = r.json()
    assert r.status_code == 200 and r.headers["x-request-id"] == body["id"]
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "t0 t1 t2 "},
                                "logprobs": None, "finish_reason": "length"}]
    prompt = len("<user>Hi<assistant>")
    assert body["usage"] == {"prompt_tokens": prompt, "completion_tokens": 3, "total_tokens": prompt + 3,
                             "prompt_tokens_details": {"cached_tokens": 0}}


def test_default_max_tokens_is_the_rest_of_the_context(client, fake_gen):
    r = client.post("/v1/completions", json={"prompt": "x" * 60}, headers=AUTH)
    assert r.json()["usage"]["completion_tokens"] == fake_gen.max_seq_len - 60


def test_streamed_chat_framing(client):
    r = client.post("/v1/chat/completions", headers=AUTH,
                    json={**CHAT, "n": 2, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in mine) == "t0 t1 t2 "
        assert [c["finish_reason"] for c in mine][-1] == "length"
        assert all(c["finish_reason"] is None for c in mine[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert all(c["usage"] is None for c in chunks[:-1])


def test_an_error_after_streaming_began_is_an_sse_error_event(fake_gen):
    fake_gen.fail_at = 2
    with make_client(fake_gen) as c:
        wait_ready(c)
        r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 5, "stream": True}, headers=AUTH)
        events = sse_events(r.text)
        assert [e["choices"][0]["text"] for e in events[:2]] == ["t0 ", "t1 "]
        assert "the fake model broke" in events[-2]["error"]["message"] and events[-1] == "[DONE]"
        fake_gen.fail_at = None  # and the server keeps serving
        assert c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, headers=AUTH).status_code == 200


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": "Hi"}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages"),
    ({**CHAT, "max_tokens": "3"}, "max_tokens"),
    ({**CHAT, "max_tokens": 0}, "max_tokens"),
    ({**CHAT, "temperature": -1}, "temperature"),
    ({**CHAT, "top_p": 0}, "top_p"),
    ({**CHAT, "n": 99}, "n"),
    ({**CHAT, "stop": 3}, "stop"),
    ({**CHAT, "stream": "yes"}, "stream"),
    ({**CHAT, "seed": -5}, "seed"),
    ({**CHAT, "model": 7}, "model"),
    ({**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
])
def test_invalid_chat_values_are_400_naming_the_param(client, body, param):
    assert_error(client.post("/v1/chat/completions", json=body, headers=AUTH), 400, param=param)


@pytest.mark.parametrize("body, param", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [1, 999]}, "prompt"),
    ({"prompt": "Hi", "echo": True}, "echo"),
    ({"max_tokens": 3}, "prompt"),
])
def test_invalid_completion_values_are_400(client, body, param):
    assert_error(client.post("/v1/completions", json=body, headers=AUTH), 400, param=param)


def test_malformed_bodies(client):
    post = lambda content: client.post("/v1/chat/completions", content=content,  # noqa: E731
                                       headers={**AUTH, "Content-Type": "application/json"})
    assert "JSON" in assert_error(post(b"{not json"), 400)["message"]
    assert_error(post(b"[1, 2]"), 400)
    assert_error(post(b"\xff\xfe"), 400)
    assert_error(post(b""), 400)
    assert_error(post(b"{" + b" " * 70_000 + b"}"), 413, code="request_too_large")


def test_context_overflow_is_400_context_length_exceeded(client, fake_gen):
    r = client.post("/v1/completions", json={"prompt": "x" * 60, "max_tokens": 10}, headers=AUTH)
    err = assert_error(r, 400, param="prompt", code="context_length_exceeded")
    assert err["message"].startswith(f"This model's maximum context length is {fake_gen.max_seq_len} tokens")


def test_auth_model_and_routes(client):
    assert_error(client.post("/v1/chat/completions", json=CHAT), 401, code="invalid_api_key")
    r = client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    assert_error(r, 401, code="invalid_api_key")
    assert r.headers["www-authenticate"] == "Bearer"
    assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200  # open
    assert client.get("/v1/models", headers=AUTH).json()["data"][0]["id"] == "fake-model"
    assert_error(client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"}, headers=AUTH), 404,
                 param="model", code="model_not_found")
    assert_error(client.get("/v1/nowhere", headers=AUTH), 404)
    assert_error(client.get("/v1/chat/completions", headers=AUTH), 405)
    ok = client.post("/v1/chat/completions", json={**CHAT, "frobnicate": {"x": 1}, "user": "u"}, headers=AUTH)
    assert ok.status_code == 200  # unknown fields are tolerated


def test_served_model_name_is_an_alias(fake_gen):
    with make_client(fake_gen, served_model_name="smol") as c:
        wait_ready(c)
        assert c.get("/v1/models", headers=AUTH).json()["data"][0]["id"] == "smol"
        for name in ("smol", "fake-model"):
            r = c.post("/v1/chat/completions", json={**CHAT, "model": name}, headers=AUTH)
            assert r.status_code == 200 and r.json()["model"] == "smol"


def test_chat_page_is_served(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in r.text and "AbortController" in r.text
