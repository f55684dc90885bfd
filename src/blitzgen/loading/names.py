"""The one name-mapping table: our parameter names <- Hugging Face and GGUF tensor names.

Each entry maps one of our parameters to the list of source tensors that are concatenated along
dim 0 to form it (q/k/v into ``wqkv``; gate/up into ``w13``). Used by every loader, so a new source
format only needs its own column.
"""

from __future__ import annotations

# (ours, [hf parts], [gguf parts]); "{i}" is the layer index.
LAYER_TABLE = [
    ("layers.{i}.attention_norm.weight", ["model.layers.{i}.input_layernorm.weight"], ["blk.{i}.attn_norm.weight"]),
    ("layers.{i}.attention.wqkv.weight",
     ["model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
      "model.layers.{i}.self_attn.v_proj.weight"],
     ["blk.{i}.attn_q.weight", "blk.{i}.attn_k.weight", "blk.{i}.attn_v.weight"]),
    ("layers.{i}.attention.wqkv.bias",
     ["model.layers.{i}.self_attn.q_proj.bias", "model.layers.{i}.self_attn.k_proj.bias",
      "model.layers.{i}.self_attn.v_proj.bias"],
     ["blk.{i}.attn_q.bias", "blk.{i}.attn_k.bias", "blk.{i}.attn_v.bias"]),
    ("layers.{i}.attention.wo.weight", ["model.layers.{i}.self_attn.o_proj.weight"], ["blk.{i}.attn_output.weight"]),
    ("layers.{i}.ffn_norm.weight", ["model.layers.{i}.post_attention_layernorm.weight"], ["blk.{i}.ffn_norm.weight"]),
    ("layers.{i}.feed_forward.w13.weight",
     ["model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"],
     ["blk.{i}.ffn_gate.weight", "blk.{i}.ffn_up.weight"]),
    ("layers.{i}.feed_forward.w2.weight", ["model.layers.{i}.mlp.down_proj.weight"], ["blk.{i}.ffn_down.weight"]),
]
GLOBAL_TABLE = [
    ("tok_embeddings.weight", ["model.embed_tokens.weight"], ["token_embd.weight"]),
    ("norm.weight", ["model.norm.weight"], ["output_norm.weight"]),
    ("output.weight", ["lm_head.weight"], ["output.weight"]),
]
SOURCES = {"hf": 1, "gguf": 2}


def mapping(n_layers: int, source: str, qkv_bias: bool, tied: bool) -> dict[str, list[str]]:
    """{our parameter name: [source tensor names to concatenate]} for a model of n_layers."""
    col = SOURCES[source]
    out: dict[str, list[str]] = {}
    for row in GLOBAL_TABLE:
        if row[0] == "output.weight" and tied:
            continue
        out[row[0]] = list(row[col])
    for i in range(n_layers):
        for row in LAYER_TABLE:
            if row[0].endswith("wqkv.bias") and not qkv_bias:
                continue
            out[row[0].format(i=i)] = [p.format(i=i) for p in row[col]]
    return out
