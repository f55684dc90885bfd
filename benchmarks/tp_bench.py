"""Tensor-parallel benchmark point: blitzgen at --tp N beside gpt-fast's tp.py under torchrun,
same shape, mode, prompt and token count, in one call. Prints one JSON line per side (and one per
all-reduce choice with --allreduce), then a summary line.

  python benchmarks/tp_bench.py --shape llama-2-7b --mode bf16 --tp 2 --peer gpt-fast=.peers/gpt-fast
  python benchmarks/tp_bench.py --shape tiny --mode bf16 --tp 1 --device cpu --no-compile --new-tokens 8

blitzgen's side starts its own ranks (parallel.run); random weights of the named shape are made
on each rank, only its slices. Timing: generated tokens / wall time of one request (prefill
included, as gpt-fast counts), median of --runs after the warm-up (compile + CUDA graphs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", required=True, help="a named shape (blitzgen config.NAMED_SHAPES)")
    p.add_argument("--mode", choices=["bf16", "int8", "int4"], default="bf16")
    p.add_argument("--group-size", type=int, default=None, help="int4 group size (default 32)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--all-reduce", default="functional", help="functional | symm-one-shot | symm-two-shot")
    p.add_argument("--allreduce", action="store_true",
                   help="also time every all-reduce choice at this shape's message sizes")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=200)
    p.add_argument("--peer", action="append", default=[], help="gpt-fast=DIR: run gpt-fast's tp.py beside")
    p.add_argument("--peer-shape", default=None, help="gpt-fast preset to run instead of --shape's (checks)")
    p.add_argument("--peer-timeout", type=float, default=1800.0)
    return p.parse_args(argv)


def blitzgen_point(a) -> dict:
    from blitzgen.config import ModelArgs
    from blitzgen.parallel import TPSpec, run
    from blitzgen.parallel.comm import ALL_REDUCE
    from blitzgen.sampling import SamplingParams

    compile_ = a.compile if a.compile is not None else a.device.startswith("cuda")
    group_size = a.group_size or (32 if a.mode == "int4" else None)
    spec = TPSpec(shape=a.shape, device=a.device, dtype="bfloat16", quantize=None if a.mode == "bf16" else a.mode,
                  group_size=group_size, compile=compile_, all_reduce=a.all_reduce)
    dim = ModelArgs.from_name(a.shape).dim

    def leader(lm, gen):
        import torch

        from blitzgen.generate import weight_bytes

        sp = SamplingParams(temperature=a.temperature, top_k=a.top_k, seed=0)
        prompt = list(range(1, a.prompt_len + 1))
        gen.ensure_capacity(a.prompt_len + a.new_tokens)
        t0 = time.perf_counter()
        gen.warmup([sp], prompt_len=a.prompt_len) if gen.compiled else None
        warm = time.perf_counter() - t0
        rates = []
        for i in range(-1, a.runs):
            t = time.perf_counter()
            n = sum(1 for _ in gen.generate_ids(prompt, a.new_tokens, sp, stop_token_ids=()))
            if i >= 0:
                rates.append(n / (time.perf_counter() - t))
        out = dict(side="blitzgen", shape=a.shape, mode=a.mode, group_size=group_size, tp=a.tp,
                   all_reduce=a.all_reduce, compile=compile_, prompt_len=a.prompt_len, new_tokens=a.new_tokens,
                   tok_s=statistics.median(rates), tok_s_runs=rates, warmup_s=warm,
                   rank0_weight_bytes=weight_bytes(lm.model), cache_len=lm.model.cache_len)
        if lm.model.device.type == "cuda":
            out["rank0_peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        if a.allreduce and a.tp > 1:  # batch-1 decode message: one hidden state; prefill: prompt_len of them
            kinds = ALL_REDUCE if a.device.startswith("cuda") else ("functional",)
            out["all_reduce_us"] = {k: {str(n): gen.time_all_reduce(k, n) * 1e6 for n in
                                        (dim * 2, dim * 2 * a.prompt_len)} for k in kinds}
        return out

    return run(a.tp, spec, leader)


def peer_command(a, gpt_fast_dir: str) -> list[str]:
    """gpt-fast's harness (blitzgen/peers/gptfast_generate.py) under torchrun with a.tp ranks."""
    from blitzgen.bench_peers import gptfast_command, gptfast_preset

    cmd = gptfast_command(gpt_fast_dir, a.peer_shape or gptfast_preset(a.shape), a.mode, a.group_size, a.prompt_len, a.new_tokens,
                          a.runs, device=a.device, compile=a.compile is not False, temperature=a.temperature,
                          top_k=a.top_k)
    if a.tp > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.tp}"] + cmd[1:]
    return cmd


def run_peer(a, gpt_fast_dir: str) -> dict:
    cmd = peer_command(a, gpt_fast_dir)
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
               PYTHONUNBUFFERED="1")
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.peer_timeout)
    except subprocess.TimeoutExpired:
        return dict(side="gpt-fast", tp=a.tp, error=f"timed out after {a.peer_timeout:.0f} s", command=cmd)
    found = [json.loads(line) for line in res.stdout.splitlines() if line.startswith('{"peer"')]
    out = dict(found[-1]) if found else dict(error=f"exit code {res.returncode}: {res.stderr[-500:]}")
    return dict(out, side="gpt-fast", tp=a.tp, command=cmd)


def main(argv=None) -> int:
    a = parse_args(argv)
    for k, v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ[k] = v
    peers = dict(p.split("=", 1) for p in a.peer)
    if set(peers) - {"gpt-fast"}:
        raise SystemExit(f"unknown peer(s) {sorted(set(peers) - {'gpt-fast'})}: only gpt-fast=DIR")
    if "gpt-fast" in peers:
        peer_command(a, peers["gpt-fast"])  # fail fast on a shape gpt-fast has no preset for
    ours = blitzgen_point(a)
    print(json.dumps(ours), flush=True)
    if "gpt-fast" in peers:
        peer = run_peer(a, peers["gpt-fast"])
        print(json.dumps(peer), flush=True)
        if "tok_s" in peer:
            print(f"{a.shape} {a.mode} tp{a.tp}: blitzgen {ours['tok_s']:.1f} tok/s, gpt-fast {peer['tok_s']:.1f} "
                  f"tok/s, {ours['tok_s'] / peer['tok_s']:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
