"""Exercises: every worked solution passes its checker, every untouched placeholder does not.

The notebooks' exercise cells are executed here outside the notebook (nbval runs them too, but
only fails on errors): the learner cell as committed, then its checker cell, which must answer
False without raising. Context a cell expects from its notebook (T, a tokenizer) is rebuilt
from the smoke stand-ins.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import runpy
from pathlib import Path

import pytest

from selfllm_utils import data, distributed, exercises, memory, models, registry, smoke

ROOT = registry.repo_root()
SOLUTIONS = sorted((ROOT / "solutions").glob("*.py"))
NOTEBOOK_KEYS = {"01": "deepseek", "02": "glm4", "03": "qwen2", "04": "qwen1.5"}
CHECKERS = sorted(name for name, _ in inspect.getmembers(exercises, inspect.isfunction)
                  if name.startswith("check_"))


def _notebook(solution: Path) -> Path:
    return ROOT / "notebooks" / (solution.stem.rsplit("_", 1)[0] + ".ipynb")


def _cells(notebook: Path) -> dict[str, str]:
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    return {c.get("id", ""): "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            for c in cells}


def _context(number: str) -> dict:
    """What a notebook's exercise cells find defined by the time they run (smoke stand-ins)."""
    tutorial = registry.get(NOTEBOOK_KEYS[number])
    tokenizer = models.load_tokenizer(smoke.model_dir(tutorial), tutorial.family)
    return {"T": tutorial, "tokenizer": tokenizer, "registry": registry, "data": data,
            "memory": memory, "distributed": distributed, "exercises": exercises,
            "dataclasses": dataclasses, "NAME": "不要葱姜蒜"}  # NAME: notebook 03's identity


def test_there_are_solutions() -> None:
    assert len(SOLUTIONS) >= 6


@pytest.mark.parametrize("solution", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_solution_passes_its_checker(solution: Path, capsys: pytest.CaptureFixture) -> None:
    result = runpy.run_path(str(solution))["RESULT"]
    out = capsys.readouterr().out
    assert result is True, out
    assert exercises.OK in out


@pytest.mark.parametrize("solution", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_placeholder_is_not_yet(solution: Path, capsys: pytest.CaptureFixture) -> None:
    """The committed learner cell, run as is, makes its checker say "not yet" (and not raise)."""
    notebook = _notebook(solution)
    assert notebook.is_file(), f"{solution.name} names no notebook"
    cells = _cells(notebook)
    cell_id = f"ex-{solution.stem[:2]}-{solution.stem.rsplit('_', 1)[1]}"
    assert cell_id in cells and f"{cell_id}-check" in cells, f"{notebook.name} lacks {cell_id}"
    assert "✏️" in cells[cell_id]  # the placeholder is marked
    assert f"solutions/{notebook.stem}_" in cells[f"ex-{solution.stem[:2]}-intro"]
    namespace = _context(solution.stem[:2])
    exec(cells[cell_id], namespace)  # noqa: S102 - the course's own notebook cell
    check = cells[f"{cell_id}-check"].strip().rstrip(";")
    result = eval(check, namespace)  # noqa: S307 - one checker call, as in the notebook
    assert result is False
    assert exercises.NOT_YET in capsys.readouterr().out


@pytest.mark.parametrize("checker", CHECKERS)
def test_every_checker_has_a_solution(checker: str) -> None:
    assert any(checker in path.read_text(encoding="utf-8") for path in SOLUTIONS)


@pytest.mark.parametrize("value", [None, ..., "", 3.5, ["x"], {"a": object()}])
def test_checkers_never_raise_on_odd_answers(value, capsys: pytest.CaptureFixture) -> None:
    """Whatever a learner types, a checker answers with a hint, not a stack trace."""
    glm = _context("02")
    qwen = registry.get("qwen1.5")
    assert exercises.check_rejected_record(value, value) is False
    assert exercises.check_lora_rank(registry.get("deepseek"), value, value) is False
    assert exercises.check_glm4_mid_stop(glm["tokenizer"], glm["T"].family, value) is False
    assert exercises.check_glm4_targets(glm["tokenizer"], glm["T"], value) is False
    assert exercises.check_zero3_row(qwen, value, value) is False
    assert exercises.check_zero3_save_key(value) is False
    assert exercises.check_plan_for_cards(qwen, value) is False


def _lora_truth(rank: int) -> int:
    return memory.lora_param_count(registry.get("deepseek"), rank)


COURSE_R = registry.get("deepseek").config.lora_r
# Answers a learner plausibly gives that are wrong: each must get "not yet".
WRONG_ANSWERS = {
    "qwen2-base-eos": lambda c: exercises.check_end_of_answer(c["tokenizer"], c["T"].family,
                                                              "<|endoftext|>"),
    "qwen2-chatml-start": lambda c: exercises.check_end_of_answer(c["tokenizer"], c["T"].family,
                                                                  "<|im_start|>"),
    "glm4-end-of-text": lambda c: exercises.check_glm4_mid_stop(c["tokenizer"], c["T"].family,
                                                                "<|endoftext|>"),
    "glm4-observation": lambda c: exercises.check_glm4_mid_stop(c["tokenizer"], c["T"].family,
                                                                " <|observation|> "),
    "glm4-assistant": lambda c: exercises.check_glm4_mid_stop(c["tokenizer"], c["T"].family,
                                                              "<|assistant|>"),
    "lora-90%-low": lambda c: exercises.check_lora_rank(c["T"], 16, _lora_truth(16) * 0.1),
    "lora-90%-high": lambda c: exercises.check_lora_rank(c["T"], 16, _lora_truth(16) * 1.9),
    "lora-2%-off": lambda c: exercises.check_lora_rank(c["T"], 16, _lora_truth(16) * 1.02),
    "lora-unchanged": lambda c: exercises.check_lora_rank(c["T"], 16, _lora_truth(COURSE_R)),
    "lora-quadratic": lambda c: exercises.check_lora_rank(c["T"], 16, _lora_truth(COURSE_R) * 4),
    "record-wrong-field": lambda c: exercises.check_rejected_record(
        {"instruction": "你是谁？", "output": ""}, "instruction"),
    "record-accepted": lambda c: exercises.check_rejected_record(
        {"instruction": "你是谁？", "output": "甄嬛"}, "output"),
    "glm4-two-answers": lambda c: exercises.check_glm4_targets(c["tokenizer"], c["T"], {
        "instruction": "二", "output": "答二", "history": [["一", "答一"]]}),
    "persona-old-name-kept": lambda c: exercises.check_new_persona(c["tokenizer"], c["T"], {
        "instruction": "你是谁？", "output": "我是小葱，也叫不要葱姜蒜。"}, "不要葱姜蒜", "小葱"),
    "zero3-wrong-fit": lambda c: exercises.check_zero3_row(
        c["T"], memory.estimate_memory(c["T"], zero_stage=3, num_gpus=4),
        not memory.estimate_memory(c["T"], zero_stage=3, num_gpus=4).total_gib <= 24),
    "zero3-two-gpus": lambda c: exercises.check_zero3_row(
        c["T"], memory.estimate_memory(c["T"], zero_stage=3, num_gpus=2), True),
    "zero3-other-key": lambda c: exercises.check_zero3_save_key("stage3_prefetch_bucket_size"),
    "zero3-plan-replicated": lambda c: exercises.check_plan_for_cards(c["T"], "ddp"),
    "zero3-plan-offload": lambda c: exercises.check_plan_for_cards(c["T"], "zero3-offload"),
    "zero3-plan-on-big-cards": lambda c: exercises.check_plan_for_cards(c["T"], "zero3", gib=141, gpus=2),
}
WRONG_CONTEXT = {"qwen2": "03", "glm4": "02", "lora": "01", "record": "01", "persona": "03",
                 "zero3": "04"}


@pytest.mark.parametrize("case", WRONG_ANSWERS)
def test_plausible_wrong_answer_is_not_yet(case: str, capsys: pytest.CaptureFixture) -> None:
    context = _context(WRONG_CONTEXT[case.split("-")[0]])
    assert WRONG_ANSWERS[case](context) is False
    assert exercises.NOT_YET in capsys.readouterr().out


def test_checkers_read_the_truth_from_the_registry(capsys: pytest.CaptureFixture) -> None:
    """The right answers, typed as a learner would, are the registry's facts."""
    qwen, glm = _context("03"), _context("02")
    assert exercises.check_end_of_answer(qwen["tokenizer"], qwen["T"].family,
                                         qwen["T"].family.end_of_turn)
    assert exercises.check_glm4_mid_stop(glm["tokenizer"], glm["T"].family, " <|user|>\n")
    assert exercises.check_lora_rank(registry.get("deepseek"), 16, _lora_truth(COURSE_R) * 2)
