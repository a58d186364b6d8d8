"""The chat WebDemo in a real browser: a real server (`webdemo.serve`), Debian's Chromium.

Two browser contexts (two users, separate cookies and sessions) chat at the same time with one
server and one shared model; neither sees the other's history. With SELFLLM_SCREENSHOT=1 the
test also refreshes images/webdemo.png, the picture notebook 03 shows (CI leaves it alone).
The server listens on 127.0.0.1 only, whether started by `webdemo.serve` or `selfllm webdemo`
(which also stops it on SIGTERM), and a page that shows a Markdown image and LaTeX in a message
asks no other host for anything (every request the browser makes is watched).

Playwright drives the system Chromium (`executable_path`); `playwright install` is never run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from urllib.parse import urlparse
import urllib.error
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


def listening(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp writes them) with a socket listening on `port`."""
    found = set()
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        for line in table.read_text().splitlines()[1:] if table.exists() else []:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


@contextlib.contextmanager
def running(tutorial: str, tmp_path: Path, port: int):
    """The demo started by `webdemo.serve` with its defaults on a free port, in smoke mode;
    terminated whatever the test does. Yields (url, port)."""
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = webdemo.serve(tutorial, port=port, stdout=out, stderr=subprocess.STDOUT,
                             env={**os.environ, "SELFLLM_SMOKE": "1", webdemo.PASSWORD_ENV: ""})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, proc, log)
        yield url, port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def need_chromium() -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)")


@pytest.fixture
def server(tmp_path, free_port):
    need_chromium()
    with running("qwen2", tmp_path, free_port()) as (url, _):
        yield url


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory, free_port):
    """The tiny random DeepSeek stand-in: answers in milliseconds, where content does not matter.
    One server for the module's tests (each opens its own browser session)."""
    need_chromium()
    with running("deepseek", tmp_path_factory.mktemp("tiny"), free_port()) as started:
        yield started


@pytest.fixture(scope="module")
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


MARKUP = "![pixel](http://example.invalid/pixel.png) <img src=http://example.invalid/x.png> $\\rule{3000px}{3000px}$"


def test_markup_in_a_message_fetches_nothing_and_draws_nothing(tiny_server, browser):
    """Served on 127.0.0.1 only; a Markdown image, HTML and LaTeX stay text (self-llm demo, issue 17)."""
    from playwright.sync_api import expect

    url, port = tiny_server
    assert listening(port) == {"0100007F"}, listening(port)  # webdemo.serve's default: 127.0.0.1
    elsewhere: list[str] = []

    def watch(route):
        host = urlparse(route.request.url).hostname
        if host in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    page = browser.new_context().new_page()
    page.route("**/*", watch)
    page.goto(url)
    expect(page.get_by_test_id("stChatInputTextArea")).to_be_visible(timeout=ANSWER_TIMEOUT_MS)
    wait_idle(page)
    page.get_by_test_id("stChatInputTextArea").fill(MARKUP)
    page.get_by_test_id("stChatInputTextArea").press("Enter")
    expect(page.get_by_test_id("stChatMessage")).to_have_count(2, timeout=ANSWER_TIMEOUT_MS)
    wait_idle(page)
    chat = page.get_by_test_id("stChatMessage")
    assert elsewhere == []  # no image fetched, no usage statistics sent
    assert chat.locator("img").count() == 0 and chat.locator(".katex").count() == 0
    assert MARKUP in messages(page)[0]  # shown as typed


QUICK = [f"Question {n} of 10: say {n}." for n in range(1, 11)]


def test_ten_questions_sent_without_waiting_are_all_answered_in_order(tiny_server, browser):
    """Sent back to back, questions were lost without a word (0 to 7 of 10 answered here).
    Each is typed as soon as the input takes text again (`fill` waits for an enabled input);
    none waits for an answer."""
    from playwright.sync_api import expect

    url, _ = tiny_server
    page = browser.new_context().new_page()
    page.goto(url)
    box = page.get_by_test_id("stChatInputTextArea")
    expect(box).to_be_visible(timeout=ANSWER_TIMEOUT_MS)
    wait_idle(page)
    max_new_tokens = page.get_by_test_id("stSidebar").get_by_role("slider").first
    max_new_tokens.press("Home")  # answers of one token: quick, and never past the context
    expect(max_new_tokens).to_have_value("1")
    wait_idle(page)
    for question in QUICK:
        box.fill(question, timeout=ANSWER_TIMEOUT_MS)
        box.press("Enter")
    with contextlib.suppress(AssertionError):  # a lost question never shows: the count stays short
        expect(page.get_by_test_id("stChatMessage")).to_have_count(2 * len(QUICK),
                                                                  timeout=ANSWER_TIMEOUT_MS)
    expect(box).to_be_enabled()  # nothing left to answer
    wait_idle(page)
    shown = messages(page)
    asked = [next((q for q in QUICK if q in text), text) for text in shown[::2]]
    assert asked == QUICK and len(shown) == 2 * len(QUICK), asked  # each answered, in order
    alerts = page.get_by_test_id("stAlert").all_inner_texts()
    assert len(alerts) == 1 and webdemo.NO_ADAPTER in alerts[0], alerts  # the banner, no notice


def test_metrics_are_closed(tiny_server):
    """`/_stcore/metrics` answered anyone, password or not (the password page is in the app)."""
    url, _ = tiny_server
    with pytest.raises(urllib.error.HTTPError) as closed:
        urllib.request.urlopen(f"{url}/_stcore/metrics", timeout=10)
    assert closed.value.code == 404
    with urllib.request.urlopen(f"{url}/_stcore/health", timeout=10) as response:
        assert response.read().strip() == b"ok"  # the server itself answers


def test_the_command_binds_localhost_and_sigterm_stops_its_server(tmp_path, free_port):
    """`selfllm webdemo` stops its Streamlit child on SIGTERM (it was left serving, under PID 1)."""
    port, log = free_port(), tmp_path / "cli.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "selfllm_utils.cli", "webdemo", "--tutorial",
                                 "deepseek", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "SELFLLM_SMOKE": "1", webdemo.PASSWORD_ENV: ""})
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", proc, log)
        assert listening(port) == {"0100007F"}, listening(port)  # 127.0.0.1, nothing else
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(children) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0
        assert not Path(f"/proc/{children[0]}").exists()  # the Streamlit child is gone too
        assert listening(port) == set()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
