"""The per-token cost of logprobs and of a grammar mask, through the server (HTTP + SSE), vs plain decode.

Loads the model once, serves it in this process (benchmarks/server_overhead.py's server), and times greedy
streamed /v1/completions requests that all generate exactly --max-tokens tokens (the prompt counts, and
the grammar, an array of at least 1000 integers, never lets it stop): plain; logprobs=0; logprobs=5
(the top 20 are computed on device either way); a json_schema grammar; grammar + logprobs. Also, in
process, constrained.py's loop with neither (what the loop itself costs against the fused decode step).
Runs are interleaved; medians are printed.

    python benchmarks/api_features_overhead.py --max-tokens 64 --runs 3     # CPU, the default model
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import httpx  # noqa: E402
from server_overhead import PROMPT, _rates, start_server  # noqa: E402

GRAMMAR = {"type": "json_schema", "json_schema": {"name": "count", "schema": {
    "type": "array", "items": {"type": "integer"}, "minItems": 1000}}}
VARIANTS = {
    "plain": {},
    "logprobs=0": {"logprobs": 0},
    "logprobs=5": {"logprobs": 5},
    "json_schema": {"response_format": GRAMMAR},
    "json_schema + logprobs=5": {"response_format": GRAMMAR, "logprobs": 5},
}


def server_once(client: httpx.Client, max_tokens: int, extra: dict) -> tuple[float, float, float]:
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **extra}
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
            if chunk["choices"] and (chunk["choices"][0]["text"] or chunk["choices"][0]["logprobs"]):
                t_last = time.perf_counter()
                t_first = t_first or t_last
    assert tokens == max_tokens, f"{extra}: the server generated {tokens} tokens"
    return _rates(tokens, t0, t_first, t_last)


def loop_once(pool, gen, ids, max_tokens: int, constrained_loop: bool) -> float:
    """Decode tokens/s in process: Generator.stream, or constrained.stream with no grammar nor logprobs."""
    from blitzgen import constrained
    from blitzgen.sampling import SamplingParams

    def work():
        fn = constrained.stream if constrained_loop else type(gen).stream
        for d in fn(gen, ids, max_tokens, SamplingParams(temperature=0.0)):
            pass
        return d.stats.decode_tokens_per_second

    return pool.submit(work).result()


def micro(lm, vocab: int, reps: int = 200) -> None:
    """Per-token CPU cost of the extra work alone, on logits of the real vocabulary width: the logprob
    row (log-softmax, gather, top-20, one read-back) and the grammar mask (fill the bitmask, apply it)
    plus the matcher's advance, against a grammar that writes an integer array token by token."""
    import torch

    from blitzgen.logprobs import logprob_rows, unpack
    from blitzgen.sampling import SamplingParams, sample
    from blitzgen.structured import GrammarConstraint

    logits = torch.randn(1, vocab)
    samp, mode = SamplingParams(temperature=0.0).tensors("cpu"), SamplingParams(temperature=0.0).mode

    def per_call(fn) -> float:
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps * 1e3

    tok = sample(logits, samp, mode, None)
    lp = per_call(lambda: unpack(logprob_rows(logits, tok, 20)[0].cpu(), int(tok[0]), 5))
    c = GrammarConstraint.from_response_format(GRAMMAR, lm.tokenizer, vocab)
    text = "[" + ", ".join(str(i) for i in range(1, 400))
    ids = lm.tokenizer.encode(text, add_special_tokens=False)
    it = iter(ids)

    def grammar_step():
        nonlocal it
        masked = c.apply(logits)
        t = next(it, None)
        if t is None:
            c.reset()
            it = iter(ids)
            t = next(it)
        c.advance(t)
        return masked

    gm = per_call(grammar_step)
    print(f"per token, extra work alone on {vocab}-wide logits (CPU, median machine load):")
    print(f"  logprobs (top 20 on device + read-back): {lp:.3f} ms")
    print(f"  grammar mask (fill + apply + advance):    {gm:.3f} ms")


def main(argv=None) -> int:
    from blitzgen.commands.common import add_model_args, load_engine

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--micro-only", action="store_true", help="only the per-token cost of the extra work")
    args = p.parse_args(argv)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    lm, gen = load_engine(args)
    micro(lm, lm.args.vocab_size)
    if args.micro_only:
        return 0
    ids = lm.tokenizer.encode(PROMPT)
    gen.ensure_capacity(len(ids) + args.max_tokens)
    server, thread, url = start_server(lm, gen, port)
    rows: dict[str, list] = {k: [] for k in VARIANTS}
    loops: dict[str, list] = {"Generator.stream": [], "constrained.stream": []}
    try:
        with httpx.Client(base_url=url, timeout=httpx.Timeout(10, read=None)) as client, \
                ThreadPoolExecutor(1, thread_name_prefix="direct") as pool:
            for extra in VARIANTS.values():  # warm-up, the grammar compiler included
                server_once(client, 8, extra)
            for _ in range(args.runs):
                for name, extra in VARIANTS.items():
                    rows[name].append(server_once(client, args.max_tokens, extra))
                for name in loops:
                    loops[name].append(loop_once(pool, gen, ids, args.max_tokens, name.startswith("constrained")))
    finally:
        server.should_exit = True
        thread.join(60)

    print(f"\n{lm.name} on {gen.device}: greedy, {args.max_tokens} new tokens, median of {args.runs} runs")
    base = statistics.median(r[1] for r in rows["plain"])
    print(f"{'through the server':28}{'decode tok/s':>14}{'ms/token':>10}{'vs plain':>10}")
    for name, rs in rows.items():
        d = statistics.median(r[1] for r in rs)
        print(f"{name:28}{d:14.2f}{1000 / d:10.2f}{(1000 / d - 1000 / base):+9.2f}ms")
    print(f"{'in process (decode loop)':28}{'decode tok/s':>14}")
    for name, vals in loops.items():
        print(f"{name:28}{statistics.median(vals):14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
