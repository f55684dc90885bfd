"""Resident memory stays flat while a long-running process sees new prompt lengths (the eager CPU
path buckets prompts, so oneDNN's per-shape primitive cache and the allocator stop growing)."""

import os

import pytest
import torch

from blitzgen.generate import Generator, prefill_bucket
from blitzgen.sampling import SamplingParams


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_rss_flat_over_new_prompt_lengths(smol_path):
    """The default model in bfloat16 (the server's dtype), eager on CPU: after one request per
    prompt bucket, 40 requests with 40 new prompt lengths add less than 24 MiB (measured before
    bucketing: about 106 MiB for 40 new lengths in a server)."""
    from blitzgen.loading import load

    lm = load(smol_path, device="cpu", dtype=torch.bfloat16, progress=False)
    gen = Generator(lm.model, lm.tokenizer)
    greedy = SamplingParams(temperature=0.0)
    lengths = list(range(41, 201, 4))  # 40 new lengths
    buckets = sorted({prefill_bucket(n, 4) for n in lengths})
    for n in buckets:  # every shape once
        list(gen.generate_ids([1] * n, 2, greedy, stop_token_ids=()))
    before = rss_mib()
    for n in lengths:
        list(gen.generate_ids(list(range(1, n + 1)), 2, greedy, stop_token_ids=()))
    grown = rss_mib() - before
    assert grown < 24, f"RSS grew {grown:.1f} MiB over {len(lengths)} new prompt lengths"
