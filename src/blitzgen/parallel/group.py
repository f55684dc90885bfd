"""Process-group set-up for tensor parallelism: under torchrun, or blitzgen's own launcher.

``launch(world, follower, args, leader)`` starts ranks 1..N-1 as spawned processes and runs rank 0
in the calling process (so rank 0 keeps the terminal, stdin and any HTTP port). Every rank's
environment turns NVLink multicast off (``MULTICAST_OFF``). A watchdog thread in rank 0 ends the
whole run within ``poll`` seconds when a follower dies, and prints one line; followers exit when
rank 0 goes away (their request channel fails, or their parent is gone). Collectives carry a
timeout (``timeout_s``) as the backstop for a rank that hangs without dying.

Backends: NCCL for CUDA, gloo for CPU (the CI path). Requests go from rank 0 to the followers over
the process group's key-value store (``Channel``), which may wait forever without tripping the
collectives' timeout.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import BlitzgenError
from .. import runtime

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
DEFAULT_TIMEOUT_S = 600.0  # a collective waiting longer than this fails (covers a slow first compile)
POLL_S = 0.5  # the launcher's watchdog
IDLE_POLL_S = 0.01  # a follower's request polling, at most this late
HOT_POLL_S, HOT_S = 0.0002, 0.05  # ... and this often in the first HOT_S after the previous request
CLOSE_WAIT_S = 10.0  # TPGroup.close: how long a rank waits for the others to arrive, and to leave
FAIL_GRACE_S = 5.0  # after a rank dies: the on_failure hook's time (a server says unhealthy) before the exit


class RankFailure(BlitzgenError):
    """A tensor-parallel rank died or stopped answering."""


@dataclass
class TPGroup:
    """This process's place in the tensor-parallel group."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str
    group: object  # the torch.distributed ProcessGroup (WORLD)
    store: object  # its key-value store (requests from rank 0)
    _channel: "Channel | None" = None

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def all_reduce(self, kind: str = "functional"):
        from .comm import AllReduce

        ar = AllReduce(self.group, kind, self.world)
        ar.setup(self.device)
        return ar

    def channel(self) -> "Channel":
        """The one request channel of this group (rank 0 sends, the others receive)."""
        if self._channel is None:
            self._channel = Channel(self.store, self.rank, self.world)
        return self._channel

    def close(self, wait_s: float = CLOSE_WAIT_S) -> None:
        """Leave the group. The ranks first meet on the store, so that none drops its connections
        while a peer still reads its last collective (gloo aborts the reader's process); then rank 0,
        whose process hosts the store, waits for the others to finish leaving. Both waits are
        bounded by ``wait_s``: a dead rank delays the exit, never blocks it."""
        if not dist.is_initialized():
            return
        deadline = time.monotonic() + wait_s  # one bound for both waits
        all_came = _meet(self.store, "blitzgen/closing", self.world, deadline)
        dist.destroy_process_group()
        # a rank that never came will not report leaving either
        _meet(self.store, "blitzgen/closed", self.world, deadline if self.rank == 0 and all_came else 0.0)


def _meet(store, key: str, world: int, deadline: float) -> bool:
    """Count this rank in at ``key`` and wait (until the monotonic ``deadline``) for all ``world``
    ranks; whether they all came."""
    try:
        n = store.add(key, 1)
        while n < world and time.monotonic() < deadline:
            time.sleep(0.005)
            n = store.add(key, 0)
        return n >= world
    except Exception:  # noqa: BLE001 - the store lives in rank 0's process, which may be gone
        return False


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world, local rank) when started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK), else None."""
    rank, world = runtime.env("RANK"), runtime.env("WORLD_SIZE")
    if rank is None or world is None:
        return None
    return int(rank), int(world), int(runtime.env("LOCAL_RANK", rank))


def check_devices(world: int, device: str) -> None:
    """A clear error when CUDA ranks outnumber the visible GPUs."""
    if world < 1:
        raise BlitzgenError(f"--tp must be at least 1, got {world}")
    if device.startswith("cuda"):
        n = torch.cuda.device_count()
        if world > n:
            raise BlitzgenError(f"--tp {world} needs {world} GPUs, but {n} {'is' if n == 1 else 'are'} visible "
                                "(CUDA_VISIBLE_DEVICES)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(rank: int | None = None, world: int | None = None, *, device: str = "cpu", init_method: str | None = None,
         timeout_s: float = DEFAULT_TIMEOUT_S) -> TPGroup:
    """Join (or form) the group: torchrun's environment when present, else the given rank, world
    and init_method (``tcp://host:port``). NCCL on CUDA (this rank's GPU is LOCAL_RANK), gloo on CPU."""
    for k, v in MULTICAST_OFF.items():  # before NCCL or symmetric memory read them: multicast stays off
        os.environ[k] = v
    local = rank
    env = torchrun_env()
    if env is not None and rank is None:
        rank, world, local = env
        init_method = "env://"
    if rank is None or world is None or init_method is None:
        raise BlitzgenError("tensor parallelism needs torchrun's environment or an explicit rank, world and address")
    check_devices(world, device)
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        dev, backend = torch.device("cuda", local), "nccl"
    else:  # ranks share the host's cores
        dev, backend = torch.device("cpu"), "gloo"
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    kw = dict(device_id=dev) if backend == "nccl" else {}
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s), **kw)
    from torch.distributed.distributed_c10d import _get_default_store

    return TPGroup(rank, world, local, dev, backend, dist.group.WORLD, _get_default_store())


# ---- requests from rank 0 -------------------------------------------------------------------------
class Channel:
    """Rank 0 sends picklable requests; every follower receives each, in order."""

    PREFIX = "blitzgen/request/"

    def __init__(self, store, rank: int, world: int):
        self.store, self.rank, self.world, self.n = store, rank, world, 0

    def send(self, obj) -> None:
        self.store.set(f"{self.PREFIX}{self.n}", pickle.dumps(obj))
        self.n += 1

    def recv(self, alive=lambda: True):
        """The next request. Polls the store: every HOT_POLL_S for HOT_S (a request's next step, e.g.
        a constrained decoder's per-token call, comes within a millisecond), then backing off to
        IDLE_POLL_S while idle."""
        key = f"{self.PREFIX}{self.n}"
        t0 = time.monotonic()
        wait = HOT_POLL_S
        while True:
            try:
                if self.store.check([key]):
                    break
            except Exception:  # noqa: BLE001 - the store lives in rank 0's process
                raise RankFailure(f"rank {self.rank}: lost rank 0 while waiting for a request") from None
            if not alive():
                raise RankFailure(f"rank {self.rank}: rank 0's process is gone")
            time.sleep(wait)
            if time.monotonic() - t0 > HOT_S:
                wait = min(wait * 2, IDLE_POLL_S)
        obj = pickle.loads(self.store.get(key))
        if self.store.add(key + "/read", 1) == self.world - 1:  # the last reader frees both keys
            self.store.delete_key(key)
            self.store.delete_key(key + "/read")
        self.n += 1
        return obj


# ---- the launcher ----------------------------------------------------------------------------------
def _follower_entry(rank, world, init_method, device, timeout_s, parent, target, args):
    # Ctrl-C, and a SIGTERM sent to the whole process group (systemd, a terminal), are rank 0's to
    # handle: it drains or stops, then tells the others to finish
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for k, v in MULTICAST_OFF.items():
        os.environ[k] = v
    alive = lambda: os.getppid() == parent  # noqa: E731
    threading.Thread(target=_orphan_watch, args=(alive,), daemon=True).start()
    try:
        group = init(rank, world, device=device, init_method=init_method, timeout_s=timeout_s)
        target(group, *args, alive=alive)
    except RankFailure:
        sys.exit(3)
    except BlitzgenError as e:
        print(f"blitzgen: rank {rank}: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _orphan_watch(alive) -> None:
    """A follower whose rank 0 is gone exits, even when it is blocked inside a collective."""
    while alive():
        time.sleep(POLL_S)
    os._exit(3)


class Ranks:
    """blitzgen's own launcher: ranks 1..world-1 spawned (``follower(group, *follower_args,
    alive=...)``, importable by name), rank 0 in this process (``start`` returns its group; any
    thread may call it). A watchdog ends the run when a follower dies: ``on_failure(message)``
    (when given) runs first, for at most FAIL_GRACE_S, then the process exits with status 1
    (rank 0 may be blocked inside a collective, so it cannot be unwound)."""

    def __init__(self, world: int, follower, follower_args: tuple = (), *, device: str = "cpu",
                 timeout_s: float = DEFAULT_TIMEOUT_S, on_failure=None):
        check_devices(world, device)
        self.world, self.device, self.timeout_s, self.on_failure = world, device, timeout_s, on_failure
        self.follower, self.follower_args = follower, follower_args
        self.procs: list = []
        self.group: TPGroup | None = None
        self.done = threading.Event()

    def start(self) -> TPGroup:
        for k, v in MULTICAST_OFF.items():  # inherited by the spawned ranks
            os.environ[k] = v
        init_method = f"tcp://127.0.0.1:{free_port()}"
        ctx = torch.multiprocessing.get_context("spawn")
        self.procs = [ctx.Process(target=_follower_entry, daemon=False,
                                  args=(r, self.world, init_method, self.device, self.timeout_s, os.getpid(),
                                        self.follower, self.follower_args))
                      for r in range(1, self.world)]
        for p in self.procs:
            p.start()
        threading.Thread(target=_watch, args=(self.procs, self.done, self.on_failure), daemon=True).start()
        self.group = init(0, self.world, device=self.device, init_method=init_method, timeout_s=self.timeout_s)
        return self.group

    def stop(self) -> None:
        """Tell the followers to finish (when the group came up), then make sure they are gone."""
        self.done.set()
        _stop(self.procs, self.group)


def launch(world: int, follower, follower_args: tuple, leader, *, device: str = "cpu",
           timeout_s: float = DEFAULT_TIMEOUT_S):
    """Run ``follower(group, *follower_args, alive=...)`` on ranks 1..world-1 (spawned) and
    return ``leader(group)`` run here as rank 0 (see ``Ranks``). A follower that dies ends the run:
    the others are killed, one line is printed, and this process exits with status 1."""
    ranks = Ranks(world, follower, follower_args, device=device, timeout_s=timeout_s)
    try:
        return leader(ranks.start())
    finally:
        ranks.stop()


_FAILURE: list[str] = []


def failure() -> str | None:
    """Why the tensor-parallel ranks stopped (a dead rank), or None while they are all up."""
    return _FAILURE[0] if _FAILURE else None


def _watch(procs, done: threading.Event, on_failure=None) -> None:
    while not done.wait(POLL_S):
        for rank, p in enumerate(procs, start=1):
            if p.exitcode is not None and not done.is_set():
                how = f"signal {-p.exitcode}" if p.exitcode < 0 else f"status {p.exitcode}"
                _FAILURE.append(f"tensor-parallel rank {rank} exited ({how})")
                print(f"blitzgen: {_FAILURE[0]}; stopping all ranks", file=sys.stderr, flush=True)
                for q in procs:
                    if q.is_alive():
                        q.kill()
                if on_failure is not None:  # e.g. the server: unhealthy, requests aborted, shutting down
                    t = threading.Thread(target=on_failure, args=(_FAILURE[0],), daemon=True)
                    t.start()
                    t.join(FAIL_GRACE_S)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(1)


def _stop(procs, group, grace_s: float = 10.0) -> None:
    """Tell the followers to finish (when the group came up), then make sure they are gone."""
    if group is not None:
        try:
            group.channel().send(None)
        except Exception:  # noqa: BLE001 - the store may be gone already
            pass
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
    if dist.is_initialized():
        dist.destroy_process_group()
