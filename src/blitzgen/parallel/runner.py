"""Running a model over tensor-parallel ranks: every rank loads its slices and builds the same
Generator; rank 0 drives it and the followers repeat each of its requests in lockstep.

Rank 0 wraps its Generator in ``TPGenerator``: before each call that runs the model
(``generate_ids``, ``stream``, ``warmup``, and the other decoders' hooks ``prefill`` and
``model_logits``) or changes what later calls run (``ensure_capacity``: the cache size;
``forget_prefix``: the prompt cache) it sends the call, with the prompt ids, sampling parameters
(a seed drawn by rank 0 when the request has none, so every rank's sampler draws the same tokens
from the same all-reduced logits), stop strings and token limit, to the followers (``Channel``).
Every rank then stops at the same token: stop tokens, stop strings and the limit are decided from
the same ids. A caller that stops reading early (a cancelled request, a client gone) is the one
thing the followers cannot see: every ``every`` items (CHECKPOINT_EVERY) all ranks agree, with a
one-integer broadcast from rank 0, whether to go on; rank 0 runs silently to the next checkpoint and
says stop there. Decoders that run their own token loop on ``prefill``/``model_logits`` (grammar,
logprobs) send one request per step, so stopping needs no agreement. Speculative decoding (n-gram,
self-int4 and a draft model, each rank holding its slices of the draft) is mirrored a level up:
every rank builds the same ``SpeculativeDecoder`` on its own Generator (``TPGenerator.speculative``),
and its calls are sent like the Generator's, with rank 0's calibrated costs (no rank follows its own clock), so that every rank's
controller makes the same choices.
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

# Generator calls that run the model or change what later calls run (cache size, cached prefix):
# every rank makes them
_MODEL_CALLS = ("generate_ids", "stream", "warmup", "ensure_capacity", "prefill", "model_logits", "forget_prefix",
                "reuse_prefix", "stash_prefix", "configure_prompt_cache")  # the last three: saved prefixes
_STEPPED = ("generate_ids", "stream")  # iterators: run in lockstep, with checkpoints
# Generator methods that only read (or run on rank 0's text alone): TPGenerator leaves them local.
# A new Generator method must be put here or made a model call (tests/test_tp.py checks it).
LOCAL_CALLS = ("default_max_tokens", "check_request", "stream_tokens", "warmup_plan",
               "prefill_buckets", "prefill_buckets_at", "complete")  # complete: through TPGenerator.stream
CHECKPOINT_EVERY = 16  # items between two go/stop agreements (a cancel runs at most this many more)


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
    options: object = None  # the RuntimeOptions rank 0's verb resolved (decode attention, warm-up, cache dir)


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
    gen = Generator(lm.model, lm.tokenizer, options=spec.options, compile=spec.compile,
                    max_seq_len=spec.max_model_len)
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

    def __init__(self, gen, group: TPGroup, every: int = CHECKPOINT_EVERY):
        self.gen, self.group, self.every = gen, group, every

    def __getattr__(self, name):
        return getattr(self.gen, name)

    def _send(self, method: str, *args, **kw) -> None:
        if self.group.world > 1:
            self.group.channel().send((method, args, kw, self.every))

    def generate_ids(self, prompt_ids, max_new_tokens, sampling=None, stop_token_ids=None, stats=None):
        sampling = seeded(sampling)
        it = self.gen.generate_ids(prompt_ids, max_new_tokens, sampling, stop_token_ids, stats)  # validates
        self._send("generate_ids", list(prompt_ids), max_new_tokens, sampling, stop_token_ids)
        return _lockstep(it, self.group, self.every)

    def stream(self, prompt_ids, max_new_tokens, sampling=None, stop=(), stop_token_ids=None):
        sampling = seeded(sampling)
        self.gen.check_request(len(prompt_ids), max_new_tokens)
        self._send("stream", list(prompt_ids), max_new_tokens, sampling, list(stop), stop_token_ids)
        return _lockstep(self.gen.stream(prompt_ids, max_new_tokens, sampling, stop, stop_token_ids),
                         self.group, self.every)

    def complete(self, prompt_ids, max_new_tokens, sampling=None, stop=()):
        from ..generate import Completion

        parts, ids, d = [], [], None
        for d in self.stream(prompt_ids, max_new_tokens, sampling, stop):
            parts.append(d.text)
            ids.extend(d.token_ids)
        return Completion("".join(parts), ids, d.finish_reason, d.stats)

    def ensure_capacity(self, n_tokens: int) -> None:
        self.gen.ensure_capacity(n_tokens)  # validates here first
        self._send("ensure_capacity", n_tokens)

    # ---- the hooks of other decoders (constrained.py: grammar, logprobs): one request per step ----
    def prefill(self, prompt_ids, start: int = 0):
        self._send("prefill", list(prompt_ids), start)
        return self.gen.prefill(prompt_ids, start)

    def model_logits(self, tok, pos, *, extends=None, continues=False):
        value = int(tok.reshape(-1)[0])  # read back here anyway: the followers get the id
        # continues: rank 0's caller extends its live prefix once it has read the token; the
        # followers extend theirs now (the same claim on every rank)
        self._send("model_logits", value, int(pos.reshape(-1)[0]), extends=value if continues else extends)
        return self.gen.model_logits(tok, pos, extends=extends, continues=continues)

    def forget_prefix(self) -> None:
        self._send("forget_prefix")
        self.gen.forget_prefix()

    # ---- the prompt cache: a lookup may copy a saved prefix in (prefix_cache), so every rank makes it
    def reuse_prefix(self, prompt_ids) -> int:
        self._send("reuse_prefix", list(prompt_ids))
        return self.gen.reuse_prefix(prompt_ids)

    def stash_prefix(self) -> None:
        self._send("stash_prefix")
        self.gen.stash_prefix()

    def configure_prompt_cache(self, entries: int, nbytes: int) -> None:
        self.gen.configure_prompt_cache(entries, nbytes)  # validates here first
        self._send("configure_prompt_cache", entries, nbytes)

    def time_all_reduce(self, kind: str, nbytes: int, dtype: str = "bfloat16", iters: int = 200) -> float:
        """Seconds per all-reduce of nbytes (every rank runs it): see comm.time_all_reduce."""
        from .comm import time_all_reduce

        self._send("time_all_reduce", kind, nbytes, dtype, iters)
        return time_all_reduce(self.group, kind, nbytes, dtype, iters)

    def warmup(self, sampling_modes=None, prompt_len=None, new_tokens: int = 4) -> float:
        self._send("warmup", sampling_modes, prompt_len, new_tokens)
        return self.gen.warmup(sampling_modes, prompt_len, new_tokens)

    def speculative(self, source: str, k: int, group_size: int = 32, draft_model: str | None = None
                    ) -> "TPSpeculative":
        """A speculative decoder over every rank: each builds the same one on its own Generator."""
        from ..speculative import build_decoder

        dec = build_decoder(self.gen, source, k, group_size=group_size, draft_model=draft_model,
                            group=self.group)  # validates here first
        self._send("speculative", source, k, group_size, draft_model)
        return TPSpeculative(dec, source, self)


class TPSpeculative:
    """Rank 0's SpeculativeDecoder under tensor parallelism: each call that runs the model is first
    sent to the followers, with this decoder's costs (``calibrate`` times them on rank 0; every
    rank's controller must decide alike). Every other attribute is the wrapped decoder's."""

    def __init__(self, dec, source: str, tpgen: TPGenerator):
        self.dec, self.source, self.tpgen = dec, source, tpgen

    def __getattr__(self, name):
        return getattr(self.dec, name)

    def _send(self, call: str, *args, **kw) -> None:
        self.tpgen._send("speculative_call", self.source, call, args, kw,
                         (self.dec.verify_cost, self.dec.draft_cost))

    def generate_ids(self, prompt_ids, max_new_tokens, sampling=None, stop_token_ids=(), stats=None):
        sampling = seeded(sampling)
        self.dec._check(len(prompt_ids), max_new_tokens)  # before the followers start
        self._send("generate_ids", list(prompt_ids), max_new_tokens, sampling, stop_token_ids)
        return _lockstep(self.dec.generate_ids(prompt_ids, max_new_tokens, sampling, stop_token_ids, stats),
                         self.tpgen.group, self.tpgen.every)

    def ensure_capacity(self, n: int) -> None:
        self._send("ensure_capacity", n)
        self.dec.ensure_capacity(n)

    def warmup(self, *args, **kw) -> float:
        self._send("warmup", *args, **kw)
        return self.dec.warmup(*args, **kw)

    def calibrate(self, *args, **kw) -> dict:
        self._send("calibrate", *args, **kw)
        return self.dec.calibrate(*args, **kw)


def _agree(group: TPGroup, go: bool | None) -> bool:
    """Every rank's answer to "go on?": rank 0's ``go``, broadcast (followers pass None)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([int(bool(go))], dtype=torch.int32, device=group.device)
    dist.broadcast(t, src=0, group=group.group)
    return bool(go) if group.is_leader else bool(t.item())


def _lockstep(it: Iterator, group: TPGroup | None = None, every: int = CHECKPOINT_EVERY) -> Iterator:
    """it's items, on rank 0. After every ``every`` items the ranks agree whether to go on
    (``_agree``). When the caller stops early (closes it, even before the first item), rank 0 runs
    silently to the next checkpoint (or the natural end) and says stop there. Ctrl-C while it runs
    the model is held until the item is handed out, so that rank 0 never stops inside a step the
    followers are taking too."""
    return _Lockstep(it, group, every)


class _Lockstep:
    def __init__(self, it: Iterator, group: TPGroup | None, every: int):
        self.it, self.group, self.every = it, group, every
        self.sync = group is not None and group.world > 1
        self.n, self.done = 0, False

    def __iter__(self):
        return self

    def __next__(self):
        if self.done:
            raise StopIteration
        if not self.sync:  # one rank: nothing to keep in step
            return next(self.it)
        if self.n and self.n % self.every == 0:
            _agree(self.group, True)
        try:
            with _hold_interrupts() as held:
                x = next(self.it)
        except StopIteration:
            self.done = True
            raise
        except BaseException:
            self.close()
            raise
        self.n += 1
        if held:
            self.close()
            raise KeyboardInterrupt
        return x

    def close(self) -> None:
        if self.done:
            return
        self.done = True
        with _hold_interrupts():
            if self.sync:
                finished = False
                while self.n == 0 or self.n % self.every:
                    try:
                        next(self.it)
                    except StopIteration:
                        finished = True
                        break
                    self.n += 1
                if not finished:
                    _agree(self.group, False)
            close = getattr(self.it, "close", None)
            if close is not None:
                close()


def _follow_steps(it: Iterator, group: TPGroup, every: int) -> None:
    """A follower's side of ``_lockstep``: run it, stopping at the checkpoint where rank 0 says so."""
    n = 0
    try:
        for _ in it:
            n += 1
            if n % every == 0 and not _agree(group, None):
                return
    finally:
        it.close()


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
    serve(group, gen, alive)


def serve(group: TPGroup, gen, alive: Callable[[], bool] = lambda: True) -> None:
    """Repeat rank 0's calls on ``gen`` (this rank's Generator) until it sends None."""
    import torch

    channel = group.channel()
    decoders: dict = {}  # source -> this rank's SpeculativeDecoder (TPGenerator.speculative)
    while True:
        req = channel.recv(alive)
        if req is None:
            return
        method, args, kw, every = req
        if method in ("speculative", "speculative_call"):
            _follow_speculative(group, gen, decoders, method, args, kw, every)
            continue
        if method in _GROUP_CALLS:
            try:
                _GROUP_CALLS[method](group, *args, **kw)
            except Exception:  # noqa: BLE001 - rank 0 failed alike and reports it
                pass
            continue
        if method not in _MODEL_CALLS:
            raise BlitzgenError(f"unknown request {method!r} from rank 0")
        try:
            if method == "model_logits":  # (token, position) as ints: the tensors are rebuilt here
                with torch.inference_mode():  # as in rank 0's token loop (the compiled step's guards)
                    gen.model_logits(torch.tensor([[args[0]]], device=gen.device),
                                     torch.tensor([args[1]], device=gen.device), extends=kw.get("extends"))
                continue
            out = getattr(gen, method)(*args, **kw)
        except (BlitzgenError, ValueError):  # rank 0 got the same error before any collective
            continue
        if method in _STEPPED:
            _follow_steps(out, group, every)


def _follow_speculative(group: TPGroup, gen, decoders: dict, method: str, args, kw, every: int) -> None:
    """A follower's side of TPGenerator.speculative and TPSpeculative's calls."""
    try:
        if method == "speculative":
            from ..speculative import build_decoder

            source, k, group_size, draft_model = args
            decoders[source] = build_decoder(gen, source, k, group_size=group_size, draft_model=draft_model,
                                             group=group)
            return
        source, call, cargs, ckw, (verify_cost, draft_cost) = args
        dec = decoders[source]
        dec.verify_cost, dec.draft_cost = verify_cost, draft_cost  # rank 0's: the same choices
        out = getattr(dec, call)(*cargs, **ckw)
    except (BlitzgenError, ValueError):  # rank 0 got the same error before any collective
        return
    if call == "generate_ids":
        _follow_steps(out, group, every)


def run(world: int, spec: TPSpec, leader: Callable, *, timeout_s: float | None = None):
    """``leader(lm, gen)`` on rank 0 with its TPGenerator, the model spread over ``world`` ranks;
    returns what leader returns (on rank 0; None on the other ranks). Under torchrun the ranks
    are torchrun's; otherwise blitzgen spawns ranks 1..world-1 itself (``group.launch``)."""
    from .group import DEFAULT_TIMEOUT_S, init, launch, torchrun_env

    timeout_s = timeout_s or DEFAULT_TIMEOUT_S
    check_split(spec, world)

    def lead(group: TPGroup):
        from ..startup import REPORT

        REPORT.mark("imports")  # with the ranks' start: rank 0's start-up report, as serve --tp
        lm, gen = load_rank(group, spec)
        REPORT.mark("load")
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
