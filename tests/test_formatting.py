"""Tests for selfllm_utils.formatting, for all four chat families.

The stand-in tokenizers carry each family's official chat template, so these tests check the real
formats: rendering equals the reference rendering, only answers (and their end token) are labels,
truncation keeps the end token, and the prompt has the same ids at training and inference.
"""

from __future__ import annotations

import json

import datasets
import pytest

from selfllm_utils import data, formatting, models, registry

KEYS = list(registry.TUTORIALS)
IGNORE = -100
# Does the official template write an end token after the last answer? (reference README)
TEMPLATE_ENDS_ANSWER = {"deepseek": True, "qwen2": True, "glm4": False, "qwen1.5": False}
# What ends an answer in the middle of a conversation: GLM-4 ends a turn by starting the next one.
MID_TURN_STOP = {"deepseek": "<｜end▁of▁sentence｜>", "qwen2": "<|im_end|>", "qwen1.5": "<|im_end|>",
                 "glm4": "<|user|>"}
HISTORY_RECORD = {
    "instruction": "第三个问题？", "input": "", "system": None,
    "output": "第三个回答，也是最后一个。",
    "history": [["第一个问题？", "第一个回答。"], ["第二个问题？", "第二个回答，比第一个长一些。"]],
}
LONG_ANSWER = "臣妾做不到啊！" * 20
TRUNCATE_ROOM = 3  # answer tokens kept when truncating: the last is always the stop token


@pytest.fixture(params=KEYS)
def setup(request, smoke_models):
    """(tutorial, tokenizer) for each family."""
    return registry.get(request.param), smoke_models.tokenizer(request.param)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _label_runs(labels: list[int]) -> list[list[int]]:
    """Contiguous stretches of labels that are trained (not IGNORE)."""
    runs: list[list[int]] = []
    for i, label in enumerate(labels):
        if label == IGNORE:
            continue
        if i == 0 or labels[i - 1] == IGNORE:
            runs.append([])
        runs[-1].append(label)
    return runs


def _expected_full(tutorial, ref_full: str) -> str:
    """The reference conversation as the course trains it: end token appended, no trailing newline."""
    text = ref_full if TEMPLATE_ENDS_ANSWER[tutorial.key] else ref_full + tutorial.family.end_of_turn
    return text.removesuffix("\n")


def test_template_facts_match_reference(setup, reference) -> None:
    tutorial, _ = setup
    ref = reference["models"][tutorial.key]["rendered_example"]
    answer = reference["example_messages"][-1]["content"]
    ends = ref["full_conversation"].removesuffix("\n").endswith(answer + tutorial.family.end_of_turn)
    assert ends == TEMPLATE_ENDS_ANSWER[tutorial.key]
    if not ends:
        assert ref["full_conversation"].endswith(answer)


def test_render_matches_reference(setup, reference) -> None:
    """Parity with the official template: the tokenizer renders exactly the reference text."""
    tutorial, tokenizer = setup
    messages = reference["example_messages"]
    ref = reference["models"][tutorial.key]["rendered_example"]
    assert formatting.render(tokenizer, messages) == ref["full_conversation"]
    assert (formatting.render(tokenizer, messages[:2], add_generation_prompt=True)
            == ref["prompt_first_two_add_generation_prompt"])


def test_tokenize_reference_example(setup, reference) -> None:
    tutorial, tokenizer = setup
    messages = reference["example_messages"]
    ref = reference["models"][tutorial.key]["rendered_example"]
    answer = messages[-1]["content"]
    out = formatting.tokenize_messages(messages, tokenizer, tutorial.family)
    ids, labels = out["input_ids"], out["labels"]
    assert len(ids) == len(labels) == len(out["attention_mask"]) and set(out["attention_mask"]) == {1}

    # the whole conversation, with the end token the course trains
    expected = _expected_full(tutorial, ref["full_conversation"])
    assert tokenizer.decode(ids) == expected

    # the prompt: exactly the ids inference feeds the model, all masked
    prompt_ids = _ids(tokenizer, formatting.render(tokenizer, messages[:2], add_generation_prompt=True))
    assert ids[:len(prompt_ids)] == prompt_ids
    assert labels[:len(prompt_ids)] == [IGNORE] * len(prompt_ids)
    assert labels[len(prompt_ids):] == ids[len(prompt_ids):]

    # the labels: the answer (after the template's separator) and the end of turn
    target = tokenizer.decode([x for x in labels if x != IGNORE])
    assert target == expected[len(ref["prompt_first_two_add_generation_prompt"]):]
    assert target.lstrip() == answer + tutorial.family.end_of_turn
    assert labels[-1] in models.stop_ids(tokenizer, tutorial.family)


def test_multi_turn_labels_every_answer(setup) -> None:
    tutorial, tokenizer = setup
    messages = data.to_messages(HISTORY_RECORD)
    out = formatting.tokenize_messages(messages, tokenizer, tutorial.family)
    ids, labels = out["input_ids"], out["labels"]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = _label_runs(labels)
    assert len(runs) == len(answers) == 3
    stops = models.stop_ids(tokenizer, tutorial.family)
    for run, answer in zip(runs[:-1], answers[:-1]):
        assert tokenizer.decode(run).lstrip() == answer + MID_TURN_STOP[tutorial.key]
        assert run[-1] in stops
    assert tokenizer.decode(runs[-1]).lstrip() == answers[-1] + tutorial.family.end_of_turn
    # each answer's prompt has the ids it gets at inference
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = _ids(tokenizer, formatting.render(tokenizer, messages[:i], add_generation_prompt=True))
            assert ids[:len(prompt)] == prompt
            assert labels[len(prompt) - 1] == IGNORE and labels[len(prompt)] != IGNORE


def test_truncation_keeps_the_stop_token(setup) -> None:
    tutorial, tokenizer = setup
    messages = [{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": LONG_ANSWER}]
    full = formatting.tokenize_messages(messages, tokenizer, tutorial.family)
    prompt_len = full["labels"].count(IGNORE)
    max_length = prompt_len + TRUNCATE_ROOM
    assert len(full["input_ids"]) > max_length
    cut = formatting.tokenize_messages(messages, tokenizer, tutorial.family, max_length=max_length)
    assert len(cut["input_ids"]) == len(cut["labels"]) == len(cut["attention_mask"]) == max_length
    assert cut["input_ids"][:-1] == full["input_ids"][:max_length - 1]
    assert cut["input_ids"][-1] == cut["labels"][-1] == full["input_ids"][-1]
    assert cut["labels"][-1] in models.stop_ids(tokenizer, tutorial.family)
    assert cut["labels"][:prompt_len] == [IGNORE] * prompt_len


def test_prompt_longer_than_max_length_is_dropped(setup) -> None:
    tutorial, tokenizer = setup
    messages = [{"role": "user", "content": LONG_ANSWER}, {"role": "assistant", "content": "是。"}]
    prompt_len = formatting.tokenize_messages(messages, tokenizer, tutorial.family)["labels"].count(IGNORE)
    out = formatting.tokenize_messages(messages, tokenizer, tutorial.family, max_length=prompt_len - 1)
    assert out == {"input_ids": [], "attention_mask": [], "labels": []}


def test_build_dataset_counts_cuts_and_drops(setup) -> None:
    tutorial, tokenizer = setup
    base = {"input": "", "system": None, "history": []}
    records = [
        {**base, "instruction": "你是谁？", "output": "家父是大理寺少卿甄远道。"},  # fits
        {**base, "instruction": "再说一遍？", "output": LONG_ANSWER},  # answer cut
        {**base, "instruction": LONG_ANSWER, "output": "是。"},  # prompt too long: dropped
    ]
    ds = datasets.Dataset.from_list(records, features=data.FEATURES)
    full = [formatting.tokenize_messages(data.to_messages(r), tokenizer, tutorial.family) for r in records]
    lengths = [len(f["input_ids"]) for f in full]
    prompts = [f["labels"].count(IGNORE) for f in full]
    max_length = max(lengths[0], prompts[1] + TRUNCATE_ROOM)
    assert lengths[1] > max_length and prompts[2] >= max_length
    out, report = formatting.build_dataset(ds, tokenizer, tutorial, system="", max_length=max_length)
    assert (report.examples, report.truncated, report.dropped) == (2, 1, 1)
    assert len(out) == 2 and set(out.column_names) == {"input_ids", "attention_mask", "labels"}
    assert [len(x) for x in out["input_ids"]] == [lengths[0], max_length]
    assert report.tokens == lengths[0] + max_length
    assert "1 dropped" in str(report) and "1 answers cut" in str(report)


def test_build_dataset_uses_the_tutorial_system_prompt(setup) -> None:
    tutorial, tokenizer = setup
    record = {"instruction": "你是谁？", "input": "", "output": "我是甄嬛。", "system": None, "history": []}
    ds = datasets.Dataset.from_list([record], features=data.FEATURES)
    out, _ = formatting.build_dataset(ds, tokenizer, tutorial)
    text = tokenizer.decode(out[0]["input_ids"])
    if tutorial.system_prompt:
        assert tutorial.system_prompt in text
    own = formatting.tokenize_messages(data.to_messages(record, system=tutorial.system_prompt),
                                       tokenizer, tutorial.family)
    assert out[0]["input_ids"] == own["input_ids"]


def test_conversation_without_answer_is_refused(setup) -> None:
    tutorial, tokenizer = setup
    with pytest.raises(ValueError, match="no assistant message"):
        formatting.split_turns(tokenizer, [{"role": "user", "content": "你好"}], tutorial.family)


@pytest.mark.parametrize("earlier_answer", ["\n\n第一个回答。", "  第一个回答。", "第一个回答。  \n"])
def test_next_turn_prompt_tokenizes_like_the_trained_prefix(tmp_path, smoke_models,
                                                            earlier_answer: str) -> None:
    """Qwen2's tokenizer merges an answer's leading whitespace with "assistant\\n": the loader
    strips it, so the trained prefix is exactly what inference feeds for the next turn."""
    tutorial, tokenizer = registry.get("qwen2"), smoke_models.tokenizer("qwen2")
    record = {**HISTORY_RECORD, "history": [["第一个问题？", earlier_answer]]}
    path = tmp_path / "d.json"
    path.write_text(json.dumps([record], ensure_ascii=False), encoding="utf-8")
    ds, report = data.load_dataset(path)
    assert report.stripped == 1
    tokenized, _ = formatting.build_dataset(ds, tokenizer, tutorial, system="")
    messages = data.to_messages(ds[0])
    prompt = _ids(tokenizer, formatting.render(tokenizer, messages[:-1], add_generation_prompt=True))
    assert tokenized[0]["input_ids"][: len(prompt)] == prompt
    assert tokenized[0]["labels"][len(prompt) - 1] == IGNORE != tokenized[0]["labels"][len(prompt)]


@pytest.mark.parametrize(("bad", "field"), [({"role": "asistant", "content": "答"}, "'role' is 'asistant'"),
                                            ({"role": "assistant", "content": None}, "'content' is None"),
                                            ({"role": "assistant"}, "'content' is None")])
def test_a_misspelled_role_or_missing_content_names_the_message(setup, bad, field) -> None:
    """A template skips a role it does not know: the turn would vanish from training, silently."""
    tutorial, tokenizer = setup
    messages = [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"},
                {"role": "user", "content": "再问"}, bad]
    with pytest.raises(ValueError, match=f"message 3.*field {field}"):
        formatting.tokenize_messages(messages, tokenizer, tutorial.family)


def test_label_view_marks_exactly_the_trained_tokens(smoke_models) -> None:
    """The preview shows every answer (and its stop token) between the marks, nothing else."""
    t = registry.get("qwen1.5")
    tokenizer = smoke_models.tokenizer(t.key)
    record = {"instruction": "你是谁？", "output": "家父是大理寺少卿甄远道。",
              "history": [["你好", "你好呀。"]]}
    messages = data.to_messages(record, system=t.system_prompt)
    features = formatting.tokenize_messages(messages, tokenizer, t.family)
    view = formatting.label_view(tokenizer, features, marks=("[[", "]]"))
    trained = [piece for piece, is_target in formatting.split_turns(tokenizer, messages, t.family) if is_target]
    assert view.count("[[") == len(trained) == 2
    assert [part.split("]]")[0] for part in view.split("[[")[1:]] == trained
    assert view.replace("[[", "").replace("]]", "") == tokenizer.decode(features["input_ids"])


def test_format_report_keeps_every_length_before_the_cut(smoke_models) -> None:
    import datasets

    t = registry.get("qwen1.5")
    tokenizer = smoke_models.tokenizer(t.key)
    records = [{"instruction": "你是谁？", "input": "", "output": "甄" * n, "system": None, "history": []}
               for n in (2, 40, 400)]
    ds = datasets.Dataset.from_list(records, features=data.FEATURES)
    full = [len(formatting.tokenize_messages(data.to_messages(r, t.system_prompt), tokenizer, t.family)["input_ids"])
            for r in records]
    _, report = formatting.build_dataset(ds, tokenizer, t, max_length=full[1])
    assert report.lengths == full and report.truncated == 1
    line = report.against(4 * full[1])
    assert "1 longer than max_length" in line and "holds about" in line
