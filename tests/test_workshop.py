"""What an instructor relies on: one cache setting, a collectable doctor report, partial downloads
caught before a room full of learners hits them, and workshop presets that finish in ~10 minutes.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from selfllm_utils import data, models, registry

ROOT = registry.repo_root()
PACKAGE_DIR = ROOT / "selfllm_utils"

# One epoch of Chat-甄嬛 (README): 3,617 records after de-duplication, 82 tokens on average.
HUANHUAN_RECORDS, HUANHUAN_MEAN_TOKENS = 3_617, 82
# Template tokens around one identity record (ChatML markers, the default system prompt), an upper
# bound: "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n..." is about 20 tokens.
CHATML_OVERHEAD_TOKENS = 30
# A 24 GB consumer card (RTX 3090/4090) against the README's Hopper (H100/H200) figures: an
# assumption (3-4x, from their bf16 matmul rates), not a measurement.
CONSUMER_SLOWDOWN = 3.5
WORKSHOP_MINUTES = 10.0
# tokens/s for the recipe each preset uses (docs/SPEED_HISTORY.md and README, Chat-甄嬛 lengths, the
# course defaults with compiled layers and, as a workshop's short runs keep it, the checkpoint around
# them): H200s on 2026-12-02, the fitted token budget; QLoRA under 5.5 GiB, GLM-4 and
# Qwen2 under 24 GiB; qwen1.5: the 24 GB-card plan (ZeRO-3 with offload, not compiled) on one H200
# under a 24 GiB cap.
README_TOKENS_PER_S = {"deepseek": 8_285, "glm4": 9_134, "qwen2": 12_033, "qwen1.5": 2_387}
# The knobs a preset may turn: how long it trains, how much a step holds. Never the model, the
# LoRA targets, the rank or the learning rate: the lesson must stay the same.
DURATION_FIELDS = {"num_train_epochs", "max_steps", "max_length", "per_device_train_batch_size",
                   "gradient_accumulation_steps", "save_steps", "logging_steps", "batch_tokens"}


def _tokens_per_epoch(key: str) -> float:
    """Training tokens of one epoch of the data the tutorial's notebook trains on."""
    if key != "qwen2":
        return HUANHUAN_RECORDS * HUANHUAN_MEAN_TOKENS
    records, _ = data.load_records(ROOT / "dataset" / "identity.json")
    chars = sum(len(r["instruction"]) + len(r["input"]) + len(r["output"]) for r in records)
    return chars + CHATML_OVERHEAD_TOKENS * len(records)  # Qwen's BPE: at most a token a character


def _tokens_per_s(key: str) -> float:
    return README_TOKENS_PER_S[key] / CONSUMER_SLOWDOWN


def test_readme_still_holds_the_figures() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    measured = readme + (ROOT / "docs" / "SPEED_HISTORY.md").read_text(encoding="utf-8")
    for figure in README_TOKENS_PER_S.values():
        assert f"{figure:,}" in measured, f"README and docs/SPEED_HISTORY.md no longer say {figure:,} tokens/s: " \
            "re-derive WORKSHOP"
    assert f"{HUANHUAN_RECORDS:,}" in readme and f"平均 {HUANHUAN_MEAN_TOKENS} token" in readme


@pytest.mark.parametrize("key", list(registry.TUTORIALS))
def test_workshop_preset_is_a_replace_of_the_course_config(key: str) -> None:
    course, preset = registry.get(key).config, registry.WORKSHOP[key]
    changed = {f.name: getattr(preset, f.name) for f in dataclasses.fields(preset)
               if getattr(preset, f.name) != getattr(course, f.name)}
    assert dataclasses.replace(course, **changed) == preset
    assert set(changed) <= DURATION_FIELDS, f"{key}: the workshop changes {set(changed) - DURATION_FIELDS}"


@pytest.mark.parametrize("key", list(registry.TUTORIALS))
def test_workshop_preset_trains_in_ten_minutes(key: str) -> None:
    preset = registry.WORKSHOP[key]
    assert preset.max_steps <= 0, "estimate by epochs; a max_steps preset needs its own estimate"
    minutes = _tokens_per_epoch(key) * preset.num_train_epochs / _tokens_per_s(key) / 60
    assert minutes <= WORKSHOP_MINUTES, f"{key}: ~{minutes:.1f} min on a 24 GB card"


def test_workshop_covers_every_tutorial() -> None:
    assert set(registry.WORKSHOP) == set(registry.TUTORIALS)


def _environment_readers(path: Path) -> set[str]:
    """SELFLLM_* variable names a source file spells as a whole string (how os.environ reads them)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and node.value.startswith("SELFLLM_") and node.value.isupper():
            names.add(node.value)
    return names


def test_selfllm_home_is_read_in_one_place() -> None:
    """A workshop points every learner at one pre-filled cache by one variable, read once."""
    readers = sorted(p.name for p in PACKAGE_DIR.glob("*.py") if "SELFLLM_HOME" in _environment_readers(p))
    assert readers == ["registry.py"]


def test_home_follows_selfllm_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SELFLLM_HOME", str(tmp_path / "shared-cache"))
    assert registry.home() == tmp_path / "shared-cache" and registry.home().is_dir()


def test_doctor_json_from_the_shell_is_one_line(tmp_path: Path) -> None:
    """What an instructor runs on each machine and appends to one file: `selfllm doctor --json`.

    Run as on a learner's machine, with SELFLLM_SMOKE unset: without a GPU, smoke mode announces
    itself, and that line must not land in the JSON (stdout is exactly one object).
    """
    env = {k: v for k, v in os.environ.items() if k != "SELFLLM_SMOKE"}
    env["SELFLLM_HOME"] = str(tmp_path)
    run = subprocess.run([sys.executable, "-m", "selfllm_utils.cli", "doctor", "--json"], env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(run.stdout)  # the whole of stdout, as the guide's one-liner reads it
    assert run.stdout.count("\n") == 1  # one line per machine in room.jsonl
    assert report["home"] == str(tmp_path) and report["cached_models"] == []
    if report["gpu"] is None:
        assert report["smoke_mode"] is True and "smoke mode" in run.stderr


def _model_folder(folder: Path, shards: list[str]) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (folder / "tokenizer.json").write_text("{}")
    weight_map = {f"layer.{i}.weight": name for i, name in enumerate(shards)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def test_modelscope_marks_partial_files_incomplete() -> None:
    """The suffix simulated below is the one the installed ModelScope writes while downloading."""
    download = pytest.importorskip("modelscope_hub._download")
    if not hasattr(download, "_incomplete_path"):
        pytest.skip("this modelscope names partial files differently")
    assert download._incomplete_path(Path("model.safetensors")).name == "model.safetensors.incomplete"


def test_config_without_weights_is_refused(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path / "m", ["model-00001-of-00001.safetensors"])
    with pytest.raises(RuntimeError, match="no weight files: the download was cut off"):
        models.check_model_dir(folder)


@pytest.mark.parametrize("leftover", ["model-00002-of-00002.safetensors.incomplete",
                                      "model-00002-of-00002.safetensors.parallel_tmp",
                                      "model-00002-of-00002.safetensors_0_1048575"])
def test_interrupted_sharded_download_is_refused(tmp_path: Path, leftover: str) -> None:
    """One shard done, the other still one of ModelScope's partial files."""
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    folder = _model_folder(tmp_path / "m", shards)
    (folder / shards[0]).write_bytes(b"\0" * 8)
    (folder / leftover).write_bytes(b"\0" * 8)
    with pytest.raises(RuntimeError, match="model-00002-of-00002.safetensors.*cut off"):
        models.check_model_dir(folder)
    (folder / leftover).rename(folder / shards[1])  # the resumed download finishes
    assert models.check_model_dir(folder) == folder
