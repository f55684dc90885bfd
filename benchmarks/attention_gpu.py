"""One-token decode attention on the GPU: blitzgen's variants against gpt-fast's and flex decoding.

For each shape (KV heads, query heads, cache length S), 32 layers' worth of separate bf16 KV caches
(so the L2 cache does not hold them) are attended by one compiled function per variant; the 32
calls are captured in one CUDA graph and its replays timed (median). Reports microseconds per
token (all 32 layers), the bandwidth over the bytes that must move (the filled part of K and V,
read once) and its
share of the copy bandwidth measured in the same run, and checks each variant against a float64
reference. Variants:

    sdpa        blitzgen: SDPA on [Hkv, G, D] queries per KV head (attention.decode_attention)
    matmul      blitzgen: matmul, softmax, matmul
    split-C     blitzgen: as matmul, probabilities @ V in C slices of the cache (split-K)
    triton      blitzgen: the split-K Triton kernel (kernels/attention.py), one program per head and slice
    triton-pos  the same, told the query's position: it stops there (triton-pos-*: plan variants)
    repeat      gpt-fast: repeat_interleave the cache to H heads, then SDPA
    flex        torch flex_attention (flex decoding) with enable_gqa and a position score_mod

    python benchmarks/attention_gpu.py --out $OUT/attention.json
The last line printed is ``BEST <shape> <impl>[:chunks]`` for the --pick shape among blitzgen's
own variants, for a script to pass on (gpu_side_by_side.py --decode-attention).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
try:
    import blitzgen  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO / "src"))
from blitzgen.attention import decode_attention  # noqa: E402

LAYERS = 32
SHAPES = {  # name: (n_heads, n_kv_heads, head_dim, cache length, filled positions)
    "llama-2-7b/p1800": (32, 32, 128, 2000, 1990),
    "llama-2-7b/p5": (32, 32, 128, 205, 200),
    "llama-3-8b/p4000": (32, 8, 128, 4256, 4250),
    "llama-3-8b/p5": (32, 8, 128, 205, 200),
    "llama-3-8b/s1024": (32, 8, 128, 1024, 1000),
    # a compiled server's static cache (warm_cache_tokens, at most the context) after a short prompt
    "llama-2-7b/serve-p200": (32, 32, 128, 4096, 200),
    "llama-3-8b/serve-p200": (32, 8, 128, 8192, 200),
}
SWEEP = {"p8": dict(programs_per_sm=8), "b32": dict(block_n=32), "w2": dict(num_warps=2),
         "p8-b32": dict(programs_per_sm=8, block_n=32),
         # loads bounded by the position only (no wait on the mask), and a one-launch Triton merge
         "pl": dict(pos_loads=True), "mt": dict(merge="triton"), "pl-mt": dict(pos_loads=True, merge="triton"),
         "pl-mt-b32": dict(pos_loads=True, merge="triton", block_n=32),
         "pl-mt-b128": dict(pos_loads=True, merge="triton", block_n=128),
         "pl-mt-p8": dict(pos_loads=True, merge="triton", programs_per_sm=8),
         "pl-one": dict(pos_loads=True, merge="triton", programs_per_sm=0),  # one slice per head, no merge
         "ew-pl-mt": dict(elementwise=True, pos_loads=True, merge="triton"),  # G <= 2: no tensor-core padding
         "ew-pl-mt-b32": dict(elementwise=True, pos_loads=True, merge="triton", block_n=32)}  # fewer registers


def variants(S: int):
    out = {"sdpa": lambda q, k, v, m, p: decode_attention(q, k, v, m, "sdpa"),
           "matmul": lambda q, k, v, m, p: decode_attention(q, k, v, m, "matmul")}
    for c in (4, 8, 16, 32, 64):
        if S % c == 0:
            out[f"split:{c}"] = (lambda c: lambda q, k, v, m, p: decode_attention(q, k, v, m, "split", c))(c)

    out["triton"] = lambda q, k, v, m, p: decode_attention(q, k, v, m, "triton")
    out["triton-pos"] = lambda q, k, v, m, p: decode_attention(q, k, v, m, "triton", input_pos=p)
    from blitzgen.kernels.attention import decode_attention_raw

    for tag, kw in SWEEP.items():  # plan variants of triton-pos (the raw launcher, traced by Dynamo)
        def swept(q, k, v, m, p, kw=kw):
            B, H, _, D = q.shape
            Hkv = k.shape[1]
            qg = q.reshape(B, Hkv, H // Hkv, D).contiguous()
            return decode_attention_raw(qg, k, v, m, p, **kw).reshape(B, H, 1, D)
        out[f"triton-pos-{tag}"] = swept

    def repeat(q, k, v, m, p):
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    out["repeat"] = repeat
    try:
        from torch.nn.attention.flex_attention import flex_attention

        def flex(q, k, v, m, p):
            def score_mod(score, b, h, q_idx, kv_idx):
                return torch.where(kv_idx <= p[0], score, -float("inf"))
            return flex_attention(q, k, v, score_mod=score_mod, enable_gqa=q.shape[1] != k.shape[1])
        out["flex"] = flex
    except ImportError:
        pass
    return out


def reference(q, k, v, m):
    g = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = (q.double() @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return s.masked_fill(~m, -float("inf")).softmax(-1) @ v


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--skip", default="", help="comma-separated variant names to leave out (e.g. flex,repeat)")
    ap.add_argument("--pick", default="llama-3-8b/p4000", help="shape whose fastest blitzgen variant is printed")
    a = ap.parse_args()
    from triton.testing import do_bench, do_bench_cudagraph

    dev = "cuda"
    torch.manual_seed(0)
    big = torch.empty(1 << 29, dtype=torch.bfloat16, device=dev).normal_()
    copy_ms = do_bench(lambda: big.clone(), warmup=50, rep=300, return_mode="median")
    copy_gbs = 2 * big.numel() * 2 / copy_ms / 1e6
    del big
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: copy {copy_gbs:.0f} GB/s", flush=True)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_gbs": copy_gbs, "shapes": {}}
    for name in a.shapes.split(","):
        H, Hkv, D, S, filled = SHAPES[name]
        ks = [torch.randn(1, Hkv, S, D, device=dev, dtype=torch.bfloat16) for _ in range(LAYERS)]
        vs = [torch.randn(1, Hkv, S, D, device=dev, dtype=torch.bfloat16) for _ in range(LAYERS)]
        q = torch.randn(1, H, 1, D, device=dev, dtype=torch.bfloat16)
        pos = torch.tensor([filled - 1], device=dev)
        mask = (torch.arange(S, device=dev) <= pos).view(1, 1, 1, S)
        ref = reference(q, ks[0], vs[0], mask)
        nbytes = 2 * LAYERS * Hkv * filled * D * 2  # what must move: the filled part of K and V
        rows = {}
        skip = set(filter(None, a.skip.split(",")))
        for vname, fn in variants(S).items():
            if vname in skip:
                continue
            try:
                cf = torch.compile(fn, fullgraph=True, dynamic=False)
                out = cf(q, ks[0], vs[0], mask, pos)
                err = ((out.double() - ref).norm() / ref.norm()).item()

                def step():
                    for k, v in zip(ks, vs):
                        cf(q, k, v, mask, pos)
                step()
                torch.cuda.synchronize()
                ms = do_bench_cudagraph(step, rep=200, return_mode="median")
                gbs = nbytes / ms / 1e6
                rows[vname] = {"us_per_token": ms * 1e3, "gbs": gbs, "pct_copy": 100 * gbs / copy_gbs, "rel_err": err}
                print(f"  {name:21s} {vname:15s} {ms * 1e3:8.1f} us/token (32 layers)  {gbs:6.0f} GB/s "
                      f"{100 * gbs / copy_gbs:5.1f}% of copy  rel err {err:.1e}", flush=True)
            except Exception as e:  # a variant that does not compile here is reported, the rest go on
                rows[vname] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                print(f"  {name:18s} {vname:9s} ERROR {type(e).__name__}: {str(e)[:200]}", flush=True)
            torch._dynamo.reset()
        results["shapes"][name] = {"bytes": nbytes, "variants": rows}
        del ks, vs
        torch.cuda.empty_cache()
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    ours = {k: v for k, v in results["shapes"].get(a.pick, {}).get("variants", {}).items()
            if k in ("sdpa", "matmul", "triton", "triton-pos") or k.startswith("split")}
    ok = {k: v["us_per_token"] for k, v in ours.items() if "us_per_token" in v and v["rel_err"] < 2e-2}
    if ok:
        print(f"BEST {a.pick} {min(ok, key=ok.get)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
