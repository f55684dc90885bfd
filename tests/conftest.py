"""Shared fixtures: the real SmolLM2 GGUF (loaded once per session) and tiny random models."""

from __future__ import annotations

import os

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from blitzgen.config import ModelArgs
from blitzgen.model import Transformer


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`-n 2 --dist loadgroup`, what CI runs): each file's tests stay on one
    worker (module fixtures are built once), and every test on the shared live server
    (tests/server) joins one group, so they run on one worker in collection order, the SIGTERM
    test last."""
    if getattr(config.option, "dist", "no") == "no":
        return
    for item in items:
        group = "live-server" if "server" in getattr(item, "fixturenames", ()) else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def smol_path():
    from blitzgen.loading import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def smol(smol_path):
    """The default model in float32 on CPU (the oracle path)."""
    from blitzgen.loading import load

    return load(smol_path, device="cpu", dtype=torch.float32, progress=False)


@pytest.fixture(scope="session")
def smol_tokenizer(smol):
    return smol.tokenizer


def tiny_model(seed: int = 0, dtype=torch.float32, **overrides) -> Transformer:
    """A random tiny Llama (2 layers, GQA) with caches set up; deterministic per seed."""
    args = ModelArgs.from_name("tiny").replace(**overrides)
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
        for layer in model.layers:
            layer.attention_norm.weight.fill_(1.0)
            layer.ffn_norm.weight.fill_(1.0)
    model = model.to(dtype).eval()
    model.setup_caches(1, args.max_seq_len)
    return model


@pytest.fixture
def tiny():
    return tiny_model()
