"""Chat records to training tensors: the tokenizer's own chat template, answers as the only labels.

The seeds wrote each model's prompt format by hand and appended the pad token as the "end";
the course renders through `tokenizer.apply_chat_template`, so training and inference share one
format, and trains the family's real end-of-turn token, so the tuned model knows when to stop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import data
from .registry import ChatFamily, Tutorial

IGNORE = -100  # label value that cross-entropy skips: the prompt is context, not a target


def render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The conversation as text, exactly as the model's chat template writes it."""
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def split_turns(tokenizer, messages: list[dict[str, str]], family: ChatFamily) -> list[tuple[str, bool]]:
    """Cut a rendered conversation into (text, is_target) pieces.

    Each assistant answer is a target together with the stop token that follows it in the
    rendering. Where the template writes no stop token after the last answer (Qwen1.5, GLM-4),
    the family's end-of-turn token is appended, so the model still learns to end its turn.
    Anything after the last answer (a trailing newline) is dropped: it would only be padding.
    """
    full = render(tokenizer, messages)
    pieces: list[tuple[str, bool]] = []
    done = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True)
        start = full.find(message["content"], len(prompt))
        if not full.startswith(prompt) or start < 0:
            raise ValueError(f"the chat template of {family.name} does not render message {i} "
                             "after its prompt; cannot tell the answer from the prompt")
        end = start + len(message["content"])
        stop = next((s for s in family.stop_tokens if full.startswith(s, end)), None)
        pieces.append((full[done:len(prompt)], False))
        if stop is None:
            if full[end:].strip():
                raise ValueError(f"answer {i} is followed by neither a stop token nor the end")
            pieces.append((full[len(prompt):end] + family.end_of_turn, True))
        else:
            pieces.append((full[len(prompt):end + len(stop)], True))
        done = end + (len(stop) if stop else 0)
    if not pieces:
        raise ValueError("the conversation has no assistant message to learn from")
    return pieces


ROLES = ("system", "user", "assistant")


def check_messages(messages: list[dict[str, str]]) -> None:
    """One clear error naming the message and the field, before a chat template sees them.

    Templates skip a role they do not know ("asistant": that turn would vanish from training)
    and fail deep inside jinja on content that is not text.
    """
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} is a {type(message).__name__}, not a dict with "
                             "'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i}: field 'role' is {role!r}, not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"message {i} ({role}): field 'content' is "
                             f"{'None' if content is None else type(content).__name__}, not text")


def tokenize_messages(messages: list[dict[str, str]], tokenizer, family: ChatFamily,
                      max_length: int | None = None) -> dict[str, list[int]]:
    """Token ids, attention mask and labels of one conversation.

    Pieces are tokenized one by one, so the prompt has exactly the ids it gets at inference.
    Over `max_length`, the last answer is cut but keeps its final (stop) token; a prompt that
    leaves no room for an answer gives empty lists, which `build_dataset` counts and drops.
    """
    check_messages(messages)
    input_ids: list[int] = []
    labels: list[int] = []
    for text, is_target in split_turns(tokenizer, messages, family):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if is_target else [IGNORE] * len(ids)
    if max_length is not None and len(input_ids) > max_length:
        prompt_len = max(i for i, x in enumerate(labels) if x == IGNORE) + 1
        if prompt_len >= max_length - 1:
            return {"input_ids": [], "attention_mask": [], "labels": []}
        keep = max_length - 1
        input_ids = input_ids[:keep] + input_ids[-1:]
        labels = labels[:keep] + labels[-1:]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


@dataclass
class FormatReport:
    """What tokenization did to a dataset: nothing is cut or dropped without being counted."""

    examples: int
    truncated: int
    dropped: int
    tokens: int
    max_length: int
    lengths: list[int] = field(default_factory=list, repr=False)  # each chat's tokens before any cut

    def against(self, budget: int | None) -> str:
        """One line: how the chats' lengths meet max_length and a step's token budget."""
        n = len(self.lengths) or 1
        mean = sum(self.lengths) / n
        over = sum(x > self.max_length for x in self.lengths)
        line = (f"{len(self.lengths)} chats, {min(self.lengths, default=0)}-{max(self.lengths, default=0)} "
                f"tokens (mean {mean:.0f}); {over} longer than max_length={self.max_length} (cut)")
        if budget:
            line += f"; a micro-batch of {budget:,} tokens holds about {budget / max(mean, 1):.0f} of them"
        return line

    def __str__(self) -> str:
        return (f"{self.examples} examples, {self.tokens} tokens (mean "
                f"{self.tokens / max(self.examples, 1):.0f}); {self.truncated} answers cut to "
                f"max_length={self.max_length} (end token kept), {self.dropped} dropped "
                "(prompt longer than max_length)")


def build_dataset(ds, tokenizer, tutorial: Tutorial, system: str | None = None,
                  max_length: int | None = None):
    """Tokenize a dataset of instruction records with `datasets.map`; returns (dataset, report).

    `system` defaults to the tutorial's system prompt; pass "" for the model's own default.
    """
    system = tutorial.system_prompt if system is None else system
    max_length = max_length or tutorial.config.max_length

    def one(record: dict) -> dict:
        messages = data.to_messages(record, system=system or None)
        full = tokenize_messages(messages, tokenizer, tutorial.family)
        out = full if len(full["input_ids"]) <= max_length else tokenize_messages(
            messages, tokenizer, tutorial.family, max_length)
        return {**out, "cut": len(full["input_ids"]) > max_length, "length": len(full["input_ids"])}

    mapped = ds.map(one, remove_columns=ds.column_names, desc="tokenizing")
    cut = sum(mapped["cut"])
    kept = mapped.filter(lambda ex: len(ex["input_ids"]) > 0).remove_columns(["cut", "length"])
    report = FormatReport(len(kept), cut - (len(mapped) - len(kept)), len(mapped) - len(kept),
                          sum(len(x) for x in kept["input_ids"]), max_length, mapped["length"])
    return kept, report


def label_view(tokenizer, features: dict[str, list[int]], marks: tuple[str, str] = ("【", "】")) -> str:
    """One example as the model reads it, the trained tokens (labels not IGNORE) between `marks`:
    what the loss will teach, seen before training (as LLaMA-Factory's and axolotl's previews)."""
    spans: list[tuple[bool, list[int]]] = []
    for token, label in zip(features["input_ids"], features["labels"]):
        trained = label != IGNORE
        if not spans or spans[-1][0] != trained:
            spans.append((trained, []))
        spans[-1][1].append(token)
    return "".join(marks[0] + tokenizer.decode(ids) + marks[1] if trained else tokenizer.decode(ids)
                   for trained, ids in spans)


def length_figure(report: FormatReport, budget: int | None, path: str | Path) -> Path:
    """A histogram of the chats' token lengths against max_length (longer ones are cut) and the
    token budget of a micro-batch (`report.against(budget)` as its title). Saved as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: nothing global, no backend to choose

    fig = Figure(figsize=(7, 3))
    ax = fig.subplots()
    ax.hist(report.lengths, bins=min(30, max(5, len(report.lengths) // 3)), color="C0")
    ax.axvline(report.max_length, color="C3", linestyle="--", label=f"max_length {report.max_length}")
    if budget and budget <= 2 * max(report.lengths, default=0):  # else it squeezes the bars flat
        ax.axvline(budget, color="C2", linestyle=":", label=f"token budget {budget:,}")
    ax.set_xlabel("tokens per chat (before cutting)")
    ax.set_ylabel("chats")
    ax.set_title(report.against(budget).replace("; a micro", ";\na micro"), fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return Path(path)
