"""Sampler: filters against straightforward references, exact distribution, validation."""

from __future__ import annotations

import pytest
import torch

from blitzgen.errors import InvalidRequestError
from blitzgen.sampling import SamplingParams, exponential_noise, filter_logits, make_generator, sample


def kept(logits: torch.Tensor, sp: SamplingParams) -> set[int]:
    out = filter_logits(logits[None], sp.tensors("cpu"), sp.mode)[0]
    return set(torch.nonzero(out > -float("inf")).flatten().tolist())


def test_top_k():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    assert kept(logits, SamplingParams(top_k=2)) == {1, 3}


def test_top_p_reference():
    torch.manual_seed(0)
    logits = torch.randn(50)
    for p in (0.1, 0.5, 0.9):
        probs = logits.softmax(-1)
        order = probs.argsort(descending=True)
        mass, ref = 0.0, set()
        for i in order.tolist():
            if mass >= p:
                break
            ref.add(i)
            mass += probs[i].item()
        assert kept(logits, SamplingParams(top_p=p)) == ref


def test_min_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04]))
    assert kept(logits, SamplingParams(min_p=0.15)) == {0, 1, 2}


def test_temperature_then_top_k_then_top_p():
    logits = torch.tensor([3.0, 2.9, 0.0, -1.0])
    # top_k=3 drops index 3; with a high temperature top_p=0.6 then keeps the two near-equal leaders
    assert kept(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.6)) == {0, 1}


def test_greedy_is_argmax():
    logits = torch.randn(2, 100)
    sp = SamplingParams(temperature=0)
    assert torch.equal(sample(logits, sp.tensors("cpu"), sp.mode, None), logits.argmax(-1))


def test_sampling_distribution_is_exact():
    """The exponential race draws from softmax(logits / T): compare frequencies over many draws."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0]])
    sp = SamplingParams(temperature=0.7, seed=1)
    g = make_generator(1, "cpu")
    n = 20000
    counts = torch.zeros(4)
    t, mode = sp.tensors("cpu"), sp.mode
    for _ in range(n // 1000):
        noise = exponential_noise((1000, 4), g, "cpu")
        toks = sample(logits.expand(1000, 4), t, mode, noise)
        counts += torch.bincount(toks, minlength=4)
    want = (logits[0] / 0.7).softmax(-1)
    assert torch.allclose(counts / n, want, atol=0.015)


@pytest.mark.parametrize("bad", [
    dict(temperature=-1), dict(temperature=float("nan")), dict(top_k=-2), dict(top_p=0.0),
    dict(top_p=1.5), dict(min_p=-0.1), dict(min_p=2), dict(seed=-1),
])
def test_invalid_values(bad):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**bad).validate()
    assert e.value.param == next(iter(bad))
