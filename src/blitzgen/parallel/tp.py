"""The tensor-parallel sharding plan: which weights each rank holds, and where the all-reduces go.

Megatron-style, two all-reduces per block (gpt-fast's tp.py, vLLM's Column/RowParallelLinear):

| layer                  | split                   | rank r holds                                         |
|------------------------|-------------------------|------------------------------------------------------|
| attention.wqkv         | outputs (column), heads | its q heads, and the k/v heads those q heads read     |
| attention.wo           | inputs (row)            | the input columns of its q heads; all-reduce after    |
| feed_forward.w13       | outputs (column)        | its slice of gate (w1) AND its slice of up (w3)       |
| feed_forward.w2        | inputs (row)            | the matching input columns; all-reduce after          |
| embeddings, norms, head| replicated              | everything                                           |

KV heads: split when the rank count divides them; otherwise each rank holds the KV heads its q
heads read, one copy per rank (replicated), so every rank keeps a uniform GQA group. q heads and
the FFN width must divide by the rank count. The output head is replicated: its all-gather would
add a third collective per token, and it is one matrix of the model's ~2 * n_layers * 4.

A rank's model is ``Transformer(plan.rank_args())`` (its head counts and FFN width), so model.py
has no parallel branches; ``wrap`` swaps wo and w2 for ``RowParallel`` (inner linear, then the
all-reduce). Weights are sliced as they are read (``read``, the loader's per-tensor hook) or, for a
model already in memory, by each module's own ``shard`` (quantized modules know their layout).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

from ..config import ModelArgs
from ..errors import BlitzgenError

Ranges = list[tuple[int, int]]
# (module suffix, kind): "qkv" / "gate_up" split the outputs by explicit ranges; "row" the inputs.
RULES = (("attention.wqkv", "qkv"), ("attention.wo", "row"), ("feed_forward.w13", "gate_up"),
         ("feed_forward.w2", "row"))


class ShardError(BlitzgenError):
    """The model cannot be split over this many ranks (heads, FFN width or int4 groups)."""


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def merge(ranges: Ranges) -> Ranges:
    """Adjacent ranges joined ([(0, 4), (4, 8)] -> [(0, 8)]); order and repeats kept."""
    out: Ranges = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def take(t: Tensor, dim: int, ranges: Ranges) -> Tensor:
    """The rows (dim 0) or columns (dim 1) of t in ranges, concatenated."""
    parts = [t.narrow(dim, a, b - a) for a, b in ranges]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def chunk_range(n: int, rank: int, world: int, what: str = "dimension") -> tuple[int, int]:
    if n % world:
        raise ShardError(f"cannot split {what} of {n} into {world} equal parts")
    step = n // world
    return rank * step, (rank + 1) * step


def shard_tensor(t: Tensor, dim: int, rank: int, world: int, ranges: Ranges | None = None) -> Tensor:
    """The one slicing rule of every stored tensor of a linear layer (float or quantized): dim 0
    is the output channel of every tensor; dim 1 of a 2-D tensor is the input (plain, packed, or
    grouped). Output split (dim 0): rows in ``ranges`` (default: rank's equal share). Input split
    (dim 1): 2-D tensors give their rank's equal share of columns, 1-D ones (bias, per-channel
    scales) stay whole."""
    if dim == 0:
        return take(t, 0, ranges if ranges is not None else [chunk_range(t.shape[0], rank, world)])
    if t.dim() < 2:
        return t
    return take(t, 1, [chunk_range(t.shape[1], rank, world, "input columns")])


def shard_linear(m: nn.Linear, dim: int, rank: int, world: int, ranges: Ranges | None = None) -> nn.Linear:
    """A float nn.Linear's part, as a new Linear (a quantized module's ``shard`` does the same)."""
    w = shard_tensor(m.weight.detach(), dim, rank, world, ranges)
    b = None if m.bias is None else shard_tensor(m.bias.detach(), dim, rank, world, ranges)
    out = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
    out.weight = nn.Parameter(w.contiguous(), requires_grad=False)
    if b is not None:
        out.bias = nn.Parameter(b.contiguous(), requires_grad=False)
    return out


class RowParallel(nn.Module):
    """A row-parallel linear: this rank's partial product, summed over ranks by ``all_reduce``.
    A bias (none in the Llama family) is added once, after the sum."""

    def __init__(self, linear: nn.Module, all_reduce: Callable[[Tensor], Tensor]):
        super().__init__()
        bias = getattr(linear, "bias", None)
        self.linear = linear
        self.all_reduce = all_reduce
        if bias is not None:
            linear.bias = None
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.all_reduce(self.linear(x))
        return y if self.bias is None else y + self.bias.to(y.dtype)


@dataclasses.dataclass(frozen=True)
class TPPlan:
    """The split of one model (full ``args``) for ``rank`` of ``world``. Build with ``make``."""

    args: ModelArgs
    rank: int
    world: int

    @classmethod
    def make(cls, args: ModelArgs, rank: int, world: int, quant=None) -> "TPPlan":
        """Check that args split over world ranks (and int4 groups stay whole), else ShardError."""
        if world < 1 or not 0 <= rank < world:
            raise ShardError(f"rank {rank} of {world} is not a valid tensor-parallel position")
        if args.n_heads % world:
            raise ShardError(f"--tp {world} does not divide the model's {args.n_heads} attention heads "
                             f"(possible --tp values: {_divisors(args.n_heads)})")
        if args.intermediate_size % world:
            raise ShardError(f"--tp {world} does not divide the model's FFN width {args.intermediate_size} "
                             f"(possible --tp values: {_divisors(args.intermediate_size)})")
        g = getattr(quant, "group_size", None)
        if g and world > 1:
            for name, n in (("attention.wo", args.q_size), ("feed_forward.w2", args.intermediate_size)):
                if (n // world) % g:
                    raise ShardError(f"int4 group size {g} does not fit a {world}-way split of {name}'s "
                                     f"{n} inputs ({n // world} per rank is not a whole number of groups); "
                                     "use a smaller --group-size or another --tp")
        return cls(args, rank, world)

    # ---- heads --------------------------------------------------------------------------------
    @property
    def q_heads(self) -> range:
        h = self.args.n_heads // self.world
        return range(self.rank * h, (self.rank + 1) * h)

    @property
    def kv_heads(self) -> list[int]:
        """The KV heads this rank holds, in order (a head may be held by several ranks)."""
        a = self.args
        group = a.n_heads // a.n_kv_heads
        if a.n_kv_heads % self.world == 0:
            k = a.n_kv_heads // self.world
            return list(range(self.rank * k, (self.rank + 1) * k))
        needed = [q // group for q in self.q_heads]
        if group % len(self.q_heads) == 0:  # all of this rank's q heads read one KV head
            return needed[:1]
        return needed  # uneven: one KV copy per q head (a group of 1 on this rank)

    def rank_args(self, args: ModelArgs | None = None) -> ModelArgs:
        """The ModelArgs of this rank's model (``args``: the full ones, default the plan's)."""
        a = args or self.args
        return dataclasses.replace(a, n_heads=len(self.q_heads), n_kv_heads=len(self.kv_heads), head_dim=a.head_dim,
                                   intermediate_size=a.intermediate_size // self.world)

    # ---- which rows/columns -------------------------------------------------------------------
    def rule(self, module: str) -> tuple[int, Ranges | None] | None:
        """(dim, output ranges) for a module name, None when it is replicated."""
        for suffix, kind in RULES:
            if module == suffix or module.endswith("." + suffix):
                return self._split(kind)
        return None

    def _split(self, kind: str) -> tuple[int, Ranges | None]:
        a = self.args
        if kind == "row":
            return 1, None
        if kind == "gate_up":
            lo, hi = chunk_range(a.intermediate_size, self.rank, self.world, "the FFN width")
            return 0, [(lo, hi), (a.intermediate_size + lo, a.intermediate_size + hi)]
        d = a.head_dim
        q = [(h * d, (h + 1) * d) for h in self.q_heads]
        k = [(a.q_size + h * d, a.q_size + (h + 1) * d) for h in self.kv_heads]
        v = [(lo + a.kv_size, hi + a.kv_size) for lo, hi in k]
        return 0, merge(q + k + v)

    def part_sizes(self, module: str, n_parts: int) -> list[int]:
        """Output sizes of the source tensors concatenated into a fused module (q/k/v, gate/up)."""
        a = self.args
        if n_parts == 1:
            return []
        if module.endswith("wqkv"):
            return [a.q_size, a.kv_size, a.kv_size]
        return [a.intermediate_size] * n_parts

    # ---- reading: the loader's per-tensor hook -------------------------------------------------
    def read(self, ours: str, parts: list[str], source) -> Tensor:
        """This rank's slice of our tensor ``ours`` (the concatenation of the source tensors
        ``parts`` along dim 0), reading only the needed rows/columns where the source can slice
        (safetensors' get_slice); a source with a ``transform`` (GGUF) is read whole per tensor."""
        module = ours.rpartition(".")[0]
        rule = self.rule(module)
        if rule is None or self.world == 1:
            return _cat([_read(source, p, None, None) for p in parts])
        dim, ranges = rule
        if dim == 1:
            return _cat([_read(source, p, 1, (self.rank, self.world)) for p in parts])
        sizes = self.part_sizes(module, len(parts)) or [None]
        out, offset = [], 0
        for name, size in zip(parts, sizes):
            if size is None:  # one fused tensor: the ranges apply as they are
                out.append(_read(source, name, 0, ranges))
                continue
            local = [(max(a, offset) - offset, min(b, offset + size) - offset) for a, b in ranges
                     if a < offset + size and b > offset]
            if local:
                out.append(_read(source, name, 0, local))
            offset += size
        return _cat(out)

    # ---- a model in memory ----------------------------------------------------------------------
    @torch.no_grad()
    def shard_model(self, model: nn.Module, all_reduce: Callable[[Tensor], Tensor] | None = None) -> nn.Module:
        """Shard a full model in place (tests, and models built in memory): every split linear
        becomes its rank's part, attention head counts and the FFN width follow, and wo/w2 get
        their all-reduce (``wrap``) when ``all_reduce`` is given."""
        from ..quant.core import set_submodule

        rank_args = self.rank_args(model.args)
        for name, m in list(model.named_modules()):
            rule = self.rule(name)
            if rule is None:
                continue
            dim, ranges = rule
            shard = getattr(m, "shard", None)
            if shard is not None:
                shard(dim, self.rank, self.world, ranges)
            elif isinstance(m, nn.Linear):
                set_submodule(model, name, shard_linear(m, dim, self.rank, self.world, ranges))
            else:
                raise ShardError(f"{name} ({type(m).__name__}) does not know how to shard itself")
        set_rank_shapes(model, rank_args)
        if all_reduce is not None:
            wrap(model, all_reduce)
        return model


def set_rank_shapes(model: nn.Module, rank_args: ModelArgs) -> None:
    """Point the model and its attention/FFN modules at this rank's head counts and FFN width,
    and rebuild the KV cache for them."""
    model.args = rank_args
    for layer in model.layers:
        att = layer.attention
        att.n_heads, att.n_kv_heads = rank_args.n_heads, rank_args.n_kv_heads
        att.q_size, att.kv_size = rank_args.q_size, rank_args.kv_size
        layer.feed_forward.intermediate_size = rank_args.intermediate_size
    if getattr(model, "cache_len", 0):
        batch, n = model.max_batch, model.cache_len
        model.cache_len = 0
        model.setup_caches(batch, n)


def wrap(model: nn.Module, all_reduce: Callable[[Tensor], Tensor]) -> nn.Module:
    """Put an all-reduce after every row-parallel layer (wo, w2)."""
    for layer in model.layers:
        layer.attention.wo = RowParallel(layer.attention.wo, all_reduce)
        layer.feed_forward.w2 = RowParallel(layer.feed_forward.w2, all_reduce)
    return model


def _cat(ts: list[Tensor]) -> Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim=0)


def _read(source, name: str, dim: int | None, what) -> Tensor:
    """Source tensor ``name`` (dim None), its output rows ``what`` (dim 0: ranges), or its input
    columns share (dim 1: (rank, world))."""
    transform = getattr(source, "transform", None)
    get_slice = getattr(source, "get_slice", None)
    if dim is not None and transform is None and get_slice is not None:
        sl = get_slice(name)
        shape = sl.get_shape()
        if dim == 0:
            return _cat([sl[a:b] for a, b in what])
        if len(shape) < 2:
            return sl[:]
        a, b = chunk_range(shape[1], *what, "input columns")
        return sl[:, a:b]
    t = source.get(name)
    if transform is not None:
        t = transform(name, t)
    if dim is None:
        return t
    return take(t, 0, what) if dim == 0 else shard_tensor(t, 1, *what)


class Sharding:
    """The loader's hook (``loading.load(..., shard=Sharding(rank, world))``): the plan is made
    from the source's own config once it is read (``rank_args``), then every tensor is read
    through ``TPPlan.read``."""

    def __init__(self, rank: int, world: int, quant=None):
        self.rank, self.world, self.quant = rank, world, quant
        self.plan: TPPlan | None = None

    def rank_args(self, args: ModelArgs) -> ModelArgs:
        self.plan = TPPlan.make(args, self.rank, self.world, self.quant)
        return self.plan.rank_args(args)

    def read(self, ours: str, parts: list[str], source) -> Tensor:
        assert self.plan is not None, "rank_args() first"
        return self.plan.read(ours, parts, source)
