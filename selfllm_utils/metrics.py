"""Token accuracy during evaluation, without keeping every logit in memory.

The seed's `compute_metrics` took `pred.predictions.argmax(-1)` at the end: by then the Trainer
had gathered the logits of the whole eval set, [examples, tokens, vocabulary] floats. For
Qwen1.5 (vocabulary 152,064) that is 0.6 MB per token, 2.5 GB for a hundred 40-token examples,
on the GPU and then in CPU memory. `preprocess_logits_for_metrics` runs on each batch, on the
device, before anything is kept: take the argmax there and only [batch, tokens] ids remain.
"""

from __future__ import annotations

import numpy as np

IGNORE = -100  # label of prompt and padding positions (formatting.IGNORE): not scored


def preprocess_logits_for_metrics(logits, labels):
    """Reduce a batch's logits to the predicted token ids, on the device, before they are kept.

    Pass it as `Trainer(preprocess_logits_for_metrics=...)`; `token_accuracy` then receives ids.

    Args:
        logits: [batch, tokens, vocabulary] tensor, or a tuple whose first item is that tensor
            (some models return extra outputs).
        labels: The batch's labels (unused; part of the Trainer's calling convention).

    Returns:
        [batch, tokens] tensor of predicted token ids.
    """
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def token_accuracy(eval_pred) -> dict[str, float]:
    """Share of answer tokens the model predicts exactly (greedy), over the whole eval set.

    A causal model's output at position t is its guess for the token at t + 1, so predictions
    [:, :-1] are compared with labels [:, 1:] (the seed got this shift right). Positions whose
    label is -100 (prompt, padding, the gaps between packed sequences) are not counted.

    Args:
        eval_pred: The Trainer's `EvalPrediction`: `predictions` are the ids returned by
            `preprocess_logits_for_metrics`, `label_ids` the labels, both [examples, tokens].

    Returns:
        {"accuracy": correct / counted} (0.0 if nothing is counted); the Trainer logs it as
        `eval_accuracy`, which `metric_for_best_model="accuracy"` can select the best checkpoint by.
    """
    preds = np.asarray(eval_pred.predictions)[:, :-1]
    labels = np.asarray(eval_pred.label_ids)[:, 1:]
    counted = labels != IGNORE
    total = int(counted.sum())
    correct = int(((preds == labels) & counted).sum())
    return {"accuracy": correct / total if total else 0.0}
