""""Ready means ready": after a full ``warmup()`` no request compiles anything, whatever its sampler
mode, prompt length (within the warm cache) or reuse of the cached prefix. CPU Inductor, tiny model."""

from __future__ import annotations

import pytest

from blitzgen.generate import Generator
from blitzgen.runtime import RuntimeOptions
from blitzgen.sampling import SamplingParams, sampler_modes

from .conftest import tiny_model

pytestmark = pytest.mark.slow

REQUESTS = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=1),
            SamplingParams(temperature=0.7, top_k=5, seed=2), SamplingParams(temperature=1.2, top_p=0.6, seed=3),
            SamplingParams(temperature=0.9, top_k=40, top_p=0.9, min_p=0.05, seed=4),
            SamplingParams(temperature=1.0, min_p=0.1), SamplingParams(temperature=0.5, top_k=1)]


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("compile_prefill", [False, True], ids=["eager-prefill", "compiled-prefill"])
def test_no_request_compiles_after_warmup(compile_prefill):
    model = tiny_model(seed=3)
    model.setup_caches(1, 16)
    gen = Generator(model, options=RuntimeOptions(device="cpu", compile=True, compile_prefill=compile_prefill,
                                                  warm_cache_tokens=64))
    before = graphs()
    gen.warmup()
    # at most one model step, five samplers, and every prefill bucket of the cache (16 ... 256)
    # when prefill compiles (fewer when an earlier test of this process compiled the same code)
    assert gen.warmup_plan()["cache_len"] == gen.cache_len == 256
    assert graphs() - before <= 1 + len(sampler_modes()) + (len(gen.prefill_buckets()) if compile_prefill else 0)
    warmed = graphs()
    for n in (1, 15, 16, 17, 33, 40, 63):
        for sp in REQUESTS:
            prompt = [(7 * i + n) % 500 + 1 for i in range(n)]
            new = min(3, gen.default_max_tokens(n))
            list(gen.generate_ids(prompt, new, sp, stop_token_ids=()))
            list(gen.generate_ids(prompt, new, sp, stop_token_ids=()))  # the prefix reused
    assert graphs() == warmed, "a request after warmup() compiled a graph"
