"""The compiled path on the CPU (Inductor) against the eager path, on a tiny random Llama with GQA:
prompt lengths across prefill buckets, KV-cache growth during a compiled run, every sampler mode
with a fixed seed, compiled int8 / int4 decode, and ``Generator.warmup()`` followed by requests
that must not recompile. The GPU twin of this file (CUDA graphs, Triton kernels) is tests/gpu/.

One compiled Generator is shared by the tests of this module (its compiled graphs are the slow
part), so the order of the tests matters: warm-up first, cache growth last.
"""

from __future__ import annotations

import pytest
import torch

from blitzgen.generate import Generator
from blitzgen.sampling import SamplingParams

from .conftest import tiny_model
from .gpu.common import check_greedy

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0.0)
CACHE = 64  # the compiled model's first cache: prompts of 33+ tokens use its largest bucket
SEED = 3


def graphs() -> int:
    """Graphs compiled so far in this process (dynamo's counter)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _model(dtype=torch.float32, cache: int | None = None, **overrides):
    m = tiny_model(seed=SEED, dtype=dtype, **overrides)  # GQA: 4 query heads over 2 KV heads
    if cache is not None:
        m.setup_caches(1, cache)
    return m


def _ids(gen, prompt, n, sampling=GREEDY):
    return list(gen.generate_ids(prompt, n, sampling, stop_token_ids=()))


def _prompt(n: int) -> list[int]:
    g = torch.Generator().manual_seed(n)
    return torch.randint(1, 512, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def pair():
    """(eager Generator, compiled Generator) over two copies of the same float32 model."""
    return Generator(_model()), Generator(_model(cache=CACHE), compile=True)


def test_warmup_then_requests_do_not_recompile(pair):
    """What warmup() covers today: greedy requests whose prompt fits the first prefill bucket."""
    _, gen = pair
    gen.warmup()
    before = graphs()
    for n in (3, 9, 16):  # greedy, within the first prefill bucket and the warmed cache
        _ids(gen, _prompt(n), 6)
    assert graphs() == before, "a request after warmup() compiled a new graph"


def test_compiled_greedy_across_prefill_buckets(pair):
    eager, gen = pair
    for n in (15, 17, 33, 16, 31):  # buckets 16, 32, 64, then 16 and 32 again
        if n == 16:
            seen = graphs()
        prompt = _prompt(n)
        assert _ids(gen, prompt, 8) == _ids(eager, prompt, 8), f"prompt of {n} tokens"
    assert graphs() == seen, "a prompt length in an already compiled bucket recompiled"


SAMPLERS = {"temperature": SamplingParams(temperature=0.8, seed=11),
            "top_k": SamplingParams(temperature=1.0, top_k=20, seed=12),
            "top_p": SamplingParams(temperature=1.0, top_p=0.8, seed=13),
            "min_p": SamplingParams(temperature=1.3, min_p=0.05, seed=14)}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_samplers_compiled_equal_eager(pair, name):
    eager, gen = pair
    sp, prompt = SAMPLERS[name], _prompt(6)
    got = _ids(gen, prompt, 12, sp)
    assert got == _ids(eager, prompt, 12, sp)
    assert _ids(gen, prompt, 12, sp) == got  # the seed reproduces the sequence


def test_compiled_cache_growth(pair):
    """A request longer than the compiled model's cache: the cache grows (a recompile) and the
    tokens still equal the eager path's."""
    eager, gen = pair
    cap = gen.model.max_seq_len
    prompt = _prompt(20)
    new = cap - len(prompt) + 8
    if len(prompt) + new > gen.model.args.max_seq_len:
        pytest.skip(f"the cache ({cap}) already holds the whole context")
    got = _ids(gen, prompt, new)
    assert gen.model.max_seq_len >= len(prompt) + new > cap
    assert got == _ids(eager, prompt, new)


@pytest.mark.parametrize("scheme,group_size,dtype", [("int8", None, torch.float32),
                                                      ("int4", 32, torch.bfloat16)],
                         ids=["int8-fp32", "int4g32-bf16"])
def test_compiled_quantized_decode(scheme, group_size, dtype):
    """Compiled quantized decode against eager quantized decode (int4 in bf16 runs aten's packed
    CPU kernel). bf16 may round a near-tie differently: teacher-forced check, see check_greedy."""
    from blitzgen.quant import make_config, quantize_model

    def build():
        m = _model(dtype=dtype)
        quantize_model(m, make_config(scheme, group_size))
        m.setup_caches(1, CACHE)
        return m

    oracle, gen = build(), Generator(build(), compile=True)
    prompt = _prompt(17)
    got, want = _ids(gen, prompt, 10), _ids(Generator(oracle), prompt, 10)
    if dtype == torch.float32:
        assert got == want
    else:
        check_greedy(oracle, prompt, got, tol=0.1, eager=want)
