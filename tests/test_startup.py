"""The start-up report: phases from process start, summing to the wall time; the line; the gauges."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blitzgen.startup import StartupReport, process_start_time

ROOT = Path(__file__).resolve().parents[1]


def test_process_start_time_is_before_now_and_not_long_ago():
    start = process_start_time()
    assert start <= time.time()
    assert time.time() - start < 24 * 3600


def test_phases_sum_to_the_wall_time():
    report = StartupReport(start=time.time())
    time.sleep(0.05)
    report.mark("imports")
    time.sleep(0.1)
    report.mark("load")
    with report.phase("compile"):
        time.sleep(0.05)
    time.sleep(0.02)
    report.mark("first token")
    wall = time.time() - report.start
    phases = report.as_dict()
    assert list(phases) == ["imports", "load", "compile", "first token", "total"]
    assert sum(v for k, v in phases.items() if k != "total") == pytest.approx(report.total, abs=1e-6)
    assert report.total == pytest.approx(wall, abs=0.02)
    assert phases["load"] == pytest.approx(0.1, abs=0.05)


def test_a_repeated_phase_accumulates_and_render_is_one_line():
    report = StartupReport(start=time.time())
    report.mark("warm-up", report.start + 1.0)
    report.mark("load", report.start + 1.5)
    report.mark("warm-up", report.start + 3.0)
    report.detail("dynamo", 0.7)
    line = report.render("first token")
    assert "\n" not in line
    assert line.startswith("startup: first token in 3.00 s (warm-up 2.50 s, load 0.50 s)")
    assert "[dynamo 0.70 s]" in line


def test_gauges_on_a_registry_follow_later_marks():
    from prometheus_client import CollectorRegistry, generate_latest

    reg = CollectorRegistry()
    report = StartupReport(start=time.time() - 2)
    report.mark("imports")
    report.register(reg)
    report.mark("load")
    text = generate_latest(reg).decode()
    assert 'blitzgen_startup_seconds{phase="imports"}' in text
    assert 'blitzgen_startup_seconds{phase="load"}' in text
    assert 'blitzgen_startup_seconds{phase="total"}' in text
    total = reg.get_sample_value("blitzgen_startup_seconds", {"phase": "total"})
    assert total == pytest.approx(report.total)


_PROGRAM = """
import json, time, sys
from blitzgen.startup import REPORT
import torch
REPORT.mark("imports")
time.sleep(0.3)
REPORT.mark("load")
print(json.dumps({"phases": REPORT.as_dict(), "now": time.time(), "start": REPORT.start}))
print(REPORT.render(), file=sys.stderr)
"""


def test_a_real_process_counts_interpreter_start_and_imports():
    t_launch = time.time()
    out = subprocess.run([sys.executable, "-c", _PROGRAM], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    t_done = time.time()
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    phases = data["phases"]
    # the process started after we launched it (clock ticks are 10 ms) and before it ended
    assert t_launch - 0.05 <= data["start"] <= data["now"] <= t_done
    assert phases["imports"] > 0.1  # torch's import at least
    assert phases["load"] == pytest.approx(0.3, abs=0.15)
    assert phases["imports"] + phases["load"] == pytest.approx(phases["total"], abs=1e-6)
    assert phases["total"] == pytest.approx(data["now"] - data["start"], abs=0.05)
    assert out.stderr.strip().startswith("startup: ready in")


def test_compile_regions_trace_one_block_for_every_layer():
    """With ``compile_regions`` the decode step's graph calls one traced block subgraph per layer
    (Dynamo traces the block once), and gives eager's logits; without, the layers are unrolled."""
    import torch

    from blitzgen.generate import _model_step
    from tests.conftest import tiny_model

    if not hasattr(torch.compiler, "nested_compile_region"):
        pytest.skip("torch without nested_compile_region")
    model = tiny_model(n_layers=4)
    tok, pos = torch.tensor([[3]]), torch.tensor([2])
    with torch.no_grad():
        want = _model_step(model, tok, pos)
    for regions in (True, False):
        graphs = []

        def backend(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        torch._dynamo.reset()
        model.compile_regions = regions
        with torch.no_grad():
            got = torch.compile(_model_step, backend=backend, fullgraph=True)(model, tok, pos)
        assert torch.allclose(got, want, atol=1e-5), regions
        calls = [n for n in graphs[0].graph.nodes if n.target is torch.ops.higher_order.invoke_subgraph]
        subgraphs = {n.args[0].target for n in calls}
        if regions:
            assert len(calls) == 4 and len(subgraphs) == 1  # one block traced, called per layer
        else:
            assert not calls
    torch._dynamo.reset()


def test_regions_default_on_for_cpu_and_cuda(monkeypatch):
    from blitzgen.runtime import RuntimeOptions

    assert RuntimeOptions().regions_for("cpu") and RuntimeOptions().regions_for("cuda:0")
    assert not RuntimeOptions(compile_regions=False).regions_for("cpu")
    monkeypatch.setenv("BLITZGEN_COMPILE_REGIONS", "0")
    assert not RuntimeOptions.from_env().regions_for("cuda")
    monkeypatch.setenv("BLITZGEN_COMPILE_REGIONS", "1")
    assert RuntimeOptions.from_env().regions_for("cuda")
    monkeypatch.setenv("BLITZGEN_COMPILE_REGIONS", "0")
    assert not RuntimeOptions.from_env().regions_for("cpu")


@pytest.mark.slow
def test_compile_regions_with_int4_on_cpu_match_eager():
    """int4 (bf16, the CPU packed op) compiled by Inductor with one block traced for all layers:
    the op is opaque (quant/int4.int4_mm_cpu_op), since Inductor's own lowering of it breaks inside
    a region; logits match the eager int4 model's."""
    import torch

    from blitzgen.generate import _model_step
    from blitzgen.quant import make_config, quantize_model
    from tests.conftest import tiny_model

    if not hasattr(torch.compiler, "nested_compile_region"):
        pytest.skip("torch without nested_compile_region")
    model = tiny_model(n_layers=3, dtype=torch.bfloat16)
    quantize_model(model, make_config("int4", 32, head=False))
    assert model.layers[0].attention.wqkv._packed_for == ("cpu", torch.bfloat16)
    tok, pos = torch.tensor([[3]]), torch.tensor([2])
    torch._dynamo.reset()
    with torch.no_grad():
        want = _model_step(model, tok, pos).float()
        model.compile_regions = True
        got = torch.compile(_model_step, fullgraph=True)(model, tok, pos).float()
    torch._dynamo.reset()
    assert torch.allclose(got, want, atol=0.05 * want.abs().max().item()), (got - want).abs().max()
