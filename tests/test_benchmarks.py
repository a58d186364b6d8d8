"""The GPU benchmark's configurations are checked here, on the CPU, before GPU time is spent on them."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from selfllm_utils import registry

PATH = registry.repo_root() / "benchmarks" / "train_speed.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_speed", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_configuration_names_a_tutorial_and_a_quant(bench) -> None:
    for name, (key, quant, cfg, opts) in bench.CONFIGS.items():
        assert name.startswith(key), name
        registry.get(key)
        assert quant in ("bf16", "4bit") and isinstance(cfg, registry.TrainConfig)
        assert set(opts) <= {"trl", "pack_tokens", "cap_gib", "steps", "chat"}, name
        assert bool(opts.get("trl")) == ("pack_tokens" in opts), name


def test_the_defaults_are_what_the_registry_says(bench) -> None:
    for key in ("deepseek", "glm4"):
        name = f"{key}-qlora-course" if key == "deepseek" else f"{key}-course-24g"
        assert bench.CONFIGS[name][2] == registry.get(key).config
    assert bench.CONFIGS["qwen2-course-24g"][2] == registry.get("qwen2").config


@pytest.mark.parametrize("key", ["qwen2", "deepseek-qlora"])
def test_same_data_pairs_differ_only_in_the_path(bench, key: str) -> None:
    """Same sequences a step, learning rate, rank, dropout and optimizer: losses must agree."""
    seed, course = bench.CONFIGS[f"{key}-seed-same"][2], bench.CONFIGS[f"{key}-course-same"][2]
    steps = [c.per_device_train_batch_size * c.gradient_accumulation_steps for c in (seed, course)]
    assert steps[0] == steps[1]
    for field in ("learning_rate", "lora_r", "lora_alpha", "lora_dropout", "optim", "seed", "warmup_steps"):
        assert getattr(seed, field) == getattr(course, field), field
    assert not seed.packing and course.packing


def test_same_data_check_reports_the_largest_step_gap(bench) -> None:
    check = bench.same_data_check("a", "b", [2.0, 1.5, 1.0], [2.0, 1.4, 1.05])
    assert check["max_abs_diff"] == pytest.approx(0.1) and check["mean_abs_diff"] == pytest.approx(0.05)


def test_list_runs_without_a_gpu() -> None:
    out = subprocess.run([sys.executable, str(PATH), "--list"], capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    assert "qwen2-course" in out and "qwen2-trl-8192" in out
