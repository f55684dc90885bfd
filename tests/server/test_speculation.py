"""Speculative decoding in the server: the "speculate" body field (through the openai client's
extra_body), the server default, 400 for a source not loaded, greedy output identical to plain
decoding, and the speculation metrics. A tiny random model in-process; one slow test on SmolLM2."""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import openai
import pytest
import torch
from starlette.testclient import TestClient

from blitzgen.commands.speculate import server_speculation
from blitzgen.config import ModelArgs
from blitzgen.generate import Generator
from blitzgen.model import Transformer
from blitzgen.server.app import create_app
from blitzgen.server.engine import Engine
from blitzgen.server.protocol import APIError, parse_chat_request

KEY = "sk-spec"
REPEAT = "abcabcabcabcabc abc abc xyz abcabc"


class CharTokenizer:
    """One token per character (ids 1..255), a one-line chat template, a trivial detokenizer."""

    chat_template = "fake"
    eos_token_ids = [0]

    def encode(self, text: str) -> list[int]:
        return [1 + ord(c) % 255 for c in text]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.encode("".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>")

    def detokenizer(self, skip_special_tokens: bool = True):
        return SimpleNamespace(add=lambda t: chr(0x100 + t), flush=lambda: "")


def tiny_lm(seed: int = 0):
    args = ModelArgs.from_name("tiny")
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model = model.eval()
    model.setup_caches(1, 256)
    return SimpleNamespace(name="tiny", tokenizer=CharTokenizer(), args=args, model=model)


def spec_args(sources, k=4):
    return argparse.Namespace(speculate=sources, speculate_k=k, draft_model=None, group_size=None, device="cpu",
                              dtype="float32")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_client(sources, lm=None) -> TestClient:
    lm = lm or tiny_lm()
    gen = Generator(lm.model, lm.tokenizer, max_seq_len=256)
    engine = Engine(lambda: (lm, gen), max_queue=4, warmup=False,
                    speculation=server_speculation(spec_args(sources), log=lambda m: None) if sources else None)
    client = TestClient(create_app(engine, api_key=KEY))
    client.__enter__()
    deadline = time.monotonic() + 60
    while client.get("/health").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return client


def openai_client(client: TestClient) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=client, max_retries=0)


def metrics(client: TestClient) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


@pytest.fixture(scope="module")
def spec_client():
    """ngram (the default) and self-int4 loaded."""
    c = make_client(["ngram", "self-int4"])
    yield c
    c.__exit__(None, None, None)


def chat(oc, speculate=None, **kw):
    extra = {"speculate": speculate} if speculate is not None else None
    kw = {"temperature": 0, "max_tokens": 24, **kw}
    r = oc.chat.completions.create(model="tiny", messages=[{"role": "user", "content": REPEAT}], extra_body=extra,
                                   **kw)
    return r.choices[0].message.content, r


# ---- protocol ---------------------------------------------------------------------------------------
def test_protocol_field():
    base = {"messages": [{"role": "user", "content": "hi"}]}
    assert parse_chat_request(base).speculate is None
    for v in ("ngram", "self-int4", "draft-model", "off"):
        assert parse_chat_request({**base, "speculate": v}).speculate == v
    for bad in ("eagle", True, 3, ["ngram"]):
        with pytest.raises(APIError) as e:
            parse_chat_request({**base, "speculate": bad})
        assert e.value.status == 400 and e.value.param == "speculate"


# ---- the served model -------------------------------------------------------------------------------
def test_greedy_identical_to_plain_and_metrics(spec_client):
    oc = openai_client(spec_client)
    plain, _ = chat(oc, "off")
    before = metrics(spec_client)
    assert before.get('blitzgen_spec_decode_requests_total{source="ngram"}', 0) == 0
    default, r = chat(oc)  # the server default: ngram
    ngram, _ = chat(oc, "ngram")
    int4, _ = chat(oc, "self-int4")
    assert plain and default == plain and ngram == plain and int4 == plain
    assert r.usage.completion_tokens == 24
    m = metrics(spec_client)
    assert m['blitzgen_spec_decode_requests_total{source="ngram"}'] == 2
    assert m['blitzgen_spec_decode_requests_total{source="self-int4"}'] == 1
    for src in ("ngram", "self-int4"):
        verify = m[f'blitzgen_spec_decode_verify_steps_total{{source="{src}"}}']
        assert verify > 0
        assert m[f'blitzgen_spec_decode_accepted_length_count{{source="{src}"}}'] == verify
        drafted = m[f'blitzgen_spec_decode_draft_tokens_total{{source="{src}"}}']
        accepted = m[f'blitzgen_spec_decode_accepted_tokens_total{{source="{src}"}}']
        assert m[f'blitzgen_spec_decode_acceptance_rate{{source="{src}"}}'] == pytest.approx(accepted / drafted)
        assert m[f'blitzgen_spec_decode_mean_tokens_per_verify{{source="{src}"}}'] == pytest.approx(
            (accepted + verify) / verify)
        assert m[f'blitzgen_spec_decode_verify_cost{{source="{src}"}}'] >= 1.0
    # the int4 copy of a float model agrees with it on most tokens
    assert m['blitzgen_spec_decode_acceptance_rate{source="self-int4"}'] > 0.3


def test_streamed_stop_string_and_n(spec_client):
    oc = openai_client(spec_client)
    plain, _ = chat(oc, "off", max_tokens=30)
    stop = plain[10:13]
    want, _ = chat(oc, "off", max_tokens=30, stop=[stop])
    assert want == plain[:plain.index(stop)]
    chunks = list(oc.chat.completions.create(model="tiny", messages=[{"role": "user", "content": REPEAT}],
                                             temperature=0, max_tokens=30, stop=[stop], stream=True,
                                             extra_body={"speculate": "ngram"}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].choices[0].finish_reason == "stop"
    _, r = chat(oc, "ngram", n=2)
    assert [c.message.content for c in r.choices] == [plain[:24]] * 2


def test_completions_endpoint(spec_client):
    oc = openai_client(spec_client)
    texts = [oc.completions.create(model="tiny", prompt=REPEAT, temperature=0, max_tokens=16,
                                   extra_body={"speculate": s}).choices[0].text for s in ("off", "ngram")]
    assert texts[0] and texts[0] == texts[1]


def test_source_not_loaded_is_400(spec_client):
    oc = openai_client(spec_client)
    with pytest.raises(openai.BadRequestError) as e:
        chat(oc, "draft-model")
    assert e.value.status_code == 400 and e.value.body["param"] == "speculate"
    assert "did not load" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        chat(oc, "eagle")


def test_server_without_speculation():
    c = make_client(None)
    try:
        oc = openai_client(c)
        with pytest.raises(openai.BadRequestError) as e:
            chat(oc, "ngram")
        assert "loaded: none" in e.value.body["message"]
        assert chat(oc, "off")[0] == chat(oc)[0]
        assert not any(k.startswith("blitzgen_spec_decode_requests_total") for k in metrics(c))
    finally:
        c.__exit__(None, None, None)


def test_off_first_loads_but_defaults_to_plain():
    c = make_client(["off", "ngram"])
    try:
        oc = openai_client(c)
        assert chat(oc)[0] == chat(oc, "ngram")[0]
        m = metrics(c)
        assert m['blitzgen_spec_decode_requests_total{source="ngram"}'] == 1  # only the request that asked
    finally:
        c.__exit__(None, None, None)


@pytest.mark.slow
def test_smol_greedy_identity(smol):
    """The default model: ngram and self-int4 give plain decoding's exact text through the API."""
    lm = SimpleNamespace(name="smol", tokenizer=smol.tokenizer, args=smol.args, model=smol.model)
    c = make_client(["ngram", "self-int4"], lm=lm)
    try:
        oc = openai_client(c)
        prompt = "Repeat this list twice: apple, banana, cherry, dates, elderberry, fig."
        texts = {}
        for s in ("off", "ngram", "self-int4"):
            r = oc.chat.completions.create(model="smol", messages=[{"role": "user", "content": prompt}],
                                           temperature=0, max_tokens=40, extra_body={"speculate": s})
            texts[s] = r.choices[0].message.content
        assert texts["off"] and texts["ngram"] == texts["off"] and texts["self-int4"] == texts["off"]
        m = metrics(c)
        assert m['blitzgen_spec_decode_accepted_tokens_total{source="ngram"}'] > 0
    finally:
        c.__exit__(None, None, None)


def test_sampled_requests_are_seeded(spec_client):
    oc = openai_client(spec_client)
    for s in ("ngram", "self-int4"):
        a, r = chat(oc, s, temperature=0.9, top_p=0.9, seed=7, max_tokens=16)
        b, _ = chat(oc, s, temperature=0.9, top_p=0.9, seed=7, max_tokens=16)
        assert a == b and r.usage.completion_tokens <= 16
