"""``blitzgen serve``: the OpenAI-compatible HTTP server (FastAPI + uvicorn) with a chat page at ``/``.

The address is bound and the model source checked first (a busy port or a missing model is a
one-line error, exit 2). uvicorn then listens at once while the model loads (and compiles and warms
up) in the engine's thread: ``/health`` answers 503 until the model is ready. SIGTERM or Ctrl-C
drains: new requests get 503 with Retry-After, the running and queued ones finish (for at most
--drain-timeout seconds), then the process exits.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import sys
from pathlib import Path

log = logging.getLogger("blitzgen.server")


def register(sub) -> None:
    from .common import add_model_args

    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API, with a chat page",
                       description="Serve /v1/completions, /v1/chat/completions and /v1/models (streaming "
                                   "with SSE), /health, /metrics and a chat page at /. Requests run one at a "
                                   "time; others wait in a bounded queue.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("BLITZGEN_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $BLITZGEN_API_KEY, which is "
                        "better: a command line is visible to every user in `ps`; /health and /metrics stay open)")
    p.add_argument("--allowed-hosts", default=None, metavar="NAMES",
                   help="comma-separated Host header names to answer ('*': any), against DNS rebinding "
                        "(default: localhost names when --host is a loopback address, any otherwise)")
    p.add_argument("--max-queue", type=int, default=16,
                   help="requests that may wait while one runs; more get 429 (default: 16)")
    p.add_argument("--max-request-tokens", type=int, default=None, metavar="N",
                   help="most tokens one request may generate over all its n choices (default: the model's "
                        "context length)")
    p.add_argument("--drain-timeout", type=float, default=25.0, metavar="SECONDS",
                   help="on SIGTERM, how long running and queued requests may take before they are aborted "
                        "(default: 25)")
    p.add_argument("--body-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="how long a client may take to send a request body; then 408 (default: 10)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name the API reports and accepts (default: the model file's name)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--prompt-cache-entries", type=int, default=None, metavar="N",
                   help="prompt prefixes saved besides the live KV cache, so that a conversation resumes "
                        "after others ran; the least recently used is evicted first; 0 disables "
                        "(default: 8)")
    p.add_argument("--prompt-cache-bytes", default=None, metavar="SIZE",
                   help="memory the saved prefixes may take, on the model's device, e.g. 512MiB or 2GiB; "
                        "0 disables (default: 1GiB)")
    add_model_args(p)
    from .common import add_parallel_args

    add_parallel_args(p)
    from .speculate import add_speculation_args

    add_speculation_args(p, multi=True, help_note="; a request may choose with the extra body field "
                         "\"speculate\": a loaded source or \"off\"")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import BlitzgenError, InvalidRequestError

    try:
        import uvicorn

        from ..server.app import DrainingServer, create_app
        from ..server.engine import Engine
    except ImportError as e:
        raise BlitzgenError(f"`blitzgen serve` needs the server extras ({e.name} is missing): "
                            "pip install 'blitzgen[serve]'") from None
    if args.max_queue < 0:
        raise InvalidRequestError(f"--max-queue must be >= 0, got {args.max_queue}")
    if not 0 <= args.port < 65536:
        raise InvalidRequestError(f"--port must be between 0 and 65535, got {args.port}")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise InvalidRequestError(f"--max-model-len must be at least 2, got {args.max_model_len}")
    if args.max_request_tokens is not None and args.max_request_tokens < 1:
        raise InvalidRequestError(f"--max-request-tokens must be >= 1, got {args.max_request_tokens}")
    for name in ("drain_timeout", "body_timeout"):
        if not getattr(args, name) > 0:
            raise InvalidRequestError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    prompt_cache = prompt_cache_bounds(args)
    check_model(args.model)
    if getattr(args, "draft_model", None):
        check_model(args.draft_model)
    tp = None
    if getattr(args, "tp", None) is not None:  # rank 0 serves; the other ranks follow it
        from ..parallel import serve as tp_serve
        from .common import tp_spec

        spec = tp_spec(args)
        if tp_serve.torchrun_follower(args.tp, spec):
            return 0
        tp_serve.check(args.tp, spec)
        tp = tp_serve.TPServing(args.tp, spec, log=log.info)
    sock = bind(args.host, args.port)  # before the slow part, so a busy port fails now
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from ..server.guard import default_allowed_hosts
    from .common import load_engine

    from .speculate import server_speculation

    loader = tp.load if tp is not None else lambda: load_engine(args, log=log.info)
    engine = Engine(loader, max_queue=args.max_queue, speculation=server_speculation(args, log=log.info),
                    prompt_cache=prompt_cache)
    app = create_app(engine, api_key=args.api_key, served_model_name=args.served_model_name,
                     max_request_tokens=args.max_request_tokens, body_timeout=args.body_timeout,
                     allowed_hosts=default_allowed_hosts(args.host, args.allowed_hosts))
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, log_config=None,
                            timeout_keep_alive=5, timeout_graceful_shutdown=10)  # log_config=None: our format
    server = DrainingServer(config, engine, drain_timeout=args.drain_timeout)
    engine.on_failure = server.exit_now
    if tp is not None:
        tp.attach(engine, server)
    port = sock.getsockname()[1]
    log.info("loading the model; the chat page will be at http://%s:%d/", _url_host(args.host), port)
    _run_quietly_on_sigterm(server, sock)
    if tp is not None and not engine.worker_alive:  # the followers finish (a busy worker: os._exit below)
        tp.stop()
    if engine.worker_alive:  # still in an aborted prefill: exiting under it would abort the process (134)
        log.warning("the engine thread is still busy; exiting without waiting for it")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1 if engine.state == "failed" else 0)
    if engine.state == "failed":
        if isinstance(engine.error, BlitzgenError):
            raise engine.error
        return 1
    return 0


def prompt_cache_bounds(args) -> tuple[int, int] | None:
    """(entries, bytes) of the saved prompt prefixes the flags ask for; None: the defaults. Raises
    InvalidRequestError for a bad value."""
    from ..errors import InvalidRequestError

    entries, size = getattr(args, "prompt_cache_entries", None), getattr(args, "prompt_cache_bytes", None)
    if entries is None and size is None:
        return None
    from ..prefix_cache import DEFAULT_BYTES, DEFAULT_ENTRIES, parse_bytes

    if entries is not None and entries < 0:
        raise InvalidRequestError(f"--prompt-cache-entries must be >= 0, got {entries}")
    try:
        nbytes = DEFAULT_BYTES if size is None else parse_bytes(size)
    except ValueError as e:
        raise InvalidRequestError(f"--prompt-cache-bytes: {e}") from None
    return (DEFAULT_ENTRIES if entries is None else entries, nbytes)


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_model(spec: str | None) -> None:
    """Fail in one line, before binding or loading, when --model names nothing loadable here (a Hub
    repo id is left for the loader, which may download it)."""
    from ..loading import default_model_path, detect_kind, resolve

    if spec is None:
        default_model_path()
        return
    path = Path(spec).expanduser()
    if path.exists():
        detect_kind(path)
    elif not _REPO_ID.match(spec) or spec.startswith((".", "/")):
        resolve(spec)  # raises "model not found"


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (listening starts in uvicorn); a one-line error when it cannot be."""
    from ..errors import BlitzgenError

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise BlitzgenError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise BlitzgenError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _run_quietly_on_sigterm(server, sock) -> None:
    """Run uvicorn. After a graceful SIGTERM shutdown uvicorn re-raises the signal with the handler
    it found; a no-op one there lets the process exit 0 instead of dying of the signal."""
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
