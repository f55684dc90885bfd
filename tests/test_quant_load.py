"""Quantizing while loading (layer by layer) gives the same model as loading whole, then quantizing."""

from __future__ import annotations

import pytest
import torch

from blitzgen.errors import BlitzgenError
from blitzgen.loading import load
from blitzgen.quant import Int4Config, Int8Config, is_quantized, quantize_model

pytest.importorskip("transformers")
from tests.test_hf_parity import _hf_checkpoint  # noqa: E402

IDS = torch.tensor([[1, 7, 42, 300, 5, 9, 77, 2]])


def _logits(model):
    model.setup_caches(1, 16)
    return model(IDS, torch.arange(IDS.shape[1]))


@pytest.mark.parametrize("config", [Int8Config(), Int4Config(group_size=32)], ids=["int8", "int4-g32"])
@pytest.mark.parametrize("variant", ["qwen2-qkv-bias", "llama-untied"])
def test_quantize_at_load_matches_quantize_after(config, variant, tmp_path_factory, smol_tokenizer):
    path, _ = _hf_checkpoint(tmp_path_factory, smol_tokenizer, variant)
    streamed = load(path, device="cpu", dtype=torch.bfloat16, quantize=config, progress=False)
    whole = load(path, device="cpu", dtype=torch.bfloat16, progress=False)
    meta = quantize_model(whole.model, config)
    assert is_quantized(streamed.model) and streamed.quant == meta
    assert not any(isinstance(m, torch.nn.Linear) for m in streamed.model.modules())
    with torch.no_grad():
        assert torch.equal(_logits(streamed.model), _logits(whole.model))
    if streamed.args.tie_word_embeddings:  # the head is its own quantized copy; the embedding stays float
        assert streamed.model.tok_embeddings.weight.dtype == torch.bfloat16


def test_quantize_at_load_gguf(smol_path):
    streamed = load(smol_path, device="cpu", dtype=torch.bfloat16, quantize="int8", progress=False)
    whole = load(smol_path, device="cpu", dtype=torch.bfloat16, progress=False)
    quantize_model(whole.model, "int8")
    with torch.no_grad():
        assert torch.equal(_logits(streamed.model), _logits(whole.model))


def test_bad_group_size_fails_before_loading(tmp_path_factory, smol_tokenizer, monkeypatch):
    path, _ = _hf_checkpoint(tmp_path_factory, smol_tokenizer, "llama-untied")
    import blitzgen.loading.hf as hf

    def no_reads(*a, **k):
        raise AssertionError("read a tensor before checking the config")

    monkeypatch.setattr(hf.SafetensorsSource, "get", no_reads)
    with pytest.raises(BlitzgenError, match="group size 128 does not divide"):
        load(path, device="cpu", quantize=Int4Config(group_size=128), progress=False)


def test_quant_dtype_sets_scales_dtype(tmp_path_factory, smol_tokenizer):
    """float32 compute with bfloat16 scales (what `blitzgen quantize` saves) matches quantize_model's."""
    path, _ = _hf_checkpoint(tmp_path_factory, smol_tokenizer, "qwen2-qkv-bias")
    streamed = load(path, device="cpu", dtype=torch.float32, quantize="int4", quant_dtype=torch.bfloat16,
                    progress=False)
    whole = load(path, device="cpu", dtype=torch.float32, progress=False)
    meta = quantize_model(whole.model, Int4Config(), dtype=torch.bfloat16)
    assert streamed.quant == meta and meta["dtype"] == "bfloat16"
    assert streamed.model.layers[0].attention.wqkv.scales.dtype == torch.bfloat16
    for (k, a), (k2, b) in zip(streamed.model.state_dict().items(), whole.model.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
