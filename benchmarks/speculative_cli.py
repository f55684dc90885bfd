"""Plain against speculative decoding through the user's command, `blitzgen generate`, each run a
fresh process on the default path (on the CPU: SmolLM2 as int4 g32 in bf16), stopping at the end
of the answer. Prints one JSON line per run: decode tokens/s, tokens, and the speculation line.

    python3 benchmarks/speculative_cli.py --prompts summarize,chat --runs 2 [--tree old=/tmp/old/src]

``--tree NAME=SRC`` (repeatable) alternates source trees (PYTHONPATH) run by run; default: this one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speculative_bench import PROMPTS  # noqa: E402


def run(src: str, prompt: str, extra: list[str], new_tokens: int) -> dict:
    cmd = [sys.executable, "-m", "blitzgen", "generate", "--prompt", prompt, "--max-new-tokens", str(new_tokens),
           "--temperature", "0", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": src})
    err = r.stderr
    decode = re.findall(r"decode ([\d.]+) tokens/sec", err)
    tokens = re.findall(r"(\d+) tokens,", err)
    spec = [line for line in err.splitlines() if line.startswith("Speculation:")]
    return {"rc": r.returncode, "decode_tok_s": float(decode[0]) if decode else None,
            "tokens": int(tokens[0]) if tokens else None, "speculation": spec[0] if spec else "",
            **({"stderr_tail": err[-1500:]} if r.returncode else {})}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", default=",".join(PROMPTS))
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--speculate", default="ngram", help="the --speculate source compared with plain")
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=SRC")
    a = ap.parse_args(argv)
    trees = dict(t.split("=", 1) for t in a.tree) or {"this": str(Path(__file__).resolve().parents[1] / "src")}
    for rep in range(a.runs):
        for p in a.prompts.split(","):
            for name, src in trees.items():
                for spec in ([], ["--speculate", a.speculate]):
                    row = {"run": rep, "prompt": p, "tree": name, "speculate": spec[1] if spec else None,
                           **run(src, PROMPTS[p], spec, a.new_tokens)}
                    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
