"""Token accuracy: the shift between predictions and labels, ignored positions, and that the Trainer
keeps only token ids (not logits) between batches when `preprocess_logits_for_metrics` is used."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from selfllm_utils import metrics

IGNORE = metrics.IGNORE
VOCAB = 5


def one_hot_logits(ids: list[list[int]]) -> torch.Tensor:
    """Logits whose argmax at each position is the given id."""
    logits = torch.zeros(len(ids), len(ids[0]), VOCAB)
    for b, row in enumerate(ids):
        for t, i in enumerate(row):
            logits[b, t, i] = 3.0
    return logits


def seed_accuracy(pred) -> dict[str, float]:
    """The seed tutorial's metric (003, mertrics.py), kept as the reference it must agree with."""
    labels = pred.label_ids
    preds = pred.predictions.argmax(-1)
    total = correct = 0
    for pred_y, true_y in zip(preds, labels):
        for p, t in zip(pred_y[:-1], true_y[1:]):
            if t != -100:
                total += 1
                correct += int(p == t)
    return {"accuracy": correct / total if total > 0 else 0}


def test_argmax_keeps_ids_only():
    logits = one_hot_logits([[1, 2, 3], [4, 0, 1]])
    ids = metrics.preprocess_logits_for_metrics(logits, None)
    assert ids.shape == (2, 3) and ids.dtype == torch.int64
    assert ids.tolist() == [[1, 2, 3], [4, 0, 1]]
    # models returning (logits, extra) are handled too
    assert torch.equal(metrics.preprocess_logits_for_metrics((logits, None), None), ids)


def test_prediction_at_t_is_scored_against_label_at_t_plus_1():
    labels = np.array([[IGNORE, IGNORE, 2, 3, 4]])  # a 2-token prompt, then the answer 2 3 4
    # position 1 predicts the first answer token (2), position 2 the next (3), position 3 (4)
    right = np.array([[0, 2, 3, 4, 0]])
    assert metrics.token_accuracy(EvalPrediction(right, labels)) == {"accuracy": 1.0}
    # comparing without the shift (the classic mistake) would have scored this as correct
    unshifted = np.array([[0, 0, 2, 3, 4]])
    assert metrics.token_accuracy(EvalPrediction(unshifted, labels)) == {"accuracy": 0.0}
    one_wrong = np.array([[0, 2, 1, 4, 0]])
    assert metrics.token_accuracy(EvalPrediction(one_wrong, labels))["accuracy"] == pytest.approx(2 / 3)


def test_ignored_positions_and_padding_are_not_counted():
    # the Trainer pads predictions and labels of different lengths with -100
    labels = np.array([[IGNORE, 1, 2, IGNORE], [IGNORE, 3, IGNORE, IGNORE]])
    preds = np.array([[1, 2, IGNORE, IGNORE], [0, IGNORE, IGNORE, IGNORE]])
    assert metrics.token_accuracy(EvalPrediction(preds, labels)) == {"accuracy": 2 / 3}
    nothing = np.full((1, 4), IGNORE)
    assert metrics.token_accuracy(EvalPrediction(nothing, nothing)) == {"accuracy": 0.0}


def test_agrees_with_the_seeds_metric_on_random_logits():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, VOCAB, generator=gen)
    labels = torch.randint(0, VOCAB, (3, 7), generator=gen)
    labels[:, :3] = IGNORE
    labels[2, 5:] = IGNORE
    ids = metrics.preprocess_logits_for_metrics(logits, labels).numpy()
    ours = metrics.token_accuracy(EvalPrediction(ids, labels.numpy()))
    assert ours["accuracy"] == pytest.approx(seed_accuracy(EvalPrediction(logits.numpy(), labels.numpy()))["accuracy"])


def test_trainer_keeps_token_ids_not_logits(tmp_path):
    """Through a real Trainer.evaluate: compute_metrics sees [examples, tokens] ids."""
    from transformers import Trainer, TrainingArguments

    from selfllm_utils import formatting, models, registry, training

    tutorial = registry.get("qwen1.5")
    model, tokenizer = models.load_model(tutorial, smoke_mode=True)
    records = [{"instruction": q, "input": "", "output": a} for q, a in
               [("你是谁？", "家父是大理寺少卿甄远道。"), ("今日天气如何？", "回皇上，雪下得正好。"),
                ("你冷不冷？", "有皇上在，臣妾不冷。")]]
    import datasets

    ds, _ = formatting.build_dataset(datasets.Dataset.from_list(records), tokenizer, tutorial)
    seen = {}

    def compute(eval_pred):
        seen["shape"] = np.asarray(eval_pred.predictions).shape
        seen["dtype"] = np.asarray(eval_pred.predictions).dtype
        return metrics.token_accuracy(eval_pred)

    args = TrainingArguments(str(tmp_path), per_device_eval_batch_size=2, report_to="none",
                             remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, eval_dataset=ds,
                      data_collator=training.collator(tokenizer, packing=False),
                      compute_metrics=compute,
                      preprocess_logits_for_metrics=metrics.preprocess_logits_for_metrics)
    result = trainer.evaluate()
    longest = max(len(x) for x in ds["input_ids"])
    assert seen["shape"] == (3, longest)  # ids per token; the logits would add a vocabulary axis
    assert np.issubdtype(seen["dtype"], np.integer)
    assert 0.0 <= result["eval_accuracy"] <= 1.0
