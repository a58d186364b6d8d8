"""Several GPUs with DeepSpeed ZeRO: the config files, the launch plan, the process group.

The seed wrote three files by hand that must agree: DeepSpeed's JSON, accelerate's YAML and the
`TrainingArguments`. Where they disagree on batch size, accumulation or learning rate, DeepSpeed
stops with an assertion or, worse, trains with other numbers than the learner thinks
(LlamaFactory#1116). Here every value the Trainer also knows is "auto", so the Trainer fills it
in, and the files are built by functions the tests load with DeepSpeed's own parser.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

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


def setup_process_group() -> dict:
    """Join the launcher's process group before `TrainingArguments(deepspeed=...)` is built.

    On GPUs DeepSpeed and accelerate find NCCL themselves. Without CUDA (CI, a laptop) the group
    must be gloo (`deepspeed.init_distributed(dist_backend="gloo")`), and accelerate must be told
    so too: left alone it finds no accelerator backend and reports one process on every rank, so
    each rank trains on the same batches and every rank writes the checkpoint. A `PartialState`
    built here with gloo is the state the Trainer then reuses. DeepSpeed's shared-memory
    all-reduce for CPUs is switched off: a C++ build of one to two minutes on first use, which
    a smoke run does not need.

    Returns:
        Extra `TrainingArguments` keywords (empty on GPUs, or outside a launcher).
    """
    import torch

    if "LOCAL_RANK" not in os.environ or torch.cuda.is_available():
        return {}
    import deepspeed
    import deepspeed.ops
    from accelerate import PartialState

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # DeepSpeed's own switch
    deepspeed.init_distributed(dist_backend="gloo")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    return {"accelerator_config": {"use_configured_state": True}}

