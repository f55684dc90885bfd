"""``blitzgen bench --tp N``: the same timed runs as the one-process path (``bench._measure``) on
rank 0's TPGenerator, the model spread over N ranks (blitzgen's own launcher, or torchrun's ranks),
each rank making (random weights of a named shape) or reading (--model) only its slices. Rank 0
reports; the other ranks return None. --time-all-reduce adds each all-reduce choice's time at the
shape's decode and prompt message sizes.
"""

from __future__ import annotations

import time

import torch

from ..bench import BenchOptions, _count, _group_size, _jsonable, _measure, _runtime
from ..errors import BlitzgenError


def run(opts: BenchOptions, device: torch.device, dtype: torch.dtype, compile_: bool, log) -> dict | None:
    """Our run over ``opts.tp`` ranks (blitzgen's own launcher, or torchrun's ranks): each rank makes
    (or reads) only its slices; rank 0 times its TPGenerator exactly as the one-process path times
    its Generator. Returns None on the other ranks."""
    from ..generate import weight_bytes
    from . import run as run_tp
    from .runner import model_args
    spec = tp_spec(opts, device, dtype, compile_)
    full = model_args(spec)
    log(f"{'building ' + spec.shape if spec.shape else 'loading ' + str(opts.model)} ({_count(full.num_params())} "
        f"parameters) on {opts.tp} tensor-parallel rank(s), each {'making' if spec.shape else 'reading'} only its slices")

    def leader(lm, gen):
        model = lm.model
        dev = model.device  # peak memory: the build's included, as in the one-process path
        shape = spec.shape.lower() if spec.shape else None
        res = dict(shape=shape, model=None if shape else lm.source, model_name=shape or lm.name, tp=opts.tp,
                   all_reduce=opts.all_reduce, tp_backend=gen.group.backend, num_params=full.num_params(),
                   model_bytes=weight_bytes(model), quant=_jsonable(lm.quant))  # model_bytes: rank 0's share
        res["build_s"] = time.perf_counter() - t0
        res = _measure(opts, gen, model, lm.args, dev, compile_, log, res)
        if opts.time_all_reduce and opts.tp > 1:
            from .comm import ALL_REDUCE

            dim = lm.args.dim
            sizes = (dim * 2, dim * 2 * opts.prompt_len)  # a decode step's message; the prompt's
            kinds = ALL_REDUCE if dev.type == "cuda" else ("functional",)
            res["all_reduce_us"] = times = {}
            for k in kinds:  # a choice this machine cannot run (every rank fails alike) is recorded, not fatal
                try:
                    times[k] = {str(n): gen.time_all_reduce(k, n) * 1e6 for n in sizes}
                except Exception as e:  # noqa: BLE001
                    times[k] = {"error": f"{type(e).__name__}: {e}"[:300]}
        return res

    if device.type == "cuda":  # rank 0 runs in this process (cuda:0): the roofline's buffers are not its peak
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    return run_tp(opts.tp, spec, leader)


def tp_spec(opts: BenchOptions, device: torch.device, dtype: torch.dtype, compile_: bool):
    """What every rank of ``bench --tp`` loads: as the one-process path, --shape's random weights,
    --model, else llama-2-7b's shape on CUDA and the embedded default model on CPU."""
    from .runner import TPSpec

    shape = None if opts.model else opts.shape or ("llama-2-7b" if device.type == "cuda" else None)
    return TPSpec(model=opts.model, shape=shape, device=device.type, dtype=str(dtype).replace("torch.", ""),
                  quantize=None if opts.mode == "bf16" else opts.mode, group_size=_group_size(opts), compile=compile_,
                  max_model_len=opts.prompt_len + opts.new_tokens, all_reduce=opts.all_reduce, seed=opts.seed,
                  options=_runtime(opts))


def check(opts: BenchOptions, device: torch.device, dtype: torch.dtype, compile_: bool) -> None:
    """--tp's one-line errors, before anything is measured or built."""
    from .comm import ALL_REDUCE
    from .runner import check_split

    if opts.tp is None:
        if opts.all_reduce != "functional" or opts.time_all_reduce:
            raise BlitzgenError("--all-reduce and --time-all-reduce apply to --tp only")
        return
    if opts.tp < 1:
        raise BlitzgenError(f"--tp must be at least 1, got {opts.tp}")
    if opts.all_reduce not in ALL_REDUCE:
        raise BlitzgenError(f"unknown --all-reduce {opts.all_reduce!r} (one of {', '.join(ALL_REDUCE)})")
    if opts.all_reduce != "functional" and device.type != "cuda":
        raise BlitzgenError(f"--all-reduce {opts.all_reduce} needs CUDA GPUs (symmetric memory); use functional")
    from .group import torchrun_env

    env = torchrun_env()
    if env is not None and env[1] != opts.tp:
        raise BlitzgenError(f"--tp {opts.tp} but torchrun started {env[1]} ranks (--nproc_per_node); make them equal")
    check_split(tp_spec(opts, device, dtype, compile_), opts.tp)


def torchrun_follower() -> bool:
    from .group import torchrun_env

    env = torchrun_env()
    return env is not None and env[0] != 0
