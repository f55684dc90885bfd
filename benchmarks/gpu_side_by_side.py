"""blitzgen vs gpt-fast, side by side on one GPU: the target configurations (Llama-2-7B and Llama-3-8B shapes).

For each (shape, mode, prompt_len, new_tokens) config: blitzgen's ``bench`` logic in this process
(random weights made on the GPU, compiled decode, warm-up + timed runs, copy roofline measured in
the same run), then gpt-fast's own ``generate()`` in a subprocess (src/blitzgen/peers/
gptfast_generate.py) on the same shape, mode, prompt length and new tokens. Every result goes to
OUT/results.json (rewritten after each config, so a killed run keeps what it finished) and a
markdown table to OUT/summary.md and stdout.

A config that fails (exception, OOM, over its time budget) is recorded and the rest go on. Each
side of a config has --config-budget seconds; the whole script stops starting new work when
--total-budget is nearly spent (the GPU machine's calls are limited to 10 minutes) and prints the
--only line that runs what is left.

    # on the GPU machine (gpt-fast's files exported into the git-ignored .peers/gpt-fast):
    python benchmarks/gpu_side_by_side.py --out $OUT --only p5 --cache-dir out/inductor-cache
    python benchmarks/gpu_side_by_side.py --out $OUT --only llama-2-7b/int4 --skip-peer
    python benchmarks/gpu_side_by_side.py --list

Config names look like ``llama-2-7b/int4-g32/p5/n200``; --only keeps those containing any of the
given substrings (repeatable, or comma-separated). --config SHAPE:MODE:PROMPT:NEW adds others
(MODE bf16, int8, int4 or int4-gNN).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# the targets: (shape, mode, group_size, prompt_len, new_tokens)
DEFAULT_CONFIGS = [
    ("llama-2-7b", "bf16", None, 5, 200),
    ("llama-2-7b", "int8", None, 5, 200),
    ("llama-2-7b", "int4", 32, 5, 200),
    ("llama-2-7b", "bf16", None, 1800, 200),
    ("llama-3-8b", "bf16", None, 4000, 256),
    ("llama-3-8b", "int8", None, 5, 200),
]


def config_name(shape, mode, group_size, prompt_len, new_tokens) -> str:
    m = f"int4-g{group_size}" if mode == "int4" else mode
    return f"{shape}/{m}/p{prompt_len}/n{new_tokens}"


def parse_config(spec: str):
    try:
        shape, mode, p, n = spec.split(":")
        group = None
        if mode.startswith("int4"):
            mode, _, g = mode.partition("-g")
            group = int(g) if g else 32
        if mode not in ("bf16", "int8", "int4"):
            raise ValueError(mode)
        return shape, mode, group, int(p), int(n)
    except ValueError:
        raise SystemExit(f"--config takes SHAPE:MODE:PROMPT:NEW (MODE bf16|int8|int4|int4-gNN), got {spec!r}")


class BudgetExceeded(Exception):
    pass


def _alarm(signum, frame):
    raise BudgetExceeded("over its time budget")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _short(note: str, limit: int = 140) -> str:
    note = note.replace("|", "/").replace("\n", " ")
    return note if len(note) <= limit else note[: limit - 3] + "..."


def markdown(results: list[dict]) -> str:
    head = ("| card | torch | config | blitzgen tok/s | gpt-fast tok/s | ratio | % roofline | decode % roofline "
            "| TTFT ms | compile s (ours / gpt-fast) | notes |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        if "not_run" in r:
            lines.append(f"\nnot run for lack of time: {', '.join(r['not_run'])}")
            continue
        ours = r.get("blitzgen") or {}
        peer = r.get("gpt-fast") or {}
        notes = []
        if r.get("error"):
            notes.append(f"blitzgen: {r['error']}")
        if peer.get("error"):
            notes.append(f"gpt-fast: {peer['error']}")
        if r.get("peer_skipped"):
            notes.append(f"gpt-fast not run ({r['peer_skipped']})")
        ratio = ours["tok_s"] / peer["tok_s"] if ours.get("tok_s") and peer.get("tok_s") else None
        card = ours.get("gpu") or peer.get("gpu") or "-"
        torch_v = ours.get("torch") or peer.get("torch") or "-"
        comp = f"{fmt(ours.get('compile_s'), '.0f')} / {fmt(peer.get('compile_s'), '.0f')}"
        lines.append(
            f"| {card} | {torch_v} | {r['config']} | {fmt(ours.get('tok_s'), '.1f')} | {fmt(peer.get('tok_s'), '.1f')} "
            f"| {fmt(ratio, '.3f')} | {fmt(ours.get('pct_roofline'), '.1f')} | {fmt(ours.get('pct_roofline_decode'), '.1f')} "
            f"| {fmt(ours.get('ttft_ms'), '.1f')} | {comp} | {'; '.join(_short(n) for n in notes)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", default=os.environ.get("OUT", "out/side-by-side"), help="results folder")
    ap.add_argument("--only", action="append", default=[], help="keep configs whose name contains this")
    ap.add_argument("--config", action="append", default=[], metavar="SHAPE:MODE:PROMPT:NEW",
                    help="run this config instead of the defaults (repeatable)")
    ap.add_argument("--list", action="store_true", help="print the config names and exit")
    ap.add_argument("--skip-peer", action="store_true", help="blitzgen only")
    ap.add_argument("--skip-ours", action="store_true", help="gpt-fast only")
    ap.add_argument("--gpt-fast-dir", default=str(REPO / ".peers" / "gpt-fast"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="default: on for CUDA (both engines)")
    ap.add_argument("--config-budget", type=float, default=300,
                    help="seconds for each side of one config (0: no limit)")
    ap.add_argument("--total-budget", type=float, default=540,
                    help="stop starting work when this many seconds have passed (the call limit is 600)")
    ap.add_argument("--min-left", type=float, default=100,
                    help="start a side of a config only with at least this many seconds of the total left")
    ap.add_argument("--decode-attention", default=None, metavar="IMPL[:CHUNKS]",
                    help="blitzgen's one-token attention: sdpa, matmul or split:C (default: the model's own; "
                         "benchmarks/attention_gpu.py compares them)")
    ap.add_argument("--cache-dir", default=None,
                    help="TORCHINDUCTOR_CACHE_DIR for both engines (an ignored folder such as out/inductor-cache "
                         "survives between calls on a warm machine)")
    a = ap.parse_args(argv)
    a.command_line = "python benchmarks/gpu_side_by_side.py " + " ".join(sys.argv[1:] if argv is None else argv)
    t_start = time.perf_counter()

    configs = [parse_config(c) for c in a.config] if a.config else list(DEFAULT_CONFIGS)
    only = [s.strip() for item in a.only for s in item.split(",") if s.strip()]
    named = [(config_name(*c), c) for c in configs]
    if only:
        named = [(n, c) for n, c in named if any(s in n for s in only)]
    if a.list or not named:
        for n, _ in named:
            print(n)
        if not named:
            log(f"no config matches --only {only}; known: " + ", ".join(config_name(*c) for c in configs))
            return 2
        return 0

    if a.cache_dir:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(a.cache_dir)  # the peer inherits it
    try:
        import blitzgen  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO / "src"))
    import torch

    if a.decode_attention:
        from blitzgen.attention import parse_decode_attention
        try:
            parse_decode_attention(a.decode_attention)
        except ValueError as e:
            log(f"--decode-attention: {e}")
            return 2
        # bench's Generator reads RuntimeOptions.from_env(), which applies it to each model it builds
        os.environ["BLITZGEN_DECODE_ATTENTION"] = a.decode_attention
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        log("no CUDA GPU here (use --device cpu for a smoke test)")
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    log(f"{len(named)} configs on {gpu}, torch {torch.__version__}: {', '.join(n for n, _ in named)}")
    results: list[dict] = []
    not_run: list[str] = []

    def save():
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        (out / "summary.md").write_text(markdown(results) + "\n")

    def left() -> float:
        return a.total_budget - (time.perf_counter() - t_start)

    budget = a.config_budget if a.config_budget > 0 else float("inf")
    old_handler = signal.signal(signal.SIGALRM, _alarm) if budget < float("inf") else None
    try:
        return _run_all(a, named, budget, left, save, results, not_run, out, t_start)
    finally:
        if old_handler is not None:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old_handler)


def _run_all(a, named, budget, left, save, results, not_run, out, t_start) -> int:
    import torch

    from blitzgen.bench import BenchOptions, _release, run_bench
    from blitzgen.bench_peers import check_peers, gptfast_preset, run_gptfast
    from blitzgen.errors import BlitzgenError

    for name, (shape, mode, group, P, N) in named:
        if left() < a.min_left:
            not_run.append(name)
            continue
        log(f"\n=== {name} ({left():.0f} s of the total budget left) ===")
        rec: dict = dict(config=name, shape=shape, mode=mode, group_size=group, prompt_len=P, new_tokens=N,
                         decode_attention=a.decode_attention or "default")
        results.append(rec)
        opts = BenchOptions(shape=shape, mode=mode, group_size=group, prompt_len=P, new_tokens=N, runs=a.runs,
                            warmup=a.warmup, device=a.device, compile=a.compile,
                            command=a.command_line)
        peer_ok = not a.skip_peer
        if peer_ok:
            try:
                check_peers(BenchOptions(**{**opts.__dict__, "peers": {"gpt-fast": a.gpt_fast_dir}}))
            except BlitzgenError as e:
                rec["peer_skipped"] = str(e)
                peer_ok = False
        else:
            rec["peer_skipped"] = "--skip-peer"
        if not a.skip_ours:
            t0 = time.perf_counter()
            if budget < float("inf"):
                signal.alarm(max(1, int(min(budget, left()))))
            try:
                rec["blitzgen"] = run_bench(opts, log=lambda m: log("  " + m))
            except BudgetExceeded as e:
                rec["error"] = f"{e} ({time.perf_counter() - t0:.0f} s)"
            except BlitzgenError as e:
                rec["error"] = str(e)
            except Exception as e:  # noqa: BLE001 - recorded; the next config runs
                traceback.print_exc()
                oom = isinstance(e, torch.OutOfMemoryError)
                rec["error"] = ("out of memory: " if oom else "") + f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            finally:
                if budget < float("inf"):
                    signal.alarm(0)
            rec["blitzgen_wall_s"] = time.perf_counter() - t0
            _release(torch.device(a.device))
            ours = rec.get("blitzgen") or {}
            log(f"  blitzgen: {fmt(ours.get('tok_s'), '.2f')} tok/s, {fmt(ours.get('pct_roofline'), '.1f')}% roofline, "
                f"compile {fmt(ours.get('compile_s'), '.1f')} s{'  ERROR ' + rec['error'] if rec.get('error') else ''}")
            save()
        if peer_ok:
            if left() < a.min_left:
                rec["peer_skipped"] = f"total budget: {left():.0f} s left"
            else:
                compile_ = a.compile if a.compile is not None else a.device.startswith("cuda")
                rec["gpt-fast"] = p = run_gptfast(
                    a.gpt_fast_dir, gptfast_preset(shape), mode, group, P, N, a.runs, device=a.device, compile=compile_,
                    timeout=min(budget, max(30.0, left())), log=lambda m: log("  " + m))
                log(f"  gpt-fast: {fmt(p.get('tok_s'), '.2f')} tok/s, compile {fmt(p.get('compile_s'), '.1f')} s"
                    f"{'  ERROR ' + p['error'] if p.get('error') else ''}")
        ours, peer = rec.get("blitzgen") or {}, rec.get("gpt-fast") or {}
        if ours.get("tok_s") and peer.get("tok_s"):
            rec["ratio"] = ours["tok_s"] / peer["tok_s"]
        save()
        print(json.dumps(dict(config=name, blitzgen_tok_s=ours.get("tok_s"), gptfast_tok_s=peer.get("tok_s"),
                              ratio=rec.get("ratio"), pct_roofline=ours.get("pct_roofline"),
                              error=rec.get("error") or peer.get("error"))), flush=True)

    md = markdown(results)
    print("\n" + md, flush=True)
    if not_run:
        msg = (f"\nnot run for lack of time ({a.total_budget:.0f} s budget): {', '.join(not_run)}\n"
               f"run them with: python benchmarks/gpu_side_by_side.py --out $OUT --only {','.join(not_run)}")
        print(msg, flush=True)
        results.append(dict(config="(not run)", not_run=not_run))
    save()
    log(f"results in {out}/results.json and {out}/summary.md ({time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
