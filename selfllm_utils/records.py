"""Runs recorded offline: the Trainer's TensorBoard event files, read back and compared.

Learners change a setting and ask "was it better?"; instructors compare a class's runs. The
Trainer writes every logged value (loss, learning rate, grad norm, and what `CourseTrainer.log`
adds: tokens/s, peak memory, the token budget) as TensorBoard event files in the run folder
(`report_to=["tensorboard"]`, no account, no network). `tensorboard --logdir output` shows every
run there side by side; `scalars` reads one run back and `compare` draws several in one figure.
"""

from __future__ import annotations

from pathlib import Path

REPORT_TO = ["tensorboard"]  # the Trainer's own integration; offline, files in the run folder
EVENTS = "events.out.tfevents.*"


def log_dirs(run: str | Path) -> list[Path]:
    """Folders under `run` holding event files, oldest first (the Trainer writes one a start,
    `run/runs/<date>_<host>`; a resumed run adds another)."""
    found = {p.parent for p in Path(run).rglob(EVENTS)}
    return sorted(found, key=lambda d: min(p.stat().st_mtime for p in d.glob(EVENTS)))


def log_dir(run: str | Path) -> Path:
    """Where the run's latest training start writes its events (for values added by hand)."""
    dirs = log_dirs(run)
    if not dirs:
        raise FileNotFoundError(f"no TensorBoard event files under {run}: train with "
                                f"report_to={REPORT_TO} (training.training_args does) first")
    return dirs[-1]


def scalars(run: str | Path) -> dict[str, dict[int, float]]:
    """Every scalar recorded under `run`, as {tag: {step: value}} ("train/loss", "train/learning_rate",
    "heldout/stop_share" ...), read with TensorBoard's own reader; a later write of a step wins."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[str, dict[int, float]] = {}
    for folder in log_dirs(run):
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep all
        events.Reload()
        for tag in events.Tags()["scalars"]:
            values.setdefault(tag, {}).update({e.step: e.value for e in events.Scalars(tag)})
    return values


def add_scalars(run: str | Path, values: dict[str, float | None], step: int) -> Path:
    """Write values (the held-out report before and after training) into the run's event log."""
    from torch.utils.tensorboard import SummaryWriter

    folder = log_dir(run)
    with SummaryWriter(str(folder)) as writer:
        for tag, value in values.items():
            if value is not None:
                writer.add_scalar(tag, value, step)
    return folder


def compare(runs: dict[str, str | Path], path: str | Path,
            tags: tuple[str, ...] = ("train/loss", "train/learning_rate")) -> Path:
    """One figure, a panel a tag, a line a run ({label: run folder}), read back from the event
    files: two runs compared without training either again. Saved as a PNG; returns its path."""
    from matplotlib.figure import Figure  # no pyplot: nothing global, no backend to choose

    read = {label: scalars(folder) for label, folder in runs.items()}
    fig = Figure(figsize=(4.2 * len(tags), 3.2))
    axes = fig.subplots(1, len(tags), squeeze=False)[0]
    for ax, tag in zip(axes, tags):
        for label, values in read.items():
            points = sorted(values.get(tag, {}).items())
            ax.plot([s for s, _ in points], [v for _, v in points], marker=".", label=label)
        ax.set_title(tag)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return Path(path)
