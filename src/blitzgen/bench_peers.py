"""The peer side of ``blitzgen bench``: gpt-fast's own ``generate()`` run in a subprocess
(blitzgen/peers/gptfast_generate.py, shipped as package data) on the same shape, mode and lengths
as ours."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .errors import BlitzgenError

if TYPE_CHECKING:
    from .bench import BenchOptions

DEFAULT_INT4_GROUP_SIZE = 32  # gpt-fast's published int4 figure and issue 4's target use g32

# Our named shapes -> gpt-fast's ``transformer_configs`` presets (model.py of pytorch-labs/gpt-fast).
PEER_SHAPES = {
    "llama-2-7b": "Llama-2-7b-chat-hf",
    "llama-2-13b": "13B",
    "llama-2-70b": "70B",
    "llama-3-8b": "llama-3-8b",
    "mistral-7b": "Mistral-7B",
    "codellama-7b": "CodeLlama-7b-Python-hf",
    "llama-3.1-8b": "llama-3.1-8b",
}
# gpt-fast's block_size per preset (its KV cache can never be longer; default 2048).
PEER_BLOCK_SIZE = {
    "Llama-2-7b-chat-hf": 2048, "13B": 2048, "70B": 2048, "Mistral-7B": 2048,
    "llama-3-8b": 8192, "CodeLlama-7b-Python-hf": 16384, "llama-3.1-8b": 131072,
}
PEER_FILES = ("model.py", "generate.py", "quantize.py", "tokenizer.py")
PEER_INT4_GROUP_SIZES = (32, 64, 128, 256)

def gptfast_preset(shape: str | None) -> str:
    """gpt-fast's preset name for one of our shapes, or a BlitzgenError naming the ones it has."""
    if shape is None:
        raise BlitzgenError("--peer gpt-fast needs --shape (gpt-fast runs random weights of a named shape)")
    key = shape.lower()
    if key not in PEER_SHAPES:
        raise BlitzgenError(f"gpt-fast has no preset for shape {shape!r}; shapes it can run: "
                            f"{', '.join(sorted(PEER_SHAPES))}")
    return PEER_SHAPES[key]


def peer_script() -> Path:
    """The gpt-fast harness: BLITZGEN_GPTFAST_SCRIPT when set, else the copy shipped in the package."""
    from .runtime import env

    override = env("BLITZGEN_GPTFAST_SCRIPT")
    path = Path(override).expanduser() if override else Path(__file__).resolve().parent / "peers" / "gptfast_generate.py"
    if not path.is_file():
        why = "BLITZGEN_GPTFAST_SCRIPT names no file" if override else \
            "it ships with blitzgen as package data: reinstall blitzgen"
        raise BlitzgenError(f"the gpt-fast harness {path} is missing ({why})")
    return path


def check_peers(opts: BenchOptions) -> None:
    """Fail fast, before our own (long) run, on anything that would make a peer run fail."""
    for name, where in opts.peers.items():
        if name != "gpt-fast":
            raise BlitzgenError(f"unknown peer {name!r}: the only peer is gpt-fast (--peer gpt-fast=DIR)")
        d = Path(where).expanduser()
        files = PEER_FILES + (("tp.py",) if (opts.tp or 1) > 1 else ())
        missing = [f for f in files if not (d / f).is_file()]
        if not d.is_dir() or missing:
            what = "does not exist" if not d.is_dir() else f"lacks {', '.join(missing)}"
            raise BlitzgenError(
                f"--peer gpt-fast={where}: {what}; DIR must hold gpt-fast's files (export model.py, generate.py, "
                "quantize.py, tokenizer.py and, for --tp, tp.py of github:pytorch-labs/gpt-fast into it)")
        preset = _peer_preset(opts)
        block = PEER_BLOCK_SIZE.get(preset, 2048)
        if opts.prompt_len + opts.new_tokens > block:
            raise BlitzgenError(f"gpt-fast's {preset} preset holds at most {block} positions (block_size); "
                                f"prompt {opts.prompt_len} + {opts.new_tokens} new tokens do not fit")
        if opts.mode == "int4" and _group_size(opts) not in PEER_INT4_GROUP_SIZES:
            raise BlitzgenError(f"gpt-fast's int4 takes group sizes {PEER_INT4_GROUP_SIZES}, not {_group_size(opts)}")
        peer_script()


def _peer_preset(opts: BenchOptions) -> str:
    return opts.peer_shape or gptfast_preset(opts.shape)


def _group_size(opts: BenchOptions) -> int | None:
    if opts.mode == "int4" and opts.group_size is None:
        return DEFAULT_INT4_GROUP_SIZE
    return opts.group_size


def gptfast_command(gpt_fast_dir: str, preset: str, mode: str, group_size: int | None, prompt_len: int,
                    new_tokens: int, runs: int, *, device: str = "cuda", compile: bool = True,
                    temperature: float = 0.8, top_k: int = 200, seed: int = 0, tp: int | None = None) -> list[str]:
    """The harness's command line; with ``tp`` (even 1, so a one-GPU run checks the same launch) under
    ``torchrun --standalone --nproc_per_node tp``, where the harness applies gpt-fast's tp.py."""
    launcher = [sys.executable]
    if tp is not None:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp}"]
    cmd = [*launcher, str(peer_script()), "--gpt-fast-dir", str(gpt_fast_dir), "--shape", preset,
           "--mode", mode, "--prompt-len", str(prompt_len), "--new-tokens", str(new_tokens), "--runs", str(runs),
           "--device", device, "--temperature", str(temperature), "--top-k", str(top_k), "--seed", str(seed)]
    if mode == "int4":
        cmd += ["--group-size", str(group_size or DEFAULT_INT4_GROUP_SIZE)]
    if not compile:
        cmd.append("--no-compile")
    return cmd


def run_gptfast(gpt_fast_dir: str, preset: str, mode: str, group_size: int | None, prompt_len: int,
                new_tokens: int, runs: int, *, device: str = "cuda", compile: bool = True,
                temperature: float = 0.8, top_k: int = 200, seed: int = 0, timeout: float = 900.0,
                log: Callable[[str], None] | None = None, tp: int | None = None) -> dict:
    """Run the gpt-fast harness (peer_script()); returns its JSON (or {"error": ...}). Its output
    lines go to ``log`` as they come."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    cmd = gptfast_command(gpt_fast_dir, preset, mode, group_size, prompt_len, new_tokens, runs, device=device,
                          compile=compile, temperature=temperature, top_k=top_k, seed=seed, tp=tp)
    from .parallel.group import MULTICAST_OFF

    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore::FutureWarning", **MULTICAST_OFF)
    if tp is not None:
        env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, without its warning
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    found: list[dict] = []
    tail: list[str] = []
    skipped = [0]

    def pump():
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith("{"):
                try:
                    obj = json.loads(line)
                    if isinstance(obj, dict) and obj.get("peer") == "gpt-fast":
                        found.append(obj)
                        continue
                except ValueError:
                    pass
            if line.startswith("linear: "):  # gpt-fast's int4 quantizer prints one line per layer
                skipped[0] += 1
                continue
            tail.append(line)
            del tail[:-20]
            log(f"  [gpt-fast] {line}")

    th = threading.Thread(target=pump, daemon=True)
    th.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        th.join(5)
        return dict(peer="gpt-fast", error=f"timed out after {timeout:.0f} s", command=cmd,
                    wall_s=time.perf_counter() - t0)
    th.join(10)
    out = found[-1] if found else {}
    out.setdefault("peer", "gpt-fast")
    out["command"] = cmd
    out["wall_s"] = time.perf_counter() - t0
    if rc != 0 or not found or "tok_s" not in out:
        out.setdefault("error", f"exit code {rc}: " + " | ".join(tail[-3:]))
    return out
