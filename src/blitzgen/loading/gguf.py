"""GGUF files (llama.cpp): config, weights and tokenizer all come from the one file.

Weights of every type the ``gguf`` package can dequantize are dequantized to float on load.
llama.cpp's converter permutes Llama q/k projection rows for its interleaved RoPE; our model uses
the rotate_half form, so ``unpermute_qk`` undoes that.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from ..config import ModelArgs, check_float, check_int
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
        raise ModelLoadError(_damage(path, f"{type(e).__name__}: {e}")) from None


# value sizes of the GGUF metadata types (gguf.GGUFValueType): 8 is a string, 9 an array
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def expected_size(path: Path) -> int | None:
    """The byte length the GGUF header promises (data start + the end of the last tensor), or
    None when the header itself is cut short or unreadable. Reads the header only."""
    scan = scan_header(path)
    return None if scan is None else scan[0]


def tensor_types(path: Path) -> dict[str, str]:
    """{tensor name: GGML type name, e.g. "Q4_1"} from the header ({} when it is unreadable)."""
    scan = scan_header(path)
    return {} if scan is None else dict(scan[1])


# llama.cpp types that int4 g32, re-quantized from the dequantized weights, holds exactly but for
# the scales' rounding, with the grid that recovers each block: Q4_1 (a scale and a minimum; its
# codes span 0..15, so min/max finds them) and Q4_0 (symmetric: the largest-magnitude weight is
# code 0, so scale = it / -8). Q4_K (searched 6-bit sub-block scales) is not imported this way.
FOUR_BIT_G32 = {"Q4_1": "minmax", "Q4_0": "symmetric"}
BLOCK_WEIGHTS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def four_bit_grid(path: Path) -> str | None:
    """The int4 g32 grid ("minmax" or "symmetric") that keeps every transformer-block projection
    weight of the file without further loss, when they are all of one type in FOUR_BIT_G32; else
    None (biases, e.g. Qwen2's, do not count)."""
    types = {t for name, t in tensor_types(path).items()
             if name.startswith("blk.") and name.endswith(".weight") and name.split(".")[-2] in BLOCK_WEIGHTS}
    if len(types) != 1:
        return None
    return FOUR_BIT_G32.get(types.pop())


EIGHT_BIT = ("Q8_0", "Q8_1", "Q8_K")  # head types an int8 head (per channel) stands in for


def head_type(path: Path) -> str | None:
    """The GGML type of the output head (``output.weight``, else the tied ``token_embd.weight``)."""
    types = tensor_types(path)
    return types.get("output.weight") or types.get("token_embd.weight")


def scan_header(path: Path) -> tuple[int, dict[str, str]] | None:
    """(expected byte length, {tensor name: type name}) from the header alone, or None. Remembered
    per file version (the vocabulary's strings take ~0.1 s to skip in Python)."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return _scan_header(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _scan_header(path: str, _size: int, _mtime_ns: int) -> tuple[int, dict[str, str]] | None:
    import mmap
    import struct

    import gguf

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            pos = 0

            def take(fmt):
                nonlocal pos
                vals = struct.unpack_from("<" + fmt, m, pos)
                pos += struct.calcsize("<" + fmt)
                return vals[0] if len(vals) == 1 else vals

            def string():
                nonlocal pos
                n = take("Q")
                if pos + n > len(m):
                    raise struct.error("string past the end")
                pos += n
                return bytes(m[pos - n:pos])

            def skip(vtype):
                nonlocal pos
                if vtype == 8:
                    string()
                elif vtype == 9:
                    sub, n = take("IQ")
                    if sub in _SCALAR:
                        pos += n * _SCALAR[sub]
                    else:
                        for _ in range(n):
                            skip(sub)
                else:
                    pos += _SCALAR[vtype]

            magic, _version, n_tensors, n_kv = take("4sIQQ")
            alignment = 32
            for _ in range(n_kv):
                name = string()
                vtype = take("I")
                if name == b"general.alignment" and vtype == 4:
                    alignment = take("I")
                else:
                    skip(vtype)
            end, types = 0, {}
            for _ in range(n_tensors):
                tname = string().decode("utf-8", "replace")
                dims = [take("Q") for _ in range(take("I"))]
                ttype, offset = take("IQ")
                qtype = gguf.GGMLQuantizationType(ttype)
                types[tname] = qtype.name
                block, size = gguf.GGML_QUANT_SIZES[qtype]
                count = 1
                for d in dims:
                    count *= d
                end = max(end, offset + count // block * size)
            if pos > len(m):
                return None
            start = pos + (-pos % alignment)
            return start + end, types
    except (OSError, ValueError, KeyError, struct.error):
        return None


def _damage(path: Path, detail: str) -> str:
    """A one-line message for a GGUF that failed to read: truncated (with the sizes) when the file
    is shorter than its header promises or its header is cut short, else corrupt."""
    try:
        have = Path(path).stat().st_size
    except OSError:
        return f"cannot read GGUF file {path}"
    want = expected_size(path)
    if want is None or have < want:
        need = f"; its header describes {want:,} bytes" if want else ""
        return f"GGUF file {path} is truncated ({have:,} bytes{need}): download or copy it again"
    return f"corrupt GGUF file {path} ({detail})"


def field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def load_args(reader) -> ModelArgs:
    """ModelArgs from the GGUF metadata, each value type- and range-checked (one-line errors)."""
    arch = field(reader, "general.architecture")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported; blitzgen runs: {', '.join(ARCHITECTURES)} "
            "(Llama 2/3, Mistral, SmolLM2, TinyLlama, CodeLlama, Qwen2/2.5)"
        )
    where = "GGUF metadata"

    def key(k, default=None):
        return field(reader, f"{arch}.{k}", default)

    def num(k, default=None, kind=int):
        value = key(k, default)
        if kind is int:
            return check_int(where, f"{arch}.{k}", value)
        return check_float(where, f"{arch}.{k}", value)

    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = key("vocab_size") or (len(tokens.data) if tokens is not None else None)
    if None in (key("embedding_length"), key("attention.head_count"), key("block_count"),
                key("feed_forward_length"), vocab):
        raise ModelLoadError("GGUF metadata lacks the model's shape (embedding_length, head_count, block_count, "
                             "feed_forward_length, vocab_size or tokenizer tokens)")
    dim, n_heads = num("embedding_length"), num("attention.head_count")
    names = {t.name for t in reader.tensors}
    rope_scaling = None
    scaling_type = key("rope.scaling.type")
    if "rope_freqs.weight" in names:  # llama 3.1+: per-frequency divisors stored as a tensor
        t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        rope_scaling = {"rope_type": "freq_factors", "factors": [float(x) for x in np.asarray(t.data)]}
    elif scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": num("rope.scaling.factor", kind=float)}
    elif scaling_type not in (None, "none"):
        raise UnsupportedModelError(f"GGUF rope scaling {scaling_type!r} is not supported")
    head_dim = key("attention.key_length") or key("rope.dimension_count")
    if head_dim is None and dim % n_heads:
        raise ModelLoadError(f"{where}: {arch}.attention.head_count ({n_heads}) does not divide "
                             f"{arch}.embedding_length ({dim})")
    return ModelArgs(
        vocab_size=check_int(where, f"{arch}.vocab_size", vocab),
        dim=dim,
        n_layers=num("block_count"),
        n_heads=n_heads,
        n_kv_heads=num("attention.head_count_kv", n_heads),
        head_dim=check_int(where, f"{arch}.attention.key_length", head_dim) if head_dim is not None else None,
        intermediate_size=num("feed_forward_length"),
        norm_eps=num("attention.layer_norm_rms_epsilon", 1e-5, kind=float),
        rope_theta=num("rope.freq_base", 10000.0, kind=float),
        rope_scaling=rope_scaling,
        max_seq_len=num("context_length", 2048),
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

    column = "gguf"

    def __init__(self, reader, args: ModelArgs):
        import gguf

        self.args = args
        self.path = Path(reader.data.filename) if hasattr(reader.data, "filename") else Path("?")
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
            raise ModelLoadError(_damage(self.path, f"tensor {name}: {type(e).__name__}: {e}")) from None
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
