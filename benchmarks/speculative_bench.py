"""Speculative decoding benchmark (issue 11): real weights, verify cost on named shapes, compile time.

Every subcommand takes --budget SECONDS (from the script's start: nothing new starts once the
next piece would not fit; what was skipped is listed), writes its JSON to --json after every
piece (a killed run keeps what it measured) and prints a short table last.

    # (a) SmolLM2 (default model), greedy, plain vs each source on five prompts; tokens/s over the
    # whole request (median of --runs after a warm-up run), acceptance, tokens per verify, identity
    python benchmarks/speculative_bench.py real [--model M] [--sources ngram,self-int4] [--k 4]
        [--new-tokens 200] [--runs 3] [--compile] [--budget 300] [--json out.json]
    # (b) a (K+1)-token verify against a 1-token step on random weights of named shapes; --how
    # cudagraph: the eager model captured in a CUDA graph (builds in seconds); compile: the
    # decoder's own compiled graphs (SpeculativeDecoder.calibrate: ~35-85 s of compile per graph at 7B)
    python benchmarks/speculative_bench.py shapes --shape llama-2-7b,llama-3-8b --modes bf16,int8,int4
        --k 3,7 --how cudagraph,compile [--real real.json] [--budget 480] [--json out.json]
    # (c) compile (warm-up) seconds of the speculative path against plain decoding, each in a fresh
    # process with empty Inductor/Triton caches, as `generate` and `generate --speculate` warm up
    python benchmarks/speculative_bench.py compile [--model M | --shape llama-2-7b] [--configs
        plain,ngram,self-int4] [--budget 240] [--json out.json]
    # predicted speedup at the large shapes from (a)'s acceptance and (b)'s costs (no device)
    python benchmarks/speculative_bench.py combine --real real.json --shapes shapes.json

--model takes anything blitzgen.loading.load accepts (GGUF file, HF or GGUF directory, repo id), or
a GGUF split into parts (``split -b 45M model.gguf DIR/model.gguf.part-``, for a machine that
takes only so much per transfer): the directory holding the parts, or the path they were split
from; the parts are joined (once) into that path.

(b)'s PREDICTED speedup for per-token acceptance alpha is E / (c_v + K c_d), E = (1 - alpha^(K+1))
/ (1 - alpha), c_v = t(verify of K+1) / t(step), c_d = 0 for n-gram and t(int4 step) / t(step)
for self-int4. Predictions, not measurements: acceptance needs real weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

T_START = time.perf_counter()

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


# ---- budget and results ------------------------------------------------------------------------
class Results:
    """The JSON result, saved after every piece; the budget's clock."""

    def __init__(self, a, **meta):
        self.path, self.budget = a.json, a.budget
        self.data = {**meta, "budget_s": a.budget, "rows": [], "skipped": [], "errors": []}
        self.save()

    def left(self) -> float:
        return self.budget - (time.perf_counter() - T_START)

    def fits(self, what: str, need: float) -> bool:
        """Whether a piece expected to take `need` seconds fits; records it as skipped if not."""
        if need <= self.left():
            return True
        self.data["skipped"].append(f"{what} (needs ~{need:.0f} s, {max(0.0, self.left()):.0f} s left)")
        log(f"skipped: {self.data['skipped'][-1]}")
        self.save()
        return False

    def error(self, what: str, e: BaseException) -> None:
        self.data["errors"].append(f"{what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        log(f"error: {self.data['errors'][-1]}")
        self.save()

    def add(self, row: dict) -> None:
        self.data["rows"].append(row)
        self.save()

    def save(self) -> None:
        self.data["elapsed_s"] = time.perf_counter() - T_START
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path + ".tmp", "w") as f:
                json.dump(self.data, f, indent=1, default=str)
            os.replace(self.path + ".tmp", self.path)


def print_table(header: list[str], rows: list[list], notes: list[str] = ()) -> None:
    cells = [header] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, r in enumerate(cells):
        print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip())
        if j == 0:
            print("  ".join("-" * x for x in w))
    for n in notes:
        print(n)


def footer(res: Results) -> list[str]:
    d = res.data
    return ([f"skipped: {x}" for x in d["skipped"]] + [f"error: {x}" for x in d["errors"]]
            + [f"elapsed {d['elapsed_s']:.0f} s of a {d['budget_s']:.0f} s budget" + (f"; JSON: {res.path}" if res.path else "")])


# ---- (a) real weights ---------------------------------------------------------------------------
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
    sizes = [os.path.getsize(p) for p in parts]
    first = parts[0].rsplit(".part", 1)[1].lstrip("-_.")
    if len(set(sizes[:-1])) > 1 or sizes[-1] > sizes[0] or set(first) - {"a", "0"}:
        raise SystemExit(f"{spec}: the parts {[os.path.basename(p) for p in parts]} ({sizes} bytes) are not one "
                         "split's complete set (a part is missing or from another split)")
    tmp = path + ".joining"
    with open(tmp, "wb") as out:
        for p in parts:
            with open(p, "rb") as f:
                while chunk := f.read(1 << 24):
                    out.write(chunk)
    os.replace(tmp, path)
    log(f"joined {len(parts)} parts into {path} ({os.path.getsize(path) / 1e6:.1f} MB)")
    return path


def load_target(a):
    """(lm, Generator) for --model or --shape (random weights), on --device in --dtype."""
    from blitzgen.generate import Generator
    from blitzgen.loading import load

    # float32 on CPU: its fastest path there (bfloat16 matmuls are slow on most CPUs)
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.float32 if a.device == "cpu" else torch.bfloat16)
    if getattr(a, "shape", None):
        from blitzgen.config import ModelArgs
        from blitzgen.loading import load_random

        lm = load_random(ModelArgs.from_name(a.shape), device=a.device, dtype=dtype, progress=False)
    else:
        lm = load(resolve_model(a.model), device=a.device, dtype=dtype, progress=False)
    return lm, Generator(lm.model, lm.tokenizer, compile=a.compile)


def first_divergence(got: list[int], want: list[int]) -> int | None:
    """Index of the first token where two greedy outputs differ (None: identical). In bfloat16 a
    (K+1)-token verify rounds differently from one-token steps, so a near-tie can flip."""
    i = next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), None)
    return i if i is not None or len(got) == len(want) else min(len(got), len(want))


def run_real(a) -> Results:
    from blitzgen.sampling import SamplingParams
    from blitzgen.speculative import SpeculativeDecoder, make_draft

    t = time.perf_counter()
    lm, gen = load_target(a)
    model, tok = lm.model, lm.tokenizer
    dev = str(model.device)
    res = Results(a, kind="real", model=lm.name, device=device_label(dev), dtype=str(model.dtype), compile=a.compile,
                  k=a.k, new_tokens=a.new_tokens, runs=a.runs, torch=torch.__version__, load_s=time.perf_counter() - t,
                  draft_model="none: no smaller model shares SmolLM2's tokenizer here; self-int4 is SmolLM2 "
                              "itself in int4 (group 32) drafting for the float target")
    greedy = SamplingParams(temperature=0.0)
    # what a user gets: the answer, up to its end-of-turn token (--through-eos: a fixed length, the
    # model's text after the answer included, as sessions 6-14 measured)
    stop = () if a.through_eos else tuple(tok.eos_token_ids)
    res.data["stops_at_eos"] = not a.through_eos
    sources = [s for s in a.sources.split(",") if s]
    chats = {p: tok.encode_chat([{"role": "user", "content": t}]) for p, t in PROMPTS.items()
             if not a.prompts or p in a.prompts.split(",")}
    room = max(map(len, chats.values())) + a.new_tokens
    gen.ensure_capacity(room)  # one cache size for every prompt: nothing recompiles between them
    decoders: dict = {}
    last: dict[str, float] = {}  # seconds the last piece of each config took (its first: with compile)

    def need(key: str) -> float:  # a config not run yet costs what plain's first piece did
        return last.get(key, last.get("plain", 0.0))
    for pname, ids in chats.items():
        row = {"prompt": pname, "prompt_tokens": len(ids)}

        def plain():
            gen.forget_prefix()  # the decoders rewrite the KV cache; no prompt reuse between runs either
            return list(gen.generate_ids(ids, a.new_tokens, greedy, stop_token_ids=stop))

        if not res.fits(f"{pname} plain", need("plain")):
            continue
        t = time.perf_counter()
        warm, times, want = timed_runs(plain, a.runs, dev)
        last["plain"] = time.perf_counter() - t
        base = len(want) / statistics.median(times)
        row["plain"] = {"tok_s": base, "tokens": len(want), "warmup_s": warm, "text": tok.decode(want)[:160]}
        log(f"{pname}: plain {base:.1f} tok/s")
        for name in sources:
            if not res.fits(f"{pname} {name}", need(name)):
                continue
            t = time.perf_counter()
            try:
                if name not in decoders:
                    t0 = time.perf_counter()
                    dec = SpeculativeDecoder(model, make_draft(name, model), k=a.k, gen=gen)
                    dec.ensure_capacity(room)
                    if a.compile:
                        dec.warmup([greedy])  # compiles; on CUDA also measures the controller's costs
                    elif a.calibrate:
                        dec.calibrate()
                    decoders[name] = (dec, time.perf_counter() - t0, dec.calibration)
                dec, build, cal = decoders[name]
                warm_s, times_s, got = timed_runs(
                    lambda: list(dec.generate_ids(ids, a.new_tokens, greedy, stop_token_ids=stop)), a.runs, dev)
            except Exception as e:  # noqa: BLE001 - recorded, the other sources still run
                res.error(f"{pname} {name}", e)
                continue
            last[name] = time.perf_counter() - t
            st = dec.last_result_stats
            rate = len(got) / statistics.median(times_s)
            row[name] = {"tok_s": rate, "speedup": rate / base, "identical": got == want,
                         "first_divergence": first_divergence(got, want), "warmup_s": warm_s,
                         "build_s": build, "calibration": cal,
                         **{k: v for k, v in st.to_dict().items() if k != "tokens_per_second"}}
            log(f"  {name}: {rate:.1f} tok/s ({rate / base:.2f}x), acceptance {st.acceptance_rate:.0%}, "
                f"{st.mean_tokens_per_verify:.2f} tok/verify, verify {st.verify_steps} plain {st.plain_steps}, "
                f"hist {st.accepted_hist}, identical={got == want} (first divergence {first_divergence(got, want)})")
        res.add(row)
    return res


def table_real(res: Results) -> None:
    d = res.data
    srcs = [s for s in ("ngram", "self-int4", "draft-model") if any(s in r for r in d["rows"])]
    rows = []
    for r in d["rows"]:
        cells = [r["prompt"], str(r["plain"].get("tokens", "")), f"{r['plain']['tok_s']:.1f}"]
        for s in srcs:
            x = r.get(s)
            cells.append(f"{x['tok_s']:.1f} {x['speedup']:.2f}x acc {x['acceptance_rate']:.0%} "
                         f"{x['mean_tokens_per_verify']:.2f}t/v{'' if x['identical'] else ' DIFFERS'}" if x else "-")
        rows.append(cells)
    print(f"\n(a) {d['model']} on {d['device']}, {d['dtype']}, compile={d['compile']}, k<={d['k']}, greedy, "
          f"{'up to ' if d.get('stops_at_eos') else ''}{d['new_tokens']} new tokens"
          f"{', stopping at the end of the answer' if d.get('stops_at_eos') else ''}, median of {d['runs']}")
    print_table(["prompt", "tokens", "plain tok/s"] + [f"{s}: tok/s speedup acceptance tokens/verify" for s in srcs], rows,
                footer(res))


# ---- (b) named shapes ---------------------------------------------------------------------------
def predicted(alpha: float, k: int, c_v: float, c_d: float) -> float:
    e = (1 - alpha ** (k + 1)) / (1 - alpha) if alpha < 1 else k + 1
    return e / (c_v + k * c_d)


def cudagraph_costs(model, ks: list[int], pos: int, reps: int) -> dict:
    """The eager model's 1-token step and (K+1)-token verify forwards, each captured in a CUDA graph
    and timed by replay (median of reps): {"step_s", "verify_s": {K: s}}."""
    dev = model.device

    def capture(T: int):
        idx = torch.zeros((1, T), dtype=torch.int64, device=dev)
        p = torch.arange(T, device=dev) + pos
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                model(idx, p)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            model(idx, p)
        ts = []
        for _ in range(reps + 2):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
        del g
        return sorted(ts[2:])[len(ts[2:]) // 2]

    with torch.inference_mode():
        return {"step_s": capture(1), "verify_s": {k: capture(k + 1) for k in ks}}


def run_shapes(a) -> Results:
    from blitzgen.bench import build_random_model
    from blitzgen.config import ModelArgs
    from blitzgen.generate import Generator
    from blitzgen.quant import make_config
    from blitzgen.speculative import NgramDraft, SpeculativeDecoder

    device = a.device
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    ks = [int(k) for k in a.k_list.split(",")]
    hows = a.how.split(",")
    res = Results(a, kind="shapes", device=device_label(device), dtype=str(dtype), context_pos=a.pos,
                  torch=torch.__version__, hows=hows)
    cost: dict = {}  # (how, shape, mode) -> seconds it took, to skip what will not fit
    for how in hows:
        if how == "cudagraph" and not device.startswith("cuda"):
            res.data["skipped"].append("cudagraph: needs CUDA")
            continue
        for shape in a.shape.split(","):
            args = ModelArgs.from_name(shape)
            for mode in a.modes.split(","):
                # nothing measured yet: about what a cold 7B graph takes on an H200 (int8 ~2x)
                prior = 0.0 if how == "cudagraph" else 40.0 * (1 + len(ks)) * (2 if mode == "int8" else 1)
                guess = cost.get((how, shape, mode)) or cost.get((how, mode)) or (prior if device.startswith("cuda")
                                                                                  else 0.0)
                if not res.fits(f"{how} {shape} {mode}", guess):
                    continue
                t0 = time.perf_counter()
                try:
                    quant = None if mode in ("bf16", "none", "float") else make_config(mode)
                    model, _ = build_random_model(args, torch.device(device), dtype, quantize=quant)
                    model.setup_caches(1, a.pos + max(ks) + 16)
                    if how == "cudagraph":
                        c = cudagraph_costs(model, ks, a.pos, a.reps)
                        got = {k: (c["step_s"], c["verify_s"][k], None) for k in ks}
                    else:  # one Generator: its step graph serves every K; one verify graph per K
                        got, gen = {}, Generator(model, None, compile=True)
                        for k in ks:
                            t = time.perf_counter()
                            cal = SpeculativeDecoder(model, NgramDraft(), k=k, gen=gen).calibrate(
                                reps=a.reps, prompt_len=a.pos)
                            got[k] = (cal["step_s"], cal["verify_s"], time.perf_counter() - t)
                except Exception as e:  # noqa: BLE001 - recorded, the other shapes still run
                    res.error(f"{how} {shape} {mode}", e)
                    continue
                finally:
                    model = gen = None
                    if device.startswith("cuda"):
                        torch.cuda.empty_cache()
                for k, (ts, tv, wall) in got.items():
                    # compile: wall_s includes compiling the graphs first used there (K's verify, the step at the first K)
                    res.add({"how": how, "shape": shape, "mode": mode, "k": k, "verify_tokens": k + 1, "step_s": ts,
                             "verify_s": tv, "verify_cost": tv / ts, "wall_s": wall})
                    log(f"{how} {shape} {mode} K={k}: step {ts * 1e3:.3f} ms, verify({k + 1}) {tv * 1e3:.3f} ms, "
                        f"c_v {tv / ts:.3f}")
                cost[(how, shape, mode)] = cost[(how, mode)] = time.perf_counter() - t0
    add_predictions(res.data, load_real(a.real), [float(x) for x in a.acceptance.split(",")])
    res.save()
    return res


def load_real(path: str | None) -> dict | None:
    if not path:
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        log(f"--real {path}: {e}; predictions from the alpha grid only")
        return None


def add_predictions(d: dict, real: dict | None, alphas: list[float]) -> None:
    """PREDICTED speedups on each shapes row: over an alpha grid, and (with (a)'s JSON) at the
    acceptance measured for each source and prompt on real weights."""
    step = {(r["how"], r["shape"], r["mode"]): r["step_s"] for r in d["rows"]}
    measured = {}
    for r in (real or {}).get("rows", []):
        for s in ("ngram", "self-int4"):
            if s in r:
                measured[(s, r["prompt"])] = r[s]["acceptance_rate"]
    for r in d["rows"]:
        c_v, k = r["verify_cost"], r["k"]
        c_d = {"ngram": 0.0}
        int4 = step.get((r["how"], r["shape"], "int4"))
        if int4 is not None and r["mode"] != "int4":
            c_d["self-int4"] = r["draft_cost_self_int4"] = int4 / r["step_s"]
        r["predicted_speedup"] = {s: {str(al): predicted(al, k, c_v, cd) for al in alphas} for s, cd in c_d.items()}
        r["predicted_speedup_at_measured_acceptance"] = {
            f"{s}/{p}": predicted(al, k, c_v, c_d[s]) for (s, p), al in measured.items() if s in c_d}


def table_shapes(res: Results) -> None:
    d = res.data
    rows = []
    for r in d["rows"]:
        pm = r.get("predicted_speedup_at_measured_acceptance") or {}
        best = max(pm.items(), key=lambda kv: kv[1]) if pm else None
        rows.append([r["how"], r["shape"], r["mode"], r["k"], f"{r['step_s'] * 1e3:.3f}", f"{r['verify_s'] * 1e3:.3f}",
                     f"{r['verify_cost']:.3f}", f"{r.get('draft_cost_self_int4', float('nan')):.2f}",
                     " ".join(f"{s}:{v['0.8']:.2f}" for s, v in r["predicted_speedup"].items() if "0.8" in v),
                     f"{best[0]} {best[1]:.2f}x" if best else "-"])
    print(f"\n(b) verify of K+1 tokens vs a 1-token step, {d['device']}, {d['dtype']}, context position "
          f"{d['context_pos']}; speedups are PREDICTED")
    print_table(["how", "shape", "mode", "K", "step ms", "verify ms", "c_v", "c_d int4",
                 "predicted @alpha .8", "predicted, best measured acceptance"], rows, footer(res))


def run_combine(a) -> Results:
    with open(a.shapes) as f:
        d = json.load(f)
    add_predictions(d, load_real(a.real), [float(x) for x in a.acceptance.split(",")])
    res = Results(a, **{k: v for k, v in d.items() if k not in ("rows", "skipped", "errors", "budget_s")})
    res.data.update(rows=d["rows"], skipped=d.get("skipped", []), errors=d.get("errors", []))
    res.save()
    return res


# ---- (c) compile time ---------------------------------------------------------------------------
def run_compile(a) -> Results:
    """Each config in a fresh process with empty Inductor/Triton/blitzgen caches."""
    res = Results(a, kind="compile", model=a.shape or a.model or "SmolLM2-135M-Instruct (default)", k=a.k,
                  torch=torch.__version__)
    plain = None
    for cfg in a.configs.split(","):
        guess = 1.6 * plain if plain else 0.0
        if not res.fits(f"compile {cfg}", guess):
            continue
        tmp = tempfile.mkdtemp(prefix=f"specbench-{cfg}-")
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor"),
                   TRITON_CACHE_DIR=os.path.join(tmp, "triton"), BLITZGEN_CACHE=os.path.join(tmp, "blitzgen"))
        cmd = [sys.executable, os.path.abspath(__file__), "compile-one", "--config", cfg, "--k", str(a.k),
               "--device", a.device, "--new-tokens", str(a.new_tokens)]
        for opt, v in (("--model", a.model), ("--shape", a.shape), ("--dtype", a.dtype)):
            if v:
                cmd += [opt, v]
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(10.0, res.left()))
            line = [x for x in p.stdout.splitlines() if x.startswith("{")]
            if p.returncode or not line:
                raise RuntimeError(f"exit {p.returncode}: {(p.stderr.strip().splitlines() or [''])[-1]}")
            row = json.loads(line[-1])
        except Exception as e:  # noqa: BLE001 - recorded, the other configs still run
            res.error(f"compile {cfg}", e)
            continue
        if cfg == "plain":
            plain = row["compile_s"]
        row["vs_plain"] = row["compile_s"] / plain if plain else None
        res.add(row)
        log(f"compile {cfg}: {row['compile_s']:.1f} s" + (f" ({row['vs_plain']:.2f}x plain)" if plain else ""))
    return res


def run_compile_one(a) -> int:
    """One config in this (fresh) process: load, warm up as `generate` does, then one request."""
    from blitzgen.sampling import SamplingParams
    from blitzgen.speculative import SpeculativeDecoder, make_draft

    a.compile = True
    t = time.perf_counter()
    lm, gen = load_target(a)
    load_s = time.perf_counter() - t
    greedy = SamplingParams(temperature=0.0)
    prompt = (lm.tokenizer.encode_chat([{"role": "user", "content": PROMPTS["fibonacci"]}])
              if lm.tokenizer is not None and getattr(lm.tokenizer, "chat_template", None) else list(range(1, 20)))
    gen.ensure_capacity(len(prompt) + a.new_tokens)  # as `generate` does before warming up
    t = time.perf_counter()
    if a.config == "plain":
        compile_s = gen.warmup([greedy], prompt_len=len(prompt))
        run = lambda: list(gen.generate_ids(prompt, a.new_tokens, greedy, stop_token_ids=()))  # noqa: E731
    else:
        dec = SpeculativeDecoder(lm.model, make_draft(a.config, lm.model), k=a.k, gen=gen)
        dec.ensure_capacity(len(prompt) + a.new_tokens)  # the draft's cache too
        build_s = time.perf_counter() - t
        compile_s = build_s + dec.warmup([greedy], prompt_lens=[len(prompt)])
        run = lambda: list(dec.generate_ids(prompt, a.new_tokens, greedy, stop_token_ids=()))  # noqa: E731
    dev = str(lm.model.device)
    sync(dev)
    t = time.perf_counter()
    n = len(run())
    sync(dev)
    first = time.perf_counter() - t
    t = time.perf_counter()
    run()
    sync(dev)
    second = time.perf_counter() - t
    import torch._dynamo.utils as du

    print(json.dumps({"config": a.config, "compile_s": compile_s, "load_s": load_s, "tokens": n,
                      "first_request_s": first, "second_request_s": second,
                      "unique_graphs": du.counters["stats"].get("unique_graphs", 0)}), flush=True)
    return 0


def table_compile(res: Results) -> None:
    d = res.data
    rows = [[r["config"], f"{r['compile_s']:.1f}", f"{r['vs_plain']:.2f}x" if r["vs_plain"] else "-",
             f"{r['first_request_s']:.2f}", f"{r['second_request_s']:.2f}", r["unique_graphs"]] for r in d["rows"]]
    print(f"\n(c) compile (warm-up) of {d['model']}, fresh process and empty caches each, k<={d['k']}; target: "
          "speculative <= 1.5x plain; a first request much slower than the second means it compiled")
    print_table(["config", "compile s", "vs plain", "1st request s", "2nd request s", "graphs"], rows, footer(res))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("real", help="(a) real weights: plain vs each source")
    r.add_argument("--sources", default="ngram,self-int4")
    r.add_argument("--prompts", default=None, help=f"comma list of {','.join(PROMPTS)}")
    r.add_argument("--new-tokens", type=int, default=200)
    r.add_argument("--through-eos", action="store_true",
                   help="generate --new-tokens whatever the model says (default: stop at the end of the answer)")
    r.add_argument("--runs", type=int, default=3)
    r.add_argument("--calibrate", action="store_true", help="eager: measure verify/draft costs before the runs "
                   "(compiled on CUDA the warm-up does)")
    s = sub.add_parser("shapes", help="(b) verify vs one-token step on random weights of named shapes")
    s.add_argument("--shape", default="llama-2-7b,llama-3-8b")
    s.add_argument("--modes", default="bf16,int8,int4")
    s.add_argument("--k", dest="k_list", default="3,7")
    s.add_argument("--how", default="cudagraph,compile", help="cudagraph and/or compile, in that order")
    s.add_argument("--pos", type=int, default=512, help="context position of the timed steps")
    s.add_argument("--reps", type=int, default=20)
    s.add_argument("--real", default=None, metavar="JSON", help="(a)'s JSON: predict at its measured acceptance")
    c = sub.add_parser("compile", help="(c) compile time, speculative vs plain, fresh processes")
    c.add_argument("--configs", default="plain,ngram,self-int4")
    one = sub.add_parser("compile-one", help=argparse.SUPPRESS)
    one.add_argument("--config", required=True)
    m = sub.add_parser("combine", help="predictions from (a)'s and (b)'s JSON files (no device)")
    m.add_argument("--shapes", required=True, metavar="JSON")
    m.add_argument("--real", default=None, metavar="JSON")
    for p in (s, m):
        p.add_argument("--acceptance", default="0.5,0.7,0.8,0.9")
    for p in (r, c, one):
        p.add_argument("--model", default=None, metavar="DIR_OR_FILE",
                       help="anything blitzgen.loading.load accepts, or a GGUF split into parts: the directory "
                            "holding them or the path they were split from (default: the embedded SmolLM2)")
        p.add_argument("--k", type=int, default=4)
        p.add_argument("--compile", action="store_true")
    for p in (c, one):
        p.add_argument("--shape", default=None, help="random weights of a named shape instead of --model")
        p.add_argument("--new-tokens", type=int, default=64)
    for p in (r, s, c, one, m):
        p.add_argument("--device", default=None)
        p.add_argument("--dtype", default=None)
        p.add_argument("--json", default=None)
        p.add_argument("--budget", type=float, default=480.0, help="seconds from the start (default 480)")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device is None:
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.cmd == "compile-one":
        return run_compile_one(a)
    run, table = {"real": (run_real, table_real), "shapes": (run_shapes, table_shapes),
                  "compile": (run_compile, table_compile), "combine": (run_combine, table_shapes)}[a.cmd]
    table(run(a))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
