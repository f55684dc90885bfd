"""warm_state: the CPU default compiles only when a compiled warm-up recorded what the run needs."""

import argparse

import pytest
import torch

from blitzgen import warm_state
from blitzgen.config import ModelArgs
from blitzgen.runtime import RuntimeOptions

GREEDY = (True, False, False)
SAMPLE = (False, True, False)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BLITZGEN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _opts(**kw):
    return RuntimeOptions(device="cpu", dtype="bfloat16", aot_decode=True, **kw)


def _file(tmp_path, name="step.pt2"):
    path = tmp_path / name
    path.write_bytes(b"x")
    return str(path)


def test_record_then_warm_for_its_size_and_modes_only(cache, tmp_path):
    args = ModelArgs.from_name("tiny")
    assert not warm_state.is_warm(args, _opts(), 256, [GREEDY])
    f = _file(tmp_path)
    warm_state.record(args, _opts(compile=True), 256, [GREEDY], [f])
    assert warm_state.is_warm(args, _opts(), 256, [GREEDY])  # compile is not in the key
    assert warm_state.is_warm(args, _opts(max_model_len=100, warm_cache_tokens=64), 256, [GREEDY])
    assert not warm_state.is_warm(args, _opts(), 512, [GREEDY])  # another cache size
    assert not warm_state.is_warm(args, _opts(), 256, [GREEDY, SAMPLE])  # a mode not warmed
    assert not warm_state.is_warm(args, _opts(quantize="int8"), 256, [GREEDY])
    assert not warm_state.is_warm(args.replace(n_layers=3), _opts(), 256, [GREEDY])
    warm_state.record(args, _opts(), 256, [SAMPLE], [_file(tmp_path, "sampler.pt2")])  # records merge
    assert warm_state.is_warm(args, _opts(), 256, [GREEDY, SAMPLE])


def test_a_missing_or_torn_record_is_not_warm(cache, tmp_path):
    args = ModelArgs.from_name("tiny")
    f = _file(tmp_path)
    warm_state.record(args, _opts(), 256, [GREEDY], [f])
    path = warm_state._path(args, _opts(), 256)
    (tmp_path / "step.pt2").unlink()  # `cache clear`, or a file removed by hand
    assert not warm_state.is_warm(args, _opts(), 256, [GREEDY])
    with open(path, "w") as fh:
        fh.write('{"modes": [')
    assert not warm_state.is_warm(args, _opts(), 256, [GREEDY])
    warm_state.record(args, _opts(), 256, [GREEDY], [_file(tmp_path)])  # rewritten whole
    assert warm_state.is_warm(args, _opts(), 256, [GREEDY])


def test_generate_compiles_by_default_only_when_it_pays():
    from blitzgen.commands.common import COMPILE_PAYS_TOKENS

    assert 200 < COMPILE_PAYS_TOKENS <= 1000  # the default 200-token run stays eager


@pytest.fixture
def tiny_load(monkeypatch):
    """``load()`` returns one tiny random model (no tokenizer)."""
    from blitzgen import loading
    from blitzgen.model import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny").replace(max_seq_len=512)).eval()
    with torch.no_grad():
        for w in model.parameters():
            w.normal_(0.0, 0.02)
    lm = loading.LoadedModel(model=model, tokenizer=None, args=model.args, source="tiny", kind="hf", name="tiny")
    monkeypatch.setattr(loading, "load", lambda *a, **kw: lm)
    return lm


def _args(**kw):
    from blitzgen.commands.common import RUNTIME

    args = argparse.Namespace(**{dest: None for dest in RUNTIME}, model=None)
    args.device, args.quantize, args.dtype = "cpu", "none", "float32"
    for k, v in kw.items():
        setattr(args, k, v)
    return args


@pytest.mark.slow
def test_cpu_start_compiles_when_its_configuration_is_warm(cache, tiny_load, capsys):
    """A compiled warm-up records its configuration; a later start without --compile compiles, one
    with --no-compile or needing another cache size does not."""
    from blitzgen.commands.common import load_engine
    from blitzgen.compile_cache import warm_up
    from blitzgen.sampling import SamplingParams

    greedy = SamplingParams(temperature=0.0)
    need = lambda lm: (100, [greedy.mode])  # noqa: E731 - a 100-token run: a 256-position cache

    _, gen = load_engine(_args(), warm_for=need)
    assert not gen.compiled  # nothing warm yet: eager, as before
    lm, gen = load_engine(_args(compile=True))
    gen.ensure_capacity(100)
    warm_up(lm, gen, [greedy], prompt_len=4)
    assert gen._step.status == "compiled" and len(list((cache / "warm").glob("*.json"))) == 1
    capsys.readouterr()
    _, gen = load_engine(_args(), warm_for=need)
    assert gen.compiled and "this configuration is warm" in capsys.readouterr().err
    gen.ensure_capacity(100)
    warm_up(lm, gen, [greedy], prompt_len=4)
    assert gen._step.status == "loaded"  # the saved step: nothing compiled
    _, gen = load_engine(_args(compile=False), warm_for=need)
    assert not gen.compiled
    _, gen = load_engine(_args(), warm_for=lambda lm: (300, [greedy.mode]))  # a 512-position cache
    assert not gen.compiled
    _, gen = load_engine(_args(), warm_for=lambda lm: None)  # e.g. speculation
    assert not gen.compiled
