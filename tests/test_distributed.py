"""ZeRO configs, the launch plan, and the launch script run for real on 2 CPU processes.

The config tests parse every variant with DeepSpeed's and accelerate's own loaders. The run
tests start `torchrun --nproc_per_node 2 -m selfllm_utils.train_zero3` once (ZeRO-3, gloo, the
tiny Qwen1.5 stand-in, gradient checkpointing on; about 40 s on 2 cores) and check it from
outside: sharded data, one writer, a complete adapter that a plain process loads to the same
logits, a merge that answers the same. Resuming with offload needs two more launches: `slow`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from selfllm_utils import distributed, registry, train_zero3, training

STEPS, EVAL_STEPS, STOP_AT = 8, 4, 4
TUTORIAL = registry.get("qwen1.5")
AUTO_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")
VARIANTS = [(stage, offload) for stage in distributed.ZERO_STAGES for offload in (False, True)]
TOL = 1e-5  # fp32 on the CPU: a reload or a merge moves logits by rounding only


def fill_auto(config: dict, micro: int = 2, accumulation: int = 4) -> dict:
    """What the Trainer writes over "auto" (concrete values, so DeepSpeed's own parser can run)."""
    out = copy.deepcopy(config)
    out.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accumulation,
               gradient_clipping=1.0)
    out["bf16"]["enabled"], out["fp16"]["enabled"] = True, False
    for key, value in out["zero_optimization"].items():
        if value == "auto":
            out["zero_optimization"][key] = 1000
    return out


# ---------------------------------------------------------------- configs, without training


@pytest.mark.parametrize(("stage", "offload"), VARIANTS)
def test_deepspeed_config_is_valid(stage: int, offload: bool) -> None:
    from accelerate.utils.deepspeed import HfDeepSpeedConfig
    from deepspeed.runtime.config import DeepSpeedConfig

    config = distributed.deepspeed_config(stage, offload)
    hf = HfDeepSpeedConfig(copy.deepcopy(config))  # accelerate's reader: accepts "auto"
    assert hf.get_value("zero_optimization.stage") == stage
    assert hf.is_zero3() == (stage == 3)
    if stage > 1:  # accelerate's is_offload() looks at stages 2 and 3 only
        assert hf.is_offload() == offload
    ds = DeepSpeedConfig(fill_auto(config))  # DeepSpeed's own validation
    assert ds.zero_optimization_stage == stage
    assert ds.train_batch_size == 2 * 4  # derived by DeepSpeed itself: micro x accumulation x 1
    assert (ds.zero_config.offload_optimizer is not None) == offload
    assert (ds.zero_config.offload_param is not None) == (offload and stage == 3)


@pytest.mark.parametrize(("stage", "offload"), VARIANTS)
def test_values_the_trainer_sets_are_auto(stage: int, offload: bool) -> None:
    config = distributed.deepspeed_config(stage, offload)
    for key in AUTO_KEYS:
        assert config[key] == "auto", key
    assert config["bf16"]["enabled"] == "auto" and config["fp16"]["enabled"] == "auto"
    # "auto" would be filled with the Trainer's idea of the world size (1 under torchrun on CPU)
    assert "train_batch_size" not in config
    # one place for optimizer and schedule: the Trainer's
    assert "optimizer" not in config and "scheduler" not in config


def test_stage3_gathers_weights_on_save() -> None:
    for offload in (False, True):
        zero = distributed.deepspeed_config(3, offload)["zero_optimization"]
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
        assert {"offload_param", "offload_optimizer"} <= set(zero) if offload else not (
            {"offload_param", "offload_optimizer"} & set(zero))


def test_bad_stage_is_refused() -> None:
    with pytest.raises(ValueError, match="stage"):
        distributed.deepspeed_config(4)
    with pytest.raises(ValueError, match="num_processes"):
        distributed.accelerate_config(0, "ds.json")


def test_written_configs_load_with_accelerate(tmp_path: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    paths = distributed.write_configs(tmp_path, num_processes=4, stage=3, offload=True)
    assert json.loads(paths["deepspeed"].read_text()) == distributed.deepspeed_config(3, True)
    cluster = load_config_from_file(str(paths["accelerate"]))
    assert str(cluster.distributed_type) == "DistributedType.DEEPSPEED"
    assert cluster.num_processes == 4
    assert Path(cluster.deepspeed_config["deepspeed_config_file"]) == paths["deepspeed"].resolve()
    assert cluster.deepspeed_config["zero3_init_flag"] is True
    # with a DeepSpeed JSON, accelerate refuses these in the YAML too (they would disagree)
    raw = distributed.accelerate_config(4, paths["deepspeed"])
    assert not {"mixed_precision", "gradient_accumulation_steps"} & set(raw["deepspeed_config"])
    assert "mixed_precision" not in raw


def test_check_plan() -> None:
    with pytest.raises(ValueError, match="ZeRO-2"):
        distributed.check_plan("4bit", 3)
    for quant, stage in [("4bit", 2), ("4bit", None), ("bf16", 3), ("bf16", None)]:
        distributed.check_plan(quant, stage)
    with pytest.raises(ValueError, match="stage"):
        distributed.check_plan("bf16", 5)


def test_script_refuses_4bit_with_zero3() -> None:
    with pytest.raises(ValueError, match="ZeRO-2"):
        train_zero3.main(["--output", "unused", "--quant", "4bit", "--stage", "3"])


@pytest.mark.parametrize("zero3", [True, False])
def test_device_map_is_this_ranks_gpu_except_under_zero3(monkeypatch: pytest.MonkeyPatch, zero3: bool) -> None:
    """On GPUs load_model puts the model on this process's GPU (LOCAL_RANK), except under ZeRO-3,
    where DeepSpeed places the slices (COURSE.md trap 9: device_map carried into DeepSpeed)."""
    import transformers.integrations
    from transformers import AutoModelForCausalLM

    from selfllm_utils import models

    seen: dict = {}

    class Stop(Exception):
        pass

    def fake_from_pretrained(path, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    monkeypatch.setattr(transformers.integrations, "is_deepspeed_zero3_enabled", lambda: zero3)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(Stop):
        models.load_model(TUTORIAL, smoke_mode=True)
    assert seen.get("device_map") == (None if zero3 else {"": 1})


# ------------------------------------------------ the plan: replicated where it fits, else ZeRO-3


def plan(gib: float, gpus: int, **kw) -> distributed.Plan:
    return distributed.choose_plan(TUTORIAL, TUTORIAL.config, gpu_gib=gib, num_gpus=gpus, **kw)


@pytest.mark.parametrize("gpus", [1, 2, 4])
@pytest.mark.parametrize("gib", [48, 80, 139.8])
def test_weights_are_replicated_where_a_card_holds_them(gib: float, gpus: int) -> None:
    chosen = plan(gib, gpus)
    assert chosen.name == "ddp" and chosen.deepspeed() is None
    assert chosen.budget.tokens >= distributed.PLAN_MIN_TOKENS


def test_zero3_splits_the_weights_only_where_needed_and_offloads_last() -> None:
    assert plan(24, 4).name == "zero3"  # 4 slices of 14B fit a 24 GB card with a full step
    assert plan(24, 2).name == "zero3-offload"  # 2 slices leave too little room: offload
    assert plan(24, 1).name == "zero3-offload"
    assert plan(32, 4).name == "ddp"  # the seed's 4 x 32 GB V100s: no split needed at all
    offload = plan(24, 2)
    zero = offload.deepspeed()["zero_optimization"]
    assert zero["stage"] == 3 and "offload_param" in zero and "zero3: only" in offload.reason


@pytest.mark.parametrize(("gib", "gpus"), [(24, 1), (24, 2), (24, 4), (80, 2), (139.8, 4)])
def test_the_plans_step_is_the_token_budget_of_its_plan(gib: float, gpus: int) -> None:
    """One reader: the plan's micro-batch is memory.token_budget's for that plan, and it fits."""
    from selfllm_utils import memory

    chosen = plan(gib, gpus)
    run = distributed.plan_config(TUTORIAL.config, chosen.stage, gpus)
    again = memory.token_budget(TUTORIAL, run, "bf16", gib, chosen.stage or 0, gpus, chosen.offload)
    assert chosen.budget.config == again.config and chosen.budget.tokens == again.tokens
    est = chosen.budget.estimate
    assert est.total_gib - est.overhead_gib <= gib * (1 - memory.MARGIN)
    assert chosen.budget.config.use_liger == (chosen.stage != 3)  # no Liger loss under ZeRO-3


def test_a_plan_forced_by_hand_is_kept_or_refused_in_one_line() -> None:
    forced = plan(139.8, 2, force="zero3")
    assert forced.name == "zero3" and forced.reason == "set by hand"
    assert forced.budget.config.gradient_checkpointing is True  # ZeRO-3 keeps it on
    with pytest.raises(ValueError, match="does not fit 24.0 GiB"):
        plan(24, 2, force="ddp")  # 14B bf16 weights alone are 26 GiB
    with pytest.raises(ValueError, match="ZeRO-2"):
        plan(24, 2, force="zero3", quant="4bit")
    with pytest.raises(ValueError, match="unknown plan"):
        plan(24, 2, force="zero4")


def test_4bit_is_replicated_and_nothing_fitting_says_what_to_change() -> None:
    assert plan(24, 2, quant="4bit").name == "ddp"  # ZeRO-3 cannot split packed 4-bit weights
    with pytest.raises(ValueError, match="4bit") as small:
        plan(4, 2, quant="4bit")
    assert "zero3" not in str(small.value) and "notebook 01" not in str(small.value)
    with pytest.raises(ValueError, match=r"does not fit 2 x 6.0 GiB: .*zero3-offload: only .*more GPUs"):
        plan(6, 2)
    cpu = plan(None, 2)
    assert cpu.name == "ddp" and cpu.budget.tokens == registry.CPU_BATCH_TOKENS


def test_a_budget_set_by_hand_picks_the_plan_it_fits() -> None:
    cfg = dataclasses.replace(TUTORIAL.config, batch_tokens=2048)
    small = distributed.choose_plan(TUTORIAL, cfg, gpu_gib=24, num_gpus=2)
    assert small.name == "zero3" and small.budget.tokens == 2048  # fits without offload: no offload
    big = distributed.choose_plan(TUTORIAL, dataclasses.replace(cfg, batch_tokens=8192), gpu_gib=24, num_gpus=2)
    assert big.name == "zero3-offload" and big.budget.tokens == 8192 and big.budget.fits
    with pytest.raises(ValueError, match=r"zero3-offload: 12,000 tokens need ~.* a lower batch_tokens"):
        distributed.choose_plan(TUTORIAL, dataclasses.replace(cfg, batch_tokens=12_000), gpu_gib=24, num_gpus=2)


def test_embeddings_leave_the_gpu_only_for_one_plain_process() -> None:
    """GLM-4's course config looks its embeddings up on the CPU (one GPU); DDP across GPUs and
    DeepSpeed both need every weight where the engine puts it."""
    glm4 = registry.get("glm4")
    assert glm4.config.embeddings_on_cpu
    one = distributed.choose_plan(glm4, glm4.config, gpu_gib=24, num_gpus=1)
    assert one.name == "ddp" and one.budget.config.embeddings_on_cpu
    for gpus, force in [(2, None), (1, "zero3"), (2, "zero2")]:
        chosen = distributed.choose_plan(glm4, glm4.config, gpu_gib=80, num_gpus=gpus, force=force)
        assert not chosen.budget.config.embeddings_on_cpu, (gpus, force)


def test_plan_names_round_trip() -> None:
    for stage in (None, *distributed.ZERO_STAGES):
        for offload in (False, True) if stage else (False,):
            assert distributed.parse_plan(distributed.plan_name(stage, offload)) == (stage, offload)
    assert set(distributed.PLANS) <= {distributed.plan_name(s, o) for s in (None, 3) for o in (False, True)}


def test_plan_table_shows_what_choose_plan_picks() -> None:
    table = distributed.plan_table(TUTORIAL, TUTORIAL.config, cards=(24, 139.8), gpus=(2, 4))
    rows = table.splitlines()[2:]
    assert len(rows) == 4
    for row, (gib, gpus) in zip(rows, [(24, 2), (24, 4), (139.8, 2), (139.8, 4)]):
        chosen = plan(gib, gpus)
        assert f"| {chosen.name} | {chosen.budget.tokens:,} |" in row, row


def test_the_command_line_forces_one_plan() -> None:
    def forced(*argv: str):
        return train_zero3.forced_plan(train_zero3.parse_args(["--output", "x", *argv]))

    assert forced() == (None, None)  # auto: distributed.choose_plan decides
    assert forced("--plan", "ddp") == ("ddp", None)
    assert forced("--offload") == ("zero3-offload", None)
    assert forced("--stage", "2") == ("zero2", None)
    with pytest.raises(SystemExit, match="different plans"):
        forced("--plan", "ddp", "--offload")


def test_no_process_group_outside_a_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert distributed.setup_process_group() == {}


# ------------------------------------------------------- the script on 2 processes (ZeRO-3, gloo)


def launch(output: Path, *extra: str) -> subprocess.CompletedProcess:
    """torchrun --standalone (a free port: parallel tests do not collide) with 2 processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "selfllm_utils.train_zero3", "--tutorial", TUTORIAL.key, "--output", str(output),
           "--max-steps", str(STEPS), "--eval-steps", str(EVAL_STEPS), *extra]
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}  # a crash prints every thread's Python stack
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not registry.smoke_mode():
        pytest.skip("runs the smoke model; set SELFLLM_SMOKE=1")
    out = tmp_path_factory.mktemp("zero3") / "run"
    done = launch(out, "--plan", "zero3")  # forced: on a CPU the course's own pick is "ddp"
    (out.parent / "stdout.txt").write_text(done.stdout)
    return out


@pytest.fixture(scope="module")
def run_info(zero3_run: Path) -> dict:
    return json.loads((zero3_run / train_zero3.RUN_INFO).read_text())


@pytest.fixture(scope="module")
def probe(zero3_run: Path) -> dict:
    return torch.load(zero3_run / train_zero3.PROBE)


def test_a_deepspeed_file_of_your_own_is_used(tmp_path: Path) -> None:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(distributed.deepspeed_config(2)))
    args = train_zero3.parse_args(["--output", "x", "--deepspeed", str(path)])
    assert train_zero3.forced_plan(args) == ("zero2", str(path))  # the file's stage decides
    offload = tmp_path / "offload.json"
    offload.write_text(json.dumps(distributed.deepspeed_config(3, offload=True)))
    args = train_zero3.parse_args(["--output", "x", "--deepspeed", str(offload)])
    assert train_zero3.forced_plan(args) == ("zero3-offload", str(offload))  # and its offload
    with pytest.raises(SystemExit, match="different plans"):  # and a --stage that disagrees is refused
        train_zero3.forced_plan(train_zero3.parse_args(["--output", "x", "--deepspeed", str(path),
                                                        "--stage", "3"]))


def test_workshop_preset_reaches_the_training_script() -> None:
    """Notebook 04 trains in a subprocess: the preset must travel as an option, not a notebook cfg."""
    tutorial = registry.get("qwen1.5")
    workshop = train_zero3.parse_args(["--output", "x", "--preset", "workshop"])
    assert train_zero3.run_config(workshop, smoke=False) == registry.WORKSHOP[tutorial.key]
    assert registry.WORKSHOP[tutorial.key] != tutorial.config  # the preset changes something
    course = train_zero3.parse_args(["--output", "x"])
    assert train_zero3.run_config(course, smoke=False) == tutorial.config
    shorter = train_zero3.parse_args(["--output", "x", "--preset", "workshop", "--max-steps", "3"])
    assert train_zero3.run_config(shorter, smoke=False).max_steps == 3  # options still override it


def test_a_model_dir_that_is_no_model_is_refused_before_any_process_starts(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="no config.json"):
        train_zero3.main(["--output", str(tmp_path / "out"), "--model-dir", str(tmp_path)])


def test_each_rank_trains_on_its_own_batches(run_info: dict) -> None:
    ranks = run_info["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert [r["process_index"] for r in ranks] == [0, 1]  # not "1 process" on each rank
    assert all(r["world_size"] == 2 for r in ranks)
    first = [set(r["batches"][0]) for r in ranks]
    assert first[0] and first[1] and not first[0] & first[1]
    # one packed micro-batch a rank (training.pack_dataset), accumulated: DeepSpeed counted both ranks
    assert run_info["train_batch_size"] == run_info["gradient_accumulation_steps"] * 2
    assert run_info["batch_tokens"] == registry.CPU_BATCH_TOKENS and "CPU" in run_info["budget"]


def test_each_rank_counts_tokens_and_times_steps(run_info: dict) -> None:
    accumulation = run_info["gradient_accumulation_steps"]
    for rank in run_info["ranks"]:
        assert len(rank["step_times"]) == STEPS
        # the data loader may fetch one batch ahead, past the last step
        assert len(rank["tokens"]) == len(rank["batches"]) >= STEPS * accumulation
        assert min(rank["tokens"]) >= len(rank["batches"][0])  # at least a token an example
    assert training.tokens_per_second(run_info, accumulation) > 0


def test_only_rank0_writes_model_files(zero3_run: Path, run_info: dict) -> None:
    assert [r["should_save"] for r in run_info["ranks"]] == [True, False]
    # each rank saves only its own slice of the ZeRO state; the adapter and state exist once
    step = zero3_run / f"checkpoint-{STEPS}" / f"global_step{STEPS}"
    assert sorted(p.name for p in step.glob("*optim_states.pt")) == [
        f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    assert len(list(zero3_run.glob("**/adapter_model.safetensors"))) == 1 + len(
        list(zero3_run.glob("checkpoint-*")))


def test_weights_loaded_partitioned_and_config_resolved(run_info: dict) -> None:
    from deepspeed.runtime.config import DeepSpeedConfig

    assert run_info["loaded_partitioned"]  # zero.Init: no rank held the whole model
    used = run_info["deepspeed"]
    assert "auto" not in json.dumps(used)  # the Trainer filled in every value
    assert DeepSpeedConfig(used).zero_optimization_stage == 3


def test_loss_falls_with_gradient_checkpointing(zero3_run: Path, run_info: dict) -> None:
    assert run_info["gradient_checkpointing"]
    curve = training.logged(zero3_run)
    assert sorted(curve) == list(range(1, STEPS + 1))
    assert curve[STEPS] < curve[1] - 0.2
    assert len(training.logged(zero3_run, "eval_accuracy")) == STEPS // EVAL_STEPS
    assert run_info["best_checkpoint"].endswith(tuple(f"checkpoint-{s}" for s in (4, 8)))


def test_saved_adapter_is_complete(zero3_run: Path) -> None:
    """ZeRO-3 keeps slices; saving without gathering writes size-0 tensors (DeepSpeed#4295)."""
    from peft import get_peft_model

    from selfllm_utils import models

    saved = adapter_tensors(zero3_run / train_zero3.ADAPTER)
    assert not list(zero3_run.glob("adapter.*"))  # written aside, then moved in whole
    model, _ = models.load_model(TUTORIAL, smoke_mode=True)
    cfg = registry.smoke_config(TUTORIAL)
    fresh = {k: v for k, v in get_peft_model(model, models.lora_config(TUTORIAL, cfg)).state_dict().items()
             if "lora_" in k}
    assert len(saved) == len(fresh) > 0
    for key, tensor in saved.items():
        match = next(v for k, v in fresh.items() if k.replace(".default", "") == key)
        assert tensor.shape == match.shape and tensor.numel() > 0, key
        assert tensor.abs().sum() > 0, f"{key} is all zeros: not trained or not gathered"


def test_plain_process_reload_gives_the_trained_logits(zero3_run: Path, probe: dict,
                                                        run_info: dict) -> None:
    from selfllm_utils import inference

    model, _ = inference.load_adapter(TUTORIAL, zero3_run / train_zero3.ADAPTER, smoke_mode=True,
                                      base=run_info["model_dir"])  # the folder it trained
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits
    assert torch.allclose(logits, probe["logits"], atol=TOL)
    base = model.get_base_model()
    with torch.no_grad(), model.disable_adapter():
        untrained = base(input_ids=probe["input_ids"]).logits
    assert (untrained - probe["logits"]).abs().max() > 100 * TOL  # the adapter matters


def test_merge_in_a_plain_process_answers_the_same(zero3_run: Path, probe: dict, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from selfllm_utils import inference

    merged_dir = inference.merge_and_save(TUTORIAL, zero3_run / train_zero3.ADAPTER,
                                          tmp_path / "merged", smoke_mode=True)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        logits = merged(input_ids=probe["input_ids"]).logits
    assert torch.allclose(logits, probe["logits"], atol=1e-4)
    adapter_model, tokenizer = inference.load_adapter(TUTORIAL, zero3_run / train_zero3.ADAPTER,
                                                      smoke_mode=True)
    question = "你是谁？"
    a = inference.chat(adapter_model, tokenizer, question, TUTORIAL.family, max_new_tokens=12)
    b = inference.chat(merged, tokenizer, question, TUTORIAL.family, max_new_tokens=12)
    assert a.token_ids == b.token_ids


def resumed_like_uninterrupted(resumed: Path, straight: Path) -> None:
    """The Trainer restored step STOP_AT (a resume that silently restarted at step 0 reads 0, 0,
    0, False), and the steps after it logged the uninterrupted run's losses."""
    info = json.loads((resumed / train_zero3.RUN_INFO).read_text())
    assert info["restored"] == {"global_step": STOP_AT, "scheduler_steps": STOP_AT,
                                "optimizer_steps": STOP_AT, "rng_restored": True}
    after, before = training.logged(resumed), training.logged(straight)
    assert sorted(after) == list(range(1, STEPS + 1))
    for step in range(STOP_AT + 1, STEPS + 1):
        assert after[step] == pytest.approx(before[step], abs=TOL), step


def test_resume_with_offload_ends_where_the_uninterrupted_run_does(zero3_run: Path,
                                                                   tmp_path: Path) -> None:
    """Stop after step 4 (as if the job died), resume with --resume: steps 5-8 and the final
    weights equal the uninterrupted run's (LlamaFactory#1226: resume under ZeRO-3 + offload)."""
    out = tmp_path / "interrupted"
    # the offload plan as a DeepSpeed file of the learner's own (the seed's way), with a setting
    # the course would not write: the run must keep the file's offload, not run as plain ZeRO-3
    own = distributed.deepspeed_config(3, offload=True)
    for part in ("offload_optimizer", "offload_param"):
        own["zero_optimization"][part]["pin_memory"] = False
    ds_file = tmp_path / "my_offload.json"
    ds_file.write_text(json.dumps(own))
    first = launch(out, "--deepspeed", str(ds_file), "--stop-at-step", str(STOP_AT))
    assert sorted(training.logged(out)) == list(range(1, STOP_AT + 1)), first.stderr[-3000:]
    launch(out, "--deepspeed", str(ds_file), "--resume")
    info = json.loads((out / train_zero3.RUN_INFO).read_text())
    assert info["resumed"] and info["offload"] and info["plan"] == "zero3-offload"
    used = info["deepspeed"]["zero_optimization"]
    for part in ("offload_optimizer", "offload_param"):
        assert used[part] == own["zero_optimization"][part], part  # the file's, as written
    resumed_like_uninterrupted(out, zero3_run)
    last = f"checkpoint-{STEPS}"
    a, b = adapter_tensors(out / last), adapter_tensors(zero3_run / last)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=TOL) for k in a)


# ------------------------------------- what --resume may load (checkpoints.plan), on copies of the run


def copy_run(zero3_run: Path, to: Path, *names: str) -> Path:
    """A run folder holding copies of some of the real run's checkpoints."""
    import shutil

    to.mkdir(parents=True)
    for name in names:
        shutil.copytree(zero3_run / name, to / name)
    return to


@pytest.mark.parametrize("damage", ["truncated adapter", "truncated optimizer slice", "no trainer state"])
def test_a_checkpoint_cut_off_mid_save_is_named_and_skipped(zero3_run: Path, tmp_path: Path,
                                                            damage: str) -> None:
    import os as _os

    from selfllm_utils import checkpoints

    out = copy_run(zero3_run, tmp_path / "run", f"checkpoint-{STOP_AT}", f"checkpoint-{STEPS}")
    last = out / f"checkpoint-{STEPS}"
    if damage == "no trainer state":
        (last / "trainer_state.json").unlink()
    else:
        victim = (last / "adapter_model.safetensors" if damage == "truncated adapter"
                  else next((last / f"global_step{STEPS}").glob("*optim_states.pt")))
        _os.truncate(victim, victim.stat().st_size // 2)
    said: list[str] = []
    plan = checkpoints.plan(out, 2 * STEPS, say=said.append, world_size=2)
    assert plan.checkpoint == out / f"checkpoint-{STOP_AT}" and plan.step == STOP_AT
    assert len(said) == 2 and f"skipping checkpoint-{STEPS}" in said[0], said
    assert f"checkpoint-{STOP_AT}" in said[1]


def test_missing_optimizer_state_is_refused_unless_asked(zero3_run: Path, tmp_path: Path) -> None:
    from selfllm_utils import checkpoints

    out = copy_run(zero3_run, tmp_path / "run", f"checkpoint-{STOP_AT}")
    for path in (out / f"checkpoint-{STOP_AT}" / f"global_step{STOP_AT}").glob("*optim_states.pt"):
        path.unlink()
    with pytest.raises(checkpoints.CheckpointError, match="optim_states.*--fresh-optimizer"):
        checkpoints.plan(out, STEPS, say=print, world_size=2)
    said: list[str] = []
    assert checkpoints.plan(out, STEPS, fresh_optimizer=True, say=said.append).step == STOP_AT
    assert "FRESH optimizer" in said[-1]
    with pytest.raises(checkpoints.CheckpointError, match="found 2, one per process: 1 now"):
        checkpoints.plan(copy_run(zero3_run, tmp_path / "one", f"checkpoint-{STOP_AT}"), STEPS,
                         world_size=1)


@pytest.mark.parametrize("adapter", ["whole", "missing", "cut off"])
def test_a_finished_run_resumes_to_nothing_but_its_adapter(zero3_run: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture,
                                                           adapter: str) -> None:
    """A crash after the last checkpoint, before the final adapter was whole: --resume trains
    nothing and writes the adapter the run ended with (its best checkpoint's)."""
    import os as _os
    import shutil

    from selfllm_utils import inference

    out = copy_run(zero3_run, tmp_path / "done", f"checkpoint-{STOP_AT}", f"checkpoint-{STEPS}")
    if adapter != "missing":
        shutil.copytree(zero3_run / train_zero3.ADAPTER, out / train_zero3.ADAPTER)
        shutil.copy2(zero3_run / "trainer_state.json", out / "trainer_state.json")
    if adapter == "cut off":
        weights = out / train_zero3.ADAPTER / "adapter_model.safetensors"
        _os.truncate(weights, weights.stat().st_size // 2)
    before = sorted(p.name for p in out.iterdir())
    train_zero3.main(["--tutorial", TUTORIAL.key, "--output", str(out), "--max-steps", str(STEPS),
                      "--resume"])
    said = capsys.readouterr().out.strip().splitlines()
    assert said[0] == f"already finished: checkpoint-{STEPS} is at step {STEPS} of {STEPS}; nothing to train"
    if adapter == "whole":
        assert len(said) == 1 and sorted(p.name for p in out.iterdir()) == before
        return
    best = Path(json.loads((zero3_run / train_zero3.RUN_INFO).read_text())["best_checkpoint"]).name
    why = "missing" if adapter == "missing" else "adapter_model.safetensors is truncated or damaged (SafetensorError)"
    assert said[1:] == [f"adapter/ was not saved whole ({why}): written from {best}, the best checkpoint"]
    assert sorted(p.name for p in out.iterdir()) == sorted({*before, "adapter", "trainer_state.json"})
    inference.check_adapter(out / train_zero3.ADAPTER)
    a, b = adapter_tensors(out / train_zero3.ADAPTER), adapter_tensors(zero3_run / train_zero3.ADAPTER)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # what the run ended with
    assert training.logged(out) == training.logged(zero3_run)


def test_deepspeeds_files_load_without_running_code(zero3_run: Path, run_info: dict) -> None:
    """The run reloaded its best checkpoint at the end through `checkpoints.load_without_code`
    (test_checkpoints.py: a file that would run code is refused and runs nothing), and every
    DeepSpeed file it wrote loads that way."""
    from selfllm_utils import checkpoints

    best = Path(run_info["best_checkpoint"]).name
    assert run_info["loaded_without_code"] and all(
        f.startswith(f"{best}/global_step") for f in run_info["loaded_without_code"])
    for path in sorted(zero3_run.glob("checkpoint-*/global_step*/*.pt")):
        assert checkpoints.load_without_code(path), path


def test_a_frozen_process_ends_the_launch_after_the_courses_timeout(zero3_run: Path, run_info: dict) -> None:
    """Not the libraries' 30 min (DDP) or 10 min (DeepSpeed), and the launch says so once; the
    DDP launch is checked below, the GPU path's `ddp_timeout` in test_train_zero3.py."""
    assert run_info["process_group_timeout_s"] == registry.LAUNCH_TIMEOUT_S
    said = (zero3_run.parent / "stdout.txt").read_text().splitlines()
    assert [line for line in said if "stops answering" in line] == [
        f"train_zero3: a process that stops answering ends the launch after "
        f"{registry.LAUNCH_TIMEOUT_S // 60} min (registry.LAUNCH_TIMEOUT_S)"]


def test_a_strangers_pickled_checkpoint_needs_trust(zero3_run: Path, tmp_path: Path) -> None:
    from selfllm_utils import checkpoints

    stranger = zero3_run / f"checkpoint-{STOP_AT}"  # outside the new run's own folder
    out = tmp_path / "mine"
    with pytest.raises(SystemExit, match="pickle can run any code.*--trust-checkpoint"):
        train_zero3.main(["--tutorial", TUTORIAL.key, "--output", str(out), "--max-steps", str(STEPS),
                          "--resume", str(stranger)])
    assert checkpoints.plan(out, STEPS, stranger, trust=True, say=print).checkpoint == stranger
    out.mkdir()  # a link inside the run's folder that leads outside it is still a stranger's
    (out / f"checkpoint-{STOP_AT}").symlink_to(stranger, target_is_directory=True)
    with pytest.raises(checkpoints.CheckpointError, match="pickle"):
        checkpoints.plan(out, STEPS, say=print)
    assert checkpoints.plan(zero3_run, STEPS + 4, say=print).checkpoint == zero3_run / f"checkpoint-{STEPS}"


# ------------------------- past one machine: 2 "machines" of 2 processes each on localhost (gloo)


def launch_machines(port: int, outputs: tuple[Path, Path], *extra: str,
                    per_machine: int = 2) -> list[subprocess.CompletedProcess]:
    """What notebook 04 runs on two real machines, with 127.0.0.1 as machine 0's address: one
    `torchrun --nnodes 2 --node_rank N` a machine, `per_machine` processes each, the auto plan."""
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
         "--nproc_per_node", str(per_machine), "--master_addr", "127.0.0.1", "--master_port", str(port),
         "-m", "selfllm_utils.train_zero3", "--tutorial", TUTORIAL.key, "--output", str(outputs[node]),
         "--max-steps", str(STEPS), "--eval-steps", str(EVAL_STEPS), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for node in (0, 1)]
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def machines_ok(done: list[subprocess.CompletedProcess]) -> None:
    for node, result in enumerate(done):
        assert result.returncode == 0, f"machine {node}:\n" + result.stdout[-2000:] + result.stderr[-4000:]


@pytest.fixture(scope="module")
def two_machines(tmp_path_factory: pytest.TempPathFactory, free_port) -> dict[str, Path]:
    """A run on 2 x 2 processes, and a copy of it cut back to its step-STOP_AT checkpoint (as if
    the machines died after that save; the stop itself is tested on one machine above), resumed."""
    if not registry.smoke_mode():
        pytest.skip("runs the smoke model; set SELFLLM_SMOKE=1")
    root = tmp_path_factory.mktemp("machines")
    straight = root / "straight"
    machines_ok(launch_machines(free_port(), (straight, straight)))
    resumed = copy_run(straight, root / "resumed", f"checkpoint-{STOP_AT}")
    machines_ok(launch_machines(free_port(), (resumed, resumed), "--resume"))
    return {"straight": straight, "resumed": resumed}


def test_two_machines_are_one_run_of_four_processes(two_machines: dict[str, Path]) -> None:
    info = json.loads((two_machines["straight"] / train_zero3.RUN_INFO).read_text())
    ranks = info["ranks"]
    assert info["plan"] == "ddp" and info["deepspeed"] is None  # the course's pick on CPUs
    assert [r["process_index"] for r in ranks] == [0, 1, 2, 3]
    assert all(r["world_size"] == 4 for r in ranks)
    assert [r["should_save"] for r in ranks] == [True, False, False, False]  # one writer, not one a machine
    first = [set(r["batches"][0]) for r in ranks]
    assert all(first) and sum(map(len, first)) == len(set().union(*first))  # four disjoint micro-batches
    assert info["train_batch_size"] == 4 * info["gradient_accumulation_steps"]
    assert info["process_group_timeout_s"] == registry.LAUNCH_TIMEOUT_S  # not DDP's 30 min


def test_two_machines_save_one_complete_adapter(two_machines: dict[str, Path]) -> None:
    out = two_machines["straight"]
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert checkpoints == [f"checkpoint-{EVAL_STEPS}", f"checkpoint-{STEPS}"]
    assert len(list(out.glob("**/adapter_model.safetensors"))) == 1 + len(checkpoints)
    saved, fresh = adapter_tensors(out / train_zero3.ADAPTER), adapter_tensors(out / checkpoints[-1])
    assert saved.keys() == fresh.keys() and saved
    assert all(t.numel() > 0 and t.abs().sum() > 0 for k, t in saved.items() if "lora_B" in k)
    # each process's random state travels in the checkpoint: resuming needs all four
    assert sorted(p.name for p in (out / checkpoints[-1]).glob("rng_state_*.pth")) == [
        f"rng_state_{r}.pth" for r in range(4)]


def test_two_machines_resume_where_they_stopped(two_machines: dict[str, Path]) -> None:
    resumed, straight = two_machines["resumed"], two_machines["straight"]
    resumed_like_uninterrupted(resumed, straight)
    a = adapter_tensors(resumed / train_zero3.ADAPTER)
    b = adapter_tensors(straight / train_zero3.ADAPTER)
    assert all(torch.allclose(a[k], b[k], atol=TOL) for k in a)


def test_machines_without_a_shared_output_folder_are_refused(tmp_path: Path, free_port) -> None:
    if not registry.smoke_mode():
        pytest.skip("runs the smoke model; set SELFLLM_SMOKE=1")
    done = launch_machines(free_port(), (tmp_path / "machine0", tmp_path / "machine1"), per_machine=1)
    assert all(result.returncode != 0 for result in done)
    said = done[1].stderr + done[1].stdout
    assert "ranks [1] do not see what rank 0 writes there" in said and "NFS" in said
    assert not list(tmp_path.glob("*/checkpoint-*"))  # refused before any training


# ------------------------------------------------- Ctrl-C in a terminal, through `selfllm torchrun`


def digests(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_ctrl_c_ends_the_launch_in_one_line_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    """A terminal's Ctrl-C is SIGINT to its foreground process group: here the launcher's own
    group (torchrun puts each worker in a session of its own). Sent once the first checkpoint is
    complete, it must end the launch with exit 130 and one line naming the interruption, the
    newest complete checkpoint and --resume; no traceback (torchrun's SignalException), no worker
    left running, the checkpoint untouched."""
    import signal

    import psutil

    from selfllm_utils import checkpoints

    if not registry.smoke_mode():
        pytest.skip("runs the smoke model; set SELFLLM_SMOKE=1")
    # A checkpoint every 20 steps lives 40 steps (save_total_limit=2 removes it two saves later),
    # seconds on a busy 2-core machine; one every 3 steps could come and go between two looks.
    out, log, every = tmp_path / "run", tmp_path / "log.txt", 20
    cmd = [sys.executable, "-m", "selfllm_utils.cli", "torchrun", "--standalone", "--nproc_per_node", "2",
           "-m", "selfllm_utils.train_zero3", "--tutorial", TUTORIAL.key, "--output", str(out),
           "--max-steps", "1000", "--eval-steps", str(every)]  # the course's pick on CPUs: ddp
    with log.open("w") as sink:
        launcher = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:  # the first complete checkpoint, whichever step it is (trainer_state.json comes last)
            while (first := checkpoints.newest_complete(out, say=lambda line: None)) is None:
                assert launcher.poll() is None, log.read_text()[-3000:]
                try:
                    launcher.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    pass
            saved = digests(first)
            started = psutil.Process(launcher.pid).children(recursive=True)
            workers = [p for p in started if "selfllm_utils.train_zero3" in " ".join(p.cmdline())]
            os.killpg(launcher.pid, signal.SIGINT)  # Ctrl-C
            status = launcher.wait(timeout=120)
        finally:
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
    said = log.read_text()
    assert len(workers) == 2, started
    assert status == 128 + signal.SIGINT, said[-3000:]
    assert "Traceback" not in said and "SignalException" not in said, said[-3000:]
    lines = [line for line in said.splitlines() if "interrupted" in line.lower()]
    assert len(lines) == 1 and "--resume" in lines[0], lines
    newest = checkpoints.newest_complete(out, say=lambda line: None)
    assert newest is not None and f"newest complete checkpoint is {newest}:" in lines[0]
    assert not [p.pid for p in started if p.is_running()]  # no orphan still training
    assert digests(first) == saved and checkpoints.problem(first) is None


def test_ctrl_c_pressed_again_leaves_no_worker_running(tmp_path: Path) -> None:
    """A worker that does not stop: torchrun sends SIGINT, on a second Ctrl-C SIGTERM, each time
    waiting up to 30 s; a third Ctrl-C cuts that wait short, and the worker is killed, not left
    running on its own (torchrun's workers are not in the terminal's process group)."""
    import signal

    import psutil

    log = tmp_path / "log.txt"
    cmd = [sys.executable, "-m", "selfllm_utils.cli", "torchrun", "--standalone", "--nproc_per_node", "1",
           "--no-python", "sh", "-c", "trap '' INT TERM; exec sleep 600"]

    def wait_for(text: str) -> None:
        while text not in log.read_text():
            assert launcher.poll() is None, log.read_text()[-3000:]
            time.sleep(0.1)

    with log.open("w") as sink:
        launcher = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        workers: list[psutil.Process] = []
        try:
            while not workers:
                assert launcher.poll() is None, log.read_text()[-3000:]
                workers = [p for p in psutil.Process(launcher.pid).children() if p.name() == "sleep"]
                time.sleep(0.1)
            for then in ("closing signal SIGINT", "closing signal SIGTERM", None):
                os.killpg(launcher.pid, signal.SIGINT)  # Ctrl-C
                if then:
                    wait_for(then)
            status = launcher.wait(timeout=60)
        finally:
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
            alive = [p for p in workers if p.is_running()]
            for p in alive:
                p.kill()
    said = log.read_text()
    assert status == 128 + signal.SIGINT and "Traceback" not in said, said[-3000:]
    assert not alive, "a worker was left running"


@pytest.mark.parametrize(("worker", "status"), [("exit 0", 0), ("echo broken >&2; exit 3", 1)])
def test_selfllm_torchrun_is_torchrun_when_nothing_is_interrupted(worker: str, status: int) -> None:
    """Success is exit 0; a failed worker keeps torchrun's ChildFailedError report (traceback,
    root cause, the worker's exit code): only an interruption is made quiet."""
    done = subprocess.run([sys.executable, "-m", "selfllm_utils.cli", "torchrun", "--standalone",
                           "--nproc_per_node", "1", "--no-python", "sh", "-c", worker],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == status, done.stderr[-3000:]
    if status:
        assert "ChildFailedError" in done.stderr and "exitcode  : 3" in done.stderr, done.stderr[-3000:]
