"""Running a model over tensor-parallel ranks: every rank loads its slices and builds the same
Generator; rank 0 drives it and the followers repeat each of its requests in lockstep.

Rank 0 wraps its Generator in ``TPGenerator``: before each call that runs the model
(``generate_ids``, ``stream``, ``complete``, ``warmup``) or sizes its cache (``ensure_capacity``:
warm-up and prefill buckets depend on it) it sends the call, with the prompt ids,
sampling parameters (a seed drawn by rank 0 when the request has none, so every rank's sampler
draws the same tokens from the same all-reduced logits), stop strings and token limit, to the
followers (``Channel``). Every rank then stops at the same token: stop tokens, stop strings and
the limit are decided from the same ids. A caller that stops reading early (a cancelled request)
still runs the remaining steps on rank 0, silently, because the followers run them too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

from ..errors import BlitzgenError
from .group import TPGroup

# Generator calls that run the model or change what later calls run (cache size): every rank makes them
_MODEL_CALLS = ("generate_ids", "stream", "complete", "warmup", "ensure_capacity")


def _time_all_reduce(group, *args, **kw):
    from .comm import time_all_reduce

    return time_all_reduce(group, *args, **kw)


_GROUP_CALLS = {"time_all_reduce": _time_all_reduce}


@dataclass(frozen=True)
class TPSpec:
    """What every rank loads (picklable): a model source or a named shape of random weights."""

    model: str | None = None
    shape: str | None = None  # random weights of a named shape (bench); model is ignored then
    device: str = "cpu"
    dtype: str = "bfloat16"
    quantize: str | None = None
    group_size: int | None = None
    compile: bool = False
    max_model_len: int | None = None
    all_reduce: str = "functional"
    seed: int = 0


def load_rank(group: TPGroup, spec: TPSpec):
    """(LoadedModel, Generator) of this rank: only its slices are read; wo and w2 all-reduce."""
    import torch

    from ..generate import Generator
    from ..loading import load, load_random
    from ..quant.core import make_config
    from .tp import Sharding, wrap

    quant = make_config(spec.quantize, spec.group_size) if spec.quantize else None
    device = str(group.device) if spec.device.startswith("cuda") else spec.device
    shard = Sharding(group.rank, group.world, quant)
    if spec.shape:
        lm = load_random(spec.shape, device=device, dtype=spec.dtype, quantize=quant, seed=spec.seed,
                         progress=False, shard=shard)
    else:
        lm = load(spec.model, device=device, dtype=spec.dtype, quantize=quant,
                  progress=group.is_leader and sys.stderr.isatty(), shard=shard)
    wrap(lm.model, group.all_reduce(spec.all_reduce))
    gen = Generator(lm.model, lm.tokenizer, compile=spec.compile, max_seq_len=spec.max_model_len)
    torch.manual_seed(0)
    return lm, gen


def model_args(spec: TPSpec):
    """The full model's ModelArgs, read from the source's config only (no weights)."""
    from ..config import ModelArgs
    from ..loading import detect_kind, gguf as gguf_src, hf as hf_src, resolve

    if spec.shape:
        return ModelArgs.from_name(spec.shape)
    path = resolve(spec.model)
    kind = detect_kind(path)
    if kind == "gguf-dir":
        path, kind = next(p for p in sorted(path.glob("*.gguf")) if gguf_src.is_gguf_file(p)), "gguf"
    if kind == "gguf":
        return gguf_src.load_args(gguf_src.open_reader(path))
    return hf_src.load_args(path)


def check_split(spec: TPSpec, world: int) -> None:
    """Before any rank starts: the GPUs exist and the model splits over ``world`` ranks."""
    from ..quant.core import make_config
    from .group import check_devices
    from .tp import TPPlan

    check_devices(world, spec.device)
    quant = make_config(spec.quantize, spec.group_size) if spec.quantize else None
    TPPlan.make(model_args(spec), 0, world, quant)


def seeded(sampling):
    """The request's sampling parameters with a seed (drawn here when absent): every rank samples alike."""
    from ..sampling import SamplingParams

    sampling = sampling or SamplingParams(temperature=0.0)
    if sampling.seed is None and not sampling.greedy:
        sampling = dataclasses.replace(sampling, seed=random.randrange(2**63))
    return sampling


class TPGenerator:
    """Rank 0's Generator: each call that runs the model is first sent to the followers. Every
    other attribute is the wrapped Generator's."""

    def __init__(self, gen, group: TPGroup):
        self.gen, self.group = gen, group

    def __getattr__(self, name):
        return getattr(self.gen, name)

    def _send(self, method: str, *args, **kw) -> None:
        if self.group.world > 1:
            self.group.channel().send((method, args, kw))

    def generate_ids(self, prompt_ids, max_new_tokens, sampling=None, stop_token_ids=None, stats=None):
        sampling = seeded(sampling)
        it = self.gen.generate_ids(prompt_ids, max_new_tokens, sampling, stop_token_ids, stats)  # validates
        self._send("generate_ids", list(prompt_ids), max_new_tokens, sampling, stop_token_ids)
        return _lockstep(it)

    def stream(self, prompt_ids, max_new_tokens, sampling=None, stop=(), stop_token_ids=None):
        sampling = seeded(sampling)
        self.gen.check_request(len(prompt_ids), max_new_tokens)
        self._send("stream", list(prompt_ids), max_new_tokens, sampling, list(stop), stop_token_ids)
        return _lockstep(self.gen.stream(prompt_ids, max_new_tokens, sampling, stop, stop_token_ids))

    def complete(self, prompt_ids, max_new_tokens, sampling=None, stop=()):
        sampling = seeded(sampling)
        self.gen.check_request(len(prompt_ids), max_new_tokens)
        self._send("complete", list(prompt_ids), max_new_tokens, sampling, list(stop))
        return self.gen.complete(prompt_ids, max_new_tokens, sampling, stop)

    def ensure_capacity(self, n_tokens: int) -> None:
        self.gen.ensure_capacity(n_tokens)  # validates here first
        self._send("ensure_capacity", n_tokens)

    def time_all_reduce(self, kind: str, nbytes: int, dtype: str = "bfloat16", iters: int = 200) -> float:
        """Seconds per all-reduce of nbytes (every rank runs it): see comm.time_all_reduce."""
        from .comm import time_all_reduce

        self._send("time_all_reduce", kind, nbytes, dtype, iters)
        return time_all_reduce(self.group, kind, nbytes, dtype, iters)

    def warmup(self, sampling_modes=None, prompt_len=None, new_tokens: int = 4) -> float:
        self._send("warmup", sampling_modes, prompt_len, new_tokens)
        return self.gen.warmup(sampling_modes, prompt_len, new_tokens)


def _lockstep(it: Iterator) -> Iterator:
    """it's items; when the caller stops early, the rest of it still runs (the followers run it).
    Ctrl-C while it runs the model is held until the item is handed out, so that rank 0 never
    stops inside a step the followers are taking too."""
    finished = False
    try:
        while True:
            try:
                with _hold_interrupts() as held:
                    x = next(it)
            except StopIteration:
                finished = True
                return
            if held:
                raise KeyboardInterrupt
            yield x
    finally:
        if not finished:
            with _hold_interrupts():
                for _ in it:
                    pass


@contextlib.contextmanager
def _hold_interrupts():
    """SIGINT recorded (the yielded list) instead of raised, in the main thread; elsewhere a no-op."""
    held: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield held
        return
    prev = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield held
    finally:
        signal.signal(signal.SIGINT, prev)


def follow(group: TPGroup, spec: TPSpec, alive: Callable[[], bool] = lambda: True) -> None:
    """A follower rank: load, then repeat rank 0's calls until it sends None."""
    _, gen = load_rank(group, spec)
    channel = group.channel()
    while True:
        req = channel.recv(alive)
        if req is None:
            return
        method, args, kw = req
        if method not in _MODEL_CALLS and method not in _GROUP_CALLS:
            raise BlitzgenError(f"unknown request {method!r} from rank 0")
        if method in _GROUP_CALLS:
            _GROUP_CALLS[method](group, *args, **kw)
            continue
        try:
            out = getattr(gen, method)(*args, **kw)
            if method in ("generate_ids", "stream"):
                for _ in out:
                    pass
        except (BlitzgenError, ValueError):  # rank 0 got the same error before any collective
            pass


def run(world: int, spec: TPSpec, leader: Callable, *, timeout_s: float | None = None):
    """``leader(lm, gen)`` on rank 0 with its TPGenerator, the model spread over ``world`` ranks;
    returns what leader returns (on rank 0; None on the other ranks). Under torchrun the ranks
    are torchrun's; otherwise blitzgen spawns ranks 1..world-1 itself (``group.launch``)."""
    from .group import DEFAULT_TIMEOUT_S, init, launch, torchrun_env

    timeout_s = timeout_s or DEFAULT_TIMEOUT_S
    check_split(spec, world)

    def lead(group: TPGroup):
        lm, gen = load_rank(group, spec)
        return leader(lm, TPGenerator(gen, group))

    if torchrun_env() is not None:
        group = init(device=spec.device, timeout_s=timeout_s)
        try:
            if not group.is_leader:
                return follow(group, spec)
            try:
                return lead(group)
            finally:
                group.channel().send(None)
        finally:
            group.close()
    return launch(world, follow, (spec,), lead, device=spec.device, timeout_s=timeout_s)
