"""Quantized linear layers for 1-16 tokens at Llama-7B/8B shapes: which kernel for a speculative
verify (K + 1 tokens) or a short prefill chunk; with more rows (--rows 17,64,512,1800,4000), which
kernel for a prefill: tinygemm's packed copy or mm_rows' kernel with more rows per program
(``int4 mm``, BLITZGEN_INT4_PREFILL=triton, no second copy of the weights).

For each (N, K) and row count M it times, in a CUDA graph (triton.testing.do_bench_cudagraph):
  bf16     F.linear (cuBLAS), the unquantized reference point;
  int8:    the one-token GEMV (M = 1 only), the tensor-core row matmul (kernels/mm_rows.py),
           dequantize + cuBLAS (the old path);
  int4:    the one-token GEMV (M = 1), the tensor-core row matmul with each tile decode (the default,
           then ``magic``, ``words``, ``words-xs``: mm_rows.MmConfig.decode), tinygemm (the old path);
  more than 16 rows: the row kernels with more rows per program (``mm``) and a float copy of the
  weight + cuBLAS (``deq+cublas``, kernels/dequant.py), whose crossover sets mm_rows.*_DEQUANT_ROWS.
and prints microseconds and the weight bytes read per second. --sweep times instead a grid of
mm_rows configs per shape and row count, against the heuristic's pick.

    python benchmarks/rows_gpu.py [--rows 1,2,4,8,16] [--sweep] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

SHAPES = [(4096, 4096), (12288, 4096), (22016, 4096), (4096, 11008), (28672, 4096), (4096, 14336)]


def sweep_fns(mm_rows, x, w8, s8, int4_args, N: int, K: int) -> dict:
    """{label: (fn, weight bytes)} for the heuristic config and a grid around it, int8 and int4
    (more than 16 rows: 32, 64 and 128 rows per program too)."""
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    m = x.numel() // K
    bms = (16,) if m <= mm_rows.MAX_ROWS else (32, 64, 128)
    out = {}
    for kind, args, nbytes in (("int8", (w8, s8), N * K), ("int4", int4_args, N * K // 2)):
        g = args[3] if kind == "int4" else None
        raw = mm_rows.int8_mm_rows_raw if kind == "int8" else mm_rows.int4_mm_rows_raw
        base = mm_rows.choose_config(N, K, sms, g, rows=m)
        grid = {base}
        for bn, bk, nw, st in ((32, 128, 4, 3), (64, 256, 4, 3), (128, 128, 4, 3), (64, 128, 8, 3), (64, 128, 4, 4),
                               (64, 128, 4, 2), (32, 256, 4, 4), (128, 256, 8, 3)):
            bk = max(bk, g or 0)
            for bm in bms:
                c = mm_rows.MmConfig(bn, bk, nw, st, 1, bm)
                blocks, tiles = -(-N // bn) * -(-m // bm), -(-K // bk)
                for split in (1, 2, 4, 8):
                    if split <= tiles and blocks * split <= 8 * sms:
                        grid.add(c._replace(split_k=split))
        for c in sorted(grid):
            label = f"{kind} {'*' if c == base else ''}{tuple(c)}"
            out[label] = ((lambda c=c, raw=raw, args=args: raw(x, *args, cfg=c, max_rows=None)), nbytes)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--shapes", default=None, help="NxK,NxK,... (default: six Llama-7B/8B layers)")
    ap.add_argument("--sweep", action="store_true", help="time a grid of mm_rows configs instead")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    from triton.testing import do_bench_cudagraph

    from blitzgen.kernels import dequant, gemv, mm_rows
    from blitzgen.quant.int4 import Int4Linear, _int4_mm_cuda
    from blitzgen.quant.int8 import int8_linear_op

    dev, g = "cuda", a.group_size
    rows = [int(m) for m in a.rows.split(",")]
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "group_size": g,
           "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "rows": []}
    print(f"{out['device']}, torch {out['torch']}: microseconds per call (weight GB/s)")
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")] if a.shapes else SHAPES
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    for N, K in shapes:
        torch.manual_seed(0)
        wf = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
        w8 = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=dev)
        s8 = torch.rand(N, device=dev, dtype=torch.bfloat16) * 1e-3
        os.environ["BLITZGEN_INT4_PREFILL"] = "tinygemm"  # the packed copy, for the old path's figure
        lin4 = Int4Linear.from_linear(torch.nn.Linear(K, N, bias=False, device=dev, dtype=torch.bfloat16), g)
        q4, sc4, z4 = lin4.qweight, lin4.scales, lin4.zeros
        for m in rows:
            x = torch.randn(1, m, K, device=dev, dtype=torch.bfloat16)
            fns = {"bf16 cublas": (lambda: F.linear(x, wf), 2 * N * K),
                   "int8 dequant+cublas": (lambda: int8_linear_op(x, w8, s8), N * K),
                   "int8 mm_rows": (lambda: mm_rows.int8_mm_rows_raw(x, w8, s8, max_rows=None), N * K),
                   "int4 mm_rows": (lambda: mm_rows.int4_mm(x, q4, sc4, z4, g), N * K // 2),
                   "int4 mm_rows magic": (lambda: mm_rows.int4_mm_rows_raw(
                       x, q4, sc4, z4, g, mm_rows.choose_config(N, K, sms, g, rows=m)._replace(decode="magic"),
                       max_rows=None), N * K // 2),
                   "int4 mm_rows words": (lambda: mm_rows.int4_mm_rows_raw(
                       x, q4, sc4, z4, g, mm_rows.choose_config(N, K, sms, g, rows=m)._replace(decode="words"),
                       max_rows=None), N * K // 2),
                   "int4 mm_rows words-xs": (lambda: mm_rows.int4_mm_rows_raw(
                       x, q4, sc4, z4, g, mm_rows.choose_config(N, K, sms, g, rows=m)._replace(decode="words-xs"),
                       max_rows=None), N * K // 2),
                   "int4 tinygemm": (lambda: _int4_mm_cuda(x, lin4.packed_weight, lin4.packed_scales_zeros, g),
                                             N * K // 2)}
            if m > mm_rows.MAX_ROWS:  # a prefill: the same kernels with more rows per program, and
                fns.pop("int8 mm_rows"), fns.pop("int4 mm_rows")  # a float copy + cuBLAS (dequant.py)
                for d in ("magic", "words", "words-xs"):
                    fns.pop(f"int4 mm_rows {d}")
                fns["int8 mm"] = (lambda: mm_rows.int8_mm_rows_raw(x, w8, s8, max_rows=None), N * K)
                fns["int8 deq+cublas"] = (lambda: dequant.int8_dequant_mm(x, w8, s8), N * K)
                fns["int4 mm"] = (lambda: mm_rows.int4_mm_rows_raw(x, q4, sc4, z4, g, max_rows=None), N * K // 2)
                fns["int4 mm words"] = (lambda: mm_rows.int4_mm_rows_raw(
                    x, q4, sc4, z4, g, mm_rows.choose_config(N, K, sms, g, rows=m)._replace(decode="words"),
                    max_rows=None), N * K // 2)
                fns["int4 deq+cublas"] = (lambda: dequant.int4_dequant_mm(x, q4, sc4, z4, g), N * K // 2)
            if m == 1:
                fns["int8 gemv"] = (lambda: gemv.int8_gemv(x, w8, s8), N * K)
                fns["int4 gemv"] = (lambda: gemv.int4_gemv(x, q4, sc4, z4, g), N * K // 2)
                fns.pop("int4 tinygemm")  # lin4 takes the GEMV for one token
            if a.sweep:
                fns = sweep_fns(mm_rows, x, w8, s8, (q4, sc4, z4, g), N, K)
            row = {"N": N, "K": K, "rows": m}
            for name, (fn, nbytes) in fns.items():
                try:
                    ms = do_bench_cudagraph(fn, rep=30)
                except Exception as e:  # noqa: BLE001 - recorded, the rest still runs
                    row[name] = f"{type(e).__name__}: {str(e)[:120]}"
                    continue
                row[name] = {"us": ms * 1e3, "GBps": nbytes / ms / 1e6}
            out["rows"].append(row)
            timed = {k: v for k, v in row.items() if isinstance(v, dict)}
            if a.sweep:  # the heuristic's pick (*) and the best three of each kind
                timed = {k: v for kind in ("int8", "int4") for k, v in sorted(
                    ((k, v) for k, v in timed.items() if k.startswith(kind)), key=lambda kv: kv[1]["us"])[:3]
                    + [(k, v) for k, v in timed.items() if k.startswith(kind + " *")]}
            cells = "  ".join(f"{k} {v['us']:.1f} ({v['GBps']:.0f})" for k, v in timed.items())
            print(f"{N}x{K} M={m}: {cells}", flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
