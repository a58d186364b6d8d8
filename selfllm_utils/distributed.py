"""Several GPUs: which plan (replicated or ZeRO), its config files, the process group.

The seed wrote three files by hand that must agree: DeepSpeed's JSON, accelerate's YAML and the
`TrainingArguments`. Where they disagree on batch size, accumulation or learning rate, DeepSpeed
stops with an assertion or, worse, trains with other numbers than the learner thinks
(LlamaFactory#1116). Here every value the Trainer also knows is "auto", so the Trainer fills it
in, and the files are built by functions the tests load with DeepSpeed's own parser.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from . import memory, registry
from .registry import TrainConfig, Tutorial

# ZeRO partitions across the processes (Rajbhandari et al. 2020): stage 1 the optimizer state,
# stage 2 also the gradients, stage 3 also the weights themselves.
ZERO_STAGES = (1, 2, 3)
DS_FILE, ACCELERATE_FILE = "ds_zero{stage}{suffix}.json", "accelerate_zero{stage}{suffix}.yaml"


def _offload(device: str = "cpu") -> dict:
    # pinned (page-locked) host memory makes the copies to and from the GPU faster
    return {"device": device, "pin_memory": True}


def deepspeed_config(stage: int = 3, offload: bool = False) -> dict:
    """The DeepSpeed config: ZeRO `stage`, optionally offloading optimizer state and weights to CPU.

    Every value the Trainer also sets is "auto" (micro-batch, accumulation, clipping, precision),
    so the two can never disagree. `train_batch_size` is left out on purpose: its "auto" is
    micro x accumulation x world size, and with a world size seen wrongly (torchrun on a CPU)
    DeepSpeed's batch assertion fails; DeepSpeed derives it itself from the other two.
    No "optimizer" or "scheduler" block either: the Trainer's optimizer and learning-rate schedule
    are used, one place for those numbers. With LoRA only the small adapter is trained, so its
    optimizer state is tiny and DeepSpeed's CPU Adam (a C++ build) is not worth it when
    offloading; `zero_force_ds_cpu_optimizer: false` allows the Trainer's optimizer there.

    Args:
        stage: ZeRO stage, 1, 2 or 3.
        offload: Keep the optimizer state (stages 1-3) and, at stage 3, the weights in CPU memory
            between uses: far less GPU memory, slower steps (the seed's 14B on 4 x 32 GB V100).

    Returns:
        A dict to pass as `TrainingArguments(deepspeed=...)` or to write as JSON.

    Raises:
        ValueError: `stage` is not 1, 2 or 3.
    """
    if stage not in ZERO_STAGES:
        raise ValueError(f"ZeRO stage must be one of {ZERO_STAGES}, got {stage!r}")
    zero: dict = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                  "reduce_bucket_size": "auto"}
    if stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": "auto",  # auto: sized from the model's hidden size
            "stage3_param_persistence_threshold": "auto",  # small tensors stay whole on each GPU
            "stage3_max_live_parameters": 1e9,
            "stage3_max_reuse_distance": 1e9,
            # save_model gathers the partitioned weights into whole tensors; without it the saved
            # LoRA adapter holds size-0 tensors (DeepSpeed#4295, peft#453)
            "stage3_gather_16bit_weights_on_model_save": True,
        })
    if offload:
        zero["offload_optimizer"] = _offload()
        if stage == 3:
            zero["offload_param"] = _offload()
    config = {
        "bf16": {"enabled": "auto"},  # the Trainer's bf16 flag (the course's choice on GPUs)
        "fp16": {"enabled": "auto"},  # the seed's V100s had no bf16: fp16 with loss scaling
        "zero_optimization": zero,
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_micro_batch_size_per_gpu": "auto",
    }
    if offload:
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def accelerate_config(num_processes: int, deepspeed_config_file: str | Path) -> dict:
    """accelerate's launch config for one machine with `num_processes` GPUs under DeepSpeed.

    What `accelerate config` asks interactively in the seed, written out. Precision, batch and
    accumulation are not repeated here: with `deepspeed_config_file` accelerate takes them from
    the JSON (and refuses to have them twice). `zero3_init_flag` builds the model already
    partitioned (`deepspeed.zero.Init`), so no process ever holds all 14 B weights.

    Args:
        num_processes: Processes to start, one per GPU.
        deepspeed_config_file: The DeepSpeed JSON this launch uses.

    Returns:
        The YAML's content as a dict.

    Raises:
        ValueError: `num_processes` is below 1.
    """
    if num_processes < 1:
        raise ValueError(f"num_processes must be at least 1, got {num_processes}")
    return {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
        "deepspeed_config": {"deepspeed_config_file": str(deepspeed_config_file),
                             "zero3_init_flag": True},
        "distributed_type": "DEEPSPEED",
        "machine_rank": 0,
        "main_training_function": "main",
        "num_machines": 1,
        "num_processes": num_processes,
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
    }


def write_configs(folder: str | Path, num_processes: int = 2, stage: int = 3,
                  offload: bool = False) -> dict[str, Path]:
    """Write the DeepSpeed JSON and the accelerate YAML that points at it, for a learner to read.

    Args:
        folder: Where to write (created if missing).
        num_processes: GPUs of the launch, written into the YAML.
        stage: ZeRO stage.
        offload: CPU offload of optimizer state and (stage 3) weights.

    Returns:
        {"deepspeed": path of the JSON, "accelerate": path of the YAML}.
    """
    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = "_offload" if offload else ""
    ds_path = folder / DS_FILE.format(stage=stage, suffix=suffix)
    ds_path.write_text(json.dumps(deepspeed_config(stage, offload), indent=2) + "\n")
    acc_path = folder / ACCELERATE_FILE.format(stage=stage, suffix=suffix)
    acc = accelerate_config(num_processes, ds_path.resolve())
    acc_path.write_text(yaml.safe_dump(acc, sort_keys=False))
    return {"deepspeed": ds_path, "accelerate": acc_path}


def check_plan(quant: str, zero_stage: int | None) -> None:
    """Refuse combinations that fail or waste memory, saying what works instead.

    ZeRO-3 partitions every weight across the GPUs; bitsandbytes' packed 4-bit weights cannot be
    partitioned that way, so 4-bit with ZeRO-3 errors or ends up using more memory
    (LlamaFactory#2974, DeepSpeed#3620). QLoRA works with ZeRO-2, which splits only gradients and
    optimizer state, and on one GPU.

    Args:
        quant: "bf16" or "4bit", as for `models.load_model`.
        zero_stage: The ZeRO stage, or None for no DeepSpeed.

    Raises:
        ValueError: an unknown stage, or 4-bit weights with ZeRO-3.
    """
    if zero_stage is not None and zero_stage not in ZERO_STAGES:
        raise ValueError(f"ZeRO stage must be one of {ZERO_STAGES} or None, got {zero_stage!r}")
    if quant == "4bit" and zero_stage == 3:
        raise ValueError(
            "4-bit (QLoRA) weights cannot be partitioned by ZeRO-3. Use QLoRA with ZeRO-2 "
            "(deepspeed_config(stage=2), train_zero3 --stage 2 --quant 4bit), or QLoRA on one GPU "
            "(notebook 01), or bf16 LoRA with ZeRO-3 (--quant bf16)")


# The plans `choose_plan` tries, cheapest in communication first. "ddp": every GPU holds the whole
# bf16 model and only the LoRA gradients (a few MB) are averaged each step. "zero3": the weights
# are split across the GPUs and every layer is all-gathered for each forward and backward, which
# LoRA needs only while the weights do not fit one card. "-offload": weights and optimizer state
# wait in CPU RAM.
PLANS = ("ddp", "zero3", "zero3-offload")
# a plan fits when a micro-batch of this many tokens (or one max_length example, if longer) does
PLAN_MIN_TOKENS = memory.DEFAULT_BATCH_TOKENS


def plan_name(stage: int | None, offload: bool = False) -> str:
    """"ddp" without ZeRO, else "zero<stage>" with "-offload" when offloading."""
    return "ddp" if stage is None else f"zero{stage}" + ("-offload" if offload else "")


def parse_plan(name: str) -> tuple[int | None, bool]:
    """(ZeRO stage or None, offload) of a plan name such as "ddp", "zero3" or "zero2-offload"."""
    for stage in (None, *ZERO_STAGES):
        for offload in (False, True) if stage else (False,):
            if plan_name(stage, offload) == name:
                return stage, offload
    raise ValueError(f"unknown plan {name!r}: use ddp, zero1, zero2 or zero3, optionally with -offload")


@dataclass(frozen=True)
class Plan:
    """How the processes share a run: the ZeRO stage (None: replicated, DDP), offload, and the
    token budget of each GPU's micro-batch under that plan."""

    stage: int | None
    offload: bool
    budget: memory.TokenBudget
    reason: str

    @property
    def name(self) -> str:
        return plan_name(self.stage, self.offload)

    def deepspeed(self) -> dict | None:
        """The DeepSpeed config of this plan, or None for plain data parallelism."""
        return None if self.stage is None else deepspeed_config(self.stage, self.offload)

    def __str__(self) -> str:
        return f"plan: {self.name} ({self.reason}); {self.budget}"


def plan_config(cfg: TrainConfig, stage: int | None, num_gpus: int = 1) -> TrainConfig:
    """`cfg` as this plan can run it. No Liger loss under ZeRO-3: it reads lm_head.weight
    directly, an empty slice there (trl#3368, trl#6372). Embeddings stay on the GPU under ZeRO
    or with several processes: DeepSpeed partitions every weight it is given, and DDP refuses a
    model spread over a CPU and a GPU."""
    if stage == 3:
        cfg = dataclasses.replace(cfg, use_liger=False)
    if stage is not None or num_gpus > 1:
        cfg = dataclasses.replace(cfg, embeddings_on_cpu=False)
    return cfg


def choose_plan(tutorial: Tutorial | str, cfg: TrainConfig, quant: str = "bf16",
                gpu_gib: float | None = None, num_gpus: int = 1, force: str | None = None) -> Plan:
    """The first of PLANS whose step fits each GPU's `gpu_gib`, or the plan `force` names.

    "Fits" is read by `memory.token_budget`, the same reader that sizes single-GPU steps: a plan
    fits when its budget holds PLAN_MIN_TOKENS (or one `cfg.max_length` example, if longer; or
    the `cfg.batch_tokens` set by hand).
    The budget then sizes every micro-batch, so the memory per GPU depends on the plan and the
    card, never on how long the data's chats are. 4-bit weights cannot be split by ZeRO-3, so
    QLoRA is replicated. Without CUDA (`gpu_gib` None) nothing is worth splitting: "ddp".

    Raises:
        ValueError: nothing fits, or a forced plan that cannot hold one `max_length` example.
    """
    t = registry.get(tutorial) if isinstance(tutorial, str) else tutorial
    if force:
        stage, offload = parse_plan(force)
        check_plan(quant, stage)
        run = plan_config(cfg, stage, num_gpus)
        return Plan(stage, offload, memory.token_budget(t, run, quant, gpu_gib, stage or 0, num_gpus,
                                                        offload), "set by hand")
    if gpu_gib is None:
        return Plan(None, False, memory.token_budget(t, plan_config(cfg, None, num_gpus), quant, None),
                    "no GPU: nothing to split, every process holds the model")
    need = cfg.batch_tokens or max(PLAN_MIN_TOKENS, cfg.max_length)  # a budget set by hand is kept
    tried: list[str] = []
    for name in PLANS if quant == "bf16" else ("ddp",):
        stage, offload = parse_plan(name)
        try:
            budget = memory.token_budget(t, plan_config(cfg, stage, num_gpus), quant, gpu_gib, stage or 0,
                                         num_gpus, offload)
        except ValueError:
            budget = None
        if budget and budget.tokens >= need and budget.fits:
            why = (f"{', '.join(tried)}; " if tried else "") + (
                f"{num_gpus} x {gpu_gib:.0f} GiB hold {budget.tokens:,} tokens a GPU")
            return Plan(stage, offload, budget, why)
        if budget and not budget.fits:
            peak = budget.estimate.total_gib - budget.estimate.overhead_gib
            tried.append(f"{name}: {budget.tokens:,} tokens need ~{peak:.1f} GiB")
        else:
            tried.append(f"{name}: only {budget.tokens if budget else 0:,} of {need:,} tokens fit")
    raise ValueError(f"{t.key} ({quant}) does not fit {num_gpus} x {gpu_gib:.1f} GiB: "
                     f"{'; '.join(tried)}; use more GPUs, a lower "
                     + ("batch_tokens" if cfg.batch_tokens else "max_length")
                     + (" or 4-bit on one GPU (notebook 01)" if quant == "bf16" else ""))


def plan_table(tutorial: Tutorial | str, cfg: TrainConfig, cards: tuple[float, ...] = (24, 48, 80, 141),
               gpus: tuple[int, ...] = (1, 2, 4)) -> str:
    """A Markdown table: for each card size and GPU count, the plan `choose_plan` picks, its
    micro-batch and estimated peak per GPU (what notebook 04 shows)."""
    rows = ["| GPU memory | GPUs | plan | tokens a GPU | estimated peak a GPU (GiB) |",
            "| ---: | ---: | --- | ---: | ---: |"]
    for gib in cards:
        for n in gpus:
            try:
                plan = choose_plan(tutorial, cfg, gpu_gib=gib, num_gpus=n)
            except ValueError:
                rows.append(f"| {gib:g} GiB | {n} | does not fit | | |")
                continue
            rows.append(f"| {gib:g} GiB | {n} | {plan.name} | {plan.budget.tokens:,} | "
                        f"{plan.budget.estimate.total_gib:.1f} |")
    return "\n".join(rows)


def setup_process_group(deepspeed: bool = True) -> dict:
    """Join the launcher's process group before `TrainingArguments` is built.

    On GPUs DeepSpeed and accelerate find NCCL themselves. Without CUDA (CI, a laptop) the group
    must be gloo, and accelerate must be told so: left alone it finds no accelerator backend and
    reports one process on every rank, so each rank trains on the same batches and every rank
    writes the checkpoint. A `PartialState` built here with gloo is the state the Trainer then
    reuses. Under DeepSpeed (`deepspeed=True`) DeepSpeed joins first
    (`deepspeed.init_distributed(dist_backend="gloo")`), with its shared-memory all-reduce for
    CPUs switched off: a C++ build of one to two minutes on first use, which a smoke run does
    not need. Either way a process waits `registry.LAUNCH_TIMEOUT_S` for the others, not 30 min.

    Returns:
        Extra `TrainingArguments` keywords (empty on GPUs, or outside a launcher).
    """
    import torch

    if "LOCAL_RANK" not in os.environ or torch.cuda.is_available():
        return {}
    from accelerate import PartialState

    timeout = timedelta(seconds=registry.LAUNCH_TIMEOUT_S)  # on GPUs: TrainingArguments' ddp_timeout

    if deepspeed:
        import deepspeed as ds
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # DeepSpeed's own switch
        ds.init_distributed(dist_backend="gloo", timeout=timeout)
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo", timeout=timeout)
    return {"accelerator_config": {"use_configured_state": True}}


def group_timeout_s() -> float | None:
    """How long this process waits for the others at an exchange (the default process group's
    timeout), or None outside a launch: what `setup_process_group` and `ddp_timeout` set."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return None
    device = torch.device("cuda" if dist.get_backend() == "nccl" else "cpu")
    return dist.distributed_c10d._get_default_group()._get_backend(device).options._timeout.total_seconds()


def check_shared_output(folder: Path) -> None:
    """Every process must see the same `folder`: rank 0 alone writes the adapter and checkpoint
    files there, and every process reads them back on `--resume`. On two machines that means a
    shared filesystem (NFS, say); without one, machine 2 would resume from nothing. Call it on
    every rank, after the process group exists; all raise the same one line if any rank fails.

    Raises:
        SystemExit: a rank does not see rank 0's file in `folder`.
    """
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    mark = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(mark, src=0)
    probe = Path(folder) / f".shared-{mark[0]}"
    if dist.get_rank() == 0:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text(mark[0])
    dist.barrier()
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, probe.is_file() and probe.read_text() == mark[0])
    dist.barrier()
    if dist.get_rank() == 0:
        probe.unlink()
    blind = [rank for rank, ok in enumerate(seen) if not ok]
    if blind:
        raise SystemExit(f"--output {folder}: ranks {blind} do not see what rank 0 writes there; on "
                         "several machines put --output on a filesystem they all share (NFS)")


def torchrun(argv: list[str]) -> int:
    """`torchrun` with the same options (torch's own `torch.distributed.run.main`, in this
    process), except that Ctrl-C or SIGTERM ends it without torchrun's traceback; returns the
    exit status.

    torchrun starts each worker in a session of its own, so a terminal's Ctrl-C reaches torchrun
    alone; it forwards the signal to every worker, waits for them (`TORCH_ELASTIC_SHUTDOWN_TIMEOUT`,
    30 s, then kills them) and dies of its own `SignalException`: a page of traceback under the
    one line the training script said (train_zero3: its newest complete checkpoint, `--resume`).
    Here that exception ends the launch with 128 + the signal's number, as a shell reports a
    process a signal ended. A failed worker still raises torchrun's `ChildFailedError`, traceback
    and root-cause table included: only the interruption is quiet.
    """
    import signal
    import sys

    import psutil
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main

    try:
        main(argv)
    except (SignalException, KeyboardInterrupt) as stop:
        for sig in (signal.SIGINT, signal.SIGTERM):  # torchrun's handler would raise again
            signal.signal(sig, signal.SIG_IGN)
        # torchrun stopped its workers, unless a second Ctrl-C cut its wait short: the learner
        # insists, so whatever is left is killed now, never left training on its own
        left = psutil.Process().children(recursive=True)
        for child in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        psutil.wait_procs(left, timeout=10)  # reaped here: no zombie outlives the launch
        if isinstance(stop, KeyboardInterrupt):  # before torchrun's handler: no worker started yet
            print("selfllm torchrun: interrupted (Ctrl-C) before any worker started", file=sys.stderr)
            return 128 + signal.SIGINT
        return 128 + int(stop.sigval)
    return 0
