"""``blitzgen quantize``: write a self-describing int8 / int4 checkpoint that every command loads."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model's weights (int8 or int4) into a checkpoint directory",
                       description="Load a model (float32 on CPU, bfloat16 on CUDA), quantize its linear layers "
                                   "and save a checkpoint directory that --model accepts with no extra flag.")
    p.add_argument("--model", "-m", default=None,
                   help="HF model directory, GGUF file or HF repo id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="required. int8: per-channel symmetric; int4: group-wise asymmetric")
    p.add_argument("--mode", choices=["int8", "int4"], default=None, help=argparse.SUPPRESS)  # the old name
    p.add_argument("--group-size", type=int, default=None, help="int4 group size: 32 (default), 64 or 128")
    p.add_argument("--out", "-o", required=True, help="output directory (created; must be empty unless --force)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="where to quantize (default: cuda if available)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="dtype of the saved scales, zeros, norms and embedding (the math is float32 either way)")
    p.add_argument("--gptq", action="store_true",
                   help="int4 with GPTQ (rounding errors compensated using calibration text) instead of round-to-nearest")
    p.add_argument("--calibration", metavar="FILE", default=None,
                   help="GPTQ calibration text: a plain text file, or .jsonl with a \"text\" field per line; "
                        "text like the model's real inputs, a few thousand tokens or more")
    p.add_argument("--calibration-tokens", type=int, default=8192, help="GPTQ: tokens of calibration text used")
    p.add_argument("--calibration-seq-len", type=int, default=512, help="GPTQ: tokens per calibration sample")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out, replacing its files")
    p.set_defaults(func=run)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def state_bytes(model, float_dtype=None) -> int:
    """Bytes of the model's saved tensors (tied tensors once), float ones counted in float_dtype."""
    import torch

    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape)
        if key in seen:
            continue
        seen.add(key)
        size = t.element_size()
        if float_dtype is not None and t.is_floating_point():
            size = torch.empty((), dtype=float_dtype).element_size()
        total += t.numel() * size
    return total


def run(args) -> int:
    import torch

    from ..errors import BlitzgenError
    from ..loading import default_device, load
    from ..quant import make_config
    from ..loading.checkpoint import checkpoint_bytes, save_quantized

    flag = "--mode" if args.mode and not args.quantize else "--quantize"
    if args.quantize and args.mode and args.quantize != args.mode:
        raise BlitzgenError(f"--quantize {args.quantize} and --mode {args.mode} disagree (--mode is the old name)")
    scheme = args.quantize or args.mode
    if scheme is None:
        raise BlitzgenError("quantize needs --quantize int8 or --quantize int4")
    config = make_config(scheme, group_size=args.group_size)
    if args.gptq and scheme != "int4":
        raise BlitzgenError(f"--gptq applies to {flag} int4 only")
    if args.gptq and not args.calibration:
        raise BlitzgenError("--gptq needs calibration text: --calibration FILE (plain text, or .jsonl with a "
                            "\"text\" field per line)")
    if args.calibration and not args.gptq:
        raise BlitzgenError("--calibration is only used with --gptq")
    for name, v in (("--calibration-tokens", args.calibration_tokens), ("--calibration-seq-len", args.calibration_seq_len)):
        if v < 1:
            raise BlitzgenError(f"{name} must be >= 1, got {v}")
    if args.calibration and not Path(args.calibration).expanduser().is_file():
        raise BlitzgenError(f"--calibration {args.calibration}: no such file")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise BlitzgenError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise BlitzgenError(f"--out {out} is not empty (pass --force to write into it)")
    device = args.device or default_device()
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    from ..loading import detect_kind, resolve

    if detect_kind(resolve(args.model)) == "blitzgen":
        raise BlitzgenError(f"{args.model} is already quantized; quantize the original model")
    save_dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    if args.gptq:  # GPTQ needs the float model whole (each layer's inputs come from the float layers before)
        from ..quant.gptq import calibration_samples, gptq_quantize_model

        lm = load(args.model, device=device, dtype=dtype, progress=sys.stderr.isatty())
        before = state_bytes(lm.model, save_dtype)
        log(f"Loaded {lm.name} ({lm.kind}, {lm.args.n_layers} layers, {str(dtype).replace('torch.', '')}) on "
            f"{device} in {lm.load_seconds:.2f} seconds")
        t1 = time.perf_counter()
        samples = calibration_samples(lm.tokenizer, args.calibration, max_tokens=args.calibration_tokens,
                                      seq_len=min(args.calibration_seq_len, lm.args.max_seq_len))
        n_tokens = sum(len(s) for s in samples)
        if n_tokens < 2048:
            log(f"warning: only {n_tokens} calibration tokens; GPTQ is more reliable with several thousand")
        log(f"GPTQ calibration: {n_tokens} tokens in {len(samples)} samples from {args.calibration}")
        meta = gptq_quantize_model(lm.model, config, samples, dtype=save_dtype, log=log)
    else:  # round to nearest, layer by layer as the weights load: the float model is never whole in memory
        t1 = t0
        lm = load(args.model, device=device, dtype=dtype, quantize=config, quant_dtype=save_dtype,
                  progress=sys.stderr.isatty())
        meta = lm.quant
        before = lm.args.num_params() * torch.empty((), dtype=save_dtype).element_size()
        log(f"Loaded {lm.name} ({lm.kind}, {lm.args.n_layers} layers) on {device}, quantizing each layer as it "
            f"arrived, in {lm.load_seconds:.2f} seconds")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t_quant = time.perf_counter() - t1
    lm.quant = meta
    t2 = time.perf_counter()
    save_quantized(lm, out, meta, dtype=save_dtype)
    t_save = time.perf_counter() - t2
    label = config.scheme + (f" (group size {config.group_size})" if config.group_size else "") + \
        (" with GPTQ" if args.gptq else "")
    log(f"Quantized to {label} in {t_quant:.2f} seconds" if args.gptq else f"Quantized to {label} while loading")
    after = state_bytes(lm.model, save_dtype)
    log(f"Weights in {args.dtype}: {_mb(before)} -> {_mb(after)} ({after / before:.1%}; scales and the unquantized "
        f"token embedding and norms stay {args.dtype})")
    log(f"Wrote {out} ({_mb(checkpoint_bytes(out))} on disk) in {t_save:.2f} seconds; "
        f"total {time.perf_counter() - t0:.2f} seconds")
    log(f"Run it with: blitzgen generate --model {out} --prompt ...")
    return 0
