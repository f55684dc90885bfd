"""Per-choice shaping of generated text into OpenAI's fields: tool calls and logprobs.

``ChoiceShaper`` sits between the engine's events and ``ResponseBuilder``: with tools in play it parses
the model's tool-call markup (``tool_calls``, ``finish_reason: "tool_calls"``), streamed through
``ToolCallStreamParser``; with logprobs on it turns the decoder's per-token steps into the endpoint's
shape (chat ``{"content": [...]}``, completions ``{tokens, token_logprobs, top_logprobs, text_offset}``).
"""

from __future__ import annotations

from .. import constrained
from ..logprobs import CompletionLogprobs, TokenText, chat_content
from ..errors import InvalidRequestError
from ..tool_calls import (ToolCallStreamParser, detect_format, forced_schema, parse_forced, parse_tool_calls,
                          start_marker)
from .protocol import GenerationRequest


class ChoiceShaper:
    """Shapes every choice of one request (choices are generated one after another)."""

    def __init__(self, req: GenerationRequest, tokenizer):
        self.kind = req.kind
        self.tool_mode = None  # None | "auto" | "forced"
        if req.kind == "chat" and req.calls_tools:
            self.tool_mode = "auto" if req.tool_choice == "auto" else "forced"
            self.fmt = detect_format(getattr(tokenizer, "chat_template", None))
        self.tool_choice = req.tool_choice
        self.tools, self.parallel_tool_calls = req.tools, req.parallel_tool_calls
        self.response_format = req.response_format
        self.logprobs = req.logprobs
        self.top = req.top_logprobs
        self._token_text = TokenText(tokenizer) if req.logprobs else None
        self._parsers: dict[int, ToolCallStreamParser] = {}
        self._forced_text: dict[int, list[str]] = {}
        self._completion_lp: dict[int, CompletionLogprobs] = {}

    def keep_special(self, tokenizer) -> bool:
        """Whether the tool-call marker the model writes is a special token (Llama 3.1's <|python_tag|>,
        Mistral's [TOOL_CALLS]), which plain detokenization drops: then the text keeps special tokens."""
        if self.tool_mode != "auto" or not hasattr(tokenizer, "is_special"):
            return False
        ids = tokenizer.encode(start_marker(self.fmt), add_special_tokens=False)
        return len(ids) == 1 and tokenizer.is_special(ids[0])

    def constraint(self, tokenizer, vocab_size: int):
        """The grammar this request decodes under (tool_choice required/named, else response_format), or
        None. Compiling it may take a while: call it off the event loop. A rejected schema: a 400."""
        from ..structured import GrammarConstraint, GrammarUnavailableError

        try:
            if self.tool_mode == "forced":
                schema = forced_schema(self.tools, self.tool_choice, self.parallel_tool_calls)
                return GrammarConstraint.from_json_schema(schema, tokenizer, vocab_size, param="tool_choice")
            if self.response_format is not None:
                return GrammarConstraint.from_response_format(self.response_format, tokenizer, vocab_size)
        except GrammarUnavailableError as e:
            raise InvalidRequestError(f"structured output is not available on this server: {e}",
                                      param="tool_choice" if self.tool_mode else "response_format") from None
        return None

    def decoder(self, tokenizer, constraint=None):
        """The Job's `decode` for this request (constrained.py's loop), or None for the plain fast path."""
        keep = self.keep_special(tokenizer)
        if not (self.logprobs or keep or constraint is not None):
            return None
        return constrained.decoder(top_logprobs=self.top if self.logprobs else None, constraint=constraint,
                                   keep_special=keep)

    # ---- logprobs ----------------------------------------------------------------------------------
    def _lp(self, index: int, steps) -> dict | None:
        if not self.logprobs or steps is None:
            return None
        if self.kind == "chat":
            return {"content": chat_content(steps, self._token_text)}
        acc = self._completion_lp.setdefault(index, CompletionLogprobs(self._token_text))
        for s in steps:
            acc.add(s)
        return acc.take()

    def whole_logprobs(self, index: int, steps) -> dict | None:
        return self._lp(index, steps if steps is not None else [])

    # ---- streaming ---------------------------------------------------------------------------------
    def piece(self, index: int, text: str, steps=None) -> list[dict]:
        """Keyword arguments of ResponseBuilder.chunk for one piece of generated text (and its tokens'
        logprob steps); [] when there is nothing to send yet."""
        lp = self._lp(index, steps) if steps else None
        if self.tool_mode == "forced":  # the call is JSON under a grammar: sent whole at the end
            self._forced_text.setdefault(index, []).append(text)
            out = []
        elif self.tool_mode == "auto":
            parser = self._parsers.setdefault(index, ToolCallStreamParser(self.fmt))
            out = [self._delta(d) for d in parser.feed(text)] if text else []
        else:
            out = [{"text": text}] if text else []
        if lp is not None:
            if out:
                out[0]["logprobs"] = lp
            else:
                out = [{"text": "" if self.kind == "completion" else None, "logprobs": lp}]
        return out

    def finish(self, index: int, finish_reason: str) -> tuple[list[dict], str]:
        """The last pieces of a streamed choice and its finish reason."""
        out: list[dict] = []
        if self.tool_mode == "forced":
            calls = self._forced_calls("".join(self._forced_text.pop(index, [])))
            if calls:
                out.append({"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]})
                finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
        elif self.tool_mode == "auto":
            parser = self._parsers.pop(index, None)
            if parser is not None:
                out = [self._delta(d) for d in parser.finish()]
                if parser.called and finish_reason == "stop":
                    finish_reason = "tool_calls"
        return out, finish_reason

    @staticmethod
    def _delta(d: dict) -> dict:
        return {"text": d["content"]} if "content" in d else {"tool_calls": d["tool_calls"]}

    # ---- whole responses ---------------------------------------------------------------------------
    def whole(self, index: int, text: str, finish_reason: str, steps=None) -> tuple:
        """(content, finish_reason, extra) of a non-streamed choice."""
        extra: dict = {}
        if self.logprobs:
            extra["logprobs"] = self.whole_logprobs(index, steps)
        if self.tool_mode == "forced":
            calls = self._forced_calls(text)
            if calls:
                extra["tool_calls"] = calls
                return None, ("tool_calls" if finish_reason == "stop" else finish_reason), extra
        elif self.tool_mode == "auto":
            content, calls = parse_tool_calls(text, self.fmt)
            if calls:
                extra["tool_calls"] = calls
                return content, ("tool_calls" if finish_reason == "stop" else finish_reason), extra
        return text, finish_reason, extra

    def _forced_calls(self, text: str) -> list[dict]:
        try:
            return parse_forced(text, self.tool_choice)
        except (ValueError, KeyError, TypeError):  # cut short by max_tokens: not a whole call
            return []
