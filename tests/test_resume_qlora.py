"""Resuming a 4-bit QLoRA run with the course's paged optimizer reproduces the uninterrupted run.

Paged optimisers have failed on resume elsewhere (LlamaFactory#1226, axolotl#864), and notebook 01
teaches `trainer.train(resume_from_checkpoint=...)` with `paged_adamw_32bit`, so this checks it:
a run of RESUME_STEPS steps saved at STOP_AT, and a second run on a fresh model that resumes from
that checkpoint, must end with the same losses and the same adapter.

What "paged" means where the test runs: on the CPU, bitsandbytes 0.50 keeps the optimizer class and
its update (PagedAdamW, 32-bit states) but allocates ordinary CPU tensors, warning "Paged optimizers
are not supported on CPU. Falling back to non-paged optimizer behavior." On a GPU it pages only
state tensors of at least PAGED_MIN_NUMEL elements (`memory.PAGED_MIN_NUMEL`), which no r=8 LoRA
matrix of the course's 7B models reaches; the `gpu` variant uses a wider stand-in and rank so that
some states really live in paged (unified) memory. It passed on an H100 (2026-11-25, transformers
5.17, peft 0.21.0, bitsandbytes 0.50.2).
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest
import torch

from selfllm_utils import checkpoints, data, formatting, memory, models, registry, smoke, training

RESUME_STEPS = 6
STOP_AT = 3
LOSS_ATOL = 1e-4
WEIGHT_ATOL = 1e-5
OPTIM = registry.get("deepseek").config.optim  # the course's optimizer for this tutorial
CPU_FALLBACK_WARNING = "Paged optimizers are not supported on CPU"
WIDE = {"hidden_size": 2048, "intermediate_size": 4096, "num_hidden_layers": 2,
        "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 128}
WIDE_RANK = 64  # 64 x 2048 = 131,072 elements per LoRA matrix: above the paging threshold


def _run(tutorial, model_dir: Path, cfg, out: Path, train_ds, resume_from: Path | None = None):
    """Load the 4-bit stand-in, add LoRA with a fixed seed, train (or resume); return the trainer."""
    import transformers

    model, tokenizer = models.load_model(tutorial, quant="4bit", path=model_dir)
    transformers.set_seed(cfg.seed)  # the same LoRA initialisation in both runs
    model = models.add_lora(model, tutorial, cfg)
    clock = training.StepClock()  # one time per optimizer step this run trained
    trainer = training.make_trainer(model, tokenizer, train_ds, cfg, out, disable_tqdm=True,
                                    callbacks=[clock])
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    trainer.steps_run = len(clock.times)
    return trainer


def _lora_state(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu() for k, v in trainer.model.named_parameters() if v.requires_grad}


@pytest.mark.parametrize("wide", [pytest.param(False, id="tiny"),
                                  pytest.param(True, id="wide-paged", marks=pytest.mark.gpu)])
def test_resume_matches_uninterrupted_run(tmp_path: Path, wide: bool) -> None:
    if wide and not torch.cuda.is_available():
        pytest.skip("paging needs CUDA")
    tutorial = registry.get("deepseek")
    if wide:
        tutorial = dataclasses.replace(tutorial, smoke=dataclasses.replace(tutorial.smoke, config=WIDE))
        model_dir = tmp_path / "wide-model"
        smoke.build_tiny(tutorial, model_dir)
    else:
        model_dir = smoke.model_dir(tutorial)
    cfg = dataclasses.replace(registry.smoke_config(tutorial), optim=OPTIM, max_steps=RESUME_STEPS,
                              save_steps=STOP_AT, logging_steps=1, per_device_train_batch_size=4,
                              lora_r=WIDE_RANK if wide else registry.smoke_config(tutorial).lora_r)
    ds, _ = data.load_dataset(registry.repo_root() / "dataset" / "huanhuan_sample.json")
    tokenizer = models.load_tokenizer(model_dir, tutorial.family)
    train_ds, _ = formatting.build_dataset(ds, tokenizer, tutorial, max_length=cfg.max_length)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        full = _run(tutorial, model_dir, cfg, tmp_path / "full", train_ds)
    optimizer = full.optimizer.optimizer if hasattr(full.optimizer, "optimizer") else full.optimizer
    assert type(optimizer).__module__.startswith("bitsandbytes") and optimizer.is_paged
    fell_back = any(CPU_FALLBACK_WARNING in str(w.message) for w in caught)
    assert fell_back == (not torch.cuda.is_available())  # the CPU run says it is not paged
    if wide:  # on the GPU some states really are paged buffers
        assert memory.paged_tensors(full.model)[0] > 0

    checkpoint = tmp_path / "full" / f"checkpoint-{STOP_AT}"
    assert (checkpoint / "optimizer.pt").exists()
    assert checkpoints.plan(tmp_path / "full", RESUME_STEPS, say=print).finished  # no step at lr 0
    assert checkpoints.plan(tmp_path / "full", RESUME_STEPS, checkpoint, say=print).step == STOP_AT
    resumed = _run(tutorial, model_dir, cfg, tmp_path / "resumed", train_ds, resume_from=checkpoint)

    assert resumed.state.global_step == full.state.global_step == RESUME_STEPS
    tail = full.loss_curve.losses[STOP_AT:]
    assert resumed.steps_run == len(tail)  # only the steps after the checkpoint ran: no restart
    assert resumed.loss_curve.steps == full.loss_curve.steps  # the curve keeps the restored steps
    assert resumed.loss_curve.losses[STOP_AT:] == pytest.approx(tail, abs=LOSS_ATOL)
    assert full.loss_curve.losses[-1] < full.loss_curve.losses[0]
    a, b = _lora_state(full), _lora_state(resumed)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < WEIGHT_ATOL


@pytest.mark.parametrize("gone", ["optimizer.pt", "scheduler.pt"])
def test_missing_optimizer_or_scheduler_is_refused(tmp_path: Path, gone: str) -> None:
    """The Trainer itself would resume with a fresh optimizer or schedule, without a word."""
    import shutil

    tutorial = registry.get("deepseek")
    cfg = dataclasses.replace(registry.smoke_config(tutorial), max_steps=2, save_steps=1,
                              logging_steps=1, per_device_train_batch_size=4)
    ds, _ = data.load_dataset(registry.repo_root() / "dataset" / "huanhuan_sample.json")
    model, tokenizer = models.load_model(tutorial, smoke_mode=True)
    train_ds, _ = formatting.build_dataset(ds.select(range(8)), tokenizer, tutorial,
                                           max_length=cfg.max_length)
    model = models.add_lora(model, tutorial, cfg)
    training.make_trainer(model, tokenizer, train_ds, cfg, tmp_path / "run", disable_tqdm=True).train()
    shutil.rmtree(tmp_path / "run" / "checkpoint-2")  # as if the run died after step 1
    (tmp_path / "run" / "checkpoint-1" / gone).unlink()
    with pytest.raises(checkpoints.CheckpointError, match=f"lacks {gone}.*--fresh-optimizer"):
        checkpoints.plan(tmp_path / "run", cfg.max_steps, say=print)
    said: list[str] = []
    assert checkpoints.plan(tmp_path / "run", cfg.max_steps, fresh_optimizer=True,
                            say=said.append).step == 1
    assert said == [f"resuming from {tmp_path / 'run' / 'checkpoint-1'} at step 1 with a FRESH "
                    f"optimizer and schedule (no {gone})"]
