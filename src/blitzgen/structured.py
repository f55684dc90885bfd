"""Grammar-constrained decoding: OpenAI's ``response_format`` (json_object / json_schema) with xgrammar.

Why xgrammar: measured on the CPU with SmolLM2's 49152-token vocabulary (benchmarks/structured_overhead.py),
its next-token mask takes ~2 us (median) against ~20-40 us for llguidance and a 1.3 s schema compile for
outlines-core; its cost moves to compiling the schema (~40-80 ms), which its compiler caches per schema.

One request = one ``GrammarConstraint``. Per decode step::

    constraint.fill_mask(host_bitmask)   # CPU: int32 [1, ceil(V/32)], one bit per token
    device_bitmask.copy_(host_bitmask, non_blocking=True)
    logits = apply_token_bitmask(logits, device_bitmask)  # on the logits' device, static shapes
    token = sample(logits)
    constraint.advance(token)

``apply_token_bitmask`` is plain torch with static shapes, so it goes inside the compiled decode step (or
CUDA graph) as one more op with the bitmask as an extra input; an all-ones bitmask (``-1`` words) leaves
the logits unchanged. ``GrammarConstraint.apply(logits)`` does the three first lines for simple loops.
"""

from __future__ import annotations

import json
import re
import threading
import weakref

import torch
from torch import Tensor

from blitzgen.errors import BlitzgenError, InvalidRequestError

class StructuredOutputError(InvalidRequestError):
    """A response_format the grammar library rejects (bad schema, unsupported keyword): a 400."""

    def __init__(self, message: str, param: str | None = "response_format"):
        super().__init__(message, param=param)


class GrammarUnavailableError(BlitzgenError):
    """The grammar library is not installed."""


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allocate_bitmask(vocab_size: int, device="cpu") -> Tensor:
    """An all-allowed bitmask, int32 [1, ceil(V/32)] (pinned on the host when CUDA is present)."""
    pin = torch.device(device).type == "cpu" and torch.cuda.is_available()
    return torch.full((1, bitmask_words(vocab_size)), -1, dtype=torch.int32, device=device, pin_memory=pin)


def apply_token_bitmask(logits: Tensor, bitmask: Tensor) -> Tensor:
    """logits [B, V] with disallowed tokens set to -inf; bitmask int32 [B, ceil(V/32)] (bit j of word i
    allows token 32*i+j). Pure and static-shape: safe inside torch.compile and CUDA graphs."""
    vocab = logits.shape[-1]
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., :vocab].bool()  # [B, V]
    return logits.masked_fill(~allowed, float("-inf"))


def _library():
    try:
        import xgrammar
    except ImportError as e:
        raise GrammarUnavailableError(
            f"structured output needs the xgrammar package ({e}): pip install 'blitzgen[serve]'") from None
    return xgrammar


def _clean(message: str) -> str:
    """xgrammar's C++ messages start with '[hh:mm:ss] /path/file.cc:123: '; keep the words after it."""
    return re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", str(message).strip()).splitlines()[0] if message else "invalid"


class _Compiler:
    """Per tokenizer: xgrammar's TokenizerInfo and a caching GrammarCompiler (built once, ~1-3 s)."""

    def __init__(self, tokenizer, vocab_size: int):
        xgr = _library()
        from transformers import PreTrainedTokenizerFast  # xgrammar depends on transformers

        rust = tokenizer._tok
        stops = list(tokenizer.eos_token_ids)
        # Ask xgrammar how the vocabulary is spelled (byte-level, byte-fallback...) the public way,
        # then blank the special tokens, which xgrammar would otherwise match as literal text:
        # a blank token can never be produced, except the stop tokens, which end the grammar.
        probe = xgr.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_object=rust),
                                                   vocab_size=vocab_size, stop_token_ids=stops or None)
        vocab = [""] * vocab_size
        for piece, i in rust.get_vocab(with_added_tokens=True).items():
            if i < vocab_size and not tokenizer.is_special(i):
                vocab[i] = piece
        self.info = xgr.TokenizerInfo(vocab, probe.vocab_type, vocab_size=vocab_size,
                                      stop_token_ids=stops or probe.stop_token_ids,
                                      add_prefix_space=probe.add_prefix_space)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=True)
        self.vocab_size = vocab_size


_compilers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _compiler_for(tokenizer, vocab_size: int | None) -> _Compiler:
    vocab_size = vocab_size or tokenizer.vocab_size
    with _lock:
        per_tok = _compilers.setdefault(tokenizer, {})
        if vocab_size not in per_tok:
            per_tok[vocab_size] = _Compiler(tokenizer, vocab_size)
        return per_tok[vocab_size]


def json_schema_of(response_format) -> tuple[dict | None, bool] | None:
    """Validate an OpenAI response_format; return (schema, strict), with schema None for json_object,
    or None for "text"/absent. Raises StructuredOutputError for a malformed one."""
    if response_format is None:
        return None
    if hasattr(response_format, "model_dump"):  # a pydantic model from the server's protocol
        response_format = response_format.model_dump(exclude_none=True, by_alias=True)
    if not isinstance(response_format, dict):
        raise StructuredOutputError("response_format must be an object")
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return None, False
    if kind != "json_schema":
        raise StructuredOutputError(f"response_format.type must be 'text', 'json_object' or 'json_schema', not {kind!r}")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise StructuredOutputError("response_format.json_schema must be an object with 'name' and 'schema'")
    schema = spec.get("schema", {})
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise StructuredOutputError(f"response_format.json_schema.schema is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise StructuredOutputError("response_format.json_schema.schema must be a JSON Schema object")
    return schema, bool(spec.get("strict", False))


class GrammarConstraint:
    """The grammar state of one request: which tokens may come next, advanced token by token."""

    def __init__(self, matcher, vocab_size: int, stop_token_ids: list[int]):
        self._matcher = matcher
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self._host = None  # lazily allocated buffers for apply()
        self._device: dict = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_response_format(cls, response_format, tokenizer, vocab_size: int | None = None) -> GrammarConstraint | None:
        """The constraint for OpenAI's response_format, or None for {"type": "text"} / None.
        vocab_size: the logits' width when it exceeds the tokenizer's (padded embeddings)."""
        parsed = json_schema_of(response_format)
        if parsed is None:
            return None
        schema, strict = parsed
        return cls.from_json_schema(schema, tokenizer, vocab_size=vocab_size, strict=strict)

    @classmethod
    def from_json_schema(cls, schema: dict | bool | None, tokenizer, vocab_size: int | None = None,
                         strict: bool = False, param: str = "response_format") -> GrammarConstraint:
        """schema None = any JSON object (json_object mode). Whitespace is fixed to ', ' and ': ' with
        no newlines, so a small model cannot wander in endless whitespace. strict=True forbids
        properties the schema does not list (OpenAI's strict mode)."""
        comp = _compiler_for(tokenizer, vocab_size)
        if schema is None:
            schema, strict = {"type": "object"}, False
        try:
            text = json.dumps(schema)
        except (TypeError, ValueError) as e:
            raise StructuredOutputError(f"the JSON schema cannot be serialized: {e}", param=param) from None
        try:
            grammar = comp.compiler.compile_json_schema(text, any_whitespace=False, separators=(", ", ": "),
                                                        strict_mode=strict)
        except (RuntimeError, ValueError, TypeError) as e:
            raise StructuredOutputError(f"unsupported JSON schema: {_clean(str(e))}", param=param) from None
        xgr = _library()
        return cls(xgr.GrammarMatcher(grammar), comp.vocab_size, comp.info.stop_token_ids)

    # ------------------------------------------------------------------ per step
    def fill_mask(self, bitmask: Tensor) -> None:
        """Write the allowed next tokens into a CPU int32 bitmask [1, ceil(V/32)] (or [ceil(V/32)])."""
        self._matcher.fill_next_token_bitmask(bitmask if bitmask.dim() == 2 else bitmask.unsqueeze(0))

    def apply(self, logits: Tensor) -> Tensor:
        """Mask logits [B, V] (or [V]) on their device: fill a host bitmask, copy it over, apply there."""
        if self._host is None:
            self._host = allocate_bitmask(self.vocab_size)
        self.fill_mask(self._host)
        dev = logits.device
        flat = logits.dim() == 1
        rows = logits.unsqueeze(0) if flat else logits
        if dev.type == "cpu":  # xgrammar's C++ kernel: ~2.5x faster than the torch ops, eager on the CPU
            out = rows.clone()
            _library().apply_token_bitmask_inplace(out, self._host.expand(out.shape[0], -1).contiguous())
        else:
            mask = self._device.get(dev)
            if mask is None:
                mask = self._device[dev] = torch.empty_like(self._host, device=dev)
            mask.copy_(self._host, non_blocking=True)
            out = apply_token_bitmask(rows, mask)
        return out[0] if flat else out

    def advance(self, token_id: int) -> bool:
        """Consume the sampled token; False if the grammar does not allow it (nothing changes then)."""
        return bool(self._matcher.accept_token(int(token_id)))

    def is_terminated(self) -> bool:
        """True once a stop token was accepted at the end of a complete document."""
        return bool(self._matcher.is_terminated())

    def is_complete(self) -> bool:
        """True when the text so far is a complete document (a stop token may come next)."""
        return bool(self._matcher.is_completed())

    def reset(self) -> None:
        self._matcher.reset()
