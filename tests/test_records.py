"""Runs recorded offline: what the Trainer writes as TensorBoard events, read back and compared."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfllm_utils import records


def test_a_run_records_loss_lr_grad_norm_speed_memory_and_budget(trained) -> None:
    """The shared tiny training (conftest `trained`) wrote its own event files; every logged loss
    comes with learning rate, grad norm, tokens/s, peak memory and the budget."""
    logged = records.scalars(trained.run)
    loss = logged["train/loss"]
    assert list(loss) == list(range(1, len(trained.losses) + 1))
    assert list(loss.values()) == pytest.approx(trained.losses, abs=1e-5)  # float32 in the file
    for tag in ("train/learning_rate", "train/grad_norm", "train/tokens_per_second", "train/peak_memory_gib"):
        assert sorted(logged[tag]) == sorted(loss), tag
        assert all(v > 0 for v in logged[tag].values()), tag
    assert set(logged["train/batch_tokens"].values()) == {trained.batch_tokens}
    assert records.log_dir(trained.run).parent.name == "runs"  # the Trainer's own folder layout


def fake_run(folder: Path, losses: list[float]) -> Path:
    """A run folder as the Trainer leaves it: runs/<name>/events.out.tfevents.*"""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(folder / "runs" / "one")) as writer:
        for step, loss in enumerate(losses, start=1):
            writer.add_scalar("train/loss", loss, step)
    return folder


def test_add_scalars_goes_into_the_run_and_reads_back(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "a", [2.0, 1.0])
    records.add_scalars(run, {"heldout/stop_share": 0.25, "heldout/identity_share": None}, step=0)
    records.add_scalars(run, {"heldout/stop_share": 1.0}, step=2)
    logged = records.scalars(run)
    assert logged["heldout/stop_share"] == {0: 0.25, 2: 1.0}
    assert "heldout/identity_share" not in logged  # None: nothing written
    assert logged["train/loss"] == {1: 2.0, 2: 1.0}


def test_a_folder_without_events_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="report_to"):
        records.log_dir(tmp_path)


def test_compare_draws_each_run_from_its_own_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: (drawn.append(fig), Path(path).write_bytes(b"png")))
    runs = {"lr 2e-4": fake_run(tmp_path / "a", [3.0, 2.0, 1.0]), "lr 2e-5": fake_run(tmp_path / "b", [3.0, 2.5])}
    path = records.compare(runs, tmp_path / "compare.png", tags=("train/loss",))
    assert path.read_bytes() == b"png"
    (ax,) = drawn[0].axes
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
    assert lines == {"lr 2e-4": ([1, 2, 3], [3.0, 2.0, 1.0]), "lr 2e-5": ([1, 2], [3.0, 2.5])}
