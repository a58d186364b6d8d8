"""Shared fixtures of the package tests: smoke models, a trained tiny adapter, a fixed seed.

Tiers (markers registered in pyproject.toml): the default run (`pytest`) uses the tiny random
stand-ins of DeepSeek and Qwen1.5, which load in well under a second, and SmolLM2 (the qwen2
stand-in, a real 135 M model) only where a real model matters; `slow` marks tests over ~20 s on
2 CPU cores (`pytest -m slow`); `gpu` marks tests that need CUDA (`pytest -m gpu`).

Tests never download: smoke mode is forced unless the caller chose otherwise.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("SELFLLM_SMOKE", "1")  # before any test asks registry.smoke_mode()

import torch  # noqa: E402

from selfllm_utils import data, registry  # noqa: E402

SEED = 1234
REFERENCE = registry.repo_root().parent / "shared" / "reference" / "chat_models.json"
IDENTITY = registry.repo_root() / "dataset" / "identity.json"
FAST_KEYS = ("deepseek", "qwen1.5")  # tiny random models: milliseconds to build and load
TRAIN_KEY = "deepseek"  # the tutorial of the shared trained adapter
TRAIN_REPEATS = 1  # one record: the same gradient as a batch of copies, for less work


@pytest.fixture(scope="session")
def free_port():
    """A function that returns a TCP port free on 127.0.0.1 right now: each server or launcher of
    tests running in parallel (pytest-xdist) asks for its own, so they do not collide."""
    import socket

    def pick() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    return pick


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Same random numbers in every test, whatever ran before it."""
    random.seed(SEED)
    torch.manual_seed(SEED)


@pytest.fixture(scope="session")
def reference() -> dict:
    """The reference chat data (../shared/reference/chat_models.json), keyed by tutorial."""
    if not REFERENCE.exists():
        pytest.skip(f"reference data not found at {REFERENCE}")
    raw = json.loads(REFERENCE.read_text(encoding="utf-8"))
    by_key = {key: raw["models"][t.hf_id] for key, t in registry.TUTORIALS.items()}
    return {"example_messages": raw["example_messages"], "models": by_key}


@pytest.fixture(scope="session")
def identity_records() -> list[dict]:
    """The course's own identity records (instruction, input, output, system, history)."""
    records, _ = data.load_records(IDENTITY)
    return records


class SmokeModels:
    """Loads stand-in models; tokenizers are cached, models are fresh (LoRA mutates them)."""

    def __init__(self) -> None:
        self._tokenizers: dict[str, object] = {}

    def tokenizer(self, key: str):
        from selfllm_utils import models, smoke

        if key not in self._tokenizers:
            t = registry.get(key)
            self._tokenizers[key] = models.load_tokenizer(smoke.model_dir(t), t.family)
        return self._tokenizers[key]

    def model(self, key: str, quant: str = "bf16"):
        """A fresh (model, tokenizer) from the cached stand-in folder."""
        from selfllm_utils import models

        return models.load_model(registry.get(key), quant=quant, smoke_mode=True)


@pytest.fixture(scope="session")
def smoke_models() -> SmokeModels:
    return SmokeModels()


@dataclass
class Trained:
    """A tiny model after a short smoke training, and its saved adapter."""

    tutorial: registry.Tutorial
    model: object  # PeftModel in eval mode
    tokenizer: object
    adapter: Path
    question: str
    answer: str
    losses: list[float]
    run: Path  # the Trainer's output folder: its TensorBoard event files (records.py)
    batch_tokens: int | None


def train_one(key: str, out: Path, record: dict) -> Trained:
    """Train the smoke recipe of tutorial `key` on one record and save the adapter under `out`.

    One record only: a tiny random model has frozen random embeddings and output layer, so LoRA
    can make it reproduce one answer exactly but not yet tell several apart.
    """
    import datasets

    from selfllm_utils import formatting, inference, models, training

    torch.manual_seed(SEED)
    tutorial = registry.get(key)
    ds = datasets.Dataset.from_list([record] * TRAIN_REPEATS, features=data.FEATURES)
    model, tokenizer = models.load_model(tutorial, smoke_mode=True)
    train_ds, _ = formatting.build_dataset(ds, tokenizer, tutorial, system="")
    cfg = registry.smoke_config(tutorial)
    peft_model = models.add_lora(model, tutorial, cfg)
    trainer = training.make_trainer(peft_model, tokenizer, train_ds, cfg, out / "run",
                                    disable_tqdm=True)
    trainer.train()
    peft_model.eval()
    adapter = inference.save_adapter(peft_model, tokenizer, out / "adapter")
    return Trained(tutorial, peft_model, tokenizer, adapter, record["instruction"],
                   record["output"], trainer.loss_curve.losses, out / "run", cfg.batch_tokens)


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, identity_records: list[dict]) -> Trained:
    """TRAIN_KEY's smoke recipe trained on one identity record, and its saved adapter."""
    return train_one(TRAIN_KEY, tmp_path_factory.mktemp("trained"), identity_records[0])


class _FakeServer:
    """Stands in for `subprocess.Popen`: keeps the command line, starts nothing, exits at once."""

    def __init__(self, commands: list[list[str]], cmd, *args, **kwargs) -> None:
        commands.append(list(cmd))
        self.returncode = 0

    def wait(self, timeout: float | None = None) -> int:
        return 0

    def poll(self) -> int:
        return 0

    def terminate(self) -> None:
        pass

    kill = terminate


@pytest.fixture
def streamlit_address(monkeypatch: pytest.MonkeyPatch):
    """Call a web-demo entry point; answer the `--server.address` it hands to streamlit.

    `subprocess.Popen` is replaced, so no server starts: what is checked is the command line.
    """
    import functools
    import subprocess

    def launch(start) -> str:
        commands: list[list[str]] = []
        monkeypatch.setattr(subprocess, "Popen", functools.partial(_FakeServer, commands))
        start()
        (cmd,) = [c for c in commands if "streamlit" in " ".join(c)]
        return cmd[cmd.index("--server.address") + 1]

    return launch
