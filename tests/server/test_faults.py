"""Faults against the live server: clients that vanish, bursts past the queue, and SIGTERM (run last)."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import pytest

from conftest import MAX_QUEUE

pytestmark = pytest.mark.slow

ABORTED = 'blitzgen_request_finished_total{finish_reason="abort"}'
RUNNING = "blitzgen_num_requests_running"
WAITING = "blitzgen_num_requests_waiting"
GENERATED = "blitzgen_generation_tokens_total"
COUNTING = {"prompt": "1, 2, 3, 4, 5, 6,", "temperature": 0, "stream": True}  # greedy keeps counting


def wait_metric(server, name: str, value: float, timeout: float = 60) -> float:
    """Poll /metrics until `name` equals `value`; return the seconds it took."""
    t0 = time.monotonic()
    while server.metrics().get(name) != value:
        assert time.monotonic() - t0 < timeout, f"{name} never became {value}"
        time.sleep(0.05)
    return time.monotonic() - t0


def test_a_client_that_disconnects_mid_stream_frees_the_engine(server):
    before = server.metrics()
    received = 0
    with httpx.stream("POST", server.url + "/v1/completions", json={**COUNTING, "max_tokens": 1000},
                      headers=server.auth, timeout=300) as r:
        for line in r.iter_lines():
            received += line.startswith("data: {")
            if received == 2:
                break  # leaving the block closes the connection mid-stream
    wait_metric(server, RUNNING, 0)
    after = server.metrics()
    assert after[ABORTED] == before[ABORTED] + 1
    assert after[GENERATED] - before[GENERATED] <= received + 3  # stopped within a token or two
    # the engine is free: the next request runs at once
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, headers=server.auth,
                   timeout=300)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1


def test_a_burst_of_clients_gets_whole_answers_or_clean_429s(server):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}
    reference = httpx.post(server.url + "/v1/chat/completions", json=body, headers=server.auth,
                           timeout=300).json()["choices"][0]["message"]["content"]

    async def one(client: httpx.AsyncClient) -> dict:
        async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            if r.status_code != 200:
                await r.aread()
                return {"status": r.status_code, "retry_after": r.headers.get("retry-after"), "body": r.json()}
            events = [line[6:] async for line in r.aiter_lines() if line]
        chunks = [json.loads(e) for e in events[:-1]]
        return {"status": 200, "done": events[-1] == "[DONE]", "ids": {c["id"] for c in chunks},
                "text": "".join(c["choices"][0]["delta"].get("content", "") for c in chunks),
                "finish": chunks[-1]["choices"][0]["finish_reason"]}

    async def burst() -> list[dict]:
        async with httpx.AsyncClient(base_url=server.url, headers=server.auth, timeout=300,
                                     limits=httpx.Limits(max_connections=32)) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client) for _ in range(12))), 300)

    results = asyncio.run(burst())
    ok = [r for r in results if r["status"] == 200]
    busy = [r for r in results if r["status"] != 200]
    assert len(ok) >= 1 + MAX_QUEUE  # one running, a full queue
    for r in busy:
        assert r["status"] == 429 and r["retry_after"] and r["body"]["error"]["code"] == "queue_full"
    for r in ok:  # complete and unmixed: each stream is one id and exactly the greedy answer
        assert r["done"] and len(r["ids"]) == 1 and r["text"] == reference and r["finish"] in ("stop", "length")
    assert len(set().union(*(r["ids"] for r in ok))) == len(ok)
    wait_metric(server, WAITING, 0)


@pytest.mark.drains_server
def test_sigterm_refuses_new_work_finishes_accepted_requests_and_exits_0(server):
    results: list[list[str]] = [[], []]

    def stream(slot: int) -> None:  # the first runs long enough for the second to queue behind it
        body = {**COUNTING, "max_tokens": 8 if slot == 0 else 4}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=server.auth,
                          timeout=300) as r:
            results[slot] = [line for line in r.iter_lines() if line]

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    threads[0].start()
    wait_metric(server, RUNNING, 1)
    threads[1].start()
    wait_metric(server, WAITING, 1)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    # new work is refused with a 503 and Retry-After (the socket still listens while draining)
    late = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1},
                      headers=server.auth, timeout=10)
    assert late.status_code == 503 and late.headers["retry-after"]
    assert late.json()["error"]["code"] == "shutting_down"
    for t in threads:
        t.join(300)
    for lines in results:  # the running and the queued request both finished
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert server.proc.wait(120) == 0
    assert "draining" in server.log()
