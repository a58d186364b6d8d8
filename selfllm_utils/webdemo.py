"""Chat in the browser with a tutorial's model, or with your own LoRA adapter (a Streamlit app).

    streamlit run selfllm_utils/webdemo.py -- --tutorial qwen2 --adapter output/qwen2/adapter
    selfllm webdemo --adapter output/qwen2/adapter        # the same, through `serve()`

The seed's `chatBot.py`, grown for a course: the model is loaded once per server and shared by
every browser session (`st.cache_resource`), each session keeps its own history
(`st.session_state`), answers stream as they are generated, and the page says which base model
and which adapter answer, so "after fine-tuning the demo answers as before" (self-llm#230) is
seen at a glance. Prompts go through `inference.stream_chat`, hence through `formatting.render`,
the chat template used in training. The server listens on 127.0.0.1 only: reach it through an
SSH tunnel (`ssh -L 8501:127.0.0.1:8501 user@host`) rather than opening a port to the internet.

Streamlit runs this file as a script (`__main__`), so it imports the package absolutely and
calls `page()` of the imported module: tests patch that module's `generate` to watch the model.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import streamlit as st

from selfllm_utils import formatting, inference, models, registry
from selfllm_utils.registry import Tutorial

ARGS_ENV = "SELFLLM_WEBDEMO_ARGS"  # app arguments for runs without a command line (AppTest)
FALLBACK_CONTEXT = 4096  # tokens, for a model whose config names no maximum length
MAX_NEW_TOKENS_CAP = 2048  # upper end of the sidebar slider
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
    if argv is None:
        env = os.environ.get(ARGS_ENV)
        argv = shlex.split(env) if env is not None else sys.argv[1:]
    return parser.parse_args(list(argv))


def check_adapter(adapter: str | Path) -> Path:
    """The adapter folder, or a sentence saying why it is not one (before a model is loaded)."""
    path = Path(adapter).expanduser().resolve()
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path} has no adapter_config.json: not a LoRA adapter folder "
                                "(notebook 03 saves one with inference.save_adapter)")
    return path


def command(tutorial: str = "qwen2", adapter: str | Path | None = None, port: int = 8501,
            address: str = "127.0.0.1") -> list[str]:
    """The `streamlit run` command line of the demo.

    Headless (no browser is opened on a server), no usage statistics sent, no file watcher
    (nothing to reload on a course machine), no "Deploy" button, and bound to `address`:
    127.0.0.1 keeps the demo private to the machine; pass 0.0.0.0 only where a platform
    forwards a port for you (AutoDL's custom service, for example).
    """
    registry.get(tutorial)  # an unknown tutorial fails here, not in the browser
    app_args = ["--tutorial", tutorial]
    if adapter:
        app_args += ["--adapter", str(check_adapter(adapter))]
    return [sys.executable, "-m", "streamlit", "run", str(Path(__file__).resolve()),
            "--server.address", address, "--server.port", str(port),
            "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none", "--client.toolbarMode", "minimal", "--", *app_args]


def serve(tutorial: str = "qwen2", adapter: str | Path | None = None, port: int = 8501,
          address: str = "127.0.0.1", **popen: Any) -> subprocess.Popen:
    """Start the demo server in the background; the caller stops it (`terminate()`).

    `popen` goes to `subprocess.Popen` (a test redirects the server's log, sets its environment).
    """
    return subprocess.Popen(command(tutorial, adapter, port, address), **popen)


def run(tutorial: str = "qwen2", adapter: str | Path | None = None, port: int = 8501,
        address: str = "127.0.0.1") -> int:
    """Serve until Ctrl-C (what `selfllm webdemo` calls); returns the server's exit code."""
    server = serve(tutorial, adapter, port, address)
    print(f"WebDemo: http://{address}:{port}  (Ctrl-C stops it). On a remote machine, forward "
          f"the port from your laptop: ssh -L {port}:127.0.0.1:{port} user@host")
    try:
        return server.wait()
    except KeyboardInterrupt:
        server.terminate()
        return server.wait(timeout=30)


@dataclass(frozen=True)
class Served:
    """What one server answers with: the model, its tokenizer, and the names the page shows."""

    tutorial: Tutorial
    model: Any
    tokenizer: Any
    base: str  # ModelScope id, or the smoke stand-in's folder
    adapter: str | None  # adapter folder, None for the base model
    warning: str | None  # adapter trained on another base model than the one served

    def context_limit(self, max_context: int | None = None) -> int:
        """Tokens of prompt + answer: the model's maximum, lowered by `--max-context`."""
        limit = getattr(self.model.config, "max_position_embeddings", None) or FALLBACK_CONTEXT
        return min(limit, max_context) if max_context else limit


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


def generate(served: Served, messages: list[dict[str, str]], max_new_tokens: int,
             temperature: float, top_p: float, timeout: float) -> Iterator[str]:
    """The answer's pieces as the model writes them; the one place the page calls the model.

    Tests patch this function to see what reaches the model. `messages` already holds the
    system prompt, so `stream_chat` renders exactly what `fit_context` measured.
    """
    from transformers import StoppingCriteriaList

    cancel = _Cancel()
    try:
        yield from inference.stream_chat(
            served.model, served.tokenizer, messages, served.tutorial.family, system=None,
            max_new_tokens=max_new_tokens, timeout=timeout, temperature=temperature, top_p=top_p,
            stopping_criteria=StoppingCriteriaList([cancel]))
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
    st.session_state["messages"] = []


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
    """Which base model and which adapter answer here (markdown)."""
    adapter = f"`{served.adapter}`" if served.adapter else NO_ADAPTER
    return f"**Base model:** `{served.base}`  \n**Adapter:** {adapter}"


def respond(served: Served, history: list[dict[str, str]], question: str, options: Options,
            args: argparse.Namespace) -> None:
    """Stream one answer; the turn enters the history only once it is answered.

    Errors (including a stalled generation, `queue.Empty` after `--timeout` seconds) become a
    message on the page and the server keeps serving: one bad request must not end a demo.
    """
    st.chat_message("user").markdown(question)
    system = [{"role": "system", "content": options.system}] if options.system else []
    with st.chat_message("assistant"):
        try:
            messages, note = fit_context(served.tokenizer, system + history + [
                {"role": "user", "content": question}], options.max_new_tokens,
                served.context_limit(args.max_context))
            if note:
                st.warning(note)
            answer = st.write_stream(generate(served, messages, options.max_new_tokens,
                                              options.temperature, options.top_p, args.timeout))
        except queue.Empty:
            st.error(f"No new token for {args.timeout:g} s: the generation was stopped (timeout). "
                     "The question was not kept; try again.")
            return
        except Exception as err:  # the page must survive any model error
            st.error(f"Generation failed: {type(err).__name__}: {err}. "
                     "The question was not kept; the demo keeps serving.")
            return
        if not isinstance(answer, str) or not answer.strip():
            answer = "(empty answer: the model ended its turn at once)"
            st.markdown(answer)
    history.extend([{"role": "user", "content": question},
                    {"role": "assistant", "content": answer}])


def page(args: argparse.Namespace | None = None) -> None:
    """The whole app, run by Streamlit once per interaction of each browser session."""
    args = args or parse_args()
    tutorial = registry.get(args.tutorial)
    name = tutorial.modelscope_id.split("/")[-1]
    st.set_page_config(page_title=f"{name} WebDemo", page_icon="💬")
    st.title(f"💬 {name} Chatbot")
    st.caption("🚀 A streamlit chatbot powered by Self-LLM")
    try:
        served = load(args.tutorial, str(check_adapter(args.adapter)) if args.adapter else None)
    except Exception as err:
        st.error(f"Could not load the model: {type(err).__name__}: {err}")
        st.stop()
    st.info(banner(served))
    if served.warning:
        st.warning(served.warning)
    options = sidebar(served, served.context_limit(args.max_context))
    history = st.session_state.setdefault("messages", [])
    for message in history:
        st.chat_message(message["role"]).markdown(message["content"])
    question = st.chat_input("Ask something")
    if question and question.strip():  # an empty message is ignored
        respond(served, history, question.strip(), options, args)


if __name__ == "__main__":  # run by Streamlit: use the imported module, which tests can patch
    from selfllm_utils import webdemo

    webdemo.page()
