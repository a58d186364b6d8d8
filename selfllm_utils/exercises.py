"""Checkers for the exercises at the end of each notebook: a tick, or a hint, never an exception.

A learner edits a marked placeholder in one cell and runs the next, which calls a `check_*`
function here. Each checker prints one verdict (✅ and what the answer shows, or "not yet" and a
hint that points at the lesson without giving the answer away) and returns a bool. A wrong or
half-typed answer must never raise: an exception reads as "the course is broken", and CI runs
the notebooks with the placeholders untouched. Worked solutions live in `solutions/`, one file
per exercise, and tests/test_exercises.py runs each of them against its checker.

This module sits above the package's reading order (tests/test_layering.py): it may import any
module, and none imports it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from . import data, distributed, formatting, memory
from .registry import ChatFamily, Tutorial

OK, NOT_YET = "✅", "⏳ not yet:"


def _verdict(passed: bool, message: str) -> bool:
    """Print the one-line verdict a checker gives and return `passed` (cells end with `;`)."""
    print(f"{OK if passed else NOT_YET} {message}")
    return passed


def _validate(record: Any) -> tuple[dict | None, data.DataError | None, str | None]:
    """Run `data.load_records` on one record as a learner's file would hold it.

    Returns (the normalised record, None, None) when it passes, (None, the DataError, None) when
    the validator rejects it, or (None, None, why) when it cannot even be written as JSON.
    """
    try:
        text = json.dumps([record], ensure_ascii=False)
    except (TypeError, ValueError) as err:
        return None, None, f"the record cannot be written as JSON ({err})"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "my_records.json"
        path.write_text(text, encoding="utf-8")
        try:
            records, _ = data.load_records(path)
        except data.DataError as err:
            return None, err, None
    return records[0], None, None


def check_rejected_record(record: Any, field: str | None) -> bool:
    """Notebook 01, exercise 1: a record the validator rejects, and the field its message names.

    The lesson: a bad record fails at loading with file, record number and field, instead of as
    a tokenizer error an hour later. Reading the message (`field`) is half of the exercise.
    """
    _, err, unusable = _validate(record)
    if unusable:
        return _verdict(False, f"{unusable}; use strings, lists and dicts only")
    if err is None:
        return _verdict(False, "data.load_records accepted this record. Hint: what must every "
                               "record have, and what would teach the model to say nothing?")
    print(f"data.load_records says: {err}")
    if err.field is None:
        return _verdict(False, "rejected, but as a whole: keep it a record ({...}) and make one "
                               "field bad, so the message names it")
    if field is None or field is ...:
        return _verdict(False, "rejected, good. Now read the message: set MY_FIELD to the field "
                               "it names")
    if field != err.field:
        return _verdict(False, f"the message names another field than {field!r}; read it again")
    return _verdict(True, f"rejected: {err.file}, record {err.record}, field {err.field!r}. "
                          "In a real file the record number takes you straight to the line.")


def check_lora_rank(tutorial: Tutorial, rank: Any, predicted: Any) -> bool:
    """Notebook 01, exercise 2: predict the trainable LoRA parameters at another rank.

    The lesson: LoRA adds r * (in + out) parameters per adapted projection, so the count (and its
    optimizer memory) is linear in r, and tiny next to the frozen billions either way.
    """
    course_r = tutorial.config.lora_r
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        return _verdict(False, f"RANK should be a positive whole number, got {rank!r}")
    if rank == course_r:
        return _verdict(False, f"RANK is still the course's r={course_r}; pick another (4, 16, 64)")
    base = memory.lora_param_count(tutorial, course_r)
    truth = memory.lora_param_count(tutorial, rank)
    if not isinstance(predicted, (int, float)) or isinstance(predicted, bool):
        return _verdict(False, f"write your prediction in PREDICTED (a number). At r={course_r} "
                               f"the full-size {tutorial.key} has {base:,} LoRA parameters")
    if abs(predicted - truth) > 0.01 * truth:
        return _verdict(False, f"r={course_r} gives {base:,}. Each adapted projection gets an "
                               "r x in matrix A and an out x r matrix B: how does that grow with r?")
    linear, other = memory.base_param_counts(tutorial)
    return _verdict(True, f"r={rank}: {truth:,} trainable parameters ({truth / base:g} x r={course_r}), "
                          f"{truth / (linear + other):.2%} of the model; their weights, gradients and "
                          f"Adam moments take {truth * 16 / memory.GIB:.2f} GiB")


def _target_stops(tokenizer, family: ChatFamily, messages: list[dict[str, str]]) -> list[str]:
    """The stop token each trained answer of a conversation ends with (formatting.split_turns)."""
    targets = [text for text, is_target in formatting.split_turns(tokenizer, messages, family)
               if is_target]
    return [next((s for s in family.stop_tokens if t.endswith(s)), "") for t in targets]


def check_glm4_mid_stop(tokenizer, family: ChatFamily, answer: Any) -> bool:
    """Notebook 02, exercise 1: the token GLM-4 writes after an answer in the middle of a chat.

    The truth is read from the template, not typed here: a two-turn chat is cut into training
    pieces by `formatting.split_turns`, and the first answer's last token is the one asked for.
    """
    chat = [{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是甄嬛。"},
            {"role": "user", "content": "你可愿意入宫？"}, {"role": "assistant", "content": "但凭天意。"}]
    first, last = _target_stops(tokenizer, family, chat)
    if not isinstance(answer, str) or answer.strip() not in family.stop_tokens:
        return _verdict(False, f"answer with one of GLM-4's stop tokens {family.stop_tokens}, "
                               "spelled exactly; the table in 'GLM-4 在哪里结束一轮对话' helps")
    if answer.strip() == last:
        return _verdict(False, f"{last} ends the LAST answer (the end of the text); what comes "
                               "right after an answer when the user speaks again?")
    if answer.strip() != first:
        return _verdict(False, "that one announces a tool call; a mid-conversation answer is "
                               "followed by the next speaker")
    return _verdict(True, f"{first}: GLM-4 ends a turn by naming the next speaker, so {first} must "
                          "be a stop token, or the model writes the user's next line itself")


def check_glm4_targets(tokenizer, tutorial: Tutorial, record: Any) -> bool:
    """Notebook 02, exercise 2: a multi-turn record whose answers end in `<|user|>`, then the end.

    The lesson: every answer of a `history` is trained, mid-conversation answers end with the
    next role token and only the last one with the family's end of turn.
    """
    family = tutorial.family
    normal, err, unusable = _validate(record)
    if unusable or err is not None:
        return _verdict(False, f"the validator rejects it: {unusable or err}")
    messages = data.to_messages(normal, system=tutorial.system_prompt)
    try:
        stops = _target_stops(tokenizer, family, messages)
    except ValueError as problem:
        return _verdict(False, f"cannot cut it into turns: {problem}")
    print("trained answers end with:", stops)
    if len(stops) < 3:
        return _verdict(False, f"{len(stops)} trained answer(s); add [user, assistant] pairs to "
                               "'history' until the conversation has 3 answers")
    mid, end = stops[:-1], stops[-1]
    passed = end == family.end_of_turn and len(set(mid)) == 1 and mid[0] != end
    return _verdict(passed, f"{len(mid)} answers end with {mid[0]}, the last with {end}: the "
                            "model learns both ways a GLM-4 turn ends" if passed else
                    "the answers do not end as expected; look at the pieces split_turns gives")


def check_zero3_row(tutorial: Tutorial, estimate: Any, fits_24gb: Any) -> bool:
    """Notebook 04, exercise 1: a ZeRO-3 row for 4 GPUs, and whether it fits a 24 GB card.

    The lesson: ZeRO-3 divides the weights by the number of GPUs, which is what lets a 14B bf16
    model (28 GB of weights) train on cards smaller than the model.
    """
    if not isinstance(estimate, memory.MemoryEstimate):
        return _verdict(False, "set MY_ESTIMATE to the result of memory.estimate_memory(T, ...) "
                               "with zero_stage=3 and num_gpus=4")
    if not estimate.setting.startswith(f"{tutorial.key},"):
        return _verdict(False, f"that estimate is for another model; pass T ({tutorial.key})")
    if "ZeRO-3 on 4 GPU(s)" not in estimate.setting:
        return _verdict(False, f"this row is '{estimate.setting}'; ask for zero_stage=3, num_gpus=4")
    truth = estimate.total_gib <= 24
    if fits_24gb is not truth:
        return _verdict(False, "read the total of your row: is it at most 24 GiB? set FITS_24GB to "
                               "True or False")
    return _verdict(True, f"{estimate.total_gib:.1f} GiB a GPU, of which weights "
                          f"{estimate.weights_gib:.1f}: each GPU keeps a quarter of the weights plus "
                          "the one layer it is computing")


def check_zero3_save_key(key: Any) -> bool:
    """Notebook 04, exercise 2: the DeepSpeed key that makes a ZeRO-3 run save a whole adapter.

    Checked against `distributed.deepspeed_config(3)`, the config the course writes.
    """
    zero = distributed.deepspeed_config(3)["zero_optimization"]
    if not isinstance(key, str) or key not in zero:
        return _verdict(False, "copy a key of distributed.deepspeed_config(3)['zero_optimization'] "
                               "exactly; print it and look for the one about saving")
    if not key.endswith("_on_model_save"):
        return _verdict(False, f"{key} tunes how ZeRO-3 moves weights while training; which key "
                               "acts when the model is saved?")
    return _verdict(True, f"{key}: True gathers each sharded tensor before Trainer.save_model "
                          "writes it; without it the adapter holds size-0 tensors")


def check_plan_for_cards(tutorial: Tutorial, plan: Any, gib: float = 16, gpus: int = 8) -> bool:
    """Notebook 04, exercise 3: the plan the course picks for `gpus` cards of `gib` GiB.

    The lesson: replicate where a card holds the bf16 model and a step, split the weights
    (ZeRO-3) only where it does not, offload only where even the slices leave too little room.
    """
    truth = distributed.choose_plan(tutorial, tutorial.config, gpu_gib=gib, num_gpus=gpus)
    if plan not in distributed.PLANS:
        return _verdict(False, f"set MY_PLAN to one of {', '.join(distributed.PLANS)} "
                               "(the .name of what distributed.choose_plan returns)")
    if plan != truth.name:
        weights = memory.estimate_memory(tutorial, batch_tokens=memory.BUDGET_STEP).weights_gib
        hint = (f"the bf16 weights alone are {weights:.0f} GiB: can one {gib:g} GiB card hold them?"
                if plan == "ddp" else
                f"with {gpus} slices each card keeps 1/{gpus} of the weights: is offload still needed?"
                if plan == "zero3-offload" else
                "print distributed.choose_plan(T, T.config, gpu_gib=..., num_gpus=...) and read why")
        return _verdict(False, hint)
    return _verdict(True, f"{truth.name}: {truth.budget.tokens:,} tokens a GPU ({truth.reason})")


def check_new_persona(tokenizer, tutorial: Tutorial, record: Any, old_name: str, new_name: Any) -> bool:
    """Notebook 03, exercise 1: one edited identity record that would teach a new name.

    No training here (CI runs this cell): the check is that the record is valid, that its trained
    tokens (the labels) carry the new name and not the old one, and that they end with the
    family's end of turn, so after training the model says the name and stops.
    """
    if not isinstance(new_name, str) or not new_name.strip() or new_name.strip() == old_name:
        return _verdict(False, f"set NEW_NAME to the new assistant's name (not {old_name!r})")
    normal, err, unusable = _validate(record)
    if unusable or err is not None:
        return _verdict(False, f"the validator rejects it: {unusable or err}")
    ids = formatting.tokenize_messages(data.to_messages(normal), tokenizer, tutorial.family)
    trained = tokenizer.decode([t for t in ids["labels"] if t != formatting.IGNORE])
    print("trained on:", repr(trained))
    if new_name.strip() not in trained:
        return _verdict(False, f"{new_name!r} is not in the answer the model trains on; edit 'output'")
    if old_name in trained:
        return _verdict(False, f"the answer still says {old_name!r}: a mixed identity confuses it")
    if not trained.endswith(tutorial.family.end_of_turn):
        return _verdict(False, "the trained answer does not end with the end-of-turn token")
    return _verdict(True, f"this record teaches {new_name!r} and the stop at "
                          f"{tutorial.family.end_of_turn}. Put it in the data instead of the old one "
                          "(and the other records naming the old name), then train again")


def check_end_of_answer(tokenizer, family: ChatFamily, answer: Any) -> bool:
    """Notebook 03, exercise 2: the token a Qwen2 chat answer ends with (not the base model's eos).

    Read from the template through `formatting.split_turns`, as the training labels have it.
    """
    chat = [{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是小助手。"}]
    (truth,) = _target_stops(tokenizer, family, chat)
    if not isinstance(answer, str) or answer.strip() not in family.stop_tokens:
        return _verdict(False, f"answer with one of {family.stop_tokens}, spelled exactly")
    if answer.strip() != truth:
        return _verdict(False, f"{answer.strip()} ends a whole document (the base model's eos); "
                               "a chat turn ends with another token")
    return _verdict(True, f"{truth}: trained as the last label of every answer, and a stop token "
                          "at generation, so the assistant ends its turn")
