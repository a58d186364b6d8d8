"""Did the fine-tune work: held-out questions through the course's chat path, before and after.

The training loss does not show the silent failures learners report: a model that never stops,
that answers every question with its new identity, or that forgot ordinary ones. `evaluate`
asks questions the training data never held (dataset/heldout/, a held-out file of your own, or
records split off your data) with `inference.chat`, greedy, and counts; where the held-out
records carry reference answers (the Chat-甄嬛 tutorials) it also scores them with
`metrics.token_accuracy`, the metric the Trainer logs.
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


# A share judged over fewer questions than this is printed, not asserted: with 2, one answer moves
# it by a half (notebook 03 on a learner's 18 records, benchmarks/notebook_seeds.py, 2026-12-02).
MIN_ASKED = 3


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
    # questions of each kind asked ({"identity": 5, "ordinary": 5}): the shares' denominators. With
    # 2 (a learner's small data split), one answer moves a share by a half: too few to judge it
    asked: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def too_few(self, least: int = MIN_ASKED) -> dict[str, int]:
        """The kinds of question asked, but fewer than `least` times: their shares say little."""
        return {kind: n for kind, n in self.asked.items() if 0 < n < least}

    def scalars(self, prefix: str = "heldout/") -> dict[str, float]:
        """The numbers, named for a run's event log (`records.add_scalars`)."""
        return {prefix + n: getattr(self, n) for n in ROWS if getattr(self, n) is not None}

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


@dataclass
class Heldout:
    """What `evaluate` asks: turns no training step saw, as records (`data.to_messages` shape).

    `kind` of a record: "identity" (its answer should carry `name`), "ordinary" (it should not),
    or absent; a record with a reference `output` also gives the held-out loss and accuracy.
    """

    records: list[dict]
    name: str | None = None
    source: str = ""  # where they came from, one line for the notebook

    def of_kind(self, kind: str) -> list[dict]:
        return [r for r in self.records if r.get("kind") == kind]


def _question(text: str, kind: str | None = None) -> dict:
    return {"instruction": text, "input": "", "output": "", "system": None, "history": [], "kind": kind}


def _kinds(records: list[dict], name: str | None) -> list[dict]:
    """Records of a learner's data, each marked identity or ordinary by whether its answer holds
    the name (no name: unmarked)."""
    return [{**r, "kind": None if not name else "identity" if name in r["output"] else "ordinary"}
            for r in records]


def course_heldout(tutorial: Tutorial) -> Heldout:
    """The course's own held-out set of a tutorial (dataset/heldout/)."""
    if tutorial.key in IDENTITY_TUTORIALS:
        held = json.loads(HELDOUT.read_text(encoding="utf-8"))
        records = ([_question(q, "identity") for q in held["identity"]]
                   + [_question(q, "ordinary") for q in held["ordinary"]])
        return Heldout(records, held["name"], str(HELDOUT.relative_to(DATASET.parent)))
    return Heldout(data.load_records(HUANHUAN_HELDOUT)[0], None,
                   str(HUANHUAN_HELDOUT.relative_to(DATASET.parent)))


def read_heldout(path: str | Path, name: str | None = None) -> Heldout:
    """A held-out file of your own: records in any format `data.load_records` reads, or an object
    {"name", "identity": [questions], "ordinary": [questions]} as dataset/heldout/identity.json."""
    path = Path(path)
    raw = json.loads(path.read_text(encoding="utf-8")) if path.suffix == ".json" else None
    if isinstance(raw, dict) and {"identity", "ordinary"} <= set(raw):
        records = ([_question(q, "identity") for q in raw["identity"]]
                   + [_question(q, "ordinary") for q in raw["ordinary"]])
        return Heldout(records, name or raw.get("name"), path.name)
    return Heldout(_kinds(data.load_records(path, on_error="skip")[0], name), name, path.name)


def split_heldout(ds, name: str | None = None, share: float = 0.2, seed: int = 42):
    """No held-out file: split `share` of the records off (never trained on); returns
    (the training part, a Heldout of the rest). Small data pays for it: say so."""
    parts = data.split(ds, eval_fraction=share, seed=seed)
    records = [dict(r) for r in parts["eval"]]
    note = f"{len(records)} of {len(ds)} records split off your data (data.split, seed {seed})"
    return parts["train"], Heldout(_kinds(records, name), name, note)


def _pick(held: Heldout, limit: int) -> list[dict]:
    """At most `limit` records: half identity and half ordinary where they are marked."""
    if any(r.get("kind") for r in held.records):
        return held.of_kind("identity")[: limit // 2] + held.of_kind("ordinary")[: limit // 2]
    return held.records[:limit]


def heldout_prompts(tutorial: Tutorial, limit: int) -> list[str]:
    """The questions `evaluate` asks by default (the tutorial's own held-out set), in its order:
    what `deploy.verify` asks every exported form."""
    return [data.to_messages(r)[-2]["content"] for r in _pick(course_heldout(tutorial), limit)]


def evaluate(model, tokenizer, tutorial: Tutorial, label: str = "", smoke_mode: bool | None = None,
             seed: int = 42, heldout: Heldout | None = None) -> Report:
    """Run a held-out set (default: the tutorial's own, `course_heldout`) through
    `inference.chat` (greedy) and count what it shows.

    The caller's random state is restored afterwards, so a training cell after this one runs
    exactly as it would without it.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _evaluate(model, tokenizer, tutorial, label,
                         registry.smoke_mode() if smoke_mode is None else smoke_mode,
                         heldout or course_heldout(tutorial))


def _evaluate(model, tokenizer, tutorial: Tutorial, label: str, smoke: bool, held: Heldout) -> Report:
    limit, max_new = budget(tutorial, smoke)
    was_training = model.training
    model.eval()
    asked = _pick(held, limit)
    scored = [r for r in asked if r["output"]]
    try:
        replies = [inference.chat(model, tokenizer, data.to_messages(r, tutorial.system_prompt)[:-1],
                                  tutorial.family, max_new_tokens=max_new) for r in asked]
        loss, accuracy = heldout_scores(model, tokenizer, tutorial, scored) if scored else (None, None)
    finally:
        model.train(was_training)
    answers = {data.to_messages(r)[-2]["content"]: reply.text for r, reply in zip(asked, replies)}

    def share(kind: str, with_name: bool) -> float | None:
        hits = [(held.name in reply.text) == with_name for r, reply in zip(asked, replies)
                if r.get("kind") == kind]
        return sum(hits) / len(hits) if hits and held.name else None

    return Report(label, len(asked), max_new, sum(r.stopped for r in replies) / len(replies),
                  sum(len(r.token_ids) for r in replies) / len(replies), share("identity", True),
                  share("ordinary", False), loss, accuracy, answers,
                  {kind: sum(r.get("kind") == kind for r in asked) for kind in ("identity", "ordinary")})


def draw(reports: list[Report]):
    """Bars of each share (left) and the held-out loss or answer length (right), each bar with
    its value on it: a "before" of 0 is a bar you cannot see, but its 0.00 you can read."""
    from matplotlib.figure import Figure  # no pyplot: nothing global, no backend to choose

    fig = Figure(figsize=(8, 3.2))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]})
    shares = [n for n in ROWS[:4] if getattr(reports[0], n) is not None]
    scale = "heldout_loss" if reports[0].heldout_loss is not None else "mean_new_tokens"
    width = 0.8 / len(reports)
    for i, r in enumerate(reports):
        bars = left.bar([j + i * width for j in range(len(shares))], [getattr(r, n) for n in shares],
                        width, label=r.label)
        left.bar_label(bars, fmt="%.2f", fontsize=8)
        right.bar_label(right.bar([i], [getattr(r, scale)], 0.6, label=r.label, color=f"C{i}"),
                        fmt="%.2f" if scale == "heldout_loss" else "%.1f", fontsize=8)
    left.set_xticks([j + width * (len(reports) - 1) / 2 for j in range(len(shares))], shares)
    left.set_ylim(0, 1.15)  # room for the labels above a share of 1
    left.set_ylabel("share (held-out set)")
    left.legend(loc="lower right")
    right.set_xticks(range(len(reports)), [r.label for r in reports])
    right.set_title(scale)
    right.margins(y=0.15)
    fig.tight_layout()
    return fig


def figure(reports: list[Report], path: str | Path) -> Path:
    """`draw`, saved as a PNG."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    draw(reports).savefig(path, dpi=100)
    return Path(path)
