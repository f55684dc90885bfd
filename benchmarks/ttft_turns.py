"""Time to first token of a chat's 5th turn, with and without the prompt cache (issue 13).

A conversation of --turns turns whose history before the last turn is about --history tokens: each
user message is filler text (or random token ids for a random-weight --shape), each answer is the
model's own greedy reply of at most --answer-tokens tokens. Measured, for the last turn's prompt
(one new token generated, so the figure is prefill + first sample, synchronized):

- cold:     a Generator whose cache holds nothing (prefix store cleared): the whole prompt is prefilled;
- warm:     the same Generator right after turns 1..N-1 (the live cache holds the history);
- restored: turns 1..N-1, then two turns of another conversation (same system prompt), then the
            last turn: the history comes back from a saved prefix (PrefixStore), copied in place;
- live-only: the same as restored with the store off (--prompt-cache-entries 0 behaviour): only
            the shared system prompt is reused.

Each figure is the median of --reps repetitions; the conversation is replayed untimed before every
warm/restored repetition (state cleared first), so every repetition starts from the same state.

    python benchmarks/ttft_turns.py                                    # CPU, the default SmolLM2-135M
    python benchmarks/ttft_turns.py --shape llama-3-8b --device cuda   # H200, random weights
    ... [--compile [--compile-prefill]] [--dtype bfloat16] [--json out.json]

With --compile-prefill (prefill compiled per power-of-two bucket) one untimed repetition runs
first, so that every bucket the scenarios hit is compiled before timing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FILLER = ("The committee reviewed the quarterly figures, compared them with the previous year and noted "
          "that shipping costs rose while returns fell. Several members asked for a breakdown by region, "
          "by product line and by sales channel, and for an estimate of next year's demand. ")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "?"


class Conversation:
    """Prompts of a chat, turn by turn: rendered with the chat template (a tokenizer), or as token ids
    (random weights: system ids, then per turn user ids + a fixed 3-token header + the answer)."""

    def __init__(self, tok, system: str, user_tokens: list[int], seed: int, vocab: int):
        import torch

        self.tok, self.user_tokens = tok, user_tokens
        g = torch.Generator().manual_seed(seed)
        if tok is not None:
            words = tok.encode(FILLER * (1 + max(user_tokens) // 40))
            self.messages = [{"role": "system", "content": system}]
            self.users = []
            for i, n in enumerate(user_tokens):
                start = int(torch.randint(0, 40, (1,), generator=g))
                self.users.append(f"Question {i + 1}: " + tok.decode(words[start:start + n]))
        else:
            hi = max(2, min(vocab, 30000))
            sys_gen = torch.Generator().manual_seed(0)  # one "system prompt" for every conversation
            self.ids = torch.randint(1, hi, (64,), generator=sys_gen).tolist()
            self.users = [torch.randint(1, hi, (n,), generator=g).tolist() for n in user_tokens]

    def prompt(self, turn: int) -> list[int]:
        """Turn `turn`'s (0-based) prompt; the answers of earlier turns must have been added."""
        if self.tok is not None:
            return self.tok.encode_chat(self.messages + [{"role": "user", "content": self.users[turn]}])
        return self.ids + self.users[turn] + [1, 2, 3]

    def add_answer(self, turn: int, answer: list[int]) -> None:
        if self.tok is not None:
            self.messages += [{"role": "user", "content": self.users[turn]},
                              {"role": "assistant", "content": self.tok.decode(answer)}]
        else:
            self.ids = self.ids + self.users[turn] + [1, 2, 3] + answer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model source (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--shape", default=None, help="random weights of a named shape instead, e.g. llama-3-8b")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--compile", action="store_true", help="compiled decode (warmed up before timing)")
    ap.add_argument("--compile-prefill", action="store_true",
                    help="with --compile: prefill compiled per bucket (an untimed repetition compiles them)")
    ap.add_argument("--history", type=int, default=1500, help="tokens of history before the last turn")
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--last-user-tokens", type=int, default=48)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only", default="cold,warm,restored,live_only",
                    help="comma-separated scenarios to time (cold is always timed)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    import torch

    from blitzgen.generate import GenerationStats, Generator
    from blitzgen.loading import load, load_random
    from blitzgen.runtime import RuntimeOptions
    from blitzgen.sampling import SamplingParams

    opts = RuntimeOptions.from_env(device=a.device, dtype=a.dtype, compile=a.compile,
                                   compile_prefill=a.compile_prefill).resolved()
    t0 = time.perf_counter()
    if a.shape:
        lm = load_random(a.shape, opts, progress=False)
    else:
        lm = load(a.model, opts, progress=False)
    log(f"loaded {lm.name} on {opts.device} ({opts.dtype}) in {time.perf_counter() - t0:.1f} s")
    dev = torch.device(opts.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    tok = lm.tokenizer if not a.shape else None
    gen = Generator(lm.model, tok, options=opts, compile=a.compile)
    greedy = SamplingParams(temperature=0.0)
    stop = None if tok is not None else ()
    turns = a.turns
    per_user = max(8, (a.history - (turns - 1) * (a.answer_tokens + 12) - 64) // (turns - 1))
    users = [per_user] * (turns - 1) + [a.last_user_tokens]

    # one cache size for every run (growing it mid-run would change what is timed)
    gen.ensure_capacity(min(gen.max_model_len, 2 * a.history + 4 * a.answer_tokens + 512))

    def conversation(seed: int, system: str) -> Conversation:
        return Conversation(tok, system, users, seed, lm.args.vocab_size)

    def answer(prompt: list[int]) -> list[int]:
        return list(gen.generate_ids(prompt, a.answer_tokens, greedy, stop_token_ids=stop))

    def play(conv: Conversation, upto: int) -> None:
        for t in range(upto):
            conv.add_answer(t, answer(conv.prompt(t)))

    def ttft(prompt: list[int]) -> tuple[float, int]:
        stats = GenerationStats()
        sync()
        t = time.perf_counter()
        for _ in gen.generate_ids(prompt, 1, greedy, stop_token_ids=(), stats=stats):
            sync()
            break
        return time.perf_counter() - t, stats.cached_tokens

    system = "You are a careful analyst. Answer in two sentences."
    # one untimed pass: the answers (greedy, deterministic) and the cache size, then the warm-up
    probe = conversation(1, system)
    play(probe, turns - 1)
    last = probe.prompt(turns - 1)
    if a.compile:
        log(f"warm-up (compile): {gen.warmup([greedy], prompt_len=16):.1f} s")
    log(f"history {len(last) - users[-1]} tokens; last turn's prompt {len(last)} tokens")

    only = {"cold", *a.only.split(",")}
    results: dict = {k: [] for k in ("cold", "warm", "restored", "live_only") if k in only}
    cached: dict = {}
    untimed = 1 if a.compile and a.compile_prefill else 0
    for rep in range(untimed + a.reps):
        if rep == untimed and untimed:
            results = {k: [] for k in results}
            log("untimed repetition done (prefill buckets compiled)")
        gen.prefixes.clear()
        dt, cached["cold"] = ttft(last)
        results["cold"].append(dt)

        if "warm" in only:
            gen.prefixes.clear()
            conv = conversation(1, system)
            play(conv, turns - 1)
            assert conv.prompt(turns - 1) == last, "the replayed conversation differs"
            dt, cached["warm"] = ttft(last)
            results["warm"].append(dt)

        for key, entries in (("restored", 8), ("live_only", 0)):
            if key not in only:
                continue
            gen.prefixes.clear()
            gen.configure_prompt_cache(entries, 1 << 30)
            play(conversation(1, system), turns - 1)
            play(conversation(2, system), 2)  # another conversation, same system prompt
            dt, cached[key] = ttft(last)
            results[key].append(dt)
        gen.configure_prompt_cache(8, 1 << 30)
        log(f"rep {rep + 1}/{a.reps}: " + ", ".join(f"{k} {v[-1] * 1e3:.1f} ms" for k, v in results.items()))

    med = {k: statistics.median(v) for k, v in results.items()}
    best = {k: min(v) for k, v in results.items()}  # the least disturbed run (a shared machine)
    out = {
        "model": lm.name, "device": opts.device, "dtype": opts.dtype, "compile": a.compile, "compile_prefill": a.compile_prefill,
        "hardware": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "load_avg": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "prompt_tokens": len(last), "cached_tokens": cached,
        "ttft_ms": {k: v * 1e3 for k, v in med.items()}, "min_ttft_ms": {k: v * 1e3 for k, v in best.items()},
        "runs_ms": {k: [x * 1e3 for x in v] for k, v in results.items()},
        "speedup": {k: med["cold"] / v for k, v in med.items()},
        "speedup_min": {k: best["cold"] / v for k, v in best.items()},
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    print(f"{out['model']} on {out['hardware']} ({out['device']}, {out['dtype']}{', compiled' if a.compile else ''}{' + prefill' if a.compile_prefill else ''}), "
          f"torch {out['torch']}; turn {turns} prompt {len(last)} tokens; {a.reps} runs")
    for k in results:
        print(f"  {k:<10} TTFT median {med[k] * 1e3:9.1f} ms ({med['cold'] / med[k]:5.1f}x vs cold), "
              f"min {best[k] * 1e3:9.1f} ms ({best['cold'] / best[k]:5.1f}x)   cached {cached[k]:5d} tokens")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
