"""The all-reduce after each row-parallel layer: one pluggable choice per run.

- ``functional`` (default): ``torch.distributed._functional_collectives.all_reduce`` on the TP
  group: NCCL on CUDA, gloo on CPU. torch.compile traces it into the graph and CUDA graphs
  capture it.
- ``symm-one-shot`` / ``symm-two-shot``: symmetric-memory all-reduces
  (``torch.ops.symm_mem.one_shot_all_reduce`` / ``two_shot_all_reduce_``; CUDA, NVLink). Eager: the
  input is copied into a buffer rendezvoused once per group, then the op runs on it. Compiled:
  the functional all-reduce, which Inductor lowers to the one-shot op for messages up to its
  ``_collective.one_shot_all_reduce_threshold_bytes`` once symmetric memory is enabled for the
  group (``enable_symm_mem_for_group``). No multimem operations (NVLink multicast stays off).

At batch 1 each message is one hidden state (dim * 2 bytes: 8 KB for a 4096-wide bf16 model), so
the latency of one call decides the scaling, not bandwidth.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import BlitzgenError

ALL_REDUCE = ("functional", "symm-one-shot", "symm-two-shot")
SYMM_BUFFER_BYTES = 1 << 20  # larger eager messages (long prefills) take the functional path


class AllReduce:
    """Callable x -> sum of x over the group; the identity on a group of one."""

    def __init__(self, group, kind: str = "functional", world: int = 1):
        if kind not in ALL_REDUCE:
            raise BlitzgenError(f"unknown all-reduce {kind!r} (one of {', '.join(ALL_REDUCE)})")
        self.group, self.kind, self.world = group, kind, world
        self._buf: Tensor | None = None
        self.group_name = None if group is None else group.group_name

    def __repr__(self) -> str:
        return f"AllReduce({self.kind!r}, world={self.world})"

    def setup(self, device: torch.device) -> None:
        """Enable symmetric memory for the group (symm kinds; CUDA only), else a clear error."""
        if self.kind == "functional" or self.world == 1:
            return
        if device.type != "cuda":
            raise BlitzgenError(f"--all-reduce {self.kind} needs CUDA GPUs (symmetric memory); use functional")
        import torch.distributed._symmetric_memory as symm_mem

        symm_mem.enable_symm_mem_for_group(self.group_name)
        self._buf = symm_mem.empty(SYMM_BUFFER_BYTES // 4, dtype=torch.float32, device=device)
        symm_mem.rendezvous(self._buf, self.group_name)

    def __call__(self, x: Tensor) -> Tensor:
        if self.world == 1:
            return x
        big = x.numel() * x.element_size() > SYMM_BUFFER_BYTES  # prefill: NCCL's bandwidth path
        if self.kind == "functional" or big or torch.compiler.is_compiling():
            from torch.distributed._functional_collectives import all_reduce, wait_tensor

            return wait_tensor(all_reduce(x, "sum", self.group))
        return self._symm_eager(x)

    def _symm_eager(self, x: Tensor) -> Tensor:
        n = x.numel() * x.element_size()
        if self._buf is None:
            raise RuntimeError("symmetric-memory all-reduce: call setup(device) first")
        buf = self._buf.view(torch.uint8)[:n].view(x.dtype).view(x.shape)
        buf.copy_(x)
        if self.kind == "symm-one-shot":
            return torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", self.group_name)
        torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", self.group_name)
        return buf.clone()


def time_all_reduce(group, kind: str, nbytes: int, dtype: str = "bfloat16", iters: int = 200) -> float:
    """Seconds per call of ``kind`` on a message of nbytes, every rank of ``group`` (a TPGroup)
    calling it; CUDA: timed over a CUDA graph of ``iters`` calls (what decode replays), else eager."""
    dt = getattr(torch, dtype)
    x = torch.ones(max(1, nbytes // dt.itemsize), dtype=dt, device=group.device)
    ar = group.all_reduce(kind)
    for _ in range(5):
        x = ar(x) * (1.0 / group.world)
    if group.device.type == "cuda":
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream), torch.cuda.graph(graph):
            y = x
            for _ in range(iters):
                y = ar(y)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    import time

    t0 = time.perf_counter()
    for _ in range(iters):
        x = ar(x)
    return (time.perf_counter() - t0) / iters
