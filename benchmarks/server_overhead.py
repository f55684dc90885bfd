"""What serving costs: the engine's tokens/s called directly vs. through the HTTP streaming API.

Loads the model once and starts the real server app on it (uvicorn in a thread of this process, as
``blitzgen serve`` runs it). Then, in turns, times greedy generation of a fixed prompt with the
Generator called directly, and the same request streamed over loopback HTTP with httpx. Prints both
speeds (end to end, and decode only), the time to first token and the overhead in percent. The
prompt is a raw completion that greedy decoding keeps continuing, so every run generates exactly
--max-tokens tokens.

    python benchmarks/server_overhead.py --max-tokens 64 --runs 3            # CPU
    python benchmarks/server_overhead.py --device cuda --max-tokens 256 --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import httpx  # noqa: E402

PROMPT = "1, 2, 3, 4, 5, 6, 7, 8,"


def direct_once(pool: ThreadPoolExecutor, gen, ids, max_tokens: int) -> tuple[float, float, float]:
    """(tokens/s end to end, decode tokens/s, first-token seconds) of one greedy run on the Generator,
    in `pool`'s one long-lived thread, as the server's engine runs it (torch's thread pools and CUDA
    graphs are per thread, and the main thread's can behave differently)."""
    from blitzgen.sampling import SamplingParams

    def work():
        t0 = time.perf_counter()
        t_first = t_last = None
        for d in gen.stream(ids, max_tokens, SamplingParams(temperature=0.0)):
            if d.token_ids:
                t_last = time.perf_counter()
                t_first = t_first or t_last
        assert d.stats.generated_tokens == max_tokens, "the model stopped early: choose another prompt"
        return _rates(max_tokens, t0, t_first, t_last)

    return pool.submit(work).result()


def server_once(client: httpx.Client, max_tokens: int) -> tuple[float, float, float]:
    """The same measurement on the client side of a streamed /v1/completions request."""
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    t_first = t_last = None
    tokens = 0
    with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                t_last = time.perf_counter()
                t_first = t_first or t_last
    assert tokens == max_tokens, f"the server generated {tokens} tokens"
    return _rates(tokens, t0, t_first, t_last)


def _rates(tokens: int, t0: float, t_first: float, t_last: float) -> tuple[float, float, float]:
    decode = (tokens - 1) / (t_last - t_first) if tokens > 1 and t_last > t_first else 0.0
    return tokens / (t_last - t0), decode, t_first - t0


def start_server(lm, gen, port: int):
    """uvicorn in a thread, serving the already loaded model; returns (server, thread, url)."""
    import uvicorn

    from blitzgen.server.app import create_app
    from blitzgen.server.engine import Engine

    engine = Engine(lambda: (lm, gen), max_queue=4)
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return server, thread, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            raise SystemExit("the server did not become ready")
        time.sleep(0.1)


def main(argv=None) -> int:
    from blitzgen.commands.common import add_model_args, load_engine

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--port", type=int, default=0, help="default: a free port")
    args = p.parse_args(argv)
    if not args.port:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            args.port = sock.getsockname()[1]

    lm, gen = load_engine(args)
    ids = lm.tokenizer.encode(PROMPT)
    gen.ensure_capacity(len(ids) + args.max_tokens)
    server, thread, url = start_server(lm, gen, args.port)  # its engine warms the model up
    local, remote = [], []
    try:
        with httpx.Client(base_url=url, timeout=httpx.Timeout(10, read=None)) as client, \
                ThreadPoolExecutor(1, thread_name_prefix="direct") as pool:
            direct_once(pool, gen, ids, args.max_tokens)  # warm the exact shapes on both paths
            server_once(client, args.max_tokens)
            for _ in range(args.runs):  # interleaved, so drifting machine load hits both alike
                local.append(direct_once(pool, gen, ids, args.max_tokens))
                remote.append(server_once(client, args.max_tokens))
    finally:
        server.should_exit = True
        thread.join(60)

    def med(rows, i):
        return statistics.median(r[i] for r in rows)

    print(f"\n{lm.name} on {gen.device}{' (compiled)' if gen.compiled else ''}: greedy, {len(ids)} prompt tokens, "
          f"{args.max_tokens} new tokens, median of {args.runs} runs")
    print(f"{'':24}{'tokens/s':>10}{'decode tok/s':>14}{'first token':>14}")
    for name, rows in (("engine (in-process)", local), ("server (HTTP + SSE)", remote)):
        print(f"{name:24}{med(rows, 0):10.2f}{med(rows, 1):14.2f}{med(rows, 2) * 1000:11.1f} ms")
    for i, what in ((0, "end to end"), (1, "decode")):
        print(f"overhead ({what}): {(1 - med(remote, i) / med(local, i)) * 100:+.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
