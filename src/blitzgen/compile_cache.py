"""Compiled artifacts kept across processes, with PyTorch's own caches.

``torch.compiler.save_cache_artifacts()`` bundles what this process compiled (Inductor's FX graph
cache entries with their Triton kernels, AOTAutograd cache entries, autotuning results, Dynamo's
profile-guided shapes); ``load_cache_artifacts()`` writes them back into the local caches, so the
next compile of the same graphs is a cache hit. Dynamo still traces the Python code on every start
(that part is not cached); Inductor codegen, Triton compiles and autotuning are skipped.

An entry is one directory under ``<cache root>/compile/<key>/``: ``artifacts.bin`` and a small
``manifest.json`` (the key's parts, size and sha256 of the blob) written last, so an entry without a
matching manifest is incomplete. A corrupt, truncated or mismatched entry is logged, removed and
rebuilt; loading never raises. Writers take an ``fcntl`` lock and replace files atomically, so
concurrent starts sharing the directory never see half a file.

    entry = CompileCache(key_for(model.args, options, extra)).open()   # before the first compile
    ...compile and warm up...
    entry.save()                                                         # after warm-up

or ``with cached(model.args, options, extra): ...warm up...``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Any, Iterator

log = logging.getLogger("blitzgen")

FORMAT = 1  # bump when the entry layout changes
MANIFEST = "manifest.json"
BLOB = "artifacts.bin"
LOCK = ".lock"


# ---- keys -----------------------------------------------------------------------------------------
def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def device_kind(device: str) -> dict:
    """What the compiled code depends on about the machine: the GPU model and compute capability,
    or the CPU model, its vector-ISA flags and ATen's CPU capability."""
    import torch

    if device.startswith("cuda"):
        idx = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(idx)
        return {"type": "cuda", "name": props.name, "capability": f"{props.major}.{props.minor}",
                "cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None)}
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name in ("", platform.machine(), platform.processor()):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    isa = None
    try:  # ATen's dispatch level (instant; Inductor's pick_vec_isa builds probe programs: ~1.8 s)
        isa = torch.backends.cpu.get_cpu_capability()
    except Exception:  # an old or odd torch: the flags below still separate machines
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16", "amx_tile",
              "amx_bf16", "amx_int8", "asimd", "sve")
    return {"type": "cpu", "name": name, "arch": platform.machine(), "isa": isa,
            "flags": sorted(f for f in wanted if f in flags)}


def key_for(model_args, options=None, extra: dict | None = None) -> dict:
    """The parts of a compile-cache key: everything that changes the compiled code.

    ``model_args``: the ModelArgs (hashed whole). ``options``: a resolved RuntimeOptions (device,
    dtype, quantization, kernels, cache sizes). ``extra``: anything else the caller compiles for,
    e.g. ``{"sampler_modes": [...], "prefill_buckets": [...], "cache_len": 8192}``.
    """
    import torch

    from . import __version__

    opts = dataclasses.asdict(options) if options is not None else {}
    opts.pop("cache_dir", None)  # where the cache lives does not change what is in it
    opts.pop("weight_cache", None)  # nor does how the weights were read
    opts.pop("staged_load", None)
    opts.pop("auto_quantize", None)  # what it decided is in quantize/group_size/quantize_head
    if opts.get("gemv_configs"):  # a file of launch configs: its contents count, not its name
        try:
            with open(opts["gemv_configs"], "rb") as f:
                opts["gemv_configs"] = hashlib.sha256(f.read()).hexdigest()
        except OSError:
            pass
    args = dataclasses.asdict(model_args) if dataclasses.is_dataclass(model_args) else dict(model_args)
    device = opts.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if options is not None:  # the layout traced, resolved for the device (None means a device's default)
        opts["compile_regions"] = options.regions_for(device)
    return {
        "format": FORMAT,
        "blitzgen": __version__,
        "torch": torch.__version__,
        "triton": _package_version("triton") or _package_version("pytorch-triton"),
        "python": "%d.%d" % sys.version_info[:2],
        "device": device_kind(device),
        "model": _digest(args),
        "quantize": {"scheme": opts.pop("quantize", None), "group_size": opts.pop("group_size", None)},
        "compile": opts,
        "extra": extra or {},
        # Dynamo's experimental cache (TORCH_CACHING_PRECOMPILE=1) changes what is saved
        "dynamo_precompile": _caching_precompile(),
    }


def _caching_precompile() -> bool:
    """Dynamo's setting when Dynamo is imported, else the variable it is read from (so a key can be
    computed without importing the compiler: warm_state)."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        return bool(getattr(dynamo.config, "caching_precompile", False))
    return os.environ.get("TORCH_CACHING_PRECOMPILE", "0") == "1"


def key_hash(parts: dict) -> str:
    return _digest(parts)[:24]


# ---- entries --------------------------------------------------------------------------------------
def compile_root(root: str | None = None) -> str:
    from .runtime import cache_root

    return os.path.join(root or cache_root(), "compile")


def weights_root(root: str | None = None) -> str:
    """Converted weights (a GGUF dequantized once, loading/converted.py): ``<root>/weights/<key>/``."""
    from .runtime import cache_root

    return os.path.join(root or cache_root(), "weights")


def aot_root(root: str | None = None) -> str:
    """Decode steps saved whole with torch's AOT precompile (aot_decode.py): ``<root>/aot/<key>.pt2``."""
    from .runtime import cache_root

    return os.path.join(root or cache_root(), "aot")


def use_inductor_dir(root: str | None = None) -> str:
    """Point Inductor's (and Triton's) local caches into blitzgen's cache root, unless the user set
    them; call before the first compile. Returns the Inductor directory."""
    from .runtime import cache_root

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    base = root or cache_root()
    inductor = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # importing torch._dynamo.config already sets it to torch's default (cache_dir_utils.cache_dir):
    # that value is torch's, not the user's
    if inductor is None or os.path.abspath(inductor) == os.path.abspath(default_cache_dir()):
        inductor = os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(base, "inductor")
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(inductor, "triton"))
    return inductor


@contextlib.contextmanager
def locked(directory: str, exclusive: bool = True) -> Iterator[None]:
    """An ``fcntl`` lock on an entry directory: exclusive for writers, shared for readers."""
    if exclusive:
        os.makedirs(directory, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: atomic replaces still keep readers safe
        fcntl = None
    if fcntl is None or not os.path.isdir(directory):  # a reader of a missing entry: nothing to lock
        yield
        return
    with open(os.path.join(directory, LOCK), "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def write_atomic(path: str, data: bytes) -> None:
    """Write ``path`` through a temporary file in the same directory, fsync, then rename."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class CompileCache:
    """One key's entry. ``open()`` loads it (when present and sound); ``save()`` writes it."""

    def __init__(self, key_parts: dict, root: str | None = None):
        self.parts = key_parts
        self.root = root
        self.key = key_hash(key_parts)
        self.dir = os.path.join(compile_root(root), self.key)
        self.status = "unopened"  # "hit" | "miss" | "rebuilt: <reason>" after open()
        self.load_seconds = 0.0
        self.loaded: dict[str, int] = {}  # artifacts loaded, by kind
        self._loaded_sha: str | None = None

    @property
    def hit(self) -> bool:
        return self.status == "hit"

    def open(self) -> "CompileCache":
        """Load the entry's artifacts into torch's caches (and keep Inductor's local cache, which on
        the CPU holds the compiled C++ kernels, under the same root). Never raises: a bad entry is
        logged and removed, and the caller compiles as if there was none."""
        t0 = time.perf_counter()
        use_inductor_dir(self.root)
        blob = None
        try:
            with locked(self.dir, exclusive=False):
                blob, manifest = self._read()
            if blob is None:
                self.status = "miss"
            else:
                self._load(blob, manifest)
        except Exception as e:  # noqa: BLE001 - a cache must never stop a start
            # an entry that failed its own checks may have been rewritten since: recheck before removing
            self._discard(f"{type(e).__name__}: {e}", recheck=blob is None)
        self.load_seconds = time.perf_counter() - t0
        return self

    def _read(self) -> tuple[bytes | None, dict | None]:
        mpath, bpath = os.path.join(self.dir, MANIFEST), os.path.join(self.dir, BLOB)
        if not os.path.exists(mpath):
            return None, None
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("key") != self.key or manifest.get("parts") != json.loads(json.dumps(self.parts, default=str)):
            raise ValueError("manifest does not match the key")
        with open(bpath, "rb") as f:
            blob = f.read()
        if len(blob) != manifest.get("size"):
            raise ValueError(f"truncated: {len(blob)} bytes, manifest says {manifest.get('size')}")
        if hashlib.sha256(blob).hexdigest() != manifest.get("sha256"):
            raise ValueError("checksum mismatch")
        return blob, manifest

    def _load(self, blob: bytes, manifest: dict) -> None:
        import torch

        info = torch.compiler.load_cache_artifacts(blob)
        if info is None:
            raise ValueError("torch could not read the artifacts")
        self.loaded = {kind: len(names) for kind, names in info.artifacts.items() if names}
        self._loaded_sha = manifest["sha256"]
        self.status = "hit"
        log.info("blitzgen: compile cache hit %s (%s)", self.key,
                 ", ".join(f"{n} {k}" for k, n in sorted(self.loaded.items())) or "empty")

    def _discard(self, reason: str, recheck: bool = False) -> None:
        log.warning("blitzgen: compile cache entry %s is unusable (%s); rebuilding it", self.key, reason)
        self.status = f"rebuilt: {reason}"
        try:
            with locked(self.dir):
                if recheck:
                    with contextlib.suppress(Exception):
                        if self._read()[0] is not None:
                            return  # a concurrent start has written a sound entry meanwhile
                for name in (MANIFEST, BLOB):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(self.dir, name))
        except OSError as e:
            log.warning("blitzgen: could not remove compile cache entry %s: %s", self.key, e)

    def save(self) -> bool:
        """Write what this process compiled (or loaded) as the entry; True when something was written.
        Never raises: a failed save is logged and the next start compiles again."""
        try:
            import torch

            result = torch.compiler.save_cache_artifacts()
            if result is None:
                return False
            blob, info = result
            sha = hashlib.sha256(blob).hexdigest()
            if sha == self._loaded_sha:
                return False
            manifest = {
                "key": self.key, "parts": self.parts, "size": len(blob), "sha256": sha,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "artifacts": {kind: len(names) for kind, names in info.artifacts.items() if names},
            }
            with locked(self.dir):
                write_atomic(os.path.join(self.dir, BLOB), blob)
                write_atomic(os.path.join(self.dir, MANIFEST),
                              json.dumps(manifest, indent=1, default=str).encode())
            self._loaded_sha = sha
            log.info("blitzgen: saved compile cache %s (%.1f MB)", self.key, len(blob) / 1e6)
            return True
        except Exception as e:  # noqa: BLE001
            log.warning("blitzgen: could not save the compile cache %s: %s", self.key, e)
            return False


@contextlib.contextmanager
def cached(model_args, options=None, extra: dict | None = None, *, enabled: bool = True,
           root: str | None = None) -> Iterator[CompileCache | None]:
    """Open the entry before the block (which compiles and warms up) and save it after; a block
    that raises saves nothing. ``enabled=False`` (eager) yields None and touches nothing.

        with compile_cache.cached(lm.args, options, {"warmup": modes}) as entry:
            gen.warmup(...)
    """
    if not enabled:
        yield None
        return
    entry = CompileCache(key_for(model_args, options, extra), root).open()
    yield entry
    entry.save()


# ---- listing (blitzgen cache ls|clear) ------------------------------------------------------------
@dataclasses.dataclass
class EntryInfo:
    key: str
    path: str
    size: int
    created: str
    ok: bool
    summary: str


def _dir_size(path: str) -> int:
    total = 0
    for base, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(base, name))
    return total


def list_entries(root: str | None = None) -> list[EntryInfo]:
    """Compile-cache entries, then converted-weights entries (summary starts with "weights")."""
    out = []
    croot = compile_root(root)
    for key in sorted(os.listdir(croot)) if os.path.isdir(croot) else ():
        path = os.path.join(croot, key)
        if not os.path.isdir(path) or not ({MANIFEST, BLOB} & set(os.listdir(path))):
            continue  # not an entry, or one removed (its lock file stays)
        try:
            with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
                m = json.load(f)
            p = m.get("parts", {})
            dev = p.get("device", {})
            q = p.get("quantize", {}) or {}
            summary = (f"torch {p.get('torch')} {dev.get('type')} {dev.get('name')} "
                       f"{p.get('compile', {}).get('dtype')} {q.get('scheme') or 'float'} "
                       f"model {str(p.get('model'))[:8]}")
            ok = os.path.getsize(os.path.join(path, BLOB)) == m.get("size")
            out.append(EntryInfo(key, path, _dir_size(path), m.get("created", "?"), ok, summary))
        except (OSError, ValueError):
            out.append(EntryInfo(key, path, _dir_size(path), "?", False, "incomplete or corrupt"))
    wroot = weights_root(root)
    for key in sorted(os.listdir(wroot)) if os.path.isdir(wroot) else ():
        path = os.path.join(wroot, key)
        if not os.path.isdir(path) or set(os.listdir(path)) <= {LOCK}:
            continue
        try:
            with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
                m = json.load(f)
            src = m["parts"]["source"]
            ok = all(os.path.getsize(os.path.join(path, n)) == size for n, (size, _) in m["files"].items())
            q = m["parts"].get("quant")
            qdesc = (f" {q['scheme']}" + (f" g{q['group_size']}" if q.get("group_size") else "")
                     + (" (head float)" if q.get("head") is False else "")
                     + (" (head int8)" if q.get("head") == "int8" else "")) if q else ""
            summary = f"weights {m['parts']['dtype']}{qdesc} of {os.path.basename(src['path'])}"
            out.append(EntryInfo(key, path, _dir_size(path), m.get("created", "?"), ok, summary))
        except (OSError, ValueError, KeyError, TypeError):
            out.append(EntryInfo(key, path, _dir_size(path), "?", False, "weights: incomplete or corrupt"))
    aroot = aot_root(root)
    for name in sorted(os.listdir(aroot)) if os.path.isdir(aroot) else ():
        path = os.path.join(aroot, name)
        if name.endswith(".pt2") and os.path.isfile(path):
            size = os.path.getsize(path)
            created = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(os.path.getmtime(path)))
            out.append(EntryInfo(name[:-4], path, size, created, size > 0, "aot decode step"))
    return out


def clear(root: str | None = None, *, inductor: bool = True, weights: bool = True) -> int:
    """Remove every compile-cache entry, the AOT-saved decode steps and their warm records (warm_state),
    Inductor's local cache under the same root and the converted weights (unless told to keep them);
    returns the bytes freed."""
    from .runtime import cache_root

    base = root or cache_root()
    freed = 0
    for path in (compile_root(base), os.path.join(base, "inductor") if inductor else None,
                 weights_root(base) if weights else None, aot_root(base), os.path.join(base, "warm")):
        if path and os.path.isdir(path):
            freed += _dir_size(path)
            shutil.rmtree(path, ignore_errors=True)
    isa = os.path.join(base, "cpu_isa.json")  # isa_probe's answers go with Inductor's cache
    if inductor and os.path.isfile(isa):
        freed += os.path.getsize(isa)
        os.unlink(isa)
    return freed


def warm_up(lm, gen, sampling_modes=None, prompt_len: int | None = None) -> float:
    """Warm a compiled Generator up inside its compile-cache entry (loaded before, saved after),
    marking the start-up report's "cache load" and "compile + warm-up"; eager: a no-op (0.0).
    Without arguments, the full warm-up (every sampler mode, every compiled prefill bucket)."""
    if not gen.compiled:
        return 0.0
    from .startup import REPORT

    extra = gen.warmup_plan()
    if sampling_modes is not None:
        extra = {**extra, "warmup": sorted({tuple(sp.mode) for sp in sampling_modes}), "prompt_len": prompt_len,
                 "cache_len": gen.cache_len}
    entry = CompileCache(key_for(lm.args, gen.options, extra), gen.options.cache_dir)
    aot = _aot_functions(gen)
    if aot:  # everything compiled is AOT-saved: torch's artifacts are loaded only if one must compile
        use_inductor_dir(entry.root)

        def open_once():
            if entry.status == "unopened":
                entry.open()

        for fn in aot:
            fn.before_compile = open_once
    else:
        entry.open()
    REPORT.mark("cache load")
    secs = gen.warmup(sampling_modes, prompt_len=prompt_len)
    REPORT.mark("compile + warm-up")
    for what, fn in (("decode step", gen._step), ("sampler", gen._sample)):  # BLITZGEN_AOT_DECODE
        status = getattr(fn, "status", None)  # loaded, compiled or a fallback
        if status:
            print(f"blitzgen: AOT {what} {status}", file=sys.stderr, flush=True)
    REPORT.add_compile_breakdown()
    if entry.status != "unopened":  # (a lazy entry nothing compiled into: nothing new to save)
        entry.save()
    if aot and gen.device.type == "cpu" and all(fn.status in ("loaded", "compiled") for fn in aot):
        from . import warm_state  # the CPU default compiles when this configuration is warm
        from .sampling import sampler_modes

        modes = [sp.mode for sp in (sampling_modes if sampling_modes is not None else sampler_modes())]
        warm_state.record(lm.args, gen.options, gen.cache_len, modes, set().union(*(fn.files for fn in aot)))
    return secs


def _aot_functions(gen) -> list:
    """The Generator's AOT-saved step and sampler (BLITZGEN_AOT_DECODE) when they are all it
    compiles (no compiled prefill), else []. Their files hold the compiled code whole, so a warm
    start needs torch's cache artifacts (~1-2 s to load) only when one of them must compile."""
    if not getattr(gen.options, "aot_decode", False) or gen.prefill_compiled:
        return []
    from .aot_decode import AOTFunction

    fns = [gen._step, gen._sample]
    return fns if all(isinstance(f, AOTFunction) for f in fns) else []
