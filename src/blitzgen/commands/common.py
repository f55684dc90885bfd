"""Options and set-up shared by the subcommands that load a model."""

from __future__ import annotations

import argparse
import sys

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", default=None,
                   help="HF model directory, GGUF file, blitzgen quantized checkpoint or HF repo id "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    g.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="weight dtype (default: bfloat16 on both CUDA and CPU)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decode step (CUDA graphs on GPU). Default: on for CUDA, off on CPU")
    g.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="weight-only quantization applied at load time")
    g.add_argument("--group-size", type=int, default=None, help="int4 group size (32, 64 or 128)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + completion to allow (default: the model's context)")
    g.add_argument("--tp", type=int, default=None, metavar="N",
                   help="tensor parallel: spread the model over N GPUs (N processes; also runs under torchrun)")
    g.add_argument("--all-reduce", default="functional", choices=["functional", "symm-one-shot", "symm-two-shot"],
                   help="the all-reduce of --tp (functional: NCCL/gloo; symm-*: symmetric memory, CUDA)")


def resolve_dtype(name: str | None):
    import torch

    if name is None:
        return torch.bfloat16
    return getattr(torch, DTYPES[name])


def load_engine(args, *, log=None):
    """Load the model named by the options and build a Generator (compiled when asked; callers warm it up)."""
    import torch

    from ..generate import Generator
    from ..loading import default_device, load

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    device = args.device or default_device()
    dtype = resolve_dtype(args.dtype)
    quant = None
    if args.quantize:
        from ..quant import make_config

        quant = make_config(args.quantize, group_size=args.group_size)
    if args.max_model_len is not None and args.max_model_len < 2:
        from ..errors import InvalidRequestError

        raise InvalidRequestError(f"--max-model-len must be at least 2, got {args.max_model_len}")
    lm = load(args.model, device=device, dtype=dtype, quantize=quant, progress=sys.stderr.isatty())
    compile_ = args.compile if args.compile is not None else device.startswith("cuda")
    gen = Generator(lm.model, lm.tokenizer, compile=compile_, max_seq_len=args.max_model_len)
    log(f"Loaded {lm.name} ({lm.kind}, {lm.args.n_layers} layers, {dtype_name(dtype)}"
        f"{', ' + lm.quant['scheme'] if lm.quant else ''}) on {device} in {lm.load_seconds:.2f} seconds")
    torch.manual_seed(0)
    return lm, gen


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def tp_spec(args):
    """What every tensor-parallel rank loads, from the model options (``--tp``)."""
    from ..loading import default_device
    from ..parallel import TPSpec

    device = args.device or default_device()
    return TPSpec(model=args.model, device=device, dtype=args.dtype or "bfloat16", quantize=args.quantize,
                  group_size=args.group_size, compile=args.compile if args.compile is not None else
                  device.startswith("cuda"), max_model_len=args.max_model_len, all_reduce=args.all_reduce)
