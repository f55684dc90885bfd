"""The chat page in headless Chromium against the live server: streamed text appears, Stop stops it."""

from __future__ import annotations

import os
import time

import pytest

CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = "/tmp/blitzgen-chat-page.png"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed"),
]


@pytest.fixture
def chat_page(server):
    """The chat page of the live server in headless Chromium (the system's, never a downloaded one)."""
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 720})
            # the server wants a key: put it where the page's API key field keeps it
            page.add_init_script(f"localStorage.setItem('blitzgen.apiKey', '{server.api_key}')")
            page.goto(server.url + "/")
            yield page
        finally:
            browser.close()


def send(page, text: str, max_tokens: int) -> None:
    page.click("#settings-toggle")
    page.fill("#max-tokens", str(max_tokens))
    page.eval_on_selector("#temperature", "el => { el.value = '0'; el.dispatchEvent(new Event('input')); }")
    page.click("#settings-toggle")
    page.fill("#input", text)
    page.press("#input", "Enter")


def test_a_message_streams_in_and_stop_stops_the_next(chat_page, server):
    page = chat_page
    page.wait_for_selector("#status.ok", timeout=60_000)
    assert "SmolLM2" in page.inner_text("#status")

    send(page, "Hi", 4)
    page.wait_for_selector(".msg.assistant:not(.streaming) .stats", timeout=300_000)
    reply = page.inner_text(".msg.assistant .bubble")
    assert reply and reply != "(no text)"
    assert "tokens" in page.inner_text(".msg.assistant .stats")
    assert page.inner_text(".msg.user .bubble") == "Hi"
    page.screenshot(path=SCREENSHOT)

    aborted = server.metrics()['blitzgen_request_finished_total{finish_reason="abort"}']
    send(page, "Count from 1 to 500, separated by commas.", 1000)
    deadline = time.monotonic() + 300  # polled from here: the page's CSP forbids wait_for_function's eval
    while not page.evaluate("() => document.querySelectorAll('.msg.assistant')[1].innerText.trim().length"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert page.is_visible("#stop")
    page.click("#stop")
    page.wait_for_selector(".msg.assistant:nth-of-type(4):not(.streaming)", timeout=30_000)
    assert "stopped" in page.inner_text(".msg.assistant:nth-of-type(4) .stats")
    assert page.is_visible("#send") and not page.is_visible("#stop")
    deadline = time.monotonic() + 60  # the server saw the client go and aborted the generation
    while server.metrics()['blitzgen_request_finished_total{finish_reason="abort"}'] == aborted:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert len(page.query_selector_all(".msg")) == 4  # two turns kept


# ---- on the fake model (no weights): layout, key prompt, long histories -----------------------------------
@pytest.fixture
def fake_page(fake_server):
    """A factory: the chat page of a fresh in-process fake server, in headless Chromium."""
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    from fake_model import FakeGenerator

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])

        def open_page(width: int = 1000, gen=None, **app_kw):
            srv = fake_server(gen or FakeGenerator(max_seq_len=256), app_kw=app_kw)
            page = browser.new_page(viewport={"width": width, "height": 844})
            page.goto(srv.url + "/")
            return page

        try:
            yield open_page
        finally:
            browser.close()


def test_the_page_fits_a_390_px_screen(fake_page):
    page = fake_page(width=390)
    page.wait_for_selector("#status.ok", timeout=30_000)
    widths = page.evaluate("[document.documentElement.scrollWidth, document.body.scrollWidth]")
    assert max(widths) <= 390, f"horizontal overflow: {widths}"
    header = page.eval_on_selector("header", "el => el.getBoundingClientRect().height")
    assert header < 64, f"the header wraps ({header} px high)"
    box = page.eval_on_selector("#settings-toggle", "el => el.getBoundingClientRect().toJSON()")
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390
    page.click("#settings-toggle")
    assert page.is_visible("#max-tokens")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    icon = page.evaluate("fetch(document.querySelector('link[rel=icon]').href).then(r => r.status)")
    assert icon == 200


def test_a_wrong_key_leaves_no_stale_model_name(fake_page):
    page = fake_page(api_key="sk-right")
    page.wait_for_selector("#status.bad", timeout=30_000)  # no key yet
    page.fill("#api-key", "sk-right")
    page.dispatch_event("#api-key", "change")
    page.wait_for_selector("#status.ok", timeout=30_000)
    assert "Chatting with fake-model" in page.inner_text("#messages")
    page.fill("#api-key", "sk-wrong")
    page.dispatch_event("#api-key", "change")
    page.wait_for_selector("#status.bad", timeout=30_000)
    assert "Chatting with" not in page.inner_text("#messages")


def test_a_long_chat_trims_its_oldest_turns_and_keeps_working(fake_page):
    from fake_model import FakeGenerator

    page = fake_page(gen=FakeGenerator(max_seq_len=2048))
    page.wait_for_selector("#status.ok", timeout=30_000)
    # forty earlier turns of 300 characters: far more than the 2048-token context of the fake model
    page.evaluate("""() => { for (let i = 0; i < 40; i++) conversation.push(
        {role: i % 2 ? "assistant" : "user", content: String(i).padEnd(300, ".")}); }""")
    page.click("#settings-toggle")
    page.fill("#max-tokens", "4")
    page.click("#settings-toggle")
    page.fill("#input", "Hi")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant:not(.streaming) .stats", timeout=30_000)
    assert not page.query_selector(".msg.error"), page.inner_text("#messages")
    assert "earlier messages not sent" in page.inner_text(".msg.assistant .stats")
    kept = page.evaluate("fitHistory(conversation, '', 4, 2048).messages")
    assert kept[0]["role"] == "user" and 0 < len(kept) < len(page.evaluate("conversation"))
