"""The serving engine's queue, cancellation and error handling, on a scripted fake model (no weights)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from fake_model import FakeGenerator, fake_loader

from blitzgen.sampling import SamplingParams
from blitzgen.server.engine import Engine, Job, Overloaded, Unavailable


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


async def await_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def job(name: str, prompt_len: int = 3, max_tokens: int = 3, n: int = 1) -> Job:
    return Job(name, list(range(1, prompt_len + 1)), max_tokens, SamplingParams(temperature=0.0), n=n)


async def collect(engine: Engine, j: Job) -> list:
    return [ev async for ev in engine.events(j)]


@pytest.fixture
def engine(fake_gen):
    eng = Engine(fake_loader(fake_gen), max_queue=2, warmup=False)
    eng.start()
    wait_for(lambda: eng.state == "ready")
    yield eng
    if fake_gen.permits is not None:
        fake_gen.permits.release(1000)
    eng.stop()


def finished(engine: Engine, reason: str) -> float:
    return engine.metrics.registry.get_sample_value("blitzgen_request_finished_total", {"finish_reason": reason})


def gauge(engine: Engine, name: str) -> float:
    return engine.metrics.registry.get_sample_value(f"blitzgen_num_requests_{name}")


def test_jobs_run_fifo_and_their_texts_never_mix(engine, fake_gen):
    async def main():
        jobs = [job(f"j{i}", prompt_len=i + 1, max_tokens=2 + i) for i in range(3)]
        for j in jobs:
            engine.submit(j)
        return jobs, await asyncio.gather(*(collect(engine, j) for j in jobs))

    jobs, results = asyncio.run(main())
    assert fake_gen.started == [1, 2, 3]  # FIFO
    for j, events in zip(jobs, results):
        text = "".join(e.text for e in events if e.kind == "delta")
        assert text == "".join(f"t{i} " for i in range(j.max_tokens))
        assert [e.kind for e in events][-2:] == ["finish", "done"]
        assert events[-1].tokens == j.max_tokens
    assert finished(engine, "length") == 3


def test_n_choices_run_one_after_another(engine, fake_gen):
    async def main():
        j = job("multi", max_tokens=2, n=3)
        engine.submit(j)
        return await collect(engine, j)

    events = asyncio.run(main())
    assert [(e.kind, e.index) for e in events if e.kind == "finish"] == [("finish", 0), ("finish", 1), ("finish", 2)]
    assert events[-1].kind == "done" and events[-1].tokens == 6
    assert len(fake_gen.started) == 3


def test_full_queue_refuses_and_a_cancelled_waiting_job_leaves_at_once(engine, fake_gen):
    fake_gen.permits = threading.Semaphore(0)

    async def main():
        running, waiting = job("running"), [job("w1", prompt_len=7), job("w2")]
        engine.submit(running)
        await await_for(lambda: engine._running is running)
        for j in waiting:
            engine.submit(j)
        with pytest.raises(Overloaded):
            engine.submit(job("one too many"))
        assert gauge(engine, "waiting") == 2
        engine.cancel(waiting[0])
        assert engine.num_waiting == 1 and gauge(engine, "waiting") == 1
        assert finished(engine, "abort") == 1
        engine.submit(job("fits again"))
        fake_gen.permits.release(1000)

    asyncio.run(main())
    wait_for(lambda: engine._running is None and engine.num_waiting == 0)
    assert fake_gen.started == [3, 3, 3]  # the cancelled job (prompt length 7) never ran


def test_leaving_the_stream_stops_generation_within_a_token(engine, fake_gen):
    fake_gen.permits = threading.Semaphore(0)

    async def main():
        j = job("gone", max_tokens=100)
        engine.submit(j)
        events = engine.events(j)
        fake_gen.permits.release(3)
        for _ in range(3):
            assert (await anext(events)).kind == "delta"
        await events.aclose()  # what a client disconnect does to the response generator
        fake_gen.permits.release(1000)

    asyncio.run(main())
    wait_for(lambda: engine._running is None)
    assert fake_gen.produced <= 4
    assert finished(engine, "abort") == 1
    assert gauge(engine, "running") == 0


def test_a_disconnected_non_streaming_client_is_noticed_while_waiting(engine, fake_gen):
    fake_gen.permits = threading.Semaphore(0)

    async def main():
        j = job("polled", max_tokens=100)
        engine.submit(j)

        async def gone():
            return True

        events = [ev async for ev in engine.events(j, disconnected=gone)]
        fake_gen.permits.release(1000)
        return events

    assert asyncio.run(main()) == []
    wait_for(lambda: engine._running is None)
    assert finished(engine, "abort") == 1


def test_a_failing_generation_reports_an_error_and_the_engine_keeps_serving():
    gen = FakeGenerator(fail_at=1)
    eng = Engine(fake_loader(gen), warmup=False)
    eng.start()
    wait_for(lambda: eng.state == "ready")

    async def main():
        first = job("breaks", max_tokens=4)
        eng.submit(first)
        events = await collect(eng, first)
        gen.fail_at = None
        second = job("fine", max_tokens=2)
        eng.submit(second)
        return events, await collect(eng, second)

    try:
        broken, fine = asyncio.run(main())
    finally:
        eng.stop()
    assert [e.kind for e in broken] == ["delta", "error"]
    assert "the fake model broke" in broken[-1].text
    assert fine[-1].kind == "done"
    assert finished(eng, "error") == 1


def test_draining_refuses_new_work_but_finishes_accepted_jobs(engine, fake_gen):
    fake_gen.permits = threading.Semaphore(0)

    async def main():
        accepted = [job("a"), job("b")]
        for j in accepted:
            engine.submit(j)
        engine.drain()
        with pytest.raises(Unavailable) as e:
            engine.submit(job("late"))
        assert e.value.state == "draining"
        fake_gen.permits.release(1000)
        return await asyncio.gather(*(collect(engine, j) for j in accepted))

    for events in asyncio.run(main()):
        assert events[-1].kind == "done"
    assert engine.state == "draining"


def test_a_failed_load_is_reported():
    def loader():
        raise RuntimeError("no such weights")

    failed = threading.Event()
    eng = Engine(loader)
    eng.on_failure = failed.set
    eng.start()
    assert failed.wait(10)
    assert eng.state == "failed" and "no such weights" in str(eng.error)


def test_default_max_tokens_stays_in_the_preallocated_cache():
    """No max_tokens on a 128K-context model: stop at the warm cache size rather than grow the cache
    to the whole context; a prompt longer than that gets the rest of the context."""
    from blitzgen.runtime import WARM_CACHE_TOKENS

    gen = FakeGenerator(max_seq_len=131072)
    gen.cache_len = WARM_CACHE_TOKENS
    eng = Engine(fake_loader(gen))
    eng.gen = gen
    assert eng.default_max_tokens(100) == WARM_CACHE_TOKENS - 100
    assert eng.default_max_tokens(WARM_CACHE_TOKENS + 5) == 131072 - WARM_CACHE_TOKENS - 5
    small = FakeGenerator(max_seq_len=64)
    eng.gen = small
    assert eng.default_max_tokens(10) == 54


def test_cached_tokens_reach_the_events(smol_path):
    """A real (tiny) Generator: the second request with the same prompt reuses all but its last
    token, and the engine says so on "finish" and "done"; the start-up report is on /metrics."""
    import torch

    from blitzgen import loading
    from blitzgen.generate import Generator
    from blitzgen.loading import gguf as gguf_src
    from blitzgen.tokenizer import Tokenizer

    from blitzgen.config import ModelArgs
    from blitzgen.model import Transformer

    tok = Tokenizer.from_gguf(gguf_src.open_reader(smol_path))
    torch.manual_seed(5)
    model = Transformer(ModelArgs.from_name("tiny").replace(vocab_size=tok.vocab_size, max_seq_len=64)).eval()
    model.setup_caches(1, 64)
    lm = loading.LoadedModel(model=model, tokenizer=tok, args=model.args, source="tiny", kind="hf", name="tiny")
    eng = Engine(lambda: (lm, Generator(model, tok)), warmup=False)
    eng.start()
    wait_for(lambda: eng.state == "ready")
    try:
        async def main():
            out = []
            for name in ("a", "b"):
                j = job(name, prompt_len=9, max_tokens=3)
                eng.submit(j)
                out.append(await collect(eng, j))
            return out

        first, second = asyncio.run(main())
        assert first[-1].kind == "done" and first[-1].cached_tokens == 0
        assert [e.cached_tokens for e in second if e.kind in ("finish", "done")] == [8, 8]
    finally:
        eng.stop()
    assert eng.metrics.registry.get_sample_value("blitzgen_startup_seconds", {"phase": "total"}) is not None


def test_saved_prefixes_serve_a_conversation_that_comes_back(smol_path):
    """A, then B, then A again on a real tiny Generator: A's prefix is restored from the store, and
    /metrics has the hit rate, the restore and the store's size; (0, 0) turns saving off."""
    import torch

    from blitzgen import loading
    from blitzgen.generate import Generator
    from blitzgen.config import ModelArgs
    from blitzgen.model import Transformer

    from blitzgen.loading import gguf as gguf_src
    from blitzgen.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(gguf_src.open_reader(smol_path))
    torch.manual_seed(5)
    model = Transformer(ModelArgs.from_name("tiny").replace(vocab_size=tok.vocab_size, max_seq_len=128)).eval()
    model.setup_caches(1, 128)
    lm = loading.LoadedModel(model=model, tokenizer=tok, args=model.args, source="tiny", kind="hf", name="tiny")
    a, b = list(range(1000, 1040)), list(range(2000, 2040))

    def serve(bounds):
        eng = Engine(lambda: (lm, Generator(model, tok)), warmup=False, prompt_cache=bounds)
        eng.start()
        wait_for(lambda: eng.state == "ready")

        async def main():
            out = []
            for ids in (a, b, a):
                j = Job("x", list(ids), 3, SamplingParams(temperature=0.0))
                eng.submit(j)
                out.append([e.cached_tokens for e in await collect(eng, j) if e.kind == "done"][0])
            return out

        try:
            return eng, asyncio.run(main())
        finally:
            eng.stop()

    eng, cached = serve(None)
    assert cached == [0, 0, 39]
    value = eng.metrics.registry.get_sample_value
    assert value("blitzgen_prompt_cache_restores_total") == 1 and value("blitzgen_prompt_cache_saves_total") == 2
    assert abs(value("blitzgen_prompt_cache_hit_rate") - 1 / 3) < 1e-9
    assert value("blitzgen_prompt_cache_entries") == 2 and value("blitzgen_prompt_cache_bytes") > 0
    eng, cached = serve((0, 0))
    assert cached == [0, 0, 0] and eng.metrics.registry.get_sample_value("blitzgen_prompt_cache_entries") == 0
