"""Where one compiled decode step goes at a given context length: torch.profiler over a few steps
of `blitzgen bench`'s decode (random weights, CUDA graphs), kernels summed per step.

    python3 benchmarks/decode_profile_gpu.py --shape llama-3-8b --prompt-len 4000 \
        --attention 'auto;split:4;auto@merge=triton' [--quantize int4] --json $OUT/profile.json

For each ``--attention`` choice (BLITZGEN_DECODE_ATTENTION's values) in one process: compile and
warm up with the prompt, time ``--steps`` greedy decode steps, then profile ``--prof-steps`` of
them and print the kernels that take the most device time per step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402


def _device_us(e) -> float:
    return float(getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0) or 0)


def _is_kernel(e) -> bool:
    gpu = "CUDA" in str(getattr(e, "device_type", "")) or (_device_us(e) > 0 and not getattr(e, "cpu_time_total", 0))
    return gpu and not e.key.startswith(("cudaGraph", "Activity Buffer"))


def _defaults() -> str:
    from blitzgen.kernels import attention as A

    return f"{A.MERGE}, pos_loads {int(A.POS_LOADS)}, {A.PROGRAMS_PER_SM}/SM"


def set_kernel_defaults(spec: str) -> None:
    """``merge=triton,pos_loads=1``: module defaults of kernels/attention.py's Triton kernel."""
    from blitzgen.kernels import attention as A

    names = {"merge": "MERGE", "pos_loads": "POS_LOADS", "programs_per_sm": "PROGRAMS_PER_SM",
             "num_warps": "NUM_WARPS", "block_n": "BLOCK_N"}
    for item in filter(None, spec.split(",")):
        key, _, val = item.partition("=")
        setattr(A, names[key], val if key == "merge" else int(val))


def profile_one(model, attention, prompt, steps, prof_steps, cache):
    from torch.profiler import ProfilerActivity, profile

    from blitzgen.generate import Generator
    from blitzgen.runtime import RuntimeOptions
    from blitzgen.sampling import SamplingParams

    torch._dynamo.reset()
    opts = RuntimeOptions.from_env(device="cuda", compile=True, decode_attention=attention)
    gen = Generator(model, options=opts, max_seq_len=cache or len(prompt) + 256)  # bench's for 256 new
    greedy = SamplingParams(temperature=0.0)
    t = time.time()
    list(gen.generate_ids(prompt, steps, greedy, stop_token_ids=()))
    warm = time.time() - t
    it = gen.generate_ids(prompt, steps, greedy, stop_token_ids=())
    next(it)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in it:
        pass
    torch.cuda.synchronize()
    tok_s = (steps - 1) / (time.perf_counter() - t)
    it = gen.generate_ids(prompt, prof_steps + 1, greedy, stop_token_ids=())
    next(it)
    torch.cuda.synchronize()
    prof = profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU])
    prof.start()
    for _ in it:
        pass
    torch.cuda.synchronize()
    prof.stop()
    rows = []
    for e in prof.key_averages():
        if _is_kernel(e) and _device_us(e) > 0:
            rows.append((_device_us(e) / prof_steps, e.count / prof_steps, e.key[:100]))
    rows.sort(reverse=True)
    busy = sum(r[0] for r in rows)
    print(f"== attention {attention} (merge {_defaults()}): {tok_s:.1f} tok/s in-process (warm-up {warm:.1f} s); "
          f"GPU busy {busy:.0f} us/step, {sum(r[1] for r in rows):.0f} kernels/step", flush=True)
    for r in rows[:18]:
        print(f"   {r[0]:8.1f} us {r[1]:6.1f}x  {r[2]}", flush=True)
    del gen, it
    return {"attention": attention, "tok_s": tok_s, "warm_s": warm, "busy_us": busy,
            "top": [{"us": r[0], "count": r[1], "name": r[2]} for r in rows[:40]]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3-8b")
    ap.add_argument("--prompt-len", type=int, default=4000)
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--attention", default="auto;split:4", help="';'-separated; 'auto@merge=triton'")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--prof-steps", type=int, default=8)
    ap.add_argument("--cache", type=int, default=0, help="KV-cache positions (default: prompt + 256)")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    from blitzgen.bench import build_random_model
    from blitzgen.config import ModelArgs
    from blitzgen.quant import make_config

    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}; {a.shape} {a.quantize or 'bf16'}, "
          f"prompt {a.prompt_len}", flush=True)
    quant = make_config(a.quantize, 32 if a.quantize == "int4" else None) if a.quantize else None
    model, _ = build_random_model(ModelArgs.from_name(a.shape), torch.device("cuda"), torch.bfloat16,
                                  quantize=quant)
    prompt = [(7 * i + 1) % 30000 + 1 for i in range(a.prompt_len)]
    out = []
    for att in a.attention.split(";"):  # "auto@merge=triton,pos_loads=1": the Triton kernel's defaults
        att, _, kw = att.partition("@")
        from blitzgen.kernels import attention as A

        saved = (A.MERGE, A.POS_LOADS, A.PROGRAMS_PER_SM, A.NUM_WARPS, A.BLOCK_N)
        set_kernel_defaults(kw)
        r = profile_one(model, att, prompt, a.steps, a.prof_steps, a.cache)
        r["kernel_defaults"] = kw
        out.append(r)
        A.MERGE, A.POS_LOADS, A.PROGRAMS_PER_SM, A.NUM_WARPS, A.BLOCK_N = saved
    if a.json:
        Path(a.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                            "shape": a.shape, "prompt_len": a.prompt_len, "runs": out}, indent=1))


if __name__ == "__main__":
    main()
