"""A scripted stand-in for the model, tokenizer and Generator: engine and app tests without weights."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from blitzgen.generate import Delta, GenerationStats, Generator


class FakeTokenizer:
    """One token per character; the 'template' tags each turn with its role."""

    chat_template = "fake"
    eos_token_ids = [0]

    def encode(self, text: str) -> list[int]:
        return [1 + ord(c) % 250 for c in text]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        from blitzgen.tokenizer import _content_text

        return self.encode("".join(f"<{m['role']}>{_content_text(m.get('content'), i)}"
                                   for i, m in enumerate(messages)) + "<assistant>")


class FakeGenerator:
    """Yields "t0 ", "t1 ", ... one token per delta. ``permits`` (a semaphore), when set, must be
    released once per token, so a test controls exactly how far generation goes; ``fail_at`` raises
    at that token; ``started`` records the prompt length of each generation, in order."""

    compiled = False

    def __init__(self, max_seq_len: int = 64, fail_at: int | None = None):
        self.max_model_len = self.max_seq_len = max_seq_len
        self.cache_len = max_seq_len  # KV-cache positions allocated (the model's cache_len)
        self.warm_cache_tokens = 8192
        self.fail_at = fail_at
        self.permits: threading.Semaphore | None = None
        self.started: list[int] = []
        self.produced = 0  # tokens made, over all generations

    check_request = Generator.check_request
    default_max_tokens = Generator.default_max_tokens

    def warmup(self, modes=None, **kw) -> float:
        return 0.0

    def stream(self, prompt_ids, max_new_tokens, sampling=None, stop=()):
        self.started.append(len(prompt_ids))
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        t0 = time.perf_counter()
        for i in range(max_new_tokens):
            if self.permits is not None:
                self.permits.acquire()
            if self.fail_at == i:
                raise RuntimeError("the fake model broke")
            self.produced += 1
            stats.generated_tokens = i + 1
            stats.total_seconds = stats.decode_seconds = time.perf_counter() - t0
            yield Delta(f"t{i} ", [i])
        yield Delta("", [], "length", stats)


def fake_loader(gen: FakeGenerator, name: str = "fake-model"):
    lm = SimpleNamespace(name=name, tokenizer=FakeTokenizer(), args=SimpleNamespace(vocab_size=256))
    return lambda: (lm, gen)
