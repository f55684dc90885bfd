"""decode_attention (one query token, grouped KV heads, SDPA per KV head) against a float64 oracle."""

import math

import pytest
import torch

from blitzgen.attention import decode_attention


def _reference(q, k, v, mask):
    H, Hkv, D = q.shape[1], k.shape[1], q.shape[-1]
    k = k.double().repeat_interleave(H // Hkv, 1)
    v = v.double().repeat_interleave(H // Hkv, 1)
    scores = (q.double() @ k.transpose(-1, -2)) / math.sqrt(D)
    return scores.masked_fill(~mask, -float("inf")).softmax(-1) @ v


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (8, 2), (9, 3), (4, 1)])
# "triton" on CPU tensors falls back to "auto" (the kernel itself: tests/test_attention_kernel.py)
@pytest.mark.parametrize("impl,chunks,S", [("auto", 4, 48), ("auto", 4, 37), ("triton", 4, 48), ("sdpa", 1, 37), ("matmul", 1, 37), ("split", 4, 48), ("split", 4, 37)])
def test_decode_attention_matches_float64(dtype, tol, heads, kv_heads, impl, chunks, S):
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    D, filled = 64, 21
    q, k, v = (torch.randn(1, h, n, D, generator=g).to(dtype)
               for h, n in ((heads, 1), (kv_heads, S), (kv_heads, S)))
    mask = (torch.arange(S) < filled).view(1, 1, 1, S)
    out = decode_attention(q, k, v, mask, impl, chunks)
    ref = _reference(q, k, v, mask)
    assert out.shape == (1, heads, 1, D) and out.dtype == dtype
    assert ((out.double() - ref).norm() / ref.norm()).item() < tol
    # positions the mask hides do not matter
    k2, v2 = k.clone(), v.clone()
    k2[:, :, filled:] = 1e4
    v2[:, :, filled:] = -1e4
    assert torch.equal(decode_attention(q, k2, v2, mask, impl, chunks), out)
