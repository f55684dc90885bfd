"""Replay n-gram prompt lookup over a model's own greedy outputs (issue 11): what the proposer and
the adaptive controller would gain at a given verify cost, without timing anything.

Each prompt of speculative_bench.PROMPTS is decoded once, greedily, with plain decoding (CPU,
float32, the default SmolLM2-135M unless --model); then the speculative loop is replayed on those
tokens: a plain step costs 1, a verify of k drafts costs --verify-costs (c_v, a verify's time over a
step's), n drafts accepted emit n + 1 tokens. The figure is the ideal speedup (tokens / cost): host
overhead and the pipeline drained around each verify are not in it.

    python benchmarks/ngram_replay.py [--new-tokens 200] [--verify-costs 1.1,1.4] [--min-match 1,2,3]
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))
sys.path.insert(0, HERE)


def replay(prompt: list[int], out: list[int], min_match: int, verify_cost: float, k_max: int = 4,
           n_max: int = 3) -> tuple[float, int]:
    """(ideal speedup, verify steps) of the n-gram decoder on a known greedy output."""
    from blitzgen.speculative_control import AdaptiveK
    from blitzgen.speculative_draft import NgramDraft

    draft, ctl = NgramDraft(n_max=n_max, min_match=min_match), AdaptiveK(k_max, verify_cost=verify_cost)
    draft.reset(prompt)
    p = verifies = 0
    cost = 0.0
    while p < len(out):
        k = min(ctl.next_k(), len(out) - p - 1)
        prop = draft.propose(k) if k > 0 else []
        if prop and ctl.on and ctl.gain(len(prop)) < ctl.min_gain:
            prop = []
        if not prop:  # a plain step; while off, the draft's guess is checked for free
            if not ctl.on and (guess := draft.propose(1)):
                ctl.observe(1, int(guess[0] == out[p]))
            new, cost = [out[p]], cost + 1
        else:
            n = 0
            while n < len(prop) and prop[n] == out[p + n]:
                n += 1
            new, cost, verifies = out[p:p + n + 1], cost + verify_cost, verifies + 1
            ctl.update(len(prop), n)
        draft.extend(new)
        p += len(new)
    return len(out) / cost, verifies


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--verify-costs", default="1.1,1.4")
    ap.add_argument("--min-match", default="1,2,3")
    a = ap.parse_args()

    import torch

    from blitzgen.generate import Generator
    from blitzgen.loading import load
    from blitzgen.sampling import SamplingParams
    from speculative_bench import PROMPTS

    lm = load(a.model, device="cpu", dtype="float32", progress=False)
    gen = Generator(lm.model, lm.tokenizer)
    runs = {}
    with torch.inference_mode():
        for name, text in PROMPTS.items():
            ids = lm.tokenizer.encode_chat([{"role": "user", "content": text}])
            runs[name] = (ids, list(gen.generate_ids(ids, a.new_tokens, SamplingParams(temperature=0.0),
                                                     stop_token_ids=())))
    print(f"{lm.name}, greedy, {a.new_tokens} tokens per prompt; ideal speedup (verify steps)")
    for cv in (float(x) for x in a.verify_costs.split(",")):
        for m in (int(x) for x in a.min_match.split(",")):
            cells = [f"{name} {s:.2f}x ({v})" for name, (s, v) in
                     ((n, replay(ids, out, m, cv)) for n, (ids, out) in runs.items())]
            print(f"c_v {cv:.2f}, shortest match {m}: " + ", ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
