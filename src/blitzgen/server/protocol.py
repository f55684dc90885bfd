"""The OpenAI wire format, without I/O: request parsing and validation, response and chunk building.

Requests are plain JSON objects (dicts) checked field by field, so every mistake becomes a 400 that
names the offending ``param``, as OpenAI, vLLM and llama.cpp's server report them. Fields this
server does not know are tolerated and ignored; fields of features it lacks (legacy functions, logit
bias, penalties, best_of, echo, suffix, batched prompts) are refused with a
400 unless their value asks for nothing (``UNSUPPORTED``). Strings must be valid Unicode (no lone
surrogates, which no tokenizer or UTF-8 encoder takes).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidRequestError
from ..sampling import SamplingParams
from ..structured import json_schema_of
from ..tool_calls import validate_tools

MAX_N = 16  # most choices per request (they run one after another)
MAX_STOP = 16  # most stop strings per request
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs
MAX_COMPLETION_LOGPROBS = 5  # completions' logprobs
ROLES = ("system", "developer", "user", "assistant", "tool")
PENALTIES = ("presence_penalty", "frequency_penalty")  # OpenAI's range is [-2, 2]; only 0 is supported


def _asks(neutral: tuple) -> Any:
    return lambda v: v not in neutral


# field -> does this value ask for a feature this server lacks? (a 400 naming the field if so)
UNSUPPORTED = {
    "functions": _asks((None, [])),
    "function_call": _asks((None, "none")),
    "logit_bias": _asks((None, {})),
    "best_of": _asks((None, 1)),
    "presence_penalty": _asks((None, 0)),
    "frequency_penalty": _asks((None, 0)),
}
SSE_DONE = b"data: [DONE]\n\n"


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class GenerationRequest:
    """A validated /v1/completions or /v1/chat/completions request."""

    kind: str  # "chat" | "completion"
    model: str | None = None
    messages: list[dict] | None = None  # chat
    prompt: str | list[int] | None = None  # completion: text or token ids
    max_tokens: int | None = None  # None: the rest of the context
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    n: int = 1
    speculate: str | None = None  # a draft source or "off"; None: the server's default
    stream: bool = False
    include_usage: bool = False
    tools: list[dict] = field(default_factory=list)  # chat: validated tools (empty: none)
    tool_choice: Any = "none"  # "auto" | "none" | "required" | {"type": "function", "function": {"name"}}
    parallel_tool_calls: bool = True
    logprobs: bool = False
    top_logprobs: int = 0  # chat: 0..20; completions: the `logprobs` integer 0..5
    response_format: dict | None = None  # json_object / json_schema (text: None)

    @property
    def calls_tools(self) -> bool:
        """Tools reach the prompt (tool_choice is not 'none')."""
        return bool(self.tools) and self.tool_choice != "none"

    def prompt_chars(self) -> int:
        """Characters of text in the prompt (0 for token ids): a cheap bound before tokenizing."""
        if self.kind == "chat":
            return sum(len(_text(m.get("content"))) + len(m["role"]) for m in self.messages)
        return len(self.prompt) if isinstance(self.prompt, str) else 0


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


# ---- field readers ---------------------------------------------------------------------------------
_MISSING = object()


def _get(body: dict, name: str, default: Any = None) -> Any:
    """The field's value; null counts as absent, as in OpenAI's API."""
    value = body.get(name, _MISSING)
    return default if value is _MISSING or value is None else value


def _int(body: dict, name: str, default: int | None, lo: int | None = None, hi: int | None = None) -> int | None:
    v = _get(body, name, default)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad_request(f"'{name}' must be an integer, got {json.dumps(v)[:64]}", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise bad_request(f"'{name}' must be {bounds}, got {v}", name)
    return v


def _float(body: dict, name: str, default: float) -> float:
    v = _get(body, name, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad_request(f"'{name}' must be a number, got {json.dumps(v)[:64]}", name)
    return float(v)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = _get(body, name, default)
    if not isinstance(v, bool):
        raise bad_request(f"'{name}' must be a boolean, got {json.dumps(v)[:64]}", name)
    return v


def _stop(body: dict) -> list[str]:
    v = _get(body, "stop", [])
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise bad_request("'stop' must be a string or a list of strings", "stop")
    if len(v) > MAX_STOP:
        raise bad_request(f"'stop' may hold at most {MAX_STOP} strings, got {len(v)}", "stop")
    return [s for s in v if s]


def _sampling(body: dict) -> SamplingParams:
    top_k = _int(body, "top_k", 0, lo=-1)
    seed = _int(body, "seed", None)
    if seed is not None and not 0 <= seed < 2**63:
        raise bad_request(f"'seed' must be a non-negative 64-bit integer, got {seed}", "seed")
    params = SamplingParams(
        temperature=_float(body, "temperature", 1.0),
        top_k=0 if top_k == -1 else top_k,  # vLLM's "off" is -1
        top_p=_float(body, "top_p", 1.0),
        min_p=_float(body, "min_p", 0.0),
        seed=seed,
    )
    try:
        return params.validate()
    except InvalidRequestError as e:
        raise bad_request(str(e), e.param) from None


SPECULATE = ("ngram", "self-int4", "draft-model", "off")


def parse_speculate(body: dict) -> str | None:
    """The extra field ``"speculate"``: a draft source the server loaded, or "off" (null: the
    server's default). Whether the source is loaded is the engine's check."""
    v = _get(body, "speculate")
    if v is not None and v not in SPECULATE:
        raise bad_request(f"'speculate' must be one of {', '.join(SPECULATE)}, got {json.dumps(v)[:64]}", "speculate")
    return v


def _valid_unicode(value: Any) -> bool:
    """False when a string anywhere in `value` (keys included) holds a lone surrogate."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return True


def _unsupported(body: dict) -> None:
    for name in PENALTIES:
        v = _float(body, name, 0.0)
        if not -2.0 <= v <= 2.0:
            raise bad_request(f"'{name}' must be between -2 and 2, got {v}", name)
    for name, asks in UNSUPPORTED.items():
        if name in body and asks(body[name]):
            raise bad_request(f"'{name}' is not supported by this server", name, code="unsupported_parameter")


def _logprobs(body: dict, kind: str) -> tuple[bool, int]:
    """(logprobs wanted, alternatives per token): chat's `logprobs` (bool) and `top_logprobs` (0..20);
    completions' `logprobs` (an integer 0..5: that many alternatives)."""
    if kind == "completion":
        n = _int(body, "logprobs", None, lo=0, hi=MAX_COMPLETION_LOGPROBS)
        return n is not None, n or 0
    want = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", None, lo=0, hi=MAX_TOP_LOGPROBS)
    if top and not want:
        raise bad_request("'top_logprobs' needs 'logprobs' to be true", "top_logprobs")
    return want, top or 0


def _common(body: dict, kind: str) -> GenerationRequest:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    for name, value in body.items():
        if not (_valid_unicode(name) and _valid_unicode(value)):
            raise bad_request(f"'{name if _valid_unicode(name) else '?'}' is not valid Unicode: it holds a lone "
                              "surrogate", name if _valid_unicode(name) else None)
    _unsupported(body)
    model = _get(body, "model")
    if model is not None and not isinstance(model, str):
        raise bad_request("'model' must be a string", "model")
    max_tokens = _int(body, "max_tokens", None, lo=1)
    if kind == "chat":
        max_tokens = _int(body, "max_completion_tokens", max_tokens, lo=1)
    stream = _bool(body, "stream")
    options = _get(body, "stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(options, dict):
            raise bad_request("'stream_options' must be an object", "stream_options")
        include_usage = _bool(options, "include_usage")
    want_logprobs, top = _logprobs(body, kind)
    fmt = _get(body, "response_format")
    try:
        if json_schema_of(fmt) is None:
            fmt = None
    except InvalidRequestError as e:
        raise bad_request(str(e), e.param) from None
    return GenerationRequest(kind=kind, model=model or None, max_tokens=max_tokens, sampling=_sampling(body),
                             stop=_stop(body), n=_int(body, "n", 1, lo=1, hi=MAX_N), stream=stream,
                             include_usage=include_usage, logprobs=want_logprobs, top_logprobs=top,
                             response_format=fmt)


def parse_chat_request(body: Any) -> GenerationRequest:
    """Validate a /v1/chat/completions body. Message content may be a string or a list of text parts
    (the chat template rendering checks the parts themselves)."""
    req = _common(body, "chat")
    req.speculate = parse_speculate(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "messages")
    req.messages = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with a string 'role'", "messages")
        role = m["role"]
        if role not in ROLES:
            raise bad_request(f"messages[{i}].role must be one of {', '.join(ROLES)}; got {json.dumps(role)[:64]}",
                              "messages")
        if role == "tool" and not isinstance(m.get("tool_call_id"), str):
            raise bad_request(f"messages[{i}]: a 'tool' message needs a string 'tool_call_id'", "messages")
        if m.get("function_call"):
            raise bad_request(f"messages[{i}].function_call: the legacy functions API is not supported; use "
                              "tool_calls", "messages", code="unsupported_parameter")
        calls = m.get("tool_calls")
        if calls is not None and (role != "assistant" or not isinstance(calls, list) or not all(
                isinstance(c, dict) and isinstance(c.get("function"), dict)
                and isinstance(c["function"].get("name"), str) for c in calls)):
            raise bad_request(f"messages[{i}].tool_calls must be a list of {{'id', 'type': 'function', 'function': "
                              "{'name', 'arguments'}} on an assistant message", "messages")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise bad_request(f"messages[{i}].content must be a string or a list of content parts", "messages")
        req.messages.append({**m, "role": "system"} if role == "developer" else m)  # OpenAI's newer name
    try:
        req.tools, req.tool_choice = validate_tools(_get(body, "tools", []), _get(body, "tool_choice"))
    except InvalidRequestError as e:
        raise bad_request(str(e), e.param) from None
    req.parallel_tool_calls = _bool(body, "parallel_tool_calls", True)
    return req


def parse_completion_request(body: Any) -> GenerationRequest:
    """Validate a /v1/completions body. The prompt is a string or a list of token ids; a list holding
    one of those is accepted too, but batches of several prompts are not."""
    req = _common(body, "completion")
    req.speculate = parse_speculate(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > 1:
            raise bad_request("batched prompts are not supported: send one prompt per request", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, list):
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
            raise bad_request("'prompt' must be a string or a list of token ids", "prompt")
    elif not isinstance(prompt, str):
        raise bad_request("'prompt' must be a string or a list of token ids", "prompt")
    if not prompt:
        raise bad_request("the prompt is empty", "prompt")
    if _bool(body, "echo"):
        raise bad_request("'echo' is not supported by this server", "echo")
    if _get(body, "suffix"):
        raise bad_request("'suffix' is not supported by this server", "suffix")
    req.prompt = prompt
    return req


# ---- responses --------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage; cached_tokens: prompt tokens whose KV the cache already held (not prefilled)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def sse(obj: dict) -> bytes:
    """One server-sent event carrying a JSON object."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class ResponseBuilder:
    """Builds the response objects and stream chunks of one request (one id and timestamp for all)."""

    def __init__(self, kind: str, model: str, include_usage: bool = False):
        self.kind = kind
        self.model = model
        self.include_usage = include_usage
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _envelope(self, obj_type: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": obj_type, "created": self.created, "model": self.model,
                "choices": choices}

    def chunk(self, index: int, text: str | None = None, *, role: bool = False,
              finish_reason: str | None = None, tool_calls: list[dict] | None = None,
              logprobs: dict | None = None) -> dict:
        """A streamed chunk: the role opener (chat), a piece of text or of tool calls (chat), or the
        finishing chunk; `logprobs` in the endpoint's shape for the tokens of this piece."""
        if self.kind == "chat":
            delta: dict = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            if tool_calls:
                delta["tool_calls"] = tool_calls
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            out = self._envelope("chat.completion.chunk", [choice])
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
            out = self._envelope("text_completion", [choice])
        if self.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
        """The last chunk when stream_options.include_usage is set: no choices, the whole usage."""
        obj_type = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._envelope(obj_type, []), "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}

    def response(self, choices: list[tuple], prompt_tokens: int, completion_tokens: int,
                 cached_tokens: int = 0) -> dict:
        """A whole (non-streamed) response; choices are (text, finish_reason) or (text, finish_reason,
        extra) in index order, extra holding "tool_calls" (chat) and/or "logprobs"."""
        items = []
        for i, (text, finish, *rest) in enumerate(choices):
            extra = rest[0] if rest else {}
            if self.kind == "chat":
                message = {"role": "assistant", "content": text}
                if extra.get("tool_calls"):
                    message["tool_calls"] = extra["tool_calls"]
                items.append({"index": i, "message": message, "logprobs": extra.get("logprobs"),
                              "finish_reason": finish})
            else:
                items.append({"index": i, "text": text, "logprobs": extra.get("logprobs"), "finish_reason": finish})
        obj_type = "chat.completion" if self.kind == "chat" else "text_completion"
        return {**self._envelope(obj_type, items), "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}
