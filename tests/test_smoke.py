"""Tests for selfllm_utils.smoke: stand-in folders load like real checkpoints and are built once."""

from __future__ import annotations

import pytest

from selfllm_utils import models, registry, smoke

KEYS = list(registry.TUTORIALS)
TINY_MAX_PARAMS = 1_000_000  # "a few hundred thousand parameters"
SMOLLM2_PARAMS = 134_515_008  # SmolLM2-135M-Instruct (COURSE.md: 134.5 M)


@pytest.mark.parametrize("key", KEYS)
def test_stand_in_loads_with_auto_classes(key: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tutorial = registry.get(key)
    folder = smoke.model_dir(tutorial)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    n_params = sum(p.numel() for p in model.parameters())
    if tutorial.smoke.kind == "tiny":
        assert model.config.model_type == tutorial.smoke.model_type
        assert n_params < TINY_MAX_PARAMS
    else:
        assert n_params == SMOLLM2_PARAMS
    assert model.get_input_embeddings().num_embeddings >= len(tokenizer)
    for token in tutorial.family.special_tokens:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert tokenizer.convert_ids_to_tokens(ids) == [token], f"{token} is not one token"
    assert tokenizer.chat_template == tutorial.family.chat_template
    generation = GenerationConfig.from_pretrained(folder)
    assert generation.eos_token_id == models.stop_ids(tokenizer, tutorial.family)
    assert generation.pad_token_id == tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids(
        tutorial.family.pad_token)


def test_cached_folder_is_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    tutorial = registry.get("deepseek")
    folder = smoke.model_dir(tutorial)
    before = (folder / "config.json").stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("model_dir rebuilt a cached stand-in")

    monkeypatch.setattr(smoke, "build_tiny", no_rebuild)
    monkeypatch.setattr(smoke, "build_smollm2", no_rebuild)
    assert smoke.model_dir(tutorial) == folder
    assert (folder / "config.json").stat().st_mtime_ns == before


def test_fresh_home_builds_once(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In an empty cache the first call builds the folder (under SELFLLM_HOME), the second reuses it."""
    monkeypatch.setenv("SELFLLM_HOME", str(tmp_path))
    calls: list[str] = []
    real = smoke.build_tiny

    def counting(tutorial, folder):
        calls.append(tutorial.key)
        real(tutorial, folder)

    monkeypatch.setattr(smoke, "build_tiny", counting)
    tutorial = registry.get("qwen1.5")
    folder = smoke.model_dir(tutorial)
    assert folder.parent == tmp_path / "smoke" and (folder / "config.json").exists()
    mtime = (folder / "config.json").stat().st_mtime_ns
    assert smoke.model_dir(tutorial) == folder
    assert calls == ["qwen1.5"]
    assert (folder / "config.json").stat().st_mtime_ns == mtime
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # temp dir removed


def test_tokenizer_round_trips_course_text() -> None:
    """Byte-level BPE: any text, Chinese included, encodes and decodes unchanged."""
    tokenizer = smoke.build_tokenizer(registry.FAMILIES["qwen1.5"], vocab_size=500)
    text = f"{registry.HUANHUAN_SYSTEM} 臣妾做不到啊！ emoji 🙂 tab\t<|im_end|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
