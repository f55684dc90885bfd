"""``blitzgen bench``: tokens/s, time to first token and % of the copy roofline, optionally beside
gpt-fast's own generate() on the same card (see blitzgen/bench.py)."""

from __future__ import annotations

import shlex
import sys


def register(sub) -> None:
    from .common import add_model_source_args, add_runtime_args, add_sampling_args

    p = sub.add_parser(
        "bench", help="benchmark batch-1 decode (tokens/s, %% of roofline), optionally beside gpt-fast",
        description="Generate exactly --new-tokens tokens after a random --prompt-len token prompt, --runs "
                    "times after a warm-up (compile) run, and report tokens/s (generated tokens over the whole "
                    "generate time, like gpt-fast), decode-only tokens/s, time to first token, bandwidth achieved "
                    "and its share of the card's measured copy bandwidth.")
    src = add_model_source_args(p, help="real weights: HF directory, GGUF file, quantized checkpoint or repo id "
                                        "(default: random weights of --shape)")
    src.add_argument("--shape", default=None,
                     help="named architecture with random weights made on the device (llama-2-7b, llama-3-8b, "
                          "llama-2-13b, llama-2-70b, mistral-7b, tiny, ...). Default: llama-2-7b on CUDA, the "
                          "embedded SmolLM2-135M model on CPU")
    src.add_argument("--save", default=None, metavar="DIR",
                     help="write the --shape's random weights to DIR as a Hugging Face checkpoint (sharded "
                          "safetensors, config.json, a tokenizer) and exit, to time loading with --model DIR")
    # --mode bf16|int8|int4 is the old spelling of --quantize (bf16: none)
    add_runtime_args(p, only=("device", "dtype", "compile", "compile_prefill", "autotune", "quantize", "group_size"),
                     mode_alias=True,
                     mode_none=("bf16",), quantize={"help": "weight-only quantization (default: none, weights in "
                                                            "--dtype; a quantized checkpoint is labelled as such)"})
    run = p.add_argument_group("run")
    run.add_argument("--prompt-len", type=int, default=5, help="random prompt tokens")
    run.add_argument("--new-tokens", type=int, default=200, help="tokens generated per run; EOS never stops a run")
    run.add_argument("--runs", type=int, default=5, help="timed runs, median reported")
    run.add_argument("--warmup", type=int, default=1, help="untimed runs first; the first one compiles")
    add_sampling_args(p, only=("temperature", "top_k", "seed"),
                      temperature={"help": "sampling temperature, as in gpt-fast; 0 is greedy"},
                      top_k={"help": "sample from the K most likely tokens, as in gpt-fast; 0 disables"},
                      seed={"default": 0, "help": "weights, prompt and sampling seed"})
    from .speculate import add_speculation_args

    add_speculation_args(p, sources=("ngram", "self-int4"), draft_model=False,
                         help_note=". Runs the speculative decoder instead of plain decode and reports acceptance "
                                   "and tokens per verify step. On random weights (--shape) and a random prompt, "
                                   "n-gram acceptance is about 0 (speculation switches itself off) and "
                                   "self-int4's says little about real text: measure real prompts with "
                                   "benchmarks/speculative_bench.py")
    from .common import add_parallel_args

    tp = add_parallel_args(p)
    tp.add_argument("--time-all-reduce", action="store_true",
                    help="with --tp > 1: also time each all-reduce choice at this shape's decode and prompt "
                         "message sizes (a CUDA graph of 200 calls on GPU)")
    out = p.add_argument_group("output")
    out.add_argument("--json", default=None, metavar="FILE",
                     help="write the result as JSON to FILE ('-': print one JSON object on stdout, the table "
                          "goes to stderr)")
    out.add_argument("--no-roofline", dest="roofline", action="store_false",
                     help="skip measuring the copy bandwidth")
    peer = p.add_argument_group("peer")
    peer.add_argument("--peer", action="append", default=[], metavar="gpt-fast=DIR",
                      help="also run gpt-fast's own generate() (files exported into DIR) in a subprocess with the "
                           "same shape, mode, prompt and new tokens, and report the ratio")
    peer.add_argument("--peer-timeout", type=float, default=900.0, help="seconds before the peer run is killed")
    peer.add_argument("--peer-shape", default=None, metavar="PRESET",
                      help="gpt-fast preset to run instead of the one matching --shape (e.g. stories15M)")
    p.set_defaults(func=run_cmd)


def parse_peers(items: list[str]) -> dict[str, str]:
    from ..errors import BlitzgenError

    peers = {}
    for item in items:
        name, sep, where = item.partition("=")
        if not sep or not name or not where:
            raise BlitzgenError(f"--peer takes NAME=DIR (e.g. gpt-fast=.peers/gpt-fast), got {item!r}")
        peers[name.strip().lower()] = where
    return peers


def options_from_args(args):
    from ..bench import BenchOptions

    return BenchOptions(
        shape=args.shape, model=args.model, mode=args.quantize if args.quantize not in (None, "none") else "bf16", group_size=args.group_size,
        prompt_len=args.prompt_len, new_tokens=args.new_tokens, runs=args.runs, warmup=args.warmup,
        device=args.device, dtype=args.dtype, compile=args.compile, temperature=args.temperature,
        compile_prefill=args.compile_prefill, autotune=args.autotune,
        top_k=args.top_k, seed=args.seed, roofline=args.roofline, peers=parse_peers(args.peer),
        peer_timeout=args.peer_timeout, peer_shape=args.peer_shape, command=command_line(args),
        save=getattr(args, "save", None), speculate=(args.speculate or [None])[0],
        speculate_k=args.speculate_k or 4, tp=args.tp, all_reduce=args.all_reduce,
        time_all_reduce=args.time_all_reduce,
    )


def command_line(args) -> str:
    """The command as typed when this process is the blitzgen CLI, else its canonical form."""
    argv0 = sys.argv[0].replace("\\", "/") if sys.argv else ""
    ours = argv0.rsplit("/", 1)[-1] in ("blitzgen", "blitzgen.exe") or argv0.endswith(
        ("blitzgen/cli.py", "blitzgen/__main__.py"))
    if ours and "bench" in sys.argv[1:]:
        return shlex.join(["blitzgen", *sys.argv[1:]])
    parts = ["blitzgen", "bench"]
    for key in ("shape", "model", "quantize", "group_size", "prompt_len", "new_tokens", "runs", "warmup", "device",
                "dtype", "temperature", "top_k", "seed", "json", "peer_timeout", "peer_shape", "speculate",
                "speculate_k", "tp"):
        v = getattr(args, key, None)
        if isinstance(v, list):  # --speculate, parsed
            v = ",".join(v)
        if v is not None:
            parts += [f"--{key.replace('_', '-')}", str(v)]
    if args.compile is not None:
        parts.append("--compile" if args.compile else "--no-compile")
    parts += [f for f, on in (("--compile-prefill", args.compile_prefill), ("--autotune", args.autotune)) if on]
    if not args.roofline:
        parts.append("--no-roofline")
    if getattr(args, "all_reduce", "functional") != "functional":
        parts += ["--all-reduce", args.all_reduce]
    if getattr(args, "time_all_reduce", False):
        parts.append("--time-all-reduce")
    for item in args.peer:
        parts += ["--peer", item]
    return shlex.join(parts)


def run_cmd(args) -> int:
    from ..bench import format_table, run_bench, save_random, write_json

    if getattr(args, "save", None):
        save_random(options_from_args(args))
        return 0
    result = run_bench(options_from_args(args))
    if result is None:  # a follower rank under torchrun: rank 0 reports
        return 0
    table = format_table(result)
    to_stdout = args.json != "-"
    print(table, file=sys.stdout if to_stdout else sys.stderr, flush=True)
    if args.json:
        write_json(result, args.json)
    peers = result.get("peers") or {}
    return 1 if any(p.get("error") for p in peers.values()) else 0
