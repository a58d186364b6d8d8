"""Did the fine-tune work: held-out questions through the course's chat path, before and after.

The training loss does not show the silent failures learners report: a model that never stops,
that answers every question with its new identity, or that forgot ordinary ones. `evaluate`
asks questions the training data never held (dataset/heldout/)
with `inference.chat`, greedy, and counts; for the Chat-甄嬛 tutorials it also scores the
held-out reference answers with `metrics.token_accuracy`, the metric the Trainer logs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import data, formatting, inference, metrics, registry
from .registry import Tutorial

DATASET = registry.repo_root() / "dataset"
HELDOUT = DATASET / "heldout" / "identity.json"  # notebook 03: identity paraphrases and ordinary questions
HUANHUAN_HELDOUT = DATASET / "heldout" / "huanhuan_style.json"  # notebooks 01, 02, 04: records with answers
IDENTITY_TUTORIALS = ("qwen2",)  # trained on dataset/identity.json; the others on Chat-甄嬛
ROWS = ("stop_share", "identity_share", "ordinary_share", "token_accuracy", "heldout_loss",
        "mean_new_tokens")


@dataclass
class Report:
    """What one model did on the held-out set; None where the tutorial's lesson has no such number."""

    label: str
    prompts: int
    max_new_tokens: int
    stop_share: float  # answers that ended on a stop token (Reply.stopped), not at the limit
    mean_new_tokens: float
    identity_share: float | None = None  # identity paraphrases answered with the new name
    ordinary_share: float | None = None  # ordinary questions answered without it
    heldout_loss: float | None = None  # mean loss of the held-out reference answers' tokens
    token_accuracy: float | None = None
    answers: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self, *others: Report) -> str:
        """This report beside others (e.g. `before.table(after)`), one row per number it has."""
        reports = (self, *others)
        lines = [f"{'':18}" + "".join(f"{r.label:>12}" for r in reports)]
        for name in ROWS:
            values = [getattr(r, name) for r in reports]
            if any(v is not None for v in values):
                lines.append(f"{name:18}" + "".join("           -" if v is None else f"{v:12.3f}"
                                                    for v in values))
        return "\n".join(lines)


def budget(tutorial: Tutorial, smoke: bool) -> tuple[int, int]:
    """(prompts, max_new_tokens): a full run in real mode; in smoke mode few and short, for CI.

    SmolLM2 writes a Chinese character as 1-3 tokens, so its trained answers need more room
    than the random stand-ins, whose answers are only checked for stopping.
    """
    if not smoke:
        return 100, 256
    return (6, 24) if tutorial.smoke.kind == "tiny" else (10, 64)


def heldout(tutorial: Tutorial, limit: int) -> tuple[str | None, list[str], list[str], list[dict]]:
    """(new name, identity questions, ordinary questions, records) of the tutorial's held-out set:
    identity paraphrases and ordinary questions (notebook 03) or Chat-甄嬛 records, `limit` in all."""
    if tutorial.key in IDENTITY_TUTORIALS:
        held = json.loads(HELDOUT.read_text(encoding="utf-8"))
        return held["name"], held["identity"][: limit // 2], held["ordinary"][: limit // 2], []
    return None, [], [], data.load_records(HUANHUAN_HELDOUT)[0][:limit]


def heldout_prompts(tutorial: Tutorial, limit: int) -> list[str]:
    """The held-out questions `evaluate` asks, in its order."""
    _, identity, ordinary, records = heldout(tutorial, limit)
    return identity + ordinary + [r["instruction"] for r in records]


def heldout_scores(model, tokenizer, tutorial: Tutorial, records: list[dict]) -> tuple[float, float]:
    """(loss, token accuracy) of the reference answers, token-weighted as the Trainer's eval."""
    import numpy as np
    import torch
    from transformers import EvalPrediction

    total, counted, preds, labels = 0.0, 0, [], []
    for record in records:
        messages = data.to_messages(record, system=tutorial.system_prompt)
        ex = formatting.tokenize_messages(messages, tokenizer, tutorial.family, tutorial.config.max_length)
        ids, lab = (torch.tensor([ex[k]], device=model.device) for k in ("input_ids", "labels"))
        with torch.no_grad():
            out = model(input_ids=ids, labels=lab)
        n = int((lab[:, 1:] != metrics.IGNORE).sum())
        total, counted = total + out.loss.item() * n, counted + n
        preds.append(metrics.preprocess_logits_for_metrics(out.logits, lab)[0].tolist())
        labels.append(ex["labels"])
    width = max(map(len, labels))
    padded = [np.array([r + [metrics.IGNORE] * (width - len(r)) for r in rows]) for rows in (preds, labels)]
    return total / counted, metrics.token_accuracy(EvalPrediction(*padded))["accuracy"]


def evaluate(model, tokenizer, tutorial: Tutorial, label: str = "", smoke_mode: bool | None = None,
             seed: int = 42) -> Report:
    """Run the tutorial's held-out set through `inference.chat` (greedy) and count what it shows.

    The caller's random state is restored afterwards, so a training cell after this one runs
    exactly as it would without it.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _evaluate(model, tokenizer, tutorial, label,
                         registry.smoke_mode() if smoke_mode is None else smoke_mode)


def _evaluate(model, tokenizer, tutorial: Tutorial, label: str, smoke: bool) -> Report:
    limit, max_new = budget(tutorial, smoke)
    was_training = model.training
    model.eval()
    name, identity, ordinary, records = heldout(tutorial, limit)
    prompts = identity + ordinary + [r["instruction"] for r in records]
    try:
        replies = [inference.chat(model, tokenizer, q, tutorial.family, system=tutorial.system_prompt,
                                  max_new_tokens=max_new) for q in prompts]
        loss, accuracy = heldout_scores(model, tokenizer, tutorial, records) if records else (None, None)
    finally:
        model.train(was_training)
    answers = {q: r.text for q, r in zip(prompts, replies)}

    def share(questions: list[str], with_name: bool) -> float | None:
        return sum((name in answers[q]) == with_name for q in questions) / len(questions) if questions else None

    return Report(label, len(prompts), max_new, sum(r.stopped for r in replies) / len(replies),
                  sum(len(r.token_ids) for r in replies) / len(replies), share(identity, True),
                  share(ordinary, False), loss, accuracy, answers)


def figure(reports: list[Report], path: str | Path) -> Path:
    """Bars of each share (left) and the held-out loss or answer length (right), saved as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: nothing global, no backend to choose

    fig = Figure(figsize=(8, 3.2))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]})
    shares = [n for n in ROWS[:4] if getattr(reports[0], n) is not None]
    scale = "heldout_loss" if reports[0].heldout_loss is not None else "mean_new_tokens"
    width = 0.8 / len(reports)
    for i, r in enumerate(reports):
        left.bar([j + i * width for j in range(len(shares))], [getattr(r, n) for n in shares], width,
                 label=r.label)
        right.bar([i], [getattr(r, scale)], 0.6, label=r.label, color=f"C{i}")
    left.set_xticks([j + width * (len(reports) - 1) / 2 for j in range(len(shares))], shares)
    left.set_ylim(0, 1.05)
    left.set_ylabel("share (held-out set)")
    left.legend()
    right.set_xticks(range(len(reports)), [r.label for r in reports])
    right.set_title(scale)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return Path(path)

