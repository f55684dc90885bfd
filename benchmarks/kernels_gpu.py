"""Batch-1 GEMV kernels on the GPU: correctness, timing against the baselines, and a config sweep.

    python benchmarks/kernels_gpu.py --out /tmp/kernels_gpu.json          # ~2-3 min on an H100
    python benchmarks/kernels_gpu.py --sweep none --out r.json            # no config sweep (~1 min)
    python benchmarks/kernels_gpu.py --shapes 4096x12288,11008x4096       # K x N subset

For each Llama-7B/8B matrix (K x N) it checks blitzgen's int8 and int4 (g32/g64/g128) kernels
against the float32 references (fresh random inputs, NaN-poisoned outputs, through the custom op
and the raw launcher), then times them inside a CUDA graph (as the decode engine runs them) that
calls the kernel on several weight copies in turn (>= 256 MB of weights in all, so L2 (50-60 MB)
never holds the next copy; the activation stays in L2, as in decode). Median over graph replays of
the time per call, next to:

* ``bf16``       : F.linear(x, w_bf16) (cuBLAS); ``bf16-triton``: the opt-in kernels/gemv_float.py;
* ``int8-gptfast``: torch.compile(F.linear(x, w.to(bf16)) * s) (gpt-fast's WeightOnlyInt8Linear);
* ``int4-tinygemm``: aten._weight_int4pack_mm (gpt-fast's int4; torch >= 2.5 packing, even k in the
  high nibble, inner_k_tiles=8, scales_and_zeros [K/g, N, 2]).

GB/s counts the bytes of weights + scales (+ zeros) read; "%copy" is against the device-to-device
copy bandwidth measured at the start (bytes read + written / time). Then it sweeps
``gemv.candidate_configs`` per shape within the time budget and reports the best config per shape
("best_configs" in the JSON is the format of BLITZGEN_GEMV_CONFIGS). One failure never stops the
rest; the JSON is rewritten after every stage.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES = [  # (K, N, name)
    (4096, 12288, "qkv (llama-2-7b / fused)"),
    (4096, 4096, "wo"),
    (4096, 22016, "w13 llama-2-7b"),
    (11008, 4096, "w2 llama-2-7b"),
    (4096, 28672, "w13 llama-3-8b"),
    (14336, 4096, "w2 llama-3-8b"),
    (4096, 32000, "output llama-2"),
    (4096, 128256, "output llama-3"),
]
GROUPS = (32, 64, 128)
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def rel_err(y, r):
    y, r = y.float().reshape(-1), r.float().reshape(-1)
    if not torch.isfinite(y).all():
        return float("inf")
    return ((y - r).norm() / r.norm().clamp_min(1e-30)).item()


def n_copies(nbytes, total=256 << 20):
    return max(1, min(64, math.ceil(total / max(nbytes, 1))))


def graph_us(call, copies, reps=5):
    """Median time per call of ``call(i)`` (i = weight copy) replayed in a CUDA graph."""
    for i in range(copies):  # warm-up / compile outside the capture
        call(i)
    torch.cuda.synchronize()
    n = copies * max(1, math.ceil(24 / copies))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call(0)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for j in range(n):
            call(j % copies)
    times = []
    for _ in range(reps + 1):
        st = torch.cuda.Event(enable_timing=True)
        en = torch.cuda.Event(enable_timing=True)
        st.record()
        g.replay()
        en.record()
        en.synchronize()
        times.append(st.elapsed_time(en) * 1e3 / n)
    del g
    times = sorted(times[1:])
    return times[len(times) // 2]


def bench_us(fn, budget_ms=100):
    """do_bench median (flushes L2 before each call); used only for the copy bandwidth."""
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=max(5, budget_ms // 6), rep=budget_ms, return_mode="median") * 1e3


def copy_bandwidth_gbps():
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    a.random_(0, 255)
    us = bench_us(lambda: b.copy_(a), 200)
    del a, b
    return 2 * n / (us * 1e-6) / 1e9


def make_int8(N, K, dev):
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8, device=dev)
    s = (torch.rand(N, device=dev) * 0.01 + 1e-3).to(torch.bfloat16)
    return w, s


def make_int4(N, K, g, dev):
    qw = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=dev)
    sc = (torch.rand(N, K // g, device=dev) * 0.01 + 1e-3).to(torch.bfloat16)
    z = (torch.randn(N, K // g, device=dev) * 0.01).to(torch.bfloat16)
    return qw, sc, z


class Report:
    def __init__(self, path):
        self.path = path
        self.data = {"results": [], "sweep": {}, "best_configs": {}, "heuristic_configs": {},
                     "checks": {}, "errors": []}

    def save(self):
        if self.path:
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.data, f, indent=1)
            os.replace(tmp, self.path)

    def error(self, where, e):
        msg = f"{where}: {type(e).__name__}: {e}"
        log("ERROR", msg)
        self.data["errors"].append({"where": where, "error": msg, "trace": traceback.format_exc()[-2000:]})


def row(rep, K, N, kernel, us, nbytes, err, copy_gbps, cfg=None):
    gbps = nbytes / (us * 1e-6) / 1e9 if us else None
    r = {"K": K, "N": N, "kernel": kernel, "us": us, "gbps": gbps,
         "pct_copy": 100 * gbps / copy_gbps if gbps else None, "rel_err": err, "bytes": nbytes,
         "config": cfg._asdict() if cfg is not None else None}
    rep.data["results"].append(r)
    cs = "" if cfg is None else f"  cfg={tuple(cfg)}"
    log(f"  {K:>6}x{N:<6} {kernel:<14} {us:9.2f} us {gbps:8.1f} GB/s {r['pct_copy']:6.1f}%  err={err:.2e}{cs}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="kernels_gpu.json")
    ap.add_argument("--shapes", default="", help="comma-separated KxN subset")
    ap.add_argument("--sweep", choices=["none", "quick", "full"], default="quick")
    ap.add_argument("--budget", type=float, default=170.0, help="seconds; the sweep stops past this")
    ap.add_argument("--no-baselines", action="store_true")
    args = ap.parse_args()

    rep = Report(args.out)
    if not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    import triton

    from blitzgen import kernels
    from blitzgen.kernels import gemv
    from blitzgen.kernels.reference import int4_gemv_ref, int8_gemv_ref

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    rep.data.update(device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                    triton=triton.__version__, l2_mb=getattr(props, "L2_cache_size", 0) / 2**20,
                    kernels_available=kernels.available())
    log(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}")
    if not kernels.available():
        rep.error("setup", RuntimeError("blitzgen.kernels.available() is False: the 'int8'/'int4' rows "
                                        "below time the PyTorch fallback, not the Triton kernels"))
    copy = copy_bandwidth_gbps()
    rep.data["copy_gbps"] = copy
    log(f"device-to-device copy: {copy:.0f} GB/s (read + write)")
    rep.save()

    shapes = SHAPES
    if args.shapes:
        want = {tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")}
        shapes = [s for s in SHAPES if (s[0], s[1]) in want]
    sms = props.multi_processor_count

    # ---------------------------------------------------------------- torch.compile / CUDA graphs
    try:
        K, N = 4096, 4096
        w, s = make_int8(N, K, dev)
        qw, sc, z = make_int4(N, K, 128, dev)
        x = torch.randn(1, 1, K, device=dev, dtype=torch.bfloat16)

        def f(x):
            return kernels.int8_gemv(x, w, s) * 2 + kernels.int4_gemv(x, qw, sc, z, 128)

        cf = torch.compile(f, fullgraph=True, mode="reduce-overhead")
        for _ in range(4):
            yc = cf(x)
        torch.cuda.synchronize()
        want = int8_gemv_ref(x, w, s).float() * 2 + int4_gemv_ref(x, qw, sc, z, 128).float()
        rep.data["checks"]["compile_fullgraph_cudagraphs_err"] = rel_err(yc, want)
        log(f"torch.compile(fullgraph, reduce-overhead) through both ops: err={rel_err(yc, want):.2e}")
        del w, s, qw, sc, z
    except Exception as e:
        rep.error("compile check", e)
    rep.save()

    # ---------------------------------------------------------------- correctness + main timings
    todo_sweep = []
    for K, N, name in shapes:
        log(f"== {K}x{N} ({name})")
        torch.manual_seed(K * 7 + N)
        x = torch.randn(1, 1, K, device=dev, dtype=torch.bfloat16)
        # int8
        cps = wbs = wb = None
        try:
            nbytes = N * K + 2 * N
            cps = [make_int8(N, K, dev) for _ in range(n_copies(nbytes))]
            w, s = cps[0]
            ref = int8_gemv_ref(x, w, s)
            cfg = gemv.choose_config("int8", N, K, None, sms)
            rep.data["heuristic_configs"][gemv._config_key("int8", N, K, None)] = cfg._asdict()
            poison = torch.full((N,), float("nan"), device=dev, dtype=torch.bfloat16)
            y_raw = gemv.int8_gemv_raw(x, w, s, cfg, out=poison if cfg.split_k == 1 else None)
            y_op = kernels.int8_gemv(x, w, s)
            err = max(rel_err(y_raw, ref), rel_err(y_op, ref))
            us = graph_us(lambda i: kernels.int8_gemv(x, *cps[i]), len(cps))
            row(rep, K, N, "int8", us, nbytes, err, copy, cfg)
            todo_sweep.append(("int8", K, N, None))
        except Exception as e:
            rep.error(f"int8 {K}x{N}", e)
        if not args.no_baselines and cps:
            try:
                fgf = torch.compile(lambda x, w, s: F.linear(x, w.to(x.dtype)) * s)
                yg = fgf(x, w, s)
                us = graph_us(lambda i: fgf(x, *cps[i]), len(cps))
                row(rep, K, N, "int8-gptfast", us, nbytes, rel_err(yg, ref), copy)
            except Exception as e:
                rep.error(f"gpt-fast int8 {K}x{N}", e)
            try:
                wb = w.to(torch.bfloat16) * s[:, None]
                cps = None
                torch.cuda.empty_cache()
                wbs = [wb] + [torch.randn_like(wb) for _ in range(n_copies(2 * N * K) - 1)]
                yb = F.linear(x, wbs[0])
                us = graph_us(lambda i: F.linear(x, wbs[i]), len(wbs))
                row(rep, K, N, "bf16", us, 2 * N * K, rel_err(yb, ref), copy)
                try:  # the opt-in Triton GEMV on the same bf16 weights (kernels/gemv_float.py)
                    from blitzgen.kernels import gemv_float

                    yt = gemv_float.float_gemv(x, wbs[0])
                    us = graph_us(lambda i: gemv_float.float_gemv(x, wbs[i]), len(wbs))
                    row(rep, K, N, "bf16-triton", us, 2 * N * K, rel_err(yt, ref), copy,
                        gemv_float.choose_config(N, K, sms))
                except Exception as e:
                    rep.error(f"bf16-triton {K}x{N}", e)
            except Exception as e:
                rep.error(f"bf16 {K}x{N}", e)
        cps = wbs = wb = None
        torch.cuda.empty_cache()
        rep.save()
        # int4
        for g in GROUPS:
            try:
                nbytes = N * K // 2 + 2 * 2 * N * (K // g)
                cps = [make_int4(N, K, g, dev) for _ in range(n_copies(nbytes))]
                qw, sc, z = cps[0]
                ref = int4_gemv_ref(x, qw, sc, z, g)
                cfg = gemv.choose_config("int4", N, K, g, sms)
                rep.data["heuristic_configs"][gemv._config_key("int4", N, K, g)] = cfg._asdict()
                poison = torch.full((N,), float("nan"), device=dev, dtype=torch.bfloat16)
                y_raw = gemv.int4_gemv_raw(x, qw, sc, z, g, cfg, out=poison if cfg.split_k == 1 else None)
                y_op = kernels.int4_gemv(x, qw, sc, z, g)
                err = max(rel_err(y_raw, ref), rel_err(y_op, ref))
                us = graph_us(lambda i: kernels.int4_gemv(x, *cps[i], g), len(cps))
                row(rep, K, N, f"int4-g{g}", us, nbytes, err, copy, cfg)
                todo_sweep.append(("int4", K, N, g))
                if not args.no_baselines:
                    try:
                        x2 = x.reshape(1, K)
                        tg = []
                        for qw_i, sc_i, z_i in cps:
                            q_hi = ((qw_i & 0xF) << 4) | (qw_i >> 4)  # even k in the HIGH nibble
                            packed = torch.ops.aten._convert_weight_to_int4pack(q_hi.contiguous(), 8)
                            sz = torch.stack([sc_i.t(), z_i.t()], dim=-1).contiguous()  # [K/g, N, 2]
                            tg.append((packed, sz))
                        yt = torch.ops.aten._weight_int4pack_mm(x2, tg[0][0], g, tg[0][1])
                        us = graph_us(lambda i: torch.ops.aten._weight_int4pack_mm(x2, tg[i][0], g, tg[i][1]),
                                      len(tg))
                        row(rep, K, N, f"int4-tinygemm-g{g}", us, nbytes, rel_err(yt, ref), copy)
                    except Exception as e:
                        rep.error(f"tinygemm g{g} {K}x{N}", e)
                    tg = None
            except Exception as e:
                rep.error(f"int4 g{g} {K}x{N}", e)
            cps = None
            torch.cuda.empty_cache()
            rep.save()

    # ---------------------------------------------------------------- config sweep
    if args.sweep != "none":
        log(f"== config sweep ({args.sweep}), budget {args.budget:.0f}s total")
        order = {None: 0, 128: 1, 32: 2, 64: 3}  # int8 and int4-g128 of every shape first
        todo_sweep.sort(key=lambda t: order.get(t[3], 4))
        for kind, K, N, g in todo_sweep:
            if time.time() - T0 > args.budget:
                log("budget reached: sweep stopped")
                rep.data["sweep_incomplete"] = True
                break
            key = gemv._config_key(kind, N, K, g)
            try:
                cands = gemv.candidate_configs(kind, N, K, g, sms)
                if args.sweep == "quick":
                    cands = [c for c in cands if c.wpt == cands[0].wpt and c.num_stages <= 2
                             and c.num_warps != 1]
                x = torch.randn(1, 1, K, device=dev, dtype=torch.bfloat16)
                if kind == "int8":
                    nbytes = N * K + 2 * N
                    cps = [make_int8(N, K, dev) for _ in range(n_copies(nbytes))]
                    ref = int8_gemv_ref(x, *cps[0])
                    run = lambda c, i: gemv.int8_gemv_raw(x, *cps[i], c)  # noqa: E731
                else:
                    nbytes = N * K // 2 + 4 * N * (K // g)
                    cps = [make_int4(N, K, g, dev) for _ in range(n_copies(nbytes))]
                    ref = int4_gemv_ref(x, *cps[0], g)
                    run = lambda c, i: gemv.int4_gemv_raw(x, *cps[i], g, c)  # noqa: E731
                res = []
                for c in cands:
                    try:
                        err = rel_err(run(c, 0), ref)
                        us = graph_us(lambda i: run(c, i), len(cps), reps=3)
                        res.append({"config": c._asdict(), "us": us, "gbps": nbytes / us / 1e3,
                                    "pct_copy": 100 * nbytes / us / 1e3 / copy, "rel_err": err})
                    except Exception as e:
                        rep.error(f"sweep {key} {tuple(c)}", e)
                ok = [r for r in res if r["rel_err"] < 2e-2]
                rep.data["sweep"][key] = res
                if ok:
                    best = min(ok, key=lambda r: r["us"])
                    base = res[0] if res and res[0]["config"] == cands[0]._asdict() else None
                    rep.data["best_configs"][key] = best["config"]
                    gain = f" (heuristic {base['us']:.2f} us)" if base else ""
                    log(f"  {key:<22} best {best['us']:8.2f} us {best['pct_copy']:5.1f}% "
                        f"{tuple(best['config'].values())}{gain}")
            except Exception as e:
                rep.error(f"sweep {key}", e)
            cps = None
            rep.save()
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------- summary table
    print("\nshape (KxN)      kernel              us      GB/s   %copy    rel_err  config")
    for r in rep.data["results"]:
        cfg = "" if r["config"] is None else str(tuple(r["config"].values()))
        print(f"{r['K']:>6}x{r['N']:<8} {r['kernel']:<17} {r['us']:8.2f} {r['gbps']:9.1f} "
              f"{r['pct_copy']:6.1f}%  {r['rel_err']:.1e}  {cfg}")
    print("config = (block_n, num_warps, wpt, split_k, num_stages)")
    if rep.data["errors"]:
        print(f"\n{len(rep.data['errors'])} error(s):")
        for e in rep.data["errors"]:
            print("  ", e["error"][:300])
    rep.data["elapsed_s"] = time.time() - T0
    rep.save()
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
