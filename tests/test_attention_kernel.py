"""The split-K decode-attention Triton kernel (kernels/attention.py) against a float64 reference.

No GPU here: the kernel runs under Triton's interpreter in a subprocess (TRITON_INTERPRET must be
set before Triton is imported), and is compiled for sm_90 with Triton's bundled ptxas to check
the code it would run on an H100 (vectorized cache loads, tensor-core dots, no spills).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")
triton = pytest.importorskip("triton")

_SCRIPT = r"""
import json, math, sys
import torch
from blitzgen.kernels.attention import decode_attention_raw, plan

def reference(q, k, v, mask):
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return s.masked_fill(~mask.view(1, 1, 1, -1), -float("inf")).softmax(-1) @ v.double()

out = []
for case in json.loads(sys.argv[1]):
    torch.manual_seed(case["seed"])
    hkv, g, S, D, dt = case["hkv"], case["g"], case["S"], case["D"], getattr(torch, case["dtype"])
    q = torch.randn(1, hkv, g, D).to(dt)
    k, v = torch.randn(1, hkv, S, D).to(dt), torch.randn(1, hkv, S, D).to(dt)
    mask = torch.zeros(S, dtype=torch.bool)
    for a, b in case["ranges"]:
        mask[a:b] = True
    k[:, :, ~mask] = 1e4          # hidden positions must not matter
    v[:, :, ~mask] = float("nan")
    pos = None
    if "pos" in case:  # the query's position: keys past it are never visited, even where the
        pos = torch.tensor([case["pos"]])  # mask (wrongly) lets them through
        late = torch.zeros(S, dtype=torch.bool)
        late[case["pos"] + 1:] = True
        k[:, :, late] = 1e4
        v[:, :, late] = float("nan")
        y = decode_attention_raw(q, k, v, (mask | late).view(1, 1, 1, S), pos, **case.get("kw", {}))
    else:
        y = decode_attention_raw(q, k, v, mask.view(1, 1, 1, S), **case.get("kw", {}))
    r = reference(q, k.masked_fill(~mask.view(1, 1, S, 1), 0), v.masked_fill(~mask.view(1, 1, S, 1), 0), mask)
    rel = ((y.double() - r).norm() / r.norm()).item()
    out.append({"case": case, "rel": rel, "finite": bool(torch.isfinite(y).all()), "shape": list(y.shape),
                "dtype": str(y.dtype), "splits": plan(hkv, S, q.device, **{k: v for k, v in case.get("kw", {}).items()
                                                          if k in ("programs_per_sm", "block_n")})[1]})
print("RESULTS " + json.dumps(out))
"""

CASES = [  # GQA groups 1, 3, 4, 8; caches that are and are not multiples of the 64-key block; masks
    dict(hkv=2, g=4, S=300, D=64, dtype="bfloat16", ranges=[[0, 211]], tol=1e-2, seed=0),
    dict(hkv=3, g=1, S=130, D=64, dtype="float32", ranges=[[0, 130]], tol=1e-5, seed=1),
    dict(hkv=1, g=3, S=64, D=32, dtype="bfloat16", ranges=[[0, 1]], tol=1e-2, seed=2),
    dict(hkv=2, g=8, S=257, D=128, dtype="float16", ranges=[[0, 100]], tol=2e-3, seed=3),
    dict(hkv=1, g=4, S=512, D=64, dtype="float32", ranges=[[200, 260], [300, 301]], tol=1e-5, seed=4),
    # a large static cache filled to its query's position (what a compiled server decodes)
    dict(hkv=2, g=4, S=1024, D=64, dtype="bfloat16", ranges=[[0, 150]], pos=149, tol=1e-2, seed=5),
    dict(hkv=4, g=1, S=700, D=32, dtype="float32", ranges=[[0, 64]], pos=63, tol=1e-5, seed=6),
    # the sweep's variants: loads bounded by the position only (masked rows inside it hold NaN V),
    # and the slices merged by a Triton kernel
    dict(hkv=2, g=4, S=1024, D=64, dtype="bfloat16", ranges=[[0, 90], [100, 150]], pos=149, tol=1e-2, seed=7,
         kw=dict(pos_loads=True, merge="triton")),
    dict(hkv=1, g=3, S=300, D=32, dtype="float32", ranges=[[5, 211]], pos=250, tol=1e-5, seed=8,
         kw=dict(pos_loads=True)),
    dict(hkv=2, g=8, S=257, D=128, dtype="float16", ranges=[[0, 100]], tol=2e-3, seed=9, kw=dict(merge="triton")),
    dict(hkv=2, g=4, S=300, D=64, dtype="float32", ranges=[[0, 211]], pos=210, tol=1e-5, seed=10,
         kw=dict(pos_loads=True, merge="triton", programs_per_sm=0)),  # one slice: no merge launch
    dict(hkv=1, g=1, S=2048, D=32, dtype="float32", ranges=[[0, 700]], pos=699, tol=1e-5, seed=11,
         kw=dict(merge="triton", programs_per_sm=64)),  # many slices, most past the position
    dict(hkv=3, g=1, S=300, D=64, dtype="float32", ranges=[[0, 280]], pos=279, tol=1e-5, seed=12,
         kw=dict(elementwise=True, pos_loads=True, merge="triton")),  # one query row on the CUDA cores
    dict(hkv=2, g=2, S=130, D=32, dtype="bfloat16", ranges=[[3, 130]], tol=1e-2, seed=13, kw=dict(elementwise=True)),
    # the position at the last key of a slice (64-key slices): the next slice is dead
    dict(hkv=1, g=4, S=2048, D=32, dtype="float32", ranges=[[0, 256]], pos=255, tol=1e-5, seed=14,
         kw=dict(merge="triton", programs_per_sm=32 * 132)),
]


def test_kernel_matches_float64_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(_SCRIPT), json.dumps(CASES)], env=env,
                       capture_output=True, text=True, timeout=600)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert r.returncode == 0 and lines, (r.stdout[-2000:], r.stderr[-4000:])
    results = json.loads(lines[0][len("RESULTS "):])
    bad = [x for x in results if not (x["finite"] and x["rel"] < x["case"]["tol"]
                                      and x["shape"] == [1, x["case"]["hkv"], x["case"]["g"], x["case"]["D"]]
                                      and x["dtype"] == "torch." + x["case"]["dtype"])]
    assert not bad, json.dumps(bad, indent=1)
    assert max(x["splits"] for x in results) > 1  # the merge of slices is exercised


def test_plan_fills_the_card_in_whole_blocks():
    import torch

    from blitzgen.kernels.attention import BLOCK_N, plan

    for heads, S in ((8, 4256), (32, 2000), (8, 205), (64, 131072), (1, 1)):
        split_len, splits = plan(heads, S, torch.device("cpu"))
        assert split_len % BLOCK_N == 0 and (splits - 1) * split_len < S <= splits * split_len


def test_op_has_a_fake_impl():
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from blitzgen.kernels import attention

    if attention._op is None:
        pytest.skip("Triton's interpreter is on in this process")
    if not torch.backends.cuda.is_built():  # fake CUDA pointwise ops need a CUDA build of torch
        pytest.skip("this torch is built without CUDA")
    with FakeTensorMode():
        q = torch.empty(1, 8, 4, 128, dtype=torch.bfloat16, device="cuda")
        kv = torch.empty(1, 8, 4256, 128, dtype=torch.bfloat16, device="cuda")
        m = torch.empty(1, 1, 1, 4256, dtype=torch.bool, device="cuda")
        y = torch.ops.blitzgen.decode_attention(q, kv, kv, m)
        assert y.shape == (1, 8, 4, 128) and y.dtype == torch.bfloat16


def _stack_bytes(cubin: bytes) -> int | None:
    """Local-memory (spill) bytes per thread from the cubin (ptxas adds spills after the PTX), or
    None when Triton's bundled cuobjdump is not there."""
    import re
    import tempfile

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.is_file():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"STACK:(\d+)", out)
    return int(m.group(1)) if m else None


@pytest.mark.parametrize("pos_loads,one_split", [(False, False), (True, False), (True, True)])
def test_sm90_codegen(pos_loads, one_split):
    """For an H100: the K/V tiles load 16 bytes at a time, the dots run on tensor cores (tf32), and
    nothing spills to local memory; likewise with loads bounded by the position, one slice written
    straight to the output."""
    from blitzgen.kernels import attention as A

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        pytest.skip(f"cannot drive triton.compile here: {e}")
    sig = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "MASK": "*i1", "POS": "*i64", "OUT": "*fp32",
           "MAX": "*fp32", "SUM": "*fp32", "Y": "*bf16"}
    sig.update({f"stride_{t}{d}": "i32" for t in "qkv" for d in ("b", "h", "gs"[t != "q"])})
    sig.update({"G": "i32", "S": "i32", "HKV": "i32", "scale": "fp32"})
    ce = {"SPLIT_LEN": 320, "BLOCK_N": A.BLOCK_N, "BLOCK_G": 16, "D": 128, "PRECISION": "tf32", "HAS_POS": True,
          "POS_LOADS": pos_loads, "ONE_SPLIT": one_split, "SKIP_DEAD": pos_loads}
    n_ptr_and_strides = 18  # what a real launch marks divisible by 16 (pointers, strides of D=128 rows)
    sig.update({k: "constexpr" for k in ce})
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(n_ptr_and_strides)}
    try:
        c = triton.compile(ASTSource(fn=A._split_kernel, signature=sig, constexprs=ce, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
    except (ImportError, AttributeError, TypeError) as e:  # compiler API of another Triton version
        pytest.skip(f"cannot drive triton.compile here: {e}")
    ptx = c.asm["ptx"]
    assert ptx.count("ld.global.v4") >= 2  # K and V tiles
    assert "mma" in ptx and "tf32" in ptx
    assert "ld.local" not in ptx and "st.local" not in ptx and _stack_bytes(c.asm["cubin"]) in (0, None)


def test_merge_kernel_sm90_codegen():
    from blitzgen.kernels import attention as A

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        pytest.skip(f"cannot drive triton.compile here: {e}")
    sig = {"OUT": "*fp32", "MAX": "*fp32", "SUM": "*fp32", "Y": "*bf16", "POS": "*i64", "n_splits": "i32",
           "split_len": "i32", "S": "i32", "G": "i32", "D": "constexpr", "BLOCK_S": "constexpr", "HAS_POS": "constexpr"}
    c = triton.compile(ASTSource(fn=A._merge_kernel, signature=sig,
                                 constexprs={"D": 128, "BLOCK_S": 32, "HAS_POS": True},
                                 attrs={(i,): [["tt.divisibility", 16]] for i in range(5)}),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptx = c.asm["ptx"]
    assert "ld.local" not in ptx and "st.local" not in ptx and "ex2" in ptx
    assert _stack_bytes(c.asm["cubin"]) in (0, None)


def test_model_dispatches_to_the_kernel(monkeypatch):
    """decode_attention(impl="triton") hands the grouped queries to the kernel (on CUDA; here the
    device check and the kernel are stand-ins) and reshapes its answer back. The stand-in is SDPA,
    so the value check proves the plumbing only; the kernel's numbers are checked above."""
    import torch

    import blitzgen.kernels.attention as A
    import blitzgen.attention as M

    calls = []

    def fake_kernel(qg, k, v, mask, pos=None):
        calls.append((tuple(qg.shape), qg.is_contiguous(), tuple(k.shape), tuple(mask.shape)))
        return torch.nn.functional.scaled_dot_product_attention(qg, k, v, attn_mask=mask)

    monkeypatch.setattr(A, "decode_attention", fake_kernel)
    monkeypatch.setattr(M, "_triton_attention_ok", lambda q, d: True)
    q = torch.randn(1, 1, 8, 64).transpose(1, 2)  # [B, H, 1, D], not contiguous, as in the model
    k, v = torch.randn(1, 2, 40, 64), torch.randn(1, 2, 40, 64)
    mask = (torch.arange(40) < 30).view(1, 1, 1, 40)
    y = M.decode_attention(q, k, v, mask, "triton")
    assert calls == [((1, 2, 4, 64), True, (1, 2, 40, 64), (1, 1, 1, 40))]
    torch.testing.assert_close(y, M.decode_attention(q, k, v, mask, "sdpa"))


def test_auto_takes_the_kernel_for_grouped_heads_with_a_position(monkeypatch):
    """"auto" hands grouped heads to the kernel, with the query's position, where the kernels are
    available; ungrouped heads, no position, or no kernels keep the plain paths."""
    import torch

    import blitzgen.attention as M
    import blitzgen.kernels as kernels_pkg
    import blitzgen.kernels.attention as A

    calls = []

    def fake_kernel(qg, k, v, mask, pos=None):
        calls.append(None if pos is None else int(pos[0]))
        return torch.nn.functional.scaled_dot_product_attention(qg, k, v, attn_mask=mask)

    monkeypatch.setattr(A, "decode_attention", fake_kernel)
    monkeypatch.setattr(M, "_triton_attention_ok", lambda q, d: True)
    monkeypatch.setattr(kernels_pkg, "available", lambda: True)
    mask = (torch.arange(40) < 30).view(1, 1, 1, 40)
    pos = torch.tensor([29])
    grouped = torch.randn(1, 8, 1, 64), torch.randn(1, 2, 40, 64), torch.randn(1, 2, 40, 64)
    plain = torch.randn(1, 2, 1, 64), torch.randn(1, 2, 40, 64), torch.randn(1, 2, 40, 64)
    y = M.decode_attention(*grouped, mask, "auto", input_pos=pos)
    assert calls == [29]
    torch.testing.assert_close(y, M.decode_attention(*grouped, mask, "split"))
    M.decode_attention(*plain, mask, "auto", input_pos=pos)  # G == 1: SDPA
    M.decode_attention(*grouped, mask, "auto")  # no position: split
    monkeypatch.setattr(kernels_pkg, "available", lambda: False)
    M.decode_attention(*grouped, mask, "auto", input_pos=pos)  # kernels off: split
    assert calls == [29]
