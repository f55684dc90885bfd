"""Registering a Triton launcher as a torch custom op."""

from __future__ import annotations

from typing import Callable

import torch


def opaque_op(name: str, fn: Callable, fake: Callable):
    """``fn`` as the custom op ``name`` (schema from its annotations), opaque to torch.compile:
    tracing sees only ``fake`` (output shape and dtype). Not ``triton_op``: that lets the compiler
    analyse the Triton kernel again at every call site (a TTIR build each), which made most of a
    quantized 7B model's cold compile; inside a CUDA graph an opaque op costs the same (see
    BENCHMARKS.md)."""
    op = torch.library.custom_op(name, fn, mutates_args=())
    op.register_fake(fake)
    return op


def linear_fake(x: torch.Tensor, weight: torch.Tensor, *rest) -> torch.Tensor:
    """The fake of a linear-shaped op: x's leading dims, one output per weight row."""
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
