"""The Modal deployment, offline: the app's declarations (class, methods, GPU, volume, snapshots,
autoscaling, web endpoint), the life cycle run locally on the CPU, and the client."""

from __future__ import annotations

import importlib
import io
import sys

import pytest

modal = pytest.importorskip("modal")

from blitzgen.deploy.service import Service, ServiceConfig, after_snapshot, before_snapshot  # noqa: E402
from blitzgen.deploy.settings import CACHE_MOUNT, DeploySettings  # noqa: E402
from blitzgen.errors import BlitzgenError  # noqa: E402


def _load_app(monkeypatch, **env):
    """Import modal_app afresh under BLITZGEN_MODAL_* settings; return it and the keyword arguments
    Modal received for the class's service function."""
    from modal import _functions

    for key in list(__import__("os").environ):
        if key.startswith("BLITZGEN_MODAL_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(f"BLITZGEN_MODAL_{key}", value)
    seen = {}
    original = _functions._Function._from_local  # a staticmethod

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(_functions._Function, "_from_local", staticmethod(spy))
    sys.modules.pop("blitzgen.deploy.modal_app", None)
    mod = importlib.import_module("blitzgen.deploy.modal_app")
    return mod, seen


def _partials(mod):
    from modal._utils.async_utils import synchronizer

    return {name: synchronizer._translate_in(pf) for name, pf in mod.Model._get_partial_functions().items()}


def test_the_module_imports_and_registers_the_class(monkeypatch):
    mod, seen = _load_app(monkeypatch)
    assert isinstance(mod.app, modal.App) and mod.app.name == "blitzgen"
    assert isinstance(mod.Model, modal.Cls)
    from modal._partial_function import _PartialFunctionFlags as F

    pf = _partials(mod)
    assert set(pf) == {"prepare", "start", "generate", "startup_report", "web", "stop"}
    assert pf["prepare"].flags == F.ENTER_POST_SNAPSHOT  # snapshots off by default
    assert pf["start"].flags == F.ENTER_POST_SNAPSHOT
    assert pf["generate"].flags & F.CALLABLE_INTERFACE and pf["generate"].params.is_generator
    assert pf["stop"].flags == F.EXIT
    assert pf["web"].flags & F.WEB_INTERFACE
    from modal_proto import api_pb2

    assert pf["web"].params.webhook_config.type == api_pb2.WEBHOOK_TYPE_ASGI_APP
    # what Modal was asked for: GPU, the volume, autoscaling, concurrency, no snapshots
    assert seen["gpu"] == "H100"
    volumes = seen["volumes"]
    assert list(volumes) == [CACHE_MOUNT]
    assert seen["min_containers"] == 0 and seen["max_containers"] == 1 and seen["scaledown_window"] == 300
    assert seen["max_concurrent_inputs"] == 16
    assert seen["timeout"] == 600 and seen["startup_timeout"] == 1200
    assert seen["enable_memory_snapshot"] is False
    assert not seen.get("experimental_options")


def test_settings_switch_gpu_autoscaling_and_snapshots(monkeypatch):
    from modal._partial_function import _PartialFunctionFlags as F

    mod, seen = _load_app(monkeypatch, GPU="H200", SNAPSHOT="gpu", MIN_CONTAINERS="1", MAX_CONTAINERS="3",
                          SCALEDOWN="60", CONCURRENCY="4", APP="bg-test", VOLUME="vol-test")
    assert mod.app.name == "bg-test" and seen["gpu"] == "H200"
    assert seen["min_containers"] == 1 and seen["max_containers"] == 3 and seen["scaledown_window"] == 60
    assert seen["max_concurrent_inputs"] == 4
    assert seen["enable_memory_snapshot"] is True
    assert seen["experimental_options"] == {"enable_gpu_snapshot": "True"}
    assert _partials(mod)["prepare"].flags == F.ENTER_PRE_SNAPSHOT
    assert _partials(mod)["start"].flags == F.ENTER_POST_SNAPSHOT
    assert "vol-test" in repr(mod.volume)

    mod, seen = _load_app(monkeypatch, SNAPSHOT="memory")
    assert seen["enable_memory_snapshot"] is True and not seen.get("experimental_options")
    assert _partials(mod)["prepare"].flags == F.ENTER_PRE_SNAPSHOT


def test_the_image_holds_the_requirements_the_caches_and_the_package(monkeypatch):
    import tomllib
    from pathlib import Path

    from modal._utils.async_utils import synchronizer

    mod, _ = _load_app(monkeypatch)
    env = DeploySettings.from_env().container_env()
    assert env["BLITZGEN_CACHE"].startswith(CACHE_MOUNT) and env["HF_HOME"].startswith(CACHE_MOUNT)
    assert not env["TORCHINDUCTOR_CACHE_DIR"].startswith(CACHE_MOUNT)  # local scratch, filled from the entry
    assert "blitzgen" in synchronizer._translate_in(mod.image)._added_python_source_set
    # the image installs what pyproject asks for (the package and its server extras)
    meta = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    wanted = [r for r in meta["dependencies"] + meta["optional-dependencies"]["serve"]
              if not r.startswith(("torch", "httpx"))]
    names = {r.split(">")[0].split("=")[0].lower() for r in mod.REQUIREMENTS}
    assert {r.split(">")[0].split("=")[0].lower() for r in wanted} <= names


@pytest.mark.parametrize("bad", [{"SNAPSHOT": "disk"}, {"QUANTIZE": "int3"}, {"MIN_CONTAINERS": "x"},
                                 {"MIN_CONTAINERS": "3", "MAX_CONTAINERS": "2"}, {"WARMUP": "greedy,beam"}])
def test_bad_settings_fail_in_one_line(monkeypatch, bad):
    for key, value in bad.items():
        monkeypatch.setenv(f"BLITZGEN_MODAL_{key}", value)
    with pytest.raises(BlitzgenError):
        DeploySettings.from_env()


def test_the_container_rebuilds_the_same_settings(monkeypatch):
    for key, value in {"GPU": "A100-80GB", "QUANTIZE": "int8", "COMPILE": "0", "WARMUP": "greedy,top_k",
                       "MAX_MODEL_LEN": "4096", "SNAPSHOT": "memory"}.items():
        monkeypatch.setenv(f"BLITZGEN_MODAL_{key}", value)
    deployed = DeploySettings.from_env()
    for key, value in deployed.container_env().items():
        monkeypatch.setenv(key, value)
    assert DeploySettings.from_env() == deployed
    cfg = deployed.service_config()
    assert cfg.quantize == "int8" and cfg.compile is False and cfg.warmup == ("greedy", "top_k")


# ---- the life cycle on the CPU -------------------------------------------------------------------
@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """The default model, eager, on the CPU, through the same calls the Modal class makes."""
    svc = Service(ServiceConfig(device="cpu", compile=False, dtype="float32"))
    before_snapshot(svc, "memory")  # weights loaded before a (here imaginary) snapshot
    assert svc.lm is not None and svc.engine is None
    after_snapshot(svc, "memory")
    yield svc
    svc.shutdown()


def test_lifecycle_loads_warms_up_and_reports(service):
    assert service.engine.state == "ready"
    phases = service.report.as_dict()
    for name in ("imports", "load", "warm-up", "ready"):
        assert name in phases
    assert sum(v for k, v in phases.items() if k != "total") == pytest.approx(phases["total"], abs=1e-6)
    assert service.cache_status == "off"  # eager: nothing to cache


def test_generate_streams_and_matches_the_generator(service):
    from blitzgen.sampling import SamplingParams

    events = list(service.generate("Say hello.", max_tokens=12, temperature=0.0))
    text = "".join(e["text"] for e in events if "text" in e)
    finishes = [e for e in events if "finish_reason" in e]
    assert len(finishes) == 1 and finishes[0]["finish_reason"] in ("stop", "length")
    ids = service.prompt_ids("Say hello.")
    want = service.gen.complete(ids, 12, SamplingParams(temperature=0.0)).text
    assert text == want and text


def test_generate_num_samples_and_bad_input(service):
    events = list(service.generate("Count to three.", max_tokens=6, temperature=0.8, seed=5, num_samples=2))
    assert [e["index"] for e in events if "finish_reason" in e] == [0, 1]
    with pytest.raises(BlitzgenError):
        list(service.generate("   ", max_tokens=5))
    with pytest.raises(BlitzgenError):
        list(service.generate("hi", max_tokens=5, num_samples=0))
    with pytest.raises(BlitzgenError):
        list(service.generate("hi", max_tokens=10**7))


def test_the_web_app_serves_the_api_the_page_and_startup_metrics(service):
    from fastapi.testclient import TestClient

    with TestClient(service.web_app()) as client:
        assert client.get("/health").status_code == 200
        assert "<html" in client.get("/").text.lower()
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Say hello."}],
                                                      "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        web_text = r.json()["choices"][0]["message"]["content"]
        metrics = client.get("/metrics").text
        assert 'blitzgen_startup_seconds{phase="load"}' in metrics
    # the app's shutdown left the engine serving the Modal method
    assert service.engine.state == "ready"
    events = list(service.generate("Say hello.", max_tokens=12, temperature=0.0))
    assert "".join(e["text"] for e in events if "text" in e) == web_text


@pytest.mark.slow
def test_compiled_lifecycle_builds_then_loads_the_compile_cache(tmp_path, monkeypatch, smol):
    """Compile + warm-up + cache save, then a second service loads the entry (tiny model, CPU Inductor)."""
    import dataclasses

    from .conftest import tiny_model

    monkeypatch.setenv("BLITZGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))

    def load_fn(device, opts):
        model = tiny_model(vocab_size=smol.args.vocab_size, max_seq_len=128)
        return dataclasses.replace(smol, model=model, args=model.args)

    saved = []
    svcs = []
    for _ in range(2):
        svc = Service(ServiceConfig(device="cpu", compile=True, dtype="float32", warmup=("greedy",)),
                      load_fn=load_fn, on_cache_saved=lambda: saved.append(1))
        after_snapshot(svc, "off")
        svcs.append(svc)
        events = list(svc.generate("Hi", max_tokens=4, temperature=0.0))
        assert [e for e in events if "finish_reason" in e]
        svc.shutdown()
    assert svcs[0].cache_status == "miss" and saved
    assert svcs[1].cache_status == "hit"
    assert "cache load" in svcs[1].report.phases


# ---- the client ----------------------------------------------------------------------------------
class _FakeMethod:
    def __init__(self, events, calls):
        self.events, self.calls = events, calls

    def remote_gen(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        yield from self.events


def test_stream_from_modal_looks_up_the_class_and_streams(monkeypatch):
    from blitzgen.deploy import client

    calls, looked_up = [], []
    events = [{"index": 0, "text": "Hel"}, {"index": 0, "text": "lo"},
              {"index": 0, "finish_reason": "stop", "tokens": 2},
              {"index": 1, "text": "Hey"}, {"index": 1, "finish_reason": "length", "tokens": 1}]

    class FakeCls:
        def __call__(self):
            return type("Obj", (), {"generate": _FakeMethod(events, calls)})()

    def from_name(app, name, environment_name=None):
        looked_up.append((app, name))
        return FakeCls()

    monkeypatch.setattr(modal.Cls, "from_name", from_name)
    got = list(client.stream_from_modal("my-app", "Hello", num_samples=2, temperature=0.0, seed=3))
    assert got == events and looked_up == [("my-app", "Model")]
    assert calls[0][0] == ("Hello",) and calls[0][1]["num_samples"] == 2 and calls[0][1]["seed"] == 3
    out, err = io.StringIO(), io.StringIO()
    assert client.print_stream(iter(events), out, err) == [2, 1]
    assert out.getvalue() == "Hello\nHey\n" and "Sample 2: 1 tokens (length)" in err.getvalue()


def test_a_missing_app_is_a_one_line_error(monkeypatch):
    from blitzgen.deploy import client

    def from_name(app, name, environment_name=None):
        raise modal.exception.NotFoundError(f"App {app} not found")

    monkeypatch.setattr(modal.Cls, "from_name", from_name)
    with pytest.raises(BlitzgenError, match="modal deploy"):
        list(client.stream_from_modal("nope", "Hello"))
