"""One tensor-parallel benchmark point: blitzgen at ``--tp N`` (its own launcher, random weights
of a named shape made on each rank, only its slices) and gpt-fast's tp.py under torchrun on the
same shape, mode and lengths (``peer_command``). ``a`` is the argparse namespace of
benchmarks/tp_bench.py (shape, mode, group_size, tp, prompt_len, new_tokens, runs, device,
compile, all_reduce, allreduce, temperature, top_k, peer_shape, peer_timeout).

Timing: generated tokens / wall time of one request (prefill included, as gpt-fast counts),
median of ``runs`` after one untimed run (and the warm-up: compile + CUDA graphs).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from .group import MULTICAST_OFF


def blitzgen_point(a) -> dict:
    from ..config import ModelArgs
    from ..sampling import SamplingParams
    from .comm import ALL_REDUCE
    from .runner import TPSpec, run

    compile_ = a.compile if a.compile is not None else a.device.startswith("cuda")
    group_size = a.group_size or (32 if a.mode == "int4" else None)
    spec = TPSpec(shape=a.shape, device=a.device, dtype="bfloat16", quantize=None if a.mode == "bf16" else a.mode,
                  group_size=group_size, compile=compile_, all_reduce=a.all_reduce)
    dim = ModelArgs.from_name(a.shape).dim

    def leader(lm, gen):
        import torch

        from ..generate import weight_bytes

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
    from ..bench_peers import gptfast_command, gptfast_preset

    cmd = gptfast_command(gpt_fast_dir, a.peer_shape or gptfast_preset(a.shape), a.mode, a.group_size, a.prompt_len, a.new_tokens,
                          a.runs, device=a.device, compile=a.compile is not False, temperature=a.temperature,
                          top_k=a.top_k)
    if a.tp > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.tp}"] + cmd[1:]
    return cmd


def run_peer(a, gpt_fast_dir: str) -> dict:
    cmd = peer_command(a, gpt_fast_dir)
    env = dict(os.environ, **MULTICAST_OFF, PYTHONUNBUFFERED="1")
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.peer_timeout)
    except subprocess.TimeoutExpired:
        return dict(side="gpt-fast", tp=a.tp, error=f"timed out after {a.peer_timeout:.0f} s", command=cmd)
    found = [json.loads(line) for line in res.stdout.splitlines() if line.startswith('{"peer"')]
    out = dict(found[-1]) if found else dict(error=f"exit code {res.returncode}: {res.stderr[-500:]}")
    return dict(out, side="gpt-fast", tp=a.tp, command=cmd)
