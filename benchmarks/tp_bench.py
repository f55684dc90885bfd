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
import sys


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


def main(argv=None) -> int:
    from blitzgen.parallel.bench import blitzgen_point, peer_command, run_peer

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
    from blitzgen.errors import BlitzgenError

    try:
        sys.exit(main())
    except BlitzgenError as e:
        print(f"tp_bench: error: {e}", file=sys.stderr)
        sys.exit(2)
