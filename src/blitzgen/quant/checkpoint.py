"""Self-describing quantized checkpoints (placeholder: detection only until the quant work lands)."""

from __future__ import annotations

from pathlib import Path

METADATA_KEY = "blitzgen.quant"


def is_quantized_checkpoint(path: Path) -> bool:
    return (path / "blitzgen.json").is_file()


def load_quantized(path, device, dtype, progress=True):
    raise NotImplementedError("quantized checkpoints are not supported yet")
