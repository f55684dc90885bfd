"""GGUF files (llama.cpp): config, weights and tokenizer all come from the one file.

Weights of every type the ``gguf`` package can dequantize are dequantized to float on load.
llama.cpp's converter permutes Llama q/k projection rows for its interleaved RoPE; our model uses
the rotate_half form, so ``unpermute_qk`` undoes that.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import ModelArgs
from ..errors import ModelLoadError, UnsupportedModelError

GGUF_MAGIC = b"GGUF"
# GGUF architectures and the config.json model_type they correspond to.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}


def is_gguf_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def open_reader(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as e:  # the reader raises ValueError, struct.error, IndexError... on bad files
        raise ModelLoadError(f"corrupt or truncated GGUF file {path}: {type(e).__name__}: {e}") from None


def field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def load_args(reader) -> ModelArgs:
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported; blitzgen runs: {', '.join(ARCHITECTURES)} "
            "(Llama 2/3, Mistral, SmolLM2, TinyLlama, CodeLlama, Qwen2/2.5)"
        )

    def key(k, default=None):
        return field(reader, f"{arch}.{k}", default)

    dim = key("embedding_length")
    n_heads = key("attention.head_count")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = key("vocab_size") or (len(tokens.data) if tokens is not None else None)
    if None in (dim, n_heads, key("block_count"), key("feed_forward_length"), vocab):
        raise ModelLoadError("GGUF metadata lacks the model's shape (embedding_length, head_count, block_count, "
                             "feed_forward_length, vocab_size or tokenizer tokens)")
    names = {t.name for t in reader.tensors}
    rope_scaling = None
    if "rope_freqs.weight" in names:  # llama 3.1+: per-frequency divisors stored as a tensor
        t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        rope_scaling = {"rope_type": "freq_factors", "factors": [float(x) for x in np.asarray(t.data)]}
    elif key("rope.scaling.type") == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    elif key("rope.scaling.type") not in (None, "none"):
        raise UnsupportedModelError(f"GGUF rope scaling {key('rope.scaling.type')!r} is not supported")
    head_dim = key("attention.key_length") or key("rope.dimension_count") or dim // n_heads
    return ModelArgs(
        vocab_size=int(vocab),
        dim=int(dim),
        n_layers=int(key("block_count")),
        n_heads=int(n_heads),
        n_kv_heads=int(key("attention.head_count_kv", n_heads)),
        head_dim=int(head_dim),
        intermediate_size=int(key("feed_forward_length")),
        norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_seq_len=int(key("context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        model_type=ARCHITECTURES[arch],
    )


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE -> rotate_half RoPE).

    Works for weights [n_head * head_dim, dim] and biases [n_head * head_dim].
    """
    shape = w.shape
    head_dim = shape[0] // n_head
    return w.reshape(n_head, head_dim // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)


class GGUFSource:
    """name -> dequantized float32 tensor, in torch's [out, in] layout."""

    def __init__(self, reader, args: ModelArgs):
        import gguf

        self.args = args
        self.arch = field(reader, "general.architecture")
        self.tensors = {t.name: t for t in reader.tensors}
        for t in reader.tensors:
            if t.tensor_type not in gguf.GGML_QUANT_SIZES:
                raise UnsupportedModelError(f"GGUF tensor {t.name} has type {t.tensor_type!r}, unknown to gguf")

    def names(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str) -> torch.Tensor:
        import gguf

        t = self.tensors[name]
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise UnsupportedModelError(
                f"GGUF tensor {name} has type {t.tensor_type.name}, which the gguf package cannot "
                "dequantize; re-export the model with another quantization (e.g. Q8_0, Q4_K_M, F16)"
            ) from None
        except Exception as e:
            raise ModelLoadError(f"cannot read GGUF tensor {name}: {e} (is the file truncated?)") from None
        arr = np.ascontiguousarray(arr, dtype=np.float32).reshape(shape)
        if not arr.flags.writeable:  # float tensors come straight from the read-only mmap
            arr = arr.copy()
        return torch.from_numpy(arr)

    def transform(self, name: str, w: torch.Tensor) -> torch.Tensor:
        if self.arch != "llama":  # only the llama converter permutes (qwen2 uses NEOX RoPE as is)
            return w
        if ".attn_q." in name:
            return unpermute_qk(w, self.args.n_heads)
        if ".attn_k." in name:
            return unpermute_qk(w, self.args.n_kv_heads)
        return w
