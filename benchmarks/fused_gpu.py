"""Fused decode (BLITZGEN_FUSED=1, kernels/fused_gemv.py + fused_decode.py) on the GPU, in one call:

    python benchmarks/fused_gpu.py --out $OUT/fused_gpu.json            # ~5-6 min on an H200
    python benchmarks/fused_gpu.py --stages bench --modes int8,bf16      # a second call for the rest

Stages (in this order; each is skipped, and said so, once the --budget seconds are spent):

1. ``check``: every fused op (bf16, int8, int4 g32) at Llama-2-7B shapes (wqkv + norm, wo + residual,
   w13 + norm + SwiGLU, w2 + residual) against its float32 reference, fresh random inputs, NaN-poisoned
   outputs (raw launcher) and through the custom op.
2. ``layers``: the GEMV part of 32 Llama-2-7B layers (attention left out: its output is a slice of
   qkv), compiled (inductor) and captured in ONE CUDA graph, median replay time per layer and kernels
   per layer (profiler), three ways: ``gemv-only`` (the 4 GEMVs, nothing else: the floor),
   ``unfused`` (what the model runs: RMSNorm, GEMV, residual add, silu * up; inductor fuses the adds
   into the norms) and ``fused`` (4 fused kernels).
3. ``profile``: a random-weight Llama-2-7B int4 g32 model, compiled decode (CUDA graphs) as
   ``blitzgen bench`` runs it, fused off then on: tokens/s over 199 decode steps in-process, and a
   torch.profiler trace of 8 decode steps: kernels per step, their total time per step by kind
   (GEMV, fused GEMV, attention, inductor's fused elementwise / norm kernels, copies, other) and the
   GPU-idle share of the step.
4. ``bench``: ``blitzgen bench --shape llama-2-7b --quantize MODE --runs 3 --json -`` with
   BLITZGEN_FUSED=0 and =1 per mode (--modes, default int4,int8,bf16), each in its own process.

The last lines printed are one table of everything measured. The JSON (--out) is rewritten after
every stage; one failure never stops the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

T0 = time.time()
DIM, INTER, QKV, LAYERS, EPS = 4096, 11008, 12288, 32, 1e-5  # Llama-2-7B
DEV, SHAPE = "cuda", "llama-2-7b"  # --device cpu: a smoke run of the plumbing at tiny sizes
TABLE: list[str] = []


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def free():
    if DEV == "cuda":
        torch.cuda.empty_cache()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


class Report:
    def __init__(self, path):
        self.path, self.data = path, {"errors": [], "skipped": []}

    def save(self):
        if self.path:
            Path(self.path).write_text(json.dumps(self.data, indent=1, default=str))

    def error(self, where, e):
        log(f"ERROR in {where}: {type(e).__name__}: {e}")
        self.data["errors"].append({"where": where, "error": f"{type(e).__name__}: {e}",
                                    "trace": traceback.format_exc()[-3000:]})
        TABLE.append(f"{where}: ERROR {type(e).__name__}: {str(e)[:100]}")
        self.save()


# ------------------------------------------------------------------------------------------- weights


def make_weights(kind: str, n: int, k: int, dev=None):
    """Random weights of one [n, k] layer: bf16 (w,), int8 (w, s) or int4 g32 (qw, s, z, 32)."""
    dev = dev or DEV
    if kind == "bf16":
        return ((torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16),)
    if kind == "int8":
        return (torch.randint(-128, 128, (n, k), dtype=torch.int8, device=dev),
                (torch.rand(n, device=dev) * 0.002 + 1e-4).to(torch.bfloat16))
    return (torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev),
            (torch.rand(n, k // 32, device=dev) * 0.002 + 1e-4).to(torch.bfloat16),
            (torch.randn(n, k // 32, device=dev) * 0.002).to(torch.bfloat16), 32)


def plain(kind, x, w):
    from blitzgen import kernels

    if kind == "bf16":
        return F.linear(x, w[0])
    return kernels.int8_gemv(x, *w) if kind == "int8" else kernels.int4_gemv(x, *w)


def fused(kind, x, w, **kw):
    from blitzgen import kernels

    fn = {"bf16": kernels.fused_float_gemv, "int8": kernels.fused_int8_gemv, "int4": kernels.fused_int4_gemv}[kind]
    return fn(x, *w, **kw)


def reference(kind, x, w, **kw):
    from blitzgen.kernels import reference as R

    fn = {"bf16": R.fused_float_gemv_ref, "int8": R.fused_int8_gemv_ref, "int4": R.fused_int4_gemv_ref}[kind]
    return fn(x, *w, **kw)


def rel_err(y, r):
    y, r = y.float().reshape(-1), r.float().reshape(-1)
    return float("inf") if not torch.isfinite(y).all() else float((y - r).norm() / r.norm())


# ------------------------------------------------------------------------------------------- stage 1


def stage_check(rep, kinds):
    from blitzgen.kernels import fused_gemv as fg

    raw = {"bf16": fg.fused_float_gemv_raw, "int8": fg.fused_int8_gemv_raw, "int4": fg.fused_int4_gemv_raw}
    roles = [("wqkv+norm", DIM, QKV, "norm"), ("wo+res", DIM, DIM, "res"),
             ("w13+norm+swiglu", DIM, INTER, "swiglu"), ("w2+res", INTER, DIM, "res")]
    out = rep.data.setdefault("check", [])
    for kind in kinds:
        worst = 0.0
        for role, K, N, flags in roles:
            try:
                rows = 2 * N if flags == "swiglu" else N
                w = make_weights(kind, rows, K)
                x = torch.randn(1, 1, K, device=DEV).to(torch.bfloat16)
                kw = dict(norm_weight=(torch.rand(K, device=DEV) + 0.5).to(torch.bfloat16) if flags != "res" else None,
                          eps=EPS, residual=torch.randn(1, 1, N, device=DEV).to(torch.bfloat16) if flags == "res" else None,
                          swiglu=flags == "swiglu")
                r = reference(kind, x, w, **kw)
                e_op = rel_err(fused(kind, x, w, **kw), r)
                cfg = fg._config("float" if kind == "bf16" else kind, rows, K, 32 if kind == "int4" else None, x, kw["swiglu"])
                poison = torch.full((N,), float("nan"), dtype=torch.bfloat16, device=DEV)
                e_raw = rel_err(raw[kind](x, *w, **kw, cfg=cfg, out=poison if cfg.split_k == 1 else None), r) \
                    if DEV == "cuda" else 0.0
                ok = e_op < 1e-2 and e_raw < 1e-2
                worst = max(worst, e_op, e_raw)
                out.append(dict(kind=kind, role=role, K=K, N=N, cfg=list(cfg), rel_op=e_op, rel_raw=e_raw, ok=ok))
                log(f"check {kind:5s} {role:16s} K={K} N={N} cfg={tuple(cfg)} rel op {e_op:.1e} raw {e_raw:.1e}"
                    f"{'' if ok else '  FAIL'}")
            except Exception as e:  # noqa: BLE001
                rep.error(f"check {kind} {role}", e)
        TABLE.append(f"check {kind}: {'ok' if all(c['ok'] for c in out if c['kind'] == kind) else 'FAIL'} "
                      f"(worst rel. err {worst:.1e})")
        rep.save()


# ------------------------------------------------------------------------------------------- stage 2


def _rmsnorm(x, g):  # model.RMSNorm's math
    return g * F.rms_norm(x.float(), (x.shape[-1],), eps=EPS).to(x.dtype)


def _layer_fn(kind, variant):
    """One layer, compiled once and called for each of the 32 layers' weights. It takes (h, m) and
    returns the next (h, m) with x = h + m, so that for ``unfused`` inductor fuses the residual add
    into the next RMSNorm as it does in the whole-model graph; ``fused`` returns x itself (m = None)."""
    def run(h, m, wqkv, wo, w13, w2, g1, g2):
        x = h if m is None else h + m
        if variant == "gemv-only":
            qkv = plain(kind, x, wqkv)
            h = plain(kind, qkv[..., :DIM], wo)
            gu = plain(kind, h, w13)
            return plain(kind, gu[..., :INTER], w2), None
        if variant == "unfused":
            qkv = plain(kind, _rmsnorm(x, g1), wqkv)
            h = x + plain(kind, qkv[..., :DIM], wo)
            gate, up = plain(kind, _rmsnorm(h, g2), w13).split(INTER, dim=-1)
            return h, plain(kind, F.silu(gate) * up, w2)
        qkv = fused(kind, x, wqkv, norm_weight=g1, eps=EPS)
        h = fused(kind, qkv[..., :DIM], wo, residual=x)
        act = fused(kind, h, w13, norm_weight=g2, eps=EPS, swiglu=True)
        return fused(kind, act, w2, residual=h), None
    return run


def _layers_fn(kind, variant):
    layer = torch.compile(_layer_fn(kind, variant), fullgraph=True, dynamic=False,
                          backend="inductor" if DEV == "cuda" else "eager")

    def run(x, layers):
        h, m = x, None
        for L in layers:
            h, m = layer(h, m, L["wqkv"], L["wo"], L["w13"], L["w2"], L["g1"], L["g2"])
        return h if m is None else h + m
    return run


def _graph_time(fn, x, layers, reps=20):
    """Median replay time (us) of fn(x, layers) captured in one CUDA graph; kernels per replay."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        fn(x, layers)
    if DEV != "cuda":
        t = time.perf_counter()
        fn(x, layers)
        return (time.perf_counter() - t) * 1e6, 0
    sync()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(x, layers)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn(x, layers)
    times = []
    for _ in range(reps + 2):
        st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        st.record()
        g.replay()
        en.record()
        en.synchronize()
        times.append(st.elapsed_time(en) * 1e3)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        g.replay()
        sync()
    n = sum(e.count for e in prof.key_averages() if _is_kernel(e))
    del g
    return statistics.median(times[2:]), n


def _device_us(e) -> float:
    return float(getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0) or 0)


def _is_kernel(e) -> bool:
    """A GPU kernel event (not a CPU op whose children ran on the GPU, not a copy / memset)."""
    gpu = "CUDA" in str(getattr(e, "device_type", "")) or (_device_us(e) > 0 and not getattr(e, "cpu_time_total", 0))
    return gpu and not e.key.startswith(("Memcpy", "Memset", "cudaGraph", "Activity Buffer"))


def stage_layers(rep, kinds):
    out = rep.data.setdefault("layers", [])
    for kind in kinds:
        try:
            free()
            layers = [dict(wqkv=make_weights(kind, QKV, DIM), wo=make_weights(kind, DIM, DIM),
                           w13=make_weights(kind, 2 * INTER, DIM), w2=make_weights(kind, DIM, INTER),
                           g1=(torch.rand(DIM, device=DEV) + 0.5).to(torch.bfloat16),
                           g2=(torch.rand(DIM, device=DEV) + 0.5).to(torch.bfloat16)) for _ in range(LAYERS)]
            x = torch.randn(1, 1, DIM, device=DEV).to(torch.bfloat16)
            res = {}
            for variant in ("gemv-only", "unfused", "fused"):
                fn = _layers_fn(kind, variant)
                us, n = _graph_time(fn, x, layers)
                res[variant] = (us / LAYERS, n / LAYERS)
                out.append(dict(kind=kind, variant=variant, us_per_layer=us / LAYERS, kernels_per_layer=n / LAYERS))
                log(f"layers {kind:5s} {variant:9s}: {us / LAYERS:7.2f} us/layer, {n / LAYERS:.2f} kernels/layer, "
                    f"{us / 1e3:.3f} ms per 32 layers")
            (u, nu), (f, nf), (g0, ng) = res["unfused"], res["fused"], res["gemv-only"]
            TABLE.append(f"layers {kind}: unfused {u:.1f} us/layer ({nu:.1f} kernels), fused {f:.1f} ({nf:.1f}), "
                         f"gemv-only {g0:.1f} ({ng:.1f}); fused saves {(u - f) * LAYERS / 1e3:.3f} ms/token")
            del layers
        except Exception as e:  # noqa: BLE001
            rep.error(f"layers {kind}", e)
        rep.save()


# ------------------------------------------------------------------------------------------- stage 3

KINDS = [  # (label, regex over the kernel name), first match wins
    ("fused GEMV (ours)", r"fused_(int4|int8|float)_kernel"),
    ("GEMV (ours, Triton)", r"(int4|int8)_gemv_kernel|float_gemv_kernel"),
    ("attention (SDPA / flash / Triton)", r"attention|flash|fmha|softmax|sdpa|efficient"),
    ("cuBLAS / CUTLASS (bf16 GEMV, attention matmuls)", r"gemv|gemm|cutlass|xmma|Kernel2|cublas|splitK"),
    ("inductor (norm / RoPE / add / silu / cache / sampler)", r"^triton_"),
    ("copy / fill", r"copy|fill|Memcpy|Memset|elementwise|index"),
]


def _classify(name: str) -> str:
    for kind, pat in KINDS:
        if re.search(pat, name, re.I):
            return kind
    return "other"


def stage_profile(rep, modes=("int4",), steps=200, prof_steps=8):
    for mode in modes:
        if time.time() - T0 > rep.data["budget"] - 60:
            rep.data["skipped"].append(f"profile {mode}")
            TABLE.append(f"profile {mode}: skipped (budget)")
            continue
        try:
            _profile_mode(rep, mode, steps, prof_steps)
        except Exception as e:  # noqa: BLE001
            rep.error(f"profile {mode}", e)


def _profile_mode(rep, mode, steps, prof_steps):
    from torch.profiler import ProfilerActivity, profile

    from blitzgen.bench import build_random_model
    from blitzgen.config import ModelArgs
    from blitzgen.generate import Generator
    from blitzgen.kernels import fused_decode
    from blitzgen.quant import make_config
    from blitzgen.runtime import RuntimeOptions
    from blitzgen.sampling import SamplingParams

    out = rep.data.setdefault("profile", {})
    free()
    model, _ = build_random_model(ModelArgs.from_name(SHAPE), torch.device(DEV), torch.bfloat16,
                                  quantize=None if mode == "bf16" else make_config(mode, 32 if mode == "int4" else None))
    prompt = list(range(1, 6))
    for on in (False, True):
        if time.time() - T0 > rep.data["budget"] - 40:
            rep.data["skipped"].append(f"profile {mode} fused={on}")
            TABLE.append(f"profile {mode} fused={int(on)}: skipped (budget)")
            break
        label = f"{mode} fused={int(on)}"
        try:
            opts = RuntimeOptions.from_env(device=DEV, compile=DEV == "cuda", fused_decode=on)
            fused_decode.enable(model, on)
            # bench's request (prompt 5, 200 new): the same KV-cache size, hence the same graphs, so
            # the bench processes after this find them in the shared compile cache
            gen = Generator(model, options=opts, max_seq_len=5 + steps)
            greedy = SamplingParams(temperature=0.0)
            t = time.time()
            list(gen.generate_ids(prompt, steps, greedy, stop_token_ids=()))
            log(f"profile {label}: compiled + warm-up in {time.time() - t:.1f} s")
            it = gen.generate_ids(prompt, steps, greedy, stop_token_ids=())
            next(it)  # prefill + first token
            sync()
            t = time.perf_counter()
            for _ in it:
                pass
            sync()
            tok_s = (steps - 1) / (time.perf_counter() - t)
            it = gen.generate_ids(prompt, prof_steps + 1, greedy, stop_token_ids=())
            next(it)
            sync()
            prof = profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU])
            prof.start()
            t = time.perf_counter()
            for _ in it:
                pass
            sync()
            wall = (time.perf_counter() - t) / prof_steps * 1e6
            prof.stop()
            rows, by_kind = [], {}
            for e in prof.key_averages():
                if not _is_kernel(e) and not e.key.startswith(("Memcpy", "Memset")):
                    continue
                us = _device_us(e) / prof_steps
                if us <= 0:
                    continue
                k = _classify(e.key)
                c = by_kind.setdefault(k, [0.0, 0.0])
                c[0] += e.count / prof_steps
                c[1] += us
                rows.append((us, e.count / prof_steps, e.key[:90], k))
            rows.sort(reverse=True)
            busy = sum(v[1] for v in by_kind.values())
            out[label] = dict(tok_s=tok_s, step_us_wall=wall, busy_us=busy, kernels_per_step=sum(v[0] for v in by_kind.values()),
                              by_kind={k: dict(count=v[0], us=v[1]) for k, v in by_kind.items()},
                              top=[dict(us=r[0], count=r[1], name=r[2], kind=r[3]) for r in rows[:25]])
            log(f"profile {label}: {tok_s:.1f} tok/s in-process; step {wall:.0f} us wall, GPU busy {busy:.0f} us "
                f"({100 * busy / wall:.0f}%), {out[label]['kernels_per_step']:.0f} kernels/step")
            for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1][1]):
                log(f"    {k:38s} {v[0]:6.0f} kernels/step {v[1]:8.1f} us/step")
            log("    top kernels (us/step, count/step, name):")
            for r in rows[:15]:
                log(f"      {r[0]:8.1f} {r[1]:6.0f}  {r[2]}")
            TABLE.append(f"profile {label}: {tok_s:.1f} tok/s in-process, step {wall:.0f} us, GPU busy {busy:.0f} us, "
                         f"{out[label]['kernels_per_step']:.0f} kernels/step"
                         + ("" if rows or DEV != "cuda" else " (the profiler saw no kernels inside the CUDA graph)"))
            TABLE.extend(f"    {k}: {v[0]:.0f} kernels, {v[1]:.0f} us per step"
                         for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1][1]))
            del gen, it
        except Exception as e:  # noqa: BLE001
            rep.error(f"profile {label}", e)
        rep.save()
    fused_decode.enable(model, False)
    del model
    torch._dynamo.reset()
    free()


# ------------------------------------------------------------------------------------------- stage 4


def stage_bench(rep, modes, runs):
    out = rep.data.setdefault("bench", [])
    for mode in modes:
        for on in (0, 1):
            left = rep.data["budget"] - (time.time() - T0)
            label = f"bench {mode} fused={on}"
            cmd = [sys.executable, "-m", "blitzgen", "bench", "--shape", SHAPE, "--runs", str(runs),
                   "--json", "-"] + (["--quantize", mode] if mode != "bf16" else []) \
                + (["--device", "cpu", "--new-tokens", "8", "--no-roofline"] if DEV == "cpu" else [])
            if left < 45:
                rep.data["skipped"].append(label)
                TABLE.append(f"{label}: skipped (budget); run: BLITZGEN_FUSED={on} {' '.join(cmd[1:])}")
                continue
            env = {**os.environ, "BLITZGEN_FUSED": str(on),
                   "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
            try:
                t = time.time()
                r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(30.0, left - 10))
                if r.returncode != 0:
                    raise RuntimeError(f"exit {r.returncode}: {r.stderr.strip()[-600:]}")
                res = json.loads(r.stdout.strip().splitlines()[-1])
                row = dict(mode=mode, fused=on, tok_s=res.get("tok_s"), decode_tok_s=res.get("decode_tok_s"),
                           pct_roofline=res.get("pct_roofline"), compile_s=res.get("compile_s"),
                           wall_s=time.time() - t)
                out.append(row)
                log(f"{label}: {row['tok_s']:.1f} tok/s ({row['pct_roofline'] or 0:.1f}% roofline), "
                    f"compile {row['compile_s']:.0f} s, process {row['wall_s']:.0f} s")
            except Exception as e:  # noqa: BLE001
                rep.error(label, e)
            rep.save()
        pair = [b for b in out if b["mode"] == mode]
        if len(pair) == 2:
            off, on_ = (pair[0], pair[1]) if pair[0]["fused"] == 0 else (pair[1], pair[0])
            TABLE.append(f"bench {mode}: off {off['tok_s']:.1f} tok/s ({off['pct_roofline'] or 0:.1f}%), "
                         f"on {on_['tok_s']:.1f} ({on_['pct_roofline'] or 0:.1f}%): x{on_['tok_s'] / off['tok_s']:.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="fused_gpu.json")
    ap.add_argument("--stages", default="check,layers,profile,bench")
    ap.add_argument("--kinds", default="int4,int8,bf16", help="for check and layers")
    ap.add_argument("--modes", default="int4,int8,bf16", help="for bench")
    ap.add_argument("--profile-modes", default="int4", help="for profile")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--budget", type=float, default=340.0, help="seconds; later stages are skipped past this")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: a smoke run of the script's plumbing at tiny sizes (no meaningful timing)")
    a = ap.parse_args()
    global DEV, SHAPE, DIM, INTER, QKV, LAYERS
    if a.device == "cpu":
        DEV, SHAPE, DIM, INTER, QKV, LAYERS = "cpu", "tiny", 64, 160, 128, 2
    rep = Report(a.out)
    device = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke run)"
    rep.data.update(budget=a.budget, device=device, torch=torch.__version__,
                    argv=sys.argv[1:])
    try:
        import triton

        rep.data["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        pass
    os.environ.setdefault("BLITZGEN_CACHE", "/tmp/blitzgen-fused-cache")  # shared by the bench processes
    import torch._dynamo.config as dynamo_config

    dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, 64)  # one layer fn per kind x variant
    stages, kinds = a.stages.split(","), a.kinds.split(",")
    log(f"{rep.data['device']}, torch {torch.__version__}, stages {stages}, budget {a.budget:.0f} s")
    if "check" in stages:
        stage_check(rep, kinds)
    if "layers" in stages:
        stage_layers(rep, kinds)
    if "profile" in stages:
        try:
            stage_profile(rep, a.profile_modes.split(","))
        except Exception as e:  # noqa: BLE001
            rep.error("profile", e)
    if "bench" in stages:
        stage_bench(rep, a.modes.split(","), a.runs)
    rep.data["table"] = TABLE
    rep.data["elapsed_s"] = time.time() - T0
    rep.save()
    print("\n==== fused decode summary (" + rep.data["device"] + f", {time.time() - T0:.0f} s) ====")
    for line in TABLE:
        print(line)


if __name__ == "__main__":
    main()
