"""Fixtures of the server tests.

- ``server``: ONE live ``blitzgen serve`` subprocess for the whole session (real SmolLM2 GGUF on CPU,
  float32: the fastest CPU path; loopback only), with an API key and a small queue so the fault
  tests can fill it. Tests marked ``drains_server`` (SIGTERM) run last, since they stop it.
- ``smol_tok``: the model's tokenizer, read from the GGUF in this process while the server boots.
- ``fake_gen``: a scripted fake model (see fake_model.py), for fast tests with no weights at all.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

API_KEY = "sk-blitzgen-test"
MAX_QUEUE = 4
MAX_MODEL_LEN = 2048
BOOT_TIMEOUT = 420  # seconds; loading is slow on a busy CI machine


def pytest_configure(config):
    config.addinivalue_line("markers", "drains_server: sends SIGTERM to the shared live server (runs last)")


def pytest_collection_modifyitems(config, items):
    """Tests that stop the shared server go last, whatever order they were collected in."""
    items.sort(key=lambda item: item.get_closest_marker("drains_server") is not None)


# ---- the live server ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    proc: subprocess.Popen
    log_path: Path
    api_key: str = API_KEY
    health_codes: list[int] = field(default_factory=list)  # what /health answered while booting

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def openai(self, **kw):
        import openai

        kw.setdefault("api_key", self.api_key)
        return openai.OpenAI(base_url=self.url + "/v1", max_retries=0, timeout=300, **kw)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as {'name{label="v"}': value}."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", timeout=30).text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _wait_healthy(srv: LiveServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if srv.proc.poll() is not None:
            pytest.fail(f"the server exited with {srv.proc.returncode} while starting:\n{srv.log()[-3000:]}")
        try:
            code = httpx.get(srv.url + "/health", timeout=5).status_code
            srv.health_codes.append(code)
            if code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"the server was not ready after {timeout} s:\n{srv.log()[-3000:]}")


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> LiveServer:
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [sys.executable, "-m", "blitzgen.cli", "serve", "--port", str(port), "--device", "cpu", "--dtype",
           "float32", "--max-model-len", str(MAX_MODEL_LEN), "--api-key", API_KEY, "--max-queue", str(MAX_QUEUE),
           "--drain-timeout", "600"]  # the SIGTERM test waits for its requests, however slow the machine
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    _tokenizer_future()  # read the tokenizer here while the server boots
    srv = LiveServer(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        _wait_healthy(srv, BOOT_TIMEOUT)
        yield srv
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _load_tokenizer():
    import gguf

    from blitzgen.loading import default_model_path
    from blitzgen.tokenizer import Tokenizer

    return Tokenizer.from_gguf(gguf.GGUFReader(default_model_path()))


@functools.cache
def _tokenizer_future() -> Future:
    return ThreadPoolExecutor(1, thread_name_prefix="tokenizer").submit(_load_tokenizer)


@pytest.fixture(scope="session")
def smol_tok():
    """The default model's tokenizer, straight from the GGUF (no weights)."""
    return _tokenizer_future().result()


@pytest.fixture
def fake_gen():
    from fake_model import FakeGenerator

    return FakeGenerator()


# ---- an in-process uvicorn server around the fake model (fast tests over real sockets) ----------------
@dataclass
class FakeServer:
    url: str
    gen: object
    engine: object
    server: object  # the DrainingServer
    thread: object

    def wait_stopped(self, timeout: float = 10.0) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()


@pytest.fixture
def fake_server():
    """A factory: ``fake_server(gen, app_kw={...}, server_kw={...})`` serves `gen` on a free loopback port
    in a thread; everything it started is stopped at teardown."""
    import asyncio
    import threading

    import uvicorn
    from fake_model import fake_loader

    from blitzgen.server.app import DrainingServer, create_app
    from blitzgen.server.engine import Engine

    started: list[FakeServer] = []

    def make(gen, *, app_kw=None, server_kw=None, max_queue: int = 4) -> FakeServer:
        engine = Engine(fake_loader(gen), max_queue=max_queue, warmup=False)
        app = create_app(engine, **(app_kw or {}))
        port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, log_level="warning",
                                timeout_graceful_shutdown=2)
        server = DrainingServer(config, engine, **(server_kw or {}))
        thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
        thread.start()
        srv = FakeServer(f"http://127.0.0.1:{port}", gen, engine, server, thread)
        started.append(srv)
        deadline = time.monotonic() + 10
        while True:
            try:
                if httpx.get(srv.url + "/health", timeout=2).status_code == 200:
                    return srv
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the in-process server did not start"
            time.sleep(0.02)

    yield make
    for srv in started:
        if getattr(srv.gen, "permits", None) is not None:
            srv.gen.permits.release(100_000)
        srv.server.should_exit = True
        srv.server.force_exit = True
        srv.thread.join(10)
