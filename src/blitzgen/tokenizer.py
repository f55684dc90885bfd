"""Tokenizers for HF model dirs and GGUF files, chat templates, and streaming detokenization.

Both sources end up as one `tokenizers.Tokenizer` (the Rust library), so encode/decode are fast and
identical in behaviour. A GGUF carries no `tokenizer.json`; we rebuild one from llama.cpp's metadata:

* ``tokenizer.ggml.model == "gpt2"``: byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM...). The text
  is split by the regex that ``tokenizer.ggml.pre`` names (as llama.cpp does), then byte-level BPE.
* ``tokenizer.ggml.model == "llama"``: SentencePiece-style BPE with byte fallback (Llama 2,
  TinyLlama, Mistral v0.1...). The file has scores, not merges; merges are recovered from the
  scores like transformers' GGUF converter does.

BOS is never added by the `tokenizers` post-processor: `Tokenizer.encode` prepends it itself when
`add_bos` says so, which keeps the HF-dir and GGUF paths identical.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _RustTokenizer
from tokenizers.models import BPE

from blitzgen.errors import InvalidRequestError, ModelLoadError, UnsupportedModelError

log = logging.getLogger(__name__)

# llama.cpp's token types (gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Split regexes of llama.cpp's BPE pre-tokenizers (llama-vocab.cpp), keyed by `tokenizer.ggml.pre`.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2 = "gpt2"  # ByteLevel's own regex
_DIGITS_GPT2 = "digits"  # each digit alone, then the GPT-2 regex
_PRE_SPLITS = {
    **dict.fromkeys(("default", "gpt2", "gpt-2", "mpt", "olmo", "jais"), _GPT2),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"), _DIGITS_GPT2),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), _QWEN2),
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used to spell byte-level BPE tokens."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _field(reader, key: str, default=None):
    """A GGUF metadata value as plain Python (str, int, float, bool or list), or `default`.
    (loading.gguf.field does the same; importing it here would pull torch into the tokenizer.)"""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _merges_from_scores(tokens: list[str], scores: list[float], mergeable: set[int]) -> list[tuple[str, str]]:
    """Recover BPE merges from SentencePiece scores: every split of a piece into two vocab pieces is a
    merge, ranked by the merged piece's score (best first), as transformers' `generate_merges` does."""
    vocab = {t: i for i, t in enumerate(tokens) if i in mergeable}
    found = []
    for piece, idx in vocab.items():
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        found.extend((lr[0], lr[1], scores[idx]) for lr in local)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


class Tokenizer:
    """Text <-> token ids, chat templates, and the model's special/stop tokens."""

    def __init__(self, tok: _RustTokenizer, *, bos_token_id: int | None, eos_token_ids: list[int], add_bos: bool,
                 chat_template: str | None, special_ids: set[int], vocab_size: int,
                 token_strings: dict[str, str | None] | None = None):
        self._tok = tok
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(dict.fromkeys(i for i in eos_token_ids if i is not None))
        self.add_bos = bool(add_bos and bos_token_id is not None)
        self.chat_template = chat_template or None
        self.vocab_size = vocab_size
        self._special_ids = set(special_ids)
        self._template = None  # compiled lazily
        tid = self._tok.id_to_token
        # strings the chat template sees as bos_token, eos_token...
        self._token_strings = token_strings or {
            "bos_token": tid(bos_token_id) if bos_token_id is not None else None,
            "eos_token": tid(self.eos_token_ids[0]) if self.eos_token_ids else None,
        }
        self._token_strings = {k: v for k, v in self._token_strings.items() if v is not None}
        self.bos_token = self._token_strings.get("bos_token")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_hf_dir(cls, path) -> Tokenizer:
        """Load `tokenizer.json` plus `tokenizer_config.json`, `chat_template.jinja` and `generation_config.json`."""
        path = os.fspath(path)
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            raise ModelLoadError(f"{path}: no tokenizer.json (only fast tokenizers are supported)")
        try:
            tok = _RustTokenizer.from_file(tj)
        except Exception as e:
            raise ModelLoadError(f"{tj}: cannot load tokenizer: {e}") from e

        def load(name):  # a JSON file as a dict, any other file as text; {} / None when absent
            p = os.path.join(path, name)
            is_json = name.endswith(".json")
            if not os.path.isfile(p):
                return {} if is_json else None
            try:
                with open(p, encoding="utf-8") as fh:
                    return json.load(fh) if is_json else fh.read()
            except (OSError, UnicodeDecodeError, ValueError) as e:
                raise ModelLoadError(f"{p}: cannot read: {e}") from None

        cfg, gen, stm = load("tokenizer_config.json"), load("generation_config.json"), load("special_tokens_map.json")

        def token_str(name):
            v = cfg.get(name, stm.get(name))
            return v.get("content") if isinstance(v, dict) else v

        strings = {k: token_str(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        ids = {k: (tok.token_to_id(v) if v else None) for k, v in strings.items()}
        bos = ids["bos_token"] if ids["bos_token"] is not None else gen.get("bos_token_id")
        gen_eos = gen.get("eos_token_id")
        eos = [ids["eos_token"]] + (gen_eos if isinstance(gen_eos, list) else [gen_eos])

        template = load("chat_template.jinja") or load("chat_template.json").get("chat_template") \
            or cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default", next(iter(named.values()), None))

        if "add_bos_token" in cfg:
            add_bos = bool(cfg["add_bos_token"])
        else:  # ask the post-processor whether it prepends BOS
            probe = tok.encode("a", add_special_tokens=True).ids
            add_bos = bos is not None and bool(probe) and probe[0] == bos
        special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        for i, t in (cfg.get("added_tokens_decoder") or {}).items():
            if t.get("special"):
                special.add(int(i))
        return cls(tok, bos_token_id=bos, eos_token_ids=eos, add_bos=add_bos, chat_template=template,
                   special_ids=special, vocab_size=tok.get_vocab_size(with_added_tokens=True),
                   token_strings=strings)

    @classmethod
    def from_gguf(cls, reader) -> Tokenizer:
        """Build the tokenizer a GGUF file's metadata describes; `reader` is an open `gguf.GGUFReader`."""
        kind = _field(reader, "tokenizer.ggml.model")
        tokens = _field(reader, "tokenizer.ggml.tokens")
        if kind is None or not tokens:
            raise ModelLoadError("GGUF file has no tokenizer metadata (tokenizer.ggml.model / tokens)")
        types = _field(reader, "tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
        if kind == "gpt2":
            tok = _gguf_byte_level(reader, tokens, types)
            default_add_bos = False
        elif kind == "llama":
            tok = _gguf_sentencepiece(reader, tokens, types)
            default_add_bos = True
        else:
            raise UnsupportedModelError(
                f"unsupported GGUF tokenizer kind {kind!r} (tokenizer.ggml.model); supported: 'gpt2', 'llama'")

        # Control/unknown tokens are special; user-defined ones (e.g. "<think>") are matched whole but not special.
        special = [i for i, t in enumerate(types) if t in (_CONTROL, _UNKNOWN)]
        tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
        tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                        for i, t in enumerate(types) if t == _USER_DEFINED])

        def tid(name):
            v = _field(reader, f"tokenizer.ggml.{name}_token_id")
            return v if v is not None and 0 <= v < len(tokens) else None

        bos = tid("bos")
        eos = [tid("eos"), tid("eot"), tid("eom")]
        strings = {f"{n}_token": (tokens[tid(k)] if tid(k) is not None else None)
                   for n, k in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))}
        return cls(tok, bos_token_id=bos, eos_token_ids=eos,
                   add_bos=_field(reader, "tokenizer.ggml.add_bos_token", default_add_bos),
                   chat_template=_field(reader, "tokenizer.chat_template"), special_ids=set(special),
                   vocab_size=len(tokens), token_strings=strings)

    def save_pretrained(self, path) -> None:
        """Write tokenizer.json, tokenizer_config.json and generation_config.json so that
        ``Tokenizer.from_hf_dir(path)`` rebuilds this tokenizer (used by quantized checkpoints)."""
        os.makedirs(path, exist_ok=True)
        self._tok.save(os.path.join(path, "tokenizer.json"))
        cfg = {k: v for k, v in self._token_strings.items()}
        cfg["add_bos_token"] = self.add_bos
        cfg["added_tokens_decoder"] = {str(i): {"content": self._tok.id_to_token(i), "special": True}
                                       for i in sorted(self._special_ids)}
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as fh:
            json.dump(cfg, fh, indent=2, ensure_ascii=False)
        gen = {"eos_token_id": self.eos_token_ids}
        if self.bos_token_id is not None:
            gen["bos_token_id"] = self.bos_token_id
        with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as fh:
            json.dump(gen, fh, indent=2)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special token strings in it become their ids. BOS is prepended iff
        `add_special_tokens` and the model wants BOS (`add_bos`)."""
        # encode_batch releases the GIL (encode does not): a long prompt does not stall other threads
        ids = self._tok.encode_batch([text], add_special_tokens=False)[0].ids
        return [self.bos_token_id, *ids] if add_special_tokens and self.add_bos else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens)

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kw) -> str:
        """Render `messages` with the model's Jinja chat template, as transformers does. Content may be a
        string or a list of ``{"type": "text", "text": ...}`` parts (joined with newlines)."""
        if not self.chat_template:
            raise InvalidRequestError("this model has no chat template; use a plain completion prompt instead",
                                      param="messages")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise InvalidRequestError("messages must be a non-empty list", param="messages")
        msgs = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                raise InvalidRequestError(f"messages[{i}] must be an object with 'role' and 'content'",
                                          param="messages")
            msgs.append({**m, "content": _content_text(m["content"], i)})
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        try:
            return self._template.render(messages=msgs, add_generation_prompt=add_generation_prompt,
                                         **{"tools": None, "documents": None, **self._token_strings, **kw})
        except jinja2.TemplateError as e:
            raise InvalidRequestError(f"chat template error: {e}", param="messages") from e

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Render and tokenize a conversation; BOS is added only if the template did not write it."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        has_bos = bool(self.bos_token) and text.startswith(self.bos_token)
        return self.encode(text, add_special_tokens=not has_bos)


def _content_text(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequestError(f"messages[{i}].content: only text parts are supported",
                                          param="messages")
            texts.append(part["text"])
        return "\n".join(texts)
    raise InvalidRequestError(f"messages[{i}].content must be a string or a list of text parts", param="messages")


def _compile_template(source: str):
    """Compile a chat template in the sandbox transformers uses, with the same helper globals."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ModelLoadError(f"the model's chat template does not parse: {e}") from e


def _gguf_byte_level(reader, tokens: list[str], types: list[int]) -> _RustTokenizer:
    """Byte-level BPE (`tokenizer.ggml.model == "gpt2"`)."""
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty not in (_CONTROL, _USER_DEFINED, _UNKNOWN) and not set(t) <= alphabet:
            t = "".join(spelling[b] for b in t.encode("utf-8"))  # stored raw: respell in the byte alphabet
        vocab.setdefault(t, i)
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges") or []]
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    split = _PRE_SPLITS.get(pre)
    if split is None:
        log.warning("unknown GGUF pre-tokenizer %r; falling back to the GPT-2 regex", pre)
        split = _GPT2
    tok = _RustTokenizer(BPE(vocab, merges, ignore_merges=split == _LLAMA3))
    if split in (_GPT2, _DIGITS_GPT2):
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        if split == _DIGITS_GPT2:
            steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    else:
        steps = [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    return tok


def _gguf_sentencepiece(reader, tokens: list[str], types: list[int]) -> _RustTokenizer:
    """SentencePiece-style BPE with byte fallback (`tokenizer.ggml.model == "llama"`)."""
    scores = _field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    merges = _field(reader, "tokenizer.ggml.merges")
    if merges:
        merges = [tuple(m.split(" ", 1)) for m in merges]
    else:
        mergeable = {i for i, t in enumerate(types) if t in (_NORMAL, _USER_DEFINED)}
        merges = _merges_from_scores(tokens, scores, mergeable)
    unk = _field(reader, "tokenizer.ggml.unknown_token_id")
    unk_token = tokens[unk] if unk is not None and 0 <= unk < len(tokens) else None
    tok = _RustTokenizer(BPE(vocab, merges, unk_token=unk_token, fuse_unk=True, byte_fallback=True))
    prefix = _field(reader, "tokenizer.ggml.add_space_prefix", True)
    replace = normalizers.Replace(" ", "▁")
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), replace]) if prefix else replace
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas.

    Each step decodes a short window (`prefix_offset:`) and emits the part past the text already
    emitted for that window's prefix (`prefix_offset:read_offset`), the technique of vLLM and HF's
    TextStreamer. Decoding a window with context keeps SentencePiece leading spaces right, and text
    ending in U+FFFD (an incomplete UTF-8 character) is held back until the next token completes it.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self.token_ids: list[int] = []
        self._chunks: list[str] = []
        self._prefix_offset = 0
        self._read_offset = 0

    @property
    def text(self) -> str:
        if len(self._chunks) > 1:
            self._chunks[:] = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self.token_ids[start:end], skip_special_tokens=self._skip)

    def add(self, token_id: int) -> str:
        """Append one token; return the newly completed text (possibly "")."""
        self.token_ids.append(int(token_id))
        prefix = self._decode(self._prefix_offset, self._read_offset)
        full = self._decode(self._prefix_offset)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        self._chunks.append(delta)
        return delta

    def flush(self) -> str:
        """Emit whatever is still held back (e.g. an incomplete character at the end)."""
        prefix = self._decode(self._prefix_offset, self._read_offset)
        full = self._decode(self._prefix_offset)
        delta = full[len(prefix):] if len(full) > len(prefix) else ""
        self._prefix_offset = self._read_offset = len(self.token_ids)
        if delta:
            self._chunks.append(delta)
        return delta


def find_stop(text: str, stops: list[str]) -> int:
    """Index of the earliest occurrence of any stop string in `text`, or -1."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else -1


def stop_holdback(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string: that much
    text must be held back, since the next tokens may complete a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
