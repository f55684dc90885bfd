"""``blitzgen bench``: batch-1 tokens/s, time to first token and % of the card's copy roofline
(decode) and matmul roofline (the first token: ModelArgs.prefill_flops over a measured matmul).

The numbers follow gpt-fast's definitions so they can be put side by side: tokens/s is generated
tokens over the whole ``generate`` time (prefill included), median over ``runs`` timed runs after
``warmup`` untimed ones (the first pays compilation, reported as compile time). Bandwidth achieved
is the weight bytes read per token times tokens/s; the roofline is a device-to-device copy
measured in the same process (bytes read + written), like shared/peers/roofline.py.

``run_bench`` returns one JSON-able dict; ``format_table`` renders it for people. A peer engine
(gpt-fast's own ``generate()``) runs in a subprocess after ours has released the GPU, so its global
inductor flags and module state never touch our process.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .bench_peers import _group_size, _peer_preset, check_peers, run_gptfast
from .config import BENCH_MODES as MODES  # defined in config so the CLI reads them without torch
from .errors import BlitzgenError

CUDA_COPY_BYTES = 2 * 1024**3
CPU_COPY_BYTES = 128 * 1024**2


@dataclass
class BenchOptions:
    shape: str | None = None  # a named shape (random weights); mutually exclusive with model
    model: str | None = None  # anything blitzgen.loading.load accepts
    mode: str = "bf16"  # bf16 = unquantized weights in `dtype`; int8 / int4 weight-only
    group_size: int | None = None
    prompt_len: int = 5
    new_tokens: int = 200
    runs: int = 5
    warmup: int = 1
    device: str | None = None
    dtype: str | None = None  # torch dtype name; default bfloat16
    compile: bool | None = None  # default: on for CUDA
    compile_prefill: bool | None = None  # RuntimeOptions': prefill eager unless set
    autotune: bool | None = None  # RuntimeOptions': coordinate-descent tuning off unless set
    temperature: float = 0.8
    top_k: int = 200
    seed: int = 0
    roofline: bool = True
    peers: dict[str, str] = field(default_factory=dict)  # {"gpt-fast": DIR}
    peer_timeout: float = 900.0
    peer_compile: bool | None = None  # default: same as ours
    peer_shape: str | None = None  # a gpt-fast preset name, instead of the one mapped from shape
    command: str | None = None
    save: str | None = None  # write the random weights of `shape` as an HF checkpoint here instead
    speculate: str | None = None  # "ngram" | "self-int4": run the speculative decoder instead of plain decode
    speculate_k: int = 4
    tp: int | None = None  # tensor-parallel ranks (parallel.run); None: the plain one-process path
    all_reduce: str = "functional"
    time_all_reduce: bool = False  # with tp: also time each all-reduce choice at this shape's message sizes


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _median(xs):
    return statistics.median(xs) if xs else None


# ---- the card ------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int | None = None, reps: int = 10) -> float:
    """The card's dense matmul rate in FLOP/s: an n x n x n matmul in ``dtype`` (median), the
    ceiling of a long, compute-bound prefill."""
    n = n or (8192 if device.type == "cuda" else 512)
    dtype = dtype if dtype.is_floating_point else torch.bfloat16
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        c = a @ b
    ts = []
    for _ in range(reps if device.type == "cuda" else 3):
        _sync(device)
        t = time.perf_counter()
        c = a @ b
        _sync(device)
        ts.append(time.perf_counter() - t)
    del a, b, c
    return 2 * n**3 / _median(ts)


def measure_copy_bandwidth(device: torch.device, nbytes: int | None = None, reps: int | None = None) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read and written (median)."""
    if device.type == "cuda":
        nbytes = nbytes or CUDA_COPY_BYTES
        reps = reps or 20
        while True:
            try:
                a = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
                b = torch.empty_like(a)
                break
            except torch.OutOfMemoryError:
                if nbytes <= 64 * 1024**2:
                    raise
                nbytes //= 2
        for _ in range(3):
            b.copy_(a)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ts = []
        for _ in range(reps):
            s.record()
            b.copy_(a)
            e.record()
            torch.cuda.synchronize(device)
            ts.append(s.elapsed_time(e) / 1e3)
        del a, b
        torch.cuda.empty_cache()
    else:
        nbytes = nbytes or CPU_COPY_BYTES
        reps = reps or 10
        a = torch.ones(nbytes, dtype=torch.uint8)
        b = torch.empty_like(a)
        b.copy_(a)
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            b.copy_(a)
            ts.append(time.perf_counter() - t)
        del a, b
    return 2 * nbytes / statistics.median(ts)


# ---- the model -----------------------------------------------------------------------------------
def build_random_model(args, device: torch.device, dtype: torch.dtype, seed: int = 0, quantize=None):
    """``Transformer(args)`` with random weights made directly on ``device`` (never on the host),
    through loading's one assemble step (``loading.load_random``): normal(0, 0.02), RMSNorm
    weights 1, each Linear quantized as soon as its weight exists when ``quantize`` is given.
    Returns (model, quantization metadata or None)."""
    from .loading import load_random

    lm = load_random(args, device=str(device), dtype=dtype, quantize=quantize, seed=seed, progress=False)
    return lm.model, lm.quant


def _quant_config(mode: str, group_size: int | None):
    from .quant import make_config

    return make_config(mode, group_size=group_size)


def _oom_message(what: str, nbytes: int, device: torch.device) -> str:
    have = ""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        have = f"; {device_name(device)} has {total / 1e9:.1f} GB ({free / 1e9:.1f} GB free now)"
    return (f"out of memory {what}: the weights alone are {nbytes / 1e9:.2f} GB{have}. "
            "Try --mode int8/int4, a smaller --shape, or fewer --prompt-len/--new-tokens")


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e)))


def _release(device: torch.device) -> None:
    """Drop compiled code, CUDA graph pools and cached blocks so the next model (or a peer
    process) gets the whole card."""
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001 - best effort
        pass
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ---- our run -------------------------------------------------------------------------------------
def _resolve(opts: BenchOptions):
    from .runtime import DTYPES

    if opts.mode not in MODES:
        raise BlitzgenError(f"unknown --mode {opts.mode!r} (choose from {', '.join(MODES)})")
    if opts.shape and opts.model:
        raise BlitzgenError("give --shape (random weights) or --model (real weights), not both")
    if opts.group_size is not None and opts.mode != "int4":
        raise BlitzgenError(f"--group-size applies to --mode int4 only (got --mode {opts.mode})")
    for name, v, low in (("--prompt-len", opts.prompt_len, 1), ("--new-tokens", opts.new_tokens, 1),
                         ("--runs", opts.runs, 1), ("--warmup", opts.warmup, 0)):
        if v < low:
            raise BlitzgenError(f"{name} must be >= {low}, got {v}")
    dev = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise BlitzgenError("--device cuda was asked for but no CUDA GPU is available (use --device cpu)")
    device = torch.device(dev)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if opts.dtype is not None and opts.dtype not in DTYPES:
        raise BlitzgenError(f"unknown --dtype {opts.dtype!r} (choose from {', '.join(sorted(DTYPES))})")
    dtype = getattr(torch, DTYPES[opts.dtype]) if opts.dtype else torch.bfloat16
    compile_ = opts.compile if opts.compile is not None else device.type == "cuda"
    if opts.shape:  # fail before the roofline measurement and the build
        from .config import ModelArgs

        ctx = ModelArgs.from_name(opts.shape).max_seq_len  # UnsupportedModelError lists the known shapes
        if opts.prompt_len + opts.new_tokens > ctx:
            raise BlitzgenError(f"prompt {opts.prompt_len} + {opts.new_tokens} new tokens exceed the context length "
                                f"of {opts.shape} ({ctx} tokens)")
    return device, dtype, compile_


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_ours(opts: BenchOptions, device: torch.device, dtype: torch.dtype, compile_: bool, log) -> dict:
    from .config import ModelArgs
    from .generate import Generator, weight_bytes

    res: dict = {}
    t0 = time.perf_counter()
    group_size = _group_size(opts)
    quant_cfg = _quant_config(opts.mode, group_size) if opts.mode != "bf16" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if opts.shape or not opts.model and device.type == "cuda":
        shape = opts.shape or "llama-2-7b"
        args = ModelArgs.from_name(shape)  # UnsupportedModelError lists the known shapes
        est = args.num_params() * torch.empty((), dtype=dtype).element_size()
        log(f"building {shape} ({_count(args.num_params())} parameters, {est / 1e9:.3g} GB in "
            f"{str(dtype).replace('torch.', '')}) with random weights on {device}")
        try:
            model, quant_meta = build_random_model(args, device, dtype, opts.seed, quantize=quant_cfg)
        except Exception as e:  # noqa: BLE001
            if _is_oom(e):
                model = None
                _release(device)
                raise BlitzgenError(_oom_message(f"building {shape}", est, device)) from None
            raise
        res.update(shape=shape.lower(), model=None, model_name=shape.lower())
        tokenizer = None
    else:
        from .loading import load

        lm = load(opts.model, device=str(device), dtype=dtype, quantize=quant_cfg, progress=sys.stderr.isatty())
        model, args, tokenizer, quant_meta = lm.model, lm.args, lm.tokenizer, lm.quant
        res.update(shape=None, model=lm.source, model_name=lm.name)
        log(f"loaded {lm.name} ({lm.kind}) in {lm.load_seconds:.1f} s")
    _sync(device)
    res["build_s"] = time.perf_counter() - t0
    res["num_params"] = args.num_params()
    res["model_bytes"] = nbytes = weight_bytes(model)  # one copy of each weight; packed int4 copies skipped
    res["quant"] = _jsonable(quant_meta)
    if quant_meta and isinstance(quant_meta, dict) and quant_meta.get("scheme"):
        res["quant_scheme"] = quant_meta["scheme"]
        if opts.mode == "bf16":  # a quantized checkpoint: report what actually ran
            res["mode"], res["group_size"] = quant_meta["scheme"], quant_meta.get("group_size")

    P, N = opts.prompt_len, opts.new_tokens
    gen = Generator(model, tokenizer, options=_runtime(opts), compile=compile_, max_seq_len=P + N)
    return _measure(opts, gen, model, args, device, compile_, log, res)


def _runtime(opts: BenchOptions):
    from .runtime import RuntimeOptions

    return RuntimeOptions.from_env(compile_prefill=opts.compile_prefill, autotune=opts.autotune)


def _measure(opts: BenchOptions, gen, model, args, device: torch.device, compile_: bool, log, res: dict) -> dict:
    """The warm-up and timed runs of ``gen`` (a Generator, or rank 0's TPGenerator) into ``res``."""
    from .generate import GenerationStats
    from .sampling import SamplingParams, choice_sampling

    P, N, nbytes = opts.prompt_len, opts.new_tokens, res["model_bytes"]
    res["prefill_flops"] = args.prefill_flops(P)
    gen.check_request(P, N)  # ContextLengthError names the model's context
    g = torch.Generator().manual_seed(opts.seed)
    prompt = torch.randint(1, max(2, min(args.vocab_size, 30000)), (P,), generator=g).tolist()
    dec, spec_runs = _speculative_decoder(opts, model, compile_, P + N, log, gen), []

    def one_run(i: int) -> tuple[float, object]:
        sp = choice_sampling(SamplingParams(temperature=opts.temperature, top_k=opts.top_k, seed=opts.seed), i)
        stats = GenerationStats()
        gen.forget_prefix()  # every run prefills its whole prompt (the same one each run)
        _sync(device)
        t = time.perf_counter()
        n = 0
        tokens = (gen.generate_ids(prompt, N, sp, stop_token_ids=(), stats=stats) if dec is None
                  else _speculative_ids(dec, prompt, N, sp, stats, spec_runs))
        for _ in tokens:
            n += 1
        _sync(device)
        dt = time.perf_counter() - t
        if n != N:
            raise RuntimeError(f"generated {n} tokens, expected {N}")
        return dt, stats

    try:
        warm = []
        for w in range(opts.warmup):
            dt, _ = one_run(1000 + w)
            warm.append(dt)
            log(f"warm-up {w + 1}/{opts.warmup}: {dt:.2f} s{' (compiles)' if compile_ and w == 0 else ''}")
        times, stats = [], []
        spec_runs.clear()  # speculation statistics of the timed runs only
        for i in range(opts.runs):
            dt, st = one_run(i)
            times.append(dt)
            stats.append(st)
            log(f"run {i + 1}/{opts.runs}: {N / dt:.2f} tokens/s, first token {st.time_to_first_token * 1e3:.1f} ms")
    except Exception as e:  # noqa: BLE001
        if _is_oom(e):
            del gen, model
            _release(device)
            raise BlitzgenError(_oom_message(f"running prompt {P} + {N} new tokens", nbytes, device)) from None
        raise
    kv = 0
    for layer in model.layers:
        c = layer.attention.kv_cache
        if c is not None:
            kv += c.k_cache.numel() * c.k_cache.element_size() * 2
    rates = [N / t for t in times]
    res.update(
        kv_cache_bytes=kv,
        cache_len=model.cache_len,
        tok_s=_median(rates),
        tok_s_runs=rates,
        decode_tok_s=_median([s.decode_tokens_per_second for s in stats]),
        ttft_ms=_median([s.time_to_first_token * 1e3 for s in stats]),
        total_s=_median(times),
        warmup_s=warm,
        compile_s=warm[0] if compile_ and warm else 0.0,
        peak_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    )
    if device.type != "cuda":
        try:
            import resource

            res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        except (ImportError, OSError):
            pass
    res["bandwidth_gbs"] = nbytes * res["tok_s"] / 1e9
    res["decode_bandwidth_gbs"] = nbytes * res["decode_tok_s"] / 1e9
    if dec is not None:
        from .speculative import SpeculationStats

        total = SpeculationStats()
        for st in spec_runs:
            total.merge(st)
        res["speculation"] = total.to_dict()
        del dec
    del gen, model
    return res


def _speculative_decoder(opts: BenchOptions, model, compile_: bool, max_len: int, log, gen=None):
    """The SpeculativeDecoder that --speculate asks for (None without it); under --tp, every rank's
    (on the Generators: ``TPGenerator.speculative``)."""
    if not opts.speculate:
        return None
    from .parallel.runner import TPGenerator
    from .speculative import SpeculativeDecoder, make_draft

    t = time.perf_counter()
    if isinstance(gen, TPGenerator):
        dec = gen.speculative(opts.speculate, opts.speculate_k, _group_size(opts) or 32)
        log(f"speculation {opts.speculate} (k<={opts.speculate_k}) on {gen.group.world} ranks")
        return dec
    draft = make_draft(opts.speculate, model, group_size=_group_size(opts) or 32)
    log(f"speculation {opts.speculate} (k<={opts.speculate_k}) built in {time.perf_counter() - t:.1f} s")
    return SpeculativeDecoder(model, draft, k=opts.speculate_k, compile=compile_, max_seq_len=max_len)


def _speculative_ids(dec, prompt: list[int], n: int, sampling, stats, runs: list):
    """The decoder's tokens, filling GenerationStats as Generator.generate_ids does; each run's
    SpeculationStats is appended to ``runs``."""
    from .speculative import SpeculationStats

    from .generate import timed_tokens

    spec = SpeculationStats()
    runs.append(spec)
    stats.prompt_tokens = len(prompt)
    yield from timed_tokens(dec.generate_ids(prompt, n, sampling, stop_token_ids=(), stats=spec), stats)


def _jsonable(x):
    try:
        json.dumps(x)
        return x
    except (TypeError, ValueError):
        if isinstance(x, dict):
            return {str(k): _jsonable(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [_jsonable(v) for v in x]
        return str(x)


def save_random(opts: BenchOptions, log: Callable[[str], None] | None = None) -> dict:
    """``bench --shape S --save DIR``: random weights of S as an HF checkpoint (config.json,
    sharded safetensors, a tokenizer), so that loading a large shape can be timed with --model DIR."""
    from .config import ModelArgs
    from .loading.synthetic import save_random_checkpoint

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not opts.shape or opts.model:
        raise BlitzgenError("--save writes random weights of a --shape (and takes no --model)")
    if opts.mode != "bf16":
        raise BlitzgenError("--save writes float weights: drop --mode (quantize the saved checkpoint with "
                            "`blitzgen quantize`)")
    out = Path(opts.save).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BlitzgenError(f"--save {out}: not an empty directory")
    device, dtype, _ = _resolve(opts)
    args = ModelArgs.from_name(opts.shape)
    log(f"writing {opts.shape} ({_count(args.num_params())} parameters) with random weights to {out}")
    t0 = time.perf_counter()
    summary = save_random_checkpoint(args, out, dtype=dtype, seed=opts.seed, device=str(device), log=log)
    summary["seconds"] = time.perf_counter() - t0
    log(f"done in {summary['seconds']:.1f} s; time its loading with: blitzgen bench --model {out}")
    return summary


def run_bench(opts: BenchOptions, log: Callable[[str], None] | None = None) -> dict:
    """Benchmark blitzgen (then each peer) as ``opts`` says; returns the JSON-able result."""
    from . import __version__

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    device, dtype, compile_ = _resolve(opts)
    from .parallel import bench as tp_bench

    tp_bench.check(opts, device, dtype, compile_)
    check_peers(opts)
    if opts.tp is not None and tp_bench.torchrun_follower():  # torchrun's ranks 1..N-1: follow rank 0, print nothing
        return tp_bench.run(opts, device, dtype, compile_, log)
    result: dict = dict(
        tool="blitzgen bench", blitzgen=__version__, command=opts.command,
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__, python=platform.python_version(), device=str(device), gpu=device_name(device),
        mode=opts.mode, group_size=_group_size(opts), dtype=str(dtype).replace("torch.", ""), compile=compile_,
        prompt_len=opts.prompt_len, new_tokens=opts.new_tokens, runs=opts.runs, warmup=opts.warmup,
        sampling=dict(temperature=opts.temperature, top_k=opts.top_k, seed=opts.seed),
    )
    if opts.speculate:
        result.update(speculate=opts.speculate, speculate_k=opts.speculate_k)
    if opts.tp is not None:
        result.update(tp=opts.tp, all_reduce=opts.all_reduce)
    if device.type == "cuda":
        result["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    if opts.roofline:
        bw = measure_copy_bandwidth(device)
        result["copy_bandwidth_gbs"] = bw / 1e9
        log(f"copy bandwidth on {result['gpu']}: {bw / 1e9:.0f} GB/s (read + written)")
        result["matmul_tflops"] = measure_matmul_flops(device, dtype) / 1e12
        log(f"matmul on {result['gpu']}: {result['matmul_tflops']:.3g} TFLOP/s ({result['dtype']})")
    try:
        result.update((tp_bench.run if opts.tp is not None else _run_ours)(opts, device, dtype, compile_, log))
    finally:
        _release(device)
    if opts.roofline:
        bw = result["copy_bandwidth_gbs"]
        result["roofline_tok_s"] = bw * 1e9 / result["model_bytes"]
        result["pct_roofline"] = 100 * result["bandwidth_gbs"] / bw
        result["pct_roofline_decode"] = 100 * result["decode_bandwidth_gbs"] / bw
        if result.get("prefill_flops") and result.get("ttft_ms"):
            result["prefill_roofline_ms"] = result["prefill_flops"] / (result["matmul_tflops"] * 1e12) * 1e3
            result["pct_matmul_roofline_ttft"] = 100 * result["prefill_roofline_ms"] / result["ttft_ms"]
    peers, ratios = {}, {}
    for name, where in opts.peers.items():
        log(f"running {name}'s own generate() in a subprocess ...")
        peers[name] = r = run_gptfast(where, _peer_preset(opts), opts.mode, _group_size(opts), opts.prompt_len,
                                      opts.new_tokens, opts.runs, device=device.type if opts.tp else str(device),
                                      compile=opts.peer_compile if opts.peer_compile is not None else compile_,
                                      temperature=opts.temperature, top_k=opts.top_k, seed=opts.seed,
                                      timeout=opts.peer_timeout, log=log, tp=opts.tp)
        if r.get("tok_s"):
            ratios[name] = result["tok_s"] / r["tok_s"]
    if opts.peers:
        result["peers"] = peers
        result["ratio"] = ratios
    return result


# ---- output --------------------------------------------------------------------------------------
def _f(x, spec: str, unit: str = "") -> str:
    if x is None:
        return "-"
    if spec in (".0f", ".1f") and abs(x) < 1:
        spec = ".2g"
    return f"{x:{spec}}{unit}"


def format_table(r: dict) -> str:
    """A human summary of one ``run_bench`` result."""
    what = r.get("shape") or r.get("model_name") or r.get("model")
    mode = r["mode"] + (f" g{r['group_size']}" if r.get("group_size") else "")
    if r["mode"] == "bf16" and r.get("dtype") != "bfloat16":
        mode = f"unquantized {r['dtype']}"
    head = (f"blitzgen bench: {what}, {mode}, prompt {r['prompt_len']} + {r['new_tokens']} new tokens, "
            f"{r['runs']} runs, {'compiled' if r['compile'] else 'eager'}"
            f"{', speculate ' + r['speculate'] if r.get('speculate') else ''}"
            f"{', tensor parallel ' + str(r['tp']) + ' (all-reduce ' + r['all_reduce'] + ')' if r.get('tp') else ''}\n"
            f"{r['gpu']}, torch {r['torch']}, {r['date']}")
    peers = r.get("peers") or {}
    cols = ["blitzgen"] + list(peers)
    rows: list[tuple[str, list[str]]] = []

    def row(label, ours, key=None, spec=".2f", scale=1.0, unit=""):
        vals = [_f(None if ours is None else ours * scale, spec, unit)]
        for p in peers.values():
            v = p.get(key) if key else None
            vals.append(_f(None if v is None else v * scale, spec, unit))
        rows.append((label, vals))

    bw = r.get("copy_bandwidth_gbs")
    row("tokens/s (median)", r["tok_s"], "tok_s")
    row("decode tokens/s", r.get("decode_tok_s"))
    row("time to first token (ms)", r.get("ttft_ms"), "ttft_ms", ".1f")
    row("bandwidth achieved (GB/s)", r.get("bandwidth_gbs"), "bw_gbs", ".0f")
    if bw:
        rows.append(("% of copy roofline", [_f(r.get("pct_roofline"), ".1f", "%")] +
                     [_f(p["bw_gbs"] / bw * 100 if p.get("bw_gbs") else None, ".1f", "%") for p in peers.values()]))
        row("% roofline, decode only", r.get("pct_roofline_decode"), None, ".1f", unit="%")
    if r.get("prefill_roofline_ms"):
        rows.append(("% of matmul roofline, first token", [_f(r.get("pct_matmul_roofline_ttft"), ".1f", "%")] +
                     [_f(r["prefill_roofline_ms"] / p["ttft_ms"] * 100 if p.get("ttft_ms") else None, ".1f", "%")
                      for p in peers.values()]))
    row("compile / warm-up (s)", r.get("compile_s") if r["compile"] else (r.get("warmup_s") or [None])[0],
        "compile_s", ".1f")
    if r.get("peak_memory_bytes") is not None:
        row("peak GPU memory (GB)", r.get("peak_memory_bytes"), "peak_memory_bytes", ".2f", 1e-9)
    else:
        row("peak process RSS (GB)", r.get("peak_rss_bytes"), None, ".2f", 1e-9)
    row("weights read per token (GB)", r.get("model_bytes"), "model_bytes", ".3g", 1e-9)
    spec = r.get("speculation")
    if spec:
        row("speculation acceptance", spec["acceptance_rate"] * 100, None, ".1f", unit="%")
        row("tokens per verify step", spec["mean_tokens_per_verify"])
    w0 = max(len(lbl) for lbl, _ in rows)
    widths = [max(len(c), *(len(v[i]) for _, v in rows)) for i, c in enumerate(cols)]
    lines = [head, "", " " * w0 + "  " + "  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    for lbl, vals in rows:
        lines.append(lbl.ljust(w0) + "  " + "  ".join(v.rjust(w) for v, w in zip(vals, widths)))
    if bw:
        lines.append(f"roofline: copy {bw:.0f} GB/s / {r['model_bytes'] / 1e9:.3g} GB per token = "
                     f"{r['roofline_tok_s']:.1f} tokens/s")
    if r.get("prefill_roofline_ms"):
        lines.append(f"roofline: matmul {r['matmul_tflops']:.3g} TFLOP/s, a prefill of {r['prompt_len']} tokens "
                     f"{r['prefill_flops'] / 1e12:.3g} TFLOP = {r['prefill_roofline_ms']:.2f} ms to the first token")
    if r.get("tp"):
        lines.append(f"tensor parallel: {r['tp']} rank(s) ({r.get('tp_backend')}); weights and memory are rank 0's")
    for kind, by_size in (r.get("all_reduce_us") or {}).items():
        lines.append(f"all-reduce {kind}: " + ", ".join(f"{n} B {us:.1f} us" if n != "error" else f"failed: {us}"
                                                       for n, us in by_size.items()))
    if spec:
        lines.append(f"speculation {spec['source']} k<={spec['k_max']}: {spec['verify_steps']} verify + "
                     f"{spec['plain_steps']} plain steps, accepted lengths {spec['accepted_hist']}")
    for name, p in peers.items():
        if p.get("error"):
            lines.append(f"{name}: failed: {p['error']}")
        elif name in (r.get("ratio") or {}):
            lines.append(f"blitzgen / {name}: {r['ratio'][name]:.3f}x")
    return "\n".join(lines)


def write_json(result: dict, dest: str) -> None:
    text = json.dumps(result, indent=None if dest == "-" else 2, default=str)
    if dest == "-":
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    else:
        Path(dest).expanduser().parent.mkdir(parents=True, exist_ok=True)
        Path(dest).expanduser().write_text(text + "\n")
