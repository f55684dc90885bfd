"""``blitzgen serve --tp N``: rank 0 runs the HTTP server; its engine drives a TPGenerator.

The ranks are started (or, under torchrun, joined) in the engine's worker thread, inside its
loader, so the port listens and ``/health`` answers 503 "loading" while they come up. Every
generation path of the server goes through the TPGenerator: plain and streamed decoding
(``stream``: lockstep with go/stop checkpoints, so a client that leaves mid-stream stops every
rank at the same step), and the grammar / logprobs token loop (``prefill`` and ``model_logits``,
one request per step), and speculation from any source (``TPGenerator.speculative``: every rank
runs the same decoder, in lockstep like ``stream``; a draft model is split like the target).

A follower that dies: ``/health`` turns 503 ("failed"), running and queued requests end with an
error, the server stops, and the process exits with status 1 within POLL_S + FAIL_GRACE_S.
"""

from __future__ import annotations

import time
from typing import Callable

from ..errors import BlitzgenError
from .group import DEFAULT_TIMEOUT_S, FAIL_GRACE_S, RankFailure, Ranks, TPGroup, init, torchrun_env
from .runner import TPGenerator, TPSpec, check_split, follow, load_rank

UNHEALTHY_S = 1.0  # how long /health says "failed" before the server stops listening


def check(world: int, spec: TPSpec) -> None:
    """Before binding the port: the GPUs exist, the model splits, torchrun's world is --tp."""
    env = torchrun_env()
    if env is not None and env[1] != world:
        raise BlitzgenError(f"--tp {world} but torchrun started {env[1]} ranks (--nproc_per_node); make them equal")
    check_split(spec, world)


def torchrun_follower(world: int, spec: TPSpec) -> bool:
    """Under torchrun, on ranks 1..N-1: follow rank 0 until it stops, then return True. False on
    rank 0 and outside torchrun (the caller serves)."""
    env = torchrun_env()
    if env is None or env[0] == 0:
        return False
    check(world, spec)
    group = init(device=spec.device, timeout_s=DEFAULT_TIMEOUT_S)
    try:
        follow(group, spec)
    except RankFailure:
        pass
    finally:
        group.close()
    return True


class TPServing:
    """The engine's loader for --tp (``load``, called in the engine's thread), the watchdog's
    failure hook (``attach`` the engine and the server first) and the shutdown (``stop``)."""

    def __init__(self, world: int, spec: TPSpec, log: Callable[[str], None] = print):
        self.world, self.spec, self.log = world, spec, log
        self.engine = self.server = None
        self.ranks: Ranks | None = None
        self.group: TPGroup | None = None

    def attach(self, engine, server) -> None:
        self.engine, self.server = engine, server

    def load(self):
        from ..startup import REPORT

        t0 = time.perf_counter()
        if torchrun_env() is not None:
            self.group = init(device=self.spec.device, timeout_s=DEFAULT_TIMEOUT_S)
        else:
            self.ranks = Ranks(self.world, follow, (self.spec,), device=self.spec.device, on_failure=self.failed)
            self.group = self.ranks.start()
        REPORT.mark("imports")
        lm, gen = load_rank(self.group, self.spec)
        REPORT.mark("load")
        self.log(f"Loaded {lm.name} ({lm.kind}, {lm.args.n_layers} layers, {self.spec.dtype}"
                 f"{', ' + lm.quant['scheme'] if lm.quant else ''}) on {self.world} tensor-parallel ranks "
                 f"({self.group.backend}, all-reduce {self.spec.all_reduce}) in {time.perf_counter() - t0:.2f} seconds")
        return lm, TPGenerator(gen, self.group)

    def failed(self, message: str) -> None:
        """A follower died (the launcher's watchdog thread): unhealthy, requests aborted, server stopped."""
        engine, server = self.engine, self.server
        if engine is not None:
            with engine._cond:
                engine.state, engine.error = "failed", RankFailure(message)
            engine.abort_all(f"the server stopped: {message}")
        deadline = time.monotonic() + FAIL_GRACE_S - 0.5
        time.sleep(UNHEALTHY_S)
        if server is not None:
            server.exit_now()
        time.sleep(max(0.0, deadline - time.monotonic()))  # the server's own shutdown; then the watchdog exits

    def stop(self) -> None:
        """After the server stopped: tell the followers to finish and wait for them (bounded)."""
        if self.ranks is not None:
            self.ranks.stop()
        elif self.group is not None:  # torchrun: its agent reaps the followers
            try:
                self.group.channel().send(None)
            finally:
                self.group.close()

