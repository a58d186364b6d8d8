"""A filled cache loads offline: every layout ModelScope has written is found with no network.

Each layout is built from a smoke stand-in folder placed under a real tutorial's id. Today's
layout is written by ModelScope's own download code with its two network calls (the file list,
the file body) replaced by copies of the stand-in, so the test follows ModelScope, not a guess.
"""

from __future__ import annotations

import logging
import shutil
import socket
import time
from pathlib import Path

import pytest

from selfllm_utils import cache, cli, models, registry, smoke

DOTTED, PLAIN = "qwen1.5", "deepseek"  # qwen/Qwen1.5-14B-Chat has a dot in its name, the other none
OFFLINE_SECONDS = 5.0  # a complete cache is found in milliseconds; ModelScope's offline retries take ~27 s
# Layouts of ModelScope releases before 1.38, relative to the cache_dir passed to snapshot_download,
# as ModelScope 1.40's readers list them (DownloadManager._find_legacy_repo_dir and
# modelscope.hub.utils.utils.find_reusable_legacy_repo_dir); {safe} is the name with dots as ___.
LEGACY_LAYOUTS = ["{owner}/{safe}", "{owner}/{name}", "hub/{owner}/{name}", "models/{owner}/{safe}",
                  "hub/models/{owner}/{safe}"]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SELFLLM_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture
def network(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every attempt to reach the network (sockets, the course's download), each one refused."""
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("the test machine is offline")

    for name in ("getaddrinfo", "create_connection"):
        monkeypatch.setattr(socket, name, refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(cache, "fetch", refuse)
    return attempts


def _stand_in(key: str) -> Path:
    return smoke.model_dir(registry.get(key))


def write_with_modelscope(source: Path, model_id: str, cache_dir: Path,
                          monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run ModelScope's own `snapshot_download`, its file list and file fetch served from `source`."""
    from modelscope import snapshot_download
    from modelscope_hub import _download, _legacy_api

    def listing(self, repo_id, repo_type, revision="master", recursive=True, root=None):
        return [{"Path": f.name, "Type": "blob", "Size": f.stat().st_size} for f in source.iterdir()]

    def fetch(self, repo_id, repo_type, file_path, revision, target, **kwargs):
        shutil.copyfile(source / file_path, target)
        return target

    with monkeypatch.context() as patch:
        patch.setattr(_legacy_api.LegacyClient, "list_repo_files", listing)
        patch.setattr(_download.DownloadManager, "_download_with_resume", fetch)
        # an explicit endpoint: ModelScope skips choosing a mirror over the network
        return Path(snapshot_download(model_id, cache_dir=str(cache_dir), endpoint="https://modelscope.cn"))


def _legacy_folder(home: Path, key: str, layout: str) -> Path:
    owner, name = registry.get(key).modelscope_id.split("/")
    folder = home / "models" / layout.format(owner=owner, name=name, safe=name.replace(".", "___"))
    shutil.copytree(_stand_in(key), folder)
    return folder


def _load_offline(key: str) -> tuple[Path, float]:
    start = time.perf_counter()
    path = models.model_path(registry.get(key), smoke_mode=False)
    return path, time.perf_counter() - start


@pytest.mark.parametrize("key", [DOTTED, PLAIN])
def test_todays_layout_loads_offline(home: Path, network: list, monkeypatch: pytest.MonkeyPatch,
                                     key: str) -> None:
    written = write_with_modelscope(_stand_in(key), registry.get(key).modelscope_id, home / "models",
                                    monkeypatch)
    path, seconds = _load_offline(key)
    assert path == written and seconds < OFFLINE_SECONDS
    assert key in cli.cached_models()  # doctor sees the same folder
    assert network == []


def test_todays_layout_is_the_documented_one(home: Path, network: list,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """What cache.py, README and docs/INSTRUCTORS.md say ModelScope 1.40 writes."""
    written = write_with_modelscope(_stand_in(DOTTED), "qwen/Qwen1.5-14B-Chat", home / "models", monkeypatch)
    assert written == home / "models" / "models" / "qwen--Qwen1.5-14B-Chat" / "snapshots" / "master"


@pytest.mark.parametrize("layout", LEGACY_LAYOUTS)
@pytest.mark.parametrize("key", [DOTTED, PLAIN])
def test_older_layouts_load_offline(home: Path, network: list, key: str, layout: str) -> None:
    folder = _legacy_folder(home, key, layout)
    path, seconds = _load_offline(key)
    assert path == folder and seconds < OFFLINE_SECONDS
    assert cli.cached_models() == [key]
    assert network == []


def test_incomplete_cache_names_what_is_missing(home: Path, network: list) -> None:
    """Local first, the network only for the gap; offline, one line says which file is missing."""
    folder = _legacy_folder(home, PLAIN, LEGACY_LAYOUTS[0])
    (folder / "model.safetensors").unlink()
    with pytest.raises(RuntimeError) as info:
        models.model_path(registry.get(PLAIN), smoke_mode=False)
    message = str(info.value)
    assert "\n" not in message
    assert str(folder) in message and "no weight files" in message
    assert "`selfllm download deepseek`" in message and "SELFLLM_SMOKE=1" in message
    assert len(network) == 1  # it did try to fill the gap, once
    assert cli.cached_models() == []


def test_missing_model_is_fetched(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No local copy: ModelScope downloads it, and the course checks what came."""
    def fetch(model_id: str, cache_dir: Path) -> Path:
        return Path(shutil.copytree(_stand_in(PLAIN), cache_dir / "fetched"))

    monkeypatch.setattr(cache, "fetch", fetch)
    assert models.model_path(registry.get(PLAIN), smoke_mode=False) == home / "models" / "fetched"


def test_download_all_hint_repeats_the_command(home: Path, network: list) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["download", "--all"])
    assert "`selfllm download --all`" in str(info.value)
    assert "\n" not in str(info.value)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_modelscope_is_quiet_while_the_course_probes() -> None:
    """ModelScope's offline retry warnings go through its loggers; the course hides them meanwhile."""
    from modelscope_hub.utils.logger import get_logger

    retry = get_logger("legacy_api")  # the logger of "listing failed ..., retry in 1s (1/4)"
    shown = _Collect()
    logging.getLogger("modelscope_hub").addHandler(shown)  # beside ModelScope's own handler
    try:
        with cache.quiet_modelscope():
            retry.warning("listing failed (NetworkError), retry in 1s (1/4)")
        assert shown.messages == []
        retry.warning("listing failed (NetworkError), retry in 2s (2/4)")
        assert shown.messages == ["listing failed (NetworkError), retry in 2s (2/4)"]  # restored
    finally:
        logging.getLogger("modelscope_hub").removeHandler(shown)
