"""Speculative decoding: greedy identity, exact sampling distribution, KV-cache state, adaptivity."""

from __future__ import annotations

import math

import pytest
import torch

import blitzgen.speculative as spec
from blitzgen.errors import BlitzgenError
from blitzgen.generate import Generator
from blitzgen.sampling import SamplingParams, exponential_noise, make_generator, sample
from blitzgen.speculative import (AdaptiveK, DraftMismatchError, DraftModel, NgramDraft, SelfInt4Draft,
                                  SpeculationStats, SpeculativeDecoder, accept_tokens, check_same_tokenizer,
                                  make_draft, sampling_probs)

from .conftest import tiny_model

GREEDY = SamplingParams(temperature=0.0)
PROMPT = [5, 17, 42, 99, 3, 250, 5, 17, 42, 99, 7, 8]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run many small ops: on a busy machine OpenMP's spinning threads make each op
    ~20x slower, so these tests use one thread (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def plain(model, prompt, n, sampling=GREEDY, stop=()):
    return list(Generator(model).generate_ids(prompt, n, sampling, stop_token_ids=stop))


def sources(model):
    # draft_cost 0.3: a draft the size of the target is never run by the adaptive controller (it
    # cannot pay); these tests check exactness, so they pretend it is cheap
    return {"ngram": NgramDraft(min_match=1), "self-int4": SelfInt4Draft(model),
            "draft-model": DraftModel(tiny_model(seed=11), draft_cost=0.3),
            "same-model": DraftModel(tiny_model(seed=1), draft_cost=0.3)}


# ---- probabilities ----------------------------------------------------------------------------
@pytest.mark.parametrize("sp", [GREEDY, SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_k=7),
                                SamplingParams(top_p=0.8), SamplingParams(min_p=0.1),
                                SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.05)])
def test_sampling_probs_match_sampler(sp):
    """argmax(probs / noise) is the token sampling.sample picks with the same noise."""
    torch.manual_seed(0)
    logits = torch.randn(64, 50) * 3
    t = sp.tensors("cpu")
    probs = sampling_probs(logits, t, sp.mode)
    torch.testing.assert_close(probs.sum(-1), torch.ones(64))
    noise = exponential_noise((64, 50), make_generator(1, "cpu"), "cpu")
    want = sample(logits, t, sp.mode, None if sp.greedy else noise)
    assert torch.equal((probs / noise).argmax(-1), want)
    if sp.top_k:
        assert int((probs[0] > 0).sum()) <= sp.top_k


# ---- n-gram lookup ----------------------------------------------------------------------------
def test_ngram_proposes_longest_recent_match():
    d = NgramDraft(n_max=3)
    d.reset([1, 2, 3, 4, 9, 2, 3, 5, 6, 7, 1, 2, 3])
    assert d.propose(3) == [4, 9, 2]  # "1 2 3" -> 4 (the 3-gram beats the more recent "2 3" -> 5)
    d.extend([8, 2, 3])  # "8 2 3": no 3-gram match; "2 3" was last followed by 8
    assert d.propose(2) == [8, 2]
    d.extend([42])
    assert d.propose(4) == []
    d.reset([7, 7, 7])
    assert d.propose(4) == [7]  # the continuation stops at the end of the sequence


def test_ngram_one_token_matches_propose_only_when_a_verify_is_cheap():
    d = NgramDraft(n_max=3)
    d.adapt(1.4)  # an expensive verify: a match of 2+ tokens is needed
    d.reset([1, 2, 5, 3, 9, 3])
    assert d.propose(2) == []  # only "3" matches (-> 9)
    d.adapt(1.1)
    assert d.propose(2) == [9, 3]
    d.extend([9])
    d.adapt(1.4)
    assert d.propose(1) == [3]  # "3 9" matches
    fixed = NgramDraft(n_max=3, min_match=1)
    fixed.adapt(2.0)
    fixed.reset([1, 2, 5, 3, 9, 3])
    assert fixed.propose(1) == [9]


# ---- exactness --------------------------------------------------------------------------------
@pytest.mark.parametrize("adaptive", [False, True])
def test_greedy_identity_all_sources(adaptive):
    model = tiny_model(seed=1)
    want = plain(model, PROMPT, 40)
    for name, src in sources(model).items():
        dec = SpeculativeDecoder(model, src, k=4, adaptive=adaptive, verify_cost=1.1)
        assert list(dec.generate_ids(PROMPT, 40, GREEDY)) == want, name
        st = dec.last_result_stats
        assert st.generated_tokens == 40 and sum(st.accepted_hist) == st.verify_steps
        if name == "same-model":
            assert st.acceptance_rate == 1.0
    # stop tokens and a length limit inside an accepted run
    dec = SpeculativeDecoder(model, DraftModel(tiny_model(seed=1)), k=4)
    stop = want[13]
    assert list(dec.generate_ids(PROMPT, 40, GREEDY, stop_token_ids=[stop])) == want[:want.index(stop) + 1]
    assert list(dec.generate_ids(PROMPT, 7, GREEDY)) == want[:7]


def _first_token_freqs(p, q, accept, n, seed=0):
    """Frequencies of the first emitted token over n rounds of one verify with K = q.shape[0]."""
    g = torch.Generator().manual_seed(seed)
    K, V = q.shape
    counts = torch.zeros(V)
    for _ in range(n):
        draft = torch.stack([torch.multinomial(q[i], 1, generator=g)[0] for i in range(K)])
        u = torch.rand(K, generator=g)
        noise = torch.empty(V).exponential_(generator=g)
        n_acc, tok = accept(p, q, draft, torch.tensor(K), u, noise)
        counts[int(draft[0]) if int(n_acc) > 0 else int(tok)] += 1
    return counts / n


def _always_accept(p, q, draft, k_eff, u, noise):  # the deliberately broken rule
    return k_eff, (p[k_eff] / noise).argmax()


def test_rejection_sampling_distribution():
    """First emitted token ~ p (filtered as the sampler filters), not q; a broken rule is caught."""
    torch.manual_seed(3)
    V = 6
    sp = SamplingParams(temperature=0.8, top_k=5, top_p=0.95)
    t = sp.tensors("cpu")
    p = sampling_probs(torch.randn(3, V) * 1.5, t, sp.mode)
    q = sampling_probs(torch.randn(2, V) * 1.5, t, sp.mode)
    tv_pq = 0.5 * (p[0] - q[0]).abs().sum()
    assert tv_pq > 0.2
    n = 4000
    tv = 0.5 * (_first_token_freqs(p, q, accept_tokens, n) - p[0]).abs().sum()
    bound = 0.035  # E[TV] of 4000 exact draws over 6 outcomes is ~0.014, its sd ~0.006
    assert tv < bound
    tv_broken = 0.5 * (_first_token_freqs(p, q, _always_accept, n) - p[0]).abs().sum()
    assert tv_broken > bound
    # deterministic draft (n-gram): q one-hot, accepted with probability p(x)
    q1 = torch.nn.functional.one_hot(torch.tensor([2, 4]), V).float()
    assert 0.5 * (_first_token_freqs(p, q1, accept_tokens, n) - p[0]).abs().sum() < bound


def _exact_marginals(model, prompt, sp, steps):
    """Marginal distribution of each of the first `steps` generated tokens, by enumeration."""
    t = sp.tensors("cpu")
    V = model.args.vocab_size
    out = [torch.zeros(V) for _ in range(steps)]

    def walk(seq, prob, i):
        if i == steps:
            return
        with torch.no_grad():
            model.setup_caches(1, 32)
            logits = model(torch.tensor([seq]), torch.arange(len(seq)))[:, -1]
        p = sampling_probs(logits, t, sp.mode)[0]
        out[i] += prob * p
        for tok in torch.nonzero(p).flatten().tolist():
            walk(seq + [tok], prob * float(p[tok]), i + 1)

    walk(list(prompt), 1.0, 0)
    return out


@pytest.mark.parametrize("kind", ["draft-model", "ngram"])
def test_end_to_end_distribution(kind):
    """Tokens drawn through verify rounds follow the target's filtered distribution."""
    target = tiny_model(seed=21, vocab_size=8, max_seq_len=32)
    draft = DraftModel(tiny_model(seed=22, vocab_size=8, max_seq_len=32)) if kind == "draft-model" else NgramDraft(n_max=1)
    prompt = [1, 2, 3, 1, 2, 4, 1, 2, 5]
    sp = SamplingParams(temperature=0.9, top_k=6, top_p=0.97)
    exact = _exact_marginals(target, prompt, sp, 4)
    dec = SpeculativeDecoder(target, draft, k=3, adaptive=False)
    n = 1000
    counts = [torch.zeros(8) for _ in range(4)]
    total = SpeculationStats()
    for seed in range(n):
        toks = list(dec.generate_ids(prompt, 4, SamplingParams(**{**sp.__dict__, "seed": seed})))
        for i, tok in enumerate(toks):
            counts[i][tok] += 1
        total.merge(dec.last_result_stats)
    assert total.verify_steps > n / 2 and 0 < total.accepted < total.drafted
    for i in range(4):  # token 0 from prefill, 1-2 from the first verify round (2 drafts), 3 after
        assert 0.5 * (counts[i] / n - exact[i]).abs().sum() < 0.07, i  # E[TV] <= ~0.04 here


def test_seeded_runs_reproducible():
    model = tiny_model(seed=1)
    dec = SpeculativeDecoder(model, DraftModel(tiny_model(seed=11)), k=3)
    sp = SamplingParams(temperature=1.2, seed=5)
    a = list(dec.generate_ids(PROMPT, 24, sp))
    assert a == list(dec.generate_ids(PROMPT, 24, sp))
    assert a != list(dec.generate_ids(PROMPT, 24, SamplingParams(temperature=1.2, seed=6)))


# ---- KV cache ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["draft-model", "self-int4"])
def test_cache_after_rejection_equals_plain(kind):
    ref, model = tiny_model(seed=1), tiny_model(seed=1)
    n = 30
    want = plain(ref, PROMPT, n)
    src = DraftModel(tiny_model(seed=11)) if kind == "draft-model" else SelfInt4Draft(model)
    dec = SpeculativeDecoder(model, src, k=4, adaptive=False)
    assert list(dec.generate_ids(PROMPT, n, GREEDY)) == want
    st = dec.last_result_stats
    assert st.verify_steps > st.accepted_hist[-1] > 0 or st.accepted_hist[0] > 0  # there were rejections
    L = len(PROMPT) + n - 1  # positions written in both runs
    for a, b in zip(ref.layers, model.layers):
        torch.testing.assert_close(a.attention.kv_cache.k_cache[:, :, :L], b.attention.kv_cache.k_cache[:, :, :L],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.attention.kv_cache.v_cache[:, :, :L], b.attention.kv_cache.v_cache[:, :, :L],
                                   atol=1e-5, rtol=1e-5)
    # the draft model's cache equals a fresh prefill of the same tokens on its valid prefix
    dm, D = src.model, dec.draft_valid
    assert D > len(PROMPT)
    seq = PROMPT + want
    fresh = tiny_model(seed=11) if kind == "draft-model" else SelfInt4Draft(tiny_model(seed=1)).model
    with torch.no_grad():
        fresh(torch.tensor([seq[:D]]), torch.arange(D))
    for a, b in zip(fresh.layers, dm.layers):
        torch.testing.assert_close(a.attention.kv_cache.k_cache[:, :, :D], b.attention.kv_cache.k_cache[:, :, :D],
                                   atol=1e-5, rtol=1e-5)


# ---- tokenizers -------------------------------------------------------------------------------
def _tokenizer(words, eos=0):
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    from blitzgen.tokenizer import Tokenizer

    rt = RustTokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    rt.pre_tokenizer = Whitespace()
    return Tokenizer(rt, bos_token_id=None, eos_token_ids=[eos], add_bos=False, chat_template=None,
                     special_ids={eos}, vocab_size=len(words))


def test_draft_with_other_tokenizer_refused():
    a = _tokenizer(["<eos>", "a", "b", "c"])
    check_same_tokenizer(a, _tokenizer(["<eos>", "a", "b", "c"]))
    for other in (_tokenizer(["<eos>", "a", "c", "b"]), _tokenizer(["<eos>", "a", "b"]),
                  _tokenizer(["<eos>", "a", "b", "c"], eos=1)):
        with pytest.raises(DraftMismatchError) as e:
            check_same_tokenizer(a, other)
        assert isinstance(e.value, BlitzgenError) and "\n" not in str(e.value)
    with pytest.raises(DraftMismatchError):
        DraftModel(tiny_model(seed=2), _tokenizer(["<eos>", "x", "b", "c"]), a)
    with pytest.raises(BlitzgenError):
        make_draft("medusa", tiny_model())


# ---- adaptivity -------------------------------------------------------------------------------
def test_a_draft_that_cannot_pay_never_runs():
    """Even at acceptance 1 a draft as slow as the target gains nothing: off from the start, no
    probes, and free evidence does not turn it on (H200, SmolLM2 self-int4: c_d 1.24)."""
    ctl = AdaptiveK(4, verify_cost=1.09, draft_cost=1.24, probe=2, max_probe=4)
    assert not ctl.can_pay() and not ctl.on
    assert [ctl.next_k() for _ in range(50)] == [0] * 50
    for _ in range(10):
        ctl.observe(1, 1)
    assert not ctl.on and ctl.next_k() == 0
    assert AdaptiveK(4, verify_cost=1.09, draft_cost=0.5).can_pay()
    assert AdaptiveK(4, verify_cost=1.09, draft_cost=1.24, adaptive=False).next_k() == 4


def test_calibrate_times_chained_plain_steps():
    """calibrate() runs on any device: positive costs, adopted by the decoder's controller, and the
    plain step is timed in a chain of steps (as decode runs them), not one synchronized step."""
    model = tiny_model(seed=1)
    dec = SpeculativeDecoder(model, NgramDraft(), k=3)
    calls = []
    real = dec._plain_step
    dec._plain_step = lambda *a: calls.append(1) or real(*a)
    cal = dec.calibrate(reps=2, prompt_len=8)
    assert set(cal) >= {"verify_cost", "draft_cost", "step_s", "verify_s", "draft_s"}
    assert cal["verify_cost"] > 0 and cal["step_s"] > 0 and cal["draft_cost"] == 0.0
    assert dec.verify_cost == cal["verify_cost"] and len(calls) == (2 + 2) * 8
    list(dec.generate_ids(PROMPT, 1, GREEDY))  # no round: the controller holds the calibrated costs
    assert dec.controller.verify_cost == cal["verify_cost"] and dec.controller.t_plain == cal["step_s"]


def test_adaptive_k_shrinks_switches_off_and_recovers():
    ctl = AdaptiveK(6, verify_cost=1.2, draft_cost=0.1, probe=4, max_probe=16)
    assert ctl.k == 6 and ctl.on
    ks = []
    while ctl.on:  # nothing accepted: K comes down, then speculation goes off
        ks.append(ctl.next_k())
        ctl.update(ks[-1], 0)
    assert ks[0] == 6 and ks[-1] < 6 and ks == sorted(ks, reverse=True) and len(ks) <= 6
    assert ctl.switched_off == 1
    steps = [ctl.next_k() for _ in range(5)]
    assert steps[:4] == [0, 0, 0, 0] and steps[4] > 0  # a probe after 4 plain steps
    ctl.update(steps[4], 0)  # failed probe: the next one waits twice as long
    steps = [ctl.next_k() for _ in range(9)]
    assert steps[:8] == [0] * 8 and steps[8] > 0
    for _ in range(20):  # predictable text again: back on, full length
        ctl.update(ctl.k, ctl.k)
    assert ctl.on and ctl.k == 6


@pytest.mark.parametrize("kind", ["ngram", "draft-model"])
def test_speculation_switches_off_on_unpredictable_text(kind):
    model = tiny_model(seed=1)
    # min_match=1: every one-token match proposes (on this text a 2-token match never comes)
    src = NgramDraft(min_match=1) if kind == "ngram" else DraftModel(tiny_model(seed=11), draft_cost=0.3)
    dec = SpeculativeDecoder(model, src, k=4, verify_cost=1.3)
    dec.follows_clock = False  # the fixed costs: acceptance alone decides (the clock's tests are below)
    want = plain(model, PROMPT, 60)
    assert list(dec.generate_ids(PROMPT, 60, GREEDY)) == want
    st = dec.last_result_stats
    assert st.switched_off >= 1 and st.plain_steps > 2 * st.verify_steps, st.summary()
    if kind == "draft-model":
        assert st.k_hist[1] > 0  # K came down before switching off


def test_controller_follows_the_clock():
    """Rounds timed slower than the calibration raise the verify cost until speculation cannot pay
    (off, no probes); fast ones keep it on; a stall moves the averages by a bounded step."""
    ctl = AdaptiveK(4, verify_cost=1.1, plain_seconds=0.001, probe=2)
    for _ in range(10):
        ctl.time_round(ctl.next_k(), 0.0012)  # ~1.2 plain tokens
        ctl.update(ctl.k, ctl.k)
    assert ctl.on and 1.1 <= ctl.verify_cost < 1.25 and ctl.timed_rounds == 10
    ctl.time_round(4, 1000.0)  # a compile: at most 2 * (k_max + 1) plain tokens enter the average
    assert ctl.verify_cost < 0.75 * 1.25 + 0.25 * 10 + 1e-9 and ctl.on
    slow = AdaptiveK(4, verify_cost=1.1, plain_seconds=0.001, probe=2, max_probe=8)
    rounds = 0
    while slow.on:
        slow.time_round(slow.next_k(), 0.008)  # 8 plain tokens per round: never pays
        slow.update(slow.k, slow.k)
        rounds += 1
    assert rounds <= 5 and slow.verify_cost > 4
    # a measured cost is never final: probes still come (and measure again), further apart
    ks = [slow.next_k() for _ in range(3)]
    assert ks[:2] == [0, 0] and ks[2] > 0 and slow.can_pay()
    slow.time_round(ks[2], 0.0011)  # the machine got faster
    slow.update(ks[2], ks[2])
    for _ in range(12):
        k = slow.next_k()
        if k:
            slow.time_round(k, 0.0011)
        slow.update(k, k) if k else None
    assert slow.on and slow.verify_cost < 2
    ctl = AdaptiveK(4, verify_cost=1.1)  # nothing to compare with: the costs stay
    ctl.time_round(4, 5.0)
    assert ctl.verify_cost == 1.1 and ctl.timed_rounds == 0
    ctl.time_plain(0.001)
    ctl.time_plain(1.0)  # a stall
    assert ctl.t_plain == pytest.approx(0.9 * 0.001 + 0.1 * 0.01)


def test_catch_up_chunks_space_the_probes_and_can_keep_a_request_off():
    """A model draft's catch-up (a chunk forward before the first round and before each probe)
    is priced in plain tokens: probes spend at most PROBE_SHARE of the plain time, and a request
    whose draft prefill alone would cost more than that share starts off (H200, SmolLM2 self-int4:
    ~40 ms chunks against 1.7 ms plain tokens made it 0.61-0.77x plain)."""
    ctl = AdaptiveK(4, verify_cost=1.1, draft_cost=0.5, plain_seconds=0.002, probe=4)
    assert ctl.probe_gap() == 4 and ctl.catch_up_cost == 0.0
    ctl.time_catch_up(0.04)  # 20 plain tokens
    assert ctl.catch_up_cost == pytest.approx(20.0)
    assert ctl.probe_gap() == math.ceil(20.0 / AdaptiveK.PROBE_SHARE)
    while ctl.on:
        ctl.update(ctl.next_k(), 0)
    assert [ctl.next_k() for _ in range(ctl.probe_gap())] == [0] * ctl.probe_gap()
    assert ctl.next_k() > 0  # the probe comes, only much later
    short = AdaptiveK(4, verify_cost=1.1, draft_cost=0.5, plain_seconds=0.002, catch_up_seconds=0.04)
    short.start(200)  # 20 tokens > 3% of 200
    assert not short.on and short.next_k() == 0
    long = AdaptiveK(4, verify_cost=1.1, draft_cost=0.5, plain_seconds=0.002, catch_up_seconds=0.04)
    long.start(1000)
    assert long.on
    cheap = AdaptiveK(4, verify_cost=1.1, draft_cost=0.5, plain_seconds=0.002, catch_up_seconds=0.0002)
    assert not cheap.start(200) and cheap.on and cheap.probe_gap() == 16
    stall = AdaptiveK(4, verify_cost=1.1, draft_cost=0.5, plain_seconds=0.002)
    stall.time_catch_up(2.0)  # a compile: at most MAX_CATCH_UP plain tokens, and probes still come
    assert stall.catch_up_cost == AdaptiveK.MAX_CATCH_UP
    assert stall.probe_gap() == AdaptiveK.MAX_PROBE_GAP


def test_a_slow_draft_prefill_keeps_later_requests_off_with_the_same_text():
    import time

    model = tiny_model(seed=1)
    dec = SpeculativeDecoder(model, DraftModel(tiny_model(seed=1), draft_cost=0.3), k=4)  # accepts all
    t = time.perf_counter()
    want = plain(model, PROMPT, 40)
    dec.plain_seconds = (time.perf_counter() - t) / 40
    run_chunk = dec._run_chunk
    dec._run_chunk = lambda m, *a: (time.sleep(0.05) if m is dec.dmodel else None, run_chunk(m, *a))[1]
    assert list(dec.generate_ids(PROMPT, 40, GREEDY)) == want
    # the draft's prefill, timed (capped at MAX_CATCH_UP plain tokens): too dear for 40 tokens
    assert dec.measured["catch_up_seconds"] > AdaptiveK.PROBE_SHARE * 40 * dec.plain_seconds
    assert list(dec.generate_ids(PROMPT, 40, GREEDY)) == want
    st = dec.last_result_stats
    assert st.verify_steps == 0 and st.draft_steps == 0 and st.plain_steps > 0, st.summary()
    assert dec.draft_valid == 0  # never prefilled
    for _ in range(spec.RETRY_OFF_STARTS - 1):
        list(dec.generate_ids(PROMPT, 4, GREEDY))
        assert dec.draft_valid == 0
    list(dec.generate_ids(PROMPT, 4, GREEDY))  # now and then a request measures the draft again
    assert dec.draft_valid > 0


def test_a_slow_verify_switches_speculation_off_and_greedy_text_holds():
    """Wall-clock rounds include what a calibration misses: a verify made 30 ms slower turns
    speculation off within a few rounds, with the same greedy text. A seeded sampled request
    times nothing (its draft lengths, so its text, do not depend on the clock)."""
    import time

    model = tiny_model(seed=1)
    dec = SpeculativeDecoder(model, DraftModel(tiny_model(seed=1), draft_cost=0.3), k=4)  # accepts all
    t = time.perf_counter()
    want = plain(model, PROMPT, 40)
    dec.plain_seconds = (time.perf_counter() - t) / 40  # as calibrate() would (it would also time the draft)
    vstep = dec._vstep
    dec._vstep = lambda *a: (time.sleep(0.03), vstep(*a))[1]
    assert list(dec.generate_ids(PROMPT, 40, GREEDY)) == want
    st = dec.last_result_stats
    assert st.switched_off >= 1 and st.verify_steps <= 4 and st.accepted == st.drafted and st.verify_cost > 2, \
        st.summary()
    assert dec.measured.get("verify_cost", 0) <= 4.76  # what is kept still lets a later request probe
    dec.measured = {"verify_cost": 3.0}
    list(dec.generate_ids(PROMPT, 1, GREEDY))
    assert dec.controller.verify_cost == 3.0  # an unseeded request starts from what was measured
    list(dec.generate_ids(PROMPT, 1, SamplingParams(temperature=1.0, seed=3)))
    assert dec.controller.verify_cost == dec.verify_cost and dec.controller.t_plain == dec.plain_seconds
    # a tensor-parallel rank's decoder never follows its own clock (the ranks must choose alike)
    dec.follows_clock, dec.measured = False, {}
    assert list(dec.generate_ids(PROMPT, 40, GREEDY)) == want
    assert dec.last_result_stats.switched_off == 0 and not dec.measured, dec.last_result_stats.summary()


def test_stats_merge_and_export():
    a = SpeculationStats(source="ngram", k_max=2, accepted_hist=[0, 0, 0], k_hist=[0, 0, 0])
    a.record(2, 1)
    a.record(2, 2)
    b = SpeculationStats(source="ngram", k_max=2, accepted_hist=[0, 0, 0], k_hist=[0, 0, 0])
    b.record(1, 0)
    m = SpeculationStats().merge(a).merge(b)
    assert m.accepted_hist == [1, 1, 1] and m.drafted == 5 and m.accepted == 3
    assert m.mean_tokens_per_verify == pytest.approx(2.0)
    d = m.to_dict()
    assert d["acceptance_rate"] == pytest.approx(0.6) and "accepted lengths" in m.summary()


def test_bad_arguments():
    with pytest.raises(BlitzgenError):
        SpeculativeDecoder(tiny_model(), NgramDraft(), k=0)
    dec = SpeculativeDecoder(tiny_model(), NgramDraft(), k=2)
    with pytest.raises(BlitzgenError):
        list(dec.generate_ids([], 4))
    with pytest.raises(BlitzgenError):
        list(dec.generate_ids([1] * 500, 100))


# ---- compiled ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_compiled_equals_eager():
    """CPU inductor: same tokens as eager for greedy and seeded sampling, no recompile per length."""
    import torch._dynamo

    sp = SamplingParams(temperature=0.9, top_k=50, seed=3)
    for make in (lambda m: NgramDraft(), lambda m: DraftModel(tiny_model(seed=11))):
        eager = SpeculativeDecoder(tiny_model(seed=1), make(None), k=3, adaptive=False)
        want_g, want_s = list(eager.generate_ids(PROMPT, 20, GREEDY)), list(eager.generate_ids(PROMPT, 20, sp))
        torch._dynamo.reset()
        comp = SpeculativeDecoder(tiny_model(seed=1), make(None), k=3, adaptive=False, compile=True, max_seq_len=64,
                                  compile_prefill=True)
        comp.warmup((GREEDY, sp))
        assert comp.last_result_stats.verify_steps > 0  # the compiled verify ran
        assert list(comp.generate_ids(PROMPT, 20, GREEDY)) == want_g
        assert list(comp.generate_ids(PROMPT, 20, sp)) == want_s
        # on a compiled Generator: its step and prefill graphs serve the plain steps
        target = tiny_model(seed=1)
        shared = SpeculativeDecoder(target, make(None), k=3, gen=Generator(target, compile=True, max_seq_len=64))
        assert shared.compiled and list(shared.generate_ids(PROMPT, 20, GREEDY)) == want_g


# ---- the real model ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ngram", "self-int4"])
def test_smol_greedy_identity(smol, kind):
    model, tok = smol.model, smol.tokenizer
    text = ("def add(a, b):\n    return a + b\n\nRewrite the function add above so that it also accepts a "
            "third argument c, and return the code.")
    ids = tok.encode_chat([{"role": "user", "content": text}])
    want = list(Generator(model, tok).generate_ids(ids, 48, GREEDY, stop_token_ids=tok.eos_token_ids))
    dec = SpeculativeDecoder(model, make_draft(kind, model), k=4)
    got = list(dec.generate_ids(ids, 48, GREEDY, stop_token_ids=tok.eos_token_ids))
    assert got == want, tok.decode(got)
    assert dec.last_result_stats.verify_steps > 0


@pytest.mark.slow
def test_smol_tokenizer_check(smol):
    check_same_tokenizer(smol.tokenizer, smol.tokenizer)
    assert spec.SOURCES == ("ngram", "self-int4", "draft-model")


def test_warmup_runs_every_step():
    dec = SpeculativeDecoder(tiny_model(seed=1), NgramDraft(), k=3)
    dec.warmup((GREEDY, SamplingParams(temperature=0.8, top_k=5)))
    st = dec.last_result_stats
    assert st.verify_steps > 0 and st.plain_steps > 0 and dec.adaptive


def test_free_evidence_turns_speculation_back_on():
    ctl = AdaptiveK(4, verify_cost=1.3)
    while ctl.on:
        ctl.update(4, 0)
    for _ in range(6):
        ctl.observe(1, 1)  # the n-gram guess was right on plain steps
    assert ctl.on and ctl.next_k() == 4


def test_draft_follows_the_targets_decode_attention():
    target = tiny_model(seed=1)
    target.set_decode_attention("matmul")
    for draft in (DraftModel(tiny_model(seed=11)), SelfInt4Draft(target)):
        SpeculativeDecoder(target, draft, k=2)
        assert draft.model.attention_op.decode_impl == "matmul"


def test_captured_verify_rounds_only_where_they_apply(monkeypatch):
    """speculative_graph: compiled host drafts on CUDA only; never on the CPU, for a model draft,
    or with BLITZGEN_SPEC_GRAPH=0 (the GPU suite checks the captured rounds' tokens)."""
    from blitzgen.speculative_graph import usable

    m = tiny_model()
    m.setup_caches(1, 64)
    assert not usable(m)  # a CPU model
    dec = SpeculativeDecoder(m, NgramDraft(), k=4, compile=True)
    assert dec.graph_rounds is False and dec._host_graph() is None
    monkeypatch.setattr(spec, "usable_for_graph", lambda model: True)  # as on CUDA
    assert SpeculativeDecoder(m, NgramDraft(), k=4, compile=True).graph_rounds
    assert not SpeculativeDecoder(m, NgramDraft(), k=4, compile=False).graph_rounds
    assert not SpeculativeDecoder(m, SelfInt4Draft(m), k=4, compile=True).graph_rounds
    monkeypatch.setenv("BLITZGEN_SPEC_GRAPH", "0")
    assert not SpeculativeDecoder(m, NgramDraft(), k=4, compile=True).graph_rounds


def test_sampling_probs_row_by_row_equals_the_batched_filter():
    """The sorted filter (top-k / top-p) runs row by row over a verify's rows (speculative_accept):
    the same distribution as filtering the batch at once."""
    from blitzgen.sampling import filter_logits

    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0))
    sp = SamplingParams(temperature=0.7, top_k=40, top_p=0.9)
    t = sp.tensors("cpu")
    want = filter_logits(logits, t, sp.mode).softmax(-1)
    assert torch.allclose(sampling_probs(logits, t, sp.mode), want, atol=1e-7)


def _fake_cuda_graphs(monkeypatch):
    """speculative_graph's CUDA calls on the CPU: a "captured" round re-runs its function on replay,
    writing the captured output tensor, as a CUDA graph would."""
    import contextlib

    import blitzgen.speculative_graph as sg

    class FakeGraph:
        def replay(self):
            self.out.copy_(self.fn())

    capturing = []

    @contextlib.contextmanager
    def graph(g, pool=None, capture_error_mode=None):
        capturing.append(g)
        try:
            yield
        finally:
            capturing.pop()

    run = sg.HostVerifyGraph._run

    def recording_run(self, mode):
        out = run(self, mode)
        if capturing:
            capturing[-1].fn, capturing[-1].out = (lambda: run(self, mode)), out
        return out

    monkeypatch.setattr(sg.HostVerifyGraph, "_run", recording_run)
    for name, value in {"CUDAGraph": FakeGraph, "graph": graph, "synchronize": lambda: None,
                        "device": lambda d: contextlib.nullcontext(), "current_stream": lambda: None,
                        "set_stream": lambda s: None, "graph_pool_handle": lambda: None}.items():
        monkeypatch.setattr(sg.torch.cuda, name, value)
    monkeypatch.setattr(sg.torch, "zeros", lambda *a, pin_memory=False, **k: torch.empty(0).new_zeros(*a, **k))
    return sg


def test_captured_rounds_logic_on_cpu(monkeypatch):
    """HostVerifyGraph's packing, capture, replay, recapture and fallback with CUDA faked on the CPU:
    greedy rounds give plain decoding's tokens, seeded sampled rounds the uncaptured path's."""
    sg = _fake_cuda_graphs(monkeypatch)
    m = tiny_model(seed=5)
    prompt = [3, 9, 4, 3, 9, 4, 7, 3, 9]
    want = list(Generator(tiny_model(seed=5)).generate_ids(prompt, 16, SamplingParams(temperature=0.0),
                                                           stop_token_ids=()))
    hot = SamplingParams(temperature=0.9, top_k=20, seed=3)

    def decode(graphed: bool, sp):
        dec = SpeculativeDecoder(m, NgramDraft(min_match=1), k=4, adaptive=False)
        if graphed:
            dec.graph_rounds, dec._vstep_plain = True, spec._verify_logits
            dec.ensure_capacity(len(prompt) + 16)
        dec._warming = True  # every step verifies
        out = list(dec.generate_ids(prompt, 16, sp, stop_token_ids=()))
        return out, dec

    got, dec = decode(True, SamplingParams(temperature=0.0))
    assert got == want and dec._graph.captures == 1 and not dec._graph.failed
    assert dec.last_result_stats.verify_steps > 2  # replays ran
    assert decode(True, hot)[0] == decode(False, hot)[0]
    # a failing round is reported, the request goes on uncaptured
    monkeypatch.setattr(sg.HostVerifyGraph, "_round", lambda self, *a: 1 / 0)
    got, dec = decode(True, SamplingParams(temperature=0.0))
    assert got == want and dec._graph.failed.startswith("ZeroDivisionError") and not dec.graph_rounds
