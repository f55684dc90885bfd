"""Soak a running ``blitzgen serve`` with mixed traffic, and report the server process's resources.

    blitzgen serve --port 8000 &           # (BLITZGEN_API_KEY=... to test with a key)
    python benchmarks/server_soak.py --port 8000 --seconds 300 [--api-key KEY] [--clients 4]

Loopback only: the script refuses any other host. Each client loops until the deadline over a mix of
requests, each with a timeout and few tokens: short chats (streamed or not, n up to 2), completions
with a new prompt length each time, streams dropped after the first chunks, non-streamed requests
whose client leaves, bad requests (400/415 expected), and /health, /metrics, /v1/models. It reports
the answers by status, any 5xx or transport errors, and the server's RSS, threads and open file
descriptors at the start, every 10 seconds, and at the end (psutil; the server is found by its
listening port, or give --pid).
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import threading
import time
from collections import Counter

import httpx
import psutil

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def find_server(port: int) -> psutil.Process:
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return psutil.Process(conn.pid)
    raise SystemExit(f"no process listens on port {port} (or it is not visible: pass --pid)")


def resources(proc: psutil.Process) -> dict:
    with proc.oneshot():
        return {"rss_mib": round(proc.memory_info().rss / 2**20, 1), "threads": proc.num_threads(),
                "fds": proc.num_fds()}


class Client(threading.Thread):
    def __init__(self, url: str, headers: dict, deadline: float, seed: int, stats: Counter, lock: threading.Lock,
                 max_words: int = 200):
        super().__init__(daemon=True)
        self.max_words = max_words
        self.url, self.headers, self.deadline = url, headers, deadline
        self.rng = random.Random(seed)
        self.stats, self.lock = stats, lock

    def count(self, key: str) -> None:
        with self.lock:
            self.stats[key] += 1

    def run(self) -> None:
        actions = [self.chat, self.chat, self.completion, self.completion, self.dropped_stream,
                   self.vanished_client, self.bad_request, self.gets]
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=120) as http:
            self.http = http
            while time.monotonic() < self.deadline:
                action = self.rng.choice(actions)
                try:
                    action()
                except httpx.HTTPError as e:
                    self.count(f"transport error: {type(e).__name__}")

    def record(self, name: str, status: int) -> None:
        self.count(f"{name} {status}")
        if status >= 500:
            self.count("5xx")

    def chat(self) -> None:
        body = {"messages": [{"role": "user", "content": self.rng.choice(["Hi", "Name a color.", "2+2?"])}],
                "max_tokens": self.rng.randint(1, 16), "temperature": self.rng.choice([0, 0.8]),
                "n": self.rng.choice([1, 1, 2])}
        if self.rng.random() < 0.5:
            with self.http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                lines = [line for line in r.iter_lines() if line]
            ok = r.status_code != 200 or (lines and lines[-1] == "data: [DONE]")
            self.record("chat stream" if ok else "chat stream (no [DONE])", r.status_code)
        else:
            self.record("chat", self.http.post("/v1/chat/completions", json=body).status_code)

    def completion(self) -> None:
        words = self.rng.randint(1, self.max_words)  # a new prompt length almost every time
        prompt = " ".join(self.rng.choice(["alpha", "beta", "gamma", "delta", "7", "\u00e9t\u00e9", "\u6771"])
                          for _ in range(words))
        r = self.http.post("/v1/completions", json={"prompt": prompt, "max_tokens": self.rng.randint(1, 8)})
        self.record("completion", r.status_code)

    def dropped_stream(self) -> None:
        body = {"prompt": "1, 2, 3,", "max_tokens": 64, "stream": True}
        with self.http.stream("POST", "/v1/completions", json=body) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i >= 2:
                    break
        self.record("dropped stream", r.status_code)

    def vanished_client(self) -> None:
        """A non-streamed request whose client closes the socket after a moment."""
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        body = json.dumps({"prompt": "Count: 1, 2, 3,", "max_tokens": 64}).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in self.headers.items()) + "\r\n")
        with socket.create_connection((host.strip("[]"), int(port)), timeout=30) as s:
            s.sendall(head.encode() + body)
            time.sleep(self.rng.uniform(0.05, 0.5))
        self.count("vanished client")

    def bad_request(self) -> None:
        cases = [
            ("POST", "/v1/chat/completions", {"content": b"{oops", "headers": {"Content-Type": "application/json"}}),
            ("POST", "/v1/chat/completions", {"json": {"messages": [{"role": "banana", "content": "x"}]}}),
            ("POST", "/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": "x"}],
                                                       "tools": [{"type": "function"}]}}),
            ("POST", "/v1/completions", {"content": b'{"prompt": "a\\ud800"}',
                                         "headers": {"Content-Type": "application/json"}}),
            ("POST", "/v1/completions", {"content": b'{"prompt": "x"}', "headers": {"Content-Type": "text/plain"}}),
            ("POST", "/v1/completions", {"json": {"prompt": "x" * 200_000}}),
        ]
        method, path, kw = self.rng.choice(cases)
        self.record("bad request", self.http.request(method, path, **kw).status_code)

    def gets(self) -> None:
        for path in ("/health", "/metrics", "/v1/models"):
            self.record(f"GET {path}", self.http.get(path).status_code)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--seconds", type=float, default=300)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--api-key", default=None)
    p.add_argument("--pid", type=int, default=None)
    p.add_argument("--max-prompt-words", type=int, default=200, help="completion prompts have 1 to this many words")
    args = p.parse_args()
    if args.host not in LOOPBACK:
        raise SystemExit("server_soak.py only targets a server on this machine (127.0.0.1, localhost, ::1)")
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{args.port}"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    proc = psutil.Process(args.pid) if args.pid else find_server(args.port)
    if httpx.get(url + "/health", timeout=10).status_code != 200:
        raise SystemExit(f"{url}/health is not 200: is the model loaded?")

    start = resources(proc)
    print(f"server pid {proc.pid}; start: {start}", flush=True)
    stats: Counter = Counter()
    lock = threading.Lock()
    t0 = time.monotonic()
    deadline = t0 + args.seconds
    clients = [Client(url, headers, deadline, seed, stats, lock, args.max_prompt_words) for seed in range(args.clients)]
    for c in clients:
        c.start()
    samples = [(0.0, start)]
    while any(c.is_alive() for c in clients):
        time.sleep(min(10.0, max(0.1, deadline - time.monotonic() + 0.1)))
        if time.monotonic() - t0 >= samples[-1][0] + 10:
            samples.append((round(time.monotonic() - t0), resources(proc)))
            print(f"{samples[-1][0]:>5} s: {samples[-1][1]}", flush=True)
    for c in clients:
        c.join(180)
    time.sleep(2)  # let aborted generations and closed sockets settle
    end = resources(proc)
    print(f"end ({time.monotonic() - t0:.0f} s): {end}")
    print(f"peak RSS {max(s['rss_mib'] for _, s in samples + [(0, end)])} MiB")
    for key, n in sorted(stats.items()):
        print(f"  {n:>6}  {key}")
    print(json.dumps({"seconds": args.seconds, "clients": args.clients, "start": start, "end": end,
                      "requests": sum(stats.values()), "5xx": stats.get("5xx", 0),
                      "transport_errors": sum(n for k, n in stats.items() if k.startswith("transport"))}))


if __name__ == "__main__":
    main()
