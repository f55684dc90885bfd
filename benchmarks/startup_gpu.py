"""Cold and warm start on the GPU, one device call: bf16 and int8, with and without compile regions.

Saves the Llama-2-7B shape as an HF checkpoint (``blitzgen bench --shape llama-2-7b --save DIR``,
skipped when DIR holds one), then runs fresh ``blitzgen generate --compile`` processes, each case
twice on its own empty ``BLITZGEN_CACHE`` (cold: empty cache; warm: the same cache, new process),
and reads each process's ``startup:`` line (process start to first token, by phase) and tok/s.
Cases run in order until the time budget would be overrun; each result is written as soon as it
is in, so a cut-off call still reports what ran.

    python benchmarks/startup_gpu.py --out $OUT/startup_gpu.json --budget 500

Cases: bf16 without regions (the current CUDA default, for comparison with BENCHMARKS.md), bf16
with regions (BLITZGEN_COMPILE_REGIONS=1: Dynamo traces one block instead of 32), int8 with
regions, int8 without. The generated text of each warm run is kept so regions on/off can be
compared (same seed; a difference after many tokens is float noise from different fusion).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

PROMPT = "t11 t12 t13 t14 t15"
CASES = [("bf16", None, "0"), ("bf16", None, "1"), ("int8", "int8", "1"), ("int8", "int8", "0")]
EST = {("bf16", "0"): 50 + 25, ("bf16", "1"): 40 + 20, ("int8", "1"): 70 + 20, ("int8", "0"): 100 + 25}


def parse(stderr: str) -> dict:
    out = {}
    m = re.search(r"^startup: first token in ([\d.]+) s \((.*?)\)(?: \[(.*)\])?$", stderr, re.M)
    if m:
        out["first_token_s"] = float(m.group(1))
        out["phases"] = {k: float(v) for k, v in re.findall(r"([\w +-]+?) ([\d.]+) s(?:, |$)", m.group(2))}
        if m.group(3):
            out["compile_detail"] = {k: float(v) for k, v in re.findall(r"([\w]+) ([\d.]+) s", m.group(3))}
    m = re.search(r"^blitzgen: AOT decode step (.+)$", stderr, re.M)
    if m:
        out["aot_step"] = m.group(1)
    m = re.search(r"Time for inference 1: .*? ([\d.]+) tokens/sec \(first token (\d+) ms, decode ([\d.]+) tokens/sec\)", stderr)
    if m:
        out.update(tok_s=float(m.group(1)), ttft_ms=int(m.group(2)), decode_tok_s=float(m.group(3)))
    return out


def run(model: str, quantize: str | None, regions: str, cache: str, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "blitzgen", "generate", "--model", model, "--compile", "--raw", "--prompt", PROMPT,
           "--max-new-tokens", "200", "--temperature", "0.8", "--seed", "1"]
    if quantize:
        cmd += ["--quantize", quantize]
    env = {**os.environ, "BLITZGEN_CACHE": cache, "BLITZGEN_COMPILE_REGIONS": regions, "BLITZGEN_EXIT_TRACE": "1"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    env.pop("TRITON_CACHE_DIR", None)
    t0 = time.time()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "wall_s": round(time.time() - t0, 1)}
    t_end = time.time()
    res = {"rc": p.returncode, "wall_s": round(t_end - t0, 1), **parse(p.stderr), "text": p.stdout[-2000:]}
    m = re.search(r"^blitzgen: exit: main returned at ([\d.]+)$", p.stderr, re.M)
    if m:  # from main's return to the process's end: atexit handlers, then the OS's teardown (CUDA context)
        res["after_main_s"] = round(t_end - float(m.group(1)), 2)
        m = re.search(r"^blitzgen: exit: atexit handlers ([\d.]+) s$", p.stderr, re.M)
        res["atexit_s"] = float(m.group(1)) if m else None
    if p.returncode:
        res["stderr_tail"] = p.stderr[-3000:]
    return res


LOAD_AB = """
import hashlib, json, sys, time, torch
from blitzgen.loading import load
from blitzgen.runtime import RuntimeOptions
t = time.perf_counter()
lm = load(sys.argv[1], RuntimeOptions.from_env(device="cuda"), progress=False)
secs = time.perf_counter() - t
h = hashlib.sha256()
for name, p in sorted(lm.model.state_dict().items()):
    h.update(name.encode()); h.update(p.detach().reshape(-1)[::4099].float().cpu().numpy().tobytes())
print(json.dumps({"load_s": round(secs, 2), "sample_sha": h.hexdigest()[:16]}))
"""


def load_ab(model: str, timeout: float) -> dict:
    """Weight load alone, safetensors' own CUDA copy (BLITZGEN_STAGED_LOAD=0) against the staged
    reader (=1), page cache warm (a first unmeasured read), and a sampled hash of every tensor."""
    out = {}
    for staged in ("0", "1", "0", "1"):  # the first pair also warms the page cache
        env = {**os.environ, "BLITZGEN_STAGED_LOAD": staged}
        try:
            p = subprocess.run([sys.executable, "-c", LOAD_AB, model], env=env, capture_output=True, text=True,
                               timeout=timeout)
            res = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {"error": p.stderr[-1500:]}
        except (subprocess.TimeoutExpired, ValueError, IndexError) as e:
            res = {"error": repr(e)}
        out.setdefault(f"staged={staged}", []).append(res)
    runs = [r.get("sample_sha") for v in out.values() for r in v]
    out["identical"] = len(set(runs)) == 1 and None not in runs
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default="/tmp/l7b", help="where the checkpoint is (saved there when absent)")
    ap.add_argument("--out", default="startup_gpu.json")
    ap.add_argument("--budget", type=float, default=500, help="seconds for the whole call")
    ap.add_argument("--cases", default="all", help="comma list of bf16:0,bf16:1,int8:1,int8:0 (dtype:regions)")
    ap.add_argument("--warm-runs", type=int, default=1, help="warm starts per case (warm, warm2, ...)")
    ap.add_argument("--no-load-ab", action="store_true", help="skip the staged-load A/B (4 loads, ~40 s)")
    a = ap.parse_args()
    t_start = time.time()
    import torch

    info = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "nested_compile_region": hasattr(torch.compiler, "nested_compile_region"), "cases": []}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass

    def dump():
        with open(a.out, "w") as f:
            json.dump(info, f, indent=1)

    if not os.path.isfile(os.path.join(a.model_dir, "config.json")):
        t = time.time()
        subprocess.run([sys.executable, "-m", "blitzgen", "bench", "--shape", "llama-2-7b", "--save", a.model_dir],
                       check=True)
        info["save_s"] = round(time.time() - t, 1)
    dump()
    if not a.no_load_ab:
        info["load_ab"] = load_ab(a.model_dir, 120)
        print("load A/B:", json.dumps(info["load_ab"]), flush=True)
        dump()
    wanted = CASES if a.cases == "all" else [c for c in CASES if f"{c[0]}:{c[2]}" in a.cases.split(",")]
    for name, quantize, regions in wanted:
        left = a.budget - (time.time() - t_start)
        if left < EST[(name, regions)]:
            info["cases"].append({"case": name, "regions": regions, "skipped": f"{left:.0f} s left"})
            dump()
            continue
        cache = tempfile.mkdtemp(prefix=f"bg-{name}-r{regions}-")
        case = {"case": name, "regions": regions, "cache": cache}
        info["cases"].append(case)
        for phase in ["cold", "warm"] + [f"warm{i}" for i in range(2, a.warm_runs + 1)]:
            left = a.budget - (time.time() - t_start)
            case[phase] = run(a.model_dir, quantize, regions, cache, max(left - 5, 10))
            dump()
            print(f"{name} regions={regions} {phase}: {json.dumps({k: v for k, v in case[phase].items() if k != 'text'})}",
                  flush=True)
    texts = {(c["case"], c["regions"]): c.get("warm", {}).get("text", "") for c in info["cases"] if "warm" in c}
    for name in ("bf16", "int8"):
        a0, a1 = texts.get((name, "0")), texts.get((name, "1"))
        if a0 and a1:
            same = next((i for i, (x, y) in enumerate(zip(a0, a1)) if x != y), min(len(a0), len(a1)))
            info[f"{name}_text_common_prefix_chars"] = [same, len(a0), len(a1)]
    info["total_s"] = round(time.time() - t_start, 1)
    dump()
    print(json.dumps({k: v for k, v in info.items() if k != "cases"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
