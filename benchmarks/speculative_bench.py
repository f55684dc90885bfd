"""Speculative decoding benchmark: real weights (acceptance, tokens/s) and verify cost on named shapes.

    # SmolLM2 (default model), plain vs each source, five prompts
    python benchmarks/speculative_bench.py real [--model M] [--sources ngram,self-int4] [--k 4]
        [--new-tokens 200] [--runs 3] [--compile] [--device cuda] [--dtype bfloat16] [--json out.json]
    # quick CPU check: python benchmarks/speculative_bench.py real --prompts add --new-tokens 16 --runs 1

--model takes anything blitzgen.loading.load accepts (GGUF file, HF or GGUF directory, repo id), or
a GGUF split into parts (``split -b 45M model.gguf model.gguf.part-``, for a machine that only
takes so much per transfer): a directory holding the parts, or the path the parts were split
from; the parts are joined (once) into that path. The default GGUF (98 MB) on a machine that takes
64 MiB per call, with out/ git-ignored:

    split -b 45M "$(python -c 'from blitzgen.loading import default_model_path as p; print(p())')" \
        out/smol/SmolLM2-135M-Instruct.Q4_1.gguf.part-
    call 1 (carry out/smol/*.part-aa):         mkdir -p /tmp/smol && cp out/smol/*.part-* /tmp/smol/
    call 2 (carry out/smol/*.part-ab, -ac):    cp out/smol/*.part-* /tmp/smol/ && \
        python benchmarks/speculative_bench.py real --model /tmp/smol --compile --json $OUT/real.json
    # time a (K+1)-token verify against a 1-token step on random weights of a named shape
    python benchmarks/speculative_bench.py shapes --shape llama-2-7b --modes bf16,int8,int4 --k 1,3,7
        [--acceptance 0.5,0.7,0.9] [--compile] [--json out.json]

"real" runs greedy decoding (so every source must produce plain decoding's exact tokens; the
table says whether it did) and reports tokens/s over the whole request (prefill included, median
of --runs after a warm-up run, whose time is reported as warm-up/compile seconds), acceptance,
mean tokens per verify step, the histogram of accepted lengths and the speedup over plain.

"shapes" reports, per mode and K, the verify cost c_v = t(verify of K+1 tokens) / t(1-token
step), measured through SpeculativeDecoder.calibrate (the same compiled functions the decode loop
runs), and a PREDICTED speedup for per-token acceptance alpha: E / (c_v + K c_d) with
E = (1 - alpha^(K+1)) / (1 - alpha); c_d = 0 for n-gram and t(int4 step) / t(step) for self-int4
(when int4 is among the modes). Predictions, not measurements: acceptance needs real weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

FUNCTION = '''def moving_average(values, window):
    result = []
    for i in range(len(values)):
        start = max(0, i - window + 1)
        chunk = values[start:i + 1]
        result.append(sum(chunk) / len(chunk))
    return result
'''
PASSAGE = ("The Rhine rises in the Swiss Alps and flows north through Lake Constance, then west along the "
           "border between Switzerland and Germany to Basel. From Basel it turns north, forming part of the "
           "border between France and Germany, and passes Strasbourg, Mannheim and Mainz. Below Bingen it "
           "cuts through the Rhine Gorge, a UNESCO World Heritage Site known for its castles and vineyards. "
           "It then flows past Koblenz, Bonn, Cologne and Duesseldorf before entering the Netherlands, where "
           "it splits into several branches, the largest being the Waal, and reaches the North Sea near "
           "Rotterdam. The river is about 1,230 kilometres long and has been a major trade route since "
           "Roman times.")
PROMPTS = {
    "fibonacci": "Implement fibonacci in python",
    "add": "Add two numbers in python",
    "edit-function": "Here is a Python function:\n\n" + FUNCTION + "\nRewrite it with the same logic but "
                     "rename `values` to `data` and `result` to `averages`. Return the whole function.",
    "summarize": "Summarize the following passage, reusing its wording:\n\n" + PASSAGE,
    "chat": "What makes a good weekend trip? Give me a few ideas and explain why.",
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_label(device: str) -> str:
    return torch.cuda.get_device_name() if torch.device(device).type == "cuda" else cpu_name()


# ---- real weights -------------------------------------------------------------------------------
def timed_runs(fn, runs: int, device) -> tuple[float, list[float], list[int]]:
    """(warm-up seconds, run seconds, tokens of the last run)."""
    sync(device)
    t = time.perf_counter()
    toks = fn()
    sync(device)
    warm = time.perf_counter() - t
    times = []
    for _ in range(runs):
        sync(device)
        t = time.perf_counter()
        toks = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return warm, times, toks


def resolve_model(spec: str | None) -> str | None:
    """--model, with a GGUF split into parts (PATH.part-aa, PATH.part-ab, ... or PATH.part0, ...)
    joined into PATH first. spec: such a PATH, or a directory holding one set of parts."""
    import glob

    if spec is None:
        return None
    path = os.path.abspath(os.path.expanduser(spec))
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "config.json")) or glob.glob(os.path.join(path, "*.gguf")):
            return path
        parts = sorted(glob.glob(os.path.join(path, "*.part*")))
        if not parts:
            return path  # the loader explains what is missing
        whole = {p.rsplit(".part", 1)[0] for p in parts}
        if len(whole) != 1:
            raise SystemExit(f"{spec}: parts of more than one file: {sorted(whole)}")
        path = whole.pop()
    elif os.path.exists(path):
        return path
    parts = sorted(glob.glob(glob.escape(path) + ".part*"))
    if not parts:
        return spec  # a repo id, or a mistake the loader reports
    tmp = path + ".joining"
    with open(tmp, "wb") as out:
        for p in parts:
            with open(p, "rb") as f:
                while chunk := f.read(1 << 24):
                    out.write(chunk)
    os.replace(tmp, path)
    log(f"joined {len(parts)} parts into {path} ({os.path.getsize(path) / 1e6:.1f} MB)")
    return path


def run_real(a) -> dict:
    from blitzgen.generate import Generator
    from blitzgen.loading import load
    from blitzgen.sampling import SamplingParams
    from blitzgen.speculative import SpeculativeDecoder, make_draft

    # float32 on CPU: its fastest path there (bfloat16 matmuls are slow on most CPUs)
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.float32 if a.device == "cpu" else None)
    lm = load(resolve_model(a.model), device=a.device, dtype=dtype, progress=False)
    model, tok = lm.model, lm.tokenizer
    dev = str(model.device)
    greedy = SamplingParams(temperature=0.0)
    # the benchmark measures a fixed number of tokens: EOS does not stop anyone
    gen = Generator(model, tok, compile=a.compile)
    decoders = {}
    for name in a.sources.split(","):
        t = time.perf_counter()
        draft = make_draft(name, model)
        build = time.perf_counter() - t
        dec = SpeculativeDecoder(model, draft, k=a.k, compile=a.compile)
        cal = dec.calibrate() if a.calibrate else None
        decoders[name] = (dec, build, cal)
    rows = []
    for pname, text in PROMPTS.items():
        if a.prompts and pname not in a.prompts.split(","):
            continue
        ids = tok.encode_chat([{"role": "user", "content": text}])
        def plain():
            # the decoders rewrite the KV cache: no prompt reuse from it (and none between timed runs)
            getattr(gen, "forget_prefix", lambda: None)()
            return list(gen.generate_ids(ids, a.new_tokens, greedy, stop_token_ids=()))

        warm, times, want = timed_runs(plain, a.runs, dev)
        base = len(want) / statistics.median(times)
        row = {"prompt": pname, "prompt_tokens": len(ids), "plain": {"tok_s": base, "warmup_s": warm}}
        log(f"{pname}: plain {base:.1f} tok/s")
        for name, (dec, build, cal) in decoders.items():
            warm_s, times_s, got = timed_runs(
                lambda: list(dec.generate_ids(ids, a.new_tokens, greedy, stop_token_ids=())), a.runs, dev)
            st = dec.last_result_stats
            rate = len(got) / statistics.median(times_s)
            row[name] = {"tok_s": rate, "speedup": rate / base, "identical": got == want, "warmup_s": warm_s,
                         "build_s": build, "calibration": cal, **{k: v for k, v in st.to_dict().items()
                                                                  if k not in ("tokens_per_second",)}}
            log(f"  {name}: {rate:.1f} tok/s ({rate / base:.2f}x), acceptance {st.acceptance_rate:.0%}, "
                f"{st.mean_tokens_per_verify:.2f} tok/verify, verify {st.verify_steps} plain {st.plain_steps}, "
                f"hist {st.accepted_hist}, identical={got == want}")
        rows.append(row)
    return {"kind": "real", "model": lm.name, "device": device_label(dev), "dtype": str(model.dtype),
            "compile": a.compile, "k": a.k, "new_tokens": a.new_tokens, "runs": a.runs, "rows": rows,
            "torch": torch.__version__}


# ---- named shapes -------------------------------------------------------------------------------
def predicted(alpha: float, k: int, c_v: float, c_d: float) -> float:
    e = (1 - alpha ** (k + 1)) / (1 - alpha) if alpha < 1 else k + 1
    return e / (c_v + k * c_d)


def run_shapes(a) -> dict:
    from blitzgen.bench import build_random_model
    from blitzgen.config import ModelArgs
    from blitzgen.quant import make_config
    from blitzgen.speculative import NgramDraft, SpeculativeDecoder

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, a.dtype or ("bfloat16" if device == "cuda" else "float32"))
    ks = [int(k) for k in a.k_list.split(",")]
    alphas = [float(x) for x in a.acceptance.split(",")]
    out = {"kind": "shapes", "device": device_label(device), "dtype": str(dtype), "compile": a.compile,
           "context_pos": a.pos, "rows": [], "torch": torch.__version__}
    for shape in a.shape.split(","):
        args = ModelArgs.from_name(shape)
        step = {}
        for mode in a.modes.split(","):
            quant = None if mode == "bf16" else make_config(mode)
            model, _ = build_random_model(args, torch.device(device), dtype, quantize=quant)
            model.setup_caches(1, a.pos + max(ks) + 16)
            for k in ks:
                if device == "cuda":
                    torch._dynamo.reset()
                dec = SpeculativeDecoder(model, NgramDraft(), k=k, compile=a.compile)
                cal = dec.calibrate(reps=a.reps, prompt_len=a.pos)
                step[mode] = cal["step_s"]
                row = {"shape": shape, "mode": mode, "k": k, "verify_tokens": k + 1, **cal}
                out["rows"].append(row)
                log(f"{shape} {mode} K={k}: step {cal['step_s'] * 1e3:.2f} ms, verify({k + 1}) "
                    f"{cal['verify_s'] * 1e3:.2f} ms, c_v {cal['verify_cost']:.2f}")
            del model, dec
            if device == "cuda":
                torch.cuda.empty_cache()
        for row in out["rows"]:
            if row["shape"] != shape:
                continue
            c_v, k = row["verify_cost"], row["k"]
            row["predicted_speedup_ngram"] = {str(al): predicted(al, k, c_v, 0.0) for al in alphas}
            if "int4" in step and row["mode"] != "int4":
                c_d = step["int4"] / step[row["mode"]]
                row["draft_cost_self_int4"] = c_d
                row["predicted_speedup_self_int4"] = {str(al): predicted(al, k, c_v, c_d) for al in alphas}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("real", help="real weights: plain vs each source")
    r.add_argument("--model", default=None, metavar="DIR_OR_FILE",
                   help="anything blitzgen.loading.load accepts, or a GGUF split into parts: the directory "
                        "holding them or the path they were split from (default: the embedded SmolLM2)")
    r.add_argument("--sources", default="ngram,self-int4")
    r.add_argument("--prompts", default=None, help=f"comma list of {','.join(PROMPTS)}")
    r.add_argument("--k", type=int, default=4)
    r.add_argument("--new-tokens", type=int, default=200)
    r.add_argument("--runs", type=int, default=3)
    r.add_argument("--calibrate", action="store_true", help="measure verify/draft costs before the runs")
    s = sub.add_parser("shapes", help="verify vs one-token step on random weights of named shapes")
    s.add_argument("--shape", default="llama-2-7b,llama-3-8b")
    s.add_argument("--modes", default="bf16,int8,int4")
    s.add_argument("--k", dest="k_list", default="1,3,5,7")
    s.add_argument("--acceptance", default="0.5,0.7,0.8,0.9")
    s.add_argument("--pos", type=int, default=512, help="context position of the timed steps")
    s.add_argument("--reps", type=int, default=20)
    for p in (r, s):
        p.add_argument("--device", default=None)
        p.add_argument("--dtype", default=None)
        p.add_argument("--compile", action="store_true")
        p.add_argument("--json", default=None)
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.cmd == "real" and a.device is None:
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    result = run_real(a) if a.cmd == "real" else run_shapes(a)
    text = json.dumps(result, indent=1, default=str)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
