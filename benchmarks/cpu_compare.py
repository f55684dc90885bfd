"""CPU comparison: blitzgen vs Hugging Face transformers vs llama.cpp on one GGUF file.

Same file (default: the embedded SmolLM2-135M-Instruct Q4_1 GGUF), same chat-templated prompt ids,
greedy decoding of exactly --new-tokens tokens (EOS does not stop any engine), --threads CPU
threads for every engine. Engines:

- blitzgen eager, float32 and bfloat16 (weights dequantized from the GGUF on load);
- blitzgen as the CLI loads by default: a GGUF's 4-bit blocks kept as int4 g32, the head as stored;
- blitzgen compiled (--compile; a cold torch.compile on CPU takes minutes);
- transformers ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)``, float32, ``generate``;
- llama.cpp through llama-cpp-python (``Llama(...).generate(tokens, temp=0, top_k=1)``), running
  the GGUF's own quantized weights. Skipped with a note when ``llama_cpp`` is not installed.

Prints tokens/s (generated tokens over the whole generate call, prefill included; median of
--runs after one warm-up), decode-only tokens/s, time to first token, and whether each engine's
greedy token ids equal transformers' (blitzgen float32 must: same dequantized weights, same math).

    python benchmarks/cpu_compare.py [--compile] [--json out/cpu_compare.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

PROMPT = "Implement fibonacci in python"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_avg() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


# Each setup_* loads one engine and returns (one, load_s, extra): one() runs a whole greedy
# generation and returns (ids, ttft_s, total_s).


def setup_blitzgen(path: Path, prompt_ids: list[int], n: int, dtype: str, compile_: bool, auto: bool = False):
    """``auto``: as the CLI loads by default (loading.auto_quantization: the GGUF's 4-bit blocks
    stay int4 g32, the head as stored); else every weight widened to ``dtype``."""
    import torch

    from blitzgen.generate import GenerationStats, Generator
    from blitzgen.loading import auto_quantization, load
    from blitzgen.runtime import RuntimeOptions
    from blitzgen.sampling import SamplingParams

    t0 = time.perf_counter()
    opts = RuntimeOptions(device="cpu", dtype=dtype, compile=compile_, auto_quantize=auto)
    lm = load(path, auto_quantization(path, opts), progress=False)
    load_s = time.perf_counter() - t0
    gen = Generator(lm.model, lm.tokenizer, compile=compile_, max_seq_len=len(prompt_ids) + n)
    greedy = SamplingParams(temperature=0.0)
    extra = {}
    if compile_:
        t = time.perf_counter()
        list(gen.generate_ids(prompt_ids, n, greedy, stop_token_ids=()))
        extra["compile_s"] = time.perf_counter() - t
        log(f"  compiled in {extra['compile_s']:.0f} s")

    def one():
        stats = GenerationStats()
        t = time.perf_counter()
        ids = list(gen.generate_ids(prompt_ids, n, greedy, stop_token_ids=(), stats=stats))
        total = time.perf_counter() - t
        return ids, stats.time_to_first_token, total

    return one, load_s, extra


def setup_transformers(path: Path, prompt_ids: list[int], n: int):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t0
    model.generation_config.eos_token_id = None  # exactly n tokens, like the other engines

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    x = torch.tensor([prompt_ids])

    def one():
        clock = Clock()
        t = time.perf_counter()
        with torch.inference_mode():
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                               do_sample=False, pad_token_id=0, streamer=clock)
        total = time.perf_counter() - t
        ids = y[0, len(prompt_ids):].tolist()
        ttft = clock.times[1] - t if len(clock.times) > 1 else total  # put() #0 is the prompt
        return ids, ttft, total

    return one, load_s, {}


def setup_llamacpp(path: Path, prompt_ids: list[int], n: int, threads: int):
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=str(path), n_ctx=max(512, len(prompt_ids) + n + 8), n_threads=threads,
                n_threads_batch=threads, n_batch=512, seed=0, verbose=False)
    load_s = time.perf_counter() - t0

    def one():
        llm.reset()
        t = time.perf_counter()
        ttft, ids = None, []
        for tok in llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                reset=True):
            if ttft is None:
                ttft = time.perf_counter() - t
            ids.append(int(tok))
            if len(ids) == n:
                break
        return ids, ttft, time.perf_counter() - t

    return one, load_s, {}


def agreement(ids: list[int] | None, ref: list[int] | None) -> str:
    if ids is None or ref is None:
        return "-"
    if ids == ref:
        return "identical"
    k = next((i for i, (a, b) in enumerate(zip(ids, ref)) if a != b), min(len(ids), len(ref)))
    return f"differs from token {k}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also blitzgen compiled (cold compile takes minutes)")
    ap.add_argument("--skip", action="append", default=[],
                    help="skip engines: hf, llama.cpp, bf16, fp32, default (repeatable)")
    ap.add_argument("--json", default=None, help="write the results to this file")
    a = ap.parse_args(argv)

    try:
        import blitzgen  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import torch

    from blitzgen.loading import default_model_path
    from blitzgen.tokenizer import Tokenizer
    from blitzgen.loading import gguf as gguf_src

    torch.set_num_threads(a.threads)
    path = Path(a.model) if a.model else default_model_path()
    tok = Tokenizer.from_gguf(gguf_src.open_reader(path))
    prompt_ids = tok.encode_chat([{"role": "user", "content": a.prompt}])
    n = a.new_tokens
    log(f"{path.name}: prompt {len(prompt_ids)} tokens (chat template), {n} greedy tokens, {a.threads} threads, "
        f"torch {torch.__version__}")
    try:  # the prompt ids transformers' own tokenizer and template give, for the record
        from transformers import AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        hf_ids = hf_tok.apply_chat_template([{"role": "user", "content": a.prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        if isinstance(hf_ids, dict) or hasattr(hf_ids, "keys"):
            hf_ids = hf_ids["input_ids"]
        prompt_match = list(hf_ids) == prompt_ids
    except Exception as e:  # noqa: BLE001
        prompt_match = f"not checked ({type(e).__name__}: {e})"
    log(f"prompt ids equal transformers' chat template: {prompt_match}")

    engines = []
    if "hf" not in a.skip:
        engines.append(("transformers (GGUF -> fp32)", "float32", lambda: setup_transformers(path, prompt_ids, n)))
    if "fp32" not in a.skip:
        engines.append(("blitzgen eager", "float32", lambda: setup_blitzgen(path, prompt_ids, n, "float32", False)))
    if "bf16" not in a.skip:
        engines.append(("blitzgen eager", "bfloat16", lambda: setup_blitzgen(path, prompt_ids, n, "bfloat16", False)))
    if "default" not in a.skip:
        engines.append(("blitzgen eager, the CLI default", "int4 blocks (GGUF's own), int8 head",
                        lambda: setup_blitzgen(path, prompt_ids, n, "bfloat16", False, auto=True)))
    if a.compile:
        if "fp32" not in a.skip:
            engines.append(("blitzgen compiled", "float32",
                            lambda: setup_blitzgen(path, prompt_ids, n, "float32", True)))
        if "bf16" not in a.skip:
            engines.append(("blitzgen compiled", "bfloat16",
                            lambda: setup_blitzgen(path, prompt_ids, n, "bfloat16", True)))
        if "default" not in a.skip:
            engines.append(("blitzgen compiled", "int4 blocks (GGUF's own), int8 head",
                            lambda: setup_blitzgen(path, prompt_ids, n, "bfloat16", True, auto=True)))
    if "llama.cpp" not in a.skip:
        engines.append(("llama.cpp (llama-cpp-python)", "Q4_1 (GGUF's own)",
                        lambda: setup_llamacpp(path, prompt_ids, n, a.threads)))

    # Load (and compile) every engine, warm each up once, then time them in interleaved rounds so
    # that load from other processes on a shared machine falls on all engines alike.
    rows, live = [], []
    for name, dtype, setup in engines:
        log(f"- loading {name} {dtype} (load average {load_avg()})")
        row = dict(engine=name, dtype=dtype, runs=[])
        rows.append(row)
        if name.startswith("llama.cpp"):
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                row["note"] = "skipped: llama_cpp (llama-cpp-python) is not installed"
                log("  " + row["note"])
                continue
        try:
            one, load_s, extra = setup()
            row.update(load_s=load_s, **extra)
            one()  # warm-up
            live.append((row, one))
        except Exception as e:  # noqa: BLE001 - recorded, the others still run
            traceback.print_exc()
            row["note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    load_before = load_avg()
    for r in range(a.runs):
        log(f"round {r + 1}/{a.runs} (load average {load_avg()})")
        for row, one in live:
            try:
                ids, ttft, total = one()
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                row["note"] = f"failed: {type(e).__name__}: {e}"
                continue
            if row.get("ids") is not None and ids != row["ids"]:
                log(f"  warning: {row['engine']} {row['dtype']}: greedy ids differ between runs")
            row["ids"] = ids
            row["runs"].append(dict(ttft_s=ttft, total_s=total))
            log(f"  {row['engine']} {row['dtype']}: {n / total:.1f} tokens/s, first token {ttft * 1e3:.0f} ms")
    ref = None
    for row in rows:
        runs = row["runs"]
        if not runs:
            continue
        t = statistics.median(x["total_s"] for x in runs)
        f = statistics.median(x["ttft_s"] for x in runs)
        row.update(tok_s=n / t, best_tok_s=n / min(x["total_s"] for x in runs),
                   decode_tok_s=(n - 1) / (t - f) if t > f else None, ttft_ms=f * 1e3)
        if row["engine"].startswith("transformers"):
            ref = row["ids"]
    for row in rows:
        row["vs_transformers"] = "reference" if row["engine"].startswith("transformers") and row.get("ids") \
            else agreement(row.get("ids"), ref)

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    hdr = ("| engine | weights | tokens/s (median) | best | decode tokens/s | first token ms | load s "
           "| greedy ids vs transformers |")
    lines = [f"{path.name}, prompt {len(prompt_ids)} tokens, {n} greedy tokens, {a.threads} threads on {cpu}, "
             f"torch {torch.__version__}; median of {a.runs} interleaved rounds after a warm-up; load average "
             f"{load_before} before the rounds, {load_avg()} after", "", hdr, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(k, spec):
            return "-" if r.get(k) is None else format(r[k], spec)
        lines.append(f"| {r['engine']} | {r['dtype']} | {f('tok_s', '.1f')} | {f('best_tok_s', '.1f')} "
                     f"| {f('decode_tok_s', '.1f')} "
                     f"| {f('ttft_ms', '.0f')} | {f('load_s', '.1f')} | {r.get('note') or r['vs_transformers']} |")
    print("\n".join(lines), flush=True)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(dict(model=str(path), prompt=a.prompt, prompt_ids=prompt_ids,
                                                prompt_ids_match_transformers=prompt_match, new_tokens=n,
                                                threads=a.threads, torch=torch.__version__, cpu=cpu,
                                                load_average=[load_before, load_avg()], rows=rows),
                                           indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
