"""Tensor parallelism: one model over the GPUs of a host (or CPU processes with gloo, for tests).

- ``group``: process groups (torchrun or blitzgen's own launcher), NVLink multicast off, a
  watchdog that ends the run when a rank dies, and the request channel from rank 0.
- ``tp``: the sharding plan (which rows/columns each rank holds; the loader's per-tensor hook).
- ``comm``: the all-reduce choice (functional collectives; symmetric-memory one-/two-shot).
- ``runner``: load a rank, and run a Generator in lockstep on every rank (``run``).
"""

from .comm import ALL_REDUCE, AllReduce  # noqa: F401
from .group import MULTICAST_OFF, RankFailure, TPGroup, init, launch, torchrun_env  # noqa: F401
from .runner import TPGenerator, TPSpec, follow, load_rank, run  # noqa: F401
from .tp import RowParallel, Sharding, ShardError, TPPlan, wrap  # noqa: F401
