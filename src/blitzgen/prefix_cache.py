"""Prompt caching: which token ids the live KV cache holds, and a few saved copies of earlier prefixes.

One owner (``PrefixStore``, kept by the Generator) for two kinds of state:

- the *live claim*: the token ids whose KV the model's cache holds at positions 0.. (a request that
  extends them prefills only the rest);
- *saved entries*: copies (on the cache's device) of the KV of earlier prefixes, keyed by their
  token ids, so that a conversation A, then B, then A again finds A's prefix although B overwrote
  the live cache.

A request resumes from the longest prefix that the live claim or an entry shares with its prompt.
An entry is restored by copying its positions into the live cache tensors in place (never rebinding
them: CUDA graphs keep their addresses), and only when it beats the live match by ``MIN_GAIN``
tokens. The live content is saved just before it would be lost (a request that diverges from it by
at least ``MIN_GAIN`` tokens, a restore over it, cache growth, another decoder taking the cache),
so a chat that simply continues never pays a copy.

Bounds: at most ``max_entries`` entries and ``max_bytes`` bytes of saved KV (0 disables saving);
eviction is least recently used (saving or restoring an entry makes it the most recent). An entry
that another one extends is dropped (the longer one covers it); a prefix is not saved unless
MIN_GAIN of its tokens are beyond what an entry already holds. Every change keeps the invariant: the live claim and every entry describe
exactly what their tensors hold (the claim is dropped before the cache is written and set after).
"""

from __future__ import annotations

import itertools
import re
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

log = logging.getLogger("blitzgen")

DEFAULT_ENTRIES = 8
DEFAULT_BYTES = 1 << 30  # 1 GiB of saved KV (Llama-3-8B bf16: 8K tokens; SmolLM2-135M: 46K tokens)
MIN_GAIN = 16  # tokens: what restoring or saving a prefix must win (one prefill bucket)


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int | None = None) -> int:
    """Length of the longest common prefix of a and b (at most limit), by slice comparisons."""
    n = min(len(a), len(b)) if limit is None else min(len(a), len(b), limit)
    if list(a[:n]) == list(b[:n]):
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if list(a[lo:mid]) == list(b[lo:mid]):
            lo = mid
        else:
            hi = mid
    return lo


_SIZE = re.compile(r"(\d+(?:\.\d*)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """'0', '1048576', '512MiB', '512M', '2GB' -> bytes (K, M, G, T are powers of 1024)."""
    m = _SIZE.fullmatch(str(text).strip())
    if m is None:
        raise ValueError(f"not a size: {text!r} (e.g. 0, 512MiB, 2GiB)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " "))


@dataclass(eq=False)
class Entry:
    ids: list[int]
    kv: list[tuple[Tensor, Tensor]]  # per layer: k, v copies [B, n_kv, len(ids), D]
    nbytes: int


def kv_caches(model) -> list:
    """The model's KVCache modules, one per layer (what the store copies from and into)."""
    return [layer.attention.kv_cache for layer in model.layers]


class PrefixStore:
    """The live claim plus LRU-bounded saved prefixes (see the module docstring)."""

    def __init__(self, max_entries: int = DEFAULT_ENTRIES, max_bytes: int = DEFAULT_BYTES):
        self.live: list[int] = []  # token ids whose KV the live cache holds at positions 0..
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # least recently used first
        self._ids = itertools.count()
        self.max_entries = self.max_bytes = 0
        self.saves = self.restores = self.evictions = 0  # counters over the store's life
        self.configure(max_entries, max_bytes)

    # ---- configuration and facts -----------------------------------------------------------------
    def configure(self, max_entries: int, max_bytes: int) -> None:
        """Set the bounds (0 for either disables saving); entries over them are evicted now."""
        if max_entries < 0 or max_bytes < 0:
            raise ValueError(f"prompt cache bounds must be >= 0, got {max_entries} entries, {max_bytes} bytes")
        self.max_entries, self.max_bytes = int(max_entries), int(max_bytes)
        self._evict(0)

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def snapshot(self) -> dict:
        return {"entries": len(self.entries), "bytes": self.nbytes, "saves": self.saves,
                "restores": self.restores, "evictions": self.evictions}

    def clear(self) -> None:
        """Drop the live claim and every entry."""
        self.live = []
        self.entries.clear()

    # ---- lookups ----------------------------------------------------------------------------------
    def live_match(self, ids: Sequence[int], limit: int) -> int:
        return common_prefix(self.live, ids, limit)

    def best_entry(self, ids: Sequence[int], limit: int) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with ids (capped at limit; ties: the most recent)."""
        best, best_n = None, 0
        for e in reversed(self.entries.values()):
            n = common_prefix(e.ids, ids, limit)
            if n > best_n:
                best, best_n = e, n
        return best, best_n

    # ---- changes (each keeps claims equal to contents) --------------------------------------------
    def drop_live(self) -> None:
        """Say the live cache holds nothing reusable (before writing it, or after an unknown write)."""
        self.live = []

    def claim(self, ids: Sequence[int]) -> None:
        """Say the live cache holds ids at positions 0.. (after writing them)."""
        self.live = list(ids)

    def extend(self, token: int) -> None:
        """Say the live cache holds token at position len(live) too (after its step wrote it)."""
        self.live.append(int(token))

    def save_live(self, caches: list) -> Entry | None:
        """Copy the live prefix's KV into a new entry, unless saving is off, fewer than MIN_GAIN of
        its tokens are beyond what an entry holds, or it alone exceeds the byte budget. Entries it
        extends are dropped; the least recently used ones are evicted to make room."""
        ids = list(self.live)
        n = len(ids)
        if not self.enabled or n < MIN_GAIN:
            return None
        entry, held = self.best_entry(ids, n)
        if n - held < MIN_GAIN:  # (nearly) all of it is in an entry already: that one was just used
            self.touch(entry)
            return None
        per_token = sum(2 * c.k_cache[:, :, :1].numel() * c.k_cache.element_size() for c in caches)
        nbytes = per_token * n
        if nbytes > self.max_bytes:
            return None
        for key in [k for k, e in self.entries.items() if common_prefix(e.ids, ids) == len(e.ids)]:
            del self.entries[key]  # superseded: this prefix extends it
        self._evict(nbytes)
        try:
            kv = [(c.k_cache[:, :, :n].clone(), c.v_cache[:, :, :n].clone()) for c in caches]
        except torch.OutOfMemoryError:
            log.warning("prompt cache: out of memory saving a %d-token prefix; not saved", n)
            return None
        entry = self.entries[next(self._ids)] = Entry(ids, kv, nbytes)
        self.saves += 1
        return entry

    def restore(self, entry: Entry, n: int, caches: list, start: int = 0) -> None:
        """Make the live cache hold entry.ids[:n]: copy positions start..n-1 in place (positions
        before start must already hold the same ids, e.g. the live match)."""
        self.live = []  # until the copy is done: a failure leaves no claim
        for c, (k, v) in zip(caches, entry.kv, strict=True):
            c.k_cache[:, :, start:n].copy_(k[:, :, start:n])
            c.v_cache[:, :, start:n].copy_(v[:, :, start:n])
        self.live = entry.ids[:n]
        self.touch(entry)
        self.restores += 1

    def touch(self, entry: Entry) -> None:
        """Mark entry as the most recently used (when it is still stored)."""
        for key, e in self.entries.items():
            if e is entry:
                self.entries.move_to_end(key)
                return

    def _evict(self, room: int) -> None:
        """Evict least recently used entries until one more entry of `room` bytes fits."""
        need_slot = 1 if room else 0
        while self.entries and (len(self.entries) + need_slot > self.max_entries
                                or self.nbytes + room > self.max_bytes):
            self.entries.popitem(last=False)
            self.evictions += 1
