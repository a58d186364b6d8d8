"""Load instruction records (Chat-甄嬛 style) with validation, then turn them into datasets.

Every tutorial trains on a JSON list of ``{"instruction", "input", "output"}`` records. A single bad
record (a number where a string belongs, an empty answer, a broken JSONL line) otherwise surfaces
much later as a cryptic tokenizer or collator error, so this module checks each record up front and
names the file, the record and the field in its message. It also reports what it dropped and why,
because silently losing data is the other classic fine-tuning surprise.

Records may additionally carry an optional ``system`` prompt and a ``history`` of earlier
``[user, assistant]`` turns (the format LLaMA-Factory and the seeds' multi-turn examples use).
A ShareGPT record (``conversations`` of ``{"from", "value"}`` turns) or an OpenAI-style one
(``messages`` of ``{"role", "content"}``) is read into the same shape: its last answer becomes
``output``, the turns before it ``history``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from . import registry

__all__ = [
    "DataError",
    "LoadReport",
    "find_huanhuan",
    "load_dataset",
    "load_records",
    "split",
    "to_messages",
]

#: The keys every returned record has, in this order.
RECORD_KEYS: tuple[str, ...] = ("instruction", "input", "output", "system", "history")

#: Values accepted for ``on_error``.
ON_ERROR_MODES: tuple[str, ...] = ("raise", "skip")

#: Environment variable pointing at the real Chat-甄嬛 file (never committed to the repository).
HUANHUAN_ENV = "SELFLLM_HUANHUAN"

_BOM = b"\xef\xbb\xbf"

#: Every special token of the course's chat families. Text that spells one is read by the
#: tokenizer as that token, so an answer containing ``<|im_end|>`` would train a stop id mid-answer.
SPECIAL_TOKENS: tuple[str, ...] = tuple(sorted({
    token
    for family in registry.FAMILIES.values()
    for token in (*family.special_tokens, *family.stop_tokens, family.bos_token)
    if token
}))

#: Chat formats read into course records: the turn list's key, then the keys of role and text.
CHAT_FORMATS: dict[str, tuple[str, str]] = {
    "conversations": ("from", "value"),  # ShareGPT
    "messages": ("role", "content"),  # OpenAI chat
}

#: Role names of those formats, mapped to the course's roles.
CHAT_ROLES: dict[str, str] = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
}


class DataError(ValueError):
    """A data file or one of its records is unusable.

    Subclasses ``ValueError`` so callers that already catch bad values keep working. The message
    always starts with the file name and, when the problem belongs to one record, its 1-based
    number (the line number for JSONL), so a learner can open the file at the right place.

    Attributes:
        file: File name the problem was found in.
        record: 1-based record number (line number for JSONL), or None for whole-file problems.
        field: The offending field, or None.
        problem: The message without the location prefix (used as the skip reason).
    """

    def __init__(
        self,
        problem: str,
        *,
        file: str,
        record: int | None = None,
        field: str | None = None,
        unit: str = "record",
    ) -> None:
        """Build the message ``"<file>, <unit> <record>: <problem>"`` and keep the parts."""
        where = file if record is None else f"{file}, {unit} {record}"
        super().__init__(f"{where}: {problem}")
        self.file = file
        self.record = record
        self.field = field
        self.problem = problem


@dataclass
class LoadReport:
    """What ``load_records`` read, kept and dropped, so a notebook can show it in one print.

    Attributes:
        path: The file that was read.
        read: Number of records found in the file.
        kept: Number of records returned.
        skipped: ``(record number, reason)`` for every record not returned.
        warnings: File-level remarks that did not drop anything (unknown keys, long records,
            stripped answers).
        stripped: Answers (``output`` or a history answer) whose surrounding whitespace was removed.
    """

    path: str
    read: int
    kept: int
    skipped: list[tuple[int, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stripped: int = 0

    def __str__(self) -> str:
        """Summarise in a few lines: totals, skip reasons grouped with counts, then warnings."""
        name = Path(self.path).name
        lines = [
            f"{self.read} records read from {name}: {self.kept} kept, {len(self.skipped)} skipped"
        ]
        for reason, numbers in _group_reasons(self.skipped).items():
            shown = ", ".join(str(n) for n in numbers[:5]) + (", ..." if len(numbers) > 5 else "")
            lines.append(f"  skipped {len(numbers)} x {reason} (records {shown})")
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def _group_reasons(skipped: list[tuple[int, str]]) -> dict[str, list[int]]:
    """Group skip reasons that differ only in numbers ("duplicate of record 3" and "... 9").

    Without this, 100 duplicates would print 100 lines; with it they print one line and a count.
    """
    groups: dict[str, list[int]] = {}
    for number, reason in skipped:
        groups.setdefault(re.sub(r"\d+", "N", reason), []).append(number)
    return groups


def _type_name(value: Any) -> str:
    """Name a JSON value's type the way a learner reading the file thinks of it."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "object"
    return {list: "array", bool: "bool"}.get(type(value), type(value).__name__)


def _read_text(path: Path) -> str:
    """Read a data file as UTF-8 text, refusing missing, empty or non-UTF-8 files.

    A UTF-8 BOM (Windows editors add one) is dropped rather than treated as an error. For bad
    bytes the message gives the byte offset and line, because "invalid start byte" alone leaves the
    learner searching a 1 MB file.

    Raises:
        DataError: the file is missing, empty, whitespace-only or not UTF-8.
    """
    name = path.name
    if not path.is_file():
        raise DataError(f"file not found (looked at {path})", file=name)
    raw = path.read_bytes()
    offset = 0
    if raw.startswith(_BOM):
        raw, offset = raw[len(_BOM) :], len(_BOM)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"not UTF-8: byte 0x{raw[err.start]:02x} at byte offset {err.start + offset} "
            f"(line {line}); re-save the file as UTF-8",
            file=name,
        ) from None
    if not text.strip():
        raise DataError(
            "file is empty" if not text else "file is empty (only whitespace)", file=name
        )
    return text


class _Object(dict):
    """A JSON object as parsed, remembering keys it held twice (`duplicates`), nested ones too."""

    duplicates: tuple[str, ...] = ()


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    """`json.loads` hook: a plain dict would keep the last of two equal keys without a word."""
    obj = _Object(pairs)
    counts = Counter(key for key, _ in pairs)
    duplicates = [key for key, n in counts.items() if n > 1]
    for key, value in obj.items():
        for child in value if isinstance(value, list) else [value]:
            duplicates += [f"{key}.{inner}" for inner in getattr(child, "duplicates", ())]
    if duplicates:
        obj.duplicates = tuple(duplicates)
    return obj


def _unreadable(err: Exception, text: str, whole_file: bool) -> str:
    """The problem text for JSON that is valid but beyond Python's reader: nesting deeper than
    its recursion limit, or an integer longer than its digit limit (both raise without a place)."""
    if isinstance(err, RecursionError):
        return "nested too deeply to read (arrays or objects inside each other ~1000 levels)"
    digits = re.search(r"\d{%d,}" % (sys.get_int_max_str_digits() + 1), text)
    where = f" at line {text.count(chr(10), 0, digits.start()) + 1}" if digits and whole_file else ""
    return f"a number too long to read{where} ({err}); records hold text, not numbers"


def _parse_json(text: str, name: str) -> list[tuple[int, Any]]:
    """Parse a ``.json`` file that must hold a list; return ``(record number, value)`` pairs.

    Raises:
        DataError: invalid JSON (with line and column) or a top level that is not a list.
    """
    try:
        value = json.loads(text, object_pairs_hook=_object)
    except json.JSONDecodeError as err:
        raise DataError(
            f"not valid JSON at line {err.lineno}, column {err.colno}: {err.msg}", file=name
        ) from None
    except (RecursionError, ValueError) as err:
        raise DataError(_unreadable(err, text, True), file=name) from None
    if not isinstance(value, list):
        raise DataError(
            f"top level must be a JSON array (list) of records, got {_type_name(value)}", file=name
        )
    return list(enumerate(value, start=1))


def _parse_jsonl(text: str, name: str) -> list[tuple[int, Any]]:
    """Parse a ``.jsonl`` file, one value per line; blank lines are ignored.

    The record number is the line number, so it matches what an editor shows.

    Raises:
        DataError: a line is not valid JSON (naming the line and column).
    """
    items = []
    # "\n" only: str.splitlines also splits on U+2028, U+0085 and others, which JSON allows
    # unescaped inside strings, and would cut such a line in two
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            items.append((lineno, json.loads(line, object_pairs_hook=_object)))
        except json.JSONDecodeError as err:
            raise DataError(
                f"not valid JSON at column {err.colno}: {err.msg}",
                file=name,
                record=lineno,
                unit="line",
            ) from None
        except (RecursionError, ValueError) as err:
            raise DataError(_unreadable(err, line, False), file=name, record=lineno,
                            unit="line") from None
    return items


def _check_string(record: dict, key: str, *, required: bool) -> str:
    """Return ``record[key]`` as a string, or raise a problem message (without location).

    Raises:
        ValueError: with the problem text; the caller adds file and record number.
    """
    if key not in record or (record[key] is None and not required):
        if required:
            raise ValueError(f"field '{key}' is missing")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"field '{key}' must be a string, got {_type_name(value)}")
    return value


def _check_text(value: str, where: str, *, nonempty: bool = False) -> None:
    """Refuse text the tokenizer cannot take as plain words.

    A lone surrogate (half of an emoji pair, e.g. ``"\\ud83d"``) cannot be encoded at all, and
    pyarrow would fail on it later without naming the record; a spelled special token becomes
    that token's id, so a stop token would sit inside the labels. ``where`` names the field.

    Raises:
        ValueError: with the problem text naming ``where``.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{where} is not valid Unicode text: lone surrogate {ascii(value[err.start])[1:-1]} at "
            f"character {err.start + 1} (half of an emoji?); fix or remove it"
        ) from None
    token = next((t for t in SPECIAL_TOKENS if t in value), None)
    if token is not None:
        raise ValueError(
            f"{where} spells the special token {token}: the tokenizer would read it as that "
            "token, not as text; remove or reword it"
        )
    if nonempty and not value.strip():
        raise ValueError(f"{where} is empty: every turn needs text")


def _check_history(value: Any) -> list[list[str]]:
    """Validate ``history``: a list of ``[user, assistant]`` string pairs (null means none).

    Raises:
        ValueError: with the problem text naming the first bad pair (1-based).
    """
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(
            f"field 'history' must be a list of [user, assistant] pairs, got {_type_name(value)}"
        )
    pairs = []
    for i, pair in enumerate(value, start=1):
        if not (
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)
        ):
            got = f"array of {len(pair)}" if isinstance(pair, list) else _type_name(pair)
            raise ValueError(
                f"field 'history' item {i} must be a [user, assistant] pair of strings, got {got}"
            )
        _check_text(pair[0], f"field 'history' item {i} (question)", nonempty=True)
        _check_text(pair[1], f"field 'history' item {i} (answer)", nonempty=True)
        pairs.append([pair[0], pair[1]])
    return pairs


def _from_chat(value: dict, key: str) -> dict[str, Any]:
    """Read a ShareGPT / OpenAI-style record (``key`` holds its turns) as a course record.

    An optional system turn first, then user and assistant turns in strict alternation, ending
    with an answer: the last pair becomes instruction/output, the pairs before it the history.

    Raises:
        ValueError: with the problem text naming the turn (1-based) of field ``key``.
    """
    role_key, text_key = CHAT_FORMATS[key]
    turns = value[key]
    if not isinstance(turns, list) or not turns:
        got = "an empty list" if turns == [] else _type_name(turns)
        raise ValueError(f"field '{key}' must be a non-empty list of turns, got {got}")
    system, texts = value.get("system"), []
    for i, turn in enumerate(turns, start=1):
        where = f"field '{key}' item {i}"
        if not isinstance(turn, dict) or not all(
            isinstance(turn.get(k), str) for k in (role_key, text_key)
        ):
            raise ValueError(f"{where} must be an object with string '{role_key}' and '{text_key}'")
        role = CHAT_ROLES.get(turn[role_key])
        if role == "system" and i == 1:
            system = turn[text_key]
            continue
        expected = "user" if len(texts) % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"{where} is a {turn[role_key]!r} turn where a {expected} turn belongs "
                             "(an optional system turn first, then user and assistant in turn)")
        _check_text(turn[text_key], where, nonempty=True)
        texts.append(turn[text_key])
    if len(texts) % 2:
        raise ValueError(f"field '{key}' ends with a user turn: the last turn must be the answer")
    pairs = [texts[j : j + 2] for j in range(0, len(texts), 2)]
    return {"instruction": pairs[-1][0], "output": pairs[-1][1], "system": system,
            "history": pairs[:-1]}


def _normalise(value: Any) -> tuple[dict[str, Any], int]:
    """Validate one record and return it with exactly the keys of ``RECORD_KEYS``.

    ``input`` defaults to "" and ``system`` to None (an empty system prompt counts as none), so
    later code never has to ask whether a key exists. Answers lose surrounding whitespace: a
    tokenizer such as Qwen2's merges an answer's leading spaces or newlines with the template's
    "assistant\\n", so the next turn's inference prompt would not tokenize like the trained prefix.

    Returns:
        The record and how many of its answers had whitespace stripped.

    Raises:
        ValueError: with the problem text; the caller adds file and record number.
    """
    if not isinstance(value, dict):
        raise ValueError(f"record must be a JSON object, got {_type_name(value)}")
    twice = getattr(value, "duplicates", ())
    if twice:
        raise ValueError(f"field '{twice[0]}' appears twice in the record: JSON keeps only the "
                         "last value; remove one")
    formats = [k for k in ("instruction", *CHAT_FORMATS) if k in value]
    if len(formats) > 1:
        raise ValueError(f"field '{formats[1]}' is a second conversation next to '{formats[0]}': "
                         "only one would train; keep one format a record")
    chat = next((k for k in CHAT_FORMATS if k in value), None)
    if chat:
        value = _from_chat(value, chat)
    texts = {
        key: _check_string(value, key, required=key in ("instruction", "output"))
        for key in ("instruction", "input", "output", "system")
    }
    for key, text in texts.items():
        _check_text(text, f"field '{key}'")
    if not texts["instruction"].strip():
        raise ValueError("field 'instruction' is empty: the model would learn to answer no question "
                         "('input' is only appended to the instruction)")
    if not texts["output"].strip():
        raise ValueError("field 'output' is empty: the model would learn to answer nothing")
    history = _check_history(value.get("history"))
    answers = [texts["output"]] + [pair[1] for pair in history]
    stripped = sum(answer != answer.strip() for answer in answers)
    return {
        "instruction": texts["instruction"],
        "input": texts["input"],
        "output": texts["output"].strip(),
        "system": texts["system"] or None,
        "history": [[user, answer.strip()] for user, answer in history],
    }, stripped


def _field_of(problem: str) -> str | None:
    """Extract the field name quoted in a problem message, for ``DataError.field``."""
    match = re.search(r"field '(\w+)'", problem)
    return match.group(1) if match else None


def _length(record: dict[str, Any]) -> int:
    """Count all characters a record contributes to a training sequence (before the template)."""
    texts = [record["instruction"], record["input"], record["output"], record["system"] or ""]
    return sum(map(len, texts)) + sum(len(t) for pair in record["history"] for t in pair)


def _summary_warnings(
    kept: list[dict], unknown: Counter, n_unknown: int, max_chars: int
) -> list[str]:
    """Build the one-line-each warnings for unknown keys and overlong records."""
    warnings = []
    if n_unknown:
        keys = ", ".join(f"'{k}'" for k in sorted(unknown))
        warnings.append(f"{n_unknown} records have unknown keys, ignored: {keys}")
    n_long = sum(1 for r in kept if _length(r) > max_chars)
    if n_long:
        warnings.append(
            f"{n_long} records are longer than {max_chars} characters; "
            "they will be truncated at tokenisation"
        )
    return warnings


def _collect(
    items: list[tuple[int, Any]],
    report: LoadReport,
    *,
    name: str,
    jsonl: bool,
    on_error: str,
    dedupe: bool,
) -> tuple[list[dict], Counter, int]:
    """Validate and de-duplicate parsed values, appending skip reasons to ``report``.

    Returns:
        The kept records, a count of each unknown key, and how many kept records had any.

    Raises:
        DataError: a record is bad and ``on_error == "raise"``.
    """
    kept: list[dict] = []
    first_seen: dict[str, int] = {}
    unknown: Counter = Counter()
    n_unknown = 0
    for number, value in items:
        try:
            record, stripped = _normalise(value)
        except ValueError as err:
            if on_error == "raise":
                unit = "line" if jsonl else "record"
                raise DataError(
                    str(err), file=name, record=number, field=_field_of(str(err)), unit=unit
                ) from None
            report.skipped.append((number, str(err)))
            continue
        key = json.dumps([record[k] for k in RECORD_KEYS], ensure_ascii=False)
        if dedupe and key in first_seen:
            report.skipped.append((number, f"duplicate of record {first_seen[key]}"))
            continue
        first_seen.setdefault(key, number)
        report.stripped += stripped
        extra = set(value) - set(RECORD_KEYS) - set(CHAT_FORMATS)
        unknown.update(extra)
        n_unknown += bool(extra)
        kept.append(record)
    return kept, unknown, n_unknown


def load_records(
    path: str | os.PathLike[str],
    *,
    on_error: str = "raise",
    max_chars: int = 4000,
    dedupe: bool = True,
) -> tuple[list[dict], LoadReport]:
    """Read and validate instruction records from a ``.json`` list or a ``.jsonl`` file.

    Whole-file problems always raise, because nothing useful can be loaded. A bad record raises by
    default (``on_error="raise"``) so mistakes are seen; ``on_error="skip"`` drops it and records
    the reason in the report instead, for large scraped sets where a few bad rows are expected.
    Exact duplicates are dropped (when ``dedupe``), because repeated examples are over-weighted in
    training; they are reported, never treated as errors.

    Args:
        path: The ``.json`` or ``.jsonl`` file.
        on_error: "raise" or "skip": what to do with a bad record.
        max_chars: Records longer than this (all fields together) are kept but counted in a warning.
        dedupe: Drop records identical to an earlier one in all fields.

    Returns:
        The records, each with exactly the keys instruction, input, output, system (str or None)
        and history (list of [user, assistant] lists), and a ``LoadReport``.

    Raises:
        ValueError: ``on_error`` is not "raise" or "skip", or ``max_chars`` is below 1.
        DataError: the file is unusable, or a record is bad and ``on_error="raise"``.
    """
    if on_error not in ON_ERROR_MODES:
        raise ValueError(f"on_error must be one of {ON_ERROR_MODES}, got {on_error!r}")
    if max_chars < 1:
        raise ValueError(f"max_chars must be at least 1, got {max_chars}")
    path = Path(path)
    name, jsonl = path.name, path.suffix.lower() == ".jsonl"
    if path.suffix.lower() not in (".json", ".jsonl"):
        raise DataError(
            f"unsupported file type {path.suffix!r}: expected .json or .jsonl", file=name
        )
    text = _read_text(path)
    items = _parse_jsonl(text, name) if jsonl else _parse_json(text, name)
    if not items:
        raise DataError("file contains no records", file=name)

    report = LoadReport(path=str(path), read=len(items), kept=0)
    kept, unknown, n_unknown = _collect(
        items, report, name=name, jsonl=jsonl, on_error=on_error, dedupe=dedupe
    )
    report.kept = len(kept)
    report.warnings = _summary_warnings(kept, unknown, n_unknown, max_chars)
    if report.stripped:
        report.warnings.append(
            f"{report.stripped} answers began or ended with whitespace, stripped (Qwen2 would "
            "tokenize a leading one differently at inference)"
        )
    return kept, report


#: Column types for ``load_dataset``: spelled out so an all-empty ``history`` column (or an all-None
#: ``system`` column) still gets string types instead of ``null``, which would break concatenation.
FEATURES = datasets.Features(
    {
        "instruction": datasets.Value("string"),
        "input": datasets.Value("string"),
        "output": datasets.Value("string"),
        "system": datasets.Value("string"),
        "history": datasets.List(datasets.List(datasets.Value("string"))),
    }
)


def load_dataset(path: str | os.PathLike[str], **kw: Any) -> tuple[datasets.Dataset, LoadReport]:
    """Load and validate records, then wrap them as a ``datasets.Dataset`` with fixed column types.

    Args:
        path: The ``.json`` or ``.jsonl`` file.
        **kw: Passed to ``load_records`` (on_error, max_chars, dedupe).

    Returns:
        The dataset (columns instruction, input, output, system, history) and the ``LoadReport``.

    Raises:
        ValueError: see ``load_records``.
        DataError: see ``load_records``.
    """
    records, report = load_records(path, **kw)
    return datasets.Dataset.from_list(records, features=FEATURES), report


def to_messages(record: dict, system: str | None = None) -> list[dict[str, str]]:
    """Turn one record into chat messages for ``tokenizer.apply_chat_template``.

    The record's own system prompt wins over the ``system`` argument (a default for the whole
    run); with neither, no system message is added and the template may insert its own default.
    ``input`` is appended to the instruction on a new line, as the seed tutorials do.

    Args:
        record: A record from ``load_records`` or a row of ``load_dataset`` (missing optional keys
            are treated as empty).
        system: Fallback system prompt.

    Returns:
        Messages ``{"role", "content"}`` in the order system, history turns, user, assistant.
    """
    messages: list[dict[str, str]] = []
    chosen = record.get("system") or system
    if chosen:
        messages.append({"role": "system", "content": chosen})
    for user, assistant in record.get("history") or []:
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": assistant})
    user = record["instruction"] + ("\n" + record["input"] if record.get("input") else "")
    messages.append({"role": "user", "content": user})
    messages.append({"role": "assistant", "content": record["output"]})
    return messages


def find_huanhuan() -> Path | None:
    """Locate the real Chat-甄嬛 file (3,729 records), which the repository does not ship.

    The environment variable wins, so a learner can keep the file anywhere; if it is set but the
    file is missing the answer is None rather than a silent fall-back to another copy. Otherwise
    look in ``<repo root>/../shared/data/`` (the course's shared folder) and the working directory.

    Returns:
        The path of an existing file, or None.
    """
    env = os.environ.get(HUANHUAN_ENV)
    if env:
        candidate = Path(env).expanduser()
        return candidate if candidate.is_file() else None
    repo_root = Path(__file__).resolve().parent.parent
    for candidate in (
        repo_root.parent / "shared" / "data" / "huanhuan.json",
        Path.cwd() / "huanhuan.json",
    ):
        if candidate.is_file():
            return candidate
    return None


def split(ds: datasets.Dataset, eval_fraction: float = 0.1, seed: int = 42) -> datasets.DatasetDict:
    """Split a dataset into "train" and "eval" parts, reproducibly.

    A held-out part shows whether the loss falls because the model learns the style or because it
    memorises; the fixed seed makes every run (and the smoke test) see the same split.

    Args:
        ds: The dataset to split.
        eval_fraction: Share of records for evaluation, strictly between 0 and 1.
        seed: Shuffle seed.

    Returns:
        A ``DatasetDict`` with keys "train" and "eval".

    Raises:
        ValueError: ``eval_fraction`` is not strictly between 0 and 1.
    """
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be strictly between 0 and 1, got {eval_fraction}")
    parts = ds.train_test_split(test_size=eval_fraction, seed=seed)
    return datasets.DatasetDict({"train": parts["train"], "eval": parts["test"]})
