"""The FastAPI app: OpenAI-compatible endpoints, health, metrics and the chat page.

Routes: ``GET /`` (chat page), ``GET /health`` (503 until the model is loaded and warm, and again
while draining), ``GET /metrics`` (Prometheus), ``GET /v1/models``, ``POST /v1/completions`` and
``POST /v1/chat/completions`` (streamed as server-sent events with ``"stream": true``). Every error
is answered in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``, validation errors
included (400, never 422). ``/health`` and ``/metrics`` stay open when an API key is set.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import re
import time
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import ContextLengthError, InvalidRequestError
from ..tool_calls import render_prompt
from .engine import Engine, Job, Overloaded, Unavailable
from . import openapi
from .guard import Guard
from .responses import ChoiceShaper
from .protocol import (
    SSE_DONE, APIError, GenerationRequest, ResponseBuilder, error_body, parse_chat_request,
    parse_completion_request, sse,
)

log = logging.getLogger("blitzgen.server")

MAX_BODY_BYTES = 4 * 1024 * 1024
BODY_TIMEOUT_SECONDS = 10.0
DRAIN_TIMEOUT_SECONDS = 25.0  # under Kubernetes' default 30 s grace period
_DRAIN_BYTES = 64 * 1024 * 1024  # an oversized body is read (and dropped) up to this, so the client sees the 413
FALLBACK_TOKEN_CHARS = 64
_PAGE = Path(__file__).parent / "static" / "index.html"
_ICON = Path(__file__).parent / "static" / "favicon.svg"
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_UNAVAILABLE = {
    "loading": ("the model is still loading; retry shortly", "model_loading"),
    "draining": ("the server is shutting down", "shutting_down"),
    "failed": ("the model failed to load", "model_load_failed"),
}


def create_app(engine: Engine, *, api_key: str | None = None, served_model_name: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, max_request_tokens: int | None = None,
               allowed_hosts: list[str] | None = None, body_timeout: float = BODY_TIMEOUT_SECONDS) -> FastAPI:
    """Build the app around `engine`; the app's lifespan starts the engine and stops it at shutdown.

    `max_request_tokens`: the most tokens one request may generate over all its choices (default:
    the model's context length), so a vanished or greedy client cannot hold the worker for hours.
    `allowed_hosts`: the Host header names answered (default: any; see guard.default_allowed_hosts).
    `body_timeout`: seconds a client has to send a request body (408 after that).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="blitzgen", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    app.state.engine = engine
    app.add_middleware(Guard, allowed_hosts=allowed_hosts)
    page = _PAGE.read_text(encoding="utf-8")
    page_headers = {"Cache-Control": "no-cache", "Content-Security-Policy": page_csp(page),
                    "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
    icon = _ICON.read_bytes()
    key = api_key.encode() if api_key else None

    # ---- errors ------------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return JSONResponse(error_body(f"invalid request: {first.get('msg', 'bad value')}", param=loc),
                            status_code=400)

    @app.exception_handler(InvalidRequestError)
    async def _invalid_request(request: Request, e: InvalidRequestError):
        return JSONResponse(error_body(str(e), param=e.param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code, headers=e.headers)

    # ---- helpers -----------------------------------------------------------------------------------
    encode_lock = asyncio.Lock()  # one prompt tokenized at a time: tokenizers may hold the GIL
    encoding = 0  # requests admitted but still being tokenized: they count against the queue
    token_chars: dict[int, int] = {}  # id(tokenizer) -> the longest token's length in characters

    async def check_key(request: Request) -> None:
        if key is None:
            return
        header = request.headers.get("authorization", "").strip()
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
            if not header:
                message = "Missing API key: send 'Authorization: Bearer KEY'."
            elif scheme.lower() != "bearer":
                message = "Invalid API key: send it as 'Authorization: Bearer KEY'."
            else:
                message = "Incorrect API key provided."
            raise APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def require_ready() -> None:
        if engine.state != "ready":
            raise unavailable(engine.state)

    def model_name() -> str:
        return served_model_name or engine.model_name

    def check_model(requested: str | None) -> None:
        if requested and requested not in (model_name(), engine.model_name):
            raise APIError(404, f"The model `{requested}` does not exist; this server serves `{model_name()}`.",
                           param="model", code="model_not_found")

    def check_prompt_chars(req: GenerationRequest) -> None:
        """Reject, before tokenizing it, a prompt that cannot fit: no token spans more characters than
        the longest token of the vocabulary, so more than context * that many characters never fit."""
        tok = engine.tokenizer
        if id(tok) not in token_chars:
            token_chars[id(tok)] = max_token_chars(tok)
        chars, limit = req.prompt_chars(), engine.max_model_len * token_chars[id(tok)]
        if chars > limit:
            raise APIError(400, f"This model's maximum context length is {engine.max_model_len} tokens; the "
                                f"prompt has {chars} characters, which cannot fit. Please reduce the prompt.",
                           param="messages" if req.kind == "chat" else "prompt", code="context_length_exceeded")

    @asynccontextmanager
    async def tokenizing():
        """A place in the queue while the prompt is tokenized (429 when there is none), then the lock."""
        nonlocal encoding
        if engine.num_waiting + engine.num_running + encoding > engine.max_queue:
            raise queue_full()
        encoding += 1
        try:
            async with encode_lock:
                yield
        finally:
            encoding -= 1

    def prompt_ids(req: GenerationRequest) -> list[int]:
        if req.kind == "chat":
            if req.calls_tools or any(m.get("tool_calls") for m in req.messages):
                return render_prompt(engine.tokenizer, req.messages, req.tools, req.tool_choice)
            return engine.tokenizer.encode_chat(req.messages)
        if isinstance(req.prompt, str):
            return engine.tokenizer.encode(req.prompt)
        if max(req.prompt) >= engine.vocab_size:
            raise APIError(400, f"token id {max(req.prompt)} is out of range (vocabulary size "
                                f"{engine.vocab_size})", param="prompt")
        return list(req.prompt)

    def budget(req: GenerationRequest, prompt_len: int) -> int:
        """max_tokens of each choice: n of them share at most max_request_tokens."""
        limit = max_request_tokens or engine.max_model_len
        if req.max_tokens is None:
            return min(engine.default_max_tokens(prompt_len), max(1, limit // req.n))
        engine.check_request(prompt_len, req.max_tokens)  # a context overflow is reported as such first
        if req.max_tokens * req.n > limit:
            raise APIError(400, f"n * max_tokens = {req.n * req.max_tokens} is more than this server generates "
                                f"for one request ({limit} tokens)", param="max_tokens")
        return req.max_tokens

    def queue_full() -> APIError:
        return APIError(429, f"the server is busy ({engine.num_waiting} requests waiting); retry later",
                        type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})

    def submit(job: Job) -> int:
        try:
            return engine.submit(job)
        except Overloaded:
            raise queue_full() from None
        except Unavailable as e:
            raise unavailable(e.state) from None

    async def generate(request: Request, kind: str):
        body = await read_json(request, max_body_bytes, body_timeout)
        req = parse_chat_request(body) if kind == "chat" else parse_completion_request(body)
        require_ready()
        check_model(req.model)
        check_prompt_chars(req)
        try:
            async with tokenizing():
                ids = await asyncio.to_thread(prompt_ids, req)
            max_tokens = budget(req, len(ids))
            engine.check_request(len(ids), max_tokens)
        except ContextLengthError as e:
            raise APIError(400, str(e), param="messages" if kind == "chat" else "prompt",
                           code="context_length_exceeded") from None
        builder = ResponseBuilder(kind, model_name(), req.include_usage)
        shaper = ChoiceShaper(req, engine.tokenizer)
        constraint = None
        if shaper.tool_mode == "forced" or req.response_format is not None:
            async with tokenizing():  # compiling a grammar holds the same place in the queue
                constraint = await asyncio.to_thread(shaper.constraint, engine.tokenizer, engine.vocab_size)
        job = Job(builder.id, ids, max_tokens, req.sampling, req.stop, req.n,
                  decode=shaper.decoder(engine.tokenizer, constraint))
        job.speculate = req.speculate
        ahead = submit(job)
        log.info("%s queued: %s, %d prompt tokens, max_tokens %d, n %d%s, %d ahead", job.id, request.url.path,
                 len(ids), max_tokens, req.n, ", stream" if req.stream else "", ahead)
        headers = {"X-Request-Id": job.id}
        if req.stream:  # the background task cancels the job if the client left before the body began
            return StreamingResponse(stream(job, builder, shaper), media_type="text/event-stream",
                                     headers={**headers, **_STREAM_HEADERS},
                                     background=BackgroundTask(engine.cancel, job))
        result = await collect(job, builder, shaper, request)
        return JSONResponse(result, headers=headers) if result is not None else Response(status_code=499)

    async def stream(job: Job, builder: ResponseBuilder, shaper: ChoiceShaper):
        """The SSE body; leaving it early (client gone: Starlette cancels it) cancels the job."""
        opened: set[int] = set()
        async for ev in engine.events(job):
            if ev.kind in ("delta", "finish") and builder.kind == "chat" and ev.index not in opened:
                opened.add(ev.index)
                yield sse(builder.chunk(ev.index, role=True))
            if ev.kind == "delta":
                for piece in shaper.piece(ev.index, ev.text, ev.logprobs):
                    yield sse(builder.chunk(ev.index, **piece))
            elif ev.kind == "finish":
                pieces, finish = shaper.finish(ev.index, ev.finish_reason)
                for piece in pieces:
                    yield sse(builder.chunk(ev.index, **piece))
                yield sse(builder.chunk(ev.index, finish_reason=finish))
            elif ev.kind == "done" and builder.include_usage:
                yield sse(builder.usage_chunk(len(job.prompt_ids), ev.tokens, ev.cached_tokens))
            elif ev.kind == "error":
                yield sse(error_body(ev.text, "server_error"))
        yield SSE_DONE

    async def collect(job: Job, builder: ResponseBuilder, shaper: ChoiceShaper, request: Request) -> dict | None:
        """Gather a whole response; None when the client went away (the job is then cancelled)."""
        texts: list[list[str]] = [[] for _ in range(job.n)]
        steps: list[list] = [[] for _ in range(job.n)]
        finish = ["length"] * job.n
        async for ev in engine.events(job, disconnected=client_gone(request)):
            if ev.kind == "delta":
                texts[ev.index].append(ev.text)
                steps[ev.index].extend(ev.logprobs or ())
            elif ev.kind == "finish":
                finish[ev.index] = ev.finish_reason
            elif ev.kind == "error":
                if engine.state == "draining":
                    raise unavailable("draining")
                raise APIError(500, ev.text, type="server_error")
            elif ev.kind == "done":
                choices = [shaper.whole(i, "".join(t), f, s) for i, (t, f, s) in enumerate(zip(texts, finish, steps))]
                return builder.response(choices, len(job.prompt_ids), ev.tokens, ev.cached_tokens)
        return None

    # ---- routes ------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(page, headers=page_headers)

    @app.get("/favicon.svg", include_in_schema=False)
    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(icon, media_type="image/svg+xml",
                        headers={"Cache-Control": "max-age=86400", "X-Content-Type-Options": "nosniff"})

    @app.get("/health", responses={503: _error_response("loading, draining or failed to load")})
    async def health():
        ready = engine.state == "ready"
        return JSONResponse({"status": "ok" if ready else engine.state}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics():
        body, content_type = engine.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", dependencies=[Depends(check_key)], responses=_errors(401, 503))
    async def models():
        require_ready()
        card = {"id": model_name(), "object": "model", "created": 0, "owned_by": "blitzgen",
                "max_model_len": engine.max_model_len}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions", dependencies=[Depends(check_key)], responses=_GENERATION_ERRORS,
              openapi_extra=openapi.request_body(openapi.COMPLETION))
    async def completions(request: Request):
        return await generate(request, "completion")

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)], responses=_GENERATION_ERRORS,
              openapi_extra=openapi.request_body(openapi.CHAT))
    async def chat_completions(request: Request):
        return await generate(request, "chat")

    return app


def _error_response(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": openapi.ERROR}}}


def _errors(*codes: int) -> dict:
    return {code: _error_response(openapi.STATUS[code]) for code in codes}


_GENERATION_ERRORS = _errors(400, 401, 404, 408, 413, 415, 429, 500, 503)


def page_csp(page: str) -> str:
    """The chat page's Content-Security-Policy: its own inline script and style (by hash), requests to
    this origin only, no framing."""
    def hashes(tag: str) -> str:
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
        return " ".join("'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
                        for s in found)

    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; connect-src 'self'; "
            "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def max_token_chars(tokenizer) -> int:
    """The most characters one token of `tokenizer` stands for (a generous constant when unknown)."""
    try:
        vocab = tokenizer._tok.get_vocab(with_added_tokens=True)  # the `tokenizers` object
        return max(16, max(map(len, vocab)))
    except Exception:  # noqa: BLE001 - not a `tokenizers` tokenizer
        return FALLBACK_TOKEN_CHARS


def client_gone(request: Request):
    """An awaitable that returns once the client has disconnected: after the body was read, the next
    ASGI message is the disconnect (or the end of the response)."""

    async def gone() -> bool:
        while (await request.receive())["type"] != "http.disconnect":
            await asyncio.sleep(0.05)  # not expected after the body; never spin
        return True

    return gone


def unavailable(state: str) -> APIError:
    """The 503 for an engine that takes no work in `state` (loading, draining or failed)."""
    message, code = _UNAVAILABLE[state]
    return APIError(503, message, type="service_unavailable", code=code, headers={"Retry-After": "5"})


async def read_json(request: Request, limit: int, timeout: float = BODY_TIMEOUT_SECONDS) -> dict:
    """The request body as a JSON object: 413 past `limit` bytes, 408 when it takes more than `timeout`
    seconds to arrive, 400 when it is not a JSON object."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > _DRAIN_BYTES:
        raise APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    parts, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size <= limit:
                    parts.append(chunk)
                elif size > _DRAIN_BYTES:
                    break
    except TimeoutError:
        raise APIError(408, f"the request body was not received within {timeout:g} seconds",
                       code="request_timeout", headers={"Connection": "close"}) from None
    if size > limit:
        raise APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    try:
        body = json.loads(b"".join(parts))
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first shutdown signal drains: the engine refuses new work (503 with
    Retry-After, on a socket that still listens) while the running and queued requests finish; the
    server exits once the engine is idle, or after `drain_timeout` seconds, when what is left is
    aborted. A second signal stops it at once."""

    def __init__(self, config: uvicorn.Config, engine: Engine, drain_timeout: float | None = DRAIN_TIMEOUT_SECONDS):
        super().__init__(config)
        self.engine = engine
        self.drain_timeout = drain_timeout
        self.draining_since: float | None = None

    def handle_exit(self, sig, frame) -> None:
        if self.draining_since is None and not self.should_exit:
            self._captured_signals.append(sig)  # uvicorn re-raises it once the server is down
            self.draining_since = time.monotonic()
            self.engine.drain()
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.draining_since is not None and not self.should_exit:
            if self.engine.idle:
                self.should_exit = True
            elif self.drain_timeout is not None and time.monotonic() - self.draining_since > self.drain_timeout:
                n = self.engine.abort_all("the server is shutting down")
                log.warning("drain timeout (%g s): aborted %d requests", self.drain_timeout, n)
                self.should_exit = True
        return await super().on_tick(counter)

    def exit_now(self) -> None:
        """Ask the server to stop (thread-safe: uvicorn polls the flag)."""
        self.should_exit = True
