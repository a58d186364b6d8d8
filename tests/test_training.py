"""Tests for selfllm_utils.training: packed batches are exact, the Trainer learns, settings map.

Packing lays a batch's examples end to end with positions restarting at 0 for each; the model
must then keep them apart in attention. If it does not, nothing fails: the loss just comes out
slightly wrong. So the loss and the LoRA gradients of a packed batch are compared with running
each example alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from types import SimpleNamespace

import datasets
import pytest
import torch
from transformers import DataCollatorForSeq2Seq, TrainerCallback

from selfllm_utils import data, formatting, models, registry, smoke, training

TINY_KEYS = [k for k, t in registry.TUTORIALS.items() if t.smoke.kind == "tiny"]  # llama, glm, qwen2
KEY = "deepseek"
N_EXAMPLES = 3  # of different lengths
LORA_B_STD = 0.5  # B starts at zero; make the adapter change the forward so its gradients mean something
LOSS_ATOL = 1e-5
# float32 sums in another order differ by ~1e-5 of gradients of order 1; attention that leaks
# across packed sequences changes them at the 1e-1 level (see the use_cache trap test below)
GRAD_RTOL, GRAD_ATOL = 1e-3, 1e-4
# With a KV cache, transformers skips the packed-sequence detection and the sequences attend to
# each other: measured max logit difference about 1.0 on these tiny models (transformers 5.24),
# 10 in COURSE.md's measurement; exact packing stays below 1e-5.
TRAP_MIN_LOGIT_DIFF = 0.1
TRAIN_STEPS = 6
MIN_LOSS_DROP = 0.1  # loss after TRAIN_STEPS steps at the smoke learning rate, vs the first step
PNG_MAGIC = b"\x89PNG"
# TrainConfig fields that TrainingArguments takes under the same name.
SAME_NAME = ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
             "num_train_epochs", "max_steps", "logging_steps", "save_steps", "warmup_steps", "seed",
             "optim")


def _examples(tokenizer, family, records: list[dict]) -> list[dict[str, list[int]]]:
    return [formatting.tokenize_messages(data.to_messages(r), tokenizer, family) for r in records]


def _lora_model(key: str, smoke_models, gradient_checkpointing: bool, **changes):
    """A LoRA model whose B matrices are random, so the adapter is part of every forward."""
    tutorial = registry.get(key)
    cfg = dataclasses.replace(registry.smoke_config(tutorial),
                              gradient_checkpointing=gradient_checkpointing, **changes)
    model, tokenizer = smoke_models.model(key)
    peft_model = models.add_lora(model, tutorial, cfg)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, LORA_B_STD)
    return peft_model.train(), tokenizer


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of one sequence (what the model's loss computes)."""
    return torch.nn.functional.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=-100)


def _n_targets(example: dict) -> int:
    return sum(1 for x in example["labels"][1:] if x != -100)


def _grads(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _row(examples) -> dict:
    """One packed row (training.pack_dataset's shape): a micro-batch of these examples."""
    return {"input_ids": [e["input_ids"] for e in examples], "labels": [e["labels"] for e in examples]}


def _packed_forward(model, tokenizer, examples):
    batch = training.collator(tokenizer, packing=True)([_row(examples)])
    return batch, model(**batch)


@pytest.fixture
def examples_of(identity_records):
    records = identity_records[:N_EXAMPLES]

    def make(tokenizer, family):
        examples = _examples(tokenizer, family, records)
        assert len({len(e["input_ids"]) for e in examples}) == N_EXAMPLES  # lengths differ
        return examples

    return make


def test_packed_batch_layout(smoke_models, examples_of) -> None:
    tokenizer = smoke_models.tokenizer(KEY)
    examples = examples_of(tokenizer, registry.get(KEY).family)
    batch = training.collator(tokenizer, packing=True)([_row(examples)])
    lengths = [len(e["input_ids"]) for e in examples]
    assert batch["input_ids"].shape == (1, sum(lengths))  # one row, no pad tokens
    assert "attention_mask" not in batch
    starts = [sum(lengths[:i]) for i in range(N_EXAMPLES)]
    positions = batch["position_ids"][0].tolist()
    assert [i for i, p in enumerate(positions) if p == 0] == starts
    assert all(batch["labels"][0, s].item() == -100 for s in starts)  # no target across a boundary


@pytest.mark.parametrize("key", TINY_KEYS)
def test_packing_equals_one_by_one(key: str, smoke_models, examples_of) -> None:
    """The critical test: per-sequence loss and LoRA gradients, packed == each example alone."""
    model, tokenizer = _lora_model(key, smoke_models, gradient_checkpointing=True)  # the recipe's
    examples = examples_of(tokenizer, registry.get(key).family)
    batch, packed = _packed_forward(model, tokenizer, examples)
    n_total = sum(_n_targets(e) for e in examples)
    packed_grads = _grads(model, packed.loss * n_total)  # token sum, comparable across batchings

    alone_grads: dict[str, torch.Tensor] = {}
    offset = 0
    for example in examples:
        ids, labels = torch.tensor([example["input_ids"]]), torch.tensor([example["labels"]])
        alone = model(input_ids=ids, labels=labels)
        span = slice(offset, offset + ids.shape[1])
        offset += ids.shape[1]
        packed_loss = _token_losses(packed.logits[0, span], labels[0])
        assert packed_loss.item() == pytest.approx(alone.loss.item(), abs=LOSS_ATOL)
        for name, grad in _grads(model, alone.loss * _n_targets(example)).items():
            alone_grads[name] = alone_grads.get(name, 0) + grad
    assert packed_grads.keys() == alone_grads.keys()
    assert any(g.abs().sum() > 0 for n, g in packed_grads.items() if "lora_A" in n)
    torch.testing.assert_close(packed_grads, alone_grads, rtol=GRAD_RTOL, atol=GRAD_ATOL)


@pytest.mark.parametrize("key", TINY_KEYS)
def test_packing_with_kv_cache_mixes_sequences(key: str, smoke_models, examples_of) -> None:
    """The trap of COURSE.md: `use_cache=True` in a training forward silently breaks packing.

    add_lora sets use_cache=False; this shows why. Still reproduces with transformers 5.24.
    """
    model, tokenizer = _lora_model(key, smoke_models, gradient_checkpointing=False)
    examples = examples_of(tokenizer, registry.get(key).family)
    with torch.no_grad():
        _, exact = _packed_forward(model, tokenizer, examples)
        model.config.use_cache = True
        _, mixed = _packed_forward(model, tokenizer, examples)
        model.config.use_cache = False
        alone = torch.cat([model(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in examples])
    assert (exact.logits[0] - alone).abs().max() < LOSS_ATOL
    assert (mixed.logits[0] - alone).abs().max() > TRAP_MIN_LOGIT_DIFF


# --- the Trainer -----------------------------------------------------------------------------


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_trainer_loss_falls_and_curve_is_saved(packing: bool, smoke_models, identity_records,
                                               tmp_path) -> None:
    tutorial = registry.get(KEY)
    cfg = dataclasses.replace(registry.smoke_config(tutorial), max_steps=TRAIN_STEPS, packing=packing)
    model, tokenizer = smoke_models.model(KEY)
    ds = datasets.Dataset.from_list(identity_records[:cfg.per_device_train_batch_size],
                                    features=data.FEATURES)
    train_ds, _ = formatting.build_dataset(ds, tokenizer, tutorial, system="")
    trainer = training.make_trainer(models.add_lora(model, tutorial, cfg), tokenizer, train_ds, cfg,
                                    tmp_path, disable_tqdm=True)
    expected = training.PackedCollator if packing else DataCollatorForSeq2Seq
    assert isinstance(trainer.data_collator, expected)
    assert (trainer.pack_report is not None) == packing
    counts: list[int] = []
    collate = trainer.data_collator

    def counted(features):
        counts.append(sum(len(ids) for f in features for ids in training.sequences(f)))
        return collate(features)

    trainer.data_collator = counted
    frozen = []  # objects kept from the collector at each step end (FrozenGC)

    class Watch(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            frozen.append(gc.get_freeze_count())

    trainer.add_callback(Watch())
    trainer.train()
    assert frozen[0] > 0 and gc.get_freeze_count() == 0  # frozen after step 1, undone at the end
    assert trainer.state.num_input_tokens_seen == sum(counts)  # real tokens: the tokens/s logged
    curve = trainer.loss_curve
    assert curve.steps == list(range(1, TRAIN_STEPS + 1))  # logging_steps=1 in smoke mode
    assert curve.losses[-1] < curve.losses[0] - MIN_LOSS_DROP
    assert curve.path == tmp_path / training.LOSS_PNG
    assert curve.path.read_bytes()[:4] == PNG_MAGIC
    assert trainer.rope_fix in trainer.callback_handler.callbacks  # RoPE guard on every run
    assert trainer.rope_fix.fixed == 0  # fp32 on a CPU: nothing was rounded
    assert list(training.logged(trainer).values()) == curve.losses  # the same log, read from the Trainer


def test_loss_curve_records_eval_loss(tmp_path) -> None:
    curve = training.LossCurve(path=tmp_path / "curve.png", live=False)
    for step, logs in [(1, {"loss": 2.0}), (2, {"loss": 1.5}), (2, {"eval_loss": 1.8}), (3, {"lr": 1})]:
        curve.on_log(None, SimpleNamespace(global_step=step), None, logs=logs)
    assert (curve.steps, curve.losses) == ([1, 2], [2.0, 1.5])
    assert (curve.eval_steps, curve.eval_losses) == ([2], [1.8])
    curve.on_train_end(SimpleNamespace(output_dir=str(tmp_path)),
                       SimpleNamespace(is_world_process_zero=True), None)
    assert (tmp_path / "curve.png").read_bytes()[:4] == PNG_MAGIC


def test_loss_curve_of_a_resumed_run_keeps_the_earlier_steps(tmp_path) -> None:
    """Resumed at step 2, the Trainer restores the log history; the figure shows steps 1-3, not 3."""
    curve = training.LossCurve(path=tmp_path / "curve.png", live=False)
    restored = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "eval_loss": 1.8}]
    curve.on_train_begin(None, SimpleNamespace(log_history=restored), None)
    curve.on_log(None, SimpleNamespace(global_step=3), None, logs={"loss": 1.2})
    assert (curve.steps, curve.losses) == ([1, 2, 3], [2.0, 1.5, 1.2])
    assert (curve.eval_steps, curve.eval_losses) == ([2], [1.8])


def test_training_args_map_the_config(tmp_path) -> None:
    cfg = registry.TrainConfig(per_device_train_batch_size=3, gradient_accumulation_steps=5,
                               learning_rate=7e-4, num_train_epochs=2.5, max_steps=11, logging_steps=2,
                               save_steps=9, warmup_steps=4, seed=7, optim="adamw_torch")
    args = training.training_args(cfg, tmp_path)
    for name in SAME_NAME:
        assert getattr(args, name) == getattr(cfg, name), name
    assert args.output_dir == str(tmp_path)
    assert args.remove_unused_columns is False  # packed batches carry position_ids, no mask
    assert args.report_to == ["tensorboard"]  # runs recorded offline, in the run folder (records.py)
    assert args.include_num_input_tokens_seen == "non_padding"  # for the tokens/s beside each loss
    # packed: CourseTrainer counts the tokens itself, without waiting for the GPU
    packed = training.training_args(dataclasses.replace(cfg, packing=True), tmp_path)
    assert packed.include_num_input_tokens_seen == "no"
    # nothing else in a step waits for the GPU: no NaN check of each loss, batches copied from pinned memory
    assert args.logging_nan_inf_filter is False and args.accelerator_config.non_blocking is True
    launched = training.training_args(cfg, tmp_path, accelerator_config={"even_batches": False})
    assert launched.accelerator_config.even_batches is False and launched.accelerator_config.non_blocking
    if not torch.cuda.is_available():
        assert args.bf16 is False and args.use_liger_kernel is False
    assert training.training_args(cfg, tmp_path, learning_rate=0.5).learning_rate == 0.5  # overrides win


def test_rope_rounded_to_bf16_is_put_back_in_fp32() -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smoke.model_dir(registry.get("qwen1.5")))
    exact = [m.inv_freq.clone() for m in model.modules() if hasattr(m, "inv_freq")]
    assert exact and training.fp32_rope(model) == 0  # nothing to do in fp32
    model.to(torch.bfloat16)  # what DeepSpeed's bf16 engine does to the whole model
    rounded = [m.inv_freq for m in model.modules() if hasattr(m, "inv_freq")]
    assert any(not torch.equal(r.float(), e) for r, e in zip(rounded, exact))
    assert training.fp32_rope(model) == len(exact)
    for m, e in zip([m for m in model.modules() if hasattr(m, "inv_freq")], exact):
        assert m.inv_freq.dtype == torch.float32 and torch.equal(m.inv_freq, e)
        assert torch.equal(m.original_inv_freq, e)


def _random_lora(smoke_models, dtype):
    tutorial = registry.get(KEY)
    model, tokenizer = smoke_models.model(KEY)
    peft_model = models.add_lora(model.to(dtype), tutorial, registry.smoke_config(tutorial))
    torch.manual_seed(0)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:  # B starts at zero; random B makes the adapter's share visible
            p.data = torch.randn_like(p, dtype=torch.float32) * 0.1
    ids = torch.tensor([tokenizer("请介绍一下你自己。我是不要葱姜蒜。")["input_ids"]])
    return peft_model, ids


def _logits_and_grads(model, ids, autocast: bool):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids).logits
    logits.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_fast_lora_forward_matches_peft(smoke_models, dtype) -> None:
    """The fused training forward gives peft's logits and LoRA gradients, and is undone after."""
    peft_model, ids = _random_lora(smoke_models, dtype)
    autocast = dtype == torch.bfloat16  # fp32 LoRA weights next to a bf16 base, as the Trainer runs it
    ref_logits, ref_grads = _logits_and_grads(peft_model, ids, autocast)
    fast = training.FastLora()
    fast.on_train_begin(None, None, None, model=peft_model)
    tutorial = registry.get(KEY)
    assert len(fast.layers) == len(tutorial.lora_targets) * peft_model.config.num_hidden_layers
    logits, grads = _logits_and_grads(peft_model, ids, autocast)
    # bf16: peft rounds B(A x), then the sum; addmm rounds once, so the two differ by bf16
    # rounding (both are ~0.3% of the largest logit from fp32 on average, measured)
    scale = ref_logits.abs().max().item()
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0, "atol": scale / 32}
    torch.testing.assert_close(logits, ref_logits, **tol)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        scale = ref_grads[name].abs().max().item() or 1.0
        torch.testing.assert_close(grads[name] / scale, ref_grads[name] / scale,
                                   **({"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32
                                      else {"rtol": 0, "atol": 0.05}))
    with peft_model.disable_adapter(), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16,
                                                                         enabled=autocast):
        base = peft_model(input_ids=ids).logits
    # the adapter was really skipped, and its share is far beyond the tolerance above
    assert (base.float() - ref_logits.float()).abs().max() > 4 * tol["atol"]
    fast.on_train_end(None, None, None)
    assert not any("forward" in vars(layer) for layer in fast.layers or peft_model.modules())
    torch.testing.assert_close(_logits_and_grads(peft_model, ids, autocast)[0], ref_logits)


def test_fast_lora_leaves_zero3_partitioned_layers_to_peft(smoke_models) -> None:
    peft_model, _ = _random_lora(smoke_models, torch.float32)
    layer = next(m for m in peft_model.modules() if training.FastLora.applies(m))
    layer.lora_B["default"].weight.ds_id = 0  # how DeepSpeed ZeRO-3 marks a partitioned weight
    assert not training.FastLora.applies(layer)


@pytest.mark.gpu
def test_step_clock_times_each_step_when_the_gpu_has_done_it() -> None:
    """On a GPU the clock does not wait at each step end (the host runs ahead while the GPU
    works); the times it reports are still those at which the GPU finished each step."""
    import time

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    clock = training.StepClock()
    clock.on_train_begin(None, None, None)
    start = time.perf_counter()
    for _ in range(3):
        torch.cuda._sleep(100_000_000)  # a step's GPU work, tens of milliseconds
        clock.on_step_end(None, None, None)
    queued = time.perf_counter()  # the host is back long before the GPU is done
    times = clock.times
    done = time.perf_counter()
    steps = [b - a for a, b in zip([start] + times, times)]
    assert queued - start < min(steps) and all(s > 0 for s in steps)
    assert times[-1] <= done + 1e-3


def test_tokens_per_second_leaves_out_warmup_and_eval_gaps() -> None:
    # 7 steps of 1 s (2 micro-batches of 100 tokens each) on 2 ranks, but a 30 s evaluation
    # before step 5 and a slow start; the first 2 steps are warm-up
    times = [0.0, 5.0, 6.0, 7.0, 37.0, 38.0, 39.0]
    info = {"ranks": [{"tokens": [100] * 14, "step_times": times}] * 2}
    assert training.tokens_per_second(info, accumulation=2) == pytest.approx(2 * 200 / 1.0)
    with pytest.raises(ValueError, match="too few"):
        training.tokens_per_second({"ranks": [{"tokens": [1] * 3, "step_times": [0, 1, 2]}]}, 1)


# --- micro-batches sized by a token budget ---------------------------------------------------

MIXED_LENGTHS = [5, 9, 37, 120, 300, 777, 1200, 2048, 4096, 64, 3000, 18]  # up to max_length 4096
BUDGET = 4608


@pytest.mark.parametrize("budget", [64, 512, 4096, 10_000])
def test_best_fit_respects_the_budget_and_keeps_every_example_once(budget: int) -> None:
    import random

    rng = random.Random(budget)
    lengths = [rng.randint(5, 4096) for _ in range(300)]
    groups = training.best_fit(lengths, budget)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # each exactly once
    for group in groups:  # never over the budget, but for an example longer than it, alone
        assert sum(lengths[i] for i in group) <= budget or len(group) == 1
    assert all(len(g) == 1 for g in groups if sum(lengths[i] for i in g) > budget)
    # best fit: no two micro-batches could have been one
    totals = sorted(sum(lengths[i] for i in g) for g in groups)
    assert len(totals) < 2 or totals[0] + totals[1] > budget


@pytest.mark.parametrize("parts", [1, 2, 3, 4, 8])
def test_micro_batches_come_in_a_multiple_of_the_processes(parts: int) -> None:
    """Else the distributed sampler repeats some micro-batches to even out the ranks."""
    import random

    rng = random.Random(parts)
    lengths = [rng.randint(5, 400) for _ in range(37)]
    groups = training.split_evenly(training.best_fit(lengths, 2048), parts)
    assert len(groups) % parts == 0
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # each exactly once
    assert all(g and sum(lengths[i] for i in g) <= 2048 for g in groups)
    alone = training.split_evenly([[0], [1], [2]], 2)  # one-example micro-batches cannot split
    assert alone == [[0], [1], [2]]


def test_pack_report_counts_what_the_sampler_repeats() -> None:
    import datasets

    ds = datasets.Dataset.from_dict({"input_ids": [[1] * 300] * 3, "labels": [[1] * 300] * 3})
    packed, report = training.pack_dataset(ds, 512, parts=2)  # 3 lone examples on 2 processes
    assert len(packed) == report.micro_batches == 3 and report.repeated == 1
    assert "1 micro-batch(es) trained twice" in str(report)
    packed, report = training.pack_dataset(ds, 1024, parts=2)  # [300+300+300]: split in two
    assert len(packed) == 2 and report.repeated == 0


def _mixed_examples(vocab: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for n in MIXED_LENGTHS:
        ids = torch.randint(10, vocab, (n,), generator=gen).tolist()
        prompt = max(1, n // 3)
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def test_budget_packed_micro_batches_equal_each_example_alone(smoke_models) -> None:
    """Mixed lengths 5-4,096 packed by a budget: per-example loss and the LoRA gradients of the
    whole epoch are those of running every example alone."""
    model, tokenizer = _lora_model("qwen1.5", smoke_models, gradient_checkpointing=True)
    examples = _mixed_examples(len(tokenizer))
    packed, report = training.pack_dataset(datasets.Dataset.from_list(examples), BUDGET)
    assert report.examples == len(examples) and report.micro_batches < len(examples)
    collate = training.collator(tokenizer, packing=True)
    packed_grads: dict[str, torch.Tensor] = {}
    per_example: dict[int, float] = {}
    for row in packed:
        assert sum(len(ids) for ids in row["input_ids"]) <= BUDGET
        batch = collate([row])
        out = model(**batch)
        n = sum(_n_targets({"labels": labels}) for labels in row["labels"])
        for name, grad in _grads(model, out.loss * n).items():
            packed_grads[name] = packed_grads.get(name, 0) + grad
        offset = 0
        for ids, labels in zip(row["input_ids"], row["labels"]):
            span = slice(offset, offset + len(ids))
            offset += len(ids)
            per_example[MIXED_LENGTHS.index(len(ids))] = _token_losses(out.logits[0, span].detach(),
                                                                      torch.tensor(labels)).item()
    assert sorted(per_example) == list(range(len(examples)))
    alone_grads: dict[str, torch.Tensor] = {}
    for i, example in enumerate(examples):
        ids, labels = torch.tensor([example["input_ids"]]), torch.tensor([example["labels"]])
        alone = model(input_ids=ids, labels=labels)
        assert per_example[i] == pytest.approx(alone.loss.item(), abs=1e-4), MIXED_LENGTHS[i]
        for name, grad in _grads(model, alone.loss * _n_targets(example)).items():
            alone_grads[name] = alone_grads.get(name, 0) + grad
    # Summed over 4,096-token examples in fp32, single elements drift by up to 0.3% (torch 2.13
    # CPU, transformers 5.24: one of 1,024); each tensor as a whole agrees within 3e-6.
    # A packing bug (sequences attending to each other) moves whole tensors by percents.
    for name, grad in alone_grads.items():
        drift = ((packed_grads[name] - grad).norm() / grad.norm()).item()
        print(f"{name}: relative difference {drift:.2e}")
        assert drift < 1e-4, name  # measured at most 3e-6


def test_trainer_sees_each_example_once_an_epoch(smoke_models, identity_records, tmp_path) -> None:
    tutorial = registry.get(KEY)
    cfg = dataclasses.replace(registry.smoke_config(tutorial), max_steps=-1, num_train_epochs=1,
                              batch_tokens=96, gradient_accumulation_steps=2)
    model, tokenizer = smoke_models.model(KEY)
    ds = datasets.Dataset.from_list(identity_records[:30], features=data.FEATURES)
    train_ds, _ = formatting.build_dataset(ds, tokenizer, tutorial, system="")
    trainer = training.make_trainer(models.add_lora(model, tutorial, cfg), tokenizer, train_ds, cfg,
                                    tmp_path, disable_tqdm=True)
    seen: list[tuple[int, ...]] = []
    collate = trainer.data_collator

    def recording(features):
        for f in features:
            seen.extend(tuple(ids) for ids in f["input_ids"])
            assert sum(len(ids) for ids in f["input_ids"]) <= cfg.batch_tokens
        return collate(features)

    trainer.data_collator = recording
    trainer.train()
    assert sorted(seen) == sorted(tuple(ids) for ids in train_ds["input_ids"])
    assert trainer.state.global_step == -(-trainer.pack_report.micro_batches // 2)  # accumulation 2


def test_out_of_memory_is_one_line_naming_the_budget(smoke_models, identity_records, tmp_path,
                                                     monkeypatch) -> None:
    tutorial = registry.get(KEY)
    cfg = registry.smoke_config(tutorial)
    model, tokenizer = smoke_models.model(KEY)
    ds = datasets.Dataset.from_list(identity_records[:4], features=data.FEATURES)
    train_ds, _ = formatting.build_dataset(ds, tokenizer, tutorial, system="")
    trainer = training.make_trainer(models.add_lora(model, tutorial, cfg), tokenizer, train_ds, cfg,
                                    tmp_path, disable_tqdm=True)

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 86.00 MiB ...")

    monkeypatch.setattr(trainer, "training_step", no_memory)
    with pytest.raises(training.OutOfMemory) as err:
        trainer.train()
    message = str(err.value)
    assert f"batch_tokens={cfg.batch_tokens:,}" in message and f"batch_tokens={cfg.batch_tokens // 2}" in message
    assert err.value.__cause__ is None and err.value.__suppress_context__  # CUDA's traceback hidden
    assert err.value._render_traceback_() == [f"OutOfMemory: {message}"]  # what IPython shows


def test_a_packed_run_needs_a_budget(smoke_models, identity_records, tmp_path) -> None:
    tutorial = registry.get(KEY)
    cfg = dataclasses.replace(registry.smoke_config(tutorial), batch_tokens=None)
    model, tokenizer = smoke_models.model(KEY)
    train_ds = datasets.Dataset.from_list([{"input_ids": [1, 2], "labels": [1, 2]}])
    with pytest.raises(ValueError, match="memory.token_budget"):
        training.make_trainer(model, tokenizer, train_ds, cfg, tmp_path)


# --- guards: each fails when its mechanism is made a no-op -----------------------------------

DROPOUT = 0.5  # large, so a skipped dropout changes the logits far beyond float noise


def test_fast_lora_applies_dropout_like_peft(smoke_models) -> None:
    """In train mode with dropout, the fused forward draws peft's masks from the same RNG."""
    tutorial = registry.get(KEY)
    cfg = dataclasses.replace(registry.smoke_config(tutorial), lora_dropout=DROPOUT)
    model, tokenizer = smoke_models.model(KEY)
    peft_model = models.add_lora(model, tutorial, cfg).train()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    ids = torch.tensor([tokenizer("请介绍一下你自己。我是不要葱姜蒜。")["input_ids"]])

    def forward(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        with torch.no_grad():
            return peft_model(input_ids=ids).logits

    ref = forward(7)
    assert not torch.allclose(forward(8), ref, atol=1e-3)  # dropout is drawn: other seed, other logits
    fast = training.FastLora()
    fast.on_train_begin(None, None, None, model=peft_model)
    assert fast.layers
    try:
        torch.testing.assert_close(forward(7), ref, rtol=1e-5, atol=1e-5)
    finally:
        fast.on_train_end(None, None, None)


def test_packed_cpu_attention_keeps_sequences_apart(smoke_models, examples_of) -> None:
    """`varlen_attention` on the CPU (`_per_sequence`): each packed sequence's logits are its own."""
    model, tokenizer = _lora_model(KEY, smoke_models, gradient_checkpointing=False)
    training.use_varlen_attention(model)
    examples = examples_of(tokenizer, registry.get(KEY).family)
    with torch.no_grad():
        batch, packed = _packed_forward(model, tokenizer, examples)
        assert "cu_seq_lens_q" in batch  # the CPU fallback of varlen_attention is what runs
        alone = torch.cat([model(input_ids=torch.tensor([e["input_ids"]])).logits[0]
                           for e in examples])
    torch.testing.assert_close(packed.logits[0], alone, rtol=1e-4, atol=1e-4)


def test_fp32_rope_callback_restores_the_buffers(tmp_path, smoke_models) -> None:
    """`Fp32Rope.on_train_begin` (registered by make_trainer) puts back fp32 `inv_freq`."""
    from transformers import AutoModelForCausalLM

    folder = smoke.model_dir(registry.get("qwen1.5"))
    fresh = [m.inv_freq.clone() for m in AutoModelForCausalLM.from_pretrained(folder).modules()
             if hasattr(m, "inv_freq")]
    model = AutoModelForCausalLM.from_pretrained(folder).to(torch.bfloat16)  # as DeepSpeed's bf16
    ds = datasets.Dataset.from_list([{"input_ids": [1, 2], "attention_mask": [1, 1],
                                      "labels": [1, 2]}])
    tutorial = registry.get("qwen1.5")
    trainer = training.make_trainer(model, smoke_models.tokenizer("qwen1.5"), ds,
                                    registry.smoke_config(tutorial), tmp_path, disable_tqdm=True)
    callback = trainer.rope_fix
    assert callback in trainer.callback_handler.callbacks
    callback.on_train_begin(trainer.args, trainer.state, trainer.control, model=model)
    buffers = [m.inv_freq for m in model.modules() if hasattr(m, "inv_freq")]
    assert callback.fixed == len(fresh) > 0
    for buffer, expected in zip(buffers, fresh, strict=True):
        assert buffer.dtype == torch.float32 and torch.equal(buffer, expected)


def test_offloaded_activations_give_the_same_loss_and_lora_gradients(smoke_models, examples_of) -> None:
    """A packed, checkpointed step whose saved tensors went through host copies
    (training.OffloadActivations) has exactly the loss and LoRA gradients of the plain step."""
    model, tokenizer = _lora_model(KEY, smoke_models, gradient_checkpointing=True)
    batch = training.collator(tokenizer, packing=True)([_row(examples_of(tokenizer, registry.get(KEY).family))])
    plain = model(**batch).loss
    ref = _grads(model, plain)
    # the tiny model's tensors are small: all offloaded, into buffers that hold a few each
    offload = training.OffloadActivations(min_bytes=0, chunk_bytes=1 << 16)
    for step in range(2):  # the second step reuses the first one's buffers
        with offload:
            loss = model(**batch).loss
        layers = model.config.num_hidden_layers
        assert len(offload.stored) >= layers and offload.host_bytes > 0  # each layer's input went out
        torch.testing.assert_close(loss, plain, rtol=0, atol=0)
        torch.testing.assert_close(_grads(model, loss), ref, rtol=0, atol=0)
        capacity = offload.host_capacity if step == 0 else capacity
    assert len(offload.chunks) > 1 and offload.host_capacity == capacity  # reused, not grown


def test_offloaded_copies_fill_the_gaps_their_neighbours_leave() -> None:
    """GLM-4 with the checkpoint inside its compiled layers saves each layer's input (128 MiB at
    16,384 tokens) and 4 MiB more (by its size, the two rotary tables): placed one after another they held a 256 MiB
    buffer a layer (10.9 GiB pinned for 5.8 GiB copied, H200 runs 16-19). Scaled 1 MiB -> 1 KiB
    here: the buffers hold no more than the copies need plus one, and every copy comes back intact."""
    offload = training.OffloadActivations(min_bytes=0, chunk_bytes=256 * 1024)
    kib = 1024 // 4  # float32 values in a KiB
    layers = [(torch.randn(128 * kib), torch.randn(2 * kib), torch.randn(2 * kib)) for _ in range(8)]
    with offload:
        keys = [offload.pack(t) for layer in layers for t in layer]
        assert offload.host_capacity <= (-(-offload.host_bytes // offload.chunk_bytes) + 1) * offload.chunk_bytes
        for key, t in zip(keys, [t for layer in layers for t in layer]):
            torch.testing.assert_close(offload.stored[key][0], t, rtol=0, atol=0)  # no slice overlaps another


@pytest.mark.gpu
def test_offloaded_tensors_come_back_into_the_compute_streams_memory(smoke_models, examples_of) -> None:
    """In backward the host runs layers ahead of the GPU. Copied back into memory of the side
    stream, each layer input stayed reserved until the GPU caught up: DeepSeek-7B at 4,864 tokens
    reserved 0.54 GiB more than it allocated, and under a 5.5 GiB cap the allocator freed its cache
    8 times a step (H200, 2026-12-03). Every tensor backward takes back must lie in the compute
    stream's memory."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model, tokenizer = _lora_model(KEY, smoke_models, gradient_checkpointing=True, offload_activations=True)
    model.cuda()
    batch = training.collator(tokenizer, packing=True)([_row(examples_of(tokenizer, registry.get(KEY).family))])
    batch = {k: v.cuda() if hasattr(v, "cuda") else v for k, v in batch.items()}
    offload, back = training.OffloadActivations(min_bytes=0), []
    unpack = offload.unpack

    def recording(key):
        gpu = unpack(key)
        if isinstance(key, int) and gpu.is_cuda and gpu.numel():
            back.append(gpu.data_ptr())
        return gpu

    offload.unpack = recording
    with offload:
        loss = model(**batch).loss
    loss.backward()
    torch.cuda.synchronize()
    assert len(back) >= model.config.num_hidden_layers
    segments = [(s["address"], s["address"] + s["total_size"], s["stream"]) for s in torch.cuda.memory_snapshot()]
    streams = {next(stream for a, b, stream in segments if a <= ptr < b) for ptr in back}
    assert streams == {torch.cuda.current_stream().cuda_stream}, "copied back into the side stream's memory"


def test_the_trainer_offloads_only_when_the_config_says(smoke_models, identity_records, tmp_path) -> None:
    tutorial = registry.get(KEY)
    model, tokenizer = smoke_models.model(KEY)
    ds = datasets.Dataset.from_list(_examples(tokenizer, tutorial.family, identity_records[:4]))
    for on in (True, False):
        cfg = dataclasses.replace(registry.smoke_config(tutorial), offload_activations=on)
        trainer = training.make_trainer(model, tokenizer, ds, cfg, tmp_path / str(on))
        assert isinstance(trainer.offload, training.OffloadActivations) is on


def _other_lengths(examples: list[dict]) -> list[list[dict]]:
    """Micro-batches of 45, 44 and 89 tokens (2, 2 and 4 sequences). None matches a size of the
    stand-in (hidden 64): Dynamo takes equal sizes for one symbol ("duck sizing"), and a graph
    made for a 64-token batch (all 3 examples) is specialized to it and made again later."""
    return [examples[:2], examples[1:], examples + examples[1:2]]


@pytest.mark.parametrize("inside", [False, True])
@pytest.mark.parametrize("offloading", [True, False])
def test_compiled_layers_give_the_same_loss_and_lora_gradients_in_one_graph(smoke_models, examples_of,
                                                                            offloading: bool, inside: bool) -> None:
    """training.CompiledLayers: each decoder layer compiled (here "aot_eager": Dynamo's capture and
    AOTAutograd's forward/backward split, without generating kernels, so it runs on a CPU in seconds)
    gives the plain step's loss and LoRA gradients, with FastLora, checkpointing and offloading on,
    on packed micro-batches of other lengths and sequence counts; every layer shares one graph,
    with no graph break and none made again for a new length; plain layers come back after.
    Built for offloading every layer is checkpointed; without, the last one is not
    (models._enable_checkpointing); the checkpoint runs around the compiled call, so that layer
    shares the graph; with the checkpoint inside (`checkpoint_inside`) it has a graph of its own."""
    from torch._dynamo.utils import counters

    model, tokenizer = _lora_model(KEY, smoke_models, gradient_checkpointing=True,
                                   offload_activations=offloading)
    examples = examples_of(tokenizer, registry.get(KEY).family)
    collate = training.collator(tokenizer, packing=True)
    batches = [collate([_row(ex)]) for ex in _other_lengths(examples)]
    fast, compiled = training.FastLora(), training.CompiledLayers(backend="aot_eager", checkpoint_inside=inside)
    fast.on_train_begin(None, None, None, model=model)
    plain = [(lambda loss: (loss, _grads(model, loss)))(model(**batch).loss) for batch in batches]
    torch._dynamo.reset()
    counters.clear()
    compiled.on_train_begin(None, None, None, model=model)
    assert len(compiled.layers) == model.config.num_hidden_layers
    graphs = []
    for batch, (loss_ref, ref) in zip(batches, plain, strict=True):
        for offload in (None, training.OffloadActivations(min_bytes=0)):
            with offload or torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                loss = model(**batch).loss
            torch.testing.assert_close(loss, loss_ref)
            torch.testing.assert_close(_grads(model, loss), ref)
            graphs.append(counters["stats"]["unique_graphs"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert len(set(graphs)) == 1, graphs  # none made again for a new length
    assert graphs[0] == (2 if inside and not offloading else 1), graphs  # the kept last one too, around
    compiled.on_train_end(None, None, None)
    fast.on_train_end(None, None, None)
    assert all(layer._compiled_call_impl is None for layer in model.modules()
               if hasattr(layer, "_compiled_call_impl")) and not compiled.layers


@pytest.mark.parametrize("inside", [False, True])
def test_compiled_layers_place_the_checkpoint_around_or_inside(smoke_models, examples_of, inside) -> None:
    """CompiledLayers places the checkpoint itself, the same on every transformers version (5.23
    and later would put it inside, earlier ones around): around, one graph for every layer, whose
    backward recomputes nothing itself. With `checkpoint_inside` AOTAutograd's backward recomputes
    only what it reads: every adapter's product but the down projection's, whose output only joins
    the residual sum; the kept last layer gets a graph of its own."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    products: dict[str, list[int]] = {"forward": [], "backward": []}  # LoRA products in each graph
    runs = {"forward": 0, "backward": 0}  # how often the graphs ran

    def counting(kind: str):
        def compile_graph(gm, example_inputs):
            products[kind].append(sum(n.target is torch.ops.selfllm.lora_linear.default for n in gm.graph.nodes))
            graph = make_boxed_func(gm.forward)

            def run(args):
                runs[kind] += 1
                return graph(args)
            run._boxed_call = True
            return run
        return compile_graph

    model, tokenizer = _lora_model(KEY, smoke_models, gradient_checkpointing=True)
    batch = training.collator(tokenizer, packing=True)([_row(examples_of(tokenizer, registry.get(KEY).family))])
    plain_loss = model(**batch).loss
    fast = training.FastLora()
    compiled = training.CompiledLayers(backend=aot_autograd(fw_compiler=counting("forward"),
                                                            bw_compiler=counting("backward")),
                                       checkpoint_inside=inside)
    fast.on_train_begin(None, None, None, model=model)
    torch._dynamo.reset()
    compiled.on_train_begin(None, None, None, model=model)
    # inside, the attention's scoped side effect (transformers >= 5.25 with `kernels`) is not replayed
    assert torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint is inside
    loss = model(**batch).loss
    loss.backward()
    torch.testing.assert_close(loss, plain_loss)
    per_layer = sum(1 for m in model.modules() if training.FastLora.applies(m)) // model.config.num_hidden_layers
    compiled.on_train_end(None, None, None)
    fast.on_train_end(None, None, None)
    assert torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint is False  # restored
    layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    assert [m.gradient_checkpointing for m in layers] == [True] * (len(layers) - 1) + [False]  # restored
    assert not any("forward" in vars(m) for m in layers)  # the class's forward again
    n = model.config.num_hidden_layers
    if inside:
        assert sorted(products["forward"]) == [per_layer, per_layer], products
        assert sorted(products["backward"]) == [0, per_layer - 1], products
        assert runs == {"forward": n, "backward": n}, runs
    else:  # the forward graph runs again for every layer but the last: the recompute
        assert products == {"forward": [per_layer], "backward": [0]}, products
        assert runs == {"forward": 2 * n - 1, "backward": n}, runs


def _grad_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all LoRA gradients together, on the CPU in float32."""
    diff = sum((a[n].float().cpu() - b[n].float().cpu()).pow(2).sum() for n in b)
    return (diff / sum(b[n].float().cpu().pow(2).sum() for n in b)).sqrt().item()


# bf16 steps round differently in fused kernels: the compiled step may be up to this many times
# farther from float32 math on the same weights than the eager bf16 step is. Measured on an H200
# (2026-12-02, the 64-token batch of all 3 examples): loss off by 0.0028 eager, 0.0053-0.0061
# compiled; LoRA gradients off by 0.072 eager, 0.090-0.093 compiled. Only a grossly wrong step
# fails here: a 1% change to one weight (loss off by 0.0059) was not told apart from rounding.
ROUNDING_SLACK = 3.0
LOSS_FLOOR = 1e-3  # loss differences below this are rounding whatever the ratio


@pytest.mark.gpu
@pytest.mark.parametrize("inside", [False, True])
def test_compiled_layers_on_a_gpu_give_the_same_step_with_generated_kernels(smoke_models, examples_of,
                                                                            inside: bool) -> None:
    """The path memory.token_budget turns on on a GPU: inductor's generated kernels, varlen
    attention, bf16 autocast, checkpointing with the layer inputs copied to host memory.
    Packed micro-batches of other lengths and sequence counts: no graph break, one graph for
    every layer and length, each layer's input still offloaded, and a loss and LoRA gradients
    nearly as close to float32 math on the same weights (the CPU) as the eager bf16 step's; with
    the checkpoint around the compiled layers or inside them."""
    from torch._dynamo.utils import counters

    if not training.can_compile():
        pytest.skip("needs a CUDA GPU with Triton (training.can_compile)")
    smoke_models.tokenizer(KEY)  # the stand-in is built (random numbers) before the seeds below
    torch.manual_seed(0)  # built for offloading, as the budget does (every layer checkpointed)
    model, tokenizer = _lora_model(KEY, smoke_models, gradient_checkpointing=True, offload_activations=True)
    torch.manual_seed(0)
    exact = _lora_model(KEY, smoke_models, gradient_checkpointing=True)[0].cpu().float()
    for m in (model, exact):
        training.use_varlen_attention(m)  # on the CPU: one float32 sdpa call per sequence
    examples = examples_of(tokenizer, registry.get(KEY).family)
    collate = training.collator(tokenizer, packing=True)
    batches = [collate([_row(ex)]) for ex in _other_lengths(examples)]
    fast, compiled = training.FastLora(), training.CompiledLayers(checkpoint_inside=inside)
    fast.on_train_begin(None, None, None, model=model)

    def step(batch, offload=None):
        batch = {k: v.cuda() if hasattr(v, "cuda") else v for k, v in batch.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16), (offload or contextlib.nullcontext()):
            loss = model(**batch).loss
        return loss.item(), _grads(model, loss)

    truth = [(lambda loss: (loss.item(), _grads(exact, loss)))(exact(**b).loss) for b in batches]
    eager = [step(b) for b in batches]
    torch._dynamo.reset()
    counters.clear()
    compiled.on_train_begin(None, None, None, model=model)
    graphs = []
    torch._logging.set_logs(recompiles=True)  # why a new graph was made, printed
    try:
        for batch, (loss_x, grads_x), (loss_e, grads_e) in zip(batches, truth, eager, strict=True):
            offload = training.OffloadActivations(min_bytes=0)
            loss_c, grads_c = step(batch, offload)
            assert len(offload.stored) >= model.config.num_hidden_layers and offload.host_bytes > 0
            error_e, error_c = _grad_error(grads_e, grads_x), _grad_error(grads_c, grads_x)
            print(f"float32 loss {loss_x:.5f}: eager bf16 {loss_e:.5f}, compiled {loss_c:.5f}; "
                  f"LoRA gradients off by {error_e:.4f} eager, {error_c:.4f} compiled")
            assert abs(loss_c - loss_x) <= ROUNDING_SLACK * max(abs(loss_e - loss_x), LOSS_FLOOR)
            assert error_c <= ROUNDING_SLACK * error_e
            graphs.append(counters["stats"]["unique_graphs"])
    finally:
        torch._logging.set_logs()
        compiled.on_train_end(None, None, None)
        fast.on_train_end(None, None, None)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs == [1, 1, 1], graphs  # one graph: every layer, step and length


@pytest.mark.parametrize("can", [True, False])
def test_the_trainer_compiles_layers_only_where_it_can(can: bool, smoke_models, identity_records, tmp_path,
                                                      monkeypatch) -> None:
    tutorial = registry.get(KEY)
    model, tokenizer = smoke_models.model(KEY)
    ds = datasets.Dataset.from_list(_examples(tokenizer, tutorial.family, identity_records[:4]))
    monkeypatch.setattr(training, "can_compile", lambda: can)  # a CPU here: what a GPU would do
    for asked in (True, False):
        cfg = dataclasses.replace(registry.smoke_config(tutorial), compile_layers=asked)
        trainer = training.make_trainer(model, tokenizer, ds, cfg, tmp_path / f"{can}{asked}")
        on = asked and can
        assert isinstance(trainer.compiled, training.CompiledLayers) is on
        assert (trainer.compiled in trainer.callback_handler.callbacks) is on
        liger = training.training_args(dataclasses.replace(cfg, use_liger=True), tmp_path).liger_kernel_config
        assert liger is None  # Liger needs a GPU: nothing to configure here
