"""Where ModelScope keeps a model on disk: looked up with no network, fetched only when missing.

ModelScope 1.40's `snapshot_download` lists a repository's files over the network before it
looks at the local copy, so a complete cache does not load offline; with `local_files_only=True`
it resolves the folder on disk instead, in every layout it has written: today's
`{cache_dir}/models/{owner}--{name}/snapshots/master` and the older `{cache_dir}/{owner}/{name}`
(dots as `___` up to 1.37), `{cache_dir}/hub/...`, `{cache_dir}/models/{owner}/{name}`. The
course asks ModelScope itself rather than copying its list of layouts.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# ModelScope's two logger trees: the SDK's retry warnings and "found legacy cache" notes
MODELSCOPE_LOGGERS = ("modelscope", "modelscope_hub")


@contextmanager
def quiet_modelscope(level: int = logging.ERROR) -> Iterator[None]:
    """Hide ModelScope's log lines below `level` for a while (its offline retries print three).

    The caller turns a failure into one sentence; ModelScope's own logging switch
    (MODELSCOPE_LOG_LEVEL) is read once at import, so the level is set here and restored after.
    """
    loggers = [logging.getLogger(name) for name in MODELSCOPE_LOGGERS]
    before = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(level, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        for logger, old in zip(loggers, before):
            logger.setLevel(old)


def local_copy(model_id: str, cache_dir: Path) -> Path | None:
    """The model's folder under `cache_dir` in any ModelScope layout, or None; never the network.

    Says nothing about completeness: a cut-off download is found too (`models.check_model_dir`).
    """
    from modelscope import snapshot_download
    from modelscope_hub.errors import CacheNotFound

    with quiet_modelscope():
        try:
            return Path(snapshot_download(model_id, cache_dir=str(cache_dir), local_files_only=True))
        except CacheNotFound:
            return None


def fetch(model_id: str, cache_dir: Path) -> Path:
    """Download what is missing of a model from ModelScope into `cache_dir` (resumes, network)."""
    from modelscope import snapshot_download

    with quiet_modelscope():
        return Path(snapshot_download(model_id, cache_dir=str(cache_dir)))
