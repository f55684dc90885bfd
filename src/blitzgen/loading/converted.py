"""Converted weights kept across processes: a GGUF is dequantized once, then mmapped.

The first load of a GGUF dequantizes every tensor (seconds even for a 135M model on 2 cores, and
the GGUF reader's metadata parse alone takes seconds). While it does, assemble hands each tensor
the model gets (our names, fused q/k/v and gate/up, q/k unpermuted, cast to the run's dtype) to a
``Recorder``, which streams it into a safetensors file; the config and the tokenizer are saved
beside it. A later load of the same file in the same dtype opens that safetensors file with mmap:
no GGUF parse, no dequantization, no copy (CPU tensors are views of the page cache).

The entry is ``<cache root>/weights/<key>/`` (layout owned by compile_cache.py): ``model.safetensors``,
``args.json``, the tokenizer files, and ``manifest.json`` written last with each file's size and
CRC-32. The key is the GGUF's identity (resolved path, size, mtime in ns, and a SHA-256 of its
first and last MiB), the dtype, the ``gguf`` package's and blitzgen's versions and ``FORMAT``; a
quantized load's entry adds the quantization (scheme, group size, head) and holds the quantized
buffers, which ``assemble(prequantized=...)`` reads back without re-quantizing.
Stat data rather than a hash of the whole file: a full hash reads the whole GGUF on every start
(0.1 s for the default model, seconds for a 7B one); the two sampled MiB (the header, with the
metadata and tensor table, and the end of the data) catch a different file copied in with the same
size and mtime (``cp -p``, ``rsync -t``). A changed file gets a new key; the old entry stays until
``blitzgen cache clear``.

Reading checks the manifest and every file's size and CRC-32 (~0.1 s for 270 MB); a missing,
truncated, corrupt or mismatched entry is logged, removed and rebuilt, and never fails a load.
Writers stream into temporary files and publish under an exclusive ``fcntl`` lock with atomic
renames, manifest last; readers hold the shared lock while they check and open, so concurrent
starts never see half an entry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
import time
import zlib
from pathlib import Path

import torch

from .. import compile_cache as layout
from .hf import SafetensorsSource

log = logging.getLogger("blitzgen")

FORMAT = 1  # bump when the conversion (names, unpermute, casts) or the entry layout changes
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
ARGS = "args.json"
SAMPLE = 1 << 20  # bytes hashed at each end of the source file
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
              torch.uint8: "U8", torch.bool: "BOOL"}


# ---- keys -----------------------------------------------------------------------------------------
def source_identity(path: Path) -> dict:
    """What identifies a source file without reading it whole: resolved path, size, mtime (ns),
    and the SHA-256 of its first and last ``SAMPLE`` bytes."""
    path = Path(path).resolve()
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(SAMPLE))
        if st.st_size > SAMPLE:
            f.seek(max(SAMPLE, st.st_size - SAMPLE))
            h.update(f.read(SAMPLE))
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sample": h.hexdigest()}


def key_for(path: Path, dtype: torch.dtype, quant: dict | None = None) -> dict:
    from .. import __version__
    from ..compile_cache import _package_version

    parts = {"format": FORMAT, "blitzgen": __version__, "gguf": _package_version("gguf"),
             "source": source_identity(path), "dtype": str(dtype).replace("torch.", "")}
    if quant is not None:  # an entry of quantized weights (their config, scales' dtype, and code)
        parts["quant"] = {**quant, "code": _quant_code_digest()}
    return parts


def _quant_code_digest() -> str:
    """sha256 of the quant package's sources: the buffers a quantized entry holds are what that
    code made, in its layout."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1] / "quant"
    for path in sorted(root.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _crc_file(path: str) -> tuple[int, int]:
    """(size, CRC-32) of a file, read through mmap (zlib releases the GIL on large buffers)."""
    import mmap

    size = os.path.getsize(path)
    if size == 0:
        return 0, 0
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return size, zlib.crc32(m)


# ---- streaming safetensors writer -----------------------------------------------------------------
ALIGN = 64  # byte alignment of every tensor in the file (and so in the mmap): what SIMD kernels want
PAD = "__pad__."  # padding tensors' names (uint8 zeros), never shown to the model


class Recorder:
    """Streams the tensors assemble hands over into a safetensors file, in order, never holding
    more than one: ``begin(specs)`` writes the header from the names, shapes and dtypes the model
    expects; ``add(name, tensor)`` writes one tensor's bytes. Every tensor starts at a multiple of
    ``ALIGN`` bytes from the file's start (safetensors allows no gaps, so padding tensors fill
    them). Used by assemble(record=...)."""

    def __init__(self, path: str):
        self.path = path
        self.file = None
        self.specs: list[tuple[str, tuple, torch.dtype]] = []
        self.pads: dict[str, int] = {}  # name of the tensor a padding precedes -> its bytes
        self.done = 0
        self.crc = 0

    def begin(self, specs) -> None:
        self.specs = [(n, tuple(int(d) for d in s), dt) for n, s, dt in specs]
        sizes = []
        for name, shape, dtype in self.specs:
            n = dtype.itemsize
            for d in shape:
                n *= d
            sizes.append(n)
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for (name, shape, dtype), n in zip(self.specs, sizes):
            pad = -offset % ALIGN
            if pad:
                header[f"{PAD}{len(self.pads)}"] = {"dtype": "U8", "shape": [pad], "data_offsets": [offset, offset + pad]}
                self.pads[name] = pad
                offset += pad
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % ALIGN)  # the data starts aligned too
        self.file = open(self.path, "wb")
        self._write(struct.pack("<Q", len(raw)) + raw)

    def _write(self, data) -> None:
        self.file.write(data)
        self.crc = zlib.crc32(data, self.crc)

    def add(self, name: str, t: torch.Tensor) -> None:
        want, shape, dtype = self.specs[self.done]
        if name != want or tuple(t.shape) != shape or t.dtype != dtype:  # a bug in the caller, not the user's
            raise RuntimeError(f"recorder expected {want} {shape} {dtype}, got {name} {tuple(t.shape)} {t.dtype}")
        data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        if name in self.pads:
            self._write(bytes(self.pads[name]))
        self._write(memoryview(data))
        self.done += 1

    def close(self) -> bool:
        """Flush and fsync; True when every tensor was written."""
        if self.file is None:
            return False
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.file = None
        return self.done == len(self.specs)

    def discard(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        with contextlib.suppress(OSError):
            os.unlink(self.path)


class Unpadded(SafetensorsSource):
    """The cached file, our names, without its padding tensors."""

    def names(self) -> list[str]:
        return [n for n in self.where if not n.startswith(PAD)]


# ---- entries --------------------------------------------------------------------------------------
def _sweep(directory: str, age: float = 3600.0) -> None:
    """Remove temporary files that writers killed mid-write left behind (older than ``age`` s)."""
    now = time.time()
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        with contextlib.suppress(OSError):
            if name.startswith(".tmp-") and now - os.path.getmtime(path) > age:
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.unlink(path)


@dataclasses.dataclass
class Hit:
    args: object  # ModelArgs
    tokenizer: object  # Tokenizer
    source: object  # hf.SafetensorsSource over the cached file, our names


class WeightCache:
    """One GGUF + dtype's entry (+ quantization: ``quant`` = the config's metadata and the scales'
    dtype; such an entry holds the quantized buffers, read back without re-quantizing). ``open()`` -> Hit or None; on a miss, ``recorder()`` goes to
    assemble and ``save(recorder, args, tokenizer)`` publishes the entry. Never raises."""

    def __init__(self, path: Path, dtype: torch.dtype, root: str | None = None, quant: dict | None = None):
        self.status = "unopened"  # "hit" | "miss" | "saved" | "rebuilt: <reason>" | "off: <reason>"
        self.seconds = 0.0
        try:
            self.parts = key_for(path, dtype, quant)
        except OSError as e:
            self.parts, self.key, self.dir = None, None, None
            self.status = f"off: {e}"
            return
        self.key = layout.key_hash(self.parts)
        self.dir = os.path.join(layout.weights_root(root), self.key)

    def open(self, device: str = "cpu", staged: bool = True) -> Hit | None:
        if self.dir is None:
            return None
        t0 = time.perf_counter()
        try:
            with layout.locked(self.dir, exclusive=False):
                hit = self._read(device, staged)
            self.status = "hit" if hit is not None else "miss"
        except Exception as e:  # noqa: BLE001 - a cache must never stop a load
            hit = None
            self._discard(f"{type(e).__name__}: {e}")
        self.seconds = time.perf_counter() - t0
        if hit is not None:
            log.info("blitzgen: converted weights from the cache %s (%.2f s)", self.key, self.seconds)
        return hit

    def _read(self, device: str, staged: bool = True) -> Hit | None:
        from ..config import ModelArgs
        from ..tokenizer import Tokenizer

        mpath = os.path.join(self.dir, MANIFEST)
        if not os.path.exists(mpath):
            return None
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("key") != self.key or manifest.get("parts") != json.loads(json.dumps(self.parts)):
            raise ValueError("manifest does not match the key")
        for name, (size, crc) in manifest["files"].items():
            got = _crc_file(os.path.join(self.dir, name))
            if got[0] != size:
                raise ValueError(f"{name} is truncated: {got[0]} bytes, manifest says {size}")
            if got[1] != crc:
                raise ValueError(f"{name} fails its checksum")
        with open(os.path.join(self.dir, ARGS), encoding="utf-8") as f:
            args = ModelArgs(**json.load(f))
        tokenizer = Tokenizer.from_hf_dir(self.dir)
        source = Unpadded([Path(self.dir, WEIGHTS)], column="ours", device=device, staged=staged)
        return Hit(args, tokenizer, source)

    def discard(self, reason: str) -> None:
        """Remove an entry that opened soundly but could not be used (logged; the next save rebuilds it)."""
        self._discard(reason, recheck=False)

    def _discard(self, reason: str, recheck: bool = True) -> None:
        log.warning("blitzgen: converted-weights cache entry %s is unusable (%s); rebuilding it", self.key, reason)
        self.status = f"rebuilt: {reason}"
        try:
            with layout.locked(self.dir):
                with contextlib.suppress(Exception):  # a concurrent start may have rewritten it meanwhile
                    if recheck and self._read("cpu") is not None:
                        return
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.dir, MANIFEST))
        except OSError as e:
            log.warning("blitzgen: could not remove converted-weights cache entry %s: %s", self.key, e)

    def recorder(self) -> Recorder | None:
        if self.dir is None:
            return None
        try:
            os.makedirs(self.dir, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-weights-")
            os.close(fd)
            return Recorder(tmp)
        except OSError as e:
            log.warning("blitzgen: cannot write the converted-weights cache (%s)", e)
            return None

    def save(self, rec: Recorder | None, args, tokenizer) -> bool:
        """Publish the entry from a finished recorder; True when written. Never raises."""
        if rec is None:
            return False
        tmpdir = None
        try:
            if not rec.close():
                raise RuntimeError(f"only {rec.done} of {len(rec.specs)} tensors were recorded")
            tmpdir = tempfile.mkdtemp(dir=self.dir, prefix=".tmp-tok-")
            tokenizer.save_pretrained(tmpdir)
            Path(tmpdir, ARGS).write_text(json.dumps(dataclasses.asdict(args)))
            files = {WEIGHTS: [os.path.getsize(rec.path), rec.crc]}
            for name in sorted(os.listdir(tmpdir)):
                files[name] = list(_crc_file(os.path.join(tmpdir, name)))
            manifest = {"key": self.key, "parts": self.parts, "files": files,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            with layout.locked(self.dir):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.dir, MANIFEST))  # readers see no entry until it is whole
                for name in os.listdir(tmpdir):
                    os.replace(os.path.join(tmpdir, name), os.path.join(self.dir, name))
                os.replace(rec.path, os.path.join(self.dir, WEIGHTS))
                layout.write_atomic(os.path.join(self.dir, MANIFEST), json.dumps(manifest, indent=1).encode())
            self.status = "saved"
            _sweep(self.dir)
            log.info("blitzgen: saved converted weights %s (%.1f MB)", self.key, files[WEIGHTS][0] / 1e6)
            return True
        except Exception as e:  # noqa: BLE001
            log.warning("blitzgen: could not save the converted-weights cache %s: %s", self.key, e)
            rec.discard()
            return False
        finally:
            if tmpdir is not None:
                shutil.rmtree(tmpdir, ignore_errors=True)
