"""The int4 GEMV kernels side by side on the GPU: gemv.py's fp32 products against
gemv_int4_h2.py's packed fp16x2 dequantize (``h2``; ``h2p`` adds a register prefetch of the next
tile), over a few configs per shape (benchmarks/kernels_gpu.py has tinygemm).

    python benchmarks/int4_gemv_gpu.py --out $OUT/int4_gemv.json [--groups 32,128] [--budget 300]

Timing as benchmarks/kernels_gpu.py: a CUDA graph calling the kernel on weight copies in turn
(>= 256 MB, so L2 never holds the next copy), median time per call; GB/s counts weight + scale +
zero bytes; % copy is against the device-to-device copy measured at the start. Each variant is
checked against the fp32 reference on fresh random inputs (norm-relative error). The per-shape
best and a Llama-2-7B / Llama-3-8B layer total (the sum over one layer's matrices, the output
head once per 32 layers) are printed and saved.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from kernels_gpu import copy_bandwidth_gbps, graph_us, make_int4, n_copies  # noqa: E402

SHAPES = [  # (N, K, name, per-token count in its model)
    (12288, 4096, "l2-7b qkv", 32), (4096, 4096, "wo", 32), (22016, 4096, "l2-7b w13", 32),
    (4096, 11008, "l2-7b w2", 32), (32000, 4096, "l2-7b head", 1),
    (6144, 4096, "l3-8b qkv", 32), (28672, 4096, "l3-8b w13", 32), (4096, 14336, "l3-8b w2", 32),
]
MODELS = {"llama-2-7b": ["l2-7b qkv", "wo", "l2-7b w13", "l2-7b w2", "l2-7b head"],
          "llama-3-8b": ["l3-8b qkv", "wo", "l3-8b w13", "l3-8b w2"]}
# (block_n, num_warps, words per lane); one warp: the packed kernel's overflow guard reduces its
# flag without the cross-warp barriers (sm_90 SASS: 1 bar.sync against 5 more at 2 warps)
CONFIGS = [(8, 2, 4), (4, 4, 4), (16, 4, 4), (8, 4, 4), (8, 1, 4), (16, 1, 4), (4, 1, 4)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="int4_gemv.json")
    ap.add_argument("--groups", default="32")
    ap.add_argument("--kernels", default="fp32,h2,h2p")
    ap.add_argument("--shapes", default="", help="names containing any of these (comma-separated)")
    ap.add_argument("--budget", type=float, default=300.0)
    a = ap.parse_args()
    from blitzgen.kernels import gemv
    from blitzgen.kernels.reference import int4_gemv_ref

    t0 = time.time()
    dev = "cuda"
    copy = copy_bandwidth_gbps()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}; copy {copy:.0f} GB/s", flush=True)
    rows, best = [], {}
    shapes = [s for s in SHAPES if not a.shapes or any(t in s[2] for t in a.shapes.split(","))]
    for g in [int(v) for v in a.groups.split(",")]:
        for N, K, name, _ in shapes:
            if time.time() - t0 > a.budget:
                print("budget spent; stopping", flush=True)
                break
            nbytes = N * K // 2 + 2 * 2 * N * (K // g)
            copies = n_copies(nbytes)
            ws = [make_int4(N, K, g, dev) for _ in range(copies)]
            x = torch.randn(K, device=dev, dtype=torch.bfloat16)
            ref = int4_gemv_ref(x.float(), *ws[0], g).float()
            sms = gemv._num_sms(torch.cuda.current_device())
            for kern in a.kernels.split(","):
                base = gemv.choose_config("int4", N, K, g, sms, kernel=kern)
                cfgs = [base] + [gemv.GemvConfig(bn, nw, wpt, 1, 1) for bn, nw, wpt in CONFIGS
                                 if (bn, nw, wpt, 1, 1) != tuple(base)]
                for cfg in cfgs:
                    try:
                        y = gemv.int4_gemv_raw(x, *ws[0], g, cfg=cfg, kernel=kern).float()
                        err = ((y - ref).norm() / ref.norm()).item()
                        us = graph_us(lambda i: gemv.int4_gemv_raw(x, *ws[i], g, cfg=cfg, kernel=kern), copies)
                    except Exception as e:  # one failure never stops the rest
                        print(f"{name} g{g} {kern} {tuple(cfg)}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                        continue
                    gbs = nbytes / (us * 1e-6) / 1e9
                    r = {"shape": name, "N": N, "K": K, "group": g, "kernel": kern, "config": tuple(cfg),
                         "us": us, "gbps": gbs, "pct_copy": 100 * gbs / copy, "rel_err": err}
                    rows.append(r)
                    print(f"{name:12s} g{g} {kern:5s} {str(tuple(cfg)):18s} {us:8.2f} us {gbs:7.0f} GB/s "
                          f"{r['pct_copy']:5.1f}% err {err:.1e}", flush=True)
                    k = (name, g, kern)
                    if k not in best or us < best[k]["us"]:
                        best[k] = r
            del ws
            torch.cuda.empty_cache()
            Path(a.out).write_text(json.dumps({"copy_gbps": copy, "rows": rows}, indent=1))
    totals = {}
    for model, names in MODELS.items():
        for g in [int(v) for v in a.groups.split(",")]:
            for kern in a.kernels.split(","):
                parts = [best.get((n, g, kern)) for n in names]
                if any(p is None for p in parts):
                    continue
                count = {s[2]: s[3] for s in SHAPES}
                us = sum(p["us"] * count[p["shape"]] for p in parts)
                totals[f"{model} g{g} {kern}"] = us
                print(f"{model} g{g} {kern}: GEMVs {us:.0f} us per token (best config per shape)", flush=True)
    Path(a.out).write_text(json.dumps({"copy_gbps": copy, "rows": rows,
                                       "best": [dict(v) for v in best.values()],
                                       "totals_us": totals}, indent=1))


if __name__ == "__main__":
    main()
