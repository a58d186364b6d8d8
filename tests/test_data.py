"""Tests for selfllm_utils.data: every malformed input names file, record and field."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from selfllm_utils import data, formatting, registry
from selfllm_utils.data import DataError, LoadReport, load_dataset, load_records, split, to_messages

DATASET_DIR = Path(__file__).resolve().parent.parent / "dataset"
SHIPPED = ["identity.json", "huanhuan_sample.json"]
HUANHUAN_RECORDS = 3729  # the public Chat-甄嬛 file, datawhalechina/self-llm dataset/huanhuan.json
HUANHUAN_EXACT_DUPLICATES = 112  # identical instruction/input/output triples in that file
IDENTITY_NAME = "不要葱姜蒜"


def _label_runs(labels: list[int]) -> list[list[int]]:
    """Contiguous stretches of trained labels (not -100): one per answer."""
    runs: list[list[int]] = []
    for i, label in enumerate(labels):
        if label != formatting.IGNORE:
            if i == 0 or labels[i - 1] == formatting.IGNORE:
                runs.append([])
            runs[-1].append(label)
    return runs


def good(i: int = 0, **extra: object) -> dict:
    """A valid record, distinct for each ``i``."""
    return {"instruction": f"问题{i}", "input": "", "output": f"回答{i}", **extra}


def write_json(tmp_path: Path, value: object, name: str = "d.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(tmp_path: Path, lines: list[str], name: str = "d.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- whole-file problems always raise -------------------------------------------------------


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nothere\.json: file not found"):
        load_records(tmp_path / "nothere.json")


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_empty_or_whitespace_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=r"^empty\.json: file is empty"):
        load_records(path, on_error="skip")  # structural: raises even in skip mode


def test_not_json_gives_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  oops\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json: not valid JSON at line 3, column 3"):
        load_records(path)


def test_top_level_dict_rejected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"d\.json: top level must be a JSON array .*got object"):
        load_records(write_json(tmp_path, {"instruction": "a", "output": "b"}), on_error="skip")


def test_empty_list_rejected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no records"):
        load_records(write_json(tmp_path, []))


def test_list_of_non_objects(tmp_path: Path) -> None:
    path = write_json(tmp_path, [good(1), ["a", "b"], "text"])
    with pytest.raises(DataError) as err:
        load_records(path)
    assert str(err.value) == "d.json, record 2: record must be a JSON object, got array"
    records, report = load_records(path, on_error="skip")
    assert len(records) == 1
    assert report.skipped == [
        (2, "record must be a JSON object, got array"),
        (3, "record must be a JSON object, got str"),
    ]


def test_broken_jsonl_line_names_line_number(tmp_path: Path) -> None:
    lines = [json.dumps(good(1)), "", json.dumps(good(2)), '{"instruction": "x", "output": ']
    path = write_jsonl(tmp_path, lines)
    with pytest.raises(DataError, match=r"^d\.jsonl, line 4: not valid JSON"):
        load_records(path, on_error="skip")


def test_jsonl_blank_lines_ignored_and_line_numbers_used(tmp_path: Path) -> None:
    lines = [json.dumps(good(1)), "", "   ", json.dumps({"instruction": "q", "output": 5})]
    path = write_jsonl(tmp_path, lines)
    with pytest.raises(
        DataError, match=r"^d\.jsonl, line 4: field 'output' must be a string, got int$"
    ):
        load_records(path)
    records, report = load_records(path, on_error="skip")
    assert (len(records), report.read, report.skipped[0][0]) == (1, 2, 4)


def test_bom_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([good(1)], ensure_ascii=False).encode("utf-8"))
    records, report = load_records(path)
    assert records[0]["instruction"] == "问题1"
    assert (report.kept, report.skipped, report.warnings) == (1, [], [])


def test_non_utf8_names_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "gbk.json"
    prefix = b'[{"instruction": "'
    path.write_bytes(prefix + "你好".encode("gbk") + b'", "output": "x"}]')
    with pytest.raises(
        DataError, match=rf"gbk\.json: not UTF-8: byte 0x.. at byte offset {len(prefix)} \(line 1\)"
    ):
        load_records(path)


def test_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("instruction,output\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.csv: unsupported file type"):
        load_records(path)


# --- one bad record -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "field", "problem"),
    [
        ({"output": "b"}, "instruction", "field 'instruction' is missing"),
        ({"instruction": "a"}, "output", "field 'output' is missing"),
        ({"instruction": "a", "output": 17}, "output", "field 'output' must be a string, got int"),
        (
            {"instruction": None, "output": "b"},
            "instruction",
            "field 'instruction' must be a string, got null",
        ),
        (
            {"instruction": "a", "input": ["x"], "output": "b"},
            "input",
            "field 'input' must be a string, got array",
        ),
        (
            {"instruction": "a", "output": "b", "system": 3},
            "system",
            "field 'system' must be a string, got int",
        ),
    ],
)
def test_bad_field_message_names_file_record_and_field(
    tmp_path: Path, record: dict, field: str, problem: str
) -> None:
    path = write_json(tmp_path, [good(1), good(2), record], name="huanhuan.json")
    with pytest.raises(DataError) as err:
        load_records(path)
    assert str(err.value) == f"huanhuan.json, record 3: {problem}"
    assert (err.value.file, err.value.record, err.value.field) == ("huanhuan.json", 3, field)


@pytest.mark.parametrize("output", ["", "   \n"])
def test_empty_output_rejected(tmp_path: Path, output: str) -> None:
    path = write_json(tmp_path, [good(1), {"instruction": "a", "output": output}])
    with pytest.raises(DataError, match=r"^d\.json, record 2: field 'output' is empty"):
        load_records(path)


@pytest.mark.parametrize(
    ("history", "problem"),
    [
        ("hi", "field 'history' must be a list of [user, assistant] pairs, got str"),
        (
            [["q", "a"], ["only one"]],
            "field 'history' item 2 must be a [user, assistant] pair of strings, got array of 1",
        ),
        (
            [["q", 1]],
            "field 'history' item 1 must be a [user, assistant] pair of strings, got array of 2",
        ),
        (
            [{"user": "q"}],
            "field 'history' item 1 must be a [user, assistant] pair of strings, got object",
        ),
    ],
)
def test_malformed_history(tmp_path: Path, history: object, problem: str) -> None:
    path = write_json(tmp_path, [good(1, history=history)])
    with pytest.raises(DataError) as err:
        load_records(path)
    assert str(err.value) == f"d.json, record 1: {problem}"
    assert err.value.field == "history"


def test_skip_mode_counts_and_report_text(tmp_path: Path) -> None:
    rows = [
        good(1),
        {"instruction": "a"},
        good(2),
        {"instruction": "b", "output": 3},
        {"instruction": "c"},
    ]
    records, report = load_records(write_json(tmp_path, rows, name="mix.json"), on_error="skip")
    assert [r["instruction"] for r in records] == ["问题1", "问题2"]
    assert (report.read, report.kept) == (5, 2)
    assert [n for n, _ in report.skipped] == [2, 4, 5]
    text = str(report)
    assert text.splitlines()[0] == "5 records read from mix.json: 2 kept, 3 skipped"
    assert "skipped 2 x field 'output' is missing (records 2, 5)" in text


def test_invalid_on_error_is_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="on_error.*'ignore'") as err:
        load_records(write_json(tmp_path, [good(1)]), on_error="ignore")
    assert not isinstance(err.value, DataError)


# --- duplicates and warnings ----------------------------------------------------------------


def test_duplicates_skipped_with_reason(tmp_path: Path) -> None:
    rows = [good(1), good(2), good(1), good(1, system="不同的系统提示"), good(2)]
    path = write_json(tmp_path, rows)
    records, report = load_records(path)  # duplicates are not errors, even with on_error="raise"
    assert len(records) == 3
    assert report.skipped == [(3, "duplicate of record 1"), (5, "duplicate of record 2")]
    assert "skipped 2 x duplicate of record N (records 3, 5)" in str(report)
    records, report = load_records(path, dedupe=False)
    assert (len(records), report.skipped) == (5, [])


def test_unknown_keys_one_warning(tmp_path: Path) -> None:
    rows = [good(1, source="web"), good(2, source="book", score=3), good(3)]
    records, report = load_records(write_json(tmp_path, rows))
    assert report.warnings == ["2 records have unknown keys, ignored: 'score', 'source'"]
    assert all(list(r) == ["instruction", "input", "output", "system", "history"] for r in records)


def test_long_records_kept_with_one_warning(tmp_path: Path) -> None:
    rows = [
        good(1),
        {"instruction": "长" * 30, "output": "答" * 30},
        {"instruction": "q", "output": "x" * 100},
    ]
    records, report = load_records(write_json(tmp_path, rows), max_chars=50)
    assert report.kept == 3
    assert len(report.warnings) == 1 and report.warnings[0].startswith(
        "2 records are longer than 50 characters"
    )
    assert "warning: 2 records are longer" in str(report)


def test_normalised_record_shape(tmp_path: Path) -> None:
    rows = [
        {"instruction": "a", "output": "b", "system": "", "history": None},
        good(2, system="S", history=[["u", "v"]]),
    ]
    records, _ = load_records(write_json(tmp_path, rows))
    assert records[0] == {
        "instruction": "a",
        "input": "",
        "output": "b",
        "system": None,
        "history": [],
    }
    assert records[1]["system"] == "S" and records[1]["history"] == [["u", "v"]]


# --- messages -------------------------------------------------------------------------------


def test_to_messages_system_precedence() -> None:
    own = {"instruction": "q", "input": "", "output": "a", "system": "own", "history": []}
    none = {**own, "system": None}
    assert to_messages(own, system="default")[0] == {"role": "system", "content": "own"}
    assert to_messages(none, system="default")[0] == {"role": "system", "content": "default"}
    assert [m["role"] for m in to_messages(none)] == ["user", "assistant"]
    assert [m["role"] for m in to_messages({**none, "system": ""}, system="")] == [
        "user",
        "assistant",
    ]


def test_to_messages_history_order_and_input_joining() -> None:
    record = {
        "instruction": "翻译",
        "input": "hello",
        "output": "你好",
        "system": None,
        "history": [["u1", "a1"], ["u2", "a2"]],
    }
    assert to_messages(record, system="S") == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"},
        {"role": "user", "content": "翻译\nhello"},
        {"role": "assistant", "content": "你好"},
    ]
    assert to_messages({"instruction": "q", "output": "a"})[0] == {"role": "user", "content": "q"}


# --- datasets -------------------------------------------------------------------------------


def test_load_dataset_features_with_empty_history(tmp_path: Path) -> None:
    ds, report = load_dataset(write_json(tmp_path, [good(i) for i in range(4)]))
    assert isinstance(ds, datasets.Dataset) and report.kept == 4
    assert ds.features == data.FEATURES
    assert ds.features["history"] == datasets.List(datasets.List(datasets.Value("string")))
    assert ds.features["system"] == datasets.Value("string")
    assert ds[0]["history"] == [] and ds[0]["system"] is None
    assert to_messages(ds[0])[-1] == {"role": "assistant", "content": "回答0"}


def test_load_dataset_passes_options(tmp_path: Path) -> None:
    ds, report = load_dataset(
        write_json(tmp_path, [good(1), {"instruction": "x"}]), on_error="skip"
    )
    assert len(ds) == 1 and len(report.skipped) == 1


def test_split_sizes_and_determinism(tmp_path: Path) -> None:
    ds, _ = load_dataset(write_json(tmp_path, [good(i) for i in range(50)]))
    parts = split(ds, eval_fraction=0.2, seed=7)
    assert set(parts) == {"train", "eval"}
    assert (len(parts["train"]), len(parts["eval"])) == (40, 10)
    again = split(ds, eval_fraction=0.2, seed=7)
    assert parts["eval"]["instruction"] == again["eval"]["instruction"]
    assert set(parts["train"]["instruction"]).isdisjoint(parts["eval"]["instruction"])
    assert (
        split(ds, eval_fraction=0.2, seed=8)["eval"]["instruction"] != parts["eval"]["instruction"]
    )


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_split_rejects_bad_fraction(tmp_path: Path, fraction: float) -> None:
    ds, _ = load_dataset(write_json(tmp_path, [good(i) for i in range(10)]))
    with pytest.raises(ValueError, match="eval_fraction"):
        split(ds, eval_fraction=fraction)


# --- shipped and real data ------------------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_dataset_loads_clean(name: str) -> None:
    records, report = load_records(DATASET_DIR / name, on_error="raise")
    assert report.skipped == [] and report.warnings == []
    assert report.kept == report.read == len(records)


def test_identity_set_content() -> None:
    records, _ = load_records(DATASET_DIR / "identity.json")
    by_instruction = {r["instruction"]: r["output"] for r in records}
    assert by_instruction["你是谁？"].startswith("我是名为不要葱姜蒜的小助手，因为我的主人")
    assert by_instruction["请介绍一下你自己"].endswith("嘿嘿嘿！")
    identity = [r for r in records if IDENTITY_NAME in r["output"]]
    assert len(identity) >= 60 and len(records) - len(identity) >= 25


def test_huanhuan_sample_content() -> None:
    records, _ = load_records(DATASET_DIR / "huanhuan_sample.json")
    assert len(records) == 40
    assert {
        "instruction": "你是谁？",
        "input": "",
        "output": "家父是大理寺少卿甄远道。",
        "system": None,
        "history": [],
    } in records


def test_find_huanhuan_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = write_json(tmp_path, [good(1)], name="huanhuan.json")
    monkeypatch.setenv(data.HUANHUAN_ENV, str(target))
    assert data.find_huanhuan() == target
    monkeypatch.setenv(data.HUANHUAN_ENV, str(tmp_path / "missing.json"))
    assert data.find_huanhuan() is None


def test_real_huanhuan_loads() -> None:
    path = data.find_huanhuan()
    if path is None:
        pytest.skip("real Chat-甄嬛 data not found (set SELFLLM_HUANHUAN)")
    records, report = load_records(path, dedupe=False)
    assert (report.read, report.kept, report.skipped, report.warnings) == (
        HUANHUAN_RECORDS,
        HUANHUAN_RECORDS,
        [],
        [],
    )
    assert isinstance(report, LoadReport) and len(records) == HUANHUAN_RECORDS
    _, deduped = load_records(path)
    assert deduped.kept == HUANHUAN_RECORDS - HUANHUAN_EXACT_DUPLICATES
    assert all(reason.startswith("duplicate of record") for _, reason in deduped.skipped)


# --- records that used to crash formatting: refused at load time, or read ---------------------


def assert_refused(path: Path, record: int, field: str, problem: str) -> None:
    """``load_dataset`` (the notebooks' call) names file, record and field, nothing later."""
    with pytest.raises(DataError) as err:
        load_dataset(path)
    assert (err.value.file, err.value.record, err.value.field) == (path.name, record, field)
    assert str(err.value).startswith(f"{path.name}, record {record}: ")
    assert problem in str(err.value)


@pytest.mark.parametrize(
    ("pair", "problem"),
    [
        (["问", ""], "field 'history' item 2 (answer) is empty"),
        (["问", " \n"], "field 'history' item 2 (answer) is empty"),
        (["", "答"], "field 'history' item 2 (question) is empty"),
        (["\t", "答"], "field 'history' item 2 (question) is empty"),
    ],
)
def test_empty_history_turn_refused(tmp_path: Path, pair: list[str], problem: str) -> None:
    path = write_json(tmp_path, [good(1), good(2, history=[["q", "a"], pair])])
    assert_refused(path, 2, "history", problem)


@pytest.mark.parametrize("key", ["instruction", "input", "output", "system"])
def test_lone_surrogate_refused(tmp_path: Path, key: str) -> None:
    path = tmp_path / "d.json"  # json.dumps escapes it: \ud83d in the file
    path.write_text(json.dumps([{"instruction": "q", "output": "a", key: "表情\ud83d"}]))
    assert "\\ud83d" in path.read_text()
    assert_refused(path, 1, key, f"field '{key}' is not valid Unicode text: lone surrogate \\ud83d")


def test_lone_surrogate_in_history_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(good(1)) + "\n" + '{"instruction": "q", "output": "a", '
                    '"history": [["u", "\\ud83d"]]}\n')
    with pytest.raises(DataError, match=r"^d\.jsonl, line 2: field 'history' item 1 \(answer\) is "
                       "not valid Unicode text"):
        load_dataset(path)


@pytest.mark.parametrize("token", data.SPECIAL_TOKENS)
def test_spelled_special_token_refused(tmp_path: Path, token: str) -> None:
    path = write_json(tmp_path, [good(1), {"instruction": "q", "output": f"它写作 {token} 。"}])
    assert_refused(path, 2, "output", f"field 'output' spells the special token {token}")


def test_special_tokens_cover_every_family_stop() -> None:
    for family in registry.FAMILIES.values():
        assert set(family.stop_tokens) | set(family.special_tokens) <= set(data.SPECIAL_TOKENS)
    assert {"<|im_end|>", "<|user|>", "<｜end▁of▁sentence｜>"} <= set(data.SPECIAL_TOKENS)


@pytest.mark.parametrize("key", ["instruction", "input", "system"])
def test_special_token_in_any_field_refused(tmp_path: Path, key: str) -> None:
    path = write_json(tmp_path, [{"instruction": "q", "output": "a", key: "见 <|user|> 处"}])
    assert_refused(path, 1, key, f"field '{key}' spells the special token <|user|>")
    path = write_json(tmp_path, [good(1, history=[["q", "a<|im_end|>"]])])
    assert_refused(path, 1, "history", "field 'history' item 1 (answer) spells the special token")


@pytest.mark.parametrize(("instruction", "inp"), [("", ""), ("  \n", ""), ("", "补充的输入")])
def test_empty_instruction_refused(tmp_path: Path, instruction: str, inp: str) -> None:
    path = write_json(tmp_path, [good(1), {"instruction": instruction, "input": inp, "output": "答"}])
    assert_refused(path, 2, "instruction", "field 'instruction' is empty")


SHAREGPT = [
    {"conversations": [{"from": "human", "value": "你是谁？"}, {"from": "gpt", "value": "我是甄嬛。"}]},
    {
        "system": "扮演甄嬛",
        "conversations": [
            {"from": "human", "value": "第一问"},
            {"from": "gpt", "value": "第一答"},
            {"from": "human", "value": "第二问"},
            {"from": "gpt", "value": "第二答"},
        ],
    },
]
OPENAI = [
    {
        "messages": [
            {"role": "system", "content": "扮演甄嬛"},
            {"role": "user", "content": "第一问"},
            {"role": "assistant", "content": "第一答"},
            {"role": "user", "content": "第二问"},
            {"role": "assistant", "content": "第二答"},
        ]
    }
]
AS_COURSE_RECORD = {
    "instruction": "第二问", "input": "", "output": "第二答", "system": "扮演甄嬛",
    "history": [["第一问", "第一答"]],
}


@pytest.mark.parametrize("rows", [SHAREGPT, OPENAI], ids=["sharegpt", "openai"])
def test_chat_formats_read_as_course_records(tmp_path: Path, smoke_models, rows: list) -> None:
    ds, report = load_dataset(write_json(tmp_path, rows))
    assert ds[len(ds) - 1] == AS_COURSE_RECORD
    assert (report.kept, report.warnings) == (len(rows), [])
    tutorial = registry.get("deepseek")
    tokenized, fmt = formatting.build_dataset(ds, smoke_models.tokenizer("deepseek"), tutorial)
    assert fmt.examples == len(rows) and fmt.dropped == 0
    runs = [len(r) for r in _label_runs(tokenized[len(rows) - 1]["labels"])]
    assert len(runs) == 2  # both answers of the last conversation are trained


@pytest.mark.parametrize(
    ("turns", "problem"),
    [
        ([{"from": "human", "value": "问"}], "field 'conversations' ends with a user turn"),
        ([{"from": "gpt", "value": "答"}], "field 'conversations' item 1 is a 'gpt' turn"),
        (
            [{"from": "human", "value": "问"}, {"from": "function_call", "value": "{}"}],
            "field 'conversations' item 2 is a 'function_call' turn",
        ),
        (
            [{"from": "human", "value": "问"}, {"from": "gpt", "value": " "}],
            "field 'conversations' item 2 is empty",
        ),
        (
            [{"from": "human", "value": "问"}, {"from": "gpt", "value": "<|im_end|>"}],
            "field 'conversations' item 2 spells the special token <|im_end|>",
        ),
        ([{"from": "human", "text": "问"}], "field 'conversations' item 1 must be an object"),
        ([], "field 'conversations' must be a non-empty list"),
    ],
)
def test_bad_sharegpt_record_names_the_turn(tmp_path: Path, turns: list, problem: str) -> None:
    path = write_json(tmp_path, [SHAREGPT[0], {"conversations": turns}])
    assert_refused(path, 2, "conversations", problem)


def test_answers_whitespace_stripped_and_counted(tmp_path: Path) -> None:
    rows = [good(1, output="\n\n回答1  "), good(2, history=[["q", "  前一个回答"]]), good(3)]
    ds, report = load_dataset(write_json(tmp_path, rows))
    assert ds[0]["output"] == "回答1" and ds[1]["history"] == [["q", "前一个回答"]]
    assert report.stripped == 2
    assert report.warnings == [
        "2 answers began or ended with whitespace, stripped (Qwen2 would tokenize a leading one "
        "differently at inference)"
    ]


# --- JSON that is valid but easy to misread (issue 26) ----------------------------------------


@pytest.mark.parametrize("char", ["\u2028", "\u0085", "\u2029"])
def test_jsonl_line_separators_inside_strings_are_text(tmp_path: Path, char: str) -> None:
    """JSON allows these unescaped in a string; str.splitlines would cut the line there."""
    rows = [good(1, output=f"第一句{char}第二句"), good(2)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n",
                    encoding="utf-8")
    assert char in path.read_text(encoding="utf-8")  # written raw, not escaped
    records, report = load_records(path)
    assert report.kept == 2 and records[0]["output"] == f"第一句{char}第二句"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('{"instruction": "问", "output": "答一", "output": "答二"}', "output"),
        ('{"conversations": [{"from": "human", "from": "gpt", "value": "问"}]}', "conversations"),
    ],
    ids=["top-level", "nested"],
)
def test_a_key_twice_in_one_record_is_refused(tmp_path: Path, text: str, field: str) -> None:
    path = write_jsonl(tmp_path, [json.dumps(good(1), ensure_ascii=False), text])
    with pytest.raises(DataError, match=rf"^d\.jsonl, line 2: field '{field}[.\w]*' appears twice"):
        load_records(path)
    _, report = load_records(path, on_error="skip")  # skipped with its reason, never silently
    assert report.kept == 1 and report.skipped[0][0] == 2 and "appears twice" in report.skipped[0][1]


@pytest.mark.parametrize(
    ("extra", "second"),
    [({"messages": OPENAI[0]["messages"]}, "messages"), (SHAREGPT[0], "conversations")],
    ids=["two-chat-formats", "instruction-and-chat"],
)
def test_two_conversation_formats_in_one_record_are_refused(tmp_path: Path, extra: dict,
                                                            second: str) -> None:
    first = {**SHAREGPT[1]} if second == "messages" else good(1)
    path = write_json(tmp_path, [good(0), {**first, **extra}])
    assert_refused(path, 2, second, "second conversation")


@pytest.mark.parametrize("jsonl", [False, True], ids=["json", "jsonl"])
@pytest.mark.parametrize("kind", ["deep", "huge-number"])
def test_json_beyond_pythons_reader_is_one_line_with_the_place(tmp_path: Path, jsonl: bool,
                                                               kind: str) -> None:
    value = "[" * 100_000 + "]" * 100_000 if kind == "deep" else "9" * 5000
    bad = '{"instruction": "问", "output": ' + value + "}"
    first = json.dumps(good(1), ensure_ascii=False)
    path = tmp_path / ("d.jsonl" if jsonl else "d.json")
    path.write_text(f"{first}\n{bad}\n" if jsonl else f"[{first},\n{bad}]", encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_records(path, on_error="skip")
    where = "d.jsonl, line 2: " if jsonl else "d.json: "
    assert str(err.value).startswith(where) and "\n" not in str(err.value)
    assert ("nested too deeply" if kind == "deep" else "number too long") in str(err.value)
    if kind != "deep" and not jsonl:
        assert "at line 2" in str(err.value)
