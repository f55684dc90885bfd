"""blitzgen.kernels: the int8 / int4 GEMV Triton kernels against their plain-PyTorch oracles.

No GPU here: the kernels run under Triton's interpreter (TRITON_INTERPRET=1, numpy on the CPU) in
a subprocess (the variable must be set before Triton is imported, and other tests of this process
may import Triton first). The sm_90 compile checks are in test_kernels_sm90.py.
Everything that needs Triton is skipped when it is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from blitzgen import kernels
from blitzgen.kernels.reference import (
    dequantize_int4_ref,
    int4_gemv_ref,
    int8_gemv_ref,
    pack_int4_ref,
    unpack_int4_ref,
)

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


needs_triton = pytest.mark.skipif(not _has_triton(), reason="triton is not installed")


# ------------------------------------------------------------------ references (no Triton needed)


def test_int4_pack_roundtrip_and_nibble_order():
    q = torch.randint(0, 16, (5, 12))
    packed = pack_int4_ref(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 6)
    assert torch.equal(unpack_int4_ref(packed), q.to(torch.int32))
    # even k in the LOW nibble
    assert int(packed[0, 0]) == int(q[0, 0]) | (int(q[0, 1]) << 4)


def test_references_match_explicit_math():
    torch.manual_seed(0)
    N, K, g = 6, 64, 32
    x = torch.randn(1, 1, K, dtype=torch.float64)
    w8 = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    s8 = torch.rand(N, dtype=torch.float64)
    y = int8_gemv_ref(x, w8, s8)
    assert y.shape == (1, 1, N)
    want = torch.stack([(x[0, 0].double() * w8[n].double()).sum() * s8[n] for n in range(N)])
    torch.testing.assert_close(y[0, 0], want.to(y.dtype), rtol=1e-5, atol=1e-5)

    q = torch.randint(0, 16, (N, K))
    sc = torch.rand(N, K // g, dtype=torch.float64)
    z = torch.randn(N, K // g, dtype=torch.float64)
    w = dequantize_int4_ref(pack_int4_ref(q), sc, z, g)
    assert torch.allclose(w[2, 40], ((q[2, 40] - 8) * sc[2, 1] + z[2, 1]).float())
    y4 = int4_gemv_ref(x, pack_int4_ref(q), sc, z, g)
    torch.testing.assert_close(y4[0, 0], (x[0, 0].float() @ w.t()).to(y4.dtype), rtol=1e-5, atol=1e-5)


def test_unavailable_on_cpu_falls_back_to_reference():
    assert kernels.available() is False or torch.cuda.is_available()
    x = torch.randn(1, 1, 64)
    w = torch.randint(-128, 128, (8, 64), dtype=torch.int8)
    s = torch.rand(8)
    torch.testing.assert_close(kernels.int8_gemv(x, w, s), int8_gemv_ref(x, w, s))
    qw = torch.randint(0, 256, (8, 32), dtype=torch.uint8)
    sc, z = torch.rand(8, 2), torch.randn(8, 2)
    torch.testing.assert_close(kernels.int4_gemv(x, qw, sc, z, 32), int4_gemv_ref(x, qw, sc, z, 32))


def test_env_disables_kernels():
    code = ("import os; os.environ['BLITZGEN_KERNELS'] = '0'\n"
            "from blitzgen import kernels\nassert kernels.available() is False\nprint('ok')")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": SRC},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def _fresh_probe(monkeypatch):
    """Forget the cached availability and the fallbacks reported so far (restored afterwards)."""
    from blitzgen import runtime

    monkeypatch.setattr(kernels, "_AVAILABLE", None)
    monkeypatch.setattr(kernels, "_REASON", None)
    monkeypatch.setattr(kernels, "_GEMV", kernels._GEMV)
    monkeypatch.setattr(runtime, "_REPORTED", set())


def _fallback_records(caplog):
    return [r for r in caplog.records if "falls back to a slower path" in r.getMessage()]


def test_disabled_kernels_are_reported_once_with_the_reason(monkeypatch, caplog):
    from blitzgen.quant.core import get_kernel

    _fresh_probe(monkeypatch)
    monkeypatch.setenv("BLITZGEN_KERNELS", "0")
    caplog.set_level("WARNING", logger="blitzgen")
    assert kernels.available() is False
    assert "BLITZGEN_KERNELS=0" in kernels.unavailable_reason()
    assert get_kernel("int8_gemv") is None and get_kernel("int8_gemv") is None
    assert get_kernel("int4_gemv") is None
    recs = _fallback_records(caplog)
    assert len(recs) == 2, [r.getMessage() for r in recs]  # once per kernel, not per call
    assert all("disabled by the user (BLITZGEN_KERNELS=0)" in r.getMessage() for r in recs)
    assert "int8_gemv" in recs[0].getMessage() and "int4_gemv" in recs[1].getMessage()
    with pytest.raises(ValueError, match="no kernel named"):
        get_kernel("int3_gemv")


def test_triton_import_failure_is_reported_with_the_exception(monkeypatch, caplog):
    import blitzgen.kernels
    from blitzgen.quant.core import get_kernel

    _fresh_probe(monkeypatch)
    monkeypatch.delenv("BLITZGEN_KERNELS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delattr(blitzgen.kernels, "gemv", raising=False)
    monkeypatch.setitem(sys.modules, "blitzgen.kernels.gemv", None)  # the import raises ImportError
    caplog.set_level("WARNING", logger="blitzgen")
    assert kernels.available() is False
    reason = kernels.unavailable_reason()
    assert reason.startswith("Triton kernels could not be imported (ModuleNotFoundError:"), reason
    assert "blitzgen.kernels.gemv halted" in reason  # the exception's own text
    assert get_kernel("int8_gemv") is None
    get_kernel("int8_gemv")
    recs = _fallback_records(caplog)
    assert len(recs) == 1 and reason in recs[0].getMessage()


def test_no_cuda_is_a_reason_and_cpu_tensors_are_not_a_fallback(monkeypatch, caplog):
    _fresh_probe(monkeypatch)
    monkeypatch.delenv("BLITZGEN_KERNELS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    caplog.set_level("WARNING", logger="blitzgen")
    assert kernels.available() is False and kernels.unavailable_reason() == "CUDA is not available"
    x, w, s = torch.randn(1, 64), torch.randint(-128, 128, (8, 64), dtype=torch.int8), torch.rand(8)
    kernels.int8_gemv(x, w, s)  # CPU tensors: the plain path is the CPU's own, nothing to report
    assert not _fallback_records(caplog)


@needs_triton
def test_gemv_configs_file_that_does_not_exist_is_reported(monkeypatch, caplog, tmp_path):
    from blitzgen import runtime
    from blitzgen.kernels import gemv

    monkeypatch.setattr(runtime, "_REPORTED", set())
    monkeypatch.setenv("BLITZGEN_GEMV_CONFIGS", str(tmp_path / "missing.json"))
    caplog.set_level("WARNING", logger="blitzgen")
    gemv._overrides.cache_clear()
    try:
        assert gemv._overrides() == {}
        (tmp_path / "c.json").write_text(json.dumps({"best_configs": {
            "int8:4096:4096:0": {"block_n": 2, "num_warps": 8, "wpt": 4, "split_k": 1, "num_stages": 1}}}))
        monkeypatch.setenv("BLITZGEN_GEMV_CONFIGS", str(tmp_path / "c.json"))
        gemv._overrides.cache_clear()
        assert gemv.choose_config("int8", 4096, 4096) == gemv.GemvConfig(2, 8, 4, 1, 1)
    finally:
        monkeypatch.undo()
        gemv._overrides.cache_clear()
    recs = _fallback_records(caplog)
    assert len(recs) == 1 and "missing.json" in recs[0].getMessage()


# ------------------------------------------------------------------ configs (Triton imported, no GPU)

LLAMA_SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (28672, 4096),
                (4096, 14336), (32000, 4096), (128256, 4096)]


@needs_triton
@pytest.mark.parametrize("kind,g", [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)])
def test_configs_are_valid_for_llama_shapes(kind, g):
    from blitzgen.kernels import gemv

    for N, K in LLAMA_SHAPES:
        cands = gemv.candidate_configs(kind, N, K, g)
        assert cands[0] == gemv.choose_config(kind, N, K, g)
        assert len(cands) == len(set(cands)) and len(cands) <= 16
        for c in cands:
            assert gemv.supported(kind, K, g, c), (N, K, c)
            assert c.wpt in (2, 4) and c.block_n in (1, 2, 4, 8, 16) and c.num_warps in (1, 2, 4, 8)
            grid, tps, split_k, _ = gemv._grid_and_split(kind, N, K, c)
            assert grid[1] == split_k and (split_k - 1) * tps < -(-K // gemv.tile_k(kind, c))


@needs_triton
def test_custom_ops_have_fake_impls():
    """torch.compile traces the ops with fake tensors: shapes / dtypes, incl. leading dims."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from blitzgen.kernels import gemv, mm_rows  # noqa: F401  (registers torch.ops.blitzgen.*)

    with FakeTensorMode():
        x = torch.empty(1, 1, 4096, dtype=torch.bfloat16, device="cuda")
        w = torch.empty(12288, 4096, dtype=torch.int8, device="cuda")
        s = torch.empty(12288, dtype=torch.bfloat16, device="cuda")
        y = torch.ops.blitzgen.int8_gemv(x, w, s)
        assert y.shape == (1, 1, 12288) and y.dtype == torch.bfloat16 and y.device.type == "cuda"
        qw = torch.empty(4096, 2048, dtype=torch.uint8, device="cuda")
        sc = torch.empty(4096, 32, dtype=torch.bfloat16, device="cuda")
        x2 = torch.empty(1, 4096, dtype=torch.bfloat16, device="cuda")
        y4 = torch.ops.blitzgen.int4_gemv(x2, qw, sc, sc, 128)
        assert y4.shape == (1, 4096) and y4.dtype == torch.bfloat16
        xr = torch.empty(1, 8, 4096, dtype=torch.bfloat16, device="cuda")  # a verify of 8 tokens
        assert torch.ops.blitzgen.int8_mm_rows(xr, w, s).shape == (1, 8, 12288)
        assert torch.ops.blitzgen.int4_mm_rows(xr, qw, sc, sc, 128).shape == (1, 8, 4096)
        xp = torch.empty(1, 300, 4096, dtype=torch.bfloat16, device="cuda")  # a prefill
        assert torch.ops.blitzgen.int8_mm(xp, w, s).shape == (1, 300, 12288)
        assert torch.ops.blitzgen.int4_mm(xp, qw, sc, sc, 128).shape == (1, 300, 4096)


# ------------------------------------------------------------------ kernels under the interpreter

_INTERP_SCRIPT = r"""
import json, math, os, sys
assert os.environ.get("TRITON_INTERPRET") == "1"
import torch
from blitzgen.kernels.gemv import GemvConfig as C, int8_gemv_raw, int4_gemv_raw, choose_config, supported
from blitzgen.kernels.reference import int8_gemv_ref, int4_gemv_ref, float_gemv_ref
from blitzgen.kernels.gemv_float import FloatGemvConfig, float_gemv_raw
from blitzgen.kernels.mm_rows import MmConfig, int8_mm_rows_raw, int4_mm_rows_raw

CASES = json.loads(sys.argv[1])
torch.manual_seed(0)

def check(y, r, tol):
    y32, r32 = y.float(), r.float()
    rel = ((y32 - r32).norm() / r32.norm().clamp_min(1e-30)).item()
    elem = (y32 - r32).abs() <= tol * (r32.abs() + r32.abs().mean())
    return {"rel": rel, "finite": bool(torch.isfinite(y32).all()), "all_close": bool(elem.all()),
            "shape_ok": tuple(y.shape) == tuple(r.shape), "dtype_ok": y.dtype == r.dtype}

out = []
for case in CASES:
    kind, N, K, g, dt, cfg, lead = case["kind"], case["N"], case["K"], case.get("g"), case["dtype"], case.get("cfg"), case["lead"]
    dtype = getattr(torch, dt)
    x = torch.randn(*lead, K).to(dtype)
    cfg = C(*cfg) if cfg and kind in ("int8", "int4") else None
    if kind == "float":
        w = torch.randn(N, K).to(dtype)
        r = float_gemv_ref(x, w)
        cfg = FloatGemvConfig(*case["cfg"]) if case.get("cfg") else None
        split = cfg is not None and cfg.split_k > 1
        poison = None if split else torch.full((N,), float("nan"), dtype=dtype)
        y = float_gemv_raw(x, w, cfg, out=poison)
    elif kind in ("int4deq", "int8deq"):  # a float copy of the weight, then F.linear (kernels/dequant.py)
        from blitzgen.kernels import dequant
        chunk = case.get("chunk") or dequant.CHUNK_ELEMS
        if kind == "int4deq":
            qw = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
            qw[0, :2] = torch.tensor([0x0F, 0xF0], dtype=torch.uint8)
            sc = (torch.rand(N, K // g) * 0.02 + 1e-3).to(dtype)
            z = (torch.randn(N, K // g) * 0.02).to(dtype)
            r = int4_gemv_ref(x, qw, sc, z, g)
            y = dequant.int4_dequant_mm(x, qw, sc, z, g, chunk_elems=chunk)
            from blitzgen.quant.int4 import dequantize_int4
            wd = dequant.int4_dequant(qw, sc, z, g, torch.float32)
            assert (wd - dequantize_int4(qw, sc, z, g, torch.float32)).abs().max() <= 1e-6 * sc.float().abs().max()
        else:
            w = torch.randint(-128, 128, (N, K), dtype=torch.int8)
            s = (torch.rand(N) * 0.02 + 1e-3).to(dtype)
            r = int8_gemv_ref(x, w, s)
            y = dequant.int8_dequant_mm(x, w, s, chunk_elems=chunk)
            assert torch.equal(dequant.int8_dequant(w, s, torch.float32), w.float() * s.float()[:, None])
        poison = None
    elif kind in ("int4rows", "int4mm"):
        qw = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
        sc = (torch.rand(N, K // g) * 0.02 + 1e-3).to(dtype)
        z = (torch.randn(N, K // g) * 0.02).to(dtype)
        r = int4_gemv_ref(x, qw, sc, z, g)
        rows = {"max_rows": None} if kind == "int4mm" else {}
        y, poison = int4_mm_rows_raw(x, qw, sc, z, g, MmConfig(*case["cfg"]) if case.get("cfg") else None, **rows), None
    elif kind in ("int8", "int8rows", "int8mm"):
        w = torch.randint(-128, 128, (N, K), dtype=torch.int8)
        w[0, :4] = torch.tensor([-128, 127, -1, 0], dtype=torch.int8)  # extremes
        s = (torch.rand(N) * 0.02 + 1e-3).to(dtype)
        r = int8_gemv_ref(x, w, s)
        poison = torch.full((N,), float("nan"), dtype=dtype)
        if kind in ("int8rows", "int8mm"):  # rows are written by the kernel into its own output
            rows = {"max_rows": None} if kind == "int8mm" else {}
            y, poison = int8_mm_rows_raw(x, w, s, MmConfig(*case["cfg"]) if case.get("cfg") else None, **rows), None
        else:
            y = int8_gemv_raw(x, w, s, cfg, out=poison)
    else:
        qw = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
        qw[0, :2] = torch.tensor([0x0F, 0xF0], dtype=torch.uint8)
        sc = (torch.rand(N, K // g) * 0.02 + 1e-3).to(dtype)
        z = (torch.randn(N, K // g) * 0.02).to(dtype)
        r = int4_gemv_ref(x, qw, sc, z, g)
        poison = torch.full((N,), float("nan"), dtype=dtype)
        y = int4_gemv_raw(x, qw, sc, z, g, cfg, out=poison)
    eff = cfg or choose_config(kind, N, K, g) if kind in ("int8", "int4") else None
    if eff is not None and (eff.split_k > 1 or not supported(kind, K, g, eff)):
        poison = None  # split-K (a float32 buffer, then a cast) and the PyTorch fallback ignore ``out``
    res = check(y, r, case["tol"])
    res["poisoned_out_used"] = poison is None or y.reshape(-1).data_ptr() == poison.data_ptr()
    res["case"] = case
    print("RESULT " + json.dumps(res), flush=True)
"""


def _case(kind, N, K, g=None, dtype="bfloat16", cfg=None, lead=(1,), chunk=None):
    tol = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3}[dtype]
    return {"kind": kind, "N": N, "K": K, "g": g, "dtype": dtype, "cfg": cfg, "lead": list(lead),
            "tol": tol, "chunk": chunk}


# (block_n, num_warps, wpt, split_k, num_stages)
INT8_CASES = [
    _case("int8", 37, 1024, cfg=[8, 2, 4, 1, 1]),  # N tail (37 = 4*8 + 5), 1 full tile
    _case("int8", 40, 1536, cfg=[4, 2, 2, 2, 1], dtype="float32"),  # wpt 2, split-K 2, fp32 exact
    _case("int8", 16, 3072, cfg=[2, 4, 4, 3, 2]),  # split-K 3 (one split = the K tail), pipelined
    _case("int8", 24, 2048, lead=(1, 1)),  # heuristic config, x [1, 1, K]
    _case("int8", 24, 1000, lead=(1, 1, 1)),  # K % 16 != 0 -> wpt 2 + tail
    _case("int8", 8, 1004),  # K % 8 != 0 -> PyTorch fallback inside the op
    _case("int8", 19, 640, cfg=[16, 1, 4, 1, 1], dtype="float16"),
]
# several rows on the tensor cores (kernels/mm_rows.py), lead = (1, rows); cfg = (block_n, block_k,
# num_warps, num_stages, split_k). float16 / float32 only: Triton 3.6's interpreter gets bfloat16 tl.dot
# wrong (checked with a bare 16x16 dot); bfloat16 runs in the GPU suite.
ROWS_CASES = [
    _case("int8rows", 37, 1024, dtype="float16", lead=(1, 4)),  # heuristic config (split-K), N tail
    _case("int8rows", 40, 1536, cfg=[32, 128, 4, 2, 2], dtype="float32", lead=(8,)),
    _case("int8rows", 24, 1000, dtype="float16", lead=(1, 3)),  # K tail
    _case("int8rows", 16, 3072, cfg=[16, 256, 4, 3, 3], dtype="float16", lead=(1, 16)),  # split-K 3
    _case("int4rows", 37, 1024, 32, dtype="float16", lead=(1, 4)),
    _case("int4rows", 40, 1536, 64, cfg=[32, 128, 4, 2, 2], dtype="float32", lead=(8,)),
    _case("int4rows", 24, 1280, 128, dtype="float16", lead=(1, 5)),  # K tail (1280 % 256)
    _case("int4rows", 16, 3072, 256, cfg=[16, 256, 4, 3, 3], dtype="float32", lead=(1, 7)),
    _case("int4rows", 33, 2560, 32, cfg=[64, 256, 4, 3, 4], dtype="float16", lead=(1, 2)),
    # any number of rows (a prefill without tinygemm's copy): several row tiles, row tails
    _case("int4mm", 37, 1024, 32, dtype="float16", lead=(1, 40)),  # heuristic: 64 rows per program
    _case("int4mm", 40, 1536, 64, cfg=[32, 128, 4, 2, 1, 32], dtype="float32", lead=(2, 35)),  # 3 row tiles
    _case("int4mm", 24, 1280, 128, cfg=[16, 256, 4, 2, 2, 16], dtype="float16", lead=(1, 21)),  # K tail, split
    _case("int4mm", 16, 512, 32, dtype="float32", lead=(1, 130)),  # 128 rows per program, 2 row tiles
    _case("int8mm", 37, 1024, dtype="float16", lead=(1, 40)),
    _case("int8mm", 24, 1000, cfg=[16, 128, 4, 2, 1, 32], dtype="float32", lead=(1, 70)),  # K tail, 3 row tiles
]
# the int4 row kernel's other decodes (cfg[6]): magic numbers in the tile, and 32-bit words; fp16 and fp32
# activations (bf16 on the GPU), split-K, K tails, 2..40 rows, every group size
MAGIC = "magic"
MAGIC_CASES = [
    _case("int4rows", 37, 1024, 32, cfg=[64, 128, 4, 2, 1, 16, MAGIC], dtype="float16", lead=(1, 4)),
    _case("int4rows", 40, 1536, 64, cfg=[32, 128, 4, 2, 2, 16, MAGIC], dtype="float32", lead=(8,)),
    _case("int4rows", 24, 1280, 128, cfg=[16, 512, 4, 2, 1, 16, MAGIC], dtype="float16", lead=(1, 5)),  # K tail
    _case("int4rows", 16, 3072, 256, cfg=[16, 256, 4, 3, 3, 16, MAGIC], dtype="float32", lead=(1, 7)),
    _case("int4rows", 33, 2560, 32, cfg=[64, 256, 4, 3, 4, 16, MAGIC], dtype="float16", lead=(1, 2)),
    _case("int4mm", 40, 1536, 64, cfg=[32, 128, 4, 2, 1, 32, MAGIC], dtype="float32", lead=(2, 19)),
    # 32-bit words, one dot per nibble position
    _case("int4rows", 37, 1024, 32, cfg=[64, 128, 4, 2, 1, 16, "words"], dtype="float16", lead=(1, 4)),
    _case("int4rows", 40, 1536, 64, cfg=[32, 128, 4, 2, 2, 16, "words"], dtype="float32", lead=(8,)),
    _case("int4rows", 24, 1280, 128, cfg=[16, 512, 4, 2, 1, 16, "words-xs"], dtype="float16", lead=(1, 5)),
    _case("int4rows", 16, 3072, 256, cfg=[16, 256, 4, 3, 3, 16, "words-xs"], dtype="float32", lead=(1, 7)),
    _case("int4mm", 33, 2560, 32, cfg=[64, 256, 4, 3, 2, 32, "words"], dtype="float16", lead=(1, 21)),
]
# a long prefill: dequantize to a float copy, then F.linear; N and K tails, and weights sliced into
# chunks of output rows (chunk: elements of the largest float copy)
DEQUANT_CASES = [
    _case("int4deq", 37, 1024, 32, dtype="float32", lead=(1, 5)),
    _case("int4deq", 70, 1280, 128, dtype="float32", lead=(2, 3), chunk=32 * 1280),  # 3 slices of rows
    _case("int4deq", 33, 512, 16, lead=(1, 4)),  # bf16
    _case("int4deq", 20, 1040, 16, dtype="float32", lead=(1, 3)),  # a byte tail (520 = 4 * 128 + 8)
    _case("int8deq", 37, 1000, dtype="float32", lead=(1, 6)),  # K tail
    _case("int8deq", 100, 640, lead=(3,), chunk=64 * 640),  # bf16, 2 slices
]
INT4_CASES = [
    _case("int4", 37, 1024, 32, cfg=[8, 2, 4, 1, 1]),
    _case("int4", 37, 1024, 64, cfg=[8, 2, 4, 1, 1], dtype="float32"),
    _case("int4", 37, 1024, 128, cfg=[8, 2, 4, 1, 1]),
    _case("int4", 40, 1536, 64, cfg=[4, 2, 2, 2, 1], dtype="float32"),  # tail + split-K
    _case("int4", 16, 3072, 128, cfg=[2, 4, 4, 3, 2]),  # BK 4096 > K: only the masked tail
    _case("int4", 33, 2560, 32, cfg=[4, 1, 4, 2, 3], lead=(1, 1)),  # 10 tiles, pipelined, split 2
    _case("int4", 24, 2048, 128, lead=(1, 1)),  # heuristic config
    _case("int4", 12, 512, 16),  # g 16 -> wpt 2
    _case("int4", 19, 1024, 32, cfg=[16, 1, 4, 1, 1], dtype="float16"),
]

# (block_n, num_warps, block_k, split_k)
FLOAT_CASES = [
    _case("float", 37, 1024),  # heuristic, N tail
    _case("float", 40, 1536, dtype="float32", cfg=[4, 2, 512, 2]),  # split-K 2, exact-ish fp32
    _case("float", 19, 1000, dtype="float16", cfg=[8, 1, 256, 1], lead=(1, 1)),  # K tail
    _case("float", 16, 3072, cfg=[2, 4, 1024, 3]),  # split-K 3
]


def _run_interpreter(cases):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(_INTERP_SCRIPT), json.dumps(cases)],
                       env=env, capture_output=True, text=True, timeout=600)
    results = [json.loads(line[len("RESULT "):]) for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert r.returncode == 0 and len(results) == len(cases), (r.stdout[-3000:], r.stderr[-5000:])
    return results


def _assert_results(results):
    bad = []
    for res in results:
        c = res["case"]
        ok = (res["finite"] and res["all_close"] and res["shape_ok"] and res["dtype_ok"]
              and res["rel"] < c["tol"] and res["poisoned_out_used"])
        if not ok:
            bad.append(res)
    assert not bad, json.dumps(bad, indent=1)


@needs_triton
def test_int8_kernel_interpreter():
    _assert_results(_run_interpreter(INT8_CASES))


@needs_triton
def test_row_matmul_interpreter():
    _assert_results(_run_interpreter(ROWS_CASES))


@needs_triton
def test_int4_row_matmul_magic_interpreter():
    _assert_results(_run_interpreter(MAGIC_CASES))


@needs_triton
def test_dequantize_kernels_interpreter():
    _assert_results(_run_interpreter(DEQUANT_CASES))


@needs_triton
def test_int4_kernel_interpreter():
    _assert_results(_run_interpreter(INT4_CASES))


@needs_triton
def test_float_gemv_kernel_interpreter():
    """The opt-in unquantized GEMV (kernels/gemv_float.py)."""
    _assert_results(_run_interpreter(FLOAT_CASES))


def test_int4_kernel_choice_is_validated(monkeypatch):
    from blitzgen.kernels import gemv

    gemv.int4_kernel_choice.cache_clear()
    try:
        monkeypatch.setenv("BLITZGEN_INT4_GEMV", "fast")
        with pytest.raises(ValueError, match="BLITZGEN_INT4_GEMV"):
            gemv.int4_kernel_choice()
        from blitzgen.errors import BlitzgenError
        from blitzgen.runtime import RuntimeOptions

        with pytest.raises(BlitzgenError, match="BLITZGEN_INT4_GEMV"):  # a one-line error before loading
            RuntimeOptions.from_env()
        gemv.int4_kernel_choice.cache_clear()
        monkeypatch.setenv("BLITZGEN_INT4_GEMV", "H2P")
        assert gemv.int4_kernel_choice() == "h2p"
    finally:
        gemv.int4_kernel_choice.cache_clear()


def test_int4_prefill_choice_is_validated(monkeypatch):
    from blitzgen.errors import BlitzgenError
    from blitzgen.quant.int4 import prefill_choice
    from blitzgen.runtime import RuntimeOptions

    monkeypatch.delenv("BLITZGEN_INT4_PREFILL", raising=False)
    assert prefill_choice() == "triton"
    monkeypatch.setenv("BLITZGEN_INT4_PREFILL", "TinyGEMM")
    assert prefill_choice() == "tinygemm" and RuntimeOptions.from_env().int4_prefill == "tinygemm"
    monkeypatch.setenv("BLITZGEN_INT4_PREFILL", "marlin")
    with pytest.raises(BlitzgenError, match="BLITZGEN_INT4_PREFILL"):  # a one-line error before loading
        RuntimeOptions.from_env()


def test_int4_row_decode_choice_is_validated(monkeypatch):
    from blitzgen.errors import BlitzgenError
    from blitzgen.kernels import mm_rows
    from blitzgen.runtime import RuntimeOptions

    monkeypatch.delenv("BLITZGEN_INT4_ROWS", raising=False)
    assert mm_rows.int4_decode() == "convert"
    try:
        monkeypatch.setenv("BLITZGEN_INT4_ROWS", "Words")
        mm_rows.choose_config.cache_clear()
        assert RuntimeOptions.from_env().int4_rows == "words"
        assert mm_rows.choose_config(4096, 4096, 132, 32, rows=5).decode == "words"
        assert mm_rows.choose_config(4096, 4096, 132, None, rows=5).decode == "convert"  # int8 has one
        monkeypatch.setenv("BLITZGEN_INT4_ROWS", "marlin")
        with pytest.raises(BlitzgenError, match="BLITZGEN_INT4_ROWS"):
            RuntimeOptions.from_env()
    finally:
        mm_rows.choose_config.cache_clear()


def test_configs_follow_the_int4_kernel_that_runs(monkeypatch):
    """Each int4 kernel has its own measured table; the packed one is the default only where its
    inline PTX runs (never on a CPU-only host or under the interpreter)."""
    from blitzgen.kernels import gemv_configs as C

    h2 = C.choose_config("int4", 4096, 11008, 32, 132, kernel="h2")
    fp32 = C.choose_config("int4", 4096, 11008, 32, 132, kernel="fp32")
    assert tuple(h2) == C._MEASURED_H200_H2["4096:11008"]
    assert tuple(fp32) == C._MEASURED_H200["int4:4096:11008:32"] and fp32 != h2
    assert C.choose_config("int4", 4096, 11008, 32, 100, kernel="h2") == \
        C.choose_config("int4", 4096, 11008, 32, 100, kernel="fp32")  # another card: the heuristic
    monkeypatch.delenv("BLITZGEN_INT4_GEMV", raising=False)
    C.int4_kernel_choice.cache_clear()
    try:
        if not torch.cuda.is_available():
            assert not C._packed_int4_runs_here() and C.int4_kernel_choice() == "fp32"
    finally:
        C.int4_kernel_choice.cache_clear()


def test_kernel_settings_given_in_python_take_effect(monkeypatch):
    """RuntimeOptions built in Python (not from the environment) still reach the kernels, which read
    process-wide settings from the environment: loading exports them."""
    import blitzgen.kernels as kernels
    from blitzgen.errors import BlitzgenError
    from blitzgen.loading import load_random
    from blitzgen.quant import Int4Linear
    from blitzgen.quant.int4 import prefill_choice
    from blitzgen.runtime import RuntimeOptions

    for var in ("BLITZGEN_INT4_PREFILL", "BLITZGEN_INT4_GEMV", "BLITZGEN_INT4_ROWS", "BLITZGEN_KERNELS",
                "BLITZGEN_GEMV_CONFIGS"):
        monkeypatch.setenv(var, "")  # empty reads as unset; monkeypatch removes what loading exports
    saved = (kernels._AVAILABLE, kernels._REASON)
    try:
        kernels._AVAILABLE, kernels._REASON = True, None  # as on a CUDA host, before the load
        opts = RuntimeOptions(device="cpu", dtype="float32", quantize="int4", group_size=32,
                              int4_prefill="tinygemm", int4_gemv="fp32", kernels=False).validate()
        m = load_random("tiny", opts).model
        assert prefill_choice() == "tinygemm" and os.environ["BLITZGEN_INT4_GEMV"] == "fp32"
        assert not kernels.available() and "RuntimeOptions.kernels=False" in kernels.unavailable_reason()
        assert any(isinstance(x, Int4Linear) for x in m.modules())
        with pytest.raises(BlitzgenError, match="BLITZGEN_INT4_PREFILL"):  # validated before it is exported
            RuntimeOptions(int4_prefill="marlin").apply_kernel_settings()
    finally:
        kernels._AVAILABLE, kernels._REASON = saved
        configs = sys.modules.get("blitzgen.kernels.gemv_configs")
        if configs is not None:
            configs.int4_kernel_choice.cache_clear()
