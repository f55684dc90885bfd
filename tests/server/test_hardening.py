"""Abuse and careless clients, on the fake model: vanished clients, huge prompts, bad Unicode, unsupported
fields, browser exposure, draining, slow bodies. Most run over real sockets (an in-process uvicorn)."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time

import httpx
import pytest
from fake_model import FakeGenerator, FakeTokenizer, fake_loader
from starlette.testclient import TestClient

from blitzgen.server.app import create_app
from blitzgen.server.engine import Engine

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
JSON = {"Content-Type": "application/json"}


class PacedGenerator(FakeGenerator):
    """The fake model at a steady pace: one token every `delay` seconds."""

    def __init__(self, max_seq_len: int = 4096, delay: float = 0.005):
        super().__init__(max_seq_len=max_seq_len)
        self.delay = delay

    def stream(self, prompt_ids, max_new_tokens, sampling=None, stop=()):
        for delta in super().stream(prompt_ids, max_new_tokens, sampling, stop):
            time.sleep(self.delay)
            yield delta


class GILTokenizer(FakeTokenizer):
    """Encodes like a real tokenizer: long prompts hold the GIL for a while (a C-level sort)."""

    def encode(self, text: str) -> list[int]:
        sorted(text)
        return super().encode(text)


def client_for(gen, *, tokenizer=None, max_queue: int = 2, **kw) -> TestClient:
    load = fake_loader(gen)

    def loader():
        lm, g = load()
        if tokenizer is not None:
            lm.tokenizer = tokenizer
        return lm, g

    engine = Engine(loader, max_queue=max_queue, warmup=False)
    return TestClient(create_app(engine, **kw), raise_server_exceptions=False)


@pytest.fixture
def client(fake_gen):
    with client_for(fake_gen) as c:
        deadline = time.monotonic() + 10
        while c.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        yield c


def ready(c: TestClient) -> TestClient:
    deadline = time.monotonic() + 10
    while c.get("/health").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return c


def error_of(resp, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def aborted(engine: Engine) -> float:
    return engine.metrics.registry.get_sample_value("blitzgen_request_finished_total", {"finish_reason": "abort"})


def raw_request(url: str, body: bytes, path: str = "/v1/completions", extra: str = "") -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n")
    sock.sendall(head.encode() + body)
    return sock


# ---- a vanished client, and the work one request may queue ---------------------------------------------
def test_a_non_streamed_disconnect_stops_the_engine_within_a_second_while_tokens_flow(fake_server):
    gen = PacedGenerator(max_seq_len=100_000, delay=0.002)
    srv = fake_server(gen)
    sock = raw_request(srv.url, json.dumps({"prompt": "Hi", "max_tokens": 50_000}).encode())
    deadline = time.monotonic() + 10
    while gen.produced < 50:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    sock.close()
    t0 = time.monotonic()
    while srv.engine._running is not None:
        assert time.monotonic() - t0 < 1.0, f"still generating after the client left ({gen.produced} tokens)"
        time.sleep(0.01)
    assert aborted(srv.engine) == 1


def test_a_disconnect_is_noticed_by_polling_even_while_events_flow(fake_gen):
    gen = PacedGenerator(max_seq_len=100_000, delay=0.002)
    eng = Engine(fake_loader(gen), warmup=False)
    eng.start()
    try:
        from blitzgen.sampling import SamplingParams
        from blitzgen.server.engine import Job

        async def main():
            job = Job("j", [1, 2], 50_000, SamplingParams(temperature=0.0))
            eng.submit(job)
            t0 = time.monotonic()

            async def gone():
                return time.monotonic() - t0 > 0.2

            async for _ in eng.events(job, disconnected=gone):
                assert time.monotonic() - t0 < 2, "the poll never ran while tokens were flowing"
            return time.monotonic() - t0

        deadline = time.monotonic() + 10
        while eng.state != "ready":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert asyncio.run(main()) < 1.5
    finally:
        eng.stop()


def test_one_request_may_queue_at_most_max_request_tokens(fake_gen):
    with client_for(fake_gen, max_request_tokens=40) as c:
        ready(c)
        err = error_of(c.post("/v1/completions", json={"prompt": "Hi", "n": 2, "max_tokens": 30}), 400, "max_tokens")
        assert "40" in err["message"]
        r = c.post("/v1/completions", json={"prompt": "Hi", "n": 4})  # no max_tokens: the budget is shared
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 40
        assert c.post("/v1/completions", json={"prompt": "Hi", "n": 2, "max_tokens": 20}).status_code == 200


# ---- prompts that cannot fit ----------------------------------------------------------------------------
def test_a_huge_prompt_is_rejected_at_once_and_a_concurrent_stream_keeps_its_pace(fake_server):
    gen = PacedGenerator(max_seq_len=4096, delay=0.01)
    srv = fake_server(gen)
    srv.engine.lm.tokenizer = GILTokenizer()
    arrivals: list[float] = []

    def stream():
        body = {"prompt": "Hi", "max_tokens": 150, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.monotonic())

    t = threading.Thread(target=stream)
    t.start()
    time.sleep(0.3)
    big = json.dumps({"prompt": "word " * 780_000}).encode()  # 3.9 MB, under the body limit
    t0 = time.monotonic()
    r = httpx.post(srv.url + "/v1/completions", content=big, headers=JSON, timeout=30)
    took = time.monotonic() - t0
    t.join(30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert took < 0.8, f"rejecting took {took:.2f} s"  # (tokenizing it took 2 s; margins for a busy CI box)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert len(arrivals) > 100 and max(gaps) < 0.5, f"the stream stalled {max(gaps):.2f} s"


def test_pending_tokenizations_count_against_the_queue(fake_server):
    release = threading.Event()

    class BlockingTokenizer(FakeTokenizer):
        def encode(self, text):
            if text.startswith("block"):
                release.wait(10)
            return super().encode(text)

    gen = FakeGenerator(max_seq_len=64)
    gen.permits = threading.Semaphore(0)
    srv = fake_server(gen, max_queue=1)
    srv.engine.lm.tokenizer = BlockingTokenizer()

    def post(prompt, out):
        out.append(httpx.post(srv.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1}, timeout=30))

    results: list = [[], [], []]
    threads = [threading.Thread(target=post, args=("run", results[0]))]
    threads[0].start()
    while srv.engine._running is None:
        time.sleep(0.01)
    threads.append(threading.Thread(target=post, args=("block 1", results[1])))
    threads[1].start()
    time.sleep(0.2)  # now encoding
    t0 = time.monotonic()
    post("block 2", results[2])  # one running + one being encoded: the queue of 1 is full
    assert time.monotonic() - t0 < 1
    assert results[2][0].status_code == 429 and results[2][0].headers["retry-after"]
    release.set()
    gen.permits.release(100)
    for t in threads:
        t.join(10)
    assert [r[0].status_code for r in results[:2]] == [200, 200]


# ---- bad Unicode and unexpected failures ----------------------------------------------------------------
@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", b'{"messages":[{"role":"user","content":"a\\ud800b"}]}', "messages"),
    ("/v1/chat/completions", b'{"messages":[{"role":"user","content":[{"type":"text","text":"\\udfff"}]}]}',
     "messages"),
    ("/v1/chat/completions", b'{"messages":[{"role":"us\\ud800er","content":"a"}]}', "messages"),
    ("/v1/completions", b'{"prompt":"a\\ud800b"}', "prompt"),
    ("/v1/completions", b'{"prompt":"a","stop":["\\ud800"]}', "stop"),
])
def test_lone_surrogates_are_400(client, path, body, param):
    err = error_of(client.post(path, content=body, headers=JSON), 400, param)
    assert "Unicode" in err["message"] or "surrogate" in err["message"]


def test_an_unexpected_exception_is_a_logged_500_in_openai_shape(fake_gen, caplog):
    class Broken(FakeTokenizer):
        def encode(self, text):
            raise TypeError("TextInputSequence must be str")

    with client_for(fake_gen, tokenizer=Broken()) as c:
        ready(c)
        r = c.post("/v1/completions", json={"prompt": "Hi"})
        err = error_of(r, 500)
        assert err["type"] == "server_error" and "TextInputSequence" not in err["message"]
    assert "TextInputSequence" in caplog.text  # logged with its traceback


# ---- fields this server does not support -----------------------------------------------------------------
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("extra, param", [
    ({"tools": [TOOL]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"functions": [TOOL["function"]]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"logit_bias": {"42": 5}}, "logit_bias"),
    ({"best_of": 2}, "best_of"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": 1}, "frequency_penalty"),
    ({"frequency_penalty": "x"}, "frequency_penalty"),
    ({"messages": [{"role": "banana", "content": "Hi"}]}, "messages"),
    ({"messages": [{"role": "tool", "content": "42"}]}, "messages"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]}, "messages"),
])
def test_unsupported_chat_fields_are_400_naming_the_field(client, extra, param):
    err = error_of(client.post("/v1/chat/completions", json={**CHAT, **extra}), 400, param)
    assert param in err["message"] or "role" in err["message"] or "tool" in err["message"]


@pytest.mark.parametrize("extra, param", [
    ({"best_of": 3}, "best_of"), ({"logit_bias": {"1": -100}}, "logit_bias"),
    ({"presence_penalty": 1}, "presence_penalty"),
])
def test_unsupported_completion_fields_are_400(client, extra, param):
    error_of(client.post("/v1/completions", json={"prompt": "Hi", **extra}), 400, param)


@pytest.mark.parametrize("extra", [
    {"tools": []}, {"tool_choice": "none"}, {"logit_bias": {}}, {"best_of": 1}, {"presence_penalty": 0},
    {"frequency_penalty": 0.0}, {"tools": None},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
    {"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "42", "tool_call_id": "c1"}]},
])
def test_neutral_values_of_those_fields_are_accepted(client, extra):
    assert client.post("/v1/chat/completions", json={**CHAT, **extra}).status_code == 200


# ---- browser exposure -------------------------------------------------------------------------------------
@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_posts_must_be_json(client, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    r = client.post("/v1/chat/completions", content=json.dumps(CHAT).encode(), headers=headers)
    assert error_of(r, 415)["code"] == "unsupported_media_type"
    ok = client.post("/v1/chat/completions", content=json.dumps(CHAT).encode(),
                     headers={"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_the_host_header_is_checked(fake_gen):
    with client_for(fake_gen, allowed_hosts=["localhost", "127.0.0.1"]) as c:
        ready_with_host(c)
        for host in ("evil.example", "localhost.evil.example", "127.0.0.1.nip.io:8000"):
            r = c.post("/v1/chat/completions", json=CHAT, headers={"Host": host})
            assert error_of(r, 400)["code"] == "invalid_host"
            assert c.get("/", headers={"Host": host}).status_code == 400
        for host in ("localhost:8000", "127.0.0.1", "LOCALHOST:1"):
            assert c.post("/v1/chat/completions", json=CHAT, headers={"Host": host}).status_code == 200


def ready_with_host(c: TestClient) -> TestClient:
    c.headers["Host"] = "localhost"
    return ready(c)


def test_default_allowed_hosts_follow_the_bind_address():
    from blitzgen.server.guard import default_allowed_hosts

    assert default_allowed_hosts("127.0.0.1", None) == ["localhost", "127.0.0.1", "::1", "[::1]"]
    assert default_allowed_hosts("localhost", None) == ["localhost", "127.0.0.1", "::1", "[::1]"]
    assert default_allowed_hosts("0.0.0.0", None) == ["*"]
    assert default_allowed_hosts("10.1.2.3", None) == ["*"]
    assert default_allowed_hosts("127.0.0.1", "a.example, b.example") == ["a.example", "b.example"]


def test_the_page_sends_csp_and_frame_headers(client):
    r = client.get("/")
    csp = r.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp and "'unsafe-inline'" not in csp
    assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
    icon = client.get("/favicon.svg")
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
    assert client.get("/favicon.ico").status_code == 200


# ---- smaller issues ----------------------------------------------------------------------------------------
def test_a_key_without_bearer_is_invalid_not_missing(fake_gen):
    with client_for(fake_gen, api_key="sk-fake") as c:
        ready(c)
        r = c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "sk-fake"})
        assert "Missing" not in error_of(r, 401)["message"]
        assert "Missing" in error_of(c.post("/v1/chat/completions", json=CHAT), 401)["message"]


def test_openapi_schema_is_published_and_lists_the_error_statuses(client):
    schema = client.get("/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions"):
        op = schema["paths"][path]["post"]
        codes = set(op["responses"])
        assert {"200", "400", "401", "404", "413", "415", "429", "503"} <= codes and "422" not in codes
        assert "application/json" in op["requestBody"]["content"]
    assert "/v1/models" in schema["paths"] and "/health" in schema["paths"]


def test_sigterm_drain_answers_503_with_retry_after_then_exits(fake_server):
    gen = FakeGenerator(max_seq_len=64)
    gen.permits = threading.Semaphore(0)
    srv = fake_server(gen)
    done: list = []
    t = threading.Thread(target=lambda: done.append(
        httpx.post(srv.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=30)))
    t.start()
    while srv.engine._running is None:
        time.sleep(0.01)
    srv.server.handle_exit(signal.SIGTERM, None)
    time.sleep(0.3)
    late = httpx.post(srv.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=10)
    assert late.status_code == 503 and late.headers["retry-after"]
    assert late.json()["error"]["code"] == "shutting_down"
    assert httpx.get(srv.url + "/health", timeout=10).status_code == 503
    gen.permits.release(100)
    t.join(10)
    assert done[0].status_code == 200 and done[0].json()["usage"]["completion_tokens"] == 3
    assert srv.wait_stopped(10)


def test_the_drain_has_a_time_limit(fake_server):
    gen = FakeGenerator(max_seq_len=64)
    gen.permits = threading.Semaphore(0)  # never released: the job would run forever
    srv = fake_server(gen, server_kw={"drain_timeout": 0.5})
    done: list = []
    t = threading.Thread(target=lambda: done.append(
        httpx.post(srv.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=30)))
    t.start()
    while srv.engine._running is None:
        time.sleep(0.01)
    t0 = time.monotonic()
    srv.server.handle_exit(signal.SIGTERM, None)
    running = srv.engine._running
    while not running.cancelled.is_set():  # aborted after 0.5 s
        assert time.monotonic() - t0 < 3
        time.sleep(0.01)
    gen.permits.release(1)  # the worker then sees the abort before its next token
    assert srv.wait_stopped(8) and time.monotonic() - t0 < 5
    t.join(10)
    assert done and done[0].status_code >= 500


def test_a_half_sent_body_times_out(fake_server):
    srv = fake_server(FakeGenerator(), app_kw={"body_timeout": 0.5})
    host, port = srv.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"prompt\":")
    sock.settimeout(5)
    t0 = time.monotonic()
    reply = sock.recv(65536)
    assert time.monotonic() - t0 < 3
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    while reply:  # and the connection is closed, not held
        reply = sock.recv(65536)
    assert time.monotonic() - t0 < 3
    sock.close()


def test_a_streamed_request_whose_client_left_while_queued_leaves_the_queue(fake_server):
    gen = FakeGenerator(max_seq_len=64)
    gen.permits = threading.Semaphore(0)
    srv = fake_server(gen)
    blocker = raw_request(srv.url, json.dumps({"prompt": "Hi", "max_tokens": 3}).encode())
    while srv.engine._running is None:
        time.sleep(0.01)
    queued = raw_request(srv.url, json.dumps({"prompt": "Hi", "max_tokens": 3, "stream": True}).encode())
    while srv.engine.num_waiting == 0:
        time.sleep(0.01)
    queued.close()
    t0 = time.monotonic()
    while srv.engine.num_waiting:
        assert time.monotonic() - t0 < 1.0, "the vanished stream is still queued"
        time.sleep(0.01)
    assert aborted(srv.engine) == 1
    gen.permits.release(100)
    blocker.close()
