"""Where a speculative round's time goes on a launch-bound model (GPU, one process).

SmolLM2-135M's shape with random weights, compiled, greedy, no stop token. A scripted host draft
(its proposals are the plain run's own next tokens, or always wrong) isolates the round's cost from
the acceptance a real draft gets:

    plain    the Generator, pipelined (the baseline: seconds per token)
    never    the speculative decoder with a draft that never proposes (its plain runs alone)
    wrong    every round verifies k wrong drafts (1 token a round): the round's whole cost
    right    every round verifies k right drafts (k + 1 tokens a round, where bf16 agrees)

wrong and right run twice: with the round as one captured CUDA graph (speculative_graph.py, the
default) and through torch.compile's CUDA-graph wrapper (BLITZGEN_SPEC_GRAPH=0).

then a torch.profiler trace of `wrong` rounds: host ops and kernels per round.

    python3 benchmarks/spec_rounds_gpu.py --json $OUT/spec_rounds.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--profile-rounds", type=int, default=30)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--eager", action="store_true", help="no compile (a CPU smoke run)")
    a = ap.parse_args()

    from blitzgen.config import ModelArgs
    from blitzgen.generate import Generator
    from blitzgen.loading import load_random
    from blitzgen.sampling import SamplingParams
    from blitzgen.speculative import SpeculativeDecoder
    from blitzgen.speculative_draft import DraftSource

    dev = a.device

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()
    lm = load_random(ModelArgs.from_name(a.shape), device=dev, dtype=torch.bfloat16, progress=False)
    gen = Generator(lm.model, lm.tokenizer, compile=not a.eager)
    V = lm.model.args.vocab_size
    greedy = SamplingParams(temperature=0.0)
    prompt = [(7 * i + 3) % V for i in range(40)]
    gen.ensure_capacity(len(prompt) + a.tokens + 2 * a.k + 8)
    gen.warmup([greedy], prompt_len=len(prompt))

    def plain():
        gen.forget_prefix()
        return list(gen.generate_ids(prompt, a.tokens, greedy, stop_token_ids=()))

    ref = prompt + plain()

    class Scripted(DraftSource):
        name = "scripted"

        def __init__(self, how: str):
            self.how, self.seq = how, []

        def reset(self, prompt_ids):
            self.seq = list(prompt_ids)

        def extend(self, ids):
            self.seq.extend(ids)

        def propose(self, k):
            i = len(self.seq)
            if self.how == "never":
                return []
            if self.how == "right" and i + k <= len(ref):
                return ref[i:i + k]
            return [(ref[min(i, len(ref) - 1)] + 1 + j) % V for j in range(k)]

    def timed(fn, runs):
        fn()
        sync()
        out, ts = None, []
        for _ in range(runs):
            t = time.perf_counter()
            out = fn()
            sync()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts), out

    res = {"shape": a.shape, "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "k": a.k,
           "tokens": a.tokens}
    t_plain, _ = timed(plain, a.runs)
    res["plain"] = {"s": t_plain, "ms_per_token": 1e3 * t_plain / a.tokens}
    print(f"plain: {1e3 * t_plain / a.tokens:.3f} ms/token", flush=True)
    decs = {}
    for how, graphed in (("never", True), ("wrong", False), ("wrong", True), ("right", False), ("right", True)):
        dec = SpeculativeDecoder(lm.model, Scripted(how), k=a.k, gen=gen, adaptive=(how == "never"))
        dec.graph_rounds = dec.graph_rounds and graphed
        how = f"{how}{'' if graphed else ' (no graph)'}"
        dec.ensure_capacity(len(prompt) + a.tokens + 2 * a.k + 8)
        dec.warmup([greedy])
        decs[how] = dec

        def run(dec=dec):
            gen.forget_prefix()
            return list(dec.generate_ids(prompt, a.tokens, greedy, stop_token_ids=()))

        t, got = timed(run, a.runs)
        st = dec.last_result_stats
        rounds = st.verify_steps
        row = {"s": t, "ms_per_token": 1e3 * t / len(got), "verify_steps": rounds, "plain_steps": st.plain_steps,
               "accepted": st.accepted, "calibration": dec.calibration,
               "identical": got == ref[len(prompt):]}
        if rounds:
            # a round replaces (accepted + 1) plain tokens: its cost in plain tokens
            plain_part = st.plain_steps * t_plain / a.tokens
            row["ms_per_round"] = 1e3 * (t - plain_part) / rounds
            row["round_in_plain_tokens"] = (t - plain_part) / rounds / (t_plain / a.tokens)
        res[how] = row
        print(f"{how}: " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                                      if k != "calibration"}), f"calibration {dec.calibration}", flush=True)

    from torch.profiler import ProfilerActivity, profile

    dec = decs["wrong"]  # the captured rounds
    n = a.profile_rounds
    gen.forget_prefix()
    list(dec.generate_ids(prompt, n, greedy, stop_token_ids=()))
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with profile(activities=acts) as prof:
        gen.forget_prefix()
        list(dec.generate_ids(prompt, n, greedy, stop_token_ids=()))
        sync()
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70), flush=True)
    print(ka.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=70), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
        prof.export_chrome_trace(a.json.replace(".json", "_trace.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
