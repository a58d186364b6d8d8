"""Tests for selfllm_utils.registry: every entry resolves, and its facts agree with the references."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from selfllm_utils import registry

KEYS = list(registry.TUTORIALS)
EXPECTED_KEYS = {"deepseek", "glm4", "qwen2", "qwen1.5"}
# Parameter counts of the full-size models, in billions, from their model cards.
EXPECTED_PARAMS_B = {"deepseek": 6.9, "glm4": 9.4, "qwen2": 7.6, "qwen1.5": 14.2}
PARAMS_RTOL = 0.02
# What a smoke config may shrink: sizes, steps, logging, and the optimiser (paged optimisers
# need CUDA). Everything else (packing, checkpointing, LoRA alpha and dropout, seed) is the
# recipe the learner runs on a GPU and must stay the same.
# batch_tokens and gradient_checkpointing: what memory.token_budget decides on a CPU.
SMOKE_SHRINKS = {"lora_r", "learning_rate", "max_steps", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "max_length", "logging_steps", "save_steps", "optim",
                 "batch_tokens", "gradient_checkpointing"}


def test_tutorial_keys() -> None:
    assert set(KEYS) == EXPECTED_KEYS


@pytest.mark.parametrize("key", KEYS)
def test_get_resolves(key: str) -> None:
    tutorial = registry.get(key)
    assert tutorial.key == key
    assert tutorial.family.name in registry.FAMILIES
    assert tutorial.notebook.startswith(f"{tutorial.number:02d}-") and tutorial.notebook.endswith(".ipynb")


@pytest.mark.parametrize("key", KEYS)
def test_script_field_names_what_the_notebook_launches(key: str) -> None:
    """`Tutorial.script` says which notebook launches a training script (cli.fit_report reads it)."""
    import importlib.util

    tutorial = registry.get(key)
    source = (registry.repo_root() / "notebooks" / tutorial.notebook).read_text(encoding="utf-8")
    launched = {s for s in ("selfllm_utils.train_zero3",) if f"-m {s}" in source}
    assert launched == ({tutorial.script} if tutorial.script else set())
    assert tutorial.script is None or importlib.util.find_spec(tutorial.script) is not None


def test_numbers_follow_the_course_order() -> None:
    assert [registry.get(k).number for k in KEYS] == list(range(1, len(KEYS) + 1))


def test_unknown_key_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown tutorial 'llama'.*deepseek, glm4, qwen2, qwen1\.5"):
        registry.get("llama")


@pytest.mark.parametrize("name", list(registry.FAMILIES))
def test_stop_tokens_include_end_of_turn(name: str) -> None:
    family = registry.FAMILIES[name]
    assert family.end_of_turn in family.stop_tokens
    assert set(family.stop_tokens) <= set(family.special_tokens)
    assert family.eos_token in family.special_tokens and family.pad_token in family.special_tokens


def test_glm4_stops_on_all_three_ids() -> None:
    """GLM-4 keeps talking to itself unless <|user|> and <|observation|> also stop it (GLM-4#398)."""
    assert set(registry.FAMILIES["glm4"].stop_tokens) == {"<|endoftext|>", "<|user|>", "<|observation|>"}


def _meta_model(config_dict: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):  # shapes only: no memory, milliseconds
        return AutoModelForCausalLM.from_config(config)


def _module_names(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}


@pytest.mark.parametrize("key", KEYS)
def test_lora_targets_exist_in_smoke_model(key: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from selfllm_utils import smoke

    config = AutoConfig.from_pretrained(smoke.model_dir(registry.get(key)))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    missing = set(registry.get(key).lora_targets) - _module_names(model)
    assert not missing, f"{key}: LoRA targets not in the smoke model: {missing}"


@pytest.mark.parametrize("key", KEYS)
def test_reference_config_size(key: str) -> None:
    tutorial = registry.get(key)
    model = _meta_model(tutorial.reference_config)
    params_b = sum(p.numel() for p in model.parameters()) / 1e9
    assert params_b == pytest.approx(EXPECTED_PARAMS_B[key], rel=PARAMS_RTOL)
    assert params_b == pytest.approx(tutorial.params_b, rel=0.005)
    missing = set(tutorial.lora_targets) - _module_names(model)
    assert not missing, f"{key}: LoRA targets not in the full-size model: {missing}"


@pytest.mark.parametrize("key", KEYS)
def test_template_equals_reference(key: str, reference: dict) -> None:
    """The template files are copies of the official templates, byte for byte."""
    ref = reference["models"][key]
    field = ref["rendered_example"]["rendered_from"]
    assert registry.get(key).family.chat_template == ref[field]


@pytest.mark.parametrize("key", KEYS)
def test_smoke_config_is_a_replace_of_the_course_config(key: str) -> None:
    tutorial = registry.get(key)
    small = registry.smoke_config(tutorial)
    assert isinstance(small, registry.TrainConfig)
    changed = {f.name for f in dataclasses.fields(small)
               if getattr(small, f.name) != getattr(tutorial.config, f.name)}
    assert changed <= SMOKE_SHRINKS, f"smoke config changes the recipe: {changed - SMOKE_SHRINKS}"
    assert 0 < small.max_steps <= 50  # minutes on a CPU, not hours


# --- smoke_mode(): the one reader of SELFLLM_SMOKE ------------------------------------------


@pytest.fixture
def fresh_announcement(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_announced", False)


@pytest.mark.parametrize(("value", "expected"), [
    ("1", True), ("0", False), (" 1 ", True),
    # what people type for a switch (issue 15: `SELFLLM_SMOKE=true` was a traceback)
    ("true", True), ("True", True), ("yes", True), ("on", True),
    ("false", False), ("FALSE", False), ("no", False), ("off", False),
])
def test_smoke_mode_env(value: str, expected: bool, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str], fresh_announcement: None) -> None:
    monkeypatch.setenv("SELFLLM_SMOKE", value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: not expected)  # env wins over hardware
    assert registry.smoke_mode() is expected
    captured = capsys.readouterr()
    assert captured.out == captured.err == ""  # a forced choice is not announced


@pytest.mark.parametrize("value", ["2", "smoke", "y es"])
def test_smoke_mode_invalid(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SELFLLM_SMOKE", value)
    expected = rf"SELFLLM_SMOKE must be 1 \(smoke models\) or 0 \(real models\), got '{value}'"
    with pytest.raises(ValueError, match=expected):
        registry.smoke_mode()


def test_smoke_mode_unset_without_cuda_announces_once(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        fresh_announcement: None) -> None:
    monkeypatch.delenv("SELFLLM_SMOKE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert registry.smoke_mode() is True
    assert registry.smoke_mode() is True
    captured = capsys.readouterr()
    assert captured.out == ""  # stdout may be `selfllm doctor --json`: the notice goes to stderr
    lines = captured.err.splitlines()
    assert len(lines) == 1 and "smoke mode" in lines[0] and "SELFLLM_SMOKE=0" in lines[0]


def test_smoke_mode_unset_with_cuda(monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str], fresh_announcement: None) -> None:
    monkeypatch.delenv("SELFLLM_SMOKE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert registry.smoke_mode() is False
    assert capsys.readouterr().out == ""


def test_home_honours_env(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "course-cache"
    monkeypatch.setenv("SELFLLM_HOME", str(target))
    assert registry.home() == target
    assert target.is_dir()  # created on first use


def test_repo_root_holds_the_course() -> None:
    root = registry.repo_root()
    assert (root / "selfllm_utils" / "registry.py").exists() and (root / "dataset").is_dir()


@pytest.mark.parametrize(("field", "value"), [
    ("per_device_train_batch_size", 0), ("learning_rate", -1e-4), ("learning_rate", 0.0),
    ("gradient_accumulation_steps", 0), ("batch_tokens", 0), ("lora_r", 0), ("lora_dropout", 1.0),
    ("max_length", 1), ("num_train_epochs", 0)])
def test_train_config_refuses_bad_values_on_creation(field: str, value) -> None:
    """A typo fails where it is made, naming the field, not as a ZeroDivisionError mid-run."""
    with pytest.raises(ValueError, match=rf"TrainConfig: {field} must be"):
        registry.TrainConfig(**{field: value})
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(registry.COURSE, **{field: value})


def test_train_config_accepts_the_registry_and_max_steps_without_epochs() -> None:
    registry.TrainConfig(num_train_epochs=0, max_steps=10)
    for t in registry.TUTORIALS.values():
        assert t.config.packing and t.config.batch_tokens is None  # fitted to the card
        registry.smoke_config(t)
