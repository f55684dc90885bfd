"""Structured output: response_format parsing, the bitmask op, and JSON that always validates."""

import json

import pytest
import torch

pytest.importorskip("xgrammar")

from blitzgen.errors import BlitzgenError, InvalidRequestError  # noqa: E402
from blitzgen.structured import (  # noqa: E402
    GrammarConstraint,
    StructuredOutputError,
    allocate_bitmask,
    apply_token_bitmask,
    json_schema_of,
)

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"type": "string", "enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20},
                           "country": {"type": "string", "enum": ["UK", "FR", "US", "JP"]}},
            "required": ["city", "country"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}, "maxItems": 3},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100},
                   "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "role", "address", "tags", "scores"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def tok():
    from blitzgen.loading import default_model_path
    from blitzgen.loading import gguf as gguf_src
    from blitzgen.tokenizer import Tokenizer

    return Tokenizer.from_gguf(gguf_src.open_reader(default_model_path()))


def _allowed(bitmask, i):
    return bool((int(bitmask.view(-1)[i // 32]) >> (i % 32)) & 1)


def test_apply_token_bitmask_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    for vocab in (32, 100, 1000):
        logits = torch.randn(1, vocab, generator=g)
        words = (vocab + 31) // 32
        bitmask = torch.randint(-2**31, 2**31 - 1, (1, words), dtype=torch.int32, generator=g)
        want = logits.clone()
        for i in range(vocab):
            if not _allowed(bitmask, i):
                want[0, i] = float("-inf")
        assert torch.equal(apply_token_bitmask(logits, bitmask), want)
        assert torch.equal(apply_token_bitmask(logits, torch.full_like(bitmask, -1)), logits)


def test_apply_token_bitmask_compiles_without_graph_breaks():
    fn = torch.compile(apply_token_bitmask, fullgraph=True, dynamic=False)
    logits, bitmask = torch.randn(1, 70), torch.randint(-2**31, 2**31 - 1, (1, 3), dtype=torch.int32)
    assert torch.equal(fn(logits, bitmask), apply_token_bitmask(logits, bitmask))


def test_response_format_parsing():
    assert json_schema_of(None) is None
    assert json_schema_of({"type": "text"}) is None
    assert json_schema_of({"type": "json_object"}) == (None, False)
    assert json_schema_of(FORMAT) == (SCHEMA, True)
    for bad in ("json", {"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"schema": 3}}):
        with pytest.raises(StructuredOutputError):
            json_schema_of(bad)


def test_text_is_no_constraint(tok):
    assert GrammarConstraint.from_response_format({"type": "text"}, tok) is None


def test_rejected_schema_is_a_400_with_the_library_message(tok):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 5, "maximum": 1}}}}}
    with pytest.raises(StructuredOutputError, match="minimum greater than maximum") as e:
        GrammarConstraint.from_response_format(bad, tok)
    assert isinstance(e.value, InvalidRequestError) and isinstance(e.value, BlitzgenError)
    assert e.value.param == "response_format" and "json_schema_converter" not in str(e.value)


def test_a_valid_document_walks_through_and_terminates(tok):
    doc = {"name": "Ada", "age": 36, "role": "admin", "address": {"city": "London", "country": "UK"},
           "tags": ["red", "blue"], "scores": [3, 14]}
    c = GrammarConstraint.from_response_format(FORMAT, tok)
    bitmask = allocate_bitmask(tok.vocab_size)
    for i in tok.encode(json.dumps(doc), add_special_tokens=False):
        c.fill_mask(bitmask)
        assert _allowed(bitmask, i)
        assert c.advance(i)
    c.fill_mask(bitmask)
    assert c.is_complete() and not c.is_terminated()
    eos = tok.eos_token_ids[0]
    assert _allowed(bitmask, eos) and not _allowed(bitmask, tok.encode("x", add_special_tokens=False)[0])
    assert c.advance(eos) and c.is_terminated()


def test_disallowed_tokens_are_refused_and_masked(tok):
    c = GrammarConstraint.from_response_format({"type": "json_object"}, tok)
    hello = tok.encode("hello", add_special_tokens=False)[0]
    logits = torch.zeros(tok.vocab_size)
    masked = c.apply(logits)
    bitmask = allocate_bitmask(tok.vocab_size)
    c.fill_mask(bitmask)  # the CPU path (xgrammar's kernel) equals the torch op the compiled step uses
    assert torch.equal(masked, apply_token_bitmask(logits[None], bitmask)[0])
    assert masked[hello] == float("-inf") and masked[tok.encode("{", add_special_tokens=False)[0]] == 0
    assert not c.advance(hello)
    assert not _allowed(allocate_bitmask(tok.vocab_size).fill_(0), 0)
    special = [i for i in range(64) if tok.is_special(i) and i not in tok.eos_token_ids]
    assert special and all(masked[i] == float("-inf") for i in special)  # never matched as literal text


def _prompts(tok, n):
    """n different chat prompts of one token length, so they decode as one batch at the same positions."""
    names = ["Ada", "Alan", "Grace", "Linus", "Ken", "Dennis", "Barbara", "Edsger", "Donald", "John", "Tim",
             "Anna", "Marie", "Paul", "Sara", "Tom", "Lena", "Omar", "Yuki", "Ravi"]
    cities = ["Paris", "Tokyo", "Lyon", "Boston", "Leeds", "Rome", "Oslo", "Lima", "Kyoto", "Cairo"]
    by_len: dict[int, list[list[int]]] = {}
    for name in names:
        for city in cities:
            msgs = [{"role": "system", "content": "Reply with a JSON user profile."},
                    {"role": "user", "content": f"Profile of {name} from {city}."}]
            ids = tok.encode_chat(msgs)
            by_len.setdefault(len(ids), []).append(ids)
    best = max(by_len.values(), key=len)
    assert len(best) >= n
    return best[:n]


def _generate_batch(model, tok, constraints, prompts, temperature, gen, max_new=160):
    """A plain batched decode loop: prefill, then one token per row at a time, each row masked by its
    own grammar; finished rows keep decoding (unmasked) until all are done."""
    B, T = len(prompts), len(prompts[0])
    logits = model(torch.tensor(prompts), torch.arange(T))[:, -1]  # [B, V]
    bitmask = torch.full((B, (logits.shape[-1] + 31) // 32), -1, dtype=torch.int32)
    out, done = [[] for _ in range(B)], [False] * B
    for step in range(max_new):
        for b, c in enumerate(constraints):
            if not done[b]:
                c.fill_mask(bitmask[b:b + 1])
            else:
                bitmask[b].fill_(-1)
        logits = apply_token_bitmask(logits, bitmask)
        if temperature == 0:
            toks = logits.argmax(-1)
        else:
            toks = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen)[:, 0]
        for b, t in enumerate(toks.tolist()):
            if done[b]:
                continue
            assert constraints[b].advance(t), f"row {b}: the grammar refused token {t} it allowed"
            if t in tok.eos_token_ids:
                done[b] = True
            else:
                out[b].append(t)
        if all(done):
            break
        logits = model(toks.view(B, 1), torch.tensor([T + step]))[:, -1]
    return [tok.decode(o, skip_special_tokens=True) for o in out], done


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_fifty_generated_objects_validate(temperature):
    jsonschema = pytest.importorskip("jsonschema")
    from blitzgen.loading import load

    lm = load(device="cpu", dtype=torch.float32, progress=False)
    model, tok = lm.model, lm.tokenizer
    prompts = _prompts(tok, 50)
    model.setup_caches(50, len(prompts[0]) + 176)
    gen = torch.Generator().manual_seed(1234)
    constraints = [GrammarConstraint.from_response_format(FORMAT, tok, vocab_size=lm.args.vocab_size)
                   for _ in prompts]
    with torch.inference_mode():
        texts, done = _generate_batch(model, tok, constraints, prompts, temperature, gen)
    validator = jsonschema.Draft202012Validator(SCHEMA)
    for k, (text, finished) in enumerate(zip(texts, done)):
        assert finished and constraints[k].is_terminated(), f"object {k} did not finish: {text!r}"
        validator.validate(json.loads(text))
    if temperature == 0:
        assert len(set(texts)) > 10  # fifty prompts, not one answer fifty times
