"""The Modal deployment's settings, read from the environment at deploy time (``modal deploy``)
and handed to the containers through their environment, so both sides build the same app.

  BLITZGEN_MODAL_APP             app name (default: blitzgen)
  BLITZGEN_MODAL_GPU             GPU type (default: H100), e.g. H200, A100-80GB, L40S
  BLITZGEN_MODAL_VOLUME          Volume for weights (HF cache) and the compile cache (default: blitzgen-cache)
  BLITZGEN_MODAL_SNAPSHOT        off | memory | gpu (default: off): Modal memory snapshots, or memory+GPU
  BLITZGEN_MODAL_MODEL           --model: HF repo id or a path in the volume (default: SmolLM2-135M-Instruct)
  BLITZGEN_MODAL_DTYPE           weight dtype (default: bfloat16)
  BLITZGEN_MODAL_QUANTIZE        int8 | int4 (default: none)
  BLITZGEN_MODAL_COMPILE         1/0: torch.compile + CUDA graphs (default: 1)
  BLITZGEN_MODAL_MAX_MODEL_LEN   longest prompt + completion (default: the model's context)
  BLITZGEN_MODAL_WARMUP          comma-separated sampler modes compiled at start (default: all)
  BLITZGEN_MODAL_MIN_CONTAINERS  containers kept warm (default: 0)
  BLITZGEN_MODAL_MAX_CONTAINERS  most containers (default: 1)
  BLITZGEN_MODAL_SCALEDOWN       seconds an idle container stays up (default: 300)
  BLITZGEN_MODAL_CONCURRENCY     requests one container accepts at once; they queue in its engine (default: 16)
  BLITZGEN_MODAL_TIMEOUT         seconds one request may run (default: 600)
  BLITZGEN_MODAL_STARTUP_TIMEOUT seconds a container may take to start, compile included (default: 1200)
  BLITZGEN_MODAL_TORCH           the torch requirement in the image (default: torch==2.11.0)
  BLITZGEN_MODAL_SECRET          a Modal Secret to attach (holding e.g. BLITZGEN_API_KEY, HF_TOKEN)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import BlitzgenError
from ..runtime import env, env_flag
from .service import SNAPSHOT_MODES, WARMUP_MODES, ServiceConfig

CACHE_MOUNT = "/cache"  # where the Volume is mounted in the container
PREFIX = "BLITZGEN_MODAL_"


def _int(name: str, default: int | None, minimum: int = 0) -> int | None:
    value = env(name)
    if value is None:
        return default
    try:
        n = int(value)
    except ValueError:
        raise BlitzgenError(f"{name} must be an integer, got {value!r}") from None
    if n < minimum:
        raise BlitzgenError(f"{name} must be >= {minimum}, got {n}")
    return n


@dataclass(frozen=True)
class DeploySettings:
    app_name: str = "blitzgen"
    gpu: str = "H100"
    volume: str = "blitzgen-cache"
    snapshot: str = "off"
    model: str | None = None
    dtype: str = "bfloat16"
    quantize: str | None = None
    compile: bool = True
    max_model_len: int | None = None
    warmup: tuple[str, ...] = tuple(WARMUP_MODES)
    min_containers: int = 0
    max_containers: int = 1
    scaledown_window: int = 300
    concurrency: int = 16
    timeout: int = 600
    startup_timeout: int = 1200
    torch: str = "torch==2.11.0"
    secret: str | None = None

    @classmethod
    def from_env(cls) -> "DeploySettings":
        d = cls()
        warmup = env(PREFIX + "WARMUP")
        s = cls(
            app_name=env(PREFIX + "APP", d.app_name), gpu=env(PREFIX + "GPU", d.gpu),
            volume=env(PREFIX + "VOLUME", d.volume), snapshot=env(PREFIX + "SNAPSHOT", d.snapshot).lower(),
            model=env(PREFIX + "MODEL"), dtype=env(PREFIX + "DTYPE", d.dtype), quantize=env(PREFIX + "QUANTIZE"),
            compile=env_flag(PREFIX + "COMPILE", d.compile),
            max_model_len=_int(PREFIX + "MAX_MODEL_LEN", None, 2),
            warmup=tuple(m.strip() for m in warmup.split(",") if m.strip()) if warmup else d.warmup,
            min_containers=_int(PREFIX + "MIN_CONTAINERS", d.min_containers),
            max_containers=_int(PREFIX + "MAX_CONTAINERS", d.max_containers, 1),
            scaledown_window=_int(PREFIX + "SCALEDOWN", d.scaledown_window, 2),
            concurrency=_int(PREFIX + "CONCURRENCY", d.concurrency, 1),
            timeout=_int(PREFIX + "TIMEOUT", d.timeout, 1),
            startup_timeout=_int(PREFIX + "STARTUP_TIMEOUT", d.startup_timeout, 1),
            torch=env(PREFIX + "TORCH", d.torch), secret=env(PREFIX + "SECRET"),
        )
        return s.validate()

    def validate(self) -> "DeploySettings":
        if self.snapshot not in SNAPSHOT_MODES:
            raise BlitzgenError(f"{PREFIX}SNAPSHOT must be one of {', '.join(SNAPSHOT_MODES)}, got {self.snapshot!r}")
        if self.quantize not in (None, "int8", "int4"):
            raise BlitzgenError(f"{PREFIX}QUANTIZE must be int8 or int4, got {self.quantize!r}")
        bad = [m for m in self.warmup if m not in WARMUP_MODES]
        if bad:
            raise BlitzgenError(f"{PREFIX}WARMUP: unknown mode(s) {', '.join(bad)} (one of {', '.join(WARMUP_MODES)})")
        if self.min_containers > self.max_containers:
            raise BlitzgenError(f"{PREFIX}MIN_CONTAINERS ({self.min_containers}) exceeds "
                                f"{PREFIX}MAX_CONTAINERS ({self.max_containers})")
        return self

    def container_env(self) -> dict[str, str]:
        """The settings as environment variables (so the container rebuilds the same app), plus
        where the caches live: compile-cache entries on the Volume, Inductor's scratch on local disk
        (filled from the entry at start), Hugging Face downloads on the Volume."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            name = {"app_name": "APP", "scaledown_window": "SCALEDOWN"}.get(f.name, f.name.upper())
            out[PREFIX + name] = ",".join(value) if isinstance(value, tuple) else \
                ("1" if value is True else "0" if value is False else str(value))
        out.update({"BLITZGEN_CACHE": f"{CACHE_MOUNT}/blitzgen", "HF_HOME": f"{CACHE_MOUNT}/hf",
                    "TORCHINDUCTOR_CACHE_DIR": "/tmp/blitzgen-inductor"})
        return out

    def service_config(self) -> ServiceConfig:
        return ServiceConfig(model=self.model, dtype=self.dtype, compile=self.compile, quantize=self.quantize,
                             max_model_len=self.max_model_len, warmup=self.warmup,
                             max_queue=max(16, self.concurrency), api_key=env("BLITZGEN_API_KEY"))
