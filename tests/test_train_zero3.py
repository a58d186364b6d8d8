"""train_zero3 as a learner runs it: wrong input, a full disk and Ctrl-C end in one line.

In-process through `train_zero3.run` (what `python -m selfllm_utils.train_zero3` calls), on one
process with the tiny stand-in; one real command line checks that nothing else is printed. The
launches on 2 processes are in test_distributed.py.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from selfllm_utils import data, registry, train_zero3, training

TUTORIAL = registry.get("qwen1.5")


@pytest.fixture
def bad_data(tmp_path: Path) -> Path:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps([{"instruction": "问", "output": 3}]), encoding="utf-8")
    return path


def said(capsys: pytest.CaptureFixture) -> list[str]:
    """What the script said on stderr (the libraries' progress bars left out)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.strip().splitlines() if "it/s]" not in line and "s/it]" not in line]


@pytest.mark.parametrize(
    ("option", "value", "problem"),
    [("--max-steps", "-5", "argument --max-steps: -5 is below 1"),
     ("--eval-fraction", "1.5", "1.5 is not strictly between 0 and 1"),
     ("--tutorial", "qwen3", "invalid choice: 'qwen3'"),
     ("--gpu-gib", "many", "'many' is not a number")],
)
def test_a_wrong_option_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, option: str,
                                    value: str, problem: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        train_zero3.run(["--output", str(tmp_path), option, value])
    assert exit_.value.code == 2
    lines = said(capsys)
    assert len(lines) == 1 and problem in lines[0], lines


def test_a_deepspeed_file_that_is_no_config_is_one_line(tmp_path: Path) -> None:
    for text in (None, "{not json", json.dumps({"zero": {}})):
        path = tmp_path / "ds.json"
        path.unlink(missing_ok=True)
        if text is not None:
            path.write_text(text)
        with pytest.raises(SystemExit, match=r"^train_zero3: the DeepSpeed file .*ds\.json has no "
                                             r"readable zero_optimization\.stage \(\w+: [^\n]*\)$"):
            train_zero3.run(["--output", str(tmp_path / "out"), "--deepspeed", str(path)])


def test_bad_data_is_one_line_naming_file_record_and_field(tmp_path: Path, bad_data: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    assert train_zero3.run(["--output", str(tmp_path / "out"), "--data", str(bad_data)]) == 1
    assert said(capsys)[-1] == ("train_zero3: mine.json, record 1: field 'output' must be a "
                                "string, got int")


@pytest.mark.parametrize(
    "failure",
    [OSError(errno.ENOSPC, "No space left on device", "adapter/tokenizer.json"),
     RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                  "file data/0: file write failed"),
     Exception("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"),
     KeyboardInterrupt()],
    ids=["ENOSPC", "torch.save", "safetensors", "ctrl-c"],
)
def test_a_full_disk_or_ctrl_c_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch,
                                           failure: BaseException) -> None:
    """Raised where the run reads its data: after the model loaded, as a save would be."""
    def fail(*args, **kwargs):
        if type(failure) is Exception:  # safetensors' own error type, raised inside a save
            raise RuntimeError("saving the adapter failed") from failure
        raise failure

    monkeypatch.setattr(data, "load_dataset", fail)
    try:
        status = train_zero3.run(["--output", str(tmp_path / "out")])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped train_zero3.run: a traceback")
    lines = said(capsys)
    assert len(lines) == 1 and "--resume" in lines[0], lines
    if isinstance(failure, KeyboardInterrupt):
        assert status == 130 and lines[0].startswith("train_zero3: interrupted (Ctrl-C)")
    else:
        assert status == 1 and lines[0].startswith(f"train_zero3: the disk holding {tmp_path / 'out'} is full (")


def test_a_bug_keeps_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def bug(*args, **kwargs):
        raise RuntimeError("size of tensor a (0) must match")

    monkeypatch.setattr(data, "load_dataset", bug)
    with pytest.raises(RuntimeError, match="size of tensor a"):
        train_zero3.run(["--output", str(tmp_path / "out")])


def test_the_command_line_prints_no_traceback(tmp_path: Path, bad_data: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "selfllm_utils.train_zero3", "--output",
                           str(tmp_path / "out"), "--data", str(bad_data)],
                          capture_output=True, text=True, timeout=300, env={**os.environ})
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    assert done.stderr.strip().splitlines()[-1].startswith("train_zero3: mine.json, record 1: ")


def test_the_launch_waits_for_a_frozen_process_only_the_courses_timeout(tmp_path: Path) -> None:
    """On GPUs accelerate hands `ddp_timeout` to NCCL or DeepSpeed (on CPUs
    `distributed.setup_process_group` does; test_distributed.py checks a real launch)."""
    args = training.training_args(registry.smoke_config(TUTORIAL), tmp_path)
    assert args.ddp_timeout == registry.LAUNCH_TIMEOUT_S < 1800


def test_a_crash_in_the_final_save_leaves_no_half_adapter_and_resume_writes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """One process, in this one: the disk fills up halfway through the adapter's last file."""
    from selfllm_utils import checkpoints

    save_model = training.CourseTrainer.save_model

    def cut_off(self, output_dir=None, _internal_call=False):
        save_model(self, output_dir, _internal_call)
        if not _internal_call:  # the final save, not a checkpoint's
            weights = Path(output_dir) / "adapter_model.safetensors"
            os.truncate(weights, weights.stat().st_size // 2)
            raise OSError(errno.ENOSPC, "No space left on device", str(weights))

    out = tmp_path / "run"
    argv = ["--output", str(out), "--max-steps", "2", "--eval-steps", "2"]
    monkeypatch.setattr(training.CourseTrainer, "save_model", cut_off)
    assert train_zero3.run(argv) == 1
    assert "is full" in said(capsys)[-1]
    assert checkpoints.adapter_problem(out / train_zero3.ADAPTER) == "missing"  # never half of one
    monkeypatch.undo()
    assert train_zero3.run([*argv, "--resume"]) == 0
    assert checkpoints.adapter_problem(out / train_zero3.ADAPTER) is None
    assert "adapter/ was not saved whole (missing): written from checkpoint-2" in capsys.readouterr().out
