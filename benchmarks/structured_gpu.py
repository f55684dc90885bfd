"""Decode speed with a JSON schema active vs unconstrained decode (issue 13: within 5% on the H200).

Random weights of a named shape (no network, no checkpoint), greedy, the same prompt and the same
number of new tokens for every variant; decode tokens/s = (tokens - 1) / (last token - first token),
median over --reps runs, the variants interleaved within each rep:

  plain          Generator.generate_ids: the fused, run-ahead decode step (what plain requests use)
  loop           constrained.token_loop with no grammar and no logprobs
  loop+schema    the loop with a JSON-schema grammar (xgrammar) masking every step
  loop+schema+lp the same with top_logprobs=5

The schema (an object whose "xs" array needs >= 1000 integers) keeps the grammar active for every
measured token; with random weights the mask decides the tokens. The model's vocabulary is the
tokenizer's (49152 for SmolLM2) unless --shape-vocab keeps the shape's (then the grammar's bitmask is
padded to it). The GPU machine cannot read the default GGUF, so save its tokenizer here first:

    PYTHONPATH=src python benchmarks/structured_gpu.py --save-tokenizer .dev/tok
    PYTHONPATH=src python benchmarks/structured_gpu.py --tokenizer .dev/tok --compile --json $OUT/s.json
    PYTHONPATH=src python benchmarks/structured_gpu.py --shape tiny --device cpu --dtype float32 --new-tokens 32
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GPU machine has no network

import torch  # noqa: E402

from blitzgen.bench import (BenchOptions, _quant_config, _release, _resolve, _runtime,  # noqa: E402
                            build_random_model, device_name)

SCHEMA = {"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer"}, "minItems": 1000}},
          "required": ["xs"], "additionalProperties": False}
PROMPT = "Return a JSON object whose key xs holds the integers from 1 to 1000."
VARIANTS = ("plain", "loop", "loop+schema", "loop+schema+lp")
LABELS = {"plain": "plain (Generator.generate_ids)", "loop": "token_loop, no constraint",
          "loop+schema": "token_loop + json_schema", "loop+schema+lp": "token_loop + json_schema + top_logprobs=5"}


def load_tokenizer(path: str | None):
    """An HF tokenizer directory, or the default model's (SmolLM2) from its GGUF."""
    from blitzgen.tokenizer import Tokenizer

    if path:
        return Tokenizer.from_hf_dir(path)
    from blitzgen.loading import default_model_path
    from blitzgen.loading import gguf as gguf_src

    return Tokenizer.from_gguf(gguf_src.open_reader(default_model_path()))


def save_tokenizer(dest: str) -> int:
    tok = load_tokenizer(None)
    tok.save_pretrained(dest)
    back = load_tokenizer(dest)  # what --tokenizer will load
    assert back.vocab_size == tok.vocab_size and back.eos_token_ids == tok.eos_token_ids
    assert back.encode(PROMPT) == tok.encode(PROMPT)
    size = sum(os.path.getsize(os.path.join(dest, f)) for f in os.listdir(dest))
    print(f"wrote {', '.join(sorted(os.listdir(dest)))} to {dest}: {size / 1e6:.2f} MB, vocab {tok.vocab_size}")
    return 0


def run_once(gen, name: str, prompt: list[int], n: int, constraint) -> tuple[object, list[int]]:
    """One greedy request of exactly n tokens on variant `name`; returns (GenerationStats, token ids)."""
    from blitzgen.constrained import token_loop
    from blitzgen.generate import GenerationStats
    from blitzgen.sampling import SamplingParams

    greedy, stats = SamplingParams(temperature=0.0), GenerationStats()
    gen.forget_prefix()  # every run prefills the whole prompt
    if gen.is_cuda:
        torch.cuda.synchronize(gen.device)
    if name == "plain":
        tokens = gen.generate_ids(prompt, n, greedy, stop_token_ids=(), stats=stats)
    else:
        c = constraint if "schema" in name else None
        if c is not None:
            c.reset()
        tokens = token_loop(gen, prompt, n, greedy, set(), stats, top_logprobs=5 if name.endswith("lp") else None,
                            constraint=c, rows=[])
    ids = list(tokens)
    if len(ids) != n:
        raise RuntimeError(f"{name}: generated {len(ids)} tokens, expected {n}")
    return stats, ids


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-3-8b", help="a named shape of blitzgen bench (random weights)")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--dtype", default=None, help="default: bfloat16")
    p.add_argument("--mode", default="bf16", choices=["bf16", "int8", "int4"], help="weight-only quantization")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compiled (CUDA-graph) decode step; default: on for CUDA, as blitzgen bench")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--reps", type=int, default=5, help="timed runs of each variant (after one warm-up each)")
    p.add_argument("--tokenizer", metavar="DIR", help="HF tokenizer directory (default: the default GGUF's)")
    p.add_argument("--save-tokenizer", metavar="DIR", help="write the default model's tokenizer to DIR and exit")
    p.add_argument("--shape-vocab", action="store_true", help="keep the shape's vocab_size (>= the tokenizer's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    a = p.parse_args(argv)
    if a.save_tokenizer:
        return save_tokenizer(a.save_tokenizer)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    from blitzgen.config import ModelArgs
    from blitzgen.generate import Generator
    from blitzgen.structured import GrammarConstraint

    tok = load_tokenizer(a.tokenizer)
    prompt = tok.encode(PROMPT)
    opts = BenchOptions(shape=a.shape, mode=a.mode, prompt_len=len(prompt), new_tokens=a.new_tokens,
                        runs=a.reps, device=a.device, dtype=a.dtype, compile=a.compile, seed=a.seed)
    device, dtype, compile_ = _resolve(opts)
    args = ModelArgs.from_name(a.shape)
    if not a.shape_vocab:
        args = args.replace(vocab_size=tok.vocab_size)
    elif args.vocab_size < tok.vocab_size:
        raise SystemExit(f"--shape-vocab: {a.shape}'s vocab {args.vocab_size} < the tokenizer's {tok.vocab_size}")
    N = a.new_tokens
    log(f"building {a.shape} (vocab {args.vocab_size}, {args.num_params() / 1e9:.2f}B parameters) with random "
        f"weights on {device}, {str(dtype).replace('torch.', '') if a.mode == 'bf16' else a.mode}, "
        f"{'compiled' if compile_ else 'eager'}")
    t0 = time.perf_counter()
    model, _ = build_random_model(args, device, dtype, a.seed,
                                  quantize=_quant_config(a.mode, None) if a.mode != "bf16" else None)
    gen = Generator(model, tok, options=_runtime(opts), compile=compile_, max_seq_len=len(prompt) + N)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    constraint = GrammarConstraint.from_json_schema(SCHEMA, tok, vocab_size=args.vocab_size)
    grammar_s = time.perf_counter() - t0
    log(f"built in {build_s:.1f} s; grammar (tokenizer info + schema) compiled in {grammar_s:.2f} s")

    stats: dict[str, list] = {v: [] for v in VARIANTS}
    ids: dict[str, list[int]] = {}
    try:
        for v in VARIANTS:  # warm-up: compiles and captures (plain first: the shared model step)
            t0 = time.perf_counter()
            run_once(gen, v, prompt, N, constraint)
            log(f"warm-up {v}: {time.perf_counter() - t0:.1f} s")
        for r in range(a.reps):
            for v in VARIANTS:
                st, ids[v] = run_once(gen, v, prompt, N, constraint)
                stats[v].append(st)
            log(f"rep {r + 1}/{a.reps}: " + ", ".join(f"{v} {stats[v][-1].decode_tokens_per_second:.1f}"
                                                      for v in VARIANTS) + " tok/s")
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    finally:
        del gen, model
        _release(device)

    results = {}
    for v in VARIANTS:
        rates = [s.decode_tokens_per_second for s in stats[v]]
        med = statistics.median(rates)
        results[v] = dict(label=LABELS[v], decode_tok_s=med, ms_per_token=1e3 / med, decode_tok_s_runs=rates,
                          ttft_ms=statistics.median(s.time_to_first_token * 1e3 for s in stats[v]))
    base = results["plain"]["decode_tok_s"]
    for r in results.values():
        r["ratio"] = r["decode_tok_s"] / base
    text = tok.decode(ids["loop+schema"])
    out = dict(tool="benchmarks/structured_gpu.py", command=" ".join([os.path.basename(sys.executable)] + sys.argv),
               date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), torch=torch.__version__,
               python=platform.python_version(), device=str(device), gpu=device_name(device), shape=a.shape,
               vocab_size=args.vocab_size, num_params=args.num_params(), dtype=str(dtype).replace("torch.", ""),
               mode=a.mode, compile=compile_, prompt_tokens=len(prompt), new_tokens=N, reps=a.reps,
               tokenizer=a.tokenizer or "default GGUF", schema=SCHEMA, grammar_compile_s=grammar_s, build_s=build_s,
               peak_memory_bytes=peak, results=results,
               loop_equals_plain=ids["loop"] == ids["plain"],  # greedy: the same tokens expected
               schema_equals_lp=ids["loop+schema"] == ids["loop+schema+lp"],
               schema_text_head=text[:80])
    what = out["dtype"] if a.mode == "bf16" else a.mode
    print(f"structured decode: {a.shape} (vocab {args.vocab_size}), {what}, "
          f"{'compiled' if compile_ else 'eager'}, prompt {len(prompt)} + {N} new tokens, greedy, median of {a.reps}\n"
          f"{out['gpu']}, torch {out['torch']}, {out['date']}\n")
    print(f"{'variant':44}{'decode tok/s':>13}{'ms/token':>10}{'vs plain':>10}")
    for r in results.values():
        print(f"{r['label']:44}{r['decode_tok_s']:13.2f}{r['ms_per_token']:10.3f}{r['ratio']:10.3f}")
    print(f"\ntarget (issue 13): json_schema >= 0.95 x plain; loop == plain tokens: {out['loop_equals_plain']}; "
          f"schema output starts {text[:40]!r}")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
