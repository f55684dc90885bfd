"""The attention op: softmax(q k^T / sqrt(D)) v over the static KV cache, for T query tokens.

model.py stays the reference and calls one ``AttentionOp``, built once with the model. Prefill
(T > 1) is one SDPA call. One-token decode uses the implementation chosen at construction
(``RuntimeOptions.decode_attention``): see ``decode_attention``. The choice is made once, by
``Transformer(args, decode_attention=...)`` or ``model.set_decode_attention(...)``; nothing else
changes it.

Eager CPU runs attend only to the filled prefix of the cache, rounded up to ``PREFIX_ROUND``
positions (the mask hides the rest, so the result is the same): a short request then does not read
the whole cache, and the number of distinct shapes stays small (oneDNN keeps one cached primitive
per shape). Compiled runs and CUDA tensors use the whole cache: reading the filled length would be
a host sync; the Triton decode kernel ("triton", and "auto" for grouped heads on CUDA) instead
reads the query's position on the device and stops there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .runtime import DECODE_ATTENTION

PREFIX_ROUND = 256
# Eager CPU decode: SDPA up to this many cache positions, then the matmul form. SmolLM2's shape in
# bf16 on a 2-core AMD EPYC: SDPA 40 us at 256 positions against split 148 / matmul 121, and it
# falls behind past ~1000 (BENCHMARKS.md, CPU decode attention).
CPU_SDPA_MAX = 1024
_TRITON_HEAD_DIMS = (16, 32, 64, 128, 256)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, impl: str = "auto", chunks: int = 4,
                     input_pos: Tensor | None = None) -> Tensor:
    """Attention for one query token with grouped KV heads, without repeating the cache.

    q: [B, H, 1, D]; k, v: [B, Hkv, S, D]; mask: [1, 1, 1, S]. The G = H / Hkv query heads that
    share a KV head all sit at the same position, so they are G query rows against that KV head
    under the same mask: each cache entry is read once (SDPA's enable_gqa and gpt-fast's
    repeat_interleave read or copy it G times).

    impl "sdpa": one fused SDPA call on [B, Hkv, G, D] queries. "matmul": scores by one matmul,
    softmax over the cache, one matmul with V. "split": as matmul, but probabilities times V in
    `chunks` slices of the cache as a batch of matmuls, summed after (flash-decoding's split-K in
    plain ops: the sum over S gets chunks times more parallel work). All give the same result up
    to rounding; which is fastest depends on Hkv, G and S. "triton" is the split-K kernel in
    kernels/attention.py on CUDA tensors with a power-of-two head size in 16..256 (elsewhere it
    means "auto"); given ``input_pos`` (the query's position, [1]) it stops there, so it reads and
    visits only the filled part of a static cache. "auto" takes what measured fastest
    (benchmarks/attention_gpu.py, H200, torch 2.11, BENCHMARKS.md): when G > 1 on CUDA with the
    kernels available, "triton" with the position (1.6x split:4 at an 8192-position server cache
    filled to 200; 1.5x at a 205-position cache, where split:4 does not divide the cache and the
    previous choice fell back to matmul; 8% slower than split:4 at 4250 of 4256); else SDPA when G == 1
    (one block per head; 32 heads fill the card: 56% of copy at S=2000), split in 4 when G > 1.
    Eager on the CPU, "auto" is SDPA up to ``CPU_SDPA_MAX`` positions, matmul beyond.
    """
    B, H, _, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    qg = q.reshape(B, Hkv, H // Hkv, D)  # [B, Hkv, G, D]
    if impl == "auto" and H != Hkv and input_pos is not None and _triton_attention_ok(q, D):
        from . import kernels

        if kernels.available():
            impl = "triton"
    if impl == "triton" and _triton_attention_ok(q, D):
        from .kernels.attention import decode_attention as triton_decode_attention

        return triton_decode_attention(qg.contiguous(), k, v, mask, input_pos).reshape(B, H, 1, D)
    if impl in ("auto", "triton") and not q.is_cuda and not torch.compiler.is_compiling():
        impl = "sdpa" if S <= CPU_SDPA_MAX else "matmul"
    if impl in ("auto", "triton"):
        impl = "sdpa" if H == Hkv else "split"
    if impl == "sdpa":
        return F.scaled_dot_product_attention(qg, k, v, attn_mask=mask).reshape(B, H, 1, D)
    scores = (qg @ k.transpose(-1, -2)).float() * (1.0 / math.sqrt(D))  # [B, Hkv, G, S]
    probs = scores.masked_fill(~mask, -float("inf")).softmax(-1).to(v.dtype)
    if impl == "split" and chunks > 1 and S % chunks == 0:
        L = S // chunks
        pc = probs.view(B, Hkv, H // Hkv, chunks, L).transpose(2, 3)  # [B, Hkv, C, G, L]
        out = (pc @ v.view(B, Hkv, chunks, L, D)).float().sum(2).to(v.dtype)  # [B, Hkv, G, D]
    else:
        out = probs @ v
    return out.reshape(B, H, 1, D)


def _triton_attention_ok(q: Tensor, head_dim: int) -> bool:
    """The Triton decode kernel runs on CUDA tensors with a power-of-two head size in 16..256."""
    return q.is_cuda and head_dim in _TRITON_HEAD_DIMS


def parse_decode_attention(spec: str) -> tuple[str, int]:
    """"split:8" -> ("split", 8); "auto" -> ("auto", 4). Raises ValueError on an unknown name."""
    impl, _, chunks = spec.partition(":")
    if impl not in DECODE_ATTENTION or (chunks and not chunks.isdigit()) or (chunks and int(chunks) < 1):
        raise ValueError(f"unknown decode attention {spec!r} (one of {', '.join(DECODE_ATTENTION)}, or split:C)")
    return impl, int(chunks) if chunks else 4


class AttentionOp:
    """Attention of q [B, H, T, D] against the whole cache k, v [B, Hkv, S, D] under mask
    [1, 1, T, S]; ``decode_impl`` picks the one-token path (see ``decode_attention``)."""

    def __init__(self, decode_impl: str = "auto", chunks: int = 4, head_dim: int | None = None):
        impl, parsed_chunks = parse_decode_attention(decode_impl)
        chunks = parsed_chunks if ":" in decode_impl else chunks
        if impl == "triton":
            from . import runtime

            reason = None
            if head_dim is not None and head_dim not in _TRITON_HEAD_DIMS:
                reason = f"head size {head_dim} is not a power of two in 16..256"
            else:
                try:
                    import triton  # noqa: F401
                except ImportError:
                    reason = "Triton is not installed"
            if reason:
                runtime.fallback("Triton decode attention", reason + "; using auto")
                impl = "auto"
        self.decode_impl, self.chunks = impl, chunks

    def __repr__(self) -> str:
        return f"AttentionOp(decode_impl={self.decode_impl!r}, chunks={self.chunks})"

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, input_pos: Tensor) -> Tensor:
        if not q.is_cuda and not torch.compiler.is_compiling():
            k, v, mask = _filled_prefix(k, v, mask, input_pos)
        if q.shape[2] == 1:
            return decode_attention(q, k, v, mask, self.decode_impl, self.chunks, input_pos)
        H, Hkv = q.shape[1], k.shape[1]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H != Hkv)


def _filled_prefix(k: Tensor, v: Tensor, mask: Tensor, input_pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The cache up to the last written position, rounded up to PREFIX_ROUND (host-side positions)."""
    S = k.shape[2]
    n = -(-(int(input_pos.max()) + 1) // PREFIX_ROUND) * PREFIX_ROUND
    if n >= S:
        return k, v, mask
    return k[:, :, :n], v[:, :, :n], mask[..., :n]
