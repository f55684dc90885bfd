"""A small async load client for an OpenAI-compatible server (``blitzgen serve``, vLLM, llama.cpp).

Sends --num-requests streamed requests, --concurrency at a time, and reports percentiles of time to
first token, inter-token latency (the gaps between streamed chunks) and end-to-end latency, plus the
throughput. Needs only httpx.

    python benchmarks/load_client.py --url http://127.0.0.1:8000 --num-requests 20 --concurrency 1 \\
        --max-tokens 64 --temperature 0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class Result:
    ok: bool
    status: int = 200
    error: str = ""
    ttft: float = 0.0
    e2e: float = 0.0
    tokens: int = 0
    gaps: list[float] = field(default_factory=list)


async def one_request(client: httpx.AsyncClient, args) -> Result:
    if args.completions:
        path, body = "/v1/completions", {"prompt": args.prompt}
    else:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": args.prompt}]}
    body.update(max_tokens=args.max_tokens, temperature=args.temperature, stream=True,
                stream_options={"include_usage": True})
    if args.model:
        body["model"] = args.model
    t0 = time.perf_counter()
    last = None
    res = Result(ok=True)
    pieces = 0
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return Result(ok=False, status=r.status_code, error=r.text[:200])
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return Result(ok=False, error=chunk["error"]["message"])
            if chunk.get("usage"):
                res.tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices") or []:
                text = choice.get("text") if args.completions else (choice.get("delta") or {}).get("content")
                if not text:
                    continue
                now = time.perf_counter()
                if last is None:
                    res.ttft = now - t0
                else:
                    res.gaps.append(now - last)
                last = now
                pieces += 1
    res.e2e = time.perf_counter() - t0
    res.tokens = res.tokens or pieces
    return res


def percentiles(values: list[float], unit: float = 1000.0) -> str:
    if not values:
        return "n/a"
    v = sorted(values)

    def pct(p):
        return v[min(len(v) - 1, round(p / 100 * (len(v) - 1)))] * unit

    return (f"mean {statistics.mean(v) * unit:8.1f}  p50 {pct(50):8.1f}  p90 {pct(90):8.1f}  "
            f"p99 {pct(99):8.1f}  max {v[-1] * unit:8.1f}")


async def run(args) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limit = asyncio.Semaphore(args.concurrency)

    async def guarded(client):
        async with limit:
            try:
                return await one_request(client, args)
            except httpx.HTTPError as e:
                return Result(ok=False, status=0, error=f"{type(e).__name__}: {e}")

    async with httpx.AsyncClient(base_url=args.url.rstrip("/"), headers=headers, timeout=httpx.Timeout(10, read=None),
                                 limits=httpx.Limits(max_connections=args.concurrency + 4)) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(guarded(client) for _ in range(args.num_requests)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    print(f"{len(ok)}/{len(results)} requests succeeded in {wall:.2f} s (concurrency {args.concurrency}, "
          f"max_tokens {args.max_tokens})")
    for r in failed[:5]:
        print(f"  failed: status {r.status} {r.error}", file=sys.stderr)
    if not ok:
        return 1
    tokens = sum(r.tokens for r in ok)
    print("latency, ms")
    print(f"time to first token   {percentiles([r.ttft for r in ok])}")
    print(f"inter-token latency   {percentiles([g for r in ok for g in r.gaps])}")
    print(f"end to end            {percentiles([r.e2e for r in ok])}")
    print(f"generated tokens: {tokens} ({tokens / len(ok):.1f} per request), throughput {tokens / wall:.2f} tokens/s, "
          f"per request {statistics.mean(r.tokens / r.e2e for r in ok):.2f} tokens/s")
    return 0 if not failed else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="model name to send (default: none; the server's own)")
    p.add_argument("--num-requests", type=int, default=10)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--prompt", default="Write a short story about a robot who learns to paint.")
    p.add_argument("--completions", action="store_true", help="use /v1/completions (raw prompt) instead of chat")
    args = p.parse_args(argv)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
