"""Launch configs for the GEMV kernels (gemv.py, gemv_int4_h2.py): the measured tables, the
heuristic that stands in for them on other shapes and cards, the ``BLITZGEN_GEMV_CONFIGS``
overrides, optional autotuning, and which int4 kernel runs. No Triton import: the CPU tests and
benchmarks read these without a GPU."""

from __future__ import annotations

import functools
import json
import os
from typing import Callable, NamedTuple

import torch

from .. import runtime


class GemvConfig(NamedTuple):
    block_n: int        # output rows per program (every thread holds all of them)
    num_warps: int      # warps per program, all along K
    wpt: int            # 32-bit words per thread per row per tile: 2 (8 bytes) or 4 (16 bytes)
    split_k: int = 1    # programs along K (>1: fp32 atomics into a zeroed buffer, then a cast)
    num_stages: int = 1  # >1: software-pipelined K loop (cp.async through shared memory)


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

_DEFAULT_SMS = 132


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int | None) -> int:
    if device_index is None or not torch.cuda.is_available():
        return _DEFAULT_SMS
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_sms(t: torch.Tensor) -> int:
    return _num_sms(t.device.index if t.device.type == "cuda" else None)


def tile_k(kind: str, cfg: GemvConfig) -> int:
    """K elements covered by one tile of a program."""
    return (8 if kind == "int4" else 4) * cfg.wpt * 32 * cfg.num_warps


def supported(kind: str, K: int, group_size: int | None = None, cfg: GemvConfig | None = None) -> bool:
    """Whether the Triton kernel handles this shape (else the op falls back to plain PyTorch)."""
    wpt = cfg.wpt if cfg is not None else 2
    if kind == "int4":
        g = group_size or 0
        return (g >= 8 * wpt and g & (g - 1) == 0 and K % g == 0 and K % (8 * wpt) == 0)
    return K % (4 * wpt) == 0


# Measured on a 132-SM NVIDIA H200 (torch 2.11 / Triton 3.6; benchmarks/kernels_gpu.py --budget 120,
# quick sweep, benchmarks/results/2026-11-26-h200-kernels.json): the config used for each measured
# (kind, N, K, group) shape, as (block_n, num_warps, wpt, split_k, num_stages). A sweep winner is
# kept only where it beat the then-heuristic by > 3% (else that heuristic's config stays).
_MEASURED_H200: dict[str, tuple] = {
    # int8 (K x N: 4096x12288 / 22016 best with 8 rows x 2 warps, the rest 4 rows x 4 warps)
    "int8:12288:4096:0": (8, 2, 4, 1, 1), "int8:4096:4096:0": (4, 4, 4, 1, 1),
    "int8:22016:4096:0": (8, 2, 4, 1, 1), "int8:4096:11008:0": (4, 4, 4, 1, 1),
    "int8:28672:4096:0": (4, 4, 4, 1, 1), "int8:4096:14336:0": (4, 4, 4, 1, 1),
    "int8:32000:4096:0": (4, 4, 4, 1, 1), "int8:128256:4096:0": (4, 4, 4, 1, 1),
}
for _g in (32, 64, 128):  # int4: the same winners for every group size except 4096x11008
    _MEASURED_H200.update({
        f"int4:12288:4096:{_g}": (8, 2, 4, 1, 1), f"int4:4096:4096:{_g}": (16, 4, 4, 1, 1),
        f"int4:22016:4096:{_g}": (8, 2, 4, 1, 1), f"int4:28672:4096:{_g}": (8, 2, 4, 1, 1),
        f"int4:4096:14336:{_g}": (4, 2, 4, 1, 1), f"int4:32000:4096:{_g}": (8, 2, 4, 1, 1),
        f"int4:128256:4096:{_g}": (8, 2, 4, 1, 1),
        # g128: (16, 4) 5.4% faster than (4, 4); g32 / g64: within noise, (4, 4) kept
        f"int4:4096:11008:{_g}": (16, 4, 4, 1, 1) if _g == 128 else (4, 4, 4, 1, 1),
    })
del _g

# The packed int4 kernel's (gemv_int4_h2.py, with its overflow guard) best (block_n, num_warps, wpt,
# split_k, num_stages) per int4 shape "N:K" on a 132-SM H200 (torch 2.11 / Triton 3.6,
# benchmarks/int4_gemv_gpu.py, group 32; used for every group size). Llama-2-7B's shapes: re-swept
# 2026-12-03 (session 13) with one-warp configs, where the guard costs one barrier instead of five;
# the rest from session 11.
_MEASURED_H200_H2 = {
    "12288:4096": (8, 1, 4, 1, 1), "4096:4096": (8, 4, 4, 1, 1), "22016:4096": (16, 1, 4, 1, 1),
    "4096:11008": (8, 4, 4, 1, 1), "32000:4096": (8, 1, 4, 1, 1), "6144:4096": (4, 2, 4, 1, 1),
    "28672:4096": (8, 2, 4, 1, 1), "4096:14336": (8, 4, 4, 1, 1),
}
_MEASURED_SMS = 132  # the table is used only with this SM count (H200; also H100 SXM, untested)


def choose_config(kind: str, N: int, K: int, group_size: int | None = None,
                  num_sms: int = _DEFAULT_SMS, kernel: str | None = None) -> GemvConfig:
    """Deterministic config for one GEMV shape (no timing). ``kernel``: for int4, the kernel the
    config is for (INT4_KERNELS; default ``int4_kernel_choice()``).

    Precedence: the ``BLITZGEN_GEMV_CONFIGS`` file, then ``_MEASURED_H200`` (the measured table,
    only when ``num_sms == 132``), then these rules, fitted to that H200 sweep:

    * ``wpt`` = 4 (16-byte loads) when possible: int4 needs group >= 32, int8 K % 16 == 0.
    * ``num_warps`` (all along K): the preferred count unless another one wastes clearly less of
      the last (masked) K tile. Preferred: 2 for int4 (8 rows x 2 warps was 7-23% faster than
      8 x 4 and 11-17% faster than 4 x 4 on every K=4096, N >= 12288 int4 shape), 4 for int8
      (4 x 4 was the best or within 3.1% of it on every int8 shape).
    * ``block_n``: int4 8 while that still gives >= 16 warps per SM, else 4 (int4 is likely
      issue-bound: 8 rows per thread spread each activation's load / conversion / sum over twice
      the weights of 4 rows). int8: 16 row-warps per program, i.e. 4 rows with 4 warps (4 x 4 beat
      8 x 4 by 1.5-7% on every large-N shape and won at N=4096) or 8 rows with 2 warps (within 3%
      of the best at N >= 12288), but 4 rows if 8 leave < 24 warps per SM (8 x 4: -13% at N=4096).
    * ``split_k``: doubled only while the grid has < 8 warps per SM (a guess: no smaller grid was
      measured). Split-K adds a zero-fill, fp32 atomics and a cast (+1.5-4.4 us in the sweep):
      split 2 / 4 lost 10-46% on every shape where it was tried, down to grids of 15.5 warps/SM.
    * ``num_stages`` = 1 (the cp.async pipeline was ~2-2.7x slower wherever it was tried).

    On the measured shapes the rules pick the table's config or one measured within ~3% of it.
    """
    key = _config_key(kind, N, K, group_size)
    over = _overrides().get(key)
    if over is not None:
        return over
    if num_sms == _MEASURED_SMS and kind == "int4" and (kernel or int4_kernel_choice()) != "fp32":
        cfg = _MEASURED_H200_H2.get(f"{N}:{K}")
        if cfg is not None and supported(kind, K, group_size, GemvConfig(*cfg)):
            return GemvConfig(*cfg)
    if num_sms == _MEASURED_SMS and key in _MEASURED_H200:
        return GemvConfig(*_MEASURED_H200[key])
    if kind == "int4":
        wpt = 4 if (group_size or 0) >= 32 else 2
        prefer = (2, 4, 8)
    else:
        wpt = 4 if K % 16 == 0 else 2
        prefer = (4, 2, 8)
    per_warp = (8 if kind == "int4" else 4) * wpt * 32  # K elements per warp-tile
    # warps along K: the preferred count unless another wastes clearly less of the last tile
    effs = {nw: K / (-(-K // (per_warp * nw)) * per_warp * nw) for nw in prefer}
    top = max(effs.values())
    nw = next(n for n in prefer if effs[n] >= top - 0.1)
    if kind == "int4":  # 8 rows (each activation reused 8x) while >= 16 warps per SM remain
        block_n = 8 if -(-N // 8) * nw >= 16 * num_sms else 4
    else:  # 16 row-warps per program (8 x 2 or 4 x 4), 8 rows only while >= 24 warps per SM remain
        block_n = 8 if nw <= 2 and -(-N // 8) * nw >= 24 * num_sms else 4
    blocks = -(-N // block_n)
    tiles = -(-K // (per_warp * nw))
    split_k = 1
    while blocks * nw * split_k < 8 * num_sms and split_k * 2 <= tiles:
        split_k *= 2
    return GemvConfig(block_n, nw, wpt, split_k, 1)


def candidate_configs(kind: str, N: int, K: int, group_size: int | None = None,
                      num_sms: int = _DEFAULT_SMS, kernel: str | None = None) -> list[GemvConfig]:
    """The heuristic config plus one-axis variations of it (~10; for autotuning and the GPU
    benchmark's sweep)."""
    base = choose_config(kind, N, K, group_size, num_sms, kernel)
    out = [base]

    def add(c: GemvConfig) -> None:
        if c in out or not supported(kind, K, group_size, c):
            return
        tiles = -(-K // tile_k(kind, c))
        if c.split_k > tiles or (c.num_stages > 1 and tiles < 2 * c.split_k):
            return
        out.append(c)

    for bn in (2, 4, 8, 16):
        add(base._replace(block_n=bn))
    for nw in (1, 2, 4, 8):
        add(base._replace(num_warps=nw))
    add(base._replace(wpt=2 if base.wpt == 4 else 4))
    for st in (2, 3):
        add(base._replace(num_stages=st))
    for sk in (base.split_k * 2, base.split_k * 4, max(1, base.split_k // 2)):
        add(base._replace(split_k=sk))
    add(base._replace(block_n=8, split_k=base.split_k * 2))
    return out


def _config_key(kind: str, N: int, K: int, group_size: int | None) -> str:
    return f"{kind}:{N}:{K}:{group_size or 0}"


@functools.lru_cache(maxsize=1)
def _overrides() -> dict[str, GemvConfig]:
    path = runtime.env("BLITZGEN_GEMV_CONFIGS")
    if not path:
        return {}
    if not os.path.exists(path):
        runtime.fallback("GEMV configs", f"BLITZGEN_GEMV_CONFIGS names no file ({path}); "
                         "using the built-in table")
        return {}
    with open(path) as f:
        data = json.load(f)
    data = data.get("best_configs", data)
    return {k: GemvConfig(**v) for k, v in data.items()}


_TUNED: dict[tuple, GemvConfig] = {}
_CHOSEN: dict[tuple, GemvConfig] = {}  # heuristic picks per (shape key, device): eager decode asks every call


def _autotune_enabled(*tensors: torch.Tensor) -> bool:
    if not runtime.env_flag("BLITZGEN_GEMV_AUTOTUNE", False):
        return False
    if torch.compiler.is_compiling():
        return False
    if not all(type(t) is torch.Tensor and t.is_cuda for t in tensors):
        return False
    return not torch.cuda.is_current_stream_capturing()


def _pick_config(kind: str, N: int, K: int, group_size: int | None, ref: torch.Tensor,
                 run: Callable[[GemvConfig], torch.Tensor], tensors: tuple,
                 kernel: str | None = None) -> GemvConfig:
    key = _config_key(kind, N, K, group_size)
    tuned = (key, kernel)
    if tuned in _TUNED:
        return _TUNED[tuned]
    if not _autotune_enabled(*tensors):
        chosen = (key, kernel, ref.device)
        if chosen not in _CHOSEN:
            _CHOSEN[chosen] = choose_config(kind, N, K, group_size, _device_sms(ref), kernel)
        return _CHOSEN[chosen]
    sms = _device_sms(ref)
    cfg = choose_config(kind, N, K, group_size, sms, kernel)
    if key not in _overrides():
        from triton.testing import do_bench

        best = None
        for c in candidate_configs(kind, N, K, group_size, sms, kernel):
            if not supported(kind, K, group_size, c):
                continue
            try:
                ms = do_bench(lambda: run(c), warmup=5, rep=20)
            except Exception as e:  # a config that fails to compile/launch is skipped, and said
                runtime.fallback(f"GEMV autotuning of {key}", f"config {tuple(c)} failed "
                                 f"({type(e).__name__}: {e}); skipped")
                continue
            if best is None or ms < best[0]:
                best = (ms, c)
        if best is not None:
            cfg = best[1]
        _TUNED[tuned] = cfg
    return cfg


INT4_KERNELS = runtime.INT4_GEMV_KERNELS  # gemv.py's fp32 products; gemv_int4_h2 (p: with prefetch)
INT4_DEFAULT = "h2"  # with one-warp configs, Llama-2-7B decode 406 vs 387 tok/s for fp32 (BENCHMARKS.md)


def _packed_int4_runs_here() -> bool:
    if runtime.triton_interpret() or torch.version.hip is not None or not torch.cuda.is_available():
        return False
    return all(torch.cuda.get_device_capability(i) >= (8, 0) for i in range(torch.cuda.device_count()))


@functools.lru_cache(maxsize=1)
def int4_kernel_choice() -> str:
    """Which int4 GEMV kernel runs: ``BLITZGEN_INT4_GEMV`` (fp32, h2, h2p), else INT4_DEFAULT
    where the packed kernel runs (NVIDIA GPUs of compute capability 8.0 or later), else fp32 (its inline
    PTX needs sm_80 and does not run under Triton's interpreter or on ROCm). Read once per
    process."""
    default = INT4_DEFAULT if _packed_int4_runs_here() else "fp32"
    v = (runtime.env("BLITZGEN_INT4_GEMV") or default).lower()
    if v not in INT4_KERNELS:  # RuntimeOptions.validate reports it first, in one line
        raise ValueError(f"BLITZGEN_INT4_GEMV={v!r}: expected one of {', '.join(INT4_KERNELS)}")
    return v
