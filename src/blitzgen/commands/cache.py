"""``blitzgen cache ls|clear``: the compile cache (compiled artifacts kept across processes)."""

from __future__ import annotations


def register(sub) -> None:
    from .common import add_model_args

    p = sub.add_parser("cache", help="list or clear the compile cache and the converted weights",
                       description="Compiled artifacts are kept under $BLITZGEN_CACHE (default "
                                   "~/.cache/blitzgen), one entry per model, quantization, compile "
                                   "settings, device and torch version, so a later start loads them "
                                   "instead of compiling. A GGUF's weights, once converted, are kept "
                                   "there too (one entry per file and dtype), so a later start maps "
                                   "them instead of dequantizing.")
    p.add_argument("action", choices=["ls", "clear", "warm"],
                   help="ls: list the entries; clear: remove them all; warm: load the model (--model and the "
                        "runtime flags, compiled), run the full warm-up that `serve --compile` and `chat --compile` "
                        "run, and save its entry (and the converted weights of a GGUF), so that their next start "
                        "loads it")
    p.add_argument("--dir", default=None, help="cache root (default: $BLITZGEN_CACHE or ~/.cache/blitzgen)")
    p.add_argument("--keep-inductor", action="store_true",
                   help="clear: keep Inductor's own local cache (<root>/inductor)")
    p.add_argument("--keep-weights", action="store_true",
                   help="clear: keep the converted GGUF weights (<root>/weights)")
    add_model_args(p)
    p.set_defaults(func=run)


def _size(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def run(args) -> int:
    from ..compile_cache import clear, compile_root, list_entries

    if args.action == "warm":
        return warm(args)
    if args.action == "clear":
        freed = clear(args.dir, inductor=not args.keep_inductor, weights=not args.keep_weights)
        print(f"cleared the compile cache ({_size(freed)} freed)")
        return 0
    entries = list_entries(args.dir)
    if not entries:
        print(f"no compile cache entries in {compile_root(args.dir)}")
        return 0
    print(f"{'KEY':<24}  {'SIZE':>10}  {'CREATED':<20}  {'STATE':<7}  WHAT")
    for e in entries:
        print(f"{e.key:<24}  {_size(e.size):>10}  {e.created:<20}  {'ok' if e.ok else 'broken':<7}  {e.summary}")
    print(f"{len(entries)} entries in {compile_root(args.dir)}, {_size(sum(e.size for e in entries))}")
    return 0


def warm(args) -> int:
    """Build the compile-cache entry of a full warm-up (every sampler mode; every prefill bucket with
    --compile-prefill) for the model and runtime flags given."""
    import sys

    from ..compile_cache import warm_up
    from ..startup import REPORT
    from .common import load_engine

    if args.compile is False:
        from ..errors import InvalidRequestError

        raise InvalidRequestError("cache warm compiles; drop --no-compile")
    args.compile = True
    lm, gen = load_engine(args)
    secs = warm_up(lm, gen)
    print(f"warmed {lm.name} on {gen.device}: compile + warm-up {secs:.1f} s", file=sys.stderr)
    print(REPORT.render("warm"), file=sys.stderr, flush=True)
    return 0
