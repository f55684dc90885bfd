"""Runtime options: how a model runs (device, dtype, compile, quantization, context, kernels,
caches). This is the only module that reads blitzgen's environment variables, and the one place
that reports a fallback to a slower path (once per reason, never swallowed).

Environment variables (each read here only):
  BLITZGEN_CACHE             root of blitzgen's caches (compile artifacts, Inductor, converted
                             GGUF weights); default $XDG_CACHE_HOME/blitzgen or ~/.cache/blitzgen
  BLITZGEN_WEIGHT_CACHE      0/false/off: do not keep a GGUF's converted weights in the cache
  BLITZGEN_STAGED_LOAD       0/false/off: read safetensors to CUDA with safetensors' own copy, not
                             through pinned, double-buffered, multi-threaded reads (loading/hf.py)
  BLITZGEN_COMPILE_REGIONS   1/0: compile one transformer block as a region that every layer reuses
                             (Dynamo traces 1 block, not n_layers); default: on for CPU, off for CUDA
  BLITZGEN_AOT_DECODE        1: save the compiled decode step and samplers whole with torch's AOT
                             precompile and load them on warm starts (no Dynamo; aot_decode.py); off
  BLITZGEN_KERNELS           0/false/off: do not use the Triton kernels (GEMV, decode attention)
  BLITZGEN_DECODE_ATTENTION  auto | sdpa | matmul | split[:C] | triton: one-token attention
  BLITZGEN_GEMV_CONFIGS      a JSON file of GEMV launch configs that override the built-in table
  BLITZGEN_GEMV_AUTOTUNE     1: time candidate GEMV configs on first use (eager only)
  BLITZGEN_FUSED             1/0: decode (one token) through the fused RMSNorm/GEMV/SwiGLU/residual
                             kernels (kernels/fused_decode.py); CUDA only; default: on for
                             unquantized weights, off for int8/int4 (RuntimeOptions.fused_for)
  BLITZGEN_SPEC_GRAPH        0/false/off: run an n-gram verify round through torch.compile's CUDA
                             graphs, not as one captured graph (speculative_graph.py)
  BLITZGEN_GPTFAST_SCRIPT    the gpt-fast harness that `bench --peer` runs
  BLITZGEN_API_KEY           the server's API key (read as `serve --api-key`'s default)
  BLITZGEN_MODAL_*           the Modal deployment's settings (deploy/settings.py): APP, GPU, VOLUME,
                             SNAPSHOT, MODEL, DTYPE, QUANTIZE, COMPILE, MAX_MODEL_LEN, WARMUP,
                             MIN_CONTAINERS, MAX_CONTAINERS, SCALEDOWN, CONCURRENCY, TIMEOUT,
                             STARTUP_TIMEOUT, TORCH, SECRET
  RANK, WORLD_SIZE, LOCAL_RANK  torchrun's: a tensor-parallel rank started by torchrun (parallel/)

Set (not read) by parallel/ in every tensor-parallel rank's environment, NVLink multicast off:
  NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

log = logging.getLogger("blitzgen")

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
DECODE_ATTENTION = ("auto", "sdpa", "matmul", "split", "triton")
INT4_GEMV_KERNELS = ("fp32", "h2", "h2p")  # kernels/gemv_configs.int4_kernel_choice (BLITZGEN_INT4_GEMV)
INT4_PREFILL = ("tinygemm", "triton")  # quant/int4.prefill_choice (BLITZGEN_INT4_PREFILL)
INT4_ROWS = ("convert", "magic", "words", "words-xs")  # kernels/mm_rows.int4_decode (BLITZGEN_INT4_ROWS): the row kernel's tile decode
DEFAULT_DTYPE = "bfloat16"  # on CUDA and CPU alike
WARM_CACHE_TOKENS = 8192  # KV-cache positions a compiled server allocates up front
_FALSE = ("0", "false", "no", "off")
# RuntimeOptions fields that the kernels read from these variables (apply_kernel_settings)
_KERNEL_ENV = (("int4_gemv", "BLITZGEN_INT4_GEMV"), ("int4_prefill", "BLITZGEN_INT4_PREFILL"),
               ("int4_rows", "BLITZGEN_INT4_ROWS"), ("gemv_configs", "BLITZGEN_GEMV_CONFIGS"))


def env(name: str, default: str | None = None) -> str | None:
    """os.environ[name] (stripped), or default when unset or empty."""
    value = os.environ.get(name, "").strip()
    return value if value else default


def env_flag(name: str, default: bool) -> bool:
    value = env(name)
    return default if value is None else value.lower() not in _FALSE


def cache_root() -> str:
    base = env("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return env("BLITZGEN_CACHE") or os.path.join(base, "blitzgen")


def spec_graph() -> bool:
    """BLITZGEN_SPEC_GRAPH: an n-gram verify round as one captured CUDA graph (default on)."""
    return env_flag("BLITZGEN_SPEC_GRAPH", True)


def triton_interpret() -> bool:
    """Triton's own TRITON_INTERPRET (kernels pick interpreter-friendly code paths under it)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class RuntimeOptions:
    """Everything that decides how a loaded model runs. ``None`` fields are resolved by
    ``resolved()``: device to cuda when a GPU is present, compile to on for CUDA."""

    device: str | None = None
    dtype: str = DEFAULT_DTYPE
    compile: bool | None = None
    quantize: str | None = None  # "int8" | "int4"
    group_size: int | None = None  # int4 only
    quantize_head: bool | str = True  # False: the output head keeps its float weights; "int8" (int4 only)
    quantize_symmetric: bool = False  # int4 on the Q4_0 grid (set by loading.auto_quantization)
    auto_quantize: bool = True  # no quantize given: a GGUF's 4-bit blocks stay 4-bit (loading.auto_quantization)
    max_model_len: int | None = None  # the user's limit on prompt + completion
    decode_attention: str = "auto"
    kernels: bool = True
    gemv_configs: str | None = None
    gemv_autotune: bool = False
    int4_gemv: str | None = None  # BLITZGEN_INT4_GEMV (read by the kernels; validated here; apply_kernel_settings)
    int4_prefill: str | None = None  # BLITZGEN_INT4_PREFILL (read by quant/int4.py; likewise)
    int4_rows: str | None = None  # BLITZGEN_INT4_ROWS (read by kernels/mm_rows.py; likewise)
    cache_dir: str | None = None
    weight_cache: bool = True  # keep a GGUF's converted weights under cache_dir (loading/converted.py)
    staged_load: bool = True  # safetensors to CUDA through pinned staging buffers (loading/hf.py)
    warm_cache_tokens: int = WARM_CACHE_TOKENS
    compile_prefill: bool = False  # compile prefill per length bucket (else eager, as gpt-fast)
    autotune: bool = False  # Inductor's coordinate-descent tuning (slow to compile, ~+3% decode)
    compile_regions: bool | None = None  # one block traced for all layers; None: regions_for(device)
    fused_decode: bool | None = None  # one-token blocks through kernels/fused_decode.py; None: fused_for()
    aot_decode: bool = False  # decode step + samplers saved/loaded by torch's AOT precompile (BLITZGEN_AOT_DECODE; on in from_env)

    @classmethod
    def from_env(cls, **overrides) -> "RuntimeOptions":
        """Defaults, then the environment, then ``overrides`` (None values are ignored)."""
        base = dict(
            decode_attention=env("BLITZGEN_DECODE_ATTENTION", "auto"),
            kernels=env_flag("BLITZGEN_KERNELS", True),
            gemv_configs=env("BLITZGEN_GEMV_CONFIGS"),
            gemv_autotune=env_flag("BLITZGEN_GEMV_AUTOTUNE", False),
            int4_gemv=env("BLITZGEN_INT4_GEMV"),
            int4_prefill=(env("BLITZGEN_INT4_PREFILL") or "").lower() or None,
            int4_rows=(env("BLITZGEN_INT4_ROWS") or "").lower() or None,
            fused_decode=env_flag("BLITZGEN_FUSED", True) if env("BLITZGEN_FUSED") else None,
            aot_decode=env_flag("BLITZGEN_AOT_DECODE", True),
            cache_dir=cache_root(),
            weight_cache=env_flag("BLITZGEN_WEIGHT_CACHE", True),
            staged_load=env_flag("BLITZGEN_STAGED_LOAD", True),
            compile_regions=env_flag("BLITZGEN_COMPILE_REGIONS", True) if env("BLITZGEN_COMPILE_REGIONS") else None,
        )
        base.update({k: v for k, v in overrides.items() if v is not None})
        opts = cls(**base)
        opts.validate()
        return opts

    def validate(self) -> "RuntimeOptions":
        from .errors import BlitzgenError

        if self.device is not None and self.device.split(":")[0] not in ("cpu", "cuda"):
            raise BlitzgenError(f"unknown device {self.device!r} (cpu or cuda)")
        if self.dtype not in DTYPES:
            raise BlitzgenError(f"unknown dtype {self.dtype!r} (one of {', '.join(sorted(DTYPES))})")
        impl, _, chunks = self.decode_attention.partition(":")
        if impl not in DECODE_ATTENTION or (chunks and not (chunks.isdigit() and int(chunks) > 0)):
            raise BlitzgenError(f"unknown decode attention {self.decode_attention!r} "
                                f"(one of {', '.join(DECODE_ATTENTION)}, or split:C; BLITZGEN_DECODE_ATTENTION)")
        if self.int4_gemv is not None and self.int4_gemv.lower() not in INT4_GEMV_KERNELS:
            raise BlitzgenError(f"unknown int4 GEMV kernel {self.int4_gemv!r} "
                                f"(one of {', '.join(INT4_GEMV_KERNELS)}; BLITZGEN_INT4_GEMV)")
        if self.int4_prefill is not None and self.int4_prefill.lower() not in INT4_PREFILL:
            raise BlitzgenError(f"unknown int4 prefill kernel {self.int4_prefill!r} "
                                f"(one of {', '.join(INT4_PREFILL)}; BLITZGEN_INT4_PREFILL)")
        if self.int4_rows is not None and self.int4_rows.lower() not in INT4_ROWS:
            raise BlitzgenError(f"unknown int4 row-kernel decode {self.int4_rows!r} "
                                f"(one of {', '.join(INT4_ROWS)}; BLITZGEN_INT4_ROWS)")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise BlitzgenError(f"--max-model-len must be at least 2, got {self.max_model_len}")
        if self.warm_cache_tokens < 1:
            raise BlitzgenError(f"warm cache size must be positive, got {self.warm_cache_tokens}")
        return self

    def quant_config(self):
        """The quant config these options ask for (quantize, group_size, quantize_head,
        quantize_symmetric), or None."""
        if self.quantize is None:
            return None
        from .quant import make_config

        return make_config(self.quantize, self.group_size, head=self.quantize_head,
                           symmetric=self.quantize_symmetric)

    def resolved(self) -> "RuntimeOptions":
        """A copy with device and compile decided (imports torch)."""
        import torch

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        compile_ = self.compile if self.compile is not None else device.startswith("cuda")
        return dataclasses.replace(self, device=device, compile=compile_)

    def apply_kernel_settings(self) -> None:
        """Make this object's kernel settings take effect. They are process-wide and read from the
        environment where they are used (blitzgen.kernels, quant/int4.py), so one given here in
        Python, not through the environment, is exported to it; ``loading.load`` calls this before
        building a model. ``kernels=False`` also switches off kernels already imported. The settings
        stay for the rest of the process (as the environment's would)."""
        import sys

        self.validate()
        for field, var in _KERNEL_ENV:
            value = getattr(self, field)
            if value is not None and env(var) != str(value):
                os.environ[var] = str(value)
                configs = sys.modules.get("blitzgen.kernels.gemv_configs")
                if configs is not None:  # read once per process: read again
                    configs.int4_kernel_choice.cache_clear()
                    configs._overrides.cache_clear()
                    configs._CHOSEN.clear()
                rows = sys.modules.get("blitzgen.kernels.mm_rows")
                if rows is not None:  # its configs carry the int4 decode
                    rows.choose_config.cache_clear()
        if self.gemv_autotune and not env_flag("BLITZGEN_GEMV_AUTOTUNE", False):
            os.environ["BLITZGEN_GEMV_AUTOTUNE"] = "1"
        if not self.kernels:
            os.environ["BLITZGEN_KERNELS"] = "0"
            kernels = sys.modules.get("blitzgen.kernels")
            if kernels is not None and kernels.available():
                kernels.disable("disabled by the user (RuntimeOptions.kernels=False)")

    def regions_for(self, device: str) -> bool:
        """Whether a compiled model traces one block as a region for all layers: the option when
        set, else on. CPU: Dynamo's warm re-trace of a 32-layer step 22.9 s -> 9.4 s, cold compile
        123 s -> 43 s. CUDA (H200, Llama-2-7B, torch 2.11): cold start to first token ~50 s -> 23 s,
        warm 8-9 s, the same decode speed; tests/gpu/test_defaults_gpu.py passes bf16 and int8."""
        if self.compile_regions is not None:
            return self.compile_regions
        return True

    def fused_for(self, device: str, quantized: bool) -> bool:
        """Whether one-token blocks run through the fused GEMV kernels: the option when set, else
        on CUDA for unquantized weights only (H200, Llama-2-7B: bf16 +6% in `bench`; int4 +0.3%,
        int8 -3%, where our plain GEMVs plus Inductor's norms are already faster; BENCHMARKS.md)."""
        if self.fused_decode is not None:
            return self.fused_decode
        return str(device).startswith("cuda") and not quantized

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, DTYPES[self.dtype])

    @property
    def is_cuda(self) -> bool:
        return (self.device or "").startswith("cuda")

    def replace(self, **changes) -> "RuntimeOptions":
        return dataclasses.replace(self, **changes).validate()


_REPORTED: set[str] = set()  # fallback reasons reported so far in this process


def fallback(what: str, reason: str) -> None:
    """Report, once per process and reason, that ``what`` runs on a slower path, and why."""
    key = f"{what}: {reason}"
    if key in _REPORTED:
        return
    _REPORTED.add(key)
    log.warning("blitzgen: %s falls back to a slower path: %s", what, reason)
