"""Per-token overhead of grammar-constrained decoding on the CPU: xgrammar vs llguidance vs outlines-core.

For each library, on the default model's tokenizer (SmolLM2, 49152 tokens), it times:
  - tokenizer set-up (once per model),
  - compiling a JSON schema with nested objects, enums and arrays (once per request),
  - per token: computing the next-token bitmask and advancing the matcher by one token,
walking the tokens of a valid document (what greedy decoding of a good answer looks like),
and the cost of applying a bitmask to one row of logits with torch (the same for all three).

    PYTHONPATH=src python3 benchmarks/structured_overhead.py [--repeat 5]

Libraries that are not installed are skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "role": {"type": "string", "enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"},
                           "geo": {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                                   "required": ["lat", "lon"], "additionalProperties": False}},
            "required": ["city", "zip", "geo"], "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}},
        "scores": {"type": "array", "items": {"type": "integer"}},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address", "tags", "scores", "active"],
    "additionalProperties": False,
}
DOC = {"name": "Ada Lovelace", "age": 36, "role": "admin",
       "address": {"city": "London", "zip": "W1", "geo": {"lat": 51.5, "lon": -0.12}},
       "tags": ["red", "blue"], "scores": [3, 14, 159], "active": True}


def load_tokenizer():
    from blitzgen.loading import default_model_path
    from blitzgen.loading import gguf as gguf_src
    from blitzgen.tokenizer import Tokenizer

    return Tokenizer.from_gguf(gguf_src.open_reader(default_model_path()))


def _walk(tokens, fill, advance):
    """Time fill() and advance() at each step of a token walk; return per-step seconds."""
    fills, advances = [], []
    for t in tokens:
        t0 = time.perf_counter()
        fill()
        t1 = time.perf_counter()
        advance(t)
        t2 = time.perf_counter()
        fills.append(t1 - t0)
        advances.append(t2 - t1)
    return fills, advances


def bench_llguidance(tok, tokens, bitmask):
    import llguidance
    import llguidance.torch as llt

    t0 = time.perf_counter()
    lltok = llguidance.LLTokenizer(tok._tok.to_str(), n_vocab=tok.vocab_size, eos_token=tok.eos_token_ids[0])
    setup = time.perf_counter() - t0

    def compile_():
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
        m = llguidance.LLMatcher(lltok, grammar)
        assert not m.is_error(), m.get_error()
        return m

    def run(m):
        def advance(t):
            assert m.consume_token(t), m.get_error()
        return _walk(tokens, lambda: llt.fill_next_token_bitmask(m, bitmask), advance)

    return setup, compile_, run


def bench_xgrammar(tok, tokens, bitmask):
    import xgrammar as xgr

    t0 = time.perf_counter()
    vocab = [tok._tok.id_to_token(i) for i in range(tok.vocab_size)]
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.BYTE_LEVEL, vocab_size=tok.vocab_size,
                             stop_token_ids=tok.eos_token_ids)
    setup = time.perf_counter() - t0
    compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)

    def compile_():
        return xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(SCHEMA)))

    def run(m):
        def advance(t):
            assert m.accept_token(t)
        return _walk(tokens, lambda: m.fill_next_token_bitmask(bitmask), advance)

    return setup, compile_, run


def bench_blitzgen(tok, tokens, bitmask):
    """What blitzgen ships: xgrammar through GrammarConstraint (fixed whitespace, compile cache on:
    the median compile is a cache hit for a repeated schema)."""
    from blitzgen.structured import GrammarConstraint, _compiler_for

    t0 = time.perf_counter()
    _compiler_for(tok, tok.vocab_size)
    setup = time.perf_counter() - t0

    def compile_():
        return GrammarConstraint.from_json_schema(SCHEMA, tok, strict=True)

    def run(c):
        def advance(t):
            assert c.advance(t)
        return _walk(tokens, lambda: c.fill_mask(bitmask), advance)

    return setup, compile_, run


def bench_outlines(tok, tokens, bitmask):
    import outlines_core

    t0 = time.perf_counter()
    eos = tok.eos_token_ids[0]
    vmap: dict[bytes, list[int]] = {}
    for i in range(tok.vocab_size):
        if i != eos and not tok.is_special(i):  # byte-level BPE pieces spelled back as raw bytes
            vmap.setdefault(bytes(_byte_level_bytes(tok._tok.id_to_token(i))), []).append(i)
    vocab = outlines_core.Vocabulary(eos, vmap)
    setup = time.perf_counter() - t0

    def compile_():
        regex = outlines_core.json_schema.build_regex_from_schema(json.dumps(SCHEMA))
        return outlines_core.Guide(outlines_core.Index(regex, vocab))

    def run(g):
        ptr, n = bitmask.data_ptr(), bitmask.numel()
        fills, advances = _walk(tokens[:-1], lambda: g.write_mask_into(ptr, n, 4), g.advance)
        assert g.is_finished()  # EOS is allowed here; outlines-core has no transition to advance by it
        return fills, advances

    return setup, compile_, run


def _byte_level_bytes(piece: str, _inv={}) -> list[int]:
    if not _inv:
        from blitzgen.tokenizer import _bytes_to_unicode

        _inv.update({c: b for b, c in _bytes_to_unicode().items()})
    return [_inv[c] for c in piece]


def _time(fn, n=100, rounds=5) -> float:
    """Best-of-rounds mean microseconds per call (the machine may be shared)."""
    for _ in range(5):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--libs", default="llguidance,xgrammar,outlines,blitzgen")
    ap.add_argument("--compiled", action="store_true", help="also time the torch ops under torch.compile")
    a = ap.parse_args()
    torch.set_num_threads(1)
    tok = load_tokenizer()
    tokens = tok.encode(json.dumps(DOC), add_special_tokens=False) + [tok.eos_token_ids[0]]
    n_words = (tok.vocab_size + 31) // 32
    print(f"vocab {tok.vocab_size}, document {len(tokens)} tokens, bitmask int32[1, {n_words}]")

    logits = torch.randn(1, tok.vocab_size)
    bitmask = torch.full((1, n_words), -1, dtype=torch.int32)
    # what blitzgen ships: the bitmask op and the logprob row, eager and compiled (the decode step's case)
    from blitzgen.logprobs import logprob_rows
    from blitzgen.structured import apply_token_bitmask

    token = torch.tensor([5])
    for label, fn in [("apply_token_bitmask", lambda: apply_token_bitmask(logits, bitmask)),
                      ("logprob_rows k=0", lambda: logprob_rows(logits, token, 0)),
                      ("logprob_rows k=20", lambda: logprob_rows(logits, token, 20))]:
        print(f"{label:22s} eager {_time(fn):5.0f} us/token", end="")
        if a.compiled:
            comp = torch.compile(lambda f=fn: f(), dynamic=False)
            print(f" | compiled {_time(comp):5.0f} us/token", end="")
        print()

    benches = {"llguidance": bench_llguidance, "xgrammar": bench_xgrammar, "outlines": bench_outlines,
               "blitzgen": bench_blitzgen}
    for name in a.libs.split(","):
        try:
            setup, compile_, run = benches[name](tok, tokens, bitmask)
        except ImportError as e:
            print(f"{name}: not installed ({e})")
            continue
        compiles, firsts, fills, advances = [], [], [], []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            m = compile_()
            compiles.append(time.perf_counter() - t0)
            f, adv = run(m)
            firsts.append(f[0])
            fills += f[1:]
            advances += adv
        fills.sort()
        p = lambda q: fills[int(q * (len(fills) - 1))] * 1e6  # noqa: E731
        print(f"{name:10s} setup {setup * 1e3:5.0f} ms | compile first {compiles[0] * 1e3:6.1f} ms, "
              f"median {statistics.median(compiles) * 1e3:6.1f} ms | first mask {statistics.median(firsts) * 1e6:5.0f} us"
              f" | next masks median {p(0.5):4.0f} us, mean {statistics.mean(fills) * 1e6:4.0f} us, "
              f"p90 {p(0.9):5.0f} us, max {p(1.0):5.0f} us | advance mean {statistics.mean(advances) * 1e6:4.0f} us")


if __name__ == "__main__":
    main()
