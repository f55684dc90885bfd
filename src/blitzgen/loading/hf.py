"""Hugging Face model directories: config.json + one or many *.safetensors (lazily mmapped)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..config import ModelArgs
from ..errors import ModelLoadError


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {e}") from None


def safetensors_files(path: Path) -> list[Path]:
    """The weight files, from model.safetensors.index.json when sharded."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"cannot read {index}: {e}") from None
        files = sorted({path / f for f in weight_map.values()})
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ModelLoadError(f"{index.name} lists shards that are missing: {', '.join(absent)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        if list(path.glob("*.bin")) or list(path.glob("*.pth")):
            raise ModelLoadError(f"{path} has only pickled weights (.bin/.pth); blitzgen loads safetensors "
                                 "(convert with transformers' save_pretrained(safe_serialization=True))")
        raise ModelLoadError(f"no *.safetensors weights in {path}")
    return files


class SafetensorsSource:
    """name -> tensor over several safetensors files, opened lazily (mmap), nothing copied upfront.

    ``column`` names the tensors' naming scheme for the name table ("hf", or "ours" for blitzgen's
    own checkpoints). With ``device`` set, safetensors reads each tensor straight to that device:
    on CUDA it stages the mmapped bytes through pinned host memory and copies them to the GPU, so
    the cast to the model's dtype runs on the GPU; on the CPU a tensor is a view of the mmap until
    it is cast or concatenated (fused wqkv / w13)."""

    def __init__(self, files: list[Path], column: str = "hf", device: str = "cpu"):
        self.column = column
        self.handles = {}
        self.where: dict[str, object] = {}
        self.metadata: dict[str, str] = {}
        for f in files:
            try:
                h = safe_open(str(f), framework="pt", device=str(device))
                names = list(h.keys())
            except (SafetensorError, OSError, ValueError) as e:
                raise ModelLoadError(f"corrupt or truncated safetensors file {f}: {e}") from None
            self.metadata.update(h.metadata() or {})
            self.handles[f] = h
            for n in names:
                self.where[n] = h

    def names(self) -> list[str]:
        return list(self.where)

    def get_slice(self, name: str):
        """A lazy view of one tensor (``[a:b]`` / ``[:, a:b]`` read only those bytes)."""
        try:
            return self.where[name].get_slice(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ModelLoadError(f"cannot read tensor {name}: {e} (is the file truncated?)") from None

    def get(self, name: str) -> torch.Tensor:
        try:
            return self.where[name].get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ModelLoadError(f"cannot read tensor {name}: {e} (is the file truncated?)") from None


def load_args(path: Path) -> ModelArgs:
    return ModelArgs.from_hf_config(read_config(path))


