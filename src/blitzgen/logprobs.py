"""Token log-probabilities in OpenAI's shapes (chat ``logprobs.content`` and completions ``logprobs``).

What is reported: the log-softmax of the model's raw logits at each step, before temperature, top-k/p/min-p
and any grammar mask, i.e. the model's own distribution, as OpenAI reports it and as vLLM does by default
(its ``logprobs_mode="raw_logprobs"``; ``processed_logprobs`` is its opt-in for post-processing values).

On device, once per step, ``logprob_rows`` packs the chosen token's logprob and the top-k alternatives into
one small float32 row [B, 1 + 2k] (token ids are exact in float32 below 2**24), so the host reads them in
one transfer together with the sampled token. Use k = MAX_TOP_LOGPROBS in a compiled step (one graph for
every request) and slice on the host with ``unpack``.
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

from blitzgen.errors import InvalidRequestError

MAX_TOP_LOGPROBS = 20
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def validate_top_logprobs(top_logprobs: int | None, logprobs: bool = True) -> int:
    """OpenAI's rules: top_logprobs is 0..20 and needs logprobs=true."""
    if top_logprobs is None:
        return 0
    if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequestError(f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}", param="top_logprobs")
    if top_logprobs and not logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs to be true", param="top_logprobs")
    return top_logprobs


def logprob_rows(logits: Tensor, token: Tensor, k: int) -> Tensor:
    """logits [B, V] (raw), token [B] -> float32 [B, 1 + 2k]: [chosen logprob, k top logprobs, k top ids].
    Pure and static-shape (for a fixed k): it can sit in the compiled decode step beside the sampler."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # [B, V]
    chosen = lp.gather(-1, token.view(-1, 1).long())  # [B, 1]
    if k == 0:
        return chosen
    top_lp, top_ids = lp.topk(k, dim=-1)  # [B, k] each, best first
    return torch.cat([chosen, top_lp, top_ids.float()], dim=-1)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


def unpack(row, token_id: int, k: int) -> TokenLogprob:
    """One host row of ``logprob_rows`` (a list or CPU tensor, computed with some K >= k) -> TokenLogprob."""
    row = row.tolist() if isinstance(row, Tensor) else list(row)
    kk = (len(row) - 1) // 2
    if k > kk:
        raise ValueError(f"row holds {kk} alternatives, {k} asked")
    return TokenLogprob(int(token_id), float(row[0]), [(int(row[1 + kk + j]), float(row[1 + j])) for j in range(k)])


class TokenText:
    """Exact bytes and display text of single tokens (OpenAI's ``token`` and ``bytes`` fields)."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        rust = getattr(tokenizer, "_tok", None)
        self._byte_level = False
        if rust is not None:
            decoder = json.loads(rust.to_str()).get("decoder") or {}
            self._byte_level = "ByteLevel" in json.dumps(decoder)
        if self._byte_level:
            from blitzgen.tokenizer import _bytes_to_unicode

            self._inv = {c: b for b, c in _bytes_to_unicode().items()}
        self._cache: dict[int, bytes] = {}

    def bytes(self, token_id: int) -> bytes:
        b = self._cache.get(token_id)
        if b is None:
            b = self._cache[token_id] = self._bytes(token_id)
        return b

    def _bytes(self, i: int) -> bytes:
        rust = getattr(self._tok, "_tok", None)
        piece = rust.id_to_token(i) if rust is not None else None
        if piece is None:
            return self._tok.decode([i]).encode()
        if self._tok.is_special(i):
            return piece.encode()
        m = _BYTE_TOKEN.fullmatch(piece)
        if m:  # SentencePiece byte fallback
            return bytes([int(m.group(1), 16)])
        if self._byte_level and all(c in self._inv for c in piece):
            return bytes(self._inv[c] for c in piece)
        return piece.replace("\u2581", " ").encode()  # SentencePiece word boundary

    def text(self, token_id: int) -> str:
        """The token as text; bytes that are not whole UTF-8 characters show as '\\xNN' (as OpenAI does)."""
        return self.bytes(token_id).decode("utf-8", errors="backslashreplace")


def chat_content(steps: list[TokenLogprob], token_text: TokenText) -> list[dict]:
    """Chat Completions: ``choices[i].logprobs = {"content": chat_content(...)}`` (one entry per token)."""
    def entry(tid, lp):
        b = token_text.bytes(tid)
        return {"token": token_text.text(tid), "logprob": lp, "bytes": list(b)}

    return [{**entry(s.token_id, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top]} for s in steps]


class CompletionLogprobs:
    """Completions: ``choices[i].logprobs`` = {tokens, token_logprobs, top_logprobs, text_offset}.

    ``add`` the steps in order (text_offset counts characters of the generated text from ``offset``,
    e.g. the prompt's length under echo); ``take()`` returns what was added since the last take,
    which is a streamed chunk's logprobs, or the whole answer when called once at the end."""

    def __init__(self, token_text: TokenText, offset: int = 0):
        self._text = token_text
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._offset = offset
        self._pending: list[tuple[str, float, dict | None, int]] = []

    def add(self, step: TokenLogprob, with_top: bool = True) -> None:
        tops = None
        if with_top:
            tops = {}
            for tid, lp in step.top:
                tops.setdefault(self._text.text(tid), lp)  # OpenAI keys by token text; keep the best
        self._pending.append((self._text.text(step.token_id), step.logprob, tops, self._offset))
        self._offset += len(self._utf8.decode(self._text.bytes(step.token_id)))

    def take(self) -> dict:
        p, self._pending = self._pending, []
        return {"tokens": [t for t, _, _, _ in p], "token_logprobs": [lp for _, lp, _, _ in p],
                "top_logprobs": [tops for _, _, tops, _ in p], "text_offset": [o for _, _, _, o in p]}
