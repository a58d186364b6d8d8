"""Chat in the browser with a tutorial's model, or with your own LoRA adapter (a Streamlit app).

    selfllm webdemo --adapter output/qwen2-assistant/adapter      # through `run()`
    streamlit run selfllm_utils/webdemo.py --server.address 127.0.0.1 --runner.fastReruns false \
        --browser.gatherUsageStats false -- --tutorial qwen2 --adapter output/qwen2-assistant/adapter

The seed's `chatBot.py`, grown for a course: the model is loaded once per server and shared by
every browser session (`st.cache_resource`), each session keeps its own history
(`st.session_state`), answers stream as they are generated, and the page says which base model
and which adapter answer, so "after fine-tuning the demo answers as before" (self-llm#230) is
seen at a glance. Prompts go through `inference.stream_chat`, hence through `formatting.render`,
the chat template used in training. The server listens on 127.0.0.1 only and sends Streamlit no
usage statistics: reach it through an SSH tunnel (`ssh -L 8501:127.0.0.1:8501 user@host`).
Serving other machines is `public=True` (`selfllm webdemo --public`): a printed warning, and a
password page when SELFLLM_WEBDEMO_PASSWORD is set. Visitors see no absolute paths and no
tracebacks (the terminal does), and every message is shown as plain text: a Markdown image, HTML
or LaTeX in a question or an answer is neither fetched nor drawn. One visitor cannot tie up the
server: a message longer than `--max-message-chars` is refused before any tokenizer sees it, wrong
passwords lock the password page for a minute (per address, not per tab), and Streamlit's
`/_stcore/metrics` answers 404 (the `st.App` below, which `streamlit run` serves this file through).
The browser disables the chat input from the moment a question is sent until it is answered
(`submit_mode="disable"`): Streamlit keeps only the newest of the messages that reach the server
before the script takes one, so questions sent in quick succession vanished unseen.

Streamlit runs this file as a script (`__main__`), so it imports the package absolutely and
calls `page()` of the imported module: tests patch that module's `generate` to watch the model.
"""

from __future__ import annotations

import argparse
import collections
import hmac
import json
import math
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import streamlit as st
from streamlit.runtime.scriptrunner import RerunException
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse

from selfllm_utils import formatting, inference, models, registry
from selfllm_utils.registry import Tutorial

ARGS_ENV = "SELFLLM_WEBDEMO_ARGS"  # app arguments for runs without a command line (AppTest)
PASSWORD_ENV = "SELFLLM_WEBDEMO_PASSWORD"  # a password page when set (never on a command line)
LOCAL = "127.0.0.1"
FIRST_TOKEN_TIMEOUT_CPU = 600.0  # s: a long prompt's prefill on a CPU (the 7B) takes minutes
MAX_NEW_TOKENS_CAP = 2048  # upper end of the sidebar slider
MIN_CONTEXT = 64  # tokens: below this a chat template alone leaves no room for a question
MAX_MESSAGE_CHARS = 8000  # default cap of a question or system prompt (a 2 MB one cost a minute of CPU)
PASSWORD_TRIES, PASSWORD_TOTAL, PASSWORD_WINDOW = 5, 30, 60.0  # wrong passwords (one address,
# all) a server takes in that many seconds
NO_ADAPTER = "no adapter: base model"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The app's own arguments: those after `--` in `streamlit run`, else `SELFLLM_WEBDEMO_ARGS`.

    The environment variable lets `AppTest`, which has no command line, start the app on
    another tutorial or adapter; when it is set the process's argv is not looked at.
    """
    parser = argparse.ArgumentParser(prog="webdemo", allow_abbrev=False,
                                     description="Streamlit chat with a tutorial's model")
    parser.add_argument("--tutorial", default="qwen2", choices=list(registry.TUTORIALS))
    parser.add_argument("--adapter", default=None,
                        help="LoRA adapter folder (inference.save_adapter)")
    parser.add_argument("--max-context", type=int, default=None,
                        help="token budget of prompt + answer (default: the model's maximum)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds without a new token before a generation is given up")
    parser.add_argument("--first-token-timeout", type=float, default=None,
                        help="seconds to wait for the first token (reading the prompt); default: "
                        f"--timeout on a GPU, {FIRST_TOKEN_TIMEOUT_CPU:g} on a CPU")
    parser.add_argument("--max-message-chars", type=int, default=MAX_MESSAGE_CHARS,
                        help="longest question or system prompt a visitor may send")
    if argv is None:
        env = os.environ.get(ARGS_ENV)
        argv = shlex.split(env) if env is not None else sys.argv[1:]
    return check_args(parser.parse_args(list(argv)))


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """The app's numbers, refused at the start in one line: a negative `--max-context` or
    `--timeout` was accepted before, and then every answer failed."""
    floors = {"max_context": MIN_CONTEXT, "max_message_chars": 1}
    for name in ("max_context", "timeout", "first_token_timeout", "max_message_chars"):
        value, floor = getattr(args, name), floors.get(name, 0)
        if value is None:
            continue
        if not math.isfinite(value) or value <= 0 or value < floor:
            least = f"at least {floor}" if floor > 1 else "a number above 0"
            raise ValueError(f"--{name.replace('_', '-')} {value:g}: must be {least}"
                             + (" tokens (prompt + answer)" if name == "max_context" else ""))
    return args


check_adapter = inference.check_adapter  # the folder, or one clear error before a model loads


def find_adapter(adapter: str | Path, say=print) -> Path:
    """An adapter path as typed: relative to the current folder, else to notebooks/ (JupyterLab's
    terminal opens there) or the repository (where the notebooks write output/); says which."""
    path = Path(adapter).expanduser()
    if path.is_absolute() or path.exists():
        return check_adapter(path)
    root = registry.repo_root()
    tried = [Path.cwd() / path]
    for base in (root / "notebooks", root):
        candidate = base / path
        if candidate.exists():
            say(f"adapter: {path} is not in {Path.cwd()}; using {candidate.resolve()}")
            return check_adapter(candidate)
        tried.append(candidate)
    raise FileNotFoundError(f"no adapter folder {path}: looked in " + ", ".join(map(str, tried)))


def check_address(address: str, public: bool) -> None:
    """Anything beyond this machine (0.0.0.0, a LAN address) only with `public`, asked for."""
    if address not in (LOCAL, "localhost", "::1") and not public:
        raise ValueError(f"--address {address} lets other machines reach the demo: pass --public "
                         "to mean it (and set a password), or use an SSH tunnel to 127.0.0.1")


def check_port(port: int, address: str = LOCAL) -> None:
    """A port the server can bind, checked before it starts (Streamlit would exit later)."""
    if not 0 < port < 65536:
        raise ValueError(f"--port {port}: a port is a number from 1 to 65535")
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as sock:
        try:
            sock.bind((address, port))
        except OSError as err:
            raise ValueError(f"--port {port} on {address} is not free ({err.strerror}): "
                             "pick another, e.g. --port 8502") from None


def command(tutorial: str = "qwen2", adapter: str | Path | None = None, port: int = 8501,
            address: str = LOCAL, public: bool = False, app_args: Sequence[str] = ()) -> list[str]:
    """The `streamlit run` command line of the demo.

    Headless (no browser is opened on a server), no usage statistics sent, no file watcher
    (nothing to reload on a course machine), no "Deploy" button, no error details for visitors,
    one script thread per session (Streamlit's default, `runner.fastReruns`, starts a second one
    beside a running one, and a burst of 10 questions often lost one), and bound to `address`:
    127.0.0.1 keeps the demo private to the machine; another address (0.0.0.0, where a platform
    forwards a port, AutoDL's custom service say) needs `public`.
    `app_args` go to the app (`--max-context`, `--timeout`, `--first-token-timeout`,
    `--max-message-chars`).
    """
    registry.get(tutorial)  # an unknown tutorial fails here, not in the browser
    check_address(address, public)
    args = ["--tutorial", tutorial, *app_args]
    if adapter:
        args += ["--adapter", str(check_adapter(adapter))]
    parse_args(args)  # a bad app argument fails here, not in the browser
    return [sys.executable, "-m", "streamlit", "run", str(Path(__file__).resolve()),
            "--server.address", address, "--server.port", str(port),
            "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none", "--client.toolbarMode", "minimal",
            "--client.showErrorDetails", "none", "--runner.fastReruns", "false", "--", *args]


def serve(tutorial: str = "qwen2", adapter: str | Path | None = None, port: int = 8501,
          address: str = LOCAL, public: bool = False, app_args: Sequence[str] = (),
          **popen: Any) -> subprocess.Popen:
    """Start the demo server in the background; the caller stops it (`terminate()`).

    `popen` goes to `subprocess.Popen` (a test redirects the server's log, sets its environment).
    """
    return subprocess.Popen(command(tutorial, adapter, port, address, public, app_args), **popen)


def run(tutorial: str = "qwen2", adapter: str | Path | None = None, port: int = 8501,
        address: str = LOCAL, public: bool = False, app_args: Sequence[str] = ()) -> int:
    """Serve until Ctrl-C or SIGTERM (what `selfllm webdemo` calls); the server's exit code.

    The server is stopped with this process: without the handler a SIGTERM would leave it
    serving, re-parented to PID 1.
    """
    check_port(port, address)
    server = serve(tutorial, adapter, port, address, public, app_args)
    if public:
        print(f"WARNING: the demo listens on {address}:{port}: anyone who can reach this machine "
              "can use the model" + ("" if os.environ.get(PASSWORD_ENV) else
                                      f"; set {PASSWORD_ENV} for a password page"), file=sys.stderr)
    print(f"WebDemo: http://{address}:{port}  (Ctrl-C stops it). On a remote machine, forward "
          f"the port from your laptop: ssh -L {port}:127.0.0.1:{port} user@host")

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return server.wait()
    except KeyboardInterrupt:  # asked to stop: not a failure
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass(frozen=True)
class Served:
    """What one server answers with: the model, its tokenizer, and the names the page shows."""

    tutorial: Tutorial
    model: Any
    tokenizer: Any
    base: str  # ModelScope id, or the smoke stand-in's folder
    adapter: str | None  # adapter folder, None for the base model (the page shows its name only)
    warning: str | None  # adapter trained on another base model than the one served

    def names(self) -> tuple[str, str]:
        """(base, adapter) as visitors see them: folder names, never absolute paths."""
        if not self.adapter:
            return visible(self.base), NO_ADAPTER
        path = Path(self.adapter)
        inside = path.is_relative_to(registry.repo_root())  # output/qwen2-assistant/adapter
        return visible(self.base), str(path.relative_to(registry.repo_root()) if inside
                                       else Path("...", *path.parts[-2:]))

    def context_limit(self, max_context: int | None = None) -> int:
        """Tokens of prompt + answer: the model's maximum (`inference.context_limit`, the limit
        `inference.chat` enforces), lowered by `--max-context`."""
        return inference.context_limit(self.model, max_context)


ABSOLUTE_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][^\\/\s:'\"`,;()]+)+[\\/]?")


def visible(text: str) -> str:
    """Text for visitors: every absolute path shortened to its last name (the terminal has all)."""
    return ABSOLUTE_PATH.sub(lambda m: Path(m.group(0).rstrip("/\\")).name or "/", text)


def report(err: BaseException) -> str:
    """The traceback to the terminal; for the page, the error's type and its message without paths."""
    traceback.print_exception(err, file=sys.stderr)
    return visible(f"{type(err).__name__}: {err}")


def _base_name(name: str) -> str:
    # ModelScope writes "." in folder names as "___" (Qwen1___5-14B-Chat)
    return Path(name.rstrip("/")).name.replace("___", ".").lower()


@st.cache_resource(show_spinner="Loading the model, once for every browser session ...")
def load(tutorial_key: str, adapter: str | None) -> Served:
    """Load the base model, with the adapter on top if given; cached per (tutorial, adapter).

    Every session of the server shares this one copy: a 7B model in bf16 takes ~15 GB of GPU
    memory, so one per browser tab would not fit.
    """
    tutorial = registry.get(tutorial_key)
    smoke_mode = registry.smoke_mode()
    served_on = str(models.model_path(tutorial, smoke_mode)) if smoke_mode else tutorial.modelscope_id
    base = f"smoke stand-in {served_on}" if smoke_mode else served_on
    if adapter is None:
        model, tokenizer = models.load_model(tutorial, smoke_mode=smoke_mode)
        return Served(tutorial, model.eval(), tokenizer, base, None, None)
    path = check_adapter(adapter)
    model, tokenizer = inference.load_adapter(tutorial, path, smoke_mode=smoke_mode)
    config = json.loads((path / "adapter_config.json").read_text())
    trained_on = config.get("base_model_name_or_path")
    warning = None
    if trained_on and _base_name(trained_on) != _base_name(served_on):
        warning = (f"This adapter was trained on {trained_on}, but the base model here is "
                   f"{served_on}: its answers may be poor (smoke adapter on the real model?).")
    return Served(tutorial, model, tokenizer, base, str(path), warning)


def prompt_length(tokenizer, messages: list[dict[str, str]]) -> int:
    """Tokens of the prompt the model will see, rendered by the training chat template."""
    text = formatting.render(tokenizer, messages, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def fit_context(tokenizer, messages: list[dict[str, str]], max_new_tokens: int,
                limit: int) -> tuple[list[dict[str, str]], str | None]:
    """Make prompt + answer fit in `limit` tokens; returns (messages, a note saying what was cut).

    The oldest question/answer pairs go first (the system prompt stays), then the newest
    question is cut to its first tokens. A model fed more than it was trained on answers
    badly or runs out of memory; saying what was left out is better than failing silently.

    Raises:
        ValueError: the system prompt and max_new_tokens alone leave no room for a question.
    """
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns, budget, notes = list(messages[len(system):]), limit - max_new_tokens, []
    dropped = 0
    while len(turns) > 2 and prompt_length(tokenizer, system + turns) > budget:
        turns, dropped = turns[2:], dropped + 2  # one user question and its answer
    if dropped:
        notes.append(f"the {dropped} oldest messages were left out")
    over = prompt_length(tokenizer, system + turns) - budget
    if over > 0:
        ids = tokenizer(turns[-1]["content"], add_special_tokens=False)["input_ids"]
        keep = len(ids) - over
        while keep > 0:
            turns[-1] = {"role": "user", "content": tokenizer.decode(ids[:keep])}
            over = prompt_length(tokenizer, system + turns) - budget
            if over <= 0:
                break
            keep -= over  # decoding and re-encoding may merge tokens differently
        if keep <= 0:
            raise ValueError(f"the system prompt and {max_new_tokens} new tokens leave no room for "
                             f"a question in {limit} tokens: lower max new tokens")
        notes.append(f"your message was cut to its first {keep} of {len(ids)} tokens")
    if not notes:
        return messages, None
    return system + turns, (f"Context limit {limit} tokens (prompt + max new tokens): "
                            + "; ".join(notes) + ".")


class _Cancel:
    """A stopping criterion that ends `generate` once the reader has gone (timeout, error, rerun).

    Without it the generation thread of an abandoned answer would keep the model busy.
    """

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool,
                          device=input_ids.device)


def first_token_timeout(args: argparse.Namespace) -> float:
    """Seconds for the first token: reading a long prompt takes far longer than one more token."""
    import torch

    if args.first_token_timeout is not None:
        return args.first_token_timeout
    return args.timeout if torch.cuda.is_available() else max(args.timeout, FIRST_TOKEN_TIMEOUT_CPU)


def generate(served: Served, messages: list[dict[str, str]], max_new_tokens: int,
             temperature: float, top_p: float, timeout: float,
             first_timeout: float | None = None) -> Iterator[str]:
    """The answer's pieces as the model writes them; the one place the page calls the model.

    Tests patch this function to see what reaches the model. `messages` already holds the
    system prompt, so `stream_chat` renders exactly what `fit_context` measured.
    """
    from transformers import StoppingCriteriaList

    cancel = _Cancel()
    try:
        yield from inference.stream_chat(
            served.model, served.tokenizer, messages, served.tutorial.family, system=None,
            max_new_tokens=max_new_tokens, timeout=timeout, first_token_timeout=first_timeout,
            temperature=temperature, top_p=top_p, stopping_criteria=StoppingCriteriaList([cancel]))
    finally:
        cancel.event.set()


@dataclass(frozen=True)
class Options:
    """The sidebar's generation settings."""

    max_new_tokens: int
    system: str
    temperature: float
    top_p: float


def _clear_history() -> None:
    for key in ("messages", "waiting", "notices"):  # mid-answer too: nothing is answered after it
        st.session_state[key] = []


def sidebar(served: Served, limit: int) -> Options:
    """Generation settings and the clear button; greedy by default, so answers are repeatable."""
    with st.sidebar:
        st.markdown("## self-llm WebDemo")
        st.markdown("[开源大模型食用指南 self-llm](https://github.com/datawhalechina/self-llm)")
        cap = max(2, min(MAX_NEW_TOKENS_CAP, limit // 2))
        max_new_tokens = st.slider("max new tokens", 1, cap, min(512, cap), key="max_new_tokens")
        system = st.text_area("system prompt", served.tutorial.system_prompt or "", key="system",
                              help="Empty: the chat template's default, as in training.")
        temperature = st.slider("temperature", 0.0, 2.0, 0.0, 0.05, key="temperature",
                                help="0: greedy, the same answer every time; higher: more varied.")
        top_p = st.slider("top-p", 0.05, 1.0, 0.8, 0.05, key="top_p",
                          help="Sample only from the most likely tokens covering this share "
                               "(used when temperature > 0).")
        st.button("Clear history", on_click=_clear_history)
    return Options(max_new_tokens, system.strip(), temperature, top_p)


def banner(served: Served) -> str:
    """Which base model and which adapter answer here (markdown; names only, no paths)."""
    base, adapter = served.names()
    adapter = f"`{adapter}`" if served.adapter else NO_ADAPTER
    return f"**Base model:** `{base}`  \n**Adapter:** {adapter}"


def show(role: str, text: str):
    """One chat bubble, as plain text: no Markdown image fetched, no HTML or LaTeX drawn."""
    bubble = st.chat_message(role)
    bubble.text(text)
    return bubble


def stream(pieces: Iterator[str]) -> str:
    """Write an answer as it arrives, as plain text (st.write_stream would render Markdown)."""
    box, answer = st.empty(), ""
    for piece in pieces:
        answer += piece
        box.text(answer)
    return answer


Notice = tuple[str, str]  # ("warning" or "error", text): shown under the chat until the next question


def too_long(text: str, what: str, cap: int) -> str | None:
    """Why `text` is refused (None: it is not): checked before any tokenizer sees it."""
    if len(text) <= cap:
        return None
    return (f"{what} has {len(text):,} characters; this demo takes at most {cap:,} "
            "(--max-message-chars). Nothing was sent to the model: shorten it.")


def respond(served: Served, history: list[dict[str, str]], question: str, options: Options,
            args: argparse.Namespace) -> list[Notice]:
    """Stream one answer; the turn enters the history only once it is answered. Returns what
    the page must go on showing (a cut history, an error) after it redraws.

    Errors (including a stalled generation, `queue.Empty` after `--timeout` seconds) become a
    message on the page and the server keeps serving: one bad request must not end a demo.
    """
    refused = too_long(question, "Your message", args.max_message_chars)
    if refused:
        return [("error", refused)]
    show("user", question)
    notices: list[Notice] = []
    refused = too_long(options.system, "The system prompt", args.max_message_chars)
    if refused:
        return [("error", refused)]
    system = [{"role": "system", "content": options.system}] if options.system else []
    with st.chat_message("assistant"):
        try:
            messages, note = fit_context(served.tokenizer, system + history + [
                {"role": "user", "content": question}], options.max_new_tokens,
                served.context_limit(args.max_context))
            if note:
                st.warning(note)
                notices.append(("warning", note))
            answer = stream(generate(served, messages, options.max_new_tokens, options.temperature,
                                     options.top_p, args.timeout, first_token_timeout(args)))
        except queue.Empty:
            return notices + [("error", f"No new token in time (--timeout {args.timeout:g} s, first "
                               f"token {first_token_timeout(args):g} s): the generation was stopped "
                               "(timeout). The question was not kept; try again.")]
        except Exception as err:  # the page must survive any model error
            return notices + [("error", f"Generation failed: {report(err)}. "
                               "The question was not kept; the demo keeps serving.")]
        if not answer.strip():
            answer = "(empty answer: the model ended its turn at once)"
            st.text(answer)
    history.extend([{"role": "user", "content": question},
                    {"role": "assistant", "content": answer}])
    return notices


class Lockout:
    """Wrong passwords counted by the server: past `tries` from one address, or `total` from all,
    in `window` seconds, every password from there (the right one too) is refused until the
    oldest of those failures is `window` seconds old.

    Not per session: a new browser tab is a new session, so a per-session count let a script
    guess on forever (300 wrong guesses, then the right one, got in). Per address, so one
    learner's typos do not lock a room out; the total bounds guessing from many addresses, or
    through a proxy that makes every visitor one address (its price: during such guessing the
    right password waits too).
    """

    def __init__(self, tries: int = PASSWORD_TRIES, window: float = PASSWORD_WINDOW,
                 total: int = PASSWORD_TOTAL, clock=time.monotonic) -> None:
        self.tries, self.window, self.total, self.clock = tries, window, total, clock
        self.failures: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
        self.all: collections.deque[float] = collections.deque()
        self.lock = threading.Lock()

    def _wait(self, failures: collections.deque[float], limit: int, now: float) -> float:
        while failures and now - failures[0] >= self.window:
            failures.popleft()
        return 0.0 if len(failures) < limit else self.window - (now - failures[-limit])

    def wait(self, address: str = "") -> float:
        """Seconds until a password from `address` may be tried again; 0: now."""
        with self.lock:
            now = self.clock()
            mine = self._wait(self.failures[address], self.tries, now)
            if not self.failures[address]:
                del self.failures[address]  # addresses seen once are not kept forever
            return max(mine, self._wait(self.all, self.total, now))

    def failed(self, address: str = "") -> None:
        with self.lock:
            self.failures[address].append(self.clock())
            self.all.append(self.clock())


PASSWORDS = Lockout()  # module state: one per server process, shared by every session


def _check_password() -> None:
    """The password field's on_change: each typed password is checked once (a rerun of the
    page does not count it again)."""
    state = st.session_state
    typed, secret = state.get("password", ""), os.environ.get(PASSWORD_ENV, "")
    state["password_error"] = None
    if not typed:
        return
    address = st.context.ip_address  # None: this machine (or a proxy on it)
    address = address if isinstance(address, str) else ""  # (AppTest hands out a mock)
    wait = PASSWORDS.wait(address)
    if wait > 0:
        state["password_error"] = f"Too many wrong passwords: try again in {math.ceil(wait)} s."
    elif hmac.compare_digest(typed.encode(), secret.encode()):
        state["signed_in"] = True
    else:
        PASSWORDS.failed(address)
        state["password_error"] = "Wrong password."


def password_gate() -> None:
    """With SELFLLM_WEBDEMO_PASSWORD set, a session sees the chat only after typing it."""
    if not os.environ.get(PASSWORD_ENV) or st.session_state.get("signed_in"):
        return
    st.text_input("Password", type="password", key="password", on_change=_check_password)
    if st.session_state.get("password_error"):
        st.error(st.session_state["password_error"])
    st.stop()


def _queue() -> None:
    """The chat input's on_submit: it runs before the script, so the page knows that it will be
    answering before it draws the input (disabled while it answers)."""
    st.session_state.setdefault("waiting", []).append(st.session_state.get("question") or "")


def _quoted(text: str, width: int = 60) -> str:
    return f"“{text if len(text) <= width else text[:width] + '…'}”"


def page(args: argparse.Namespace | None = None) -> None:
    """The whole app, run by Streamlit once per interaction of each browser session.

    Each question is answered in the run its message starts, oldest first, and the browser
    disables the chat input from sending until that run ends (`submit_mode="disable"`): a
    message sent while the script runs replaced one Streamlit had not handed over yet, so
    questions typed in quick succession were lost. An answer cut short by a rerun (a setting
    changed) is answered again; one cut short by Stop leaves `answering` behind, and the next
    run says so instead.
    """
    args = args or parse_args()
    tutorial = registry.get(args.tutorial)
    name = tutorial.modelscope_id.split("/")[-1]
    st.set_page_config(page_title=f"{name} WebDemo", page_icon="💬")
    st.title(f"💬 {name} Chatbot")
    st.caption("🚀 A streamlit chatbot powered by Self-LLM")
    password_gate()
    try:
        served = load(args.tutorial, str(check_adapter(args.adapter)) if args.adapter else None)
    except Exception as err:
        st.error(f"Could not load the model: {report(err)}")
        st.stop()
    st.info(banner(served))
    if served.warning:
        st.warning(visible(served.warning))
    state = st.session_state
    history = state.setdefault("messages", [])
    waiting = state.setdefault("waiting", [])  # sent, not yet answered, oldest first
    if waiting:
        state["notices"] = []  # those of the last question
    notices = state.setdefault("notices", [])
    stopped = state.pop("answering", None)
    if stopped is not None:
        notices.append(("warning", f"Stopped: the answer to {_quoted(stopped)} was not finished and "
                        "is not kept. Send the question again for a new answer."))
    options = sidebar(served, served.context_limit(args.max_context))
    # not disabled=True while answering: the browser would learn it too late, and Streamlit
    # drops what a disabled input sends
    st.chat_input("Ask something", key="question", on_submit=_queue, submit_mode="disable")
    for message in history:
        show(message["role"], message["content"])
    for kind, text in notices:
        getattr(st, kind)(text)
    while waiting:
        question = state["answering"] = waiting.pop(0).strip()  # no Streamlit call between
        try:
            said = respond(served, history, question, options, args) if question else []
        except RerunException:  # a setting changed mid-answer: answer again, with the new one
            waiting.insert(0, state.pop("answering"))
            raise
        del state["answering"]
        for kind, text in said:
            getattr(st, kind)(text)
        notices.extend(said)


class NoMetrics:
    """ASGI middleware: 404 for Streamlit's `/_stcore/metrics`, which answers anyone, password or
    not (the password page lives inside the app), with the server's sessions and cache sizes.
    Streamlit (1.67) has no option to switch it off; `st.App` runs middleware like this first."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].rstrip("/").endswith("/_stcore/metrics"):
            await PlainTextResponse("Not Found", status_code=404)(scope, receive, send)
        else:
            await self.app(scope, receive, send)


# `streamlit run` finds this app in the file and serves the page through it (uvicorn).
app = st.App(__file__, middleware=[Middleware(NoMetrics)])

if __name__ == "__main__":  # run by Streamlit: use the imported module, which tests can patch
    from selfllm_utils import webdemo

    webdemo.page()
