"""ZeRO configs, the launch plan, and the launch script run for real on 2 CPU processes.

The config tests parse every variant with DeepSpeed's and accelerate's own loaders. The run
tests start `torchrun --nproc_per_node 2 -m selfllm_utils.train_zero3` once (ZeRO-3, gloo, the
tiny Qwen1.5 stand-in, gradient checkpointing on; about 40 s on 2 cores) and check it from
outside: sharded data, one writer, a complete adapter that a plain process loads to the same
logits, a merge that answers the same. Resuming with offload needs two more launches: `slow`.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
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


def test_no_device_map_under_a_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    """On GPUs load_model pins the model to one device, except under a launcher (DeepSpeed places it)."""
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
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(Stop):
        models.load_model(TUTORIAL, smoke_mode=True)
    assert "device_map" not in seen


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
    launch(out)
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
    args = train_zero3.parse_args(["--output", "x", "--deepspeed", str(path), "--stage", "3"])
    assert train_zero3.deepspeed_plan(args) == (str(path), 2)  # the file's stage, not --stage


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


def test_resume_with_offload_ends_where_the_uninterrupted_run_does(zero3_run: Path,
                                                                   tmp_path: Path) -> None:
    """Stop after step 4 (as if the job died), resume with --resume: steps 5-8 and the final
    weights equal the uninterrupted run's (LlamaFactory#1226: resume under ZeRO-3 + offload)."""
    out = tmp_path / "interrupted"
    first = launch(out, "--offload", "--stop-at-step", str(STOP_AT))
    assert sorted(training.logged(out)) == list(range(1, STOP_AT + 1)), first.stderr[-3000:]
    launch(out, "--offload", "--resume")
    info = json.loads((out / train_zero3.RUN_INFO).read_text())
    assert info["resumed"] and info["offload"]
    # what the Trainer restored: a resume that silently restarted at step 0 reads 0, 0, 0, False
    assert info["restored"] == {"global_step": STOP_AT, "scheduler_steps": STOP_AT,
                                "optimizer_steps": STOP_AT, "rng_restored": True}
    resumed, straight = training.logged(out), training.logged(zero3_run)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(STOP_AT + 1, STEPS + 1):
        assert resumed[step] == pytest.approx(straight[step], abs=TOL), step
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


def test_a_finished_run_resumes_to_nothing(zero3_run: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    out = copy_run(zero3_run, tmp_path / "done", f"checkpoint-{STOP_AT}", f"checkpoint-{STEPS}")
    train_zero3.main(["--tutorial", TUTORIAL.key, "--output", str(out), "--max-steps", str(STEPS),
                      "--resume"])
    said = capsys.readouterr().out.strip().splitlines()
    assert said == [f"already finished: checkpoint-{STEPS} is at step {STEPS} of {STEPS}; nothing to train"]
    assert sorted(p.name for p in out.iterdir()) == [f"checkpoint-{STOP_AT}", f"checkpoint-{STEPS}"]


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
