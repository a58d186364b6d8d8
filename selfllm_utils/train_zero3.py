"""LoRA on several GPUs, replicated or with DeepSpeed ZeRO: the course's launch script (tutorial 04).

One process per GPU, started by a launcher, on one machine or several:

    torchrun --nproc_per_node 4 -m selfllm_utils.train_zero3 --tutorial qwen1.5 --output output/qwen1.5-zero3
    accelerate launch --config_file output/configs/accelerate_zero3_offload.yaml \\
        -m selfllm_utils.train_zero3 --tutorial qwen1.5 --output output/qwen1.5-zero3
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr 10.0.0.1 --master_port 29500 \\
        -m selfllm_utils.train_zero3 --tutorial qwen1.5 --output /shared/qwen1.5-zero3   # and rank 1

The plan comes from each GPU's memory (`distributed.choose_plan`): replicated weights (plain data
parallelism) where a card holds the bf16 model and a step, ZeRO-3 where it does not, offload only
where even that is short; `--plan`, `--stage`/`--offload`, `--deepspeed` or accelerate's YAML
force one. Without CUDA (CI) the processes talk over gloo and the smoke model stands in, so the
same code path runs on a laptop. Download the real weights before launching (`selfllm download
qwen1.5`): otherwise every process fetches them at once. On several machines `--output` must be
a folder they all share (checked before training: `distributed.check_shared_output`).

Steps, as in the seed: records -> train/eval split -> chat template -> LoRA -> Trainer with
evaluation (token accuracy) and the best checkpoint kept -> the adapter saved whole. `--resume`
continues from the newest complete checkpoint in `--output` (`checkpoints.plan`: a partial one is
skipped, a finished run only writes its adapter if a crash cut that save off, DeepSpeed's files
load without running pickled code, a stranger's checkpoint needs `--trust-checkpoint`). Merging happens afterwards, in a plain
process (`inference.merge_and_save`): under ZeRO-3 each process holds only slices of the weights.

A mistake in the options or the data, a full disk and Ctrl-C end in one line and a non-zero
exit (`run`; Ctrl-C names the newest complete checkpoint). torchrun itself adds a traceback to a
Ctrl-C: `selfllm torchrun`, torchrun with the same options, does not (`distributed.torchrun`).
A process that stops answering ends the launch after `registry.LAUNCH_TIMEOUT_S`.

Besides checkpoints and `adapter/`, rank 0 writes `trainer_state.json`, `run_info.json` (what
each rank saw: process index, who saves, fingerprints of its training batches) and `probe.pt`
(the trained model's logits on one eval example), so tests can check the run from outside.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

from transformers import TrainerCallback, set_seed

from . import checkpoints, data, distributed, formatting, memory, metrics, models, registry, training

ADAPTER, RUN_INFO, PROBE = "adapter", "run_info.json", "probe.pt"


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a wrong option answered in one line (not the whole usage block first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (--help lists the options)\n")


def at_least(kind: type, least: float):
    """An argparse type: a number of `kind` no smaller than `least`, or one line saying why."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{text} is below {least}")
        return value
    return parse


def fraction(text: str) -> float:
    """An argparse type: a share strictly between 0 and 1."""
    value = at_least(float, 0)(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not strictly between 0 and 1")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; sizes default to the registry's config (smoke config in smoke mode)."""
    p = OneLineParser(prog="python -m selfllm_utils.train_zero3", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    count = at_least(int, 1)
    p.add_argument("--tutorial", default="qwen1.5", choices=tuple(registry.TUTORIALS),
                   help="registry key (default qwen1.5)")
    p.add_argument("--output", required=True, help="checkpoints, adapter/ and run files go here")
    p.add_argument("--data", help="instruction records (.json/.jsonl); default: Chat-甄嬛 "
                   "(data.find_huanhuan), the course's 40-record sample in smoke mode")
    p.add_argument("--model-dir", help="a local model folder (weights copied from elsewhere); "
                   "default: the registry's ModelScope download, or the smoke model")
    p.add_argument("--plan", default="auto", choices=("auto", *distributed.PLANS),
                   help="auto (default): replicated (ddp) where a GPU holds the model and a step, "
                   "else ZeRO-3, with offload only where needed (distributed.choose_plan)")
    p.add_argument("--deepspeed", metavar="JSON", help="a DeepSpeed config file of your own (the "
                   "seed's, say): its stage and offload are the plan")
    p.add_argument("--stage", type=int, choices=distributed.ZERO_STAGES,
                   help="force DeepSpeed ZeRO at this stage (with --offload: offloaded)")
    p.add_argument("--offload", action="store_true", help="force ZeRO (stage 3 unless --stage) "
                   "with optimizer state and weights in CPU RAM")
    p.add_argument("--gpu-gib", type=at_least(float, 1), help="plan, fit and cap each process as if its GPU had "
                   "this much memory (a 24 GB card's plan on a larger one)")
    p.add_argument("--quant", default="bf16", choices=("bf16", "4bit"))
    p.add_argument("--preset", default="course", choices=("course", "workshop"),
                   help="workshop: registry.WORKSHOP's ~10-minute settings (real mode; smoke mode "
                   "always uses the smoke config)")
    p.add_argument("--max-steps", type=count, help="optimizer steps (default: the config's)")
    p.add_argument("--batch-tokens", type=count, help="tokens a packed micro-batch holds on each GPU "
                   "(default: fitted to the GPU by memory.token_budget)")
    p.add_argument("--eval-steps", type=count, help="evaluate and save every N steps")
    p.add_argument("--logging-steps", type=count, help="log the loss every N steps")
    p.add_argument("--warmup-steps", type=at_least(int, 0), help="learning-rate warm-up steps")
    p.add_argument("--eval-fraction", type=fraction, default=0.1)
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue from the newest complete checkpoint in --output, or from the "
                   "checkpoint-N (or run) folder given (checkpoints.plan)")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow a checkpoint from outside "
                   "--output, and let DeepSpeed unpickle its files as it does by default: pickle "
                   "can run any code (otherwise they load as tensors and DeepSpeed's own state only)")
    p.add_argument("--fresh-optimizer", action="store_true", help="resume a checkpoint that lacks "
                   "optimizer or scheduler state, starting them fresh (the losses will differ)")
    p.add_argument("--stop-at-step", type=count, help="stop after this step, as if interrupted")
    return p.parse_args(argv)


def run_config(args: argparse.Namespace, smoke: bool) -> registry.TrainConfig:
    """The tutorial's TrainConfig (or its smoke version) with the command line's overrides."""
    tutorial = registry.get(args.tutorial)
    if smoke:
        cfg = registry.smoke_config(tutorial)
    else:
        cfg = registry.WORKSHOP[tutorial.key] if args.preset == "workshop" else tutorial.config
    changes: dict = {}
    if args.max_steps:
        changes["max_steps"] = args.max_steps
    if args.logging_steps:
        changes["logging_steps"] = args.logging_steps
    if args.warmup_steps is not None:
        changes["warmup_steps"] = args.warmup_steps
    if args.gradient_checkpointing is not None:
        changes["gradient_checkpointing"] = args.gradient_checkpointing
    if args.batch_tokens:
        changes["batch_tokens"] = args.batch_tokens
    return dataclasses.replace(cfg, **changes)


def forced_plan(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(plan name, DeepSpeed JSON file) the command line fixes, or (None, None) for "auto".

    A DeepSpeed file (--deepspeed, or the one accelerate's YAML names) decides by its own stage
    and offload; --stage / --offload force ZeRO; --plan names a plan. Two that disagree: refused.
    """
    path = args.deepspeed or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")  # accelerate sets it
    wanted = []
    if path and path != "none":
        try:
            zero = json.loads(Path(path).read_text())["zero_optimization"]
            wanted.append(distributed.plan_name(zero["stage"], "offload_optimizer" in zero))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SystemExit(f"train_zero3: the DeepSpeed file {path} has no readable "
                             f"zero_optimization.stage ({type(err).__name__}: {err})") from None
    else:
        path = None
    if args.stage or args.offload:
        wanted.append(distributed.plan_name(args.stage or 3, args.offload))
    if args.plan != "auto":
        wanted.append(args.plan)
    if len(set(wanted)) > 1:
        raise SystemExit(f"train_zero3: --plan, --stage/--offload and the DeepSpeed file ask for "
                         f"different plans ({', '.join(wanted)}); give one")
    return (wanted[0] if wanted else None), path


def eval_settings(cfg: registry.TrainConfig, eval_steps: int | None) -> dict:
    """Evaluate and save on the same steps, keep the checkpoint with the best token accuracy."""
    steps = eval_steps or (min(cfg.save_steps, max(1, cfg.max_steps // 2)) if cfg.max_steps > 0
                           else cfg.save_steps)
    return dict(eval_strategy="steps", eval_steps=steps, save_strategy="steps", save_steps=steps,
                load_best_model_at_end=True, metric_for_best_model="accuracy",
                greater_is_better=True)


def load_splits(args: argparse.Namespace, tutorial: registry.Tutorial, tokenizer, smoke: bool,
                max_length: int):
    """Train and eval datasets, tokenized with the tutorial's chat template (same split each run)."""
    sample = registry.repo_root() / "dataset" / "huanhuan_sample.json"  # 40 records: seconds
    path = args.data or (sample if smoke else data.find_huanhuan())
    if path is None:
        raise SystemExit("no data: pass --data FILE or set SELFLLM_HUANHUAN (dataset/README.md)")
    ds, _ = data.load_dataset(path)
    parts = data.split(ds, args.eval_fraction)
    train, _ = formatting.build_dataset(parts["train"], tokenizer, tutorial, max_length=max_length)
    evals, _ = formatting.build_dataset(parts["eval"], tokenizer, tutorial, max_length=max_length)
    return train, evals


def card_gib(cap: float | None = None) -> float | None:
    """This rank's GPU memory (or `cap`, if smaller), total not free: every rank of a launch
    reads the same figure (free memory differs between ranks at the moment they ask), so all
    pack their data alike. None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    if cap:
        return min(cap, card_gib())
    device = int(os.environ.get("LOCAL_RANK", "0"))
    return torch.cuda.get_device_properties(device).total_memory / memory.GIB


def fingerprint(ids: list[int]) -> str:
    """A short hash of one example's token ids, to compare what each rank trained on."""
    return hashlib.sha1(str(list(ids)).encode()).hexdigest()[:10]


class RecordingCollator:
    """Wraps the Trainer's collator and notes which training examples each micro-batch held.

    Evaluation batches (examples not in the train set) are not noted. `tokens` counts each
    training micro-batch's tokens (packed micro-batches hold no padding), for tokens/s.
    """

    def __init__(self, collate, train_ds):
        self.collate = collate
        self.train = {fingerprint(ids) for ids in train_ds["input_ids"]}
        self.batches: list[list[str]] = []
        self.tokens: list[int] = []

    def __call__(self, features):
        # a packed row (training.pack_dataset) holds several examples' ids
        seqs = [ids for f in features for ids in training.sequences(f)]
        prints = [fingerprint(ids) for ids in seqs]
        if prints and all(p in self.train for p in prints):
            self.batches.append(prints)
            self.tokens.append(sum(len(ids) for ids in seqs))
        return self.collate(features)


class StopAt(TrainerCallback):
    """Ends training after a given step, like a crash or a lost node (to test `--resume`)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_save = True  # a checkpoint at the stop, as after a scheduled save
            control.should_training_stop = True
        return control


def probe_logits(model, example: dict):
    """The model's logits on one example; under ZeRO-3 every rank must call this together."""
    import torch

    ids = torch.tensor([example["input_ids"]], device=next(model.parameters()).device)
    model.eval()
    with torch.no_grad():
        return ids.cpu(), model(input_ids=ids).logits.float().cpu()


def write_run_files(trainer, out: Path, recorder: RecordingCollator, clock: training.StepClock, example: dict,
                    info: dict) -> None:
    """Gather what each rank saw to rank 0, which writes run_info.json and probe.pt."""
    import torch
    import torch.distributed as dist

    gib = 2**30
    peak = ({"peak_allocated_gib": torch.cuda.max_memory_allocated() / gib,
             "peak_reserved_gib": torch.cuda.max_memory_reserved() / gib}
            if torch.cuda.is_available() else {})
    ids, logits = probe_logits(trainer.model, example)
    mine = {"rank": dist.get_rank() if dist.is_initialized() else 0,
            "process_index": trainer.args.process_index, "world_size": trainer.args.world_size,
            "should_save": trainer.args.should_save, "batches": recorder.batches,
            "tokens": recorder.tokens, "step_times": clock.times, **peak}
    ranks = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(ranks, mine)
    else:
        ranks = [mine]
    if trainer.is_world_process_zero():
        torch.save({"input_ids": ids, "logits": logits}, out / PROBE)
        (out / RUN_INFO).write_text(json.dumps({**info, "ranks": ranks}, indent=1))


def main(argv: list[str] | None = None) -> None:
    """Train, evaluate, save the adapter, and write the run files (see the module docstring)."""
    args = parse_args(argv)
    # before anything touches CUDA (the process group does): read once, when the allocator starts
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    smoke = registry.smoke_mode()
    tutorial = registry.get(args.tutorial)
    cfg = run_config(args, smoke)
    force, ds_file = forced_plan(args)
    if force:
        distributed.check_plan(args.quant, distributed.parse_plan(force)[0])
    out = Path(args.output)
    resume = plan_resume(args, out, cfg.max_steps)
    if resume.finished:  # a crash may have cut off the adapter's save after the last checkpoint
        if int(os.environ.get("RANK", "0")) == 0:
            checkpoints.finish_adapter(out, resume.checkpoint, ADAPTER)
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        plan = distributed.choose_plan(tutorial, cfg, args.quant, card_gib(args.gpu_gib), world, force)
    except ValueError as err:
        raise SystemExit(f"train_zero3: {err}") from None
    cfg, stage = plan.budget.config, plan.stage
    ds_config = ds_file or plan.deepspeed()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"train_zero3: {plan}", flush=True)
        if world > 1:
            print(f"train_zero3: a process that stops answering ends the launch after "
                  f"{registry.LAUNCH_TIMEOUT_S // 60} min (registry.LAUNCH_TIMEOUT_S)", flush=True)
    # find (or build) the weights before any process group or DeepSpeed config exists: built under
    # either, the smoke model is saved by rank 0 only, or as empty slices. Download the real
    # weights before launching (the notebook does): every rank would fetch them at once.
    path = (models.check_model_dir(Path(args.model_dir)) if args.model_dir
            else models.model_path(tutorial, smoke))
    group = distributed.setup_process_group(deepspeed=ds_config is not None)  # gloo without CUDA
    if ds_config is None:  # LoRA leaves most weights without grads: nothing DDP must search for
        group["ddp_find_unused_parameters"] = False
    # TrainingArguments before the model: with the DeepSpeed config known, from_pretrained builds
    # the model already partitioned (zero.Init), so no process holds all the weights
    targs = training.training_args(cfg, out, deepspeed=ds_config, **eval_settings(cfg, args.eval_steps),
                                   **group)
    if targs.device.type == "cuda" and args.gpu_gib:  # .device also joins the process group
        import torch
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_gib / card_gib()), targs.device)
    distributed.check_shared_output(out)
    set_seed(cfg.seed)  # the Trainer seeds only later: LoRA's random A matrices must match on resume
    model, tokenizer = models.load_model(tutorial, quant=args.quant, smoke_mode=smoke, path=path)
    partitioned = all(hasattr(p, "ds_id") for p in model.parameters())  # loaded under zero.Init
    train_ds, eval_ds = load_splits(args, tutorial, tokenizer, smoke, cfg.max_length)
    model = models.add_lora(model, tutorial, cfg)
    clock, restored = training.StepClock(), checkpoints.Restored(resume.checkpoint)
    trainer = training.make_trainer(
        model, tokenizer, train_ds, cfg, out, eval_ds=eval_ds, args=targs,
        compute_metrics=metrics.token_accuracy,
        preprocess_logits_for_metrics=metrics.preprocess_logits_for_metrics,
        callbacks=[clock, restored] + ([StopAt(args.stop_at_step)] if args.stop_at_step else []))
    restored.watch(trainer)
    recorder = RecordingCollator(trainer.data_collator, train_ds)
    trainer.data_collator = recorder
    # DeepSpeed unpickles its checkpoint files (a resume, the best checkpoint at the end): without code
    with (checkpoints.loading_without_code(args.trust_checkpoint) if ds_config is not None
          else contextlib.nullcontext([])) as loaded_safely:
        trainer.train(resume_from_checkpoint=str(resume.checkpoint) if resume.checkpoint else None)
    # all ranks take part: ZeRO-3 gathers the slices (stage3_gather_16bit_weights_on_model_save);
    # the folder appears whole or not at all (a crash here: --resume writes it from the checkpoint)
    with checkpoints.writing(out / ADAPTER, writer=trainer.is_world_process_zero()) as partial:
        trainer.save_model(str(partial))
        if trainer.is_world_process_zero():
            model.generation_config.save_pretrained(partial)  # the stop tokens travel along
    trainer.save_state()
    # what DeepSpeed ran with, "auto" filled in by the Trainer (None: plain data parallelism)
    used = trainer.args.hf_deepspeed_config.config if ds_config is not None else None
    info = {"tutorial": tutorial.key, "plan": plan.name, "plan_reason": plan.reason,
            "zero_stage": stage, "offload": bool(used and "offload_optimizer" in used["zero_optimization"]),
            "gradient_checkpointing": cfg.gradient_checkpointing, "liger": training.liger_on(cfg),
            # what the Trainer restored (its step, optimizer, schedule, RNG), not what was asked
            "resumed": restored.found["global_step"] > 0, "restored": restored.found,
            "batch_tokens": cfg.batch_tokens, "budget": plan.budget.reason,
            "loaded_partitioned": partitioned,
            "rope_buffers_put_back_to_fp32": trainer.rope_fix.fixed,  # training.fp32_rope
            "train_examples": len(train_ds), "eval_examples": len(eval_ds),
            "best_checkpoint": trainer.state.best_model_checkpoint,
            "deepspeed": used,
            # the global batch in micro-batches: micro x accumulation x ranks (DeepSpeed derives its own)
            "train_batch_size": (trainer.model_wrapped.train_batch_size() if used else
                                 targs.per_device_train_batch_size * cfg.gradient_accumulation_steps
                                 * targs.world_size),
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "model_dir": str(path), "process_group_timeout_s": distributed.group_timeout_s(),
            "loaded_without_code": [os.path.relpath(f, out) for f in loaded_safely]}
    write_run_files(trainer, out, recorder, clock, eval_ds[0], info)


def plan_resume(args: argparse.Namespace, out: Path, max_steps: int) -> checkpoints.Resume:
    """Where `--resume` continues (checked before any model loads); one line on rank 0 says it."""
    if not args.resume:
        return checkpoints.Resume(None)
    say = print if os.environ.get("RANK", "0") == "0" else (lambda line: None)
    try:
        return checkpoints.plan(out, max_steps, None if args.resume is True else args.resume,
                                trust=args.trust_checkpoint, fresh_optimizer=args.fresh_optimizer,
                                world_size=int(os.environ.get("WORLD_SIZE", "1")), say=say)
    except checkpoints.CheckpointError as err:
        raise SystemExit(f"train_zero3 --resume: {err}") from None


ANSWERED = (data.DataError, checkpoints.CheckpointError, models.ModelFolderError)  # the learner's input


def disk_full(err: BaseException) -> bool:
    """Whether an error (or one it arose from) is a full disk: Python's ENOSPC, torch.save's
    "file write failed", safetensors' "StorageFull"."""
    for _ in range(10):  # the chain of causes, never a loop
        if err is None:
            return False
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        if re.search(r"No space left on device|file write failed|StorageFull", str(err)):
            return True
        err = err.__cause__ or err.__context__
    return False


def free_gib(folder: Path) -> float:
    """Free space on the disk holding `folder` (or its nearest existing parent), in GiB."""
    folder = folder.absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free / 2**30


def resume_hint(out: Path) -> str:
    """Where an interrupted run stands and how to continue: the newest complete checkpoint in
    `out` (a save cut off by the interruption is passed over, as `--resume` does)."""
    newest = checkpoints.newest_complete(out, say=lambda line: None)
    if newest is None:
        return f"no complete checkpoint in {out} yet: run the same command with --resume to start again"
    return f"the newest complete checkpoint is {newest}: run the same command with --resume to continue from it"


def run(argv: list[str] | None = None) -> int:
    """`main` for a terminal; returns the exit status. A mistake in the input, a full disk, any
    other failed file operation or Ctrl-C end in one line on stderr, never a traceback; nothing
    trained is lost (the newest complete checkpoint stays, `--resume` continues from it). Under
    a launcher each process says its own line (one rank's checkpoint file may be the bad one),
    and Ctrl-C, which reaches them all, is said by rank 0.
    """
    rank = int(os.environ.get("RANK", "0"))
    who = "train_zero3" + (f" (rank {rank})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "")
    again = "run the same command with --resume to continue from the newest complete checkpoint"
    try:
        main(argv)
    except KeyboardInterrupt:
        if rank == 0:
            print(f"train_zero3: interrupted (Ctrl-C); {resume_hint(Path(parse_args(argv).output))}",
                  file=sys.stderr, flush=True)
        return 130
    except ANSWERED as err:
        print(f"{who}: {err}", file=sys.stderr, flush=True)
        return 1
    except (OSError, RuntimeError) as err:
        if disk_full(err):
            out = Path(parse_args(argv).output)
            line = (f"the disk holding {out} is full ({free_gib(out):.1f} GiB free): free some space "
                    f"or give another --output, then {again}")
        elif isinstance(err, OSError):
            line = f"{err.strerror or err}: {err.filename or ''}".rstrip(": ")
        elif isinstance(err, training.OutOfMemory):
            line = str(err)
        else:
            raise  # not the learner's doing: the traceback is what a bug report needs
        print(f"{who}: {line}", file=sys.stderr, flush=True)
        return 1
    return 0


def leave_process_group() -> None:
    """Wait until every rank is done, then leave (run as a script only: it may end the process).

    On CPUs (gloo) the interpreter's own exit sometimes aborted after all the work was saved
    ("terminate called without an active exception", no Python frame left: about 1 launch in 40
    in this course's tests), which fails the launch. There the process ends at once instead.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    dist.barrier()
    if dist.get_backend() == "gloo":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    dist.destroy_process_group()


if __name__ == "__main__":
    status = run()
    if status:
        sys.exit(status)
    leave_process_group()
