"""Self-describing quantized checkpoints.

A checkpoint is a directory:

- ``model.safetensors``: the quantized state dict (int8 / uint8 weights, scales, zeros, biases,
  and the unquantized norms and token embedding), whose header metadata repeats blitzgen.json
  (key ``blitzgen.quant``, a JSON string, plus each field as a string);
- ``config.json``: the model's Hugging Face config (``ModelArgs.to_hf_config``);
- ``tokenizer.json``, ``tokenizer_config.json``, ``generation_config.json``
  (``Tokenizer.save_pretrained``);
- ``blitzgen.json``: {"format": "blitzgen-quantized", "format_version": 1, "scheme",
  "group_size", "dtype", "method" ("rtn": round to nearest, or "gptq"), "calibration_tokens" (GPTQ),
  "source_model", "source_kind", "blitzgen_version", "created"}.

Loading needs no flag and parses no file name: it goes through the one assemble step
(loading/assemble.py) with the quantized modules put in per the metadata and every tensor
assigned as stored, after a name, shape and dtype check (nothing is re-quantized).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..errors import BlitzgenError, ModelLoadError
from ..quant.core import is_quantized, make_config, quantized_module_types
from . import hf as hf_src
from .assemble import assemble

METADATA_KEY = "blitzgen.quant"
FORMAT = "blitzgen-quantized"
FORMAT_VERSION = 1
META_FILE = "blitzgen.json"
WEIGHTS_FILE = "model.safetensors"
# keys of blitzgen.json that the loader relies on
_REQUIRED = ("format", "format_version", "scheme")


def _header_metadata(file: Path) -> dict | None:
    """The safetensors header's __metadata__ (read directly: 8-byte length + JSON), or None."""
    try:
        with open(file, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n < 100_000_000:
                return None
            header = json.loads(fh.read(n))
        return header.get("__metadata__") or {}
    except (OSError, ValueError, AttributeError):
        return None


def _meta_from_header(file: Path) -> dict | None:
    md = _header_metadata(file)
    if not md or METADATA_KEY not in md:
        return None
    try:
        meta = json.loads(md[METADATA_KEY])
    except json.JSONDecodeError:
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def is_quantized_checkpoint(path: Path) -> bool:
    """A directory with blitzgen.json, or whose model.safetensors carries blitzgen metadata."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / META_FILE).is_file():
        return True
    weights = path / WEIGHTS_FILE
    return weights.is_file() and _meta_from_header(weights) is not None


# ------------------------------------------------------------------------------------------------
# save


def build_metadata(lm, meta: dict) -> dict:
    from .. import __version__

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "scheme": meta["scheme"],
        "group_size": meta.get("group_size"),
        "head": meta.get("head", True),  # False: the output head was left float; "int8": int8
        "dtype": meta.get("dtype"),
        "method": meta.get("method", "rtn"),
        "calibration_tokens": meta.get("calibration_tokens"),
        "source_model": str(getattr(lm, "source", "") or ""),
        "source_kind": str(getattr(lm, "kind", "") or ""),
        "blitzgen_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def save_quantized(lm, out_dir: Path, meta: dict, *, dtype: torch.dtype | None = None) -> None:
    """Write lm (a LoadedModel whose model went through quantize_model) as a checkpoint in out_dir.

    dtype, when given, is the dtype of the saved float tensors (scales, zeros, biases, norms, the
    embedding); by default they are saved as they are in memory.

    blitzgen.json is written last, so a directory interrupted mid-save is not taken for a
    checkpoint (a loader sees no blitzgen.json and no blitzgen header: no torn file is trusted).
    """
    from safetensors.torch import save_file

    model = lm.model
    if not is_quantized(model):
        raise BlitzgenError("the model is not quantized; run quantize_model first")
    if not meta or "scheme" not in meta:
        raise BlitzgenError("quantization metadata must name the scheme")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        meta = {**meta, "dtype": str(dtype).replace("torch.", "")}
    full = build_metadata(lm, meta)
    (out_dir / META_FILE).unlink(missing_ok=True)

    shared = lm.args.tie_word_embeddings and isinstance(model.output, torch.nn.Linear) \
        and not isinstance(model.output, quantized_module_types())  # a float tied head is the embedding
    state = {k: v.detach().to(device="cpu", dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)
             .contiguous() for k, v in model.state_dict().items() if not (shared and k == "output.weight")}
    header = {METADATA_KEY: json.dumps(full)}
    header.update({f"blitzgen.{k}": str(v) for k, v in full.items() if v is not None})
    tmp = out_dir / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata=header)
    os.chmod(tmp, 0o666 & ~umask())  # safetensors creates it 0600; the other files follow the umask
    os.replace(tmp, out_dir / WEIGHTS_FILE)

    (out_dir / "config.json").write_text(json.dumps(lm.args.to_hf_config(), indent=2) + "\n")
    lm.tokenizer.save_pretrained(out_dir)
    (out_dir / META_FILE).write_text(json.dumps(full, indent=2) + "\n")


def umask() -> int:
    try:  # read without changing it (os.umask sets it, which races with other threads)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------------------
# load


def read_metadata(path: Path) -> dict:
    """blitzgen.json (or the safetensors header's copy when it is absent), validated."""
    path = Path(path)
    file = path / META_FILE
    if file.is_file():
        try:
            meta = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"cannot read {file}: {e}") from None
        where = str(file)
    else:
        meta = _meta_from_header(path / WEIGHTS_FILE)
        where = str(path / WEIGHTS_FILE)
        if meta is None:
            raise ModelLoadError(f"{path} is not a blitzgen quantized checkpoint (no {META_FILE})")
    if not isinstance(meta, dict):
        raise ModelLoadError(f"{where}: expected a JSON object")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise ModelLoadError(f"{where} is missing {', '.join(missing)}")
    if meta["format"] != FORMAT:
        raise ModelLoadError(f"{where}: format {meta['format']!r} is not {FORMAT!r}")
    if meta["format_version"] != FORMAT_VERSION:
        raise ModelLoadError(
            f"{where}: format_version {meta['format_version']!r} is not supported by this blitzgen "
            f"(it reads version {FORMAT_VERSION}); upgrade blitzgen or re-quantize"
        )
    return meta


def config_from_metadata(meta: dict, where: str = "checkpoint"):
    scheme = meta.get("scheme")
    try:
        head = meta.get("head", True)
        head = head if (head is True or head is False or head == "int8") else head is not False
        return make_config(str(scheme), meta.get("group_size"), head=head,
                           symmetric=meta.get("symmetric", False) is True)
    except BlitzgenError as e:
        raise ModelLoadError(f"{where}: unsupported quantization (scheme {scheme!r}, group size "
                             f"{meta.get('group_size')!r}): {e}") from None


def load_checkpoint(path, *, device, dtype: torch.dtype, progress: bool = True, shard=None):
    """-> (model, args, tokenizer, meta). Float tensors are cast to dtype; the quantized ones are
    assigned as they are (never re-quantized)."""
    from ..tokenizer import Tokenizer

    path = Path(path)
    meta = read_metadata(path)
    config = config_from_metadata(meta, str(path / META_FILE))
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelLoadError(f"{path}: {WEIGHTS_FILE} is missing")
    header_meta = _meta_from_header(weights)
    if header_meta is not None and (header_meta.get("scheme"), header_meta.get("group_size")) != \
            (meta.get("scheme"), meta.get("group_size")):
        raise ModelLoadError(
            f"{path}: {META_FILE} says {meta.get('scheme')}/{meta.get('group_size')} but {WEIGHTS_FILE} was "
            f"written as {header_meta.get('scheme')}/{header_meta.get('group_size')}"
        )
    args = hf_src.load_args(path)
    source = hf_src.SafetensorsSource([weights], column="ours", device=str(device))
    model, args, _ = assemble(args, source, device=device, dtype=dtype, prequantized=config, progress=progress,
                              where=str(weights), shard=shard)
    return model, args, Tokenizer.from_hf_dir(path), meta


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
