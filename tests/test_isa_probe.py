"""isa_probe: Inductor's CPU vector-ISA check answered from blitzgen's cache after the first time."""

import json
import os

import pytest

cpu_vec_isa = pytest.importorskip("torch._inductor.cpu_vec_isa")

from blitzgen import isa_probe  # noqa: E402


@pytest.fixture
def probes(monkeypatch):
    """Inductor's check replaced by a counter (no compiler, no child process); each install() then
    wraps it as in a fresh process."""
    calls = []

    def fake_check_build(self, code):
        calls.append((str(self), code))
        return "bad" not in code

    monkeypatch.setattr(cpu_vec_isa.VecISA, "check_build", fake_check_build)

    def fresh_process(root):
        monkeypatch.setattr(cpu_vec_isa.VecISA, "check_build", fake_check_build)
        assert isa_probe.install(str(root))

    return calls, fresh_process


def test_second_process_does_not_probe(tmp_path, probes):
    calls, fresh_process = probes
    isa = cpu_vec_isa.VecAVX2()
    fresh_process(tmp_path)
    assert isa.check_build("ok code") is True and isa.check_build("bad code") is False
    assert len(calls) == 2
    assert isa.check_build("ok code") is True  # same process: the file answers
    fresh_process(tmp_path)
    assert isa.check_build("ok code") is True and isa.check_build("bad code") is False
    assert len(calls) == 2  # a later process: no probe at all
    assert sorted(json.loads((tmp_path / isa_probe.FILE).read_text()).values()) == [False, True]


def test_key_follows_the_isa_and_its_flags(tmp_path, probes):
    calls, fresh_process = probes
    fresh_process(tmp_path)
    cpu_vec_isa.VecAVX2().check_build("code")
    cpu_vec_isa.VecAVX512().check_build("code")
    assert len(calls) == 2  # another ISA (other flags) is its own question


def test_torn_or_foreign_file_probes_again(tmp_path, probes):
    calls, fresh_process = probes
    (tmp_path / isa_probe.FILE).write_text('{"trunc')
    fresh_process(tmp_path)
    assert cpu_vec_isa.VecAVX2().check_build("code") is True
    assert len(calls) == 1
    assert len(json.loads((tmp_path / isa_probe.FILE).read_text())) == 1  # rewritten whole
    (tmp_path / isa_probe.FILE).write_text("[1, 2]")
    fresh_process(tmp_path)
    assert cpu_vec_isa.VecAVX2().check_build("code") is True and len(calls) == 2


def test_cache_clear_removes_the_answers(tmp_path, probes):
    from blitzgen import compile_cache

    _, fresh_process = probes
    fresh_process(tmp_path)
    cpu_vec_isa.VecAVX2().check_build("code")
    assert (tmp_path / isa_probe.FILE).exists()
    os.makedirs(tmp_path / "warm")  # warm_state's records go too
    compile_cache.clear(str(tmp_path))
    assert not (tmp_path / isa_probe.FILE).exists() and not (tmp_path / "warm").exists()
