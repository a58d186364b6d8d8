"""GLM-4 (tutorial 02): how its turns end, and that a tuned model keeps its three stop tokens.

GLM-4's template writes no end token after an answer: the model ends a turn by writing the next
role token `<|user|>`, a tool call with `<|observation|>`, or `<|endoftext|>`. These tests check
that training teaches those tokens where they belong, that a trained tiny GLM stops on them, and
that the adapter and merged folders carry all three stop ids, so `generate` and a server stop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import datasets
import nbformat
import pytest

from selfllm_utils import data, formatting, inference, models, registry, training

T = registry.get("glm4")
NOTEBOOK = registry.repo_root() / "notebooks" / T.notebook
SEED_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")  # remote-code names
TRAIN_REPEATS = 8  # one multi-turn record, repeated: one batch of the smoke config

# One conversation with an earlier turn: the first answer ends with <|user|>, the last with
# <|endoftext|> (the family's end_of_turn, appended because the template writes none).
RECORD = {"instruction": "那你可愿意入宫？", "input": "", "output": "臣女但凭天意。",
          "system": None, "history": [["你是谁？", "家父是大理寺少卿甄远道。"]]}


def _messages() -> list[dict[str, str]]:
    return data.to_messages(RECORD, system=T.system_prompt)


def _target_runs(labels: list[int]) -> list[list[int]]:
    """The label ids of each trained stretch (runs between masked prompt tokens)."""
    runs: list[list[int]] = []
    previous = formatting.IGNORE
    for label in labels:
        if label != formatting.IGNORE:
            if previous == formatting.IGNORE:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return runs


def test_multi_turn_labels_end_mid_answers_with_user_and_last_with_endoftext(smoke_models) -> None:
    tokenizer = smoke_models.tokenizer(T.key)
    ids = dict(zip(T.family.stop_tokens, models.stop_ids(tokenizer, T.family)))
    features = formatting.tokenize_messages(_messages(), tokenizer, T.family)
    runs = _target_runs(features["labels"])

    assert len(runs) == 2  # one trained stretch per assistant answer
    assert runs[0][-1] == ids["<|user|>"]
    assert runs[1][-1] == ids["<|endoftext|>"] == features["input_ids"][-1]
    assert tokenizer.decode(runs[0]) == "\n家父是大理寺少卿甄远道。<|user|>"
    assert tokenizer.decode(runs[1]) == "\n臣女但凭天意。<|endoftext|>"
    # everything else (system, both questions, role tokens) is masked context
    assert sum(map(len, runs)) == len(features["labels"]) - features["labels"].count(formatting.IGNORE)


def test_single_turn_matches_the_seeds_hand_written_format(smoke_models) -> None:
    tokenizer = smoke_models.tokenizer(T.key)
    record = {**RECORD, "history": []}
    pieces = formatting.split_turns(tokenizer, data.to_messages(record, system=T.system_prompt),
                                    T.family)
    seed = (f"[gMASK]<sop><|system|>\n{T.system_prompt}<|user|>\n{record['instruction']}"
            f"<|assistant|>\n{record['output']}{tokenizer.pad_token}")
    assert "".join(text for text, _ in pieces) == seed


def test_registry_targets_are_native_glm_modules(smoke_models) -> None:
    import torch

    model, _ = smoke_models.model(T.key)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(T.lora_targets) <= names
    assert not set(SEED_TARGETS) & names


@dataclass
class TrainedGlm:
    model: object  # PeftModel in eval mode
    tokenizer: object
    stop: dict[str, int]
    adapter: Path
    merged: Path
    losses: list[float]


@pytest.fixture(scope="module")
def trained_glm(tmp_path_factory: pytest.TempPathFactory, smoke_models) -> TrainedGlm:
    """The smoke recipe on one multi-turn record; the adapter saved and merged into a folder.

    One thread: a 64-wide model gains nothing from more, and on a busy shared CPU (CI runners,
    pytest-xdist) OpenMP threads that wait on each other made this fixture 20x slower.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_glm(tmp_path_factory, smoke_models)
    finally:
        torch.set_num_threads(threads)


def _train_glm(tmp_path_factory: pytest.TempPathFactory, smoke_models) -> TrainedGlm:
    model, tokenizer = smoke_models.model(T.key)
    ds = datasets.Dataset.from_list([RECORD] * TRAIN_REPEATS, features=data.FEATURES)
    train_ds, _ = formatting.build_dataset(ds, tokenizer, T)
    cfg = registry.smoke_config(T)
    peft_model = models.add_lora(model, T, cfg)
    out = tmp_path_factory.mktemp("glm4")
    trainer = training.make_trainer(peft_model, tokenizer, train_ds, cfg, out / "run",
                                    disable_tqdm=True)
    trainer.train()
    peft_model.eval()
    adapter = inference.save_adapter(peft_model, tokenizer, out / "adapter")
    merged = inference.merge_and_save(T, adapter, out / "merged", smoke_mode=True)
    stop = dict(zip(T.family.stop_tokens, models.stop_ids(tokenizer, T.family)))
    return TrainedGlm(peft_model, tokenizer, stop, adapter, merged, trainer.loss_curve.losses)


@pytest.mark.parametrize("folder", ["adapter", "merged"])
def test_saved_generation_config_carries_the_three_stop_ids(trained_glm: TrainedGlm, folder: str) -> None:
    config = json.loads((getattr(trained_glm, folder) / "generation_config.json").read_text())
    # in smoke mode: the tiny tokenizer's ids of <|endoftext|>, <|user|>, <|observation|>
    assert sorted(config["eos_token_id"]) == sorted(trained_glm.stop.values())
    assert len(set(config["eos_token_id"])) == len(T.family.stop_tokens) == 3


def test_trained_glm_ends_each_turn_on_a_stop_id(trained_glm: TrainedGlm) -> None:
    model, tokenizer, stop = trained_glm.model, trained_glm.tokenizer, trained_glm.stop
    assert trained_glm.losses[-1] < trained_glm.losses[0]
    messages = _messages()
    last = inference.chat(model, tokenizer, messages[1:-1], T.family, system=T.system_prompt,
                          max_new_tokens=40)
    assert last.stopped and last.token_ids[-1] == stop["<|endoftext|>"]
    assert last.text == RECORD["output"]
    # asked only the first question, it answers and hands the turn back by writing <|user|>
    first = inference.chat(model, tokenizer, messages[1:2], T.family, system=T.system_prompt,
                           max_new_tokens=40)
    assert first.stopped and first.token_ids[-1] == stop["<|user|>"]


def test_merged_folder_stops_under_plain_generate(trained_glm: TrainedGlm) -> None:
    """No eos_token_id passed: generate reads the three stop ids from generation_config.json."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(trained_glm.merged)
    model = AutoModelForCausalLM.from_pretrained(trained_glm.merged).eval()
    inputs = tokenizer.apply_chat_template(_messages()[:-1], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert new[-1] in trained_glm.stop.values()
    assert tokenizer.decode(new, skip_special_tokens=True).strip() == RECORD["output"]


def test_remote_code_checkpoint_is_refused_with_the_hf_name(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "chatglm"}))
    with pytest.raises(RuntimeError, match="glm-4-9b-chat-hf"):
        models.check_model_dir(tmp_path)


def test_notebook_code_never_trusts_remote_code() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")
    assert code and "trust_remote_code" not in code


@pytest.mark.gpu
def test_liger_loss_for_glm_matches_the_plain_loss() -> None:
    """Liger's fused loss, patched onto native GLM-4, gives the loss and gradients of the plain one."""
    import torch
    from transformers import AutoModelForCausalLM

    from selfllm_utils import smoke, training

    model = AutoModelForCausalLM.from_pretrained(smoke.model_dir(T), dtype=torch.bfloat16).cuda()
    ids = torch.randint(10, model.config.vocab_size, (1, 64), device="cuda")
    labels = ids.clone()
    labels[0, :20] = -100
    model.train()
    plain = model(input_ids=ids, labels=labels).loss
    plain.backward()
    plain_grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    assert training.liger_loss_for_glm(model)
    model.train()  # Liger skips the logits only in training
    fused = model(input_ids=ids, labels=labels)
    fused.loss.backward()
    assert fused.logits is None  # no [tokens x vocab] tensor was built
    torch.testing.assert_close(fused.loss.float(), plain.float(), rtol=0.01, atol=0.01)
    torch.testing.assert_close(model.lm_head.weight.grad.float(), plain_grad.float(), rtol=0.05, atol=1e-3)
