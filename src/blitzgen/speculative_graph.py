"""A host draft's verify round (n-gram) as one CUDA graph: the compiled target forward of K+1
tokens and the compiled acceptance, captured together per sampler mode and replayed after one
pinned-memory copy of the round's inputs (tokens, positions, draft length).

Why: on a launch-bound model a round cannot be pipelined (the draft needs the last token on the
host), so everything the host does between the read back and the verify's first kernel is idle
GPU time. Through torch.compile's CUDA-graph wrapper a round paid Dynamo's and the wrapper's
prologue, six kernels of acceptance launched one by one, two synchronous copies from pageable
memory and a position kernel: an H200 ran SmolLM2-135M's round in 1.92 ms for 1.13 ms of GPU work
(1.70 plain tokens; BENCHMARKS.md). Here the round is one ``graph.replay()``.

The graph reads the model's KV cache where it was when captured: a grown cache (a new tensor) or a
new cache length drops every graph, and the next round captures again. Its first round in a mode
runs the compiled functions once for real (compiling them if needed, writing the round's KV) and
then captures; capturing only records, so that round's result stands. Not used under tensor
parallelism (each rank's all-reduce would be captured in its own graph: untested) nor for model
drafts, whose tokens and distributions come from their own steps on the device.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import Tensor

from .sampling import SamplingParams

log = logging.getLogger("blitzgen")


def cache_key(model) -> tuple:
    """What a captured round depends on beyond its inputs: the KV cache's storage and length."""
    kv = model.layers[0].attention.kv_cache
    return model.max_seq_len, kv.k_cache.data_ptr(), kv.v_cache.data_ptr()


def usable(model) -> bool:
    """CUDA and no tensor parallelism (a RowParallel wo carries its all-reduce)."""
    return model.device.type == "cuda" and not hasattr(model.layers[0].attention.wo, "all_reduce")


class HostVerifyGraph:
    """``round(last, drafts, P, mode, samp, u, noise) -> [n accepted, next token]`` for a host
    draft (q one-hot at the drafted tokens). ``verify``: the compiled ``_verify_logits`` without
    CUDA graphs of its own; ``accept``: the compiled ``_accept_host``."""

    def __init__(self, model, k_max: int, vocab: int, verify: Callable, accept: Callable):
        dev = model.device
        self.model, self.K, self.verify, self.accept = model, k_max, verify, accept
        n = 2 * (k_max + 1) + 1
        self.host = torch.zeros(n, dtype=torch.int64, pin_memory=True)
        self.view = self.host.numpy()
        self.inp = torch.zeros(n, dtype=torch.int64, device=dev)  # [tokens K+1 | positions K+1 | k]
        self.u = torch.zeros(k_max, device=dev)
        self.noise = torch.ones(vocab, device=dev)
        self.samp = SamplingParams(temperature=1.0).tensors(dev)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.key: tuple | None = None
        self.captures = 0  # for tests and benchmarks
        self.failed = ""  # why a round failed here: the decoder then stops using this
        self._sampled = False  # u / noise / samp hold a sampled round's values

    def _run(self, mode: tuple) -> Tensor:
        K, inp = self.K, self.inp
        idx = inp[:K + 1].view(1, K + 1)
        logits = self.verify(self.model, idx, inp[K + 1:2 * K + 2])
        return self.accept(logits, idx[0, 1:], inp[2 * K + 2], self.u, self.noise, self.samp, mode)

    def __call__(self, last: int, drafts: list[int], P: int, mode: tuple, samp: dict[str, Tensor],
                 u: Tensor, noise: Tensor) -> list[int] | None:
        """[n accepted, next token], or None when this round failed here (``failed`` says why; the
        caller runs the round its own way: rewriting the same KV positions is harmless)."""
        if len(drafts) > self.K:
            raise ValueError(f"{len(drafts)} drafts for a verify of {self.K}")
        with torch.cuda.device(self.model.device):  # capture and replay on the model's GPU
            try:
                return self._round(last, drafts, P, mode, samp, u, noise)
            except Exception as e:  # noqa: BLE001 - a compile or replay failure: never end a request here
                self._fail(e)
                return None

    def _fail(self, e: Exception) -> None:
        self.failed = f"{type(e).__name__}: {e}"
        log.warning("blitzgen: the verify round as a CUDA graph failed (%s); running rounds through "
                    "torch.compile", self.failed)

    def _round(self, last, drafts, P, mode, samp, u, noise) -> list[int] | None:
        K, k, v = self.K, len(drafts), self.view
        v[0] = last
        v[1:k + 1] = drafts
        v[k + 1:K + 1] = 0
        v[K + 1:2 * K + 2] = range(P, P + K + 1)
        v[2 * K + 2] = k
        self.inp.copy_(self.host, non_blocking=True)
        if not mode[0] or self._sampled:  # this round's draws and parameters (greedy: u = 0, noise = 1)
            self.u.copy_(u, non_blocking=True)
            self.noise.copy_(noise, non_blocking=True)
            for name, t in samp.items():
                self.samp[name].copy_(t, non_blocking=True)
            self._sampled = not mode[0]
        key = cache_key(self.model)
        if key != self.key:
            if self.graphs:  # a pool whose graphs are all gone is released: later captures need a new
                self.graphs.clear()  # one (capturing into the old handle failed an allocator assert)
                self.pool = torch.cuda.graph_pool_handle()
            self.key = key
        entry = self.graphs.get(mode)
        if entry is not None:
            entry[0].replay()
            return entry[1].tolist()
        out = self._run(mode).tolist()  # the round itself (compiles on a first call)
        torch.cuda.synchronize()
        stream = torch.cuda.current_stream()
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):  # a server's
                # other threads may use CUDA meanwhile
                static_out = self._run(mode)
        except Exception as e:  # noqa: BLE001 - the round is done; later ones go uncaptured
            torch.cuda.set_stream(stream)  # a failed capture_end leaves the capture stream current
            torch.cuda.synchronize()
            self._fail(e)
            return out
        self.graphs[mode] = (graph, static_out)
        self.captures += 1
        return out
