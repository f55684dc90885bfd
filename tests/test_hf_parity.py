"""The plain PyTorch path against Hugging Face transformers on the same weights.

Random-weight safetensors checkpoints written by transformers itself for each supported
architecture variant, plus the real SmolLM2 GGUF (transformers dequantizes GGUF on its own).
"""

from __future__ import annotations

import zlib

import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from blitzgen.generate import Generator  # noqa: E402
from blitzgen.loading import load  # noqa: E402
from blitzgen.sampling import SamplingParams  # noqa: E402

SMALL = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)

VARIANTS = {
    "llama3-rope-scaling": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64))),
    "qwen2-qkv-bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=1e6, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(rope_theta=1e6, tie_word_embeddings=False,
                                                           sliding_window=None)),
    "llama-untied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "llama-tied-linear-rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=True, rope_scaling=dict(rope_type="linear", factor=2.0))),
}


def _hf_checkpoint(tmp_path_factory, tokenizer, variant: str):
    cfg_name, model_name, extra = VARIANTS[variant]
    cfg = getattr(transformers, cfg_name)(vocab_size=tokenizer.vocab_size, **SMALL, **extra)
    torch.manual_seed(zlib.crc32(variant.encode()) % 1000)  # hash() of a str changes per process
    model = getattr(transformers, model_name)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "bias" in name:
                p.normal_(0, 0.5)
    path = tmp_path_factory.mktemp(variant)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path, model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_safetensors_matches_transformers(variant, tmp_path_factory, smol_tokenizer):
    path, ref = _hf_checkpoint(tmp_path_factory, smol_tokenizer, variant)
    lm = load(path, device="cpu", dtype=torch.float32, progress=False)
    assert lm.kind == "hf"
    ids = torch.tensor([smol_tokenizer.encode("def fibonacci(n):\n    return n if n < 2 else")])
    lm.model.setup_caches(1, 128)
    with torch.no_grad():
        ours = lm.model(ids, torch.arange(ids.shape[1]))
        theirs = ref(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)

    # greedy continuations identical
    new = 12
    gen = Generator(lm.model, lm.tokenizer)
    got = list(gen.generate_ids(ids[0].tolist(), new, SamplingParams(temperature=0), stop_token_ids=()))
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert got == want[0, ids.shape[1]:].tolist()


def test_sharded_checkpoint_loads(tmp_path_factory, smol_tokenizer):
    path, ref = _hf_checkpoint(tmp_path_factory, smol_tokenizer, "llama-untied")
    sharded = tmp_path_factory.mktemp("sharded")
    ref.save_pretrained(sharded, safe_serialization=True, max_shard_size="1MB")
    smol_tokenizer.save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").exists()
    a = load(path, device="cpu", dtype=torch.float32, progress=False).model
    b = load(sharded, device="cpu", dtype=torch.float32, progress=False).model
    for (n1, p1), (n2, p2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


FIB = [{"role": "user", "content": "Implement fibonacci in python"}]


@pytest.fixture(scope="module")
def hf_smol(smol_path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(smol_path.parent), gguf_file=smol_path.name, dtype=torch.float32).eval()


def test_gguf_logits_match_transformers(smol, hf_smol):
    ids = torch.tensor([smol.tokenizer.encode_chat(FIB)])
    smol.model.setup_caches(1, 256)
    with torch.no_grad():
        ours = smol.model(ids, torch.arange(ids.shape[1]))
        theirs = hf_smol(ids).logits
    err = (ours - theirs).abs().max().item()
    assert err < 1e-3, err


def test_gguf_greedy_matches_transformers(smol, hf_smol):
    ids = smol.tokenizer.encode_chat(FIB)
    new = 24
    gen = Generator(smol.model, smol.tokenizer)
    got = list(gen.generate_ids(ids, new, SamplingParams(temperature=0), stop_token_ids=()))
    with torch.no_grad():
        want = hf_smol.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False,
                                eos_token_id=None, pad_token_id=2)
    assert got == want[0, len(ids):].tolist()
