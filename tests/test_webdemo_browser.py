"""The chat WebDemo in a real browser: a real server (`webdemo.serve`), Debian's Chromium.

Two browser contexts (two users, separate cookies and sessions) chat at the same time with one
server and one shared model; neither sees the other's history. With SELFLLM_SCREENSHOT=1 the
test also refreshes images/webdemo.png, the picture notebook 03 shows (CI leaves it alone).

Playwright drives the system Chromium (`executable_path`); `playwright install` is never run.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from selfllm_utils import registry, webdemo

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
START_TIMEOUT = 90  # seconds for the server to answer its health check
ANSWER_TIMEOUT_MS = 120_000  # first question also loads the model, on 2 busy cores
# (question, a word of SmolLM2's greedy answer): short answers keep the test fast
CHATS = [("What is the capital of France?", "Paris"), ("What is the capital of Japan?", "Tokyo")]
SCREENSHOT = registry.repo_root() / "images" / "webdemo.png"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(url: str, server: subprocess.Popen, log: Path) -> None:
    """Poll Streamlit's health endpoint; fail with the server's log if it dies or never answers."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the WebDemo server exited ({server.returncode}):\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.read().strip() == b"ok":
                    return
        except OSError:
            pass
        time.sleep(0.25)
    pytest.fail(f"the WebDemo server did not answer in {START_TIMEOUT} s:\n{log.read_text()}")


@pytest.fixture
def server(tmp_path):
    """The demo on a free port of 127.0.0.1, in smoke mode; terminated whatever the test does."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)")
    port, log = free_port(), tmp_path / "server.log"
    with log.open("w") as out:
        proc = webdemo.serve("qwen2", port=port, stdout=out, stderr=subprocess.STDOUT,
                             env={**os.environ, "SELFLLM_SMOKE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                              headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def wait_idle(page) -> None:
    """Until the script run of this session has finished (Streamlit marks it on the app root)."""
    page.wait_for_function(
        "document.querySelector('[data-testid=stApp]')?.dataset.testScriptState === 'notRunning'",
        timeout=ANSWER_TIMEOUT_MS)


def messages(page) -> list[str]:
    return page.get_by_test_id("stChatMessage").all_inner_texts()


def test_two_sessions_chat_at_once_and_keep_their_own_history(server, browser):
    from playwright.sync_api import expect

    pages = [browser.new_context(viewport={"width": 1200, "height": 720}).new_page()
             for _ in CHATS]
    for page in pages:
        page.goto(server)
        expect(page.get_by_test_id("stChatInputTextArea")).to_be_visible(timeout=ANSWER_TIMEOUT_MS)
        wait_idle(page)
        expect(page.get_by_text(webdemo.NO_ADAPTER)).to_be_visible()  # the banner
    for page, (question, _) in zip(pages, CHATS):  # both sessions generate at the same time
        page.get_by_test_id("stChatInputTextArea").fill(question)
        page.get_by_test_id("stChatInputTextArea").press("Enter")
    for page in pages:
        expect(page.get_by_test_id("stChatMessage")).to_have_count(2, timeout=ANSWER_TIMEOUT_MS)
        wait_idle(page)

    for page, (question, word), (other, _) in zip(pages, CHATS, CHATS[::-1]):
        shown = messages(page)
        assert question in shown[0] and word in shown[1], shown
        assert not any(other in text for text in shown), shown  # no leak between sessions
    if os.environ.get("SELFLLM_SCREENSHOT") == "1":
        pages[0].screenshot(path=str(SCREENSHOT))
