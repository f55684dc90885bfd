"""Programmatic dependent launch of the GEMVs (BLITZGEN_GEMV_PDL=1/2, sm_90+): a chain of GEMVs
captured in a CUDA graph, each fed the previous output, gives the same bits as without PDL (a
kernel that read its input before the previous one finished would not), and the compiled
quantized decode with PDL matches the eager plain model."""

from __future__ import annotations

import pytest
import torch

from blitzgen.generate import Generator
from blitzgen.kernels import gemv, gemv_configs
from blitzgen.kernels.reference import int4_gemv_ref, int8_gemv_ref
from blitzgen.runtime import RuntimeOptions

from .common import GREEDY, check_greedy, random_model, rel_err

pytestmark = pytest.mark.gpu

SHAPES = [(4096, 2048), (11008, 4096), (4096, 11008), (2048, 4096)]  # (N, K): each feeds the next


def _needs_sm90():
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs compute capability 9.0")


def _mats(kind):
    out = []
    for N, K in SHAPES:
        if kind == "int8":
            w = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
            out.append((w, torch.full((N,), (5376.0 * K) ** -0.5, device="cuda").to(torch.bfloat16)))
        else:
            q = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device="cuda")
            s = ((21.25 * K) ** -0.5 * (0.5 + torch.rand(N, K // 32, device="cuda"))).to(torch.bfloat16)
            out.append((q, s, (0.5 * s.float()).to(torch.bfloat16)))
    return out


def _chain(kind, mats, x, pdl):
    h = x
    for (N, K), m in zip(SHAPES, mats):
        h = h[:K]
        h = (gemv.int8_gemv_raw(h, *m, pdl=pdl) if kind == "int8"
             else gemv.int4_gemv_raw(h, *m, 32, kernel="h2", pdl=pdl))
    return h


def _reference(kind, mats, x):
    h = x
    for (N, K), m in zip(SHAPES, mats):
        h = h[:K]
        h = int8_gemv_ref(h, *m) if kind == "int8" else int4_gemv_ref(h, *m, 32)
    return h


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_pdl_chain_in_a_cuda_graph_equals_no_pdl(kind, summary):
    _needs_sm90()
    torch.manual_seed(torch.seed() % 2**31)
    mats = _mats(kind)
    x = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    outs = {}
    for pdl in (0, 1, 2):
        _chain(kind, mats, x, pdl)  # compile outside the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = _chain(kind, mats, x, pdl)
        for _ in range(3):
            g.replay()
        torch.cuda.synchronize()
        outs[pdl] = y.clone()
    ref = _reference(kind, mats, x)
    err = rel_err(outs[0], ref)
    assert err < 2e-2, err
    for pdl in (1, 2):
        assert torch.equal(outs[pdl], outs[0]), f"PDL={pdl} differs from PDL=0"
    summary(f"{kind} PDL chain of {len(SHAPES)}: equal bits for PDL 0/1/2; rel err vs reference {err:.1e}")


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_compiled_decode_with_pdl_matches_eager_plain(quantize, monkeypatch, tmp_path, summary):
    _needs_sm90()
    torch._dynamo.reset()
    prompt = [11, 2024, 7, 31000, 5, 987, 42, 3]
    oracle = random_model(quantize=quantize, cache=1024)
    eager = list(Generator(oracle).generate_ids(prompt, 40, GREEDY, stop_token_ids=()))  # PDL off
    monkeypatch.setenv("BLITZGEN_GEMV_PDL", "2")
    gemv_configs.gemv_pdl.cache_clear()
    try:
        assert gemv_configs.gemv_pdl() == 2
        opts = RuntimeOptions(device="cuda", compile=True, cache_dir=str(tmp_path))
        model = random_model(quantize=quantize, cache=256)
        model.compile_regions = opts.regions_for("cuda")
        got = list(Generator(model, options=opts).generate_ids(prompt, 40, GREEDY, stop_token_ids=()))
        summary(f"{quantize} compiled with PDL 2: " + check_greedy(oracle, prompt, got, 0.25, eager))
    finally:
        monkeypatch.delenv("BLITZGEN_GEMV_PDL")
        gemv_configs.gemv_pdl.cache_clear()
        torch._dynamo.reset()
        torch.cuda.empty_cache()
