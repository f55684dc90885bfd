"""``blitzgen serve``: the OpenAI-compatible HTTP server (FastAPI + uvicorn) with a chat page at ``/``.

uvicorn starts listening at once while the model loads (and compiles and warms up) in the engine's
thread: ``/health`` answers 503 until the model is ready. SIGTERM or Ctrl-C drains: new requests get
503, the running and queued ones finish, then the process exits.
"""

from __future__ import annotations

import logging
import os
import signal

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
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $BLITZGEN_API_KEY; "
                        "/health and /metrics stay open)")
    p.add_argument("--max-queue", type=int, default=16,
                   help="requests that may wait while one runs; more get 429 (default: 16)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name the API reports and accepts (default: the model file's name)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_model_args(p)
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
    if args.model is None:
        from ..loading import default_model_path

        default_model_path()  # fail now, in one line, when the default model is not installed
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from .common import load_engine

    engine = Engine(lambda: load_engine(args, log=log.info), max_queue=args.max_queue)
    app = create_app(engine, api_key=args.api_key, served_model_name=args.served_model_name)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, log_config=None,
                            timeout_keep_alive=5)  # log_config=None: uvicorn logs in our format
    server = DrainingServer(config, engine)
    engine.on_failure = server.exit_now
    log.info("loading the model; the chat page will be at http://%s:%d/", args.host, args.port)
    _run_quietly_on_sigterm(server)
    if engine.state == "failed":
        if isinstance(engine.error, BlitzgenError):
            raise engine.error
        return 1
    return 0


def _run_quietly_on_sigterm(server) -> None:
    """Run uvicorn. After a graceful SIGTERM shutdown uvicorn re-raises the signal with the handler
    it found; a no-op one there lets the process exit 0 instead of dying of the signal."""
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
