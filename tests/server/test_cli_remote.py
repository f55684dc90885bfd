"""``blitzgen generate --url`` and ``blitzgen chat`` (remote, and the chat loop on a fake backend)."""

from __future__ import annotations

import io
import sys
from types import SimpleNamespace

import pytest

from blitzgen.cli import main
from blitzgen.commands import chat
from blitzgen.errors import ContextLengthError


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `blitzgen ARGV...` in this process (nothing here loads a model): (exit code, stdout, stderr)."""

    def run(*argv: str, stdin: str = "") -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        rc = main(list(argv))
        out = capsys.readouterr()
        return rc, out.out, out.err

    return run


def one_line_error(result: tuple[int, str, str], match: str) -> None:
    rc, _, err = result
    assert rc == 2, err
    assert err.strip().startswith("blitzgen: error:") and len(err.strip().splitlines()) == 1, err
    assert match in err


@pytest.mark.slow
def test_generate_url_streams_samples_and_reports_speed(server, cli):
    rc, out, err = cli("generate", "--url", server.url, "--api-key", server.api_key, "--prompt", "Hi",
                       "--num-samples", "2", "--max-new-tokens", "3", "--temperature", "0")
    assert rc == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0] == lines[1] and lines[0]  # greedy: the same answer twice
    assert "Time for inference 1:" in err and "Time for inference 2:" in err
    assert "3 tokens" in err and "Average tokens/sec:" in err
    assert "Loaded" not in err  # no model was loaded here


@pytest.mark.slow
def test_generate_url_raw_and_errors(server, cli):
    rc, out, err = cli("generate", "--url", server.url + "/v1/", "--api-key", server.api_key, "--raw", "--quiet",
                       "--prompt", "1, 2, 3,", "--max-new-tokens", "2", "--temperature", "0")
    assert rc == 0 and out == "" and "2 tokens" in err, err
    one_line_error(cli("generate", "--url", server.url, "--prompt", "Hi"), "401")
    one_line_error(cli("generate", "--url", server.url, "--api-key", server.api_key, "--prompt", "Hi",
                       "--max-new-tokens", "99999"), "maximum context length")


def test_generate_url_unreachable_is_one_line(cli):
    from conftest import free_port

    one_line_error(cli("generate", "--url", f"http://127.0.0.1:{free_port()}", "--prompt", "Hi"),
                   "cannot reach the server")


@pytest.mark.slow
def test_chat_url_with_piped_stdin(server, cli):
    rc, out, err = cli("chat", "--url", server.url, "--api-key", server.api_key, "--max-new-tokens", "3",
                       "--temperature", "0", stdin="Hi\n/reset\nHi\n/exit\nnever sent\n")
    assert rc == 0, err
    replies = out.splitlines()
    assert len(replies) == 2 and replies[0] == replies[1] and replies[0]
    assert "(conversation cleared)" in err and err.count("tokens/sec") == 2


class FakeBackend:
    """Echoes how many messages it was sent; 'overflow' raises a context-length error."""

    name = "fake"

    def __init__(self, args):
        self.seen: list[list[dict]] = []
        FakeBackend.last = self

    def reply(self, messages, sampling, max_tokens, stop):
        self.seen.append([dict(m) for m in messages])
        if messages[-1]["content"] == "overflow":
            raise ContextLengthError("This model's maximum context length is 8 tokens.")
        yield from (f"reply to {len(messages)}", " messages")

    def stats(self):
        return 2, 10.0


def run_chat(monkeypatch, capsys, stdin: str, **kw) -> tuple[int, str, str]:
    monkeypatch.setattr(chat, "LocalChat", FakeBackend)
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    args = SimpleNamespace(url=None, system=kw.get("system"), max_new_tokens=8, stop=[], temperature=0.0,
                           top_k=0, top_p=1.0, min_p=0.0, seed=None)
    rc = chat.run(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_chat_loop_keeps_history_resets_and_exits(monkeypatch, capsys):
    rc, out, err = run_chat(monkeypatch, capsys, "one\n\ntwo\n/reset\nthree\n/exit\nfour\n", system="Be brief.")
    assert rc == 0
    assert out.splitlines() == ["reply to 2 messages", "reply to 4 messages", "reply to 2 messages"]
    seen = FakeBackend.last.seen
    assert [m["role"] for m in seen[1]] == ["system", "user", "assistant", "user"]
    assert seen[1][2]["content"] == "reply to 2 messages"
    assert seen[2][0] == {"role": "system", "content": "Be brief."}  # /reset keeps the system message
    assert "(conversation cleared)" in err and "[2 tokens, 10.00 tokens/sec]" in err


def test_chat_loop_survives_errors_and_ends_at_eof(monkeypatch, capsys):
    rc, out, err = run_chat(monkeypatch, capsys, "overflow\nhello\n")
    assert rc == 0
    assert "error: This model's maximum context length is 8 tokens. (try /reset)" in err
    assert out.splitlines() == ["reply to 1 messages"]  # the failed turn left no trace in the history
