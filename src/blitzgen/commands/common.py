"""Option groups shared by every verb (one group per concern, the same flag names everywhere), the
checks that need neither torch nor the model, and the one function that turns flags into
``RuntimeOptions``.

    model source  --model
    runtime       --device --dtype --compile/--no-compile --quantize --group-size --max-model-len
                  --decode-attention --compile-prefill --autotune
    sampling      --temperature --top-k --top-p --min-p --seed --stop --max-new-tokens
    remote        --url --api-key

A verb takes a group whole, or a subset (``only=``) with its own defaults or help (keyword
overrides, e.g. ``add_sampling_args(p, temperature={"default": 0.7})``). Flags a user did not give
are ``None`` (or the documented default), so a contradiction can be told from a default.
Nothing here imports torch before a model is loaded.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import ContextLengthError, InvalidRequestError
from ..runtime import DECODE_ATTENTION, DTYPES, RuntimeOptions

QUANT_SCHEMES = ("int8", "int4")
# no tokenizer we know has a token longer than ~130 characters (SmolLM2's longest is 81): a prompt
# longer than this many characters per allowed token cannot fit, whatever the tokenizer
MAX_CHARS_PER_TOKEN = 256


class HelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to every option whose help does not mention its default already. Options
    whose default is None say in their help what None means (e.g. "default: cuda when present");
    on/off flags say it in words."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or action.nargs == 0 or "default" in text or action.default is None
                or action.default is argparse.SUPPRESS or action.default == []):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class Parser(argparse.ArgumentParser):
    """blitzgen's parsers: every --help shows the defaults."""

    def __init__(self, *args, **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kw)


class DeprecatedAlias(argparse.Action):
    """A hidden old spelling of an option: warns, then stores into the new option's dest (values in
    ``none`` store None: bench's ``--mode bf16`` is ``--quantize`` not given)."""

    def __init__(self, option_strings, dest, *, new: str, none=(), **kw):
        self.new, self.none = new, tuple(none)
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        warn(f"{option_string} is deprecated; use {self.new}")
        setattr(namespace, self.dest, None if values in self.none else values)


MODEL_HELP = ("HF model directory, GGUF file, blitzgen quantized checkpoint or HF repo id "
              "(default: the embedded SmolLM2-135M-Instruct)")

# dest: (flags, argparse keywords). Every default is None: "not given" (RuntimeOptions decides).
RUNTIME = {
    "device": (("--device",), dict(choices=["cpu", "cuda"], help="where to run (default: cuda when a GPU is present)")),
    "dtype": (("--dtype",), dict(choices=sorted(DTYPES), help="weight and activation dtype (default: bfloat16)")),
    "compile": (("--compile",), dict(action=argparse.BooleanOptionalAction,
                                     help="torch.compile the decode step and the samplers, with CUDA graphs on GPU "
                                          "(default: on for CUDA; on the CPU, generate compiles a long run when "
                                          "its compiled step is warm in the cache: see README)")),
    "quantize": (("--quantize",), dict(choices=QUANT_SCHEMES + ("none",),
                                       help="weight-only quantization, applied layer by layer at load time "
                                            "(default: none, except that on the CPU in bfloat16 a GGUF's 4-bit "
                                            "Q4_1 blocks stay 4-bit as int4 g32 with the head as "
                                            "stored: 1.7x the speed of widening them; 'none' widens them; a "
                                            "quantized checkpoint needs no flag)")),
    "group_size": (("--group-size",), dict(type=int, metavar="N",
                                           help="int4 group size, 32, 64 or 128 (default: 32; needs --quantize int4)")),
    "max_model_len": (("--max-model-len",), dict(type=int, metavar="TOKENS",
                                                 help="longest prompt + completion to allow (default: the model's "
                                                      "context; a larger value is clamped to it)")),
    "decode_attention": (("--decode-attention",), dict(choices=DECODE_ATTENTION,
                                                       help="one-token attention implementation (default: auto, "
                                                            "or $BLITZGEN_DECODE_ATTENTION)")),
    "compile_prefill": (("--compile-prefill",), dict(action="store_true", default=None,
                                                     help="with --compile: compile prefill too, one graph per prompt-length "
                                                          "bucket, all built at warm-up (slower start, faster long prompts; "
                                                          "default: eager prefill)")),
    "autotune": (("--autotune",), dict(action="store_true", default=None,
                                       help="with --compile on CUDA: Inductor's coordinate-descent tuning (a few %% "
                                            "faster decode; a much slower first compile, re-tuned every start)")),
}

SAMPLING = {
    "temperature": (("--temperature",), dict(type=float, default=0.8,
                                             help="sampling temperature; 0 is greedy (the same text every run)")),
    "top_k": (("--top-k",), dict(type=int, default=200, metavar="K", help="sample from the K most likely tokens; 0 disables")),
    "top_p": (("--top-p",), dict(type=float, default=1.0, metavar="P",
                                 help="nucleus sampling: the smallest set of tokens with probability >= P, in (0, 1]; 1 disables")),
    "min_p": (("--min-p",), dict(type=float, default=0.0, metavar="P",
                                 help="drop tokens below P x the top token's probability, in [0, 1]; 0 disables")),
    "seed": (("--seed",), dict(type=int, default=None, metavar="N",
                               help="sampling seed: the same seed gives the same text (default: random)")),
    "stop": (("--stop",), dict(action="append", default=[], metavar="TEXT", help="stop before this text (repeatable)")),
    "max_new_tokens": (("--max-new-tokens",), dict(type=int, default=200, metavar="N", help="most tokens to generate")),
}


def _options(table: dict, only, overrides: dict):
    """(dest, flags, argparse keywords) of the table's options in ``only`` (all when None)."""
    unknown = set(overrides) - set(table)
    if unknown:
        raise TypeError(f"unknown option override(s): {', '.join(sorted(unknown))}")
    for dest, (flags, kw) in table.items():
        if only is None or dest in only:
            yield dest, flags, {"default": None, **kw, **overrides.get(dest, {})}


def add_model_source_args(p: argparse.ArgumentParser, *, help: str = MODEL_HELP):
    g = p.add_argument_group("model source")
    g.add_argument("--model", "-m", default=None, help=help)
    return g


def add_runtime_args(p: argparse.ArgumentParser, *, only=None, mode_alias: bool = False, mode_none=(), **overrides):
    """The runtime group (all of RUNTIME, or the dests in ``only``). ``mode_alias`` adds the hidden,
    deprecated ``--mode`` spelling of ``--quantize`` (``mode_none``: extra --mode values that mean
    no quantization); with ``quantize={"required": True}`` one of the two is then required."""
    g = p.add_argument_group("runtime")
    for dest, flags, kw in _options(RUNTIME, only, overrides):
        if dest == "quantize" and mode_alias:
            either = g.add_mutually_exclusive_group(required=kw.pop("required", False))
            either.add_argument(*flags, dest=dest, **kw)
            either.add_argument("--mode", dest=dest, action=DeprecatedAlias, new="--quantize", none=mode_none,
                                choices=[*kw["choices"], *mode_none], help=argparse.SUPPRESS)
        else:
            g.add_argument(*flags, dest=dest, **kw)
    return g


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Model source + the whole runtime group: what every verb that loads a model takes."""
    add_model_source_args(p)
    add_runtime_args(p)


def add_parallel_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("tensor parallel")
    g.add_argument("--tp", type=int, default=None, metavar="N",
                   help="spread the model over N GPUs (N processes; also runs under torchrun)")
    g.add_argument("--all-reduce", default="functional", choices=["functional", "symm-one-shot", "symm-two-shot"],
                   help="the all-reduce of --tp (functional: NCCL/gloo; symm-*: symmetric memory, CUDA)")
    return g


def tp_spec(args):
    """What every tensor-parallel rank loads, from the runtime flags (``--tp``)."""
    from ..parallel import TPSpec

    opts = runtime_options(args).resolved()
    return TPSpec(model=args.model, device=opts.device, dtype=opts.dtype, quantize=opts.quantize,
                  group_size=opts.group_size, compile=opts.compile, max_model_len=opts.max_model_len,
                  all_reduce=args.all_reduce, options=opts)


def add_sampling_args(p: argparse.ArgumentParser, *, only=None, **overrides):
    g = p.add_argument_group("sampling")
    for dest, flags, kw in _options(SAMPLING, only, overrides):
        g.add_argument(*flags, dest=dest, **kw)
    return g


def add_remote_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("remote")
    g.add_argument("--url", default=None,
                   help="talk to a running `blitzgen serve` (or another OpenAI-compatible server) at this URL "
                        "instead of loading a model; --model then names the served model")
    g.add_argument("--api-key", default=None, help="Bearer key for --url")
    return g


# ---- checks before torch ---------------------------------------------------------------------------
# the ranges SamplingParams.validate enforces, named by flag (that module needs torch)
SAMPLING_RANGES = (
    ("temperature", lambda v: 0 <= v <= 100, "between 0 and 100 (0 is greedy)"),
    ("top_k", lambda v: v >= 0, ">= 0 (0 disables it)"),
    ("top_p", lambda v: 0 < v <= 1, "in (0, 1] (1 disables it)"),
    ("min_p", lambda v: 0 <= v <= 1, "in [0, 1] (0 disables it)"),
    ("seed", lambda v: v is None or 0 <= v < 2**63, "a non-negative integer"),
    ("max_new_tokens", lambda v: v >= 1, ">= 1"),
)


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_args(args) -> None:
    """Every check that needs neither torch nor the model, for whichever groups the verb has (the CLI
    runs it before any verb). NaN fails every range."""
    from .speculate import check_speculation_args

    check_speculation_args(args)  # speculation flags, for the verbs that have them
    for dest, ok, rule in SAMPLING_RANGES:
        value = getattr(args, dest, None)
        if value is not None and not ok(value):
            raise InvalidRequestError(f"{flag(dest)} must be {rule}, got {value}", param=dest)
    if getattr(args, "url", None):
        given = [flag(d) for d in RUNTIME if getattr(args, d, None) is not None]
        if given:
            raise InvalidRequestError(f"{given[0]} applies to a model loaded here; with --url the server's "
                                      f"settings apply (drop {given[0]} or --url)")
        return
    group_size = getattr(args, "group_size", None)
    quantize = getattr(args, "quantize", None) or getattr(args, "mode", None)  # quantize's old --mode
    if hasattr(args, "quantize") and group_size is not None and quantize != "int4":
        raise InvalidRequestError("--group-size applies to --quantize int4 only" +
                                  (f", not --quantize {quantize}" if quantize else "; add --quantize int4"))
    if hasattr(args, "max_model_len"):
        runtime_options(args)  # --max-model-len, --device, --dtype and the environment's values
    check_prompt_fits(getattr(args, "prompt", None), args)


def check_prompt_fits(prompt: str | None, args) -> None:
    """--max-new-tokens must leave room in --max-model-len, and the prompt cannot be longer than
    MAX_CHARS_PER_TOKEN characters per token left (the exact count waits for the tokenizer)."""
    limit, new = getattr(args, "max_model_len", None), getattr(args, "max_new_tokens", None)
    if limit is None or new is None:
        return
    room = limit - new
    if room < 1:
        raise ContextLengthError(f"--max-new-tokens {new} leaves no room for a prompt within --max-model-len {limit}",
                                 param="max_new_tokens")
    if prompt is not None and len(prompt) > room * MAX_CHARS_PER_TOKEN:
        raise ContextLengthError(f"the prompt is too long: {len(prompt)} characters cannot fit in the {room} tokens "
                                 f"that --max-model-len {limit} leaves after --max-new-tokens {new}", param="prompt")


def runtime_options(args) -> RuntimeOptions:
    """The RuntimeOptions the runtime flags ask for, over the environment's defaults (torch-free).
    Verbs without a runtime flag get that field's default."""
    values = {dest: getattr(args, dest, None) for dest in RUNTIME}
    if values["quantize"] == "none":
        values["quantize"], values["auto_quantize"] = None, False
    if values["dtype"] is not None:
        values["dtype"] = DTYPES.get(values["dtype"], values["dtype"])
    return RuntimeOptions.from_env(**values)


def warn(message: str) -> None:
    print(f"blitzgen: warning: {message}", file=sys.stderr, flush=True)


# ---- loading -----------------------------------------------------------------------------------------
# On the CPU a warm compiled start costs ~2.8 s more than eager to the first token and then decodes
# ~1.5x faster (2-core AMD EPYC, SmolLM2, BENCHMARKS.md): a one-off run breaks even near 375 tokens.
COMPILE_PAYS_TOKENS = 400


def load_engine(args, *, log=None, warm_for=None):
    """Load the model named by the flags and build a Generator from the same RuntimeOptions
    (compiled when asked; callers warm it up, e.g. with ``warm_up``). Marks the start-up report's
    "imports" and "load" phases. ``warm_for(lm)``: (tokens, sampler modes) the run needs, or None; on the
    CPU with neither --compile nor --no-compile, the run compiles when that is warm in the cache
    (warm_state.py)."""
    from ..startup import REPORT

    opts = runtime_options(args)
    undecided = opts.compile is None
    import torch

    from ..generate import Generator
    from ..loading import auto_quantization, load

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    opts = opts.resolved()
    auto = opts.quantize is None and "self-int4" not in (getattr(args, "speculate", None) or ())
    if auto:  # (self-int4 drafting needs a wider target than its int4 draft)
        opts = auto_quantization(args.model, opts)
    auto = auto and opts.quantize is not None
    quant = opts.quant_config()
    REPORT.mark("imports")
    lm = load(args.model, opts, device=opts.device, dtype=opts.torch_dtype, quantize=quant,
              progress=sys.stderr.isatty())
    REPORT.mark("load")
    context = lm.args.max_seq_len
    if opts.max_model_len is not None and opts.max_model_len > context:
        warn(f"--max-model-len {opts.max_model_len} is above {lm.name}'s context of {context} tokens; using {context}")
        opts = opts.replace(max_model_len=context)
    if undecided and warm_for is not None and opts.device == "cpu" and opts.aot_decode:
        from .. import warm_state
        from ..generate import compiled_capacity

        need = warm_for(lm)  # None: not a plain run
        limit = min(opts.max_model_len or context, context)
        if need and warm_state.is_warm(lm.args, opts, compiled_capacity(min(need[0], limit), limit), need[1]):
            opts = opts.replace(compile=True)
            log("Compiling: this configuration is warm in the compile cache (--no-compile runs eager)")
    gen = Generator(lm.model, lm.tokenizer, options=opts)
    cached = {"hit": ", converted weights from the cache", "saved": ", converted weights cached"}
    log(f"Loaded {lm.name} ({lm.kind}, {lm.args.n_layers} layers, {opts.dtype}{quant_label(lm.quant, auto)}{cached.get(lm.weight_cache, '')}) on {opts.device} "
        f"in {lm.load_seconds:.2f} seconds")
    torch.manual_seed(0)
    return lm, gen


def quant_label(meta: dict | None, auto: bool = False) -> str:
    """", int4 g32" and the like for the load line; ``auto``: the file's own 4-bit blocks were kept."""
    if not meta:
        return ""
    label = f", {meta['scheme']}" + (f" g{meta['group_size']}" if meta.get("group_size") else "")
    if meta.get("head") is False:
        label += ", head unquantized"
    elif meta.get("head") == "int8":
        label += ", int8 head"
    if auto:
        label += " (the file's 4-bit blocks; --quantize none widens them)"
    return label


def resolve_dtype(name: str | None):
    import torch

    return getattr(torch, DTYPES[name or "bfloat16"])


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def sampling_params(args):
    """The SamplingParams of the sampling flags (imports torch)."""
    from ..sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          min_p=args.min_p, seed=args.seed).validate()
