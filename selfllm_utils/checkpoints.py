"""Which checkpoint a run resumes from: the newest complete one, checked before anything loads it.

The Trainer's own `resume_from_checkpoint=True` takes the highest `checkpoint-N` folder
(`trainer_utils.get_last_checkpoint`), even one cut off mid-save, and carries on with a fresh
optimizer when `optimizer.pt` is missing. `plan` looks first: a partial folder (no
`trainer_state.json`, which the Trainer writes last, or a truncated file) is named and skipped;
missing optimizer or scheduler state is an error unless the learner asks to start them fresh; a
run that already reached its last step resumes to nothing. DeepSpeed reads its `global_step*/`
files with `torch.load(weights_only=False)`, that is with pickle, which can run any code, and a
run folder copied from someone else carries such files inside `--output`. `loading_without_code`
makes DeepSpeed load them with `weights_only=True` instead, allowing only the few DeepSpeed
classes its checkpoints hold (`DEEPSPEED_GLOBALS`); a file needing anything else is refused in
one line. A checkpoint from outside the run's own output folder is also refused unless the
learner says they trust it. `Restored` records what the Trainer really restored, so a test can
tell a resume from a restart.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, sort_checkpoints
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME
from transformers.utils.peft_utils import ADAPTER_CONFIG_NAME, ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME

WEIGHT_NAMES = (ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_NAME,
                SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME)
DEEPSPEED_LATEST = "latest"  # DeepSpeed's file naming the tag folder (global_stepN) it saved
TORCH_SUFFIXES = (".pt", ".pth", ".bin")  # torch.save writes zip archives
# The classes DeepSpeed 0.19 pickles into its checkpoint files besides tensors and Python
# containers, all plain data (optim_states.pt: the loss scaler, fp16's dynamic one, the ZeRO
# stage; at stages 1-2 and under bf16 also where each weight's slice sits, fragment_address).
DEEPSPEED_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                     "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                     "deepspeed.runtime.zero.config.ZeroStageEnum",
                     "deepspeed.utils.tensor_fragment.fragment_address")


class CheckpointError(RuntimeError):
    """A checkpoint that must not be resumed from as it is; the message says what to do."""


def _state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / TRAINER_STATE_NAME).read_text(encoding="utf-8"))


def _deepspeed_tag(checkpoint: Path) -> Path | None:
    latest = checkpoint / DEEPSPEED_LATEST
    return checkpoint / latest.read_text().strip() if latest.is_file() else None


def problem(checkpoint: str | Path) -> str | None:
    """Why a checkpoint folder is partial (cut off mid-save), or None when every file is whole.

    Cheap checks, nothing is unpickled: trainer_state.json (written last) parses, some model
    weights exist, every safetensors file is covered by its header, every torch file is a whole
    zip archive (its directory sits at the end, so a truncated file has none).
    """
    folder = Path(checkpoint)
    try:
        _state(folder)["global_step"]
    except (OSError, ValueError, KeyError):
        return f"no complete {TRAINER_STATE_NAME} (the Trainer writes it last)"
    if not any((folder / name).is_file() for name in WEIGHT_NAMES):
        return "no model or adapter weights"
    tag = _deepspeed_tag(folder)
    if tag is not None and not any(tag.glob("*model_states.pt")):
        return f"{DEEPSPEED_LATEST} names {tag.name}/, which holds no model states"
    return damaged(folder)


def damaged(folder: Path) -> str | None:
    """The first file in `folder` (and below) that is cut off, or None: a safetensors file its
    header does not cover, a torch file that is no whole zip archive, a JSON file that does not
    parse. Nothing is unpickled."""
    from safetensors import safe_open

    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        name = path.relative_to(folder)
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), "pt"):
                    pass
            elif path.suffix in TORCH_SUFFIXES and not zipfile.is_zipfile(path):
                return f"{name} is truncated (not a whole torch file)"
            elif path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
        except Exception as err:  # safetensors raises its own error type
            return f"{name} is truncated or damaged ({type(err).__name__})"
    return None


def missing_state(checkpoint: str | Path, world_size: int | None = None) -> list[str]:
    """Optimizer and scheduler files a resume needs that the checkpoint lacks.

    Without them the Trainer resumes with a fresh optimizer and learning-rate schedule, without
    a word, and the losses differ from an uninterrupted run. Under DeepSpeed each process saved
    its own optimizer slice (`global_stepN/*optim_states.pt`): one per process is needed.
    """
    folder = Path(checkpoint)
    missing = [] if (folder / SCHEDULER_NAME).is_file() else [SCHEDULER_NAME]
    tag = _deepspeed_tag(folder)
    if tag is None:
        return ([] if (folder / OPTIMIZER_NAME).is_file() else [OPTIMIZER_NAME]) + missing
    slices = len(list(tag.glob("*optim_states.pt")))
    if slices == 0 or (world_size and slices != world_size):
        missing.insert(0, f"{tag.name}/*optim_states.pt (found {slices}, one per process"
                          + (f": {world_size} now)" if world_size else ")"))
    return missing


def pickled_files(checkpoint: str | Path) -> list[Path]:
    """Files DeepSpeed unpickles on a resume (`torch.load(weights_only=False)`, unless inside
    `loading_without_code`): they can run code.

    The Trainer itself loads optimizer, scheduler and RNG files with `weights_only=True`.
    """
    tag = _deepspeed_tag(Path(checkpoint))
    return sorted(p for p in tag.glob("*.pt")) if tag is not None and tag.is_dir() else []


def _deepspeed_classes() -> list[type]:
    import importlib

    return [getattr(importlib.import_module(module), name)
            for module, _, name in (g.rpartition(".") for g in DEEPSPEED_GLOBALS)]


def load_without_code(path: str | Path, map_location=None):
    """`torch.load` of a DeepSpeed checkpoint file that runs no pickled code (weights_only=True,
    with `DEEPSPEED_GLOBALS` allowed); anything else in the file is refused in one line.

    Raises:
        CheckpointError: the file asks for another class or function (say `os.system`).
    """
    import torch

    with torch.serialization.safe_globals(_deepspeed_classes()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            wanted = re.search(r"GLOBAL (\S+)", str(err))
            raise CheckpointError(
                f"{path} asks to run {wanted.group(1) if wanted else 'pickled code'} when loaded, "
                "not only to hold tensors and DeepSpeed's state: not loaded. Resume from a "
                "checkpoint you wrote, or pass --trust-checkpoint if you know who wrote it"
            ) from None


@contextmanager
def loading_without_code(allow_pickle: bool = False) -> Iterator[list[str]]:
    """While inside, DeepSpeed reads checkpoint files through `load_without_code` (its torch
    engine's `load`, which every resume and the best-checkpoint reload at the end go through);
    yields the list of the files it so loaded. `allow_pickle`: the learner trusts the files, and
    DeepSpeed's own loading stays."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    loaded: list[str] = []
    if allow_pickle:
        yield loaded
        return
    original = TorchCheckpointEngine.load

    def load(engine, path, map_location=None):
        state = load_without_code(path, map_location)
        loaded.append(str(path))
        return state

    TorchCheckpointEngine.load = load
    try:
        yield loaded
    finally:
        TorchCheckpointEngine.load = original


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())  # resolve(): a link leads outside


def check_trust(checkpoint: Path, output_dir: Path, trust: bool) -> None:
    """Refuse pickled state that this run did not write (outside its output folder), unless trusted."""
    strangers = [p for p in pickled_files(checkpoint) if not _inside(p, output_dir)]
    if strangers and not trust:
        raise CheckpointError(
            f"{checkpoint} is outside this run's output folder {output_dir}, and resuming from it "
            f"unpickles {len(strangers)} DeepSpeed file(s) ({strangers[0].name}, ...): pickle can "
            "run any code. Pass --trust-checkpoint only if you know who wrote it.")


def newest_complete(output_dir: str | Path, say: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint-N folder whose files are whole; each partial newer one is named once."""
    folder = Path(output_dir)
    if not folder.is_dir() or get_last_checkpoint(str(folder)) is None:
        return None
    for path in map(Path, reversed(sort_checkpoints(str(folder), PREFIX_CHECKPOINT_DIR))):
        why = problem(path)
        if why is None:
            return path
        say(f"skipping {path.name}: {why}: a save that was cut off")
    return None


@contextmanager
def writing(folder: str | Path, writer: bool = True) -> Iterator[Path]:
    """A folder that appears whole or not at all: write into the path this yields, and on
    leaving without an error it replaces `folder` (two renames). A crash mid-save leaves the
    old folder, or none, never a half-written one that loads as if complete; the next save
    clears what the crash left. Under a launcher every rank enters, only `writer` moves files.
    """
    folder = Path(folder)
    partial, old = (folder.with_name(f"{folder.name}{suffix}") for suffix in (".partial", ".old"))
    if writer:
        for leftover in (partial, old):
            shutil.rmtree(leftover, ignore_errors=True)
    yield partial
    if writer:
        if folder.exists():
            folder.rename(old)
        partial.rename(folder)
        shutil.rmtree(old, ignore_errors=True)


def adapter_problem(folder: str | Path) -> str | None:
    """Why `folder` is no loadable adapter (missing, a file missing or cut off), or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return "missing"
    for name in (ADAPTER_CONFIG_NAME, ADAPTER_SAFE_WEIGHTS_NAME):
        if not (folder / name).is_file():
            return f"has no {name}"
    return damaged(folder)


TRAINING_ONLY = ("global_step*", DEEPSPEED_LATEST, "rng_state*.pth", OPTIMIZER_NAME, SCHEDULER_NAME,
                 TRAINER_STATE_NAME, "zero_to_*.py")  # what a checkpoint holds besides the adapter


def finish_adapter(output_dir: str | Path, last: Path, adapter: str,
                   say: Callable[[str], None] = print) -> Path | None:
    """Give a finished run the adapter a crash kept it from saving; returns the checkpoint used.

    The run ended with the best checkpoint's weights (load_best_model_at_end), so its adapter
    files are copied (the last checkpoint's where the best one is gone), and the last
    checkpoint's trainer_state.json where the run's own is missing. None: the adapter is whole.
    """
    output_dir = Path(output_dir)
    why = adapter_problem(output_dir / adapter)
    if why is None:
        return None
    best = _state(last).get("best_model_checkpoint")
    source = output_dir / Path(best).name if best else last  # by name: the run may have moved
    if not source.is_dir() or problem(source):
        source = last
    with writing(output_dir / adapter) as partial:
        shutil.copytree(source, partial, ignore=shutil.ignore_patterns(*TRAINING_ONLY))
    try:
        _state(output_dir)
    except (OSError, ValueError):  # the run's own trainer_state.json comes after the adapter
        shutil.copy2(last / TRAINER_STATE_NAME, output_dir / TRAINER_STATE_NAME)
    kind = "the best checkpoint" if best and source.name == Path(best).name else "the last checkpoint"
    say(f"{adapter}/ was not saved whole ({why}): written from {source.name}, {kind}")
    return source


@dataclass(frozen=True)
class Resume:
    """Where a run continues: `checkpoint` None means from step 0; `finished` means nothing to do."""

    checkpoint: Path | None
    step: int = 0
    finished: bool = False


def plan(output_dir: str | Path, max_steps: int, source: str | Path | None = None, *,
         trust: bool = False, fresh_optimizer: bool = False, world_size: int | None = None,
         say: Callable[[str], None] = print) -> Resume:
    """Check a resume before the Trainer loads anything, and say in one line what it will do.

    `source` is a checkpoint-N folder or a run folder (default: `output_dir`, the run's own).
    `max_steps` is the run's target (<= 0: the checkpoint's own target, an epoch-based run).

    Raises:
        CheckpointError: nothing complete to resume from in `source`, optimizer or scheduler state
            missing (unless `fresh_optimizer`), or a stranger's pickled state (unless `trust`).
    """
    output_dir = Path(output_dir)
    source = Path(source) if source is not None else output_dir
    if re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-\d+", source.name):  # one checkpoint, not a run
        why = problem(source)
        if why:
            raise CheckpointError(f"cannot resume from {source}: {why}")
        checkpoint = source
    else:
        checkpoint = newest_complete(source, say)
    if checkpoint is None:
        if source != output_dir:
            raise CheckpointError(f"no complete checkpoint-N folder in {source} to resume from")
        say(f"no complete checkpoint in {output_dir}: training starts at step 0")
        return Resume(None)
    state = _state(checkpoint)
    step, target = state["global_step"], max_steps if max_steps > 0 else state.get("max_steps", 0)
    if target and step >= target:
        say(f"already finished: {checkpoint.name} is at step {step} of {target}; nothing to train")
        return Resume(checkpoint, step, finished=True)
    check_trust(checkpoint, output_dir, trust)
    missing = missing_state(checkpoint, world_size)
    if missing and not fresh_optimizer:
        raise CheckpointError(
            f"{checkpoint} lacks {', '.join(missing)}: resuming would restart the optimizer and the "
            "learning-rate schedule and train differently. Resume from a complete checkpoint, or "
            "pass --fresh-optimizer to start them fresh on purpose.")
    note = f" with a FRESH optimizer and schedule (no {', '.join(missing)})" if missing else ""
    say(f"resuming from {checkpoint} at step {step}{note}")
    return Resume(checkpoint, step)


def _optimizer_steps(optimizer) -> int:
    """The largest step count in an optimizer's state (0 for a fresh one), through any wrappers."""
    seen = 0
    while optimizer is not None and seen < 5:  # accelerate's, then DeepSpeed's wrappers
        state = getattr(optimizer, "state", None)
        if isinstance(state, dict) and state and all(isinstance(v, dict) for v in state.values()):
            steps = [v["step"] for v in state.values() if "step" in v]
            return int(max(float(s) for s in steps)) if steps else 0
        optimizer, seen = getattr(optimizer, "optimizer", None), seen + 1
    return 0


class Restored(TrainerCallback):
    """Notes what training started from, as the Trainer restored it (not what was asked for).

    `found` after training: the global step, the scheduler's step count and the optimizer's step
    count at the start, and whether the Trainer put the checkpoint's RNG state back (`watch`). A
    resume that silently restarted reads 0, 0, 0, False.
    """

    def __init__(self, checkpoint: str | Path | None = None):
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.found: dict = {"rng_restored": False}

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        self.found.update({"global_step": state.global_step,
                           "scheduler_steps": getattr(lr_scheduler, "last_epoch", 0),
                           "optimizer_steps": _optimizer_steps(optimizer)})

    def watch(self, trainer) -> None:
        """Record whether the Trainer loads this checkpoint's RNG state: it does so inside its
        loop (before or after drawing the first batch, by where the epoch stands), which no
        callback sees, so its own loader is wrapped."""
        import torch
        from transformers.trainer_pt_utils import safe_globals  # numpy's RNG state, as the Trainer

        load = trainer._load_rng_state

        def loading(checkpoint):
            load(checkpoint)
            if self.checkpoint is None or checkpoint is None:
                return
            rank = f"_{trainer.args.process_index}" if trainer.args.world_size > 1 else ""
            path = Path(checkpoint) / f"rng_state{rank}.pth"
            if Path(checkpoint).resolve() == self.checkpoint.resolve() and path.is_file():
                with safe_globals():
                    saved = torch.load(path, weights_only=True)["cpu"]
                self.found["rng_restored"] = bool(torch.equal(saved, torch.random.get_rng_state()))

        trainer._load_rng_state = loading
