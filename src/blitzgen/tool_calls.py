"""OpenAI tool calls: tools through the model's own chat template, and its output parsed back.

- ``render_prompt`` validates ``tools``/``tool_choice``, turns OpenAI messages (assistant ``tool_calls``,
  ``tool`` results with ``tool_call_id``) into what chat templates expect, and renders them with
  ``tools=`` in the template context, as transformers' ``apply_chat_template(tools=...)`` does.
- ``parse_tool_calls`` / ``ToolCallStreamParser`` read the formats chat templates teach their models:
  Hermes / Qwen2.5 ``<tool_call>{json}</tool_call>``, Llama 3.1 ``{"name": ..., "parameters": ...}``
  (optionally after ``<|python_tag|>``), Mistral ``[TOOL_CALLS][{...}, ...]``. Parse text decoded with
  special tokens kept: several of these markers are special tokens.
- ``required`` / a named function are enforced with a grammar (blitzgen.structured): ``forced_schema``
  is the JSON the model must write (as vLLM does: an array of {name, arguments} for ``required``,
  the function's arguments for a named one), and ``parse_forced`` turns that JSON into tool calls.
"""

from __future__ import annotations

import json
import re
import uuid

from blitzgen.errors import InvalidRequestError

FORMATS = ("hermes", "llama3", "mistral")
_START = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]", "llama3": "<|python_tag|>"}
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def start_marker(fmt: str) -> str:
    """The text that opens the tool calls of a format (a special token in some vocabularies)."""
    return _START[fmt]


def supports_tools(chat_template: str | None) -> bool:
    """Whether a chat template renders the ``tools`` variable (Qwen2.5, Llama 3.1, Mistral, Hermes...)."""
    return bool(chat_template) and re.search(r"\btools\b", chat_template) is not None


def detect_format(chat_template: str | None) -> str:
    """The tool-call format a template teaches (hermes when it cannot tell)."""
    t = chat_template or ""
    if "[TOOL_CALLS]" in t or "[AVAILABLE_TOOLS]" in t:
        return "mistral"
    if "<tool_call>" in t:
        return "hermes"
    if "<|python_tag|>" in t or "ipython" in t:
        return "llama3"
    return "hermes"


def _bad(msg: str, param: str = "tools"):
    return InvalidRequestError(msg, param=param)


def validate_tools(tools, tool_choice) -> tuple[list[dict], str | dict]:
    """Check OpenAI's tools / tool_choice; return (tools as plain dicts, tool_choice normalized)."""
    tools = [t.model_dump(exclude_none=True) if hasattr(t, "model_dump") else t for t in (tools or [])]
    if hasattr(tool_choice, "model_dump"):
        tool_choice = tool_choice.model_dump(exclude_none=True)
    names = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _bad(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}")
        if not isinstance(fn.get("parameters", {}), dict):
            raise _bad(f"tools[{i}].function.parameters must be a JSON Schema object")
        names.append(fn["name"])
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    if isinstance(tool_choice, str):
        if tool_choice not in ("auto", "none", "required"):
            raise _bad("tool_choice must be 'auto', 'none', 'required' or a named function", "tool_choice")
        if tool_choice == "required" and not tools:
            raise _bad("tool_choice 'required' needs tools", "tool_choice")
        return tools, tool_choice
    name = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice, dict) else None
    if name not in names:
        raise _bad(f"tool_choice names a function that is not in tools: {name!r}", "tool_choice")
    return tools, {"type": "function", "function": {"name": name}}


def template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages -> what chat templates read: arguments as dicts (templates apply tojson to
    them), content "" where a tool-calling assistant turn has none, tool results kept with their id."""
    out = []
    for i, m in enumerate(messages):
        if hasattr(m, "model_dump"):
            m = m.model_dump(exclude_none=True)
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object", "messages")
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = dict(c.get("function") or {})
                args = fn.get("arguments")
                if isinstance(args, str):
                    try:
                        fn["arguments"] = json.loads(args) if args.strip() else {}
                    except ValueError:
                        pass  # keep the string: the template shows it as it is
                calls.append({**c, "function": fn, **fn})  # some templates read call.name, others call.function.name
            m["tool_calls"] = calls
        if m.get("content") is None:
            m["content"] = ""
        out.append(m)
    return out


def render_prompt(tokenizer, messages: list[dict], tools=None, tool_choice=None,
                  add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the conversation with the tools in the model's own template. tool_choice 'none'
    leaves the tools out of the prompt. A template without tool support is a clear 400."""
    tools, tool_choice = validate_tools(tools, tool_choice)
    kw = {}
    if tools and tool_choice != "none":
        if not supports_tools(tokenizer.chat_template):
            raise _bad("this model's chat template does not support tools (it never renders 'tools'); "
                       "use a model whose template does, such as Qwen2.5 or Llama 3.1")
        kw["tools"] = tools
    text = tokenizer.apply_chat_template(template_messages(messages), add_generation_prompt, **kw)
    has_bos = bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)
    return tokenizer.encode(text, add_special_tokens=not has_bos)


# ---------------------------------------------------------------------------------------------- parsing
def _call(name: str, arguments) -> dict:
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _as_call(obj) -> dict | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return _call(obj["name"], args)


def _json_values(text: str) -> list | None:
    """Parse `text` as one JSON value or several separated by ';' / whitespace; None if it is not that."""
    dec, pos, out = json.JSONDecoder(), 0, []
    text = text.strip()
    while pos < len(text):
        try:
            val, pos = dec.raw_decode(text, pos)
        except ValueError:
            return None
        out.append(val)
        while pos < len(text) and text[pos] in " \t\r\n;":
            pos += 1
    return out


def _calls_in(values) -> list[dict] | None:
    objs = []
    for v in values:
        objs.extend(v if isinstance(v, list) else [v])
    calls = [_as_call(o) for o in objs]
    return calls if calls and all(calls) else None


def parse_tool_calls(text: str, fmt: str = "hermes") -> tuple[str | None, list[dict]]:
    """Split a finished output into (content, tool_calls). Output that is not a well-formed call of
    the format stays content, untouched."""
    if fmt == "hermes":
        start = text.find("<tool_call>")
        if start < 0:
            return text, []
        calls = []
        for body in _HERMES.findall(text[start:]):
            vals = _json_values(body)
            got = _calls_in(vals) if vals else None
            if got is None:
                return text, []
            calls += got
        return (text[:start].strip() or None), calls
    if fmt == "mistral":
        start = text.find("[TOOL_CALLS]")
        if start < 0:
            return text, []
        body = text[start + len("[TOOL_CALLS]"):]
        vals = _json_values(body)
        calls = _calls_in(vals) if vals else None
        if calls is None:  # the newer form: [TOOL_CALLS]name[ARGS]{...}
            parts = re.findall(r"\s*([^\[\]\s{]+)\[ARGS\](\{.*?\})(?=\s*(?:\[TOOL_CALLS\]|$))", body, re.S)
            calls = [_call(n, a) for n, a in parts] if parts else None
        return ((text[:start].strip() or None), calls) if calls else (text, [])
    if fmt == "llama3":
        body = text.split("<|python_tag|>", 1)[1] if "<|python_tag|>" in text else text
        head = text.split("<|python_tag|>", 1)[0] if "<|python_tag|>" in text else ""
        if not body.lstrip().startswith(("{", "[")):
            return text, []
        vals = _json_values(body)
        calls = _calls_in(vals) if vals else None
        return ((head.strip() or None), calls) if calls else (text, [])
    raise ValueError(f"unknown tool-call format {fmt!r}; known: {', '.join(FORMATS)}")


class ToolCallStreamParser:
    """Streamed output -> OpenAI deltas. ``feed(text)`` and ``finish()`` return a list of deltas, each
    ``{"content": str}`` or ``{"tool_calls": [{"index", "id", "type", "function": {"name", "arguments"}}]}``.

    Text streams as content until the format's start marker; from there it is buffered, and each call
    is sent whole once it is complete (or at finish). Text that turns out not to be a call is sent as
    content at finish, so nothing is lost."""

    def __init__(self, fmt: str = "hermes"):
        if fmt not in FORMATS:
            raise ValueError(f"unknown tool-call format {fmt!r}; known: {', '.join(FORMATS)}")
        self.fmt = fmt
        self._pending = ""  # text not yet sent: a possible marker prefix, or the buffered calls
        self._in_calls = False
        self._sent_text = False
        self._n = 0  # tool calls sent
        self._consumed = 0  # characters of the buffer already turned into calls (hermes)

    @property
    def called(self) -> bool:
        return self._n > 0

    def _starts_calls(self) -> int:
        """Index in _pending where tool calls begin, or -1."""
        i = self._pending.find(_START[self.fmt])
        if i < 0 and self.fmt == "llama3" and not self._sent_text and self._pending.lstrip().startswith("{"):
            i = len(self._pending) - len(self._pending.lstrip())
        return i

    def _holdback(self) -> int:
        marker = _START[self.fmt]
        if self.fmt == "llama3" and not self._sent_text and not self._pending.strip():
            return len(self._pending)  # the answer may still open with '{'
        for n in range(min(len(marker) - 1, len(self._pending)), 0, -1):
            if self._pending.endswith(marker[:n]):
                return n
        return 0

    def _emit_calls(self, calls: list[dict]) -> list[dict]:
        out = []
        for c in calls:
            out.append({"tool_calls": [{"index": self._n, **c}]})
            self._n += 1
        return out

    def feed(self, text: str) -> list[dict]:
        self._pending += text
        out = []
        if not self._in_calls:
            i = self._starts_calls()
            if i < 0:
                keep = self._holdback()
                send = self._pending[: len(self._pending) - keep]
                if send:
                    out.append({"content": send})
                    self._sent_text = self._sent_text or bool(send.strip())
                self._pending = self._pending[len(send):]
                return out
            if self._pending[:i]:
                out.append({"content": self._pending[:i]})
            self._pending, self._in_calls = self._pending[i:], True
        if self.fmt == "hermes":  # each </tool_call> closes one call: send it now
            while True:
                end = self._pending.find("</tool_call>", self._consumed)
                if end < 0:
                    break
                block = self._pending[self._consumed:end + len("</tool_call>")]
                _, calls = parse_tool_calls(block, "hermes")
                if not calls:
                    break
                out += self._emit_calls(calls)
                self._consumed = end + len("</tool_call>")
        return out

    def finish(self) -> list[dict]:
        rest, self._pending = self._pending[self._consumed:], ""
        self._consumed = 0
        if not rest.strip():
            return []
        if self._in_calls:
            _, calls = parse_tool_calls(rest, self.fmt)
            if calls:
                return self._emit_calls(calls)
        return [{"content": rest}]


# ---------------------------------------------------------------------------------------------- forcing
def forced_schema(tools, tool_choice, parallel_tool_calls: bool = True) -> dict | None:
    """The JSON Schema the output must follow for tool_choice 'required' or a named function (None
    for 'auto'/'none'): give it to GrammarConstraint.from_json_schema(..., param="tool_choice").
    parallel_tool_calls=False allows exactly one call under 'required'."""
    tools, tool_choice = validate_tools(tools, tool_choice)
    params = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in tools}
    if isinstance(tool_choice, dict):
        return params[tool_choice["function"]["name"]]
    if tool_choice != "required":
        return None
    one = [{"type": "object", "properties": {"name": {"type": "string", "enum": [n]}, "arguments": p},
            "required": ["name", "arguments"], "additionalProperties": False} for n, p in params.items()]
    schema = {"type": "array", "minItems": 1, "items": one[0] if len(one) == 1 else {"anyOf": one}}
    return {**schema, "maxItems": 1} if not parallel_tool_calls else schema


def parse_forced(text: str, tool_choice) -> list[dict]:
    """Tool calls from output written under ``forced_schema``."""
    if hasattr(tool_choice, "model_dump"):
        tool_choice = tool_choice.model_dump(exclude_none=True)
    if isinstance(tool_choice, dict):
        return [_call(tool_choice["function"]["name"], json.loads(text))]
    return [_call(c["name"], c["arguments"]) for c in json.loads(text)]
