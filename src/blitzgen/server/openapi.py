"""JSON schemas for /openapi.json: the request bodies and the error shape (documentation for clients,
fuzzers and client generators; the server validates requests in protocol.py, not from these)."""

from __future__ import annotations

from .protocol import MAX_COMPLETION_LOGPROBS, MAX_N, MAX_STOP, MAX_TOP_LOGPROBS, ROLES

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}

STATUS = {
    400: "invalid request (OpenAI's error shape; `param` names the field)", 401: "missing or wrong API key",
    404: "unknown model", 408: "the request body was not received in time", 413: "the request body is too large",
    415: "the body is not application/json", 429: "the queue is full (see Retry-After)",
    500: "generation failed", 503: "loading or shutting down (see Retry-After)",
}

_STOP = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": MAX_STOP}]}
_COMMON = {
    "model": {"type": "string"},
    "max_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": -1},
    "min_p": {"type": "number", "minimum": 0, "maximum": 1},
    "seed": {"type": "integer", "minimum": 0},
    "n": {"type": "integer", "minimum": 1, "maximum": MAX_N},
    "stop": _STOP,
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "response_format": {"type": "object", "required": ["type"], "properties": {
        "type": {"enum": ["text", "json_object", "json_schema"]},
        "json_schema": {"type": "object", "properties": {"name": {"type": "string"}, "schema": {"type": "object"},
                                                         "strict": {"type": "boolean"}}}}},
}
_FUNCTION = {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string"}, "description": {"type": "string"}, "parameters": {"type": "object"}}}
_TOOL_CALL = {"type": "object", "required": ["function"], "properties": {
    "id": {"type": "string"}, "type": {"const": "function"}, "function": {"type": "object", "properties": {
        "name": {"type": "string"}, "arguments": {"type": "string"}}}}}
_PART = {"type": "object", "required": ["type", "text"],
         "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
_MESSAGE = {"type": "object", "required": ["role"], "properties": {
    "role": {"enum": list(ROLES)}, "tool_call_id": {"type": "string"},
    "tool_calls": {"type": "array", "items": _TOOL_CALL},
    "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": _PART}, {"type": "null"}]}}}

CHAT = {"type": "object", "required": ["messages"], "properties": {
    **_COMMON, "max_completion_tokens": {"type": "integer", "minimum": 1},
    "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
    "tools": {"type": "array", "items": {"type": "object", "required": ["type", "function"], "properties": {
        "type": {"const": "function"}, "function": _FUNCTION}}},
    "tool_choice": {"oneOf": [{"enum": ["auto", "none", "required"]}, {"type": "object", "properties": {
        "type": {"const": "function"}, "function": {"type": "object", "properties": {"name": {"type": "string"}}}}}]},
    "parallel_tool_calls": {"type": "boolean"},
    "logprobs": {"type": "boolean"},
    "top_logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS}}}
COMPLETION = {"type": "object", "required": ["prompt"], "properties": {
    **_COMMON, "prompt": {"oneOf": [{"type": "string", "minLength": 1},
                                    {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}]},
    "logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_COMPLETION_LOGPROBS}}}


def request_body(schema: dict) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
