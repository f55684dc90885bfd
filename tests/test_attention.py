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


def test_attention_op_filled_prefix_equals_whole_cache():
    """Eager CPU attention reads only the filled prefix (rounded to PREFIX_ROUND): same result."""
    from blitzgen.attention import PREFIX_ROUND, AttentionOp, _filled_prefix

    g = torch.Generator().manual_seed(0)
    S, D = 3 * PREFIX_ROUND, 32
    k, v = torch.randn(1, 2, S, D, generator=g), torch.randn(1, 2, S, D, generator=g)
    for T, start in ((1, 300), (16, 0), (5, 250)):
        pos = torch.arange(start, start + T)
        q = torch.randn(1, 4, T, D, generator=g)
        mask = (torch.arange(S)[None, :] <= pos[:, None])[None, None]
        kk, _, mm = _filled_prefix(k, v, mask, pos)
        assert kk.shape[2] == mm.shape[-1] == -(-(start + T) // PREFIX_ROUND) * PREFIX_ROUND
        for impl in ("auto", "sdpa", "matmul", "split"):
            op = AttentionOp(impl)
            out = op(q, k, v, mask, pos)
            if T == 1:
                ref = decode_attention(q, k, v, mask, impl)
            else:
                ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_decode_attention_is_chosen_at_construction():
    from blitzgen.attention import AttentionOp
    from blitzgen.generate import Generator
    from blitzgen.runtime import RuntimeOptions

    from .conftest import tiny_model

    model = tiny_model(seed=1)
    assert all(layer.attention.op is model.attention_op for layer in model.layers)
    assert model.attention_op.decode_impl == "auto"
    model.set_decode_attention("split:8")
    assert all(layer.attention.op is model.attention_op for layer in model.layers)
    assert (model.attention_op.decode_impl, model.attention_op.chunks) == ("split", 8)
    Generator(model, options=RuntimeOptions(decode_attention="matmul"))
    assert model.attention_op.decode_impl == "matmul"
    with pytest.raises(ValueError, match="unknown decode attention"):
        AttentionOp("fast")
    assert AttentionOp("triton", head_dim=48).decode_impl == "auto"  # the kernel needs 16..256, a power of two


def test_auto_on_cpu_takes_sdpa_for_short_caches_and_matmul_beyond(monkeypatch):
    """Eager CPU decode with grouped heads: "auto" is SDPA up to CPU_SDPA_MAX positions (several
    times faster there), the matmul form beyond; both give the float64 answer."""
    import blitzgen.attention as A

    calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(A.F, "scaled_dot_product_attention", lambda *a, **k: calls.append("sdpa") or real_sdpa(*a, **k))
    torch.manual_seed(0)
    for S, want in ((256, ["sdpa"]), (A.CPU_SDPA_MAX + 256, [])):
        q, k, v = torch.randn(1, 8, 1, 64), torch.randn(1, 2, S, 64), torch.randn(1, 2, S, 64)
        mask = (torch.arange(S) < S - 9).view(1, 1, 1, S)
        calls.clear()
        y = A.decode_attention(q, k, v, mask, "auto")
        assert calls == want, (S, calls)
        qg = q.double().reshape(1, 2, 4, 64)
        s = (qg @ k.double().transpose(-1, -2)) / 8.0
        r = s.masked_fill(~mask, -float("inf")).softmax(-1) @ v.double()
        torch.testing.assert_close(y.double(), r.reshape(1, 8, 1, 64), rtol=1e-5, atol=1e-5)
