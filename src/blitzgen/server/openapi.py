"""JSON schemas for /openapi.json: the request bodies and the error shape (documentation for clients,
fuzzers and client generators; the server validates requests in protocol.py, not from these)."""

from __future__ import annotations

from .protocol import MAX_N, MAX_STOP, ROLES

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
}
_PART = {"type": "object", "required": ["type", "text"],
         "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
_MESSAGE = {"type": "object", "required": ["role"], "properties": {
    "role": {"enum": list(ROLES)}, "tool_call_id": {"type": "string"},
    "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": _PART}, {"type": "null"}]}}}

CHAT = {"type": "object", "required": ["messages"], "properties": {
    **_COMMON, "max_completion_tokens": {"type": "integer", "minimum": 1},
    "messages": {"type": "array", "minItems": 1, "items": _MESSAGE}}}
COMPLETION = {"type": "object", "required": ["prompt"], "properties": {
    **_COMMON, "prompt": {"oneOf": [{"type": "string", "minLength": 1},
                                    {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}]}}}


def request_body(schema: dict) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
