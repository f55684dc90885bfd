"""Model configuration: one dataclass for the whole Llama family.

Built from a Hugging Face config.json (``ModelArgs.from_hf_config``), from GGUF metadata (see
loading/gguf.py) or from a named benchmark shape (``ModelArgs.from_name``). Never parsed from file
names.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

from .errors import ModelLoadError, UnsupportedModelError

# model_type values of config.json that run on model.py as they are.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_SCALING = ("llama3", "linear", "freq_factors")  # freq_factors: GGUF rope_freqs
_ROPE_SCALING_KEYS = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                      "linear": ("factor",), "freq_factors": ("factors",)}
BENCH_MODES = ("bf16", "int8", "int4")  # `blitzgen bench --mode`
_REQUIRED_HF_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
_OPTIONAL_HF_INTS = ("num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window")
_HF_FLOATS = ("rms_norm_eps", "rope_theta")
_HF_BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window")


# ---- validation: every source (config.json, GGUF metadata, named shapes) goes through these -------
def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_int(where: str, key: str, value, minimum: int = 1) -> int:
    """value as an int >= minimum, else a one-line ModelLoadError naming where and key."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ModelLoadError(f"{where}: {key} must be {what}, got {_show(value)}")
    return int(value)


def check_float(where: str, key: str, value, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value \
            or (positive and value <= 0):
        raise ModelLoadError(f"{where}: {key} must be a {'positive ' if positive else ''}number, got {_show(value)}")
    return float(value)


def check_bool(where: str, key: str, value) -> bool:
    if not isinstance(value, bool):
        raise ModelLoadError(f"{where}: {key} must be true or false, got {_show(value)}")
    return value


def check_rope_scaling(where: str, key: str, value) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{where}: {key} must be an object or null, got {_show(value)}")
    kind = value.get("rope_type", value.get("type"))
    if kind in (None, "default"):
        return value
    if kind not in SUPPORTED_ROPE_SCALING:
        raise UnsupportedModelError(f"rope_scaling type {kind!r} is not supported "
                                    f"(supported: {', '.join(map(str, SUPPORTED_ROPE_SCALING))})")
    missing = [k for k in _ROPE_SCALING_KEYS[kind] if k not in value]
    if missing:
        raise ModelLoadError(f"rope_scaling of type {kind!r} lacks {', '.join(missing)}")
    for k in _ROPE_SCALING_KEYS[kind]:
        if k == "factors":
            if not isinstance(value[k], list) or not value[k]:
                raise ModelLoadError(f"{where}: {key}.factors must be a list of numbers")
            for x in value[k]:
                check_float(where, f"{key}.factors[]", x)
        else:
            check_float(where, f"{key}.{k}", value[k])
    return value


@dataclass
class ModelArgs:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_seq_len: int = 2048  # the model's trained context (max_position_embeddings)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 has biases on q, k and v
    model_type: str = "llama"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "model config") -> "ModelArgs":
        """Types and ranges of every field (one-line ModelLoadError), then the derived defaults."""
        for key in ("vocab_size", "dim", "n_layers", "n_heads", "intermediate_size", "max_seq_len"):
            check_int(where, key, getattr(self, key))
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        check_int(where, "n_kv_heads", self.n_kv_heads)
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ModelLoadError(f"{where}: the number of attention heads ({self.n_heads}) does not divide "
                                     f"the hidden size ({self.dim})")
            self.head_dim = self.dim // self.n_heads
        check_int(where, "head_dim", self.head_dim)
        if self.head_dim % 2:
            raise ModelLoadError(f"{where}: head_dim must be even for rotary embeddings, got {self.head_dim}")
        check_float(where, "norm_eps", self.norm_eps)
        check_float(where, "rope_theta", self.rope_theta)
        check_bool(where, "tie_word_embeddings", self.tie_word_embeddings)
        check_bool(where, "qkv_bias", self.qkv_bias)
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedModelError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        self.rope_scaling = check_rope_scaling(where, "rope_scaling", self.rope_scaling)
        if self.rope_scaling is not None and \
                self.rope_scaling.get("rope_type", self.rope_scaling.get("type")) in (None, "default"):
            self.rope_scaling = None
        return self

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        attn = self.dim * (self.q_size + 2 * self.kv_size) + self.q_size * self.dim
        if self.qkv_bias:
            attn += self.q_size + 2 * self.kv_size
        mlp = 3 * self.dim * self.intermediate_size
        per_layer = attn + mlp + 2 * self.dim
        emb = self.vocab_size * self.dim
        return self.n_layers * per_layer + emb * (1 if self.tie_word_embeddings else 2) + self.dim

    def prefill_flops(self, tokens: int) -> int:
        """Multiply-add FLOPs (2 per MAC) of a causal prefill of ``tokens`` tokens: the layers'
        linears for every token, attention over the causal triangle, the head for the last token."""
        linear = self.dim * (self.q_size + 2 * self.kv_size) + self.q_size * self.dim + 3 * self.dim * self.intermediate_size
        attention = 2 * self.q_size * tokens * (tokens + 1)  # QK^T and PV over T(T+1)/2 pairs, per layer
        return self.n_layers * (2 * linear * tokens + attention) + 2 * self.dim * self.vocab_size

    def replace(self, **kw) -> "ModelArgs":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf_config(cls, cfg: dict, where: str = "config.json") -> "ModelArgs":
        if not isinstance(cfg, dict):
            kind = {list: "an array", str: "a string", type(None): "null", bool: "a boolean"}.get(type(cfg), "a number")
            raise ModelLoadError(f"{where} must hold a JSON object, got {kind}")
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = cfg.get("architectures") or []
            raise UnsupportedModelError(
                f"model_type {model_type!r} ({', '.join(archs) or 'no architectures listed'}) is not "
                f"supported; blitzgen runs the Llama family: {', '.join(SUPPORTED_MODEL_TYPES)} "
                "(Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, SmolLM2, TinyLlama, CodeLlama)"
            )
        missing = [k for k in _REQUIRED_HF_KEYS if cfg.get(k) is None]
        if missing:
            raise ModelLoadError(f"{where} lacks {', '.join(missing)}")
        for k in _REQUIRED_HF_KEYS:
            check_int(where, k, cfg[k])
        for k in _OPTIONAL_HF_INTS:
            if cfg.get(k) is not None:
                check_int(where, k, cfg[k])
        for k in _HF_FLOATS:
            if cfg.get(k) is not None:
                check_float(where, k, cfg[k])
        for k in _HF_BOOLS:
            if cfg.get(k) is not None:
                check_bool(where, k, cfg[k])
        for k in ("rope_scaling", "rope_parameters"):
            if cfg.get(k) is not None and not isinstance(cfg[k], dict):
                raise ModelLoadError(f"{where}: {k} must be an object or null, got {_show(cfg[k])}")
        if cfg.get("head_dim") is None and cfg["hidden_size"] % cfg["num_attention_heads"]:
            raise ModelLoadError(f"{where}: num_attention_heads ({cfg['num_attention_heads']}) does not divide "
                                 f"hidden_size ({cfg['hidden_size']})")
        if cfg.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {cfg.get('hidden_act')!r} is not supported (only silu)")
        if cfg.get("mlp_bias"):
            raise UnsupportedModelError("mlp_bias=true is not supported")
        n_heads = cfg["num_attention_heads"]
        qkv_bias = bool(cfg.get("attention_bias", model_type == "qwen2"))
        # transformers >= 5 writes rope_parameters {rope_type, rope_theta, ...}; older: rope_theta + rope_scaling
        rope = cfg.get("rope_parameters") or {}
        rope_theta = rope.get("rope_theta", cfg.get("rope_theta"))
        rope_theta = 10000.0 if rope_theta is None else check_float(where, "rope_theta", rope_theta)
        if cfg.get("rope_parameters") is not None and rope.get("rope_type", "default") != "default":
            check_rope_scaling(where, "rope_parameters", rope)
        rope_scaling = cfg.get("rope_scaling")
        if rope.get("rope_type", "default") != "default":
            rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        max_seq_len = cfg.get("max_position_embeddings", 2048)
        window = cfg.get("sliding_window")
        if window and (model_type == "mistral" or cfg.get("use_sliding_window")):
            # Sliding-window attention is not implemented: within the window it equals full attention.
            max_seq_len = min(max_seq_len, int(window))
        check_rope_scaling(where, "rope_scaling", rope_scaling)
        return cls(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            intermediate_size=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_seq_len=max_seq_len,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            model_type=model_type,
        )

    def to_hf_config(self) -> dict:
        """The config.json transformers would write for this model (used by tests and checkpoints)."""
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
        cfg = dict(
            architectures=[arch[self.model_type]],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.dim,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate_size,
            rms_norm_eps=self.norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            max_position_embeddings=self.max_seq_len,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu",
        )
        if self.model_type == "llama":
            cfg["attention_bias"] = self.qkv_bias
        return cfg

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        key = name.lower()
        if key not in NAMED_SHAPES:
            raise UnsupportedModelError(
                f"unknown shape {name!r}; known shapes: {', '.join(sorted(NAMED_SHAPES))}"
            )
        return cls(**NAMED_SHAPES[key])


_L31 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192,
            rope_type="llama3")

# Benchmark shapes (random weights). Same shapes as gpt-fast's presets where both have one.
NAMED_SHAPES: dict[str, dict] = {
    "tiny": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=160,
                 max_seq_len=512),
    "smollm2-135m": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                         intermediate_size=1536, rope_theta=100000.0, max_seq_len=8192,
                         tie_word_embeddings=True),
    "llama-2-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, intermediate_size=11008,
                       max_seq_len=4096),
    "llama-2-13b": dict(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, intermediate_size=13824,
                        max_seq_len=4096),
    "llama-2-70b": dict(vocab_size=32000, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                        intermediate_size=28672, max_seq_len=4096),
    "codellama-7b": dict(vocab_size=32016, dim=4096, n_layers=32, n_heads=32, intermediate_size=11008,
                         rope_theta=1e6, max_seq_len=16384),
    "mistral-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                       intermediate_size=14336, rope_theta=1e6, max_seq_len=32768, model_type="mistral"),
    "llama-3-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                       intermediate_size=14336, rope_theta=500000.0, max_seq_len=8192),
    "llama-3-70b": dict(vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                        intermediate_size=28672, rope_theta=500000.0, max_seq_len=8192),
    "llama-3.1-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                         intermediate_size=14336, rope_theta=500000.0, max_seq_len=131072, rope_scaling=_L31),
    "llama-3.1-70b": dict(vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                          intermediate_size=28672, rope_theta=500000.0, max_seq_len=131072, rope_scaling=_L31),
    "llama-3.2-1b": dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                         intermediate_size=8192, rope_theta=500000.0, max_seq_len=131072,
                         tie_word_embeddings=True, head_dim=64,
                         rope_scaling=dict(_L31, factor=32.0)),
    "qwen2.5-7b": dict(vocab_size=152064, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                       intermediate_size=18944, rope_theta=1e6, max_seq_len=32768, qkv_bias=True,
                       norm_eps=1e-6, model_type="qwen2"),
}
