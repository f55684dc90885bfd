"""The app's outer ASGI layer: the Host header (against DNS rebinding), JSON-only POST bodies (so no
web page can post to the server without a CORS preflight), and a logged 500 in OpenAI's error shape
for any exception nothing else handled (never Starlette's plain text)."""

from __future__ import annotations

import ipaddress
import json
import logging

log = logging.getLogger("blitzgen.server")

LOCAL_HOSTS = ["localhost", "127.0.0.1", "::1", "[::1]"]


def default_allowed_hosts(bind_host: str, option: str | None) -> list[str]:
    """--allowed-hosts as a list: the option's comma-separated names; by default the loopback names
    when the server listens on a loopback address, any host ("*") otherwise."""
    if option:
        return [h.strip().lower() for h in option.split(",") if h.strip()]
    if bind_host == "localhost" or _is_loopback(bind_host):
        return LOCAL_HOSTS + ([bind_host] if bind_host not in LOCAL_HOSTS else [])
    return ["*"]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name in a Host header, without the port ("[::1]:80" -> "[::1]")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[: header.find("]") + 1]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def host_allowed(header: str, allowed: list[str]) -> bool:
    name = host_name(header)
    return any(a == "*" or a == name or (a.startswith("*.") and name.endswith(a[1:])) for a in allowed)


def _error(status: int, message: str, type: str, code: str | None) -> tuple[dict, bytes]:
    body = json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}}).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    return start, body


class Guard:
    def __init__(self, app, allowed_hosts: list[str] | None = None):
        self.app = app
        self.allowed = [h.lower() for h in (allowed_hosts or ["*"])]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if "*" not in self.allowed:
            host = headers.get(b"host", b"").decode("latin-1")
            if not host_allowed(host, self.allowed):
                return await _send(send, 400, "invalid Host header: this server answers only to "
                                              + ", ".join(self.allowed) + " (see --allowed-hosts)",
                                   "invalid_request_error", "invalid_host")
        if scope["method"] == "POST":
            media = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if media != b"application/json":
                return await _send(send, 415, "the request body must be JSON: send 'Content-Type: application/json'",
                                   "invalid_request_error", "unsupported_media_type")
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("%s %s failed", scope["method"], scope.get("path"))
            if started:
                raise
            await _send(send, 500, "the server failed to handle this request (the error is in its log)",
                        "server_error", "internal_error")


async def _send(send, status: int, message: str, type: str, code: str | None) -> None:
    start, body = _error(status, message, type, code)
    await send(start)
    await send({"type": "http.response.body", "body": body})
