"""``blitzgen serve --tp 2`` on CPU (gloo) answers like one process: a tiny random GQA checkpoint with
the default model's tokenizer, greedy and seeded requests, streamed and not, logprobs and a JSON
schema (the grammar / logprobs token loop), n > 1, n-gram and self-int4 speculation; clients that leave mid-stream (plain and
constrained) leave the ranks in lockstep; a follower that dies makes /health 503 and the server
exit within a bounded time. The reference is the same app at --tp 1 (in this process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch


GQA = dict(vocab_size=49152, dim=128, n_heads=8, n_kv_heads=2, head_dim=16, intermediate_size=256, max_seq_len=512)
SCHEMA = {"type": "json_schema", "json_schema": {"name": "point", "schema": {
    "type": "object", "properties": {"x": {"type": "integer"}, "tag": {"type": "string"}}, "required": ["x", "tag"]}}}
HI = [{"role": "user", "content": "Say hello in three words."}]
REQUESTS = [
    ("completions", {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}),
    ("completions", {"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0.9, "seed": 7, "n": 2}),
    ("completions", {"prompt": "1, 2, 3,", "max_tokens": 12, "temperature": 0, "logprobs": 2}),
    ("chat/completions", {"messages": HI, "max_tokens": 20, "temperature": 0}),
    ("chat/completions", {"messages": HI, "max_tokens": 10, "temperature": 0, "logprobs": True, "top_logprobs": 3}),
    ("chat/completions", {"messages": HI, "max_tokens": 40, "temperature": 0, "response_format": SCHEMA}),
    ("chat/completions", {"messages": HI, "max_tokens": 12, "temperature": 0, "stop": [" the"]}),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from blitzgen.config import ModelArgs
    from blitzgen.loading.synthetic import save_random_checkpoint

    d = tmp_path_factory.mktemp("tiny-gqa")
    save_random_checkpoint(ModelArgs.from_name("tiny").replace(**GQA), d, dtype=torch.float32, seed=3)
    return d


@pytest.fixture(scope="module")
def tp_server(ckpt, tmp_path_factory):
    from blitzgen.parallel.group import free_port

    port = free_port()
    log_path = tmp_path_factory.mktemp("serve-tp") / "serve.log"
    cmd = [sys.executable, "-m", "blitzgen.cli", "serve", "--tp", "2", "--model", str(ckpt), "--device", "cpu",
           "--dtype", "float32", "--port", str(port), "--max-queue", "4", "--speculate", "off,ngram,self-int4"]
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    codes = []
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline, log_path.read_text()
        try:
            codes.append(httpx.get(url + "/health", timeout=5).status_code)
            if codes[-1] == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    assert 503 in codes  # it listened while the ranks loaded
    yield url, proc, log_path
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def reference(ckpt):
    """--tp 1: the same app over an engine loaded through the tensor-parallel path (one rank, in
    this process)."""
    from starlette.testclient import TestClient

    from blitzgen.parallel import TPSpec
    from blitzgen.parallel.serve import TPServing
    from blitzgen.server.app import create_app
    from blitzgen.server.engine import Engine

    tp1 = TPServing(1, TPSpec(model=str(ckpt), device="cpu", dtype="float32"), log=lambda m: None)
    try:
        with TestClient(create_app(Engine(tp1.load))) as http:
            deadline = time.monotonic() + 120
            while http.get("/health").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            yield http
    finally:
        tp1.stop()


def _choices(body: dict) -> list:
    """What must match: text (or message), finish reason, logprobs rounded (float32 sums differ)."""
    out = []
    for c in body["choices"]:
        lp = json.loads(json.dumps(c.get("logprobs")), parse_float=lambda s: round(float(s), 3))
        out.append((c.get("text"), c.get("message"), c["finish_reason"], lp))
    return out


def _stream_text(url: str, path: str, body: dict, stop_after: int | None = None) -> str:
    """The streamed text; with stop_after, the client closes the connection after that many chunks."""
    parts = []
    with httpx.stream("POST", f"{url}/v1/{path}", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            c = json.loads(line[6:])["choices"][0]
            parts.append(c.get("text") or (c.get("delta") or {}).get("content") or "")
            if stop_after is not None and len(parts) >= stop_after:
                break
    return "".join(parts)


@pytest.mark.slow  # one server of two ranks and a --tp 1 engine: ~60-80 s on a 2-core CI machine
def test_tp2_server_answers_like_one_process(tp_server, reference):
    url, proc, log_path = tp_server
    want = [reference.post(f"/v1/{path}", json=body).json() for path, body in REQUESTS]

    def check_all():
        for (path, body), ref in zip(REQUESTS, want):
            r = httpx.post(f"{url}/v1/{path}", json=body, timeout=120)
            assert r.status_code == 200, r.text
            assert _choices(r.json()) == _choices(ref), (path, body)

    check_all()
    plain, greedy_chat = REQUESTS[0][1], REQUESTS[3][1]
    assert _stream_text(url, "completions", plain) == want[0]["choices"][0]["text"]
    assert _stream_text(url, "chat/completions", greedy_chat) == want[3]["choices"][0]["message"]["content"]
    # clients that leave mid-stream: plain decoding (checkpointed lockstep) and the grammar loop
    long = {"prompt": "Tell me a story", "max_tokens": 300, "temperature": 0}
    _stream_text(url, "completions", long, stop_after=3)
    _stream_text(url, "chat/completions", {**REQUESTS[5][1], "max_tokens": 200}, stop_after=2)
    check_all()  # every rank still in step (a rank out of step would hang or answer differently)
    assert httpx.get(url + "/health").status_code == 200
    assert "aborted" in log_path.read_text()
    # n-gram speculation over both ranks (asked per request): the same greedy text as plain decoding,
    # and a client that leaves mid-stream leaves the ranks in step
    spec = {**long, "max_tokens": 60, "speculate": "ngram"}
    r = r0 = httpx.post(f"{url}/v1/completions", json=spec, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == reference.post("/v1/completions", json={**long, "max_tokens": 60}).json()[
        "choices"][0]["text"]
    r = httpx.post(f"{url}/v1/completions", json={**spec, "speculate": "self-int4"}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == r0.json()["choices"][0]["text"]
    _stream_text(url, "completions", {**spec, "max_tokens": 300}, stop_after=3)
    check_all()
    metrics = httpx.get(url + "/metrics").text
    assert 'blitzgen_spec_decode_requests_total{source="ngram"} 2.0' in metrics
    (verifies,) = [float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith('blitzgen_spec_decode_verify_steps_total{source="ngram"}')]
    assert verifies > 0  # the ranks did verify drafts together


@pytest.mark.slow
def test_a_dying_follower_makes_the_server_unhealthy_and_exit(tp_server):
    import psutil

    url, proc, log_path = tp_server
    (follower,) = [c for c in psutil.Process(proc.pid).children() if "spawn" in " ".join(c.cmdline())]
    t0 = time.monotonic()
    follower.kill()
    codes = []
    while proc.poll() is None and time.monotonic() - t0 < 30:
        try:
            codes.append(httpx.get(url + "/health", timeout=2).status_code)
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    took = time.monotonic() - t0
    assert proc.poll() not in (None, 0), log_path.read_text()[-2000:]
    assert took < 15, took
    assert 503 in codes, codes
    assert "tensor-parallel rank 1 exited (signal 9)" in log_path.read_text()


@pytest.mark.parametrize("argv, env, needle", [
    (["--tp", "3"], {}, "--tp 3 does not divide the model's 8 attention heads (possible --tp values: 1, 2, 4, 8)"),
    (["--tp", "2"], {"RANK": "0", "WORLD_SIZE": "4"}, "--tp 2 but torchrun started 4 ranks"),
])
def test_serve_tp_refuses_what_cannot_run_before_binding(tmp_path, argv, env, needle, capsys, monkeypatch):
    from blitzgen.cli import main
    from blitzgen.config import ModelArgs
    from blitzgen.loading import synthetic

    monkeypatch.setattr(synthetic, "_write_tokenizer", lambda args, out: "no tokenizer")  # only the config counts
    ckpt = tmp_path / "ckpt"
    synthetic.save_random_checkpoint(ModelArgs.from_name("tiny").replace(**{**GQA, "vocab_size": 512}), ckpt)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(["serve", "--model", str(ckpt), "--device", "cpu", "--port", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and "cannot listen" not in err
