"""Programmatic dependent launch for the GEMVs (``BLITZGEN_GEMV_PDL``), priced on the GPU.

    python3 benchmarks/pdl_gpu.py --json $OUT/pdl.json [--modes int4,int8] [--layers 32]

A chain of Llama-2-7B's decode GEMVs over ``--layers`` layers (qkv, wo, w13, w2, each layer's own
weights, so L2 never holds the next matrix), each fed the previous one's output, captured in one
CUDA graph and replayed; us per chain for PDL 0 (off), 1 (launch early, wait first) and 2 (also
prefetch the weights into L2 before the wait). ``mixed`` puts an elementwise torch kernel (not
launched with PDL) between the GEMVs, as a model's norms and adds sit between them. The outputs
of PDL 1 and 2 are checked against PDL 0 (the same kernel arithmetic: equal bits expected).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

LAYER = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]  # qkv, wo, w13, w2


def make_layer(mode, dev, g=32):
    mats = []
    for N, K in LAYER:
        if mode == "int4":
            q = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=dev)
            s = torch.full((N, K // g), (21.25 * K) ** -0.5, device=dev)
            s = (s * (0.5 + torch.rand_like(s))).to(torch.bfloat16)
            mats.append((q, s, (0.5 * s.float()).to(torch.bfloat16)))  # (q - 7.5) * s: centred
        else:
            w = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=dev)
            mats.append((w, torch.full((N,), (5376.0 * K) ** -0.5, device=dev).to(torch.bfloat16)))
    return mats


def chain(layers, mode, x, pdl, mixed, kernel):
    from blitzgen.kernels import gemv

    for mats in layers:
        h = x
        for (N, K), m in zip(LAYER, mats):
            h = h[:K]
            if mode == "int4":
                h = gemv.int4_gemv_raw(h, *m, 32, kernel=kernel, pdl=pdl)
            else:
                h = gemv.int8_gemv_raw(h, *m, pdl=pdl)
            if mixed:
                h = h * 1.0001
        x = h
    return x


def time_graph(fn, reps):
    fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    ts = []
    for _ in range(reps + 2):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)
    return statistics.median(ts[2:]), out.clone(), min(ts[2:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="")
    ap.add_argument("--modes", default="int4,int8")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--kernel", default="h2", help="int4 kernel (fp32 has no PDL variant)")
    a = ap.parse_args()
    dev = "cuda"
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    torch.manual_seed(0)
    res = []
    for mode in a.modes.split(","):
        layers = [make_layer(mode, dev) for _ in range(a.layers)]
        nbytes = sum(t.numel() * t.element_size() for m in layers for mat in m for t in mat)
        x = torch.randn(4096, device=dev, dtype=torch.bfloat16)
        for mixed in (False, True):
            base = None
            for pdl in (0, 1, 2, 0):
                us, out, best = time_graph(lambda: chain(layers, mode, x, pdl, mixed, a.kernel), a.reps)
                if base is None:
                    base = out
                diff = (out.float() - base.float()).abs().max().item()
                r = {"mode": mode, "mixed": mixed, "pdl": pdl, "us_per_chain": round(us, 1),
                     "min_us": round(best, 1), "gemvs": 4 * a.layers,
                     "tb_per_s": round(nbytes / us / 1e6, 3), "max_abs_diff_vs_pdl0": diff,
                     "finite": bool(torch.isfinite(out).all())}
                res.append(r)
                print(json.dumps(r), flush=True)
        layers = None  # noqa: F841 (frees the weights)
        torch.cuda.empty_cache()
    if a.json:
        Path(a.json).write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                            "torch": torch.__version__, "results": res}, indent=1))


if __name__ == "__main__":
    main()
