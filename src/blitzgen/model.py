"""The Llama-family transformer, readable top to bottom.

One file for Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, SmolLM2, TinyLlama and CodeLlama: they differ
only in config values (GQA head counts, RoPE base and scaling, q/k/v bias, tied embeddings).

References: Hugging Face transformers' modeling_llama.py (the numerical oracle our tests compare
against) and gpt-fast's model.py (static KV cache as a module, weights assigned onto a meta-device
model). RoPE is the "rotate_half" form HF uses, so HF checkpoints load as they are; loading/gguf.py
undoes llama.cpp's q/k permutation.

Layout differences from HF, made for batch-1 decode speed and handled by loading/names.py:
q, k, v projections are one fused ``wqkv`` matmul and gate/up are one fused ``w13`` matmul.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .attention import AttentionOp
from .config import ModelArgs


class KVCache(nn.Module):
    """Static, preallocated key/value buffers: shapes never change, so decode can be CUDA-graphed."""

    def __init__(self, batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # input_pos: [T]; k, v: [B, n_kv, T, D]
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        return self.k_cache, self.v_cache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalise in float32, cast back, then scale (HF's order of operations)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_frequencies(args: ModelArgs) -> Tensor:
    """Inverse frequencies [head_dim / 2], with llama3 or linear scaling applied."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    sc = args.rope_scaling
    if sc is None:
        return inv_freq
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "freq_factors":  # GGUF (llama.cpp) stores llama3 scaling as per-frequency divisors
        return inv_freq / torch.tensor(sc["factors"], dtype=torch.float32)
    factor = float(sc["factor"])
    if kind == "linear":
        return inv_freq / factor
    # llama3: keep high frequencies, divide low ones by factor, blend in between.
    low, high = float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
    old_ctx = float(sc["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, blended, scaled)


def rope_cache(args: ModelArgs, seq_len: int, device=None, dtype=torch.float32) -> Tensor:
    """[2, seq_len, head_dim] table of (cos, sin), computed in float32, duplicated over both halves
    and stored in the model dtype (as HF casts it before use)."""
    inv_freq = rope_frequencies(args).to(device)
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # [S, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [S, D]
    return torch.stack([emb.cos(), emb.sin()]).to(dtype)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    # x: [B, T, H, D]; rope: [2, T, D] -> rotate_half form: x*cos + rotate_half(x)*sin
    cos, sin = rope[0, None, :, None, :], rope[1, None, :, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, op: AttentionOp):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_size, self.kv_size = args.q_size, args.kv_size
        self.wqkv = nn.Linear(args.dim, args.q_size + 2 * args.kv_size, bias=args.qkv_bias)
        self.wo = nn.Linear(args.q_size, args.dim, bias=False)
        self.kv_cache: KVCache | None = None
        self.op = op  # softmax(q k^T) v over the cache (attention.py); shared by every layer

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor, input_pos: Tensor) -> Tensor:
        return self.wo(self.attend(self.wqkv(x), rope, mask, input_pos))

    def attend(self, qkv: Tensor, rope: Tensor, mask: Tensor, input_pos: Tensor) -> Tensor:
        """RoPE, cache update and attention for the fused projections qkv [B, T, q + 2 kv]: the
        heads' outputs [B, T, q_size], before wo (kernels/fused_decode.py calls this too)."""
        B, T, _ = qkv.shape
        qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        # q and k heads side by side, rotated in one go: [B, T, n_heads + n_kv_heads, D]
        qk = apply_rope(qk.view(B, T, self.n_heads + self.n_kv_heads, self.head_dim), rope)
        q, k = qk.split([self.n_heads, self.n_kv_heads], dim=2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        assert self.kv_cache is not None, "call model.setup_caches() first"
        k, v = self.kv_cache.update(input_pos, k, v)  # [B, n_kv, S, D]
        y = self.op(q, k, v, mask, input_pos)  # [B, H, T, D]
        return y.transpose(1, 2).reshape(B, T, self.q_size)


class FeedForward(nn.Module):
    """SwiGLU; gate (w1) and up (w3) projections fused into one matmul, w13 = cat([w1, w3])."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.intermediate_size = args.intermediate_size
        self.w13 = nn.Linear(args.dim, 2 * args.intermediate_size, bias=False)
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).split(self.intermediate_size, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, op: AttentionOp):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, op)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)
        # one-token forward through fused GEMVs (kernels/fused_decode.py), set by its enable(); None: off
        self.fused_decode = None

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor, input_pos: Tensor) -> Tensor:
        """x: [B, T, dim] at positions input_pos [T]; rope and mask from Transformer.rope_and_mask."""
        if self.fused_decode is not None and x.shape[0] * x.shape[1] == 1:
            return self.fused_decode(self, x, rope, mask, input_pos)
        h = x + self.attention(self.attention_norm(x), rope, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


def _block(layer: TransformerBlock, x: Tensor, rope: Tensor, mask: Tensor, input_pos: Tensor) -> Tensor:
    return layer(x, rope, mask, input_pos)


# The same block as a compile region: Dynamo traces it once and reuses the trace for every layer
# (torch >= 2.9), instead of tracing all n_layers; eager calls run it as is.
_region = getattr(getattr(torch, "compiler", None), "nested_compile_region", None)
_block_region = _region(_block) if _region is not None else _block


class Transformer(nn.Module):
    """The model. ``args.max_seq_len`` is the trained context; ``cache_len`` is how many positions
    the KV cache currently holds (``setup_caches``). ``decode_attention`` names the one-token
    attention implementation (attention.py), chosen here once."""

    def __init__(self, args: ModelArgs, decode_attention: str = "auto"):
        super().__init__()
        self.args = args
        self.attention_op = AttentionOp(decode_attention, head_dim=args.head_dim)
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, self.attention_op) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.cache_len = 0
        self.max_batch = 0
        self.compile_regions = False  # compiled: trace one block for all layers (set at load: RuntimeOptions.regions_for)

    @property
    def max_seq_len(self) -> int:
        """Positions the KV cache holds (the older name of ``cache_len``)."""
        return self.cache_len

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def set_decode_attention(self, impl: str, chunks: int = 4) -> None:
        """Choose the one-token attention implementation (before compiling; see attention.py)."""
        self.attention_op = AttentionOp(impl, chunks, head_dim=self.args.head_dim)
        for layer in self.layers:
            layer.attention.op = self.attention_op

    def setup_caches(self, max_batch: int, cache_len: int) -> None:
        """(Re)allocate the static KV cache and RoPE table for cache_len positions."""
        if cache_len > self.args.max_seq_len:
            raise ValueError(f"cache length {cache_len} exceeds the model's context {self.args.max_seq_len}")
        if cache_len == self.cache_len and max_batch == self.max_batch:
            return
        dtype, device = self.dtype, self.device
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(max_batch, self.args.n_kv_heads, cache_len,
                                               self.args.head_dim, dtype, device)
        self.register_buffer("rope", rope_cache(self.args, cache_len, device, dtype), persistent=False)
        self.register_buffer("cache_pos", torch.arange(cache_len, device=device), persistent=False)
        self.cache_len, self.max_batch = cache_len, max_batch

    def rope_and_mask(self, input_pos: Tensor) -> tuple[Tensor, Tensor]:
        """RoPE table [2, T, D] and causal mask [1, 1, T, cache_len] for positions input_pos [T]:
        what every block's forward takes besides x (GPTQ runs the blocks one by one with them)."""
        mask = (self.cache_pos[None, :] <= input_pos[:, None])[None, None]
        return self.rope[:, input_pos], mask

    def forward(self, idx: Tensor, input_pos: Tensor, logits_at: Tensor | None = None) -> Tensor:
        """idx: [B, T] token ids at positions input_pos: [T] (any positions below cache_len).
        Returns logits [B, T, V] (float32). logits_at: [N] indices into T; only those positions get
        logits ([B, N, V]), which saves the output matmul over a long prompt."""
        rope, mask = self.rope_and_mask(input_pos)
        x = self.tok_embeddings(idx)
        block = _block_region if self.compile_regions and torch.compiler.is_compiling() else _block
        for layer in self.layers:
            x = block(layer, x, rope, mask, input_pos)
        if logits_at is not None:
            x = x.index_select(1, logits_at)
        return self.output(self.norm(x)).float()
