"""Speculation statistics and the adaptive draft-length controller (torch-free).

    st = SpeculationStats(source="ngram", k_max=4, accepted_hist=[0] * 5, k_hist=[0] * 5)
    ctl = AdaptiveK(4, verify_cost=1.1); k = ctl.next_k(); ...; ctl.update(k, n_accepted)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


# ---- statistics --------------------------------------------------------------------------------
@dataclass
class SpeculationStats:
    """Per request (or summed over requests with ``merge``)."""

    source: str = ""
    k_max: int = 0
    verify_steps: int = 0  # target forwards of K_max+1 tokens
    plain_steps: int = 0  # one-token target steps (fallback, or no n-gram match)
    draft_steps: int = 0  # one-token draft-model steps (incl. catch-up)
    drafted: int = 0
    accepted: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    switched_off: int = 0  # times the controller turned speculation off
    verify_cost: float = 0.0  # a verify round's cost in plain tokens, as the controller last saw it
    accepted_hist: list[int] = field(default_factory=list)  # [k_max+1]: verify steps by accepted count
    k_hist: list[int] = field(default_factory=list)  # [k_max+1]: verify steps by drafted count
    time_to_first_token: float = 0.0
    total_seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_tokens_per_verify(self) -> float:
        """Tokens emitted per verify step (accepted drafts + the corrected/bonus token)."""
        return (self.accepted + self.verify_steps) / self.verify_steps if self.verify_steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.total_seconds if self.total_seconds > 0 else 0.0

    def record(self, drafted: int, accepted: int) -> None:
        self.verify_steps += 1
        self.drafted += drafted
        self.accepted += accepted
        self.accepted_hist[accepted] += 1
        self.k_hist[drafted] += 1

    def merge(self, other: "SpeculationStats") -> "SpeculationStats":
        """Add another request's counts (for a server's /metrics)."""
        for f in ("verify_steps", "plain_steps", "draft_steps", "drafted", "accepted", "generated_tokens",
                  "prompt_tokens", "switched_off", "time_to_first_token", "total_seconds"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        n = max(len(self.accepted_hist), len(other.accepted_hist))
        for name in ("accepted_hist", "k_hist"):
            a, b = getattr(self, name), getattr(other, name)
            setattr(self, name, [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n)])
        self.source = self.source or other.source
        self.verify_cost = other.verify_cost or self.verify_cost  # the latest
        self.k_max = max(self.k_max, other.k_max)
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(acceptance_rate=self.acceptance_rate, mean_tokens_per_verify=self.mean_tokens_per_verify,
                 tokens_per_second=self.tokens_per_second)
        return d

    def summary(self) -> str:
        """One line for the CLI."""
        return (f"speculation {self.source} k<={self.k_max}: acceptance {self.acceptance_rate:.0%}, "
                f"{self.mean_tokens_per_verify:.2f} tokens/verify over {self.verify_steps} verify + "
                f"{self.plain_steps} plain steps, accepted lengths {self.accepted_hist}, a verify round cost "
                f"{self.verify_cost:.2f} plain tokens")


# ---- adaptive draft length ---------------------------------------------------------------------
class AdaptiveK:
    """Chooses the draft length from the acceptance seen, or 0 (a plain step) when speculating
    would not pay.

    Per-draft-token acceptance alpha is estimated from decayed counts of accepted tokens A and
    rejections R (alpha = A / (A + R), the geometric model's estimate). A round of k drafts emits
    E(k) = (1 - alpha^(k+1)) / (1 - alpha) tokens and costs verify_cost + k * draft_cost target
    steps; k maximises E(k) / cost, and speculation is off while that ratio is below min_gain.
    While off, a probe round runs after `probe` plain steps (doubling after each failed probe up
    to max_probe), so a request that becomes predictable later still gains. When even perfect
    acceptance could not reach min_gain (a draft as slow as the target: self-int4 on a small model
    measured c_d 1.24 on an H200), speculation starts off and never probes.

    The costs start from a calibration (or a default) and then follow the wall clock: ``time_plain``
    takes the seconds of a plain token in a run of them, ``time_round`` those of a whole verify
    round (the drafting, the host's work, the read back and the consumer included), and each
    round's cost in plain tokens, less its draft steps, moves ``verify_cost`` (an average over
    about ``1 / COST_WEIGHT`` rounds). A calibration times the verify alone; on a launch-bound
    model the round's read back also stalls the pipelining that plain decoding has (an H200 ran
    SmolLM2's n-gram at 0.95x plain where the calibrated costs predicted a gain).

    A model draft must also bring its KV cache up to date (a chunk forward) before the first
    round and before a probe that follows plain steps. ``time_catch_up`` prices those chunks in
    plain tokens; probes are spaced so that they spend at most ``PROBE_SHARE`` of the plain
    tokens' time, and ``start`` keeps a request off from the start when its draft's prefill alone
    would cost more than that share (an H200 ran SmolLM2's self-int4 at 0.61-0.77x plain: the
    eager int4 chunk forwards took ~25-40 ms, ~20 plain tokens, before each of 3 probes).
    """

    COST_WEIGHT = 0.25  # each timed round's share of the measured verify cost
    PLAIN_WEIGHT = 0.1  # each timed plain token's share of the seconds per plain token
    PROBE_SHARE = 0.03  # a model draft's catch-ups: at most this share of the plain time (the 0.97x floor)
    MAX_CATCH_UP = 64.0  # plain tokens: one catch-up sample's cap (a compile or a stall stays bounded)
    MAX_PROBE_GAP = 2048  # plain steps: probes, hence fresh measurements, still come

    def __init__(self, k_max: int, *, verify_cost: float = 1.3, draft_cost: float = 0.0, min_gain: float = 1.05,
                 decay: float = 0.8, prior: float = 0.8, probe: int = 16, max_probe: int = 256, adaptive: bool = True,
                 plain_seconds: float | None = None, catch_up_seconds: float = 0.0):
        self.k_max, self.verify_cost, self.draft_cost = k_max, verify_cost, draft_cost
        self.plain_seconds = plain_seconds  # a calibrated plain token, until plain runs are timed
        self.catch_up_seconds = catch_up_seconds  # a model draft's catch-up chunk (0: none measured)
        self.min_gain, self.decay, self.adaptive = min_gain, decay, adaptive
        self.prior, self.probe0, self.max_probe = prior, probe, max_probe
        self.reset()

    def max_payable_cost(self) -> float:
        """The largest verify cost at which some k still reaches min_gain at acceptance 1."""
        return max((k + 1) / self.min_gain - k * self.draft_cost for k in range(1, self.k_max + 1))

    def time_plain(self, seconds: float) -> None:
        """One plain token took ``seconds`` (in a pipelined run, not its first token)."""
        if seconds > 0:
            w, t = self.PLAIN_WEIGHT, self.t_plain
            # a stall (a compile, a slow consumer) moves the average by at most w * 10 * t
            self.t_plain = seconds if t is None else (1 - w) * t + w * min(seconds, 10 * t)

    def time_round(self, k: int, seconds: float) -> None:
        """A verify round of k drafts took ``seconds`` from its proposal to its last token's
        delivery. Call before ``update`` so that its decision uses the cost."""
        if self.t_plain is None or k <= 0 or seconds <= 0:
            return
        cost = min(max(1.0, seconds / self.t_plain - k * self.draft_cost), 2.0 * (self.k_max + 1))  # bounded stalls
        w = self.COST_WEIGHT
        self.verify_cost = (1 - w) * self.verify_cost + w * cost
        self.timed_rounds += 1  # update() then picks k, and turns speculation off if it no longer
        # pays; probes still come (can_pay is not re-judged: a measured cost is never final)

    def time_catch_up(self, seconds: float) -> None:
        """A model draft's cache catch-up (a chunk forward: its prefill, or the tokens of a plain
        run) took ``seconds``; the average of the last few is kept, each sample at most
        MAX_CATCH_UP plain tokens."""
        if seconds > 0:
            t = self.t_plain or self.plain_seconds
            if t:
                seconds = min(seconds, self.MAX_CATCH_UP * t)
            c = self.catch_up_seconds
            self.catch_up_seconds = seconds if c <= 0 else 0.5 * (c + seconds)

    @property
    def catch_up_cost(self) -> float:
        """A catch-up chunk's cost in plain tokens (0 until both are known)."""
        t = self.t_plain or self.plain_seconds
        return self.catch_up_seconds / t if t else 0.0

    def probe_gap(self) -> int:
        """Plain steps before a probe: ``probe``, or more where a catch-up must precede it."""
        return max(self.probe, min(math.ceil(self.catch_up_cost / self.PROBE_SHARE), self.MAX_PROBE_GAP))

    def start(self, new_tokens: int) -> bool:
        """Before a request with a model draft: off from the start (so no draft prefill) when one
        catch-up chunk would cost more than PROBE_SHARE of ``new_tokens`` plain tokens. Returns
        whether it turned speculation off."""
        if self.adaptive and self.on and self.catch_up_cost > self.PROBE_SHARE * new_tokens:
            self.on, self.since_off = False, 0
            return True
        return False

    def can_pay(self) -> bool:
        """Whether some k reaches min_gain at all (acceptance 1: a round of k emits k + 1 tokens)."""
        return self._can_pay

    def reset(self) -> None:
        self.t_plain: float | None = self.plain_seconds  # seconds per plain token
        self.timed_rounds = 0
        self._can_pay = self.verify_cost <= self.max_payable_cost()
        self.acc, self.rej = 2 * self.prior, 2 * (1 - self.prior)  # a prior worth two rounds
        self.on, self.since_off, self.probe = not self.adaptive or self._can_pay, 0, self.probe0
        self.k = self.k_max
        self.switched_off = 0
        self._choose()

    @property
    def alpha(self) -> float:
        return self.acc / (self.acc + self.rej)

    def expected_tokens(self, k: int) -> float:
        a = min(self.alpha, 1 - 1e-6)
        return (1 - a ** (k + 1)) / (1 - a)

    def gain(self, k: int) -> float:
        return self.expected_tokens(k) / (self.verify_cost + k * self.draft_cost)

    def _choose(self) -> None:
        self.k = max(range(1, self.k_max + 1), key=self.gain) if self.adaptive else self.k_max

    def next_k(self) -> int:
        """Draft length for the next round; 0 means take a plain step."""
        if not self.adaptive or self.on:
            return self.k
        self.since_off += 1
        if self.since_off > self.probe_gap() and self._can_pay:  # a probe round
            return self.k
        return 0

    def observe(self, k: int, n: int) -> None:
        """Free evidence, no verify ran (a host draft checked against a plain step's token): it
        may turn speculation back on, but is never a failed probe."""
        self.acc = self.decay * self.acc + n
        self.rej = self.decay * self.rej + (1 if n < k else 0)
        self._choose()
        if self.adaptive and not self.on and self.gain(self.k) >= self.min_gain and self._can_pay:
            self.on, self.probe = True, self.probe0

    def update(self, k: int, n: int) -> None:
        """A round drafted k tokens and n were accepted."""
        self.acc = self.decay * self.acc + n
        self.rej = self.decay * self.rej + (1 if n < k else 0)
        self._choose()
        if not self.adaptive:
            return
        good = self.gain(self.k) >= self.min_gain
        if self.on and not good:
            self.on, self.since_off = False, 0
            self.switched_off += 1
        elif not self.on:
            if good:
                self.on, self.probe = True, self.probe0
            else:  # failed probe: wait longer before the next one
                self.since_off, self.probe = 0, min(2 * self.probe, self.max_probe)
