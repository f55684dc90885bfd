"""Which compiled configurations are warm in the cache, so that the CPU default compiles only then.

On a 2-core CPU a compiled start of the default model reaches its first token in ~5 s with a warm
cache but ~20-35 s cold, against ~2 s eager, and then decodes ~1.5x faster (BENCHMARKS.md). So on
the CPU, with neither ``--compile`` nor ``--no-compile``, a long enough `generate` compiles only
when a compiled warm-up (``compile_cache.warm_up``) recorded the configuration it needs:
``<cache>/warm/<key>.json`` lists the sampler modes warmed and the AOT-saved files they loaded or
saved; the key is the model, the runtime options (but for where things live and how much may be
asked) and the KV-cache size. The check reads that record and looks for its files, without
importing the compiler. (A server's 8192-position compiled cache made it no faster than eager on
the CPU, so `serve` and `chat` do not ask.)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

log = logging.getLogger("blitzgen")


def _path(model_args, options, capacity: int) -> str:
    """compile_cache's key for this configuration at this KV-cache size; the compile flag and the
    limits on what may be asked (max_model_len, warm_cache_tokens) are not part of it."""
    from .aot_decode import source_digest
    from .compile_cache import key_for, key_hash
    from .runtime import WARM_CACHE_TOKENS, cache_root

    opts = dataclasses.replace(options, compile=True, max_model_len=None, warm_cache_tokens=WARM_CACHE_TOKENS)
    parts = key_for(model_args, opts, {"warm": int(capacity), "source": source_digest()})
    return os.path.join(options.cache_dir or cache_root(), "warm", key_hash(parts) + ".json")


def _mode(mode) -> str:
    return json.dumps(list(mode))


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    ok = isinstance(data, dict) and isinstance(data.get("modes"), list) and isinstance(data.get("files"), list)
    return data if ok else {}


def record(model_args, options, capacity: int, modes, files) -> None:
    """After a compiled warm-up: ``modes`` (sampler modes) are warm at this cache size, from ``files``."""
    from .compile_cache import locked, write_atomic

    path = _path(model_args, options, capacity)
    try:
        with locked(os.path.dirname(path)):
            old = _read(path)
            data = {"modes": sorted(set(old.get("modes", [])) | {_mode(m) for m in modes}),
                    "files": sorted(set(old.get("files", [])) | set(files))}
            write_atomic(path, json.dumps(data, indent=1).encode())
    except OSError as e:  # a read-only cache: the next start stays eager
        log.warning("blitzgen: could not record the warm compile-cache entry %s: %s", path, e)


def is_warm(model_args, options, capacity: int, modes) -> bool:
    """Whether a compiled start at this cache size, with these sampler modes, loads all it needs."""
    data = _read(_path(model_args, options, capacity))
    if not data or not data["files"]:
        return False
    if not {_mode(m) for m in modes} <= set(data["modes"]):
        return False
    return all(os.path.isfile(f) for f in data["files"])
