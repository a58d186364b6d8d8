"""The held-out evaluation: never training data, counts what the chat path returns, reproducible."""

from __future__ import annotations

import json
import unicodedata

import pytest

from selfllm_utils import cli, data, evaluation, formatting, inference, metrics, models, registry, training

TRAINING_FILES = ("identity.json", "huanhuan_sample.json")


def normalise(text: str) -> str:
    """Case, width, spaces and punctuation removed: "你是谁？" and "你是谁" are the same question."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(ch for ch in text if not (ch.isspace() or unicodedata.category(ch)[0] in "PS"))


def heldout_prompts() -> list[str]:
    held = json.loads(evaluation.HELDOUT.read_text(encoding="utf-8"))
    records, _ = data.load_records(evaluation.HUANHUAN_HELDOUT)
    return held["identity"] + held["ordinary"] + [r["instruction"] for r in records]


def test_heldout_prompts_are_never_training_prompts():
    trained = set()
    for name in TRAINING_FILES:
        records, _ = data.load_records(evaluation.DATASET / name)
        trained |= {normalise(r["instruction"] + r["input"]) for r in records}
    prompts = heldout_prompts()
    assert len(prompts) >= 14
    leaked = [p for p in prompts if normalise(p) in trained]
    assert not leaked, f"held-out prompts found in the training data: {leaked}"
    assert len({normalise(p) for p in prompts}) == len(prompts)  # no prompt counted twice


def test_heldout_prompts_are_not_in_the_smoke_tokenizer_corpus():
    from selfllm_utils import smoke

    corpus = {normalise(line) for line in smoke._corpus()}
    assert not [p for p in heldout_prompts() if normalise(p) in corpus]


def test_heldout_name_is_the_one_the_identity_data_teaches(identity_records):
    name = json.loads(evaluation.HELDOUT.read_text(encoding="utf-8"))["name"]
    taught = [r for r in identity_records if name in r["output"]]
    assert len(taught) > len(identity_records) / 2
    held = json.loads(evaluation.HELDOUT.read_text(encoding="utf-8"))
    assert not any(name in q for q in held["identity"])  # the question must not give the name away


def fake_chat(answers: dict[str, inference.Reply]):
    def chat(model, tokenizer, question, family, system=None, max_new_tokens=256, **gen):
        return answers[question if isinstance(question, str) else question[-1]["content"]]
    return chat


def test_shares_count_replies(monkeypatch):
    """Stop share from `Reply.stopped` (ids), identity and ordinary shares from the new name."""
    tutorial = registry.get("qwen2")
    held = json.loads(evaluation.HELDOUT.read_text(encoding="utf-8"))
    limit, max_new = evaluation.budget(tutorial, smoke=True)
    identity, ordinary = held["identity"][: limit // 2], held["ordinary"][: limit // 2]
    name = held["name"]
    # A reply whose stop token was the last allowed token stopped (as long as the limit, no
    # stop token left in the decoded text); one cut at the limit did not.
    replies = {q: inference.Reply(f"我是{name}。", [1] * max_new, i % 2 == 0) for i, q in enumerate(identity)}
    replies[identity[0]] = inference.Reply("I am an AI assistant.", [1] * 3, True)
    replies |= {q: inference.Reply("北京。", [1] * 2, True) for q in ordinary}
    replies[ordinary[0]] = inference.Reply(f"我是{name}", [1] * max_new, False)
    monkeypatch.setattr(evaluation.inference, "chat", fake_chat(replies))

    report = evaluation.evaluate(torch_module(), None, tutorial, "fake", smoke_mode=True)
    assert report.prompts == len(identity) + len(ordinary)
    assert report.stop_share == pytest.approx(sum(r.stopped for r in replies.values()) / len(replies))
    assert report.identity_share == pytest.approx((len(identity) - 1) / len(identity))
    assert report.ordinary_share == pytest.approx((len(ordinary) - 1) / len(ordinary))
    assert report.mean_new_tokens == pytest.approx(sum(len(r.token_ids) for r in replies.values()) / len(replies))
    assert report.heldout_loss is None and report.token_accuracy is None
    assert report.answers[ordinary[0]] == f"我是{name}"
    assert report.asked == {"identity": len(identity), "ordinary": len(ordinary)}  # the shares' denominators


def torch_module():
    import torch

    return torch.nn.Linear(1, 1)


def test_evaluation_leaves_train_mode_as_it_was(monkeypatch):
    monkeypatch.setattr(evaluation.inference, "chat",
                        lambda *a, **k: inference.Reply("x", [1], True))
    model = torch_module().train()
    evaluation.evaluate(model, None, registry.get("qwen2"), smoke_mode=True)
    assert model.training


@pytest.fixture(scope="module")
def after(trained) -> evaluation.Report:
    return evaluation.evaluate(trained.model, trained.tokenizer, trained.tutorial, "after", smoke_mode=True)


def test_two_runs_agree(trained, after):
    again = evaluation.evaluate(trained.model, trained.tokenizer, trained.tutorial, "after", smoke_mode=True)
    assert again.to_dict() == after.to_dict()


def test_report_of_a_chat_tutorial(after):
    limit, max_new = evaluation.budget(registry.get("deepseek"), smoke=True)
    assert after.prompts == min(limit, len(data.load_records(evaluation.HUANHUAN_HELDOUT)[0]))
    assert after.max_new_tokens == max_new and 0 < after.mean_new_tokens <= max_new
    assert after.identity_share is None and after.heldout_loss > 0 and 0 <= after.token_accuracy <= 1
    assert json.loads(json.dumps(after.to_dict(), ensure_ascii=False)) == after.to_dict()
    table = after.table(after)
    assert "stop_share" in table and "heldout_loss" in table and "identity_share" not in table


def test_heldout_scores_equal_the_trainers_evaluate(trained, after, tmp_path):
    """The same loss and token accuracy as `Trainer.evaluate` with the course's metric."""
    import datasets

    records, _ = data.load_records(evaluation.HUANHUAN_HELDOUT)
    ds = datasets.Dataset.from_list(records[: after.prompts], features=data.FEATURES)
    eval_ds, _ = formatting.build_dataset(ds, trained.tokenizer, trained.tutorial)
    cfg = registry.smoke_config(trained.tutorial)
    trainer = training.make_trainer(
        trained.model, trained.tokenizer, eval_ds, cfg, tmp_path, eval_ds=eval_ds,
        compute_metrics=metrics.token_accuracy,
        preprocess_logits_for_metrics=metrics.preprocess_logits_for_metrics,
        per_device_eval_batch_size=len(eval_ds), disable_tqdm=True, report_to=[])
    scores = trainer.evaluate()
    trained.model.eval()
    assert after.heldout_loss == pytest.approx(scores["eval_loss"], rel=1e-4)
    assert after.token_accuracy == pytest.approx(scores["eval_accuracy"])


def test_merged_model_evaluates_like_its_adapter(trained, after, tmp_path):
    merged_dir = inference.merge_and_save(trained.tutorial, trained.adapter, tmp_path / "merged",
                                          smoke_mode=True)
    merged, tokenizer = models.load_model(trained.tutorial, smoke_mode=True, path=merged_dir)
    report = evaluation.evaluate(merged, tokenizer, trained.tutorial, "after", smoke_mode=True)
    assert report.answers == after.answers
    assert (report.stop_share, report.mean_new_tokens) == (after.stop_share, after.mean_new_tokens)
    assert report.heldout_loss == pytest.approx(after.heldout_loss, abs=1e-4)
    assert report.token_accuracy == pytest.approx(after.token_accuracy, abs=1e-6)


def test_cli_eval_prints_one_json_object(trained, after, capsys):
    cli.main(["eval", "--tutorial", trained.tutorial.key, "--adapter", str(trained.adapter), "--json"])
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1
    report = json.loads(out)
    assert report["answers"] == after.answers and report["stop_share"] == after.stop_share
    assert report["label"] == str(trained.adapter)


def test_cli_eval_table_and_missing_adapter(trained, capsys, tmp_path):
    cli.main(["eval", "--tutorial", trained.tutorial.key, "--adapter", str(trained.adapter)])
    assert "stop_share" in capsys.readouterr().out
    with pytest.raises(SystemExit) as err:
        cli.main(["eval", "--tutorial", trained.tutorial.key, "--adapter", str(tmp_path)])
    assert "adapter_config.json" in str(err.value) and "\n" not in str(err.value)


def test_figure_is_a_png(after, tmp_path):
    before = evaluation.Report("before", after.prompts, after.max_new_tokens, 0.0, 24.0,
                               heldout_loss=after.heldout_loss + 1, token_accuracy=0.0)
    path = evaluation.figure([before, after], tmp_path / "eval.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trained_answers_stop(trained, smoke_models, after):
    """The lesson on a tiny model: training teaches the end token, so more answers stop."""
    base, tokenizer = smoke_models.model(trained.tutorial.key)
    before = evaluation.evaluate(base, tokenizer, trained.tutorial, "before", smoke_mode=True)
    assert after.stop_share > before.stop_share
    assert after.heldout_loss < before.heldout_loss


def test_figure_prints_each_value_on_its_bar(after) -> None:
    """A "before" share of 0 is an invisible bar: its value is written on it."""
    before = evaluation.Report("before", after.prompts, after.max_new_tokens, 0.0, 24.0,
                               heldout_loss=after.heldout_loss + 1, token_accuracy=0.0)
    left, right = evaluation.draw([before, after]).axes
    labels = [t.get_text() for t in left.texts]
    assert labels.count("0.00") >= 2  # before: stop_share and token_accuracy, both 0
    assert f"{after.stop_share:.2f}" in labels and f"{after.token_accuracy:.2f}" in labels
    assert [t.get_text() for t in right.texts] == [f"{r.heldout_loss:.2f}" for r in (before, after)]


def test_a_heldout_of_your_own_or_split_off(tmp_path) -> None:
    import datasets

    mine = tmp_path / "mine.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "content": f"我是小麦 {i}" if i % 2 else f"a{i}"}]}
            for i in range(10)]
    mine.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    held = evaluation.read_heldout(mine, "小麦")
    assert [r["kind"] for r in held.records] == ["ordinary", "identity"] * 5
    course = evaluation.read_heldout(evaluation.HELDOUT)  # the course's own shape: name and questions
    assert course.name == json.loads(evaluation.HELDOUT.read_text(encoding="utf-8"))["name"]
    ds = datasets.Dataset.from_list(data.load_records(mine)[0], features=data.FEATURES)
    train, split = evaluation.split_heldout(ds, "小麦")
    assert len(train) + len(split.records) == 10 and split.records
    assert not {r["instruction"] for r in split.records} & set(train["instruction"])  # never trained on
    assert "split off" in split.source


def test_a_split_off_heldout_is_asked_with_its_system_prompt_and_history(monkeypatch) -> None:
    asked = []
    monkeypatch.setattr(evaluation.inference, "chat",
                        lambda model, tok, messages, *a, **k: asked.append(messages) or inference.Reply("我是小麦", [1], True))
    record = {"instruction": "你是谁？", "input": "", "output": "我是小麦。", "system": "面包店客服",
              "history": [["你好", "你好呀"]], "kind": "identity"}
    held = evaluation.Heldout([record], "小麦")
    monkeypatch.setattr(evaluation, "heldout_scores", lambda *a: (1.0, 0.5))
    report = evaluation.evaluate(torch_module(), None, registry.get("qwen2"), smoke_mode=True, heldout=held)
    assert asked == [data.to_messages(record)[:-1]]
    assert (report.identity_share, report.ordinary_share, report.heldout_loss) == (1.0, None, 1.0)
    assert report.asked == {"identity": 1, "ordinary": 0}


def test_shares_over_too_few_questions_are_named() -> None:
    """Report.too_few: the kinds asked at least once but fewer than MIN_ASKED times (notebook 03
    prints those shares instead of asserting them)."""
    report = evaluation.Report("after", 4, 8, 1.0, 3.0, 0.5, 0.5, asked={"identity": 2, "ordinary": 0})
    assert report.too_few() == {"identity": 2}  # none asked: no share at all, nothing to judge
    report.asked["ordinary"] = evaluation.MIN_ASKED
    assert report.too_few() == {"identity": 2} and report.too_few(least=1) == {}
