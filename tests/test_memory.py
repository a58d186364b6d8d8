"""Tests for selfllm_utils.memory: parameter counts are exact, the estimate moves the right way."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from selfllm_utils import memory, models, registry

KEYS = list(registry.TUTORIALS)
LORA_R = 8


def meta_model(tutorial: registry.Tutorial):
    """The full-size model of the tutorial, without memory: every tensor on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**tutorial.reference_config)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("key", KEYS)
def test_parameter_counts_match_peft_and_transformers(key: str) -> None:
    """The counts the estimate is built on equal what transformers builds and peft trains."""
    from peft import get_peft_model

    t = registry.get(key)
    model = meta_model(t)
    linear, other = memory.base_param_counts(t)
    assert linear + other == sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, models.lora_config(t, dataclasses.replace(t.config, lora_r=LORA_R)))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert memory.lora_param_count(t, LORA_R) == trainable


@pytest.mark.parametrize("key", KEYS)
def test_registry_size_agrees(key: str) -> None:
    """params_b in the registry (the model cards' size) and the shape agree within 0.5%."""
    t = registry.get(key)
    assert sum(memory.base_param_counts(t)) / 1e9 == pytest.approx(t.params_b, rel=5e-3)


@pytest.mark.parametrize("quant", memory.QUANTS)
@pytest.mark.parametrize("ckpt", [True, False])
def test_monotonic_in_batch_tokens(quant: str, ckpt: bool) -> None:
    totals = [memory.estimate_memory("deepseek", quant, n, gradient_checkpointing=ckpt).total_gib
              for n in (256, 1024, 4096)]
    assert totals == sorted(totals) and totals[0] < totals[-1]


@pytest.mark.parametrize("key", KEYS)
def test_4bit_below_bf16(key: str) -> None:
    low, high = (memory.estimate_memory(key, q, 1024) for q in ("4bit", "bf16"))
    assert low.weights_gib < 0.6 * high.weights_gib and low.total_gib < high.total_gib


# torch.cuda.max_memory_allocated (GiB) on one H100, DeepSeek-7B shape with random weights, through
# models.load_model + add_lora + training.make_trainer, 3 steps of one sequence, paged_adamw_32bit,
# transformers 5.17, peft 0.21.0, bitsandbytes 0.50.2 (2026-11-25): (quant, tokens, checkpointing, peak)
MEASURED_H100 = [("bf16", 1024, True, 14.566), ("bf16", 4096, True, 18.833), ("bf16", 1024, False, 20.215),
                 ("4bit", 1024, True, 6.411), ("4bit", 2048, True, 8.060), ("4bit", 4096, True, 11.358),
                 ("4bit", 1024, False, 13.468)]
MEASURED_4BIT_LOADED_GIB = 4.49  # memory_allocated right after the 4-bit load, same run
# Same runs with Liger kernels (liger-kernel 0.8.5): the estimate may be high, never low.
MEASURED_H100_LIGER = [("4bit", 2048, True, 5.611), ("4bit", 4096, True, 6.374), ("bf16", 4096, True, 15.058),
                       ("4bit", 1024, False, 8.699)]


@pytest.mark.parametrize(("quant", "tokens", "ckpt", "peak"), MEASURED_H100)
def test_estimate_matches_h100_measurements(quant: str, tokens: int, ckpt: bool, peak: float) -> None:
    """Never under by more than 0.1 GiB, never over by more than 5% (overhead is not in the peak)."""
    est = memory.estimate_memory("deepseek", quant, tokens, gradient_checkpointing=ckpt,
                                 optimizer="paged_adamw_32bit")
    allocated = est.total_gib - est.overhead_gib
    assert peak - 0.1 < allocated < peak * 1.05


@pytest.mark.parametrize(("quant", "tokens", "ckpt", "peak"), MEASURED_H100_LIGER)
def test_liger_estimate_is_safe(quant: str, tokens: int, ckpt: bool, peak: float) -> None:
    """Liger's fused norm/MLP kernels are not modelled: high by up to 12% with checkpointing."""
    est = memory.estimate_memory("deepseek", quant, tokens, gradient_checkpointing=ckpt,
                                 optimizer="paged_adamw_32bit", liger=True)
    allocated = est.total_gib - est.overhead_gib
    assert allocated > peak - 0.1
    assert allocated < peak * 1.12 or not ckpt


# benchmarks/train_speed.py on one H100 (2026-11-26): 4-bit DeepSeek-7B, the course's QLoRA recipe
# (Liger, checkpointing, paged AdamW) with the embedding table on the CPU, packed batches of n
# Chat-甄嬛-length sequences (82 tokens on average), peak allocated over 15 steps: (n, peak GiB)
MEASURED_CPU_EMBEDDINGS = [(24, 4.88), (32, 5.16), (40, 5.46)]


@pytest.mark.parametrize(("seqs", "peak"), MEASURED_CPU_EMBEDDINGS)
def test_cpu_embeddings_estimate_is_safe(seqs: int, peak: float) -> None:
    est = memory.estimate_memory("deepseek", "4bit", seqs * 82, optimizer="paged_adamw_32bit",
                                 liger=True, embeddings_on_cpu=True)
    allocated = est.total_gib - est.overhead_gib
    assert peak - 0.1 < allocated < peak * 1.12


# Same script, GLM-4-9B bf16 under a 24 GiB cap, Liger's fused loss (training.liger_loss_for_glm)
# and the table on the CPU: (tokens a step, peak allocated GiB). Before the course patched Liger's
# loss onto GLM the estimate was 2.5 GiB low: the full logits were there and not in the formula.
MEASURED_GLM4_LIGER = [(1976, 17.87), (2582, 18.28), (3941, 19.10), (5146, 19.79)]


@pytest.mark.parametrize(("tokens", "peak"), MEASURED_GLM4_LIGER)
def test_glm4_estimate_with_liger(tokens: int, peak: float) -> None:
    est = memory.estimate_memory("glm4", "bf16", tokens, optimizer="adamw_torch_fused", liger=True,
                                 embeddings_on_cpu=True)
    allocated = est.total_gib - est.overhead_gib
    assert peak - 0.1 < allocated < peak * 1.12


def test_cpu_embeddings_take_the_table_off_the_gpu() -> None:
    on_gpu, on_cpu = (memory.estimate_memory("deepseek", "4bit", 1024, embeddings_on_cpu=c) for c in (False, True))
    ref = registry.get("deepseek").reference_config
    assert on_gpu.weights_gib - on_cpu.weights_gib == pytest.approx(ref["vocab_size"] * ref["hidden_size"] * 2 / 2**30)
    assert "embeddings on CPU" in on_cpu.setting


def test_4bit_weights_match_the_loaded_model() -> None:
    """nf4 + double quantisation for the linears, bf16 embeddings and lm_head (models.prepare_4bit)."""
    est = memory.estimate_memory("deepseek", "4bit", 1024)
    assert est.weights_gib == pytest.approx(MEASURED_4BIT_LOADED_GIB, abs=0.02)


def test_checkpointing_saves_memory() -> None:
    on, off = (memory.estimate_memory("deepseek", "bf16", 2048, gradient_checkpointing=c) for c in (True, False))
    assert on.activations_gib < off.activations_gib and on.total_gib < off.total_gib


def test_logits_are_a_large_share() -> None:
    """With checkpointing, the fp32 logits of a 100k vocabulary outweigh the rest of the activations;
    Liger's chunked loss removes most of them."""
    est = memory.estimate_memory("deepseek", "bf16", 2048)
    assert est.logits_gib > est.activations_gib / 2
    fused = memory.estimate_memory("deepseek", "bf16", 2048, liger=True)
    assert fused.logits_gib < est.logits_gib / 5


def test_zero3_divides_weights() -> None:
    one = memory.estimate_memory("qwen1.5", "bf16", 2048)
    two = memory.estimate_memory("qwen1.5", "bf16", 2048, zero_stage=3, num_gpus=2)
    off = memory.estimate_memory("qwen1.5", "bf16", 2048, zero_stage=3, num_gpus=2, offload=True)
    assert off.total_gib < two.total_gib < one.total_gib
    assert two.weights_gib < 0.6 * one.weights_gib
    assert off.optimizer_gib == 0


def test_zero2_shards_optimizer_not_weights() -> None:
    one = memory.estimate_memory("qwen2", "bf16", 1024)
    two = memory.estimate_memory("qwen2", "bf16", 1024, zero_stage=2, num_gpus=2)
    assert two.weights_gib == one.weights_gib and two.optimizer_gib == one.optimizer_gib / 2


def test_8bit_optimizer_is_smaller() -> None:
    full, small = (memory.estimate_memory("deepseek", "4bit", 1024, optimizer=o)
                   for o in ("paged_adamw_32bit", "paged_adamw_8bit"))
    assert small.optimizer_gib == pytest.approx(full.optimizer_gib / 4)


def test_fits_and_table() -> None:
    est = memory.estimate_memory("deepseek", "4bit", 1024)
    assert memory.fits("deepseek", est.total_gib + 0.01, quant="4bit", batch_tokens=1024)
    assert not memory.fits("deepseek", est.total_gib - 0.01, quant="4bit", batch_tokens=1024)
    text = str(est)
    assert "total" in text and f"{est.total_gib:.2f}" in text
    assert memory.format_table([est]).count("\n") == 2
    default = memory.estimate_memory("deepseek", "4bit")
    assert str(registry.get("deepseek").config.per_device_train_batch_size * memory.TYPICAL_EXAMPLE_TOKENS) \
        in default.setting.replace(",", "")


@pytest.mark.parametrize("kw", [dict(quant="int8"), dict(optimizer="lion"), dict(zero_stage=4),
                                dict(offload=True), dict(quant="4bit", zero_stage=3, num_gpus=2)])
def test_bad_arguments_raise(kw: dict) -> None:
    with pytest.raises(ValueError):
        memory.estimate_memory("deepseek", **kw)
