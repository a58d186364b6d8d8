"""`selfllm webdemo`: one line and a non-zero exit for a wrong setting, the server stopped with it.

The tests call `cli.main` in-process: each fails before a server starts. The real command (its
address, SIGTERM) is started in tests/test_webdemo_browser.py, with the other real servers.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from selfllm_utils import cli, registry, webdemo


def one_line_error(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as stop:
        cli.main(["webdemo", *argv])
    message = str(stop.value.code)
    assert stop.value.code not in (0, None) and "\n" not in message and "Traceback" not in message
    assert message.startswith("selfllm webdemo: ")
    return message


def fake_adapter(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"")
    return folder


def test_bad_or_busy_port_is_one_line(monkeypatch):
    monkeypatch.setattr(webdemo, "serve", lambda *a, **k: pytest.fail("a server was started"))
    assert "1 to 65535" in one_line_error(["--port", "70000"])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert "not free" in one_line_error(["--port", str(busy.getsockname()[1])])


@pytest.mark.parametrize(("adapter", "says"), [("missing/adapter", "no adapter folder"),
                                               ("file.txt", "not a folder"),
                                               ("../../etc", "no adapter_config.json")])
def test_a_wrong_adapter_is_one_line(tmp_path, monkeypatch, adapter, says):
    monkeypatch.setattr(webdemo, "serve", lambda *a, **k: pytest.fail("a server was started"))
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "file.txt").write_text("x")
    (tmp_path / "etc").mkdir()  # ../../etc from a/b: a folder, but no adapter
    monkeypatch.chdir(tmp_path / "a" / "b")
    assert says in one_line_error(["--adapter", adapter])


def test_other_machines_only_with_public(monkeypatch, capsys):
    assert "--public" in one_line_error(["--address", "0.0.0.0"])
    started = {}

    def fake_run(tutorial, adapter, port, address, public, app_args):
        started.update(address=address, public=public, app_args=app_args)
        return 0

    monkeypatch.setattr(webdemo, "run", fake_run)
    with pytest.raises(SystemExit) as stop:
        cli.main(["webdemo", "--public", "--max-context", "512", "--timeout", "90",
                  "--first-token-timeout", "900"])
    assert stop.value.code == 0
    assert started == {"address": "0.0.0.0", "public": True,
                       "app_args": ["--max-context=512", "--timeout=90.0", "--first-token-timeout=900.0"]}


def test_an_adapter_path_typed_in_notebooks_is_found_and_said(tmp_path, monkeypatch, capsys):
    """JupyterLab's terminal opens in notebooks/; the notebooks write output/ at the repository root."""
    monkeypatch.setattr(registry, "repo_root", lambda: tmp_path)
    saved = fake_adapter(tmp_path / "output" / "qwen2-assistant" / "adapter")
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    assert webdemo.find_adapter("output/qwen2-assistant/adapter") == saved.resolve()
    said = capsys.readouterr().out
    assert f"using {saved.resolve()}" in said and "is not in" in said
    monkeypatch.chdir(tmp_path)
    assert webdemo.find_adapter("output/qwen2-assistant/adapter") == saved.resolve()
    assert capsys.readouterr().out == ""  # found where typed: nothing to say


@pytest.fixture
def started(monkeypatch) -> dict:
    """What `webdemo.run` would be started with; no server starts."""
    seen: dict = {}

    def fake_run(tutorial, adapter, port, address, public, app_args):
        seen.update(address=address, public=public, app_args=app_args)
        return 0

    monkeypatch.setattr(webdemo, "run", fake_run)
    return seen


@pytest.mark.parametrize(("argv", "address"), [(["--public", "--address", "127.0.0.1"], "127.0.0.1"),
                                               (["--public"], "0.0.0.0"), ([], "127.0.0.1")])
def test_an_explicit_address_is_kept(started, argv, address):
    """`--public --address 127.0.0.1` listened on 0.0.0.0: the default was taken for unset."""
    with pytest.raises(SystemExit) as stop:
        cli.main(["webdemo", *argv])
    assert stop.value.code == 0 and started["address"] == address


def test_an_empty_password_is_refused(started, monkeypatch):
    """An empty answer to --password served the demo with no password page at all."""
    import getpass

    monkeypatch.delenv(webdemo.PASSWORD_ENV, raising=False)
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": "")
    assert "password is empty" in one_line_error(["--public", "--password"])
    assert started == {} and webdemo.PASSWORD_ENV not in os.environ
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": "s3cret")
    with pytest.raises(SystemExit) as stop:
        cli.main(["webdemo", "--public", "--password"])
    assert stop.value.code == 0 and started["public"]
    # set by the command for its server; popped, not monkeypatch.delenv, whose undo would put it
    # back for every later test (and the browser tests' servers then asked for a password)
    os.environ.pop(webdemo.PASSWORD_ENV)


@pytest.mark.parametrize(("argv", "says"), [(["--max-context", "-5"], "--max-context -5: must be at least"),
                                            (["--max-context", "10"], "--max-context 10: must be at least"),
                                            (["--timeout", "-1"], "--timeout -1: must be a number above 0"),
                                            (["--timeout", "nan"], "--timeout nan"),
                                            (["--first-token-timeout", "0"], "--first-token-timeout 0"),
                                            (["--max-message-chars", "0"], "--max-message-chars 0")])
def test_numbers_that_break_every_answer_are_one_line(monkeypatch, argv, says):
    """`--max-context -5` and `--timeout -1` were accepted, then every answer failed."""
    import getpass

    monkeypatch.setattr(webdemo, "serve", lambda *a, **k: pytest.fail("a server was started"))
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": pytest.fail("asked for a password first"))
    assert says in one_line_error([*argv, "--public", "--password"])
