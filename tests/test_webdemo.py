"""The chat WebDemo, driven by Streamlit's AppTest in smoke mode (no browser, no server).

The qwen2 stand-in is SmolLM2-135M-Instruct, a real chat model, so the basic test checks a real
answer; `st.cache_resource` is shared by the AppTests of one process, so it loads once. The spy
on `webdemo.generate` (the page's one call into the model) shows what reaches the model.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest
from streamlit.testing.v1 import AppTest

from selfllm_utils import formatting, inference, models, registry, webdemo

RUN_TIMEOUT = 180  # seconds per script run: the first one loads the model on 2 busy cores
QUESTION = "What is the capital of France?"
ANSWER_WORD = "Paris"  # SmolLM2's greedy answer: "The capital of France is Paris."
TINY = "deepseek"  # tiny random model, answers in milliseconds: where the content does not matter
STALL = 1.0  # seconds one forward pass takes in the stalled-generation test
SHORT = 4  # max new tokens where the answer's content does not matter (keeps tests fast)


@pytest.fixture
def app(monkeypatch):
    """Start the app with the given app arguments (the env var webdemo reads instead of argv)."""
    monkeypatch.setenv("SELFLLM_SMOKE", "1")  # never the real 7B model, even on a GPU machine

    def start(args: str = "--tutorial qwen2", max_new_tokens: int | None = SHORT) -> AppTest:
        monkeypatch.setenv(webdemo.ARGS_ENV, args)
        at = AppTest.from_file(webdemo.__file__, default_timeout=RUN_TIMEOUT).run()
        assert not at.exception, at.exception
        if max_new_tokens is not None:
            at.slider(key="max_new_tokens").set_value(max_new_tokens)
        return at

    return start


@pytest.fixture
def calls(monkeypatch) -> list[dict]:
    """Every `webdemo.generate` call (arguments and streamed pieces); the real model answers."""
    seen: list[dict] = []
    real = webdemo.generate

    def spy(served, messages, max_new_tokens, temperature, top_p, timeout, first_timeout=None):
        call = {"served": served, "messages": messages, "max_new_tokens": max_new_tokens,
                "temperature": temperature, "top_p": top_p, "timeout": timeout,
                "first_timeout": first_timeout, "pieces": []}
        seen.append(call)
        for piece in real(served, messages, max_new_tokens, temperature, top_p, timeout, first_timeout):
            call["pieces"].append(piece)
            yield piece

    monkeypatch.setattr(webdemo, "generate", spy)
    return seen


def ask(at: AppTest, text: str) -> AppTest:
    at.chat_input[0].set_value(text).run()
    assert not at.exception, at.exception
    return at


def chat(at: AppTest) -> list[tuple[str, str]]:
    """(role, text) of every chat bubble on the page."""
    return [(m.name, m.text[-1].value if len(m.text) else "") for m in at.chat_message]


def history(at: AppTest) -> list[dict]:
    return at.session_state["messages"]


def test_question_is_answered_streamed_history_grows_and_clears(app, calls):
    at = app(max_new_tokens=None)  # the default (512): the model ends its turn by itself
    assert webdemo.NO_ADAPTER in at.info[0].value and "smoke stand-in" in at.info[0].value
    ask(at, QUESTION)
    role, answer = chat(at)[-1]
    assert role == "assistant" and ANSWER_WORD in answer
    assert len(calls[-1]["pieces"]) > 1  # streamed piece by piece, not in one block
    assert history(at) == [{"role": "user", "content": QUESTION},
                           {"role": "assistant", "content": answer}]

    at.slider(key="max_new_tokens").set_value(SHORT)
    ask(at, "And of Germany?")
    assert len(history(at)) == 4 and [r for r, _ in chat(at)] == ["user", "assistant"] * 2
    tokenizer = calls[-1]["served"].tokenizer
    prompt = formatting.render(tokenizer, calls[-1]["messages"], add_generation_prompt=True)
    assert QUESTION in prompt and answer in prompt and "And of Germany?" in prompt  # multi-turn

    at.sidebar.button[0].click().run()
    assert history(at) == [] and chat(at) == []


def test_sidebar_settings_reach_generation(app, calls):
    at = app(max_new_tokens=4)
    at.text_area(key="system").set_value("You are a pirate who loves the sea.")
    at.slider(key="temperature").set_value(0.7)
    at.slider(key="top_p").set_value(0.5)
    ask(at, "Tell me a long story about the sea.")
    call = calls[-1]
    assert (call["max_new_tokens"], call["temperature"], call["top_p"]) == (4, 0.7, 0.5)
    tokenizer = call["served"].tokenizer
    prompt = formatting.render(tokenizer, call["messages"], add_generation_prompt=True)
    assert "You are a pirate who loves the sea." in prompt
    answer = chat(at)[-1][1]
    assert 0 < len(tokenizer(answer, add_special_tokens=False)["input_ids"]) <= 4


def test_empty_input_is_ignored(app, calls):
    at = ask(app(), "   ")
    assert chat(at) == [] and history(at) == [] and calls == []


def test_generation_error_is_shown_and_the_app_keeps_serving(app, monkeypatch):
    def broken(*args, **kwargs):
        yield "half an answer "
        raise RuntimeError("CUDA out of memory (simulated)")

    real = webdemo.generate
    monkeypatch.setattr(webdemo, "generate", broken)
    at = ask(app(f"--tutorial {TINY}"), QUESTION)
    assert "CUDA out of memory (simulated)" in at.error[0].value
    assert history(at) == []  # the failed turn is not kept

    monkeypatch.setattr(webdemo, "generate", real)
    ask(at, QUESTION)
    assert not at.error and chat(at)[-1][0] == "assistant" and chat(at)[-1][1].strip()
    assert len(history(at)) == 2


def test_stalled_generation_ends_with_a_timeout_and_stops_the_model(app, monkeypatch):
    real, forwards, served = webdemo.generate, [], []

    def stalled(model_served, *args):
        forward = model_served.model.forward

        def slow(*a, **k):
            forwards.append(time.monotonic())
            time.sleep(STALL)  # longer than --timeout: no token arrives in time
            return forward(*a, **k)

        model_served.model.forward = slow
        served.append(model_served)
        yield from real(model_served, *args)

    monkeypatch.setattr(webdemo, "generate", stalled)
    try:
        at = ask(app(f"--tutorial {TINY} --timeout 0.3 --first-token-timeout 0.3", max_new_tokens=None),
                 QUESTION)
        assert "timeout" in at.error[0].value and history(at) == []
        time.sleep(2 * STALL)
        assert len(forwards) == 1  # the abandoned generation stopped after one step, not 512
    finally:
        del served[0].model.forward  # the class's forward again, for the other tests


def test_long_input_is_cut_to_the_context_limit_with_a_note(app, calls):
    limit = 128
    at = ask(app(f"--tutorial {TINY} --max-context {limit}"), "Hi!")
    assert not at.warning
    ask(at, "word " * 400)
    note = at.warning[0].value
    assert "2 oldest messages were left out" in note and "cut to its first" in note
    call = calls[-1]
    assert webdemo.prompt_length(call["served"].tokenizer, call["messages"]) + SHORT <= limit
    assert chat(at)[-1][0] == "assistant" and len(history(at)) == 4


@pytest.fixture
def adapter(tmp_path):
    """A saved LoRA adapter on the tiny DeepSeek stand-in, with random (non-zero) B matrices.

    peft starts B at zero, so a fresh adapter would answer exactly like the base model; random
    weights make "which one is answering" visible in milliseconds, without training.
    """
    from peft import get_peft_model

    tutorial = registry.get(TINY)
    model, tokenizer = models.load_model(tutorial, smoke_mode=True)
    config = models.lora_config(tutorial, registry.smoke_config(tutorial))
    config.init_lora_weights = False
    return inference.save_adapter(get_peft_model(model, config), tokenizer, tmp_path / "adapter")


def test_adapter_is_served_named_and_is_the_one_answering(app, calls, adapter, tmp_path):
    """The learner's adapter answers on the page (self-llm#230: "the demo answers as before")."""
    tutorial = registry.get(TINY)
    at = app(f"--tutorial {TINY} --adapter {adapter}")
    shown = f"`.../{adapter.parent.name}/adapter`"  # which adapter, without the machine's path
    assert shown in at.info[0].value and webdemo.NO_ADAPTER not in at.info[0].value
    assert not at.warning
    at.text_area(key="system").set_value("")
    ask(at, "你是谁？")
    assert type(calls[-1]["served"].model).__name__.startswith("Peft")
    tuned, tokenizer = inference.load_adapter(tutorial, adapter, smoke_mode=True)
    with tuned.disable_adapter():
        base_reply = inference.chat(tuned, tokenizer, "你是谁？", tutorial.family,
                                    max_new_tokens=SHORT)
    reply = inference.chat(tuned, tokenizer, "你是谁？", tutorial.family, max_new_tokens=SHORT)
    assert reply.text != base_reply.text  # the adapter changes the answer ...
    assert chat(at)[-1] == ("assistant", reply.text)  # ... and the page shows the adapter's

    # an adapter trained on another base model is served, with a warning on the page
    other = shutil.copytree(adapter, tmp_path / "other")
    config = json.loads((other / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/root/autodl-tmp/qwen/Qwen2-7B-Instruct"
    (other / "adapter_config.json").write_text(json.dumps(config))
    at = app(f"--tutorial {TINY} --adapter {other}")
    assert "Qwen2-7B-Instruct" in at.warning[0].value


def test_missing_adapter_is_an_error_on_the_page(app, tmp_path, capsys):
    at = app(f"--tutorial qwen2 --adapter {tmp_path}", max_new_tokens=None)
    assert "no adapter_config.json" in at.error[0].value
    assert str(tmp_path) not in at.error[0].value  # visitors see names, not the machine's paths
    assert str(tmp_path) in capsys.readouterr().err  # the terminal has the whole story


def test_visitors_see_no_paths_and_no_tracebacks(app, adapter, monkeypatch, capsys):
    at = app(f"--tutorial {TINY} --adapter {adapter}")
    assert f"/{adapter.parent.name}/adapter`" in at.info[0].value
    assert str(adapter.parent) not in at.info[0].value
    assert "stand-in" in at.info[0].value and str(registry.home()) not in at.info[0].value

    def broken(*args, **kwargs):
        raise OSError("cannot read /home/learner/secret/weights.bin")
        yield

    monkeypatch.setattr(webdemo, "generate", broken)
    ask(at, QUESTION)
    shown = at.error[0].value
    assert "weights.bin" in shown and "/home/learner" not in shown and "Traceback" not in shown
    assert "Traceback" in capsys.readouterr().err and not at.exception


MARKUP = ("![pixel](http://example.invalid/pixel.png) <img src=x onerror=alert(1)> **bold** "
          "$\\rule{5000px}{5000px}$")


def test_messages_and_answers_are_plain_text(app, monkeypatch):
    """A Markdown image would make every visitor's browser fetch the URL; LaTeX \\rule paints."""
    real = webdemo.generate

    def markup_answer(*args, **kwargs):
        yield from real(*args, **kwargs)
        yield " " + MARKUP  # as if the model wrote it

    monkeypatch.setattr(webdemo, "generate", markup_answer)
    at = ask(app(f"--tutorial {TINY}"), MARKUP)
    ask(at, "again")  # the history is drawn again, from session state
    bubbles = at.chat_message
    assert [b.name for b in bubbles] == ["user", "assistant"] * 2
    assert all(len(b.markdown) == 0 for b in bubbles)  # nothing parsed as Markdown, HTML or LaTeX
    assert bubbles[0].text[0].value == MARKUP and bubbles[1].text[-1].value.endswith(MARKUP)


def test_a_question_sent_during_an_answer_waits_its_turn(app, calls):
    """Streamlit stops a running answer when a new message arrives; the first is not dropped."""
    at = app(f"--tutorial {TINY}")
    at.session_state["waiting"] = ["first question"]  # what an interrupted run leaves behind
    ask(at, "second question")
    assert [m["content"] for m in history(at)][::2] == ["first question", "second question"]
    assert at.session_state["waiting"] == [] and len(calls) == 2


def test_a_password_guards_the_chat(app, monkeypatch, lockout):
    monkeypatch.setenv(webdemo.PASSWORD_ENV, "s3cret")
    at = app(f"--tutorial {TINY}", max_new_tokens=None)
    assert not at.chat_input and at.text_input[0].proto.type == at.text_input[0].proto.PASSWORD
    at.text_input[0].input("wrong").run()
    assert not at.chat_input and "Wrong password" in at.error[0].value
    at.text_input[0].input("s3cret").run()
    assert at.chat_input and not at.error


def test_first_token_may_take_longer_than_the_next(monkeypatch):
    """Reading a long prompt on a CPU takes minutes; one more token does not."""
    import queue

    import torch

    tutorial = registry.get(TINY)
    model, tokenizer = models.load_model(tutorial, smoke_mode=True)
    forward, calls = model.forward, []

    def slow_first(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.6)  # the prompt
        return forward(*a, **k)

    model.forward = slow_first
    pieces = list(inference.stream_chat(model, tokenizer, QUESTION, tutorial.family, max_new_tokens=SHORT,
                                        timeout=0.3, first_token_timeout=5))
    assert pieces and len(calls) > 1
    calls.clear()
    with pytest.raises(queue.Empty):
        list(inference.stream_chat(model, tokenizer, QUESTION, tutorial.family, max_new_tokens=SHORT,
                                   timeout=0.3))
    args = webdemo.parse_args(["--timeout", "5"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert webdemo.first_token_timeout(args) == webdemo.FIRST_TOKEN_TIMEOUT_CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert webdemo.first_token_timeout(args) == 5
    assert webdemo.first_token_timeout(webdemo.parse_args(["--first-token-timeout", "9"])) == 9


def test_command_binds_locally_headless_without_usage_stats(tmp_path):
    cmd = webdemo.command("qwen2", None, 8600)
    args = dict(zip(cmd, cmd[1:]))
    assert args["--server.address"] == "127.0.0.1" and args["--server.port"] == "8600"
    assert args["--server.headless"] == "true" and args["--browser.gatherUsageStats"] == "false"
    assert cmd[cmd.index("--") + 1:] == ["--tutorial", "qwen2"]
    assert webdemo.parse_args(cmd[cmd.index("--") + 1:]).tutorial == "qwen2"
    assert args["--client.showErrorDetails"] == "none"  # no traceback for visitors
    assert args["--runner.fastReruns"] == "false"  # one script thread per session
    with pytest.raises(ValueError, match="--public"):
        webdemo.command(address="0.0.0.0")  # other machines only when asked for
    assert webdemo.command(address="0.0.0.0", public=True)[cmd.index("--server.address") + 1] == "0.0.0.0"
    app_args = webdemo.command(app_args=["--max-context=512", "--timeout=90"])
    assert webdemo.parse_args(app_args[app_args.index("--") + 1:]).max_context == 512
    with pytest.raises(ValueError, match="unknown tutorial"):
        webdemo.command("qwen3")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        webdemo.command(adapter=tmp_path)


@pytest.mark.parametrize("entry", ["serve", "run"])
def test_entry_points_bind_127_0_0_1_by_default(streamlit_address, entry):
    assert streamlit_address(getattr(webdemo, entry)) == "127.0.0.1"


def test_the_context_limit_is_looked_up_in_one_place(app, monkeypatch):
    """`inference.chat` refuses past the limit the demo cuts to: both read `inference.context_limit`."""
    at = app(f"--tutorial {TINY}")
    served = webdemo.load(TINY, None)
    assert served.context_limit() == served.model.config.max_position_embeddings
    assert served.context_limit(100) == 100
    monkeypatch.setattr(inference, "context_limit", lambda model, max_context=None: 77)
    assert served.context_limit() == 77
    with pytest.raises(ValueError, match="context of 77 tokens"):
        inference.chat(served.model, served.tokenizer, "word " * 80, served.tutorial.family)
    assert at.run().slider(key="max_new_tokens").max == 77 // 2  # the sidebar's cap: the same limit


def test_a_huge_message_is_refused_before_the_tokenizer(app, calls, monkeypatch):
    """A 2 MB message cost up to a minute of CPU a turn (and memory) before it reached the model."""
    tokenized = []
    monkeypatch.setattr(webdemo, "prompt_length", lambda *a: tokenized.append(1) or 0)
    at = ask(app(f"--tutorial {TINY} --max-message-chars 1000"), "x" * 2_000_000)
    assert "2,000,000 characters" in at.error[0].value and "at most 1,000" in at.error[0].value
    assert calls == [] and tokenized == [] and history(at) == [] and at.session_state["waiting"] == []
    at.text_area(key="system").set_value("y" * 1001)
    ask(at, "Hi!")
    assert "system prompt has 1,001 characters" in at.error[0].value and calls == [] and tokenized == []
    at.text_area(key="system").set_value("")
    ask(at, "Hi!")
    assert not at.error and len(calls) == 1 and len(history(at)) == 2


def test_stop_ends_the_answer_and_a_later_click_does_not_answer_again(app, calls, monkeypatch):
    """After Stop, touching a slider answered the stopped question again."""
    from streamlit.runtime.scriptrunner import StopException

    real = webdemo.generate

    def stopped(*args):
        yield "half an answer"
        raise StopException()  # what Streamlit raises in the script when the visitor presses Stop

    monkeypatch.setattr(webdemo, "generate", stopped)
    at = ask(app(f"--tutorial {TINY}"), QUESTION)
    # the browser takes no second question while one is answered (Streamlit could lose one)
    assert at.chat_input[0].proto.submit_mode == at.chat_input[0].proto.SUBMIT_MODE_DISABLE
    assert history(at) == []
    monkeypatch.setattr(webdemo, "generate", real)
    at.slider(key="temperature").set_value(0.5).run()
    assert calls == [] and history(at) == []
    assert "Stopped" in at.warning[0].value and QUESTION in at.warning[0].value
    ask(at, "again")
    assert [m["content"] for m in history(at)][::2] == ["again"] and not at.warning


def test_an_answer_cut_by_a_rerun_is_answered_again(app, calls, monkeypatch):
    """A setting changed mid-answer reruns the page: the question is answered again, once."""
    from streamlit.runtime.scriptrunner import RerunData, RerunException

    real, runs = webdemo.generate, []

    def cut_once(*args):
        runs.append(1)
        if len(runs) == 1:
            raise RerunException(RerunData())
        yield from real(*args)

    monkeypatch.setattr(webdemo, "generate", cut_once)
    at = ask(app(f"--tutorial {TINY}"), QUESTION)
    assert len(runs) == 2 and [m["content"] for m in history(at)][::2] == [QUESTION] and not at.warning


@pytest.fixture
def lockout(monkeypatch) -> list[float]:
    """A fresh password lockout for the server, on a clock the test moves."""
    now = [0.0]
    monkeypatch.setattr(webdemo, "PASSWORDS", webdemo.Lockout(clock=lambda: now[0]))
    return now


def test_wrong_passwords_lock_the_page_for_every_session(app, monkeypatch, lockout):
    """300 wrong passwords, then the right one, got in: guesses are now limited per address, not
    per session (a new tab does not reset them), and in all."""
    monkeypatch.setenv(webdemo.PASSWORD_ENV, "s3cret")
    at = app(f"--tutorial {TINY}", max_new_tokens=None)
    for guess in range(webdemo.PASSWORD_TRIES):
        at.text_input[0].input(f"guess {guess}").run()
        assert "Wrong password" in at.error[0].value
    at.text_input[0].input("s3cret").run()
    assert not at.chat_input and "Too many wrong passwords" in at.error[0].value
    other = app(f"--tutorial {TINY}", max_new_tokens=None)  # a new tab: a new session, same server
    other.text_input[0].input("s3cret").run()
    assert not other.chat_input and "try again in 60 s" in other.error[0].value
    assert webdemo.PASSWORDS.wait("10.0.0.7") == 0  # another learner's address: not locked
    lockout[0] += webdemo.PASSWORD_WINDOW
    other.text_input[0].input("").run()  # typed again: a field checks a password when it changes
    other.text_input[0].input("s3cret").run()
    assert other.chat_input and not other.error


def test_wrong_passwords_from_many_addresses_are_limited_in_all():
    now = [0.0]
    lockout = webdemo.Lockout(tries=5, total=30, window=60, clock=lambda: now[0])
    for n in range(30):
        assert lockout.wait(f"10.0.0.{n}") == 0
        lockout.failed(f"10.0.0.{n}")
    now[0] = 10.0
    assert lockout.wait("10.0.0.99") == 50  # a new address waits too: guessing is bounded in all
    now[0] = 60.0
    assert lockout.wait("10.0.0.99") == 0
    assert all(lockout.wait(f"10.0.0.{n}") == 0 for n in range(30)) and not lockout.failures
