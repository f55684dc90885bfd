"""Fused decode GEMVs (kernels/fused_gemv.py) and the fused one-token block (kernels/fused_decode.py).

CPU: the references against the unfused math, the dispatchers' CPU path (= the references), and a
tiny model whose fused decode steps (bf16-free float32, int8, int4) must match its plain ones;
prefill must keep the plain path. The Triton kernels run under the interpreter in a subprocess
(TRITON_INTERPRET must be set before Triton is imported) on fresh random inputs with NaN-poisoned
outputs, and the int4 / int8 kernels are compiled for sm_90 to check their code (no GPU needed).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from blitzgen import kernels
from blitzgen.kernels import fused_decode
from blitzgen.kernels.reference import (fused_float_gemv_ref, fused_int4_gemv_ref, fused_int8_gemv_ref,
                                        int4_gemv_ref, int8_gemv_ref)
from blitzgen.model import RMSNorm

from .conftest import tiny_model

from .test_kernels import SRC, needs_triton


@pytest.fixture
def seed():
    s = random.SystemRandom().randrange(2**31)
    torch.manual_seed(s)
    return s


def _int4(N, K, g):
    qw = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
    sc = torch.rand(N, K // g) * 0.02 + 1e-3
    z = torch.randn(N, K // g) * 0.02
    return qw, sc, z


# ------------------------------------------------------------------ references (no Triton)


@pytest.mark.parametrize("swiglu", [False, True])
def test_references_are_the_unfused_math(seed, swiglu):
    """norm -> GEMV -> SwiGLU / + residual, spelled out with the model's RMSNorm and F.silu."""
    K, N = 96, 24
    x = torch.randn(1, 1, K, dtype=torch.float64)
    norm = RMSNorm(K, 1e-5).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    res = None if swiglu else torch.randn(1, 1, N, dtype=torch.float64)
    n_rows = 2 * N if swiglu else N

    def close(got, want, what):  # the references compute in float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()),
                                   msg=f"{what} seed={seed}")

    def finish(y):
        if swiglu:
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        return y if res is None else y + res

    a = norm(x).detach()
    w8, s8 = torch.randint(-128, 128, (n_rows, K), dtype=torch.int8), torch.rand(n_rows, dtype=torch.float64)
    want = finish(a @ (w8.double() * s8[:, None]).t())
    got = fused_int8_gemv_ref(x, w8, s8, norm.weight.detach(), 1e-5, res, swiglu)
    close(got, want, "int8")

    qw, sc, z = _int4(n_rows, K, 32)
    want = finish(int4_gemv_ref(a, qw, sc, z, 32).double())
    got = fused_int4_gemv_ref(x, qw, sc, z, 32, norm.weight.detach(), 1e-5, res, swiglu)
    close(got, want, "int4")

    w = torch.randn(n_rows, K, dtype=torch.float64)
    want = finish(a @ w.t())
    got = fused_float_gemv_ref(x, w, norm.weight.detach(), 1e-5, res, swiglu)
    close(got, want, "float")


def test_cpu_dispatch_is_the_reference(seed):
    """On CPU tensors blitzgen.kernels.fused_* compute the references (no fallback report)."""
    K, N = 64, 16
    x, g, r = torch.randn(1, K), torch.rand(K) + 0.5, torch.randn(1, N)
    w8, s8 = torch.randint(-128, 128, (N, K), dtype=torch.int8), torch.rand(N)
    assert torch.equal(kernels.fused_int8_gemv(x, w8, s8, g, 1e-6, r),
                       fused_int8_gemv_ref(x, w8, s8, g, 1e-6, r))
    qw, sc, z = _int4(2 * N, K, 32)
    assert torch.equal(kernels.fused_int4_gemv(x, qw, sc, z, 32, g, 1e-6, None, True),
                       fused_int4_gemv_ref(x, qw, sc, z, 32, g, 1e-6, None, True))
    w = torch.randn(N, K)
    assert torch.equal(kernels.fused_float_gemv(x, w, None, 1e-5, r), fused_float_gemv_ref(x, w, None, 1e-5, r))
    assert int8_gemv_ref(x, w8, s8).shape == kernels.fused_int8_gemv(x, w8, s8).shape == (1, N)


# ------------------------------------------------------------------ the fused block on a tiny model


def _model(scheme, seed, **overrides):
    model = tiny_model(seed=seed % 1000, **overrides)
    with torch.no_grad():  # norms that are not all ones, so a missing norm weight shows
        for layer in model.layers:
            layer.attention_norm.weight.uniform_(0.5, 1.5)
            layer.ffn_norm.weight.uniform_(0.5, 1.5)
    if scheme:
        from blitzgen.quant import make_config, quantize_model

        quantize_model(model, make_config(scheme, 32 if scheme == "int4" else None))
    return model


@pytest.mark.parametrize("scheme,bias", [(None, False), ("int8", False), ("int4", False), (None, True),
                                         ("int4", True)],
                         ids=["float32", "int8", "int4", "float32-qkv-bias", "int4-qkv-bias"])
@torch.inference_mode()
def test_fused_decode_matches_the_plain_block(scheme, bias, seed):
    """Prefill plain, then each decode step twice at the same position, plain then fused: same
    logits (float32 math; the fused ops skip the intermediate roundings only). qkv bias (Qwen):
    added after the fused norm + GEMV."""
    model = _model(scheme, seed, qkv_bias=bias)
    assert (model.layers[0].attention.wqkv.bias is not None) == bias
    ids = torch.randint(0, model.args.vocab_size, (1, 7))
    model(ids, torch.arange(7))
    tok = ids[:, -1:]
    for pos in range(7, 11):
        p = torch.tensor([pos])
        fused_decode.enable(model, False)
        plain = model(tok, p)
        assert fused_decode.enable(model, True)
        fused = model(tok, p)
        assert torch.isfinite(fused).all()
        torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4, msg=f"{scheme} pos={pos} seed={seed}")
        tok = plain[:, -1:].argmax(-1)
    fused_decode.enable(model, False)
    assert all(layer.fused_decode is None for layer in model.layers)


@torch.inference_mode()
def test_prefill_and_unfusable_layers_keep_the_plain_path(monkeypatch, seed):
    model = _model("int8", seed)
    fused_decode.enable(model, True)
    calls = []
    real = fused_decode.fused_linear
    monkeypatch.setattr(fused_decode, "fused_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    model(torch.randint(0, 512, (1, 5)), torch.arange(5))
    assert calls == []  # several tokens: the plain block
    model(torch.tensor([[3]]), torch.tensor([5]))
    assert len(calls) == 4 * len(model.layers)

    # a layer of another type (e.g. tensor parallelism's RowParallel) runs unfused, the rest fused
    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    ref = model(torch.tensor([[3]]), torch.tensor([6]))
    for layer in model.layers:
        layer.attention.wo = Wrapped(layer.attention.wo)
        layer.feed_forward.w2 = Wrapped(layer.feed_forward.w2)
    got = model(torch.tensor([[3]]), torch.tensor([6]))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_runtime_option_and_generator_wiring(monkeypatch):
    from blitzgen.generate import Generator
    from blitzgen.runtime import RuntimeOptions

    monkeypatch.setenv("BLITZGEN_FUSED", "1")
    opts = RuntimeOptions.from_env(device="cpu", compile=False)
    assert opts.fused_decode is True
    monkeypatch.delenv("BLITZGEN_FUSED")
    assert RuntimeOptions.from_env().fused_decode is None
    auto = RuntimeOptions()  # default: CUDA, unquantized only (measured; BENCHMARKS.md)
    assert auto.fused_for("cuda", quantized=False) and not auto.fused_for("cuda", quantized=True)
    assert not auto.fused_for("cpu", quantized=False)
    monkeypatch.setenv("BLITZGEN_FUSED", "0")
    assert not RuntimeOptions.from_env().fused_for("cuda", quantized=False)
    assert RuntimeOptions(fused_decode=True).fused_for("cuda", quantized=True)
    model = tiny_model()
    fused_decode.enable(model, True)
    Generator(model, options=opts)  # CUDA only: on CPU the option leaves (turns) it off
    assert all(layer.fused_decode is None for layer in model.layers)


# ------------------------------------------------------------------ fake impls (torch.compile)


@needs_triton
def test_fused_ops_have_fake_impls():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from blitzgen.kernels import fused_gemv  # noqa: F401  (registers torch.ops.blitzgen.fused_*)

    bf = torch.bfloat16
    with FakeTensorMode():
        x = torch.empty(1, 1, 4096, dtype=bf, device="cuda")
        g = torch.empty(4096, dtype=bf, device="cuda")
        w = torch.empty(22016, 4096, dtype=torch.int8, device="cuda")
        s = torch.empty(22016, dtype=bf, device="cuda")
        y = torch.ops.blitzgen.fused_int8_gemv(x, w, s, g, 1e-5, None, True)
        assert y.shape == (1, 1, 11008) and y.dtype == bf
        qw = torch.empty(4096, 2048, dtype=torch.uint8, device="cuda")
        sc = torch.empty(4096, 128, dtype=bf, device="cuda")
        y4 = torch.ops.blitzgen.fused_int4_gemv(x, qw, sc, sc, 32, None, 1e-5, x, False)
        assert y4.shape == (1, 1, 4096) and y4.dtype == bf
        wf = torch.empty(12288, 4096, dtype=bf, device="cuda")
        yf = torch.ops.blitzgen.fused_float_gemv(x, wf, g, 1e-6, None, False)
        assert yf.shape == (1, 1, 12288)


# ------------------------------------------------------------------ kernels under the interpreter

_SCRIPT = r"""
import json, sys
import torch
from blitzgen.kernels.gemv import GemvConfig
from blitzgen.kernels.gemv_float import FloatGemvConfig
from blitzgen.kernels import fused_gemv as fg
from blitzgen.kernels import reference as R

out = []
for c in json.loads(sys.argv[1]):
    torch.manual_seed(c["seed"])
    kind, N, K, dt = c["kind"], c["N"], c["K"], getattr(torch, c["dtype"])
    rows = 2 * N if c["swiglu"] else N
    x = torch.randn(1, 1, K).to(dt)
    g = (torch.rand(K) + 0.5).to(dt) if c["norm"] else None
    r = torch.randn(1, 1, N).to(dt) if c["res"] else None
    kw = dict(norm_weight=g, eps=1e-5, residual=r, swiglu=c["swiglu"])
    cfg = c["cfg"]
    if kind == "int8":
        w = torch.randint(-128, 128, (rows, K), dtype=torch.int8)
        s = (torch.rand(rows) * 0.02 + 1e-3).to(dt)
        ref = R.fused_int8_gemv_ref(x, w, s, **kw)
        cfg = GemvConfig(*cfg) if cfg else None
        raw = lambda out: fg.fused_int8_gemv_raw(x, w, s, **kw, cfg=cfg, out=out)
    elif kind == "int4":
        q = torch.randint(0, 256, (rows, K // 2), dtype=torch.uint8)
        sc = (torch.rand(rows, K // c["g"]) * 0.02 + 1e-3).to(dt)
        z = (torch.randn(rows, K // c["g"]) * 0.02).to(dt)
        ref = R.fused_int4_gemv_ref(x, q, sc, z, c["g"], **kw)
        cfg = GemvConfig(*cfg) if cfg else None
        raw = lambda out: fg.fused_int4_gemv_raw(x, q, sc, z, c["g"], **kw, cfg=cfg, out=out)
    else:
        w = (torch.randn(rows, K) * 0.05).to(dt)
        ref = R.fused_float_gemv_ref(x, w, **kw)
        cfg = FloatGemvConfig(*cfg) if cfg else None
        raw = lambda out: fg.fused_float_gemv_raw(x, w, **kw, cfg=cfg, out=out)
    poison = torch.full((N,), float("nan"), dtype=dt)
    y = raw(poison)
    y32, r32 = y.float(), ref.float()
    rel = ((y32 - r32).norm() / r32.norm()).item()
    # elementwise: 4x the norm-wise tolerance (a SwiGLU output near zero, from a gate dot product that
    # cancels, carries the up product's rounding: float32, K 1024 once gave 6e-5 there at rel 1.6e-5)
    ok = bool(((y32 - r32).abs() <= 4 * c["tol"] * (r32.abs() + r32.abs().mean())).all())
    print("RESULT " + json.dumps({"case": c, "rel": rel, "all_close": ok, "finite": bool(torch.isfinite(y32).all()),
                                  "shape_ok": tuple(y.shape) == tuple(ref.shape), "dtype_ok": y.dtype == ref.dtype}),
          flush=True)
"""


def _c(kind, N, K, norm=1, res=0, swiglu=0, g=None, cfg=None, dtype="bfloat16"):
    # int4 in float32: the -136 * sum(x) offset of the magic-number dequantization costs some bits
    tol = {"float32": 5e-5 if kind == "int4" else 1e-5, "bfloat16": 1e-2, "float16": 2e-3}[dtype]
    return dict(kind=kind, N=N, K=K, norm=bool(norm), res=bool(res), swiglu=bool(swiglu), g=g, cfg=cfg,
                dtype=dtype, tol=tol, seed=random.SystemRandom().randrange(2**31))


# int8 / int4 cfg: (block_n, num_warps, wpt, split_k, num_stages); float: (block_n, num_warps, block_k, split_k)
CASES = [
    _c("int8", 37, 1024, cfg=[8, 2, 4, 1, 1]),  # norm, N tail
    _c("int8", 24, 1536, norm=0, res=1, cfg=[4, 2, 2, 2, 1], dtype="float32"),  # residual, split-K 2, K tail
    _c("int8", 20, 1000, swiglu=1, dtype="float16"),  # norm + SwiGLU, wpt 2 + tail, heuristic config
    _c("int8", 19, 2048, res=1, cfg=[4, 1, 4, 4, 1], dtype="float32"),  # norm + residual, split-K 4
    _c("int8", 13, 1536, swiglu=1, cfg=[4, 2, 4, 2, 1]),  # SwiGLU through the split-K buffer
    _c("int4", 37, 1024, g=32, cfg=[8, 2, 4, 1, 1]),
    _c("int4", 40, 1536, g=64, norm=0, res=1, cfg=[4, 2, 2, 2, 1], dtype="float32"),
    _c("int4", 21, 1024, g=32, swiglu=1, cfg=[8, 2, 4, 1, 1], dtype="float32"),  # SwiGLU, odd half
    _c("int4", 16, 2560, g=128, res=1, cfg=[4, 1, 4, 2, 1]),  # norm + residual, split-K, tail
    _c("int4", 12, 512, g=16, swiglu=1),  # g 16 -> wpt 2, heuristic
    _c("float", 37, 1024),
    _c("float", 40, 1536, norm=0, res=1, cfg=[4, 2, 512, 2], dtype="float32"),
    _c("float", 19, 1000, swiglu=1, cfg=[4, 1, 256, 1], dtype="float16"),
    _c("float", 16, 3072, res=1, cfg=[2, 4, 1024, 3], dtype="float32"),  # norm + split-K 3
    _c("float", 9, 1024, swiglu=1, cfg=[2, 2, 256, 2], dtype="float32"),
]


@needs_triton
def test_fused_kernels_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(_SCRIPT), json.dumps(CASES)], env=env,
                       capture_output=True, text=True, timeout=600)
    res = [json.loads(ln[7:]) for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and len(res) == len(CASES), (r.stdout[-3000:], r.stderr[-5000:])
    bad = [x for x in res if not (x["all_close"] and x["finite"] and x["shape_ok"] and x["dtype_ok"]
                                  and x["rel"] < x["case"]["tol"])]
    assert not bad, json.dumps(bad, indent=1)


# ------------------------------------------------------------------ sm_90 code (no GPU)


def _compile(kind, flags):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from blitzgen.kernels import fused_gemv, gemv

    N, K, g = (22016, 4096, 32) if flags["SWIGLU"] else (4096, 11008, 32)
    cfg = gemv.choose_config(kind, N, K, g if kind == "int4" else None)
    ce = {"BN": cfg.block_n, "L": 32 * cfg.num_warps, "WPT": cfg.wpt, "SPLIT_K": 1,
          "HAS_TAIL": K % gemv.tile_k(kind, cfg) != 0, **flags}
    sig = {"x_ptr": "*bf16", "g_ptr": "*bf16", "r_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*bf16"}
    if kind == "int4":
        fn, ce["GS"] = fused_gemv._fused_int4_kernel, g
        sig.update({"z_ptr": "*bf16", "y_ptr": "*bf16", "N": "i32", "HALF": "i32", "K": "i32",
                    "stride_wn": "i32", "stride_sn": "i32"})
    else:
        fn = fused_gemv._fused_int8_kernel
        sig.update({"y_ptr": "*bf16", "N": "i32", "HALF": "i32", "K": "i32", "stride_wn": "i32"})
    sig.update({"tiles_per_split": "i32", "magic": "i32", "eps": "fp32"})
    # as Triton specializes them at launch for 7B shapes: pointers, sizes and strides divisible by 16
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(sig) - 2)}  # all but magic, eps
    sig.update({k: "constexpr" for k in ce})
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=ce, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps})


@needs_triton
@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("flags", [dict(NORM=True, RES=False, SWIGLU=True), dict(NORM=False, RES=True, SWIGLU=False)],
                         ids=["norm+swiglu", "residual"])
def test_fused_sm90_codegen(kind, flags):
    """As the plain GEMVs: 16-byte weight loads, no spills, no shared memory inside the K loop."""
    try:
        c = _compile(kind, flags)
    except (ImportError, AttributeError, TypeError) as e:  # compiler API of another Triton version
        pytest.skip(f"cannot drive triton.compile here: {e}")
    ptx = c.asm["ptx"]
    assert "ld.global.v4" in ptx and "ld.local" not in ptx and "st.local" not in ptx
    ttgir = c.asm["ttgir"]
    loop = ttgir[ttgir.index("scf.for"):]
    loop = loop[:loop.index("scf.yield")]
    assert "ttg.local_alloc" not in loop and "ttg.local_load" not in loop


def _signature(kind, split_k):
    out_t = "*bf16" if split_k == 1 else "*fp32"
    if kind == "float":
        return ({"x_ptr": "*bf16", "g_ptr": "*bf16", "r_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": out_t, "N": "i32",
                 "HALF": "i32", "K": "i32", "stride_wn": "i32", "tiles_per_split": "i32", "eps": "fp32"},
                dict(BN=4, BK=1024), 4)
    sig = {"x_ptr": "*bf16", "g_ptr": "*bf16", "r_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*bf16"}
    if kind == "int4":
        sig.update({"z_ptr": "*bf16", "y_ptr": out_t, "N": "i32", "HALF": "i32", "K": "i32", "stride_wn": "i32",
                    "stride_sn": "i32"})
        ce, nw = dict(BN=8, L=64, WPT=4, GS=32), 2
    else:
        sig.update({"y_ptr": out_t, "N": "i32", "HALF": "i32", "K": "i32", "stride_wn": "i32"})
        ce, nw = dict(BN=4, L=128, WPT=4), 4
    sig.update({"tiles_per_split": "i32", "magic": "i32", "eps": "fp32"})
    return sig, ce, nw


@needs_triton
@pytest.mark.slow
def test_every_fused_variant_compiles_for_sm90():
    """All flag combinations x split-K x K tail, for the three kernels: they compile, without spills."""
    import itertools

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from blitzgen.kernels import fused_gemv as fg

    fns = {"int4": fg._fused_int4_kernel, "int8": fg._fused_int8_kernel, "float": fg._fused_float_kernel}
    bad = []
    for kind, norm, res, swiglu, split, tail in itertools.product(fns, *[(False, True)] * 3, (1, 2), (False, True)):
        if res and swiglu:
            continue
        sig, ce, nw = _signature(kind, split)
        ce.update(NORM=norm, RES=res, SWIGLU=swiglu, SPLIT_K=split, HAS_TAIL=tail)
        attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(sig) - 2)}
        sig.update({k: "constexpr" for k in ce})
        try:
            c = triton.compile(ASTSource(fn=fns[kind], signature=sig, constexprs=ce, attrs=attrs),
                               target=GPUTarget("cuda", 90, 32), options={"num_warps": nw})
        except (ImportError, AttributeError, TypeError) as e:  # compiler API of another Triton version
            pytest.skip(f"cannot drive triton.compile here: {e}")
        if "ld.local" in c.asm["ptx"] or "st.local" in c.asm["ptx"]:
            bad.append((kind, ce))
    assert not bad, bad
