"""Tests for selfllm_utils.inference, on a tiny model trained once per session (conftest.trained).

What a learner checks by hand after training, checked here: the adapter gives the trained answer
and stops there, streaming gives the same text, the saved adapter reloads in a fresh process,
and merging changes nothing but the packaging.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from selfllm_utils import inference, models, registry

MAX_NEW_TOKENS = 64  # the trained answer is about ten tokens: stopping early is the point
MERGE_ATOL = 1e-5
# One record, 30 smoke steps: the loss fell from 8.77 to 0.39 (4.4% of the start) with
# transformers 5.24 on 2 CPU cores, 2026-12-01; a trainer learning ten times slower stays above 10%.
FINAL_LOSS_SHARE = 0.1
FRESH_PROCESS_TIMEOUT_S = 300
FRESH_PROCESS = """
import json, sys
from selfllm_utils import inference, registry
tutorial = registry.get(sys.argv[1])
model, tokenizer = inference.load_adapter(tutorial, sys.argv[2], smoke_mode=True)
reply = inference.chat(model, tokenizer, sys.argv[3], tutorial.family, max_new_tokens=int(sys.argv[4]))
print(json.dumps({"text": reply.text, "token_ids": reply.token_ids, "stopped": reply.stopped}))
"""


def _logits(model, tokenizer, text: str) -> torch.Tensor:
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits[0]


def test_training_lowered_the_loss(trained) -> None:
    """Learned, not just moved: the last loss is under a tenth of the first, and every logged
    loss of the second half is below every one of the first (the answer itself: next test)."""
    losses = trained.losses
    assert len(losses) == registry.smoke_config(trained.tutorial).max_steps  # logged every step
    assert losses[-1] < FINAL_LOSS_SHARE * losses[0]
    half = len(losses) // 2
    assert max(losses[half:]) < min(losses[:half])


def test_adapter_gives_the_trained_answer_and_stops(trained) -> None:
    reply = inference.chat(trained.model, trained.tokenizer, trained.question, trained.tutorial.family,
                           max_new_tokens=MAX_NEW_TOKENS)
    assert reply.text == trained.answer
    assert reply.stopped and len(reply.token_ids) < MAX_NEW_TOKENS
    assert reply.token_ids[-1] in models.stop_ids(trained.tokenizer, trained.tutorial.family)
    with trained.model.disable_adapter():  # the base model does not know the answer
        base = inference.chat(trained.model, trained.tokenizer, trained.question,
                              trained.tutorial.family, max_new_tokens=MAX_NEW_TOKENS)
    assert base.text != trained.answer


def test_stream_gives_the_same_text(trained) -> None:
    args = (trained.model, trained.tokenizer, trained.question, trained.tutorial.family)
    pieces = list(inference.stream_chat(*args, max_new_tokens=MAX_NEW_TOKENS))
    assert len(pieces) > 1  # streamed, not one block at the end
    assert "".join(pieces).strip() == inference.chat(*args, max_new_tokens=MAX_NEW_TOKENS).text


def test_save_adapter_writes_everything_needed(trained) -> None:
    folder = trained.adapter
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "generation_config.json"):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == set(trained.tutorial.lora_targets)
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == models.stop_ids(trained.tokenizer, trained.tutorial.family)


def test_fresh_process_reloads_the_same_answer(trained) -> None:
    env = {**os.environ, "SELFLLM_SMOKE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, trained.tutorial.key, str(trained.adapter),
         trained.question, str(MAX_NEW_TOKENS)],
        capture_output=True, text=True, env=env, timeout=FRESH_PROCESS_TIMEOUT_S, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    reply = json.loads(result.stdout.strip().splitlines()[-1])
    assert reply == {"text": trained.answer, "token_ids": reply["token_ids"], "stopped": True}
    expected = inference.chat(trained.model, trained.tokenizer, trained.question,
                              trained.tutorial.family, max_new_tokens=MAX_NEW_TOKENS)
    assert reply["token_ids"] == expected.token_ids


def test_merge_keeps_the_logits(trained) -> None:
    tutorial = trained.tutorial
    model, tokenizer = inference.load_adapter(tutorial, trained.adapter, smoke_mode=True)
    base, _ = models.load_model(tutorial, smoke_mode=True)
    text = trained.question + trained.answer
    with_adapter = _logits(model, tokenizer, text)
    merged = inference.merge(model)
    assert not hasattr(merged, "peft_config")  # a plain transformers model
    torch.testing.assert_close(_logits(merged, tokenizer, text), with_adapter, rtol=0, atol=MERGE_ATOL)
    assert (_logits(base, tokenizer, text) - with_adapter).abs().max() > 100 * MERGE_ATOL  # adapter mattered


def test_merge_refuses_4bit(trained) -> None:
    model, _ = inference.load_adapter(trained.tutorial, trained.adapter, quant="4bit", smoke_mode=True)
    with pytest.raises(ValueError, match="refusing to merge into 4-bit weights"):
        inference.merge(model)


def test_merge_and_save_loads_as_a_plain_model(trained, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = inference.merge_and_save(trained.tutorial, trained.adapter, tmp_path / "merged", smoke_mode=True)
    assert not (out / "adapter_config.json").exists()
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    family = trained.tutorial.family
    assert GenerationConfig.from_pretrained(out).eos_token_id == models.stop_ids(tokenizer, family)
    reply = inference.chat(model, tokenizer, trained.question, family, max_new_tokens=MAX_NEW_TOKENS)
    assert reply.text == trained.answer and reply.stopped


# --- the real small model (SmolLM2 stands in for Qwen2) --------------------------------------

REAL_KEY = "qwen2"
FRANCE_QUESTION = "What is the capital of France?"
FRANCE_ANSWER = "The capital of France is Paris."  # SmolLM2-135M-Instruct, greedy (COURSE.md)


def test_real_model_stops_at_end_of_turn(smoke_models) -> None:
    """A real chat model ends its turn with <|im_end|>, which the registry's stop ids catch."""
    family = registry.get(REAL_KEY).family
    model, tokenizer = smoke_models.model(REAL_KEY)
    reply = inference.chat(model, tokenizer, FRANCE_QUESTION, family, max_new_tokens=MAX_NEW_TOKENS)
    assert reply.text == FRANCE_ANSWER
    assert reply.stopped
    assert tokenizer.convert_ids_to_tokens(reply.token_ids[-1]) == family.end_of_turn


@pytest.mark.slow
def test_real_model_learns_an_identity(smoke_models, identity_records, tmp_path) -> None:
    """The smoke recipe on SmolLM2 (about 15 steps of 4-5 s on 2 cores) teaches a Chinese answer."""
    import datasets

    from selfllm_utils import data, formatting, training

    tutorial = registry.get(REAL_KEY)
    record = identity_records[0]
    cfg = registry.smoke_config(tutorial)
    model, tokenizer = smoke_models.model(REAL_KEY)
    ds = datasets.Dataset.from_list([record], features=data.FEATURES)
    train_ds, _ = formatting.build_dataset(ds, tokenizer, tutorial, system="")
    peft_model = models.add_lora(model, tutorial, cfg)
    before = inference.chat(peft_model, tokenizer, record["instruction"], tutorial.family,
                            max_new_tokens=MAX_NEW_TOKENS)
    trainer = training.make_trainer(peft_model, tokenizer, train_ds, cfg, tmp_path, disable_tqdm=True)
    trainer.train()
    peft_model.eval()
    after = inference.chat(peft_model, tokenizer, record["instruction"], tutorial.family,
                           max_new_tokens=4 * MAX_NEW_TOKENS)
    assert before.text != record["output"]
    assert trainer.loss_curve.losses[-1] < trainer.loss_curve.losses[0] / 10
    assert after.text == record["output"] and after.stopped


def test_an_adapter_folder_without_weights_is_one_error_and_no_hub_is_asked(tmp_path, monkeypatch) -> None:
    """peft, given a folder without weights, would ask the Hub for a repository of that name."""
    import huggingface_hub
    import peft
    from peft import get_peft_model

    tutorial = registry.get("deepseek")
    model, _ = models.load_model(tutorial, smoke_mode=True)
    get_peft_model(model, models.lora_config(tutorial, registry.smoke_config(tutorial))).save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()

    def no_network(*args, **kwargs):
        raise AssertionError("asked the Hub")

    for name in ("hf_hub_download", "file_exists"):
        monkeypatch.setattr(huggingface_hub, name, no_network)
        monkeypatch.setattr(peft.utils.save_and_load, name, no_network, raising=False)
    monkeypatch.setattr(models, "load_model", no_network)  # checked before any model loads
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        inference.load_adapter(tutorial, tmp_path, smoke_mode=True)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        inference.load_adapter(tutorial, tmp_path / "adapter_config.json", smoke_mode=True)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        inference.load_adapter(tutorial, tmp_path.parent, smoke_mode=True)


def test_a_prompt_past_the_context_is_an_error(monkeypatch) -> None:
    tutorial = registry.get("deepseek")
    model, tokenizer = models.load_model(tutorial, smoke_mode=True)
    monkeypatch.setattr(model.config, "max_position_embeddings", 64)
    assert inference.chat(model, tokenizer, "hi", tutorial.family, max_new_tokens=4).token_ids
    with pytest.raises(ValueError, match=r"past the model's context of 64 tokens"):
        inference.chat(model, tokenizer, "hi " * 80, tutorial.family, max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens=60"):
        inference.chat(model, tokenizer, "hi", tutorial.family, max_new_tokens=60)
    with pytest.raises(ValueError, match="message 1"):
        inference.chat(model, tokenizer, [{"role": "user", "content": "hi"}, {"role": "asistant", "content": "x"}],
                       tutorial.family)
