"""Token ids in, text out: incremental detokenization plus stop strings, apart from the token loop.

``TextStream.add(token_id)`` returns the text that is safe to show now. Two things are held back:
an incomplete UTF-8 character at the end (the detokenizer decodes it as U+FFFD until the next
token completes it) and a suffix that may be the start of a stop string. ``finish()`` returns the
rest when generation ends: a stop string's text is never emitted, and an incomplete character left
by the last token (cut by max_tokens) is dropped rather than shown as U+FFFD.
"""

from __future__ import annotations

from typing import Sequence

from .tokenizer import find_stop, stop_holdback


class TextStream:
    def __init__(self, tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = True):
        self._detok = tokenizer.detokenizer(skip_special_tokens)
        self._stops = [s for s in stop if s]
        self._pending = ""  # text held back because it may start a stop string
        self.stopped = False  # a stop string was found; nothing more is emitted

    def add(self, token_id: int) -> str:
        """Feed one token; return the text that can be emitted now (possibly "")."""
        if self.stopped:
            return ""
        self._pending += self._detok.add(token_id)
        return self._release()

    def finish(self) -> str:
        """The text still held back, once no more tokens come."""
        if self.stopped:
            return ""
        self._pending += self._detok.flush().rstrip("\ufffd")
        return self._release(final=True)

    def _release(self, final: bool = False) -> str:
        text = self._pending
        if self._stops:
            cut = find_stop(text, self._stops)
            if cut >= 0:
                self.stopped = True
                self._pending = ""
                return text[:cut]
            if not final:
                hold = stop_holdback(text, self._stops)
                self._pending = text[len(text) - hold:] if hold else ""
                return text[: len(text) - hold]
        self._pending = ""
        return text
