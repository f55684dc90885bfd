"""Talking to a running ``blitzgen serve`` (or any OpenAI-compatible server) over HTTP, with httpx.

``generate --url`` streams each sample from the server and prints the same per-sample timing lines
as a local run (measured on this side of the connection); ``chat --url`` uses ``RemoteClient`` too.
A server that cannot be reached, or that answers with an error, is a one-line ``RemoteError``.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Iterator

from ..errors import BlitzgenError


class RemoteError(BlitzgenError):
    """The server could not be reached or answered with an error."""


@dataclass
class RemoteStats:
    """One streamed request as the client saw it."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    time_to_first_token: float = 0.0
    total_seconds: float = 0.0
    finish_reason: str | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.total_seconds if self.total_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        secs = self.total_seconds - self.time_to_first_token
        return (self.completion_tokens - 1) / secs if self.completion_tokens > 1 and secs > 0 else 0.0


def base_url(url: str) -> str:
    """``http://host:port`` from what the user typed (a trailing ``/`` or ``/v1`` is dropped)."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url[:-3] if url.endswith("/v1") else url


def sampling_payload(sampling, max_tokens: int, stop: list[str]) -> dict:
    """The OpenAI request fields for a token budget, stop strings and sampling values: a SamplingParams
    or the parsed flags (the same field names; the client needs no torch)."""
    payload = {"max_tokens": max_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p,
               "top_k": sampling.top_k, "min_p": sampling.min_p}
    if sampling.seed is not None:
        payload["seed"] = sampling.seed
    if stop:
        payload["stop"] = list(stop)
    return payload


class RemoteClient:
    """A small streaming client of the OpenAI HTTP API; ``last`` holds the last request's stats."""

    def __init__(self, url: str, api_key: str | None = None, connect_timeout: float = 10.0):
        httpx = _httpx()
        self.url = base_url(url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # no read timeout: a request may wait in the server's queue for a while
        self._http = httpx.Client(base_url=self.url, headers=headers,
                                  timeout=httpx.Timeout(connect_timeout, read=None))
        self.last = RemoteStats()

    def __enter__(self) -> RemoteClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def model_name(self) -> str:
        """The served model's name (GET /v1/models); also checks that the server answers."""
        with self._request("GET", "/v1/models") as resp:
            resp.read()
            data = _json(resp.text).get("data") or [{}]
        return data[0].get("id", "?")

    def stream(self, kind: str, payload: dict) -> Iterator[str]:
        """Yield the text of a streamed "chat" or "completion" request as it arrives."""
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        body = {**payload, "stream": True, "stream_options": {"include_usage": True}}
        stats = self.last = RemoteStats()
        pieces = 0
        t0 = time.perf_counter()
        try:
            with self._request("POST", path, json=body) as resp:
                for line in resp.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = _json(data)
                    if "error" in chunk:
                        err = chunk["error"]
                        raise RemoteError(f"the server failed: {err.get('message') if isinstance(err, dict) else err}")
                    if chunk.get("usage"):
                        stats.prompt_tokens = chunk["usage"]["prompt_tokens"]
                        stats.completion_tokens = chunk["usage"]["completion_tokens"]
                    for choice in chunk.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content") if kind == "chat" else choice.get("text")
                        if text:
                            if not pieces:
                                stats.time_to_first_token = time.perf_counter() - t0
                            pieces += 1
                            yield text
                        stats.finish_reason = choice.get("finish_reason") or stats.finish_reason
        finally:
            stats.total_seconds = time.perf_counter() - t0
            stats.completion_tokens = stats.completion_tokens or pieces

    @contextlib.contextmanager
    def _request(self, method: str, path: str, **kw):
        """A streamed response that raises RemoteError for connection and HTTP errors."""
        httpx = _httpx()
        try:
            with self._http.stream(method, path, **kw) as resp:
                if resp.status_code != 200:
                    resp.read()
                    raise RemoteError(f"{self.url} answered {resp.status_code}: {_error_message(resp)}")
                yield resp
        except httpx.ConnectError as e:
            raise RemoteError(f"cannot reach the server at {self.url}: {e}") from None
        except httpx.HTTPError as e:
            raise RemoteError(f"the connection to {self.url} failed: {type(e).__name__}: {e}") from None


def _json(text: str) -> dict:
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    if not isinstance(obj, dict):
        raise RemoteError(f"the server sent something that is not an OpenAI API answer: {text[:100]!r}")
    return obj


def _httpx():
    try:
        import httpx
    except ImportError:
        raise BlitzgenError("--url needs httpx: pip install httpx") from None
    return httpx


def _error_message(resp) -> str:
    try:
        return resp.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return resp.text.strip()[:200] or resp.reason_phrase


def generate_remote(args) -> int:
    """``blitzgen generate --url``: stream --num-samples completions and report each one's speed."""
    payload = sampling_payload(args, args.max_new_tokens, args.stop)
    if args.model:  # with --url, --model names the served model (servers other than blitzgen need it)
        payload["model"] = args.model
    if args.raw:
        kind = "completion"
        payload["prompt"] = args.prompt
    else:
        kind = "chat"
        payload["messages"] = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": args.prompt}]
    out = sys.stdout
    rates = []
    with RemoteClient(args.url, args.api_key) as client:
        for i in range(args.num_samples):
            if args.seed is not None:
                payload["seed"] = args.seed + i
            for text in client.stream(kind, payload):
                if not args.quiet:
                    out.write(text)
                    out.flush()
            if not args.quiet:
                out.write("\n")
            st = client.last
            rates.append(st.tokens_per_second)
            print(f"Time for inference {i + 1}: {st.total_seconds:.2f} sec total, {st.completion_tokens} tokens, "
                  f"{st.tokens_per_second:.2f} tokens/sec (first token {st.time_to_first_token * 1000:.0f} ms, "
                  f"decode {st.decode_tokens_per_second:.2f} tokens/sec)", file=sys.stderr, flush=True)
    print("==========", file=sys.stderr)
    print(f"Average tokens/sec: {statistics.mean(rates):.2f}", file=sys.stderr)
    return 0
