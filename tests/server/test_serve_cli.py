"""``blitzgen serve`` refuses a bad address or model in one line, exit 2, before loading anything."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow  # each case starts a Python process that imports torch


def serve(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "blitzgen.cli", "serve", "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=120, env=env)


def assert_refused(result: subprocess.CompletedProcess, words: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("blitzgen: error:") and words in lines[0], lines
    assert "Loaded" not in result.stdout + result.stderr


def test_a_busy_port_is_refused_before_loading():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        t0 = time.monotonic()
        result = serve("--port", str(busy.getsockname()[1]))
    assert_refused(result, "cannot listen on 127.0.0.1")
    assert time.monotonic() - t0 < 60


@pytest.mark.parametrize("host", ["256.1.1.1", "no such host.invalid"])
def test_a_bad_host_is_refused(host):
    assert_refused(serve("--host", host, "--port", "0"), f"cannot listen on {host}")


def test_a_missing_model_is_refused_before_binding():
    assert_refused(serve("--model", "/nonexistent/model.gguf", "--port", "0"), "model not found")


def test_bad_server_options_are_refused():
    assert_refused(serve("--max-request-tokens", "0"), "--max-request-tokens")
    assert_refused(serve("--drain-timeout", "-1"), "--drain-timeout")
    assert_refused(serve("--prompt-cache-bytes", "lots"), "--prompt-cache-bytes")
    assert_refused(serve("--prompt-cache-entries", "-1"), "--prompt-cache-entries")
