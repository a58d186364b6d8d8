"""Training speed of the course's recipes on one GPU, side by side: one JSON line per configuration.

Full-size architectures (shapes from the registry's reference configs) with random weights, trained
with the package's own helpers (memory.token_budget, models.load_model, models.add_lora,
training.make_trainer) on token sequences of three length mixes (`MIXES`): Chat-甄嬛 (82 tokens on
average), Alpaca-like (~250) and long multi-turn chats (~1,000, a tail to 4,096). The course's
configurations take the defaults a learner gets: the token budget fitted to the card (or to
`cap_gib`, a per-process memory cap) and checkpointing decided by it. Each configuration runs
in a fresh process so memory figures do not mix. Run on a GPU machine:

    python benchmarks/train_speed.py                       # every configuration
    python benchmarks/train_speed.py --only qwen2-course   # one
    python benchmarks/train_speed.py --list

Printed per configuration: tokens/s of real (non-pad) tokens, peak allocated and reserved GPU
memory beside `memory.estimate_memory`'s estimate at the chosen budget, MFU against the bf16 matmul
rate measured in the same run, the per-step losses (quality check: same data, same steps), each
step's real tokens and seconds (and the rate over full steps only, which tools are compared by),
and how many graphs compiling made.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import contextlib
import gc
import importlib.metadata
import importlib.util
from dataclasses import replace
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

from selfllm_utils import registry

HERE = Path(__file__).resolve().parent
R = registry

# name: (tutorial, quant, TrainConfig, options). Options: mix (a key of MIXES), trl (TRL's
# SFTTrainer), cap_gib (torch.cuda.set_per_process_memory_fraction), pack_tokens (TRL's packed
# length), padded_packs (the seed's padded batches over the course's packs: the quality pair).
QWEN2 = R.get("qwen2")
DEEPSEEK = R.get("deepseek")
GLM4 = R.get("glm4")
# length mixes: (mean tokens, longest, max_length the learner sets for them)
MIXES = {"chat": (82, 384, 384), "alpaca": (250, 1024, 1024), "long": (1000, 4096, 4096)}
SAME_TOKENS = 1536  # the quality pairs: ~18 Chat-甄嬛 sequences a step, fixed on both sides


def _course(t, mix: str):
    return replace(t.config, max_length=MIXES[mix][2])


CONFIGS: dict[str, tuple] = {
    "qwen2-seed": ("qwen2", "bf16", QWEN2.seed_config, {"mix": "chat"}),
    "deepseek-qlora-seed": ("deepseek", "4bit", DEEPSEEK.seed_config, {"mix": "chat"}),
    **{name: spec for mix in MIXES for name, spec in {
        f"qwen2-course-24g-{mix}": ("qwen2", "bf16", _course(QWEN2, mix), {"mix": mix, "cap_gib": 24}),
        f"qwen2-course-{mix}": ("qwen2", "bf16", _course(QWEN2, mix), {"mix": mix}),
        # TRL's SFTTrainer at its best settings measured here (best-fit packing, padding-free,
        # Liger, no checkpointing), at two packed lengths: which one wins moves between runs
        **{f"qwen2-trl-{n}-{mix}": ("qwen2", "bf16", _course(QWEN2, mix),
                                    {"mix": mix, "trl": True, "pack_tokens": n})
           for n in ((4096, 8192) if mix != "long" else (8192, 16384))},
        f"glm4-course-24g-{mix}": ("glm4", "bf16", _course(GLM4, mix), {"mix": mix, "cap_gib": 24}),
        # uncapped, so no recomputation: what checkpointing costs GLM-4 under 24 GiB
        f"glm4-course-{mix}": ("glm4", "bf16", _course(GLM4, mix), {"mix": mix}),
        # with the checkpointed activations offloaded a 4,096-token example fits 5.5 GiB in 4-bit
        # (without, memory.token_budget refuses it and a 6 GB card cuts long chats at 2,048)
        f"deepseek-qlora-course-{mix}": ("deepseek", "4bit", _course(DEEPSEEK, mix), {"mix": mix, "cap_gib": 5.5}),
    }.items()},
    # neighbours of the fitted QLoRA budget under the 5.5 GiB cap, set by hand (calibration)
    **{f"deepseek-qlora-course-chat-t{n}": ("deepseek", "4bit", replace(DEEPSEEK.config, batch_tokens=n),
                                            {"mix": "chat", "cap_gib": 5.5}) for n in (2688, 3200)},
    # the course's path before activation offloading (the 2026-12-02 default), and with it at
    # budgets set by hand around the one token_budget fits (calibration of the offload estimate)
    **{f"deepseek-qlora-nooffload-{mix}": ("deepseek", "4bit", replace(_course(DEEPSEEK, mix), offload_activations=False,
                                           max_length=min(2048, MIXES[mix][2])), {"mix": mix, "cap_gib": 5.5})
       for mix in MIXES},
    # (run 19: on Alpaca-like and long chats the default ran 0.98-1.04x Unsloth, at the cap with
    # 70-137 allocator retries: a smaller step beside it says whether the cap or the step bounds it)
    **{f"deepseek-qlora-offload-{mix}-t{n}": ("deepseek", "4bit", replace(_course(DEEPSEEK, mix), batch_tokens=n,
                                              gradient_checkpointing=True, offload_activations=True),
                                              {"mix": mix, "cap_gib": 5.5})
       for mix in MIXES for n in (4096, 5120, 6144, 6912)},
    # ... and the default's step without the cap: does the cap (allocator retries) or the step bound it?
    **{f"deepseek-qlora-offload-{mix}-t4864-nocap": ("deepseek", "4bit", replace(
        _course(DEEPSEEK, mix), batch_tokens=4864, gradient_checkpointing=True, offload_activations=True),
        {"mix": mix}) for mix in MIXES},
    **{f"glm4-24g-offload-{mix}": ("glm4", "bf16", replace(_course(GLM4, mix), offload_activations=True),
                                   {"mix": mix, "cap_gib": 24}) for mix in MIXES},
    **{f"glm4-24g-nooffload-{mix}": ("glm4", "bf16", replace(_course(GLM4, mix), offload_activations=False),
                                     {"mix": mix, "cap_gib": 24}) for mix in MIXES},
    # each decoder layer compiled (training.CompiledLayers): fewer kernels and less Python a step
    **{name: spec for mix in MIXES for name, spec in {
        f"deepseek-qlora-compile-{mix}": ("deepseek", "4bit", replace(_course(DEEPSEEK, mix), compile_layers=True),
                                          {"mix": mix, "cap_gib": 5.5}),
        f"qwen2-compile-24g-{mix}": ("qwen2", "bf16", replace(_course(QWEN2, mix), compile_layers=True),
                                     {"mix": mix, "cap_gib": 24}),
        f"qwen2-compile-{mix}": ("qwen2", "bf16", replace(_course(QWEN2, mix), compile_layers=True), {"mix": mix}),
        f"glm4-compile-24g-{mix}": ("glm4", "bf16", replace(_course(GLM4, mix), compile_layers=True),
                                    {"mix": mix, "cap_gib": 24}),
        f"glm4-compile-offload-24g-{mix}": ("glm4", "bf16", replace(_course(GLM4, mix), compile_layers=True,
                                            offload_activations=True), {"mix": mix, "cap_gib": 24}),
    }.items()},
    # A/B of two defaults under 24 GiB: the last layer recomputed like the others (before
    # 2026-12-03), and no FrozenGC (the garbage collector scanning every object of compiling)
    **{f"qwen2-24g-recomputelast-{mix}": ("qwen2", "bf16", _course(QWEN2, mix),
                                          {"mix": mix, "cap_gib": 24, "recompute_last": True}) for mix in MIXES},
    "qwen2-24g-nofrozengc-chat": ("qwen2", "bf16", _course(QWEN2, "chat"),
                                  {"mix": "chat", "cap_gib": 24, "frozen_gc": False}),
    # the checkpoint inside each compiled layer or around it (training.CompiledLayers), set by hand
    # (memory.token_budget picks inside where it fits INSIDE_MIN_SHARE of the step around)
    **{f"{m}-ckpt{place}-{mix}": (m.split("-")[0], q, replace(_course(R.get(m.split("-")[0]), mix),
                                                              checkpoint_inside=place == "inside"),
                                  {"mix": mix, "cap_gib": cap})
       for m, q, cap in (("qwen2-24g", "bf16", 24), ("glm4-24g", "bf16", 24), ("deepseek-qlora", "4bit", 5.5))
       for place in ("inside", "around") for mix in MIXES},
    # Unsloth as an anchor (its own process, its own path: FastLanguageModel, its SFTTrainer, its
    # checkpointing "unsloth" that offloads to host memory), packed to these lengths, adamw_8bit;
    # the cap is set after its 4-bit load
    **{f"deepseek-unsloth-{mix}-{n}": ("deepseek", "4bit", _course(DEEPSEEK, mix),
                                       {"mix": mix, "unsloth": True, "pack_tokens": n, "cap_gib": 5.5})
       for mix in MIXES for n in (2048, 4096, 5120, 6144)},
    # quality: the seed's padded batches vs the course's path on the same packs of sequences
    # with the same hyper-parameters (lr 1e-4, no dropout): the per-step losses should agree
    "qwen2-seed-same": ("qwen2", "bf16", replace(QWEN2.seed_config, lora_dropout=0.0),
                        {"mix": "chat", "padded_packs": True}),
    "qwen2-course-same": ("qwen2", "bf16", replace(QWEN2.config, batch_tokens=SAME_TOKENS, learning_rate=1e-4,
                                              optim="adamw_torch", gradient_checkpointing=True), {"mix": "chat"}),
    "deepseek-qlora-seed-same": ("deepseek", "4bit", replace(DEEPSEEK.seed_config, lora_dropout=0.0),
                                 {"mix": "chat", "padded_packs": True}),
    "deepseek-qlora-course-same": ("deepseek", "4bit", replace(DEEPSEEK.config, batch_tokens=SAME_TOKENS,
                                                          learning_rate=1e-4, gradient_checkpointing=True),
                                   {"mix": "chat"}),
    # the same pair's course side with activation offloading on
    "deepseek-qlora-offload-same": ("deepseek", "4bit", replace(DEEPSEEK.config, batch_tokens=SAME_TOKENS,
                                                           learning_rate=1e-4, gradient_checkpointing=True,
                                                           offload_activations=True), {"mix": "chat"}),
}


WARMUP_STEPS = 3  # not timed: allocation, Triton autotuning, the first optimizer step
# The synthetic training set holds this many runs' worth of packed steps, for every tool, so a run
# sees about as many packs as a learner's epoch. Packing leaves partly filled micro-batches; the
# sampler's seed decides where they fall, and in the timed steps a 4-bit run loses 3-10% (each step
# costs about the same host time): 784 tokens in runs 19-20, 2,804 and 1,662 in run 21. So every
# row also carries `full_steps_rate`, and the report compares tools by it (from run 22 on).
POOL_RUNS = 8


def matmul_tflops() -> float:
    """bf16 8192^3 matrix product rate on this GPU: the bound MFU is measured against."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12


def chat_lengths(n: int, mean_tokens: float = 82.0, seed: int = 0) -> list[tuple[int, int]]:
    """(prompt, answer) token counts shaped like Chat-甄嬛, scaled to its measured mean of 82."""
    import random

    from selfllm_utils import data

    path = data.find_huanhuan() or R.repo_root() / "dataset" / "huanhuan_sample.json"  # the sample if absent
    recs, _ = data.load_records(path)
    pairs = [(len(r["instruction"]) + 20, len(r["output"]) + 1) for r in recs]
    scale = mean_tokens / (sum(p + a for p, a in pairs) / len(pairs))
    rng = random.Random(seed)
    return [(max(1, round(p * scale)), max(2, round(a * scale))) for p, a in rng.choices(pairs, k=n)]


def mix_lengths(mix: str, n: int, seed: int = 0) -> list[tuple[int, int]]:
    """(prompt, answer) token counts of one of MIXES: Chat-甄嬛's own shape, or log-normal lengths
    (instruction data has a long right tail) cut at the mix's longest."""
    import math
    import random

    mean, longest, _ = MIXES[mix]
    if mix == "chat":
        return chat_lengths(n, mean, seed)
    rng = random.Random(seed)
    prompt_share = 0.3 if mix == "alpaca" else 0.45  # multi-turn: earlier turns are prompt too
    out = []
    for _ in range(n):
        total = min(longest, max(8, round(rng.lognormvariate(math.log(mean) - 0.32, 0.8))))
        prompt = max(1, round(total * prompt_share))
        out.append((prompt, total - prompt))
    return out


def synthetic_dataset(n: int, vocab: int, mix: str = "chat"):
    """Random token ids with those lengths; labels mask the prompt like formatting.py does."""
    import random

    import datasets

    rng = random.Random(1)
    rows = []
    for p, a in mix_lengths(mix, n):
        ids = [rng.randrange(100, vocab) for _ in range(p + a)]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * p + ids[p:]})
    return datasets.Dataset.from_list(rows)


def build_random_model(tutorial, folder: Path) -> Path:
    """Save a random-weight model of the full-size shape, with the family's stand-in tokenizer
    (into a side folder renamed when complete: a run stopped mid-save leaves no half folder)."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from selfllm_utils import smoke

    if (folder / "config.json").exists():
        return folder
    tokenizer = smoke.build_tokenizer(tutorial.family)
    config = AutoConfig.for_model(**tutorial.reference_config)
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(folder)
    del model
    torch.cuda.empty_cache()
    return folder


def profiled(steps: range, out: Path):
    """Trainer callback: torch.profiler over `steps`, the kernel table written to `out` and the
    timeline beside it (`.trace.json`).

    The profiler leaves CUDA tracing attached: every later step of the process ran about half
    as fast on an H100. Never read tokens/s from a profiled run.
    """
    import torch
    from transformers import TrainerCallback

    class CB(TrainerCallback):
        prof = None

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == steps.start:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                               torch.profiler.ProfilerActivity.CUDA])
                self.prof.__enter__()
                self.caught = warnings.catch_warnings(record=True)
                self.syncs = self.caught.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")  # each host-device sync: a warning naming its line
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if self.prof is not None and state.global_step == steps.stop:
                torch.cuda.set_sync_debug_mode(0)
                torch.cuda.synchronize()
                wall = time.perf_counter() - self.t0
                self.caught.__exit__(None, None, None)
                syncs = collections.Counter(f"{w.filename}:{w.lineno}" for w in self.syncs
                                            if "synchroniz" in str(w.message))
                self.prof.__exit__(None, None, None)
                self.prof.export_chrome_trace(str(out.with_suffix(".trace.json")))  # for chrome://tracing
                events = self.prof.key_averages()
                # kernels only: an operator's row repeats the time of the kernels it launched
                gpu = sum(e.self_device_time_total for e in events
                          if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6
                split = kernel_split([(e.name, e.time_range.start, e.time_range.end) for e in self.prof.events()
                                      if e.device_type == torch.autograd.DeviceType.CUDA])
                out.write_text(f"wall {wall:.3f} s for {len(steps)} steps, GPU kernels {gpu:.3f} s\n"
                               + json.dumps({"wall_s": round(wall, 3), **split}) + "\n"
                               + events.table(sort_by="self_device_time_total", row_limit=25)
                               + "\nby CPU time (what the host spends launching them):\n"
                               + events.table(sort_by="self_cpu_time_total", row_limit=20)
                               + "\nhost-device syncs (where the host waits and the launch queue runs dry):\n"
                               + "\n".join(f"{n:4d} {where}" for where, n in syncs.most_common()) + "\n")
                self.prof = None

    return CB()


# first match wins: flash attention's kernels carry cutlass in their template names
KERNEL_KINDS = {"attention": ("flash", "fmha", "attention"), "matmul": ("gemm", "nvjet", "cutlass", "xmma")}
NOT_KERNELS = ("command buffer full",)  # the profiler's mark for a host waiting on a full launch queue


def kernel_split(kernels: list[tuple[str, float, float]]) -> dict:
    """Seconds of the GPU's profiled kernels (name, start and end in microseconds) by kind, and
    `busy_s`: the time at least one kernel other than a copy ran. Copies run on their own engine
    (offloading's go on a side stream), so summing every kernel's time overstates how busy the
    GPU was; wall time minus `busy_s` is when it computed nothing."""
    split = dict.fromkeys(["copy_s", *(f"{k}_s" for k in KERNEL_KINDS), "other_s"], 0.0)
    compute = []
    for name, start, end in kernels:
        low = name.lower()
        if low in NOT_KERNELS:
            continue
        kind = "copy" if low.startswith(("memcpy", "memset")) else next(
            (k for k, words in KERNEL_KINDS.items() if any(w in low for w in words)), "other")
        split[f"{kind}_s"] += (end - start) / 1e6
        if kind != "copy":
            compute.append((start, end))
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(compute):  # the union of the compute kernels' intervals
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return {"busy_s": round(busy / 1e6, 3), **{k: round(v, 3) for k, v in split.items()}}


def counting(collate, counts: list[int]):
    """Wrap a collator to count the real tokens of every micro-batch it builds (packed rows too)."""
    from selfllm_utils import training


    def run(features):
        counts.append(sum(len(ids) for f in features for ids in training.sequences(f)))
        return collate(features)

    return run


def padded_packs(tokenizer):
    """The seed's collator (padding to the longest) over the course's packed rows."""
    from selfllm_utils import training

    pad = training.collator(tokenizer, packing=False)
    return lambda feats: pad([{"input_ids": i, "attention_mask": [1] * len(i), "labels": l}
                              for f in feats for i, l in zip(f["input_ids"], f["labels"])])


def run_unsloth(name: str, steps: int, tflops: float, workdir: Path) -> dict:
    """Unsloth's own path, as its notebooks train: FastLanguageModel (4-bit on load), its LoRA with
    `use_gradient_checkpointing="unsloth"`, TRL's SFTTrainer as Unsloth patches it, adamw_8bit,
    best-fit packing without padding. Imported first: it patches transformers, peft and trl."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    import unsloth  # noqa: F401  (before transformers)
    from unsloth import FastLanguageModel

    import torch
    from trl import SFTConfig, SFTTrainer

    from selfllm_utils import training

    key, quant, cfg, opts = CONFIGS[name]
    tutorial, n = R.get(key), opts["pack_tokens"]
    folder = build_random_model(tutorial, workdir / key)
    torch.cuda.empty_cache()
    started = time.perf_counter()
    model, tokenizer = FastLanguageModel.from_pretrained(model_name=str(folder), max_seq_length=n,
                                                         dtype=torch.bfloat16, load_in_4bit=quant == "4bit")
    load_s = time.perf_counter() - started
    cap = opts.get("cap_gib")
    if cap:  # after loading, as before: its load passes through more memory than it keeps
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(cap / total)
    model = FastLanguageModel.get_peft_model(model, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0,
                                             target_modules=list(tutorial.lora_targets), bias="none",
                                             use_gradient_checkpointing="unsloth", random_state=cfg.seed)
    ds = synthetic_dataset(max(512, round(POOL_RUNS * steps * n / MIXES[opts["mix"]][0])), len(tokenizer), opts["mix"])
    ds = ds.filter(lambda ex: len(ex["input_ids"]) <= cfg.max_length)
    ds = ds.map(lambda ex: {"completion_mask": [int(x != -100) for x in ex["labels"]]})
    ds = ds.remove_columns(["labels", "attention_mask"])
    args = SFTConfig(output_dir=str(workdir / name), per_device_train_batch_size=1, gradient_accumulation_steps=1,
                     max_steps=steps, learning_rate=cfg.learning_rate, logging_steps=cfg.logging_steps, bf16=True, packing=True,
                     packing_strategy="bfd", padding_free=True, max_length=n, optim="adamw_8bit",
                     report_to="none", save_strategy="no", completion_only_loss=True, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
    counts: list[int] = []
    clock = training.StepClock()
    trainer.data_collator = counting(trainer.data_collator, counts)
    trainer.add_callback(clock)
    losses_of = step_losses(trainer, 1)
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train()
    tps = training.tokens_per_second({"ranks": [{"tokens": counts, "step_times": clock.times}]}, 1,
                                     warmup=WARMUP_STEPS)
    losses = losses_of()
    return {"config": name, "gpu": torch.cuda.get_device_name(0), "mix": opts["mix"], "tokens_per_s": round(tps),
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
            "unsloth": unsloth.__version__, "transformers": importlib.metadata.version("transformers"),
            "trl": importlib.metadata.version("trl"), "pack_tokens": n, "cap_gib": cap, "optim": "adamw_8bit",
            "checkpointing": "unsloth", "loss_last5": round(sum(losses[-5:]) / len(losses[-5:]), 4),
            "losses": [round(x, 4) for x in losses], "load_s": round(load_s, 1), "steps": steps,
            "tokens_per_step": round(sum(counts[WARMUP_STEPS:steps]) / (steps - WARMUP_STEPS)),
            "max_length": cfg.max_length, **steps_and_full_rate(counts, 1, started, clock.times)}


def run_one(name: str, steps: int, tflops: float, workdir: Path) -> dict:
    import torch

    if CONFIGS[name][3].get("unsloth"):
        return run_unsloth(name, steps, tflops, workdir)

    from selfllm_utils import memory, models, training

    key, quant, cfg, opts = CONFIGS[name]
    steps = opts.get("steps", steps)
    tutorial = R.get(key)
    cap = opts.get("cap_gib")
    folder = build_random_model(tutorial, workdir / key)  # before the cap: it builds in bf16 on the GPU
    torch.cuda.empty_cache()
    if cap:
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(cap / total)
    started = time.perf_counter()
    model, tokenizer = models.load_model(tutorial, quant=quant, path=folder)
    load_s = time.perf_counter() - started
    trl = opts.get("trl")
    if opts.get("padded_packs"):  # same packs as the course side, each padded as the seed does
        budget = None
        cfg = replace(cfg, per_device_train_batch_size=1, gradient_accumulation_steps=1)
    else:  # what a learner gets: the budget fitted to this card (or the cap)
        budget = memory.token_budget(tutorial, cfg, quant, gpu_gib=cap)
        cfg = budget.config
    cfg = replace(cfg, max_steps=steps, save_steps=10**6,  # logging as a learner's run does
                  use_liger=cfg.use_liger and not trl)
    mean = MIXES[opts["mix"]][0]
    step_tokens = (cfg.batch_tokens or SAME_TOKENS) * cfg.gradient_accumulation_steps if cfg.packing or \
        opts.get("padded_packs") else cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * mean
    if trl:
        step_tokens = opts["pack_tokens"]
    ds = synthetic_dataset(max(512, round(POOL_RUNS * steps * step_tokens / mean)), len(tokenizer), opts["mix"])
    if cfg.packing or opts.get("padded_packs"):
        ds = ds.filter(lambda ex: len(ex["input_ids"]) <= cfg.max_length)  # already cut, as formatting does
    counts: list[int] = []  # real tokens of each micro-batch, in order
    clock = training.StepClock()  # the time each optimizer step ends
    torch.cuda.reset_peak_memory_stats()
    import transformers

    if trl:
        trainer = trl_trainer(model, tokenizer, ds, tutorial, cfg, opts, workdir / name)
    else:
        transformers.set_seed(cfg.seed)  # the same LoRA matrices on both sides of a quality pair
        peft_model = models.add_lora(model, tutorial, cfg)
        if opts.get("recompute_last"):
            peft_model.get_base_model().model.layers[-1].gradient_checkpointing = True
        if opts.get("padded_packs"):
            ds, _ = training.pack_dataset(ds, SAME_TOKENS)
        trainer = training.make_trainer(peft_model, tokenizer, ds, cfg, workdir / name, disable_tqdm=True)
        if opts.get("padded_packs"):
            trainer.data_collator = padded_packs(tokenizer)
        if opts.get("frozen_gc") is False:
            trainer.remove_callback(training.FrozenGC)
    trainer.data_collator = counting(trainer.data_collator, counts)
    trainer.add_callback(clock)
    host_ends = host_step_ends()
    trainer.add_callback(host_ends)
    accumulation = 1 if trl else cfg.gradient_accumulation_steps
    losses_of = step_losses(trainer, accumulation)
    if os.environ.get("SELFLLM_PROFILE"):  # set by --profile for a run of its own
        # kernel table of steps 2-3, inside the untimed warm-up (later steps run slower: don't time it)
        trainer.add_callback(profiled(range(1, 3), Path(os.environ["SELFLLM_PROFILE"]) / f"{name}.txt"))
    started = time.perf_counter()
    with gc_pauses() as pauses:
        trainer.train()
    # the same reader as the ZeRO-3 runs (benchmarks/zero3_gpu.py): steps after the warm-up only
    run = {"ranks": [{"tokens": counts, "step_times": clock.times}]}
    tps = training.tokens_per_second(run, accumulation, warmup=WARMUP_STEPS)
    timed = sum(counts[WARMUP_STEPS * accumulation:steps * accumulation])
    losses = losses_of()
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    if quant == "4bit":  # packed 4-bit weights count two parameters per byte
        n_params = sum(p.numel() * (2 if p.dtype == torch.uint8 else 1)
                       for n, p in model.named_parameters() if "embed_tokens" not in n)
    est = budget.estimate if budget and not trl else None  # TRL packs its own lengths
    return {
        "config": name, "gpu": torch.cuda.get_device_name(0), "mix": opts["mix"], "tokens_per_s": round(tps),
        "transformers": transformers.__version__, "trl": importlib.metadata.version("trl") if trl else None,
        "checkpoint_inside": bool(getattr(trainer, "compiled", None) and trainer.compiled.checkpoint_inside),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        "estimate_allocated_gib": round(est.total_gib - est.overhead_gib, 2) if est else None,
        "batch_tokens": None if trl else cfg.batch_tokens, "budget": budget.reason if est else None,
        "mfu": round(4 * n_params * tps / (tflops * 1e12), 4), "matmul_tflops": round(tflops),
        "loss_last5": round(sum(losses[-5:]) / len(losses[-5:]), 4),
        "losses": [round(x, 4) for x in losses], "load_s": round(load_s, 1),
        "steps": steps, "tokens_per_step": round(timed / (steps - WARMUP_STEPS)),
        "packing": cfg.packing, "checkpointing": cfg.gradient_checkpointing, "liger": cfg.use_liger,
        "optim": cfg.optim, "cap_gib": cap, "embeddings_on_cpu": cfg.embeddings_on_cpu,
        "max_length": cfg.max_length, "pack_tokens": opts.get("pack_tokens"),
        "offload": bool(getattr(trainer, "offload", None)),
        "host_gib": round(trainer.offload.host_bytes / 2**30, 2) if getattr(trainer, "offload", None) else None,
        # the pinned buffers the copies were cut from, beside the allocator's peak (other pinned blocks too)
        "host_capacity_gib": round(trainer.offload.host_capacity / 2**30, 2) if getattr(trainer, "offload", None) else None,
        "estimate_host_gib": round(est.host_gib, 2) if est and hasattr(est, "host_gib") else None,
        "pinned_host_peak_gib": pinned_peak_gib(), "compiled": bool(getattr(trainer, "compiled", None)),
        "graphs": compiled_graphs(),  # Dynamo graphs made while training: more means recompiling
        # the untimed warm-up: allocation, autotuning and, with compiled layers, the compilation
        "first_step_s": round(clock.times[0] - started, 1), "warmup_s": round(clock.times[WARMUP_STEPS - 1] - started, 1),
        # Python's garbage collections while training: the host pauses, the GPU waits
        "gc_s": round(sum(s for _, _, s in pauses), 3), "gc_full": sum(g == 2 for g, _, _ in pauses),
        "gc_max_s": round(max((s for _, _, s in pauses), default=0.0), 3),
        # those the host began after the untimed warm-up ended on the GPU (it runs ahead of the
        # GPU by less than a step): what the timed steps may have lost to collecting
        "gc_timed_s": round(sum(s for _, t, s in pauses if t > clock.times[WARMUP_STEPS - 1]), 3),
        # (step, generation, seconds) of each pause over 10 ms, by the step the host was preparing
        "gc_steps": gc_by_step(pauses, host_ends.times),
        # the allocator freed its cache and tried again (each time the GPU is waited for)
        "alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries", 0),
        "alloc_retries_steps": [b - a for a, b in zip([0] + host_ends.retries, host_ends.retries)],
        # each step's real tokens and seconds: a nearly empty pack in the timed steps shows here
        **steps_and_full_rate(counts, accumulation, started, clock.times,
                              packed=bool(cfg.packing or trl or opts.get("padded_packs"))),
    }


def step_losses(trainer, accumulation: int):
    """Record each optimizer step's loss as the Trainer would log it, without logging every step:
    a log reads the loss back (`.item()`), so the host waits for the GPU, which then idles while
    the next batch is prepared. Returns a function that reads the losses once training is over."""
    micro: list = []
    train_step = trainer.training_step

    def step(*args, **kwargs):
        loss = train_step(*args, **kwargs)
        micro.append(loss.detach())  # stays on the GPU: no waiting
        return loss

    trainer.training_step = step
    return lambda: [sum(float(x) for x in micro[i:i + accumulation]) for i in range(0, len(micro), accumulation)]


@contextlib.contextmanager
def gc_pauses():
    """Each garbage collection inside the block, as (generation, perf_counter() at its start,
    seconds): while the host collects, nothing new reaches the GPU."""
    pauses: list[tuple[int, float, float]] = []
    began: list[float] = []

    def timed(phase: str, info: dict) -> None:
        if phase == "start":
            began.append(time.perf_counter())
        elif began:
            start = began.pop()
            pauses.append((info["generation"], start, time.perf_counter() - start))

    gc.callbacks.append(timed)
    try:
        yield pauses
    finally:
        gc.callbacks.remove(timed)


def host_step_ends():
    """Trainer callback: `.times` holds perf_counter() as the host ends each optimizer step (it
    runs ahead of the GPU by less than a step), `.retries` the allocator's retries so far then (a
    retry frees cached blocks and waits for the GPU: at a cap, the host stops running ahead)."""
    import torch
    from transformers import TrainerCallback

    class CB(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.retries: list[int] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())
            if torch.cuda.is_available():
                self.retries.append(torch.cuda.memory_stats().get("num_alloc_retries", 0))

    return CB()


def gc_by_step(pauses: list[tuple[int, float, float]], host_ends: list[float],
               min_s: float = 0.01) -> list[tuple[int, int, float]]:
    """(1-based step the host was in, generation, seconds) of each pause of at least `min_s`."""
    return [(bisect.bisect_left(host_ends, start) + 1, gen, round(s, 3))
            for gen, start, s in pauses if s >= min_s]


def steps_and_full_rate(counts: list[int], accumulation: int, started: float, ends: list[float],
                        packed: bool = True) -> dict:
    """The per-step fields every tool's row carries: each step's tokens and seconds and, where
    steps are packs of one size, the full-step rate (`full_steps_rate`) the report compares by."""
    tokens, seconds = per_step(counts, accumulation, started, ends)
    full, short = full_steps_rate(tokens, seconds) if packed else (None, None)
    return {"step_tokens": tokens, "step_s": seconds, "tokens_per_s_full": full, "short_steps": short}


def per_step(counts: list[int], accumulation: int, started: float, ends: list[float]) -> tuple[list, list]:
    """Each optimizer step's real tokens (its `accumulation` micro-batches) and seconds (the
    first from the start of training, so it holds the warm-up and any compiling)."""
    tokens = [sum(counts[i * accumulation:(i + 1) * accumulation]) for i in range(len(ends))]
    return tokens, [round(b - a, 3) for a, b in zip([started] + ends, ends)]


def full_steps_rate(tokens: list[int], seconds: list[float], warmup: int = WARMUP_STEPS,
                    share: float = 0.9) -> tuple[int, int]:
    """Tokens/s over the timed steps that are full (at least `share` of the median timed step's
    tokens), and how many timed steps were not. Packing leaves partly filled packs (the course
    one, TRL's best fit a few); each costs about a full step's time, and whether one falls among
    the timed steps follows each tool's sampler: every tool's rows get this same reading.
    Timed as `training.tokens_per_second` times: steps after `warmup + 1`, none over 3x typical."""
    timed = list(zip(tokens, seconds))[warmup + 1:]
    typical_tokens = sorted(t for t, _ in timed)[len(timed) // 2]
    typical_s = sorted(s for _, s in timed)[len(timed) // 2]
    full = [(t, s) for t, s in timed if t >= share * typical_tokens and s < 3 * typical_s]
    short = sum(t < share * typical_tokens for t, _ in timed)
    return round(sum(t for t, _ in full) / sum(s for _, s in full)), short


def compiled_graphs() -> int:
    """How many graphs Dynamo made in this process (0 without compiling)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def pinned_peak_gib() -> float | None:
    """Peak pinned host memory PyTorch's caching host allocator held (power-of-two blocks)."""
    import torch

    try:
        stats = torch.cuda.host_memory_stats()
    except (AttributeError, RuntimeError):
        return None
    peak = stats.get("allocated_bytes.peak", stats.get("reserved_bytes.peak"))
    return round(peak / 2**30, 2) if peak is not None else None


def trl_trainer(model, tokenizer, ds, tutorial, cfg, opts, out):
    """TRL's SFTTrainer at its best settings measured here: best-fit packing, padding-free, Liger,
    no checkpointing; its own peft LoRA (so none of the course's training-time changes)."""
    from trl import SFTConfig, SFTTrainer

    from selfllm_utils import models

    args = SFTConfig(
        output_dir=str(out), per_device_train_batch_size=1, gradient_accumulation_steps=1,
        max_steps=cfg.max_steps, learning_rate=cfg.learning_rate, logging_steps=cfg.logging_steps, bf16=True,
        packing=True, packing_strategy="bfd", padding_free=True, max_length=opts["pack_tokens"],
        gradient_checkpointing=False, use_liger_kernel=True,
        report_to="none", save_strategy="no", completion_only_loss=True, disable_tqdm=True,
    )
    ds = ds.map(lambda ex: {"completion_mask": [int(x != -100) for x in ex["labels"]]})
    ds = ds.remove_columns(["labels", "attention_mask"])
    return SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer,
                      peft_config=models.lora_config(tutorial, cfg))


def check_varlen() -> dict:
    """Packed batch through varlen_attention vs each sequence alone, on this GPU (bf16 logits)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from selfllm_utils import training

    config = AutoConfig.for_model("qwen2", vocab_size=1000, hidden_size=256, intermediate_size=512,
                                  num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                                  use_cache=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).cuda().eval()
    seqs = [list(range(5, 5 + n)) for n in (37, 11, 64, 3)]
    batch = training.collator(None, True)([{"input_ids": seqs, "labels": seqs}])  # one packed row
    batch = {k: v.cuda() if hasattr(v, "cuda") else v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        ref = torch.cat([model(input_ids=torch.tensor([s], device="cuda")).logits[0] for s in seqs])
        training.use_varlen_attention(model)
        packed = model(**batch).logits[0]
    return {"check": "varlen_vs_unpacked", "max_abs_logit_diff": (ref - packed).abs().max().item(),
            "logit_scale": ref.abs().max().item()}


def check_offload() -> dict:
    """A packed, checkpointed LoRA step on this GPU with and without training.OffloadActivations:
    the loss and every LoRA gradient must be bit-identical (the copies are exact)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from selfllm_utils import models, training

    config = AutoConfig.for_model("llama", vocab_size=1000, hidden_size=1024, intermediate_size=2048,
                                  num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, use_cache=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).cuda()
    cfg = replace(DEEPSEEK.config, gradient_checkpointing=True, batch_tokens=4096)
    model = models.add_lora(model, DEEPSEEK, cfg)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    training.use_varlen_attention(model)
    seqs = [[int(x) for x in torch.randint(5, 1000, (n,))] for n in (700, 1500, 300, 1200)]
    batch = training.collator(None, True)([{"input_ids": seqs, "labels": seqs}])
    batch = {k: v.cuda() if hasattr(v, "cuda") else v for k, v in batch.items()}
    results = []
    for offload in (None, None, training.OffloadActivations(min_bytes=1 << 16)):  # plain twice: the noise
        model.zero_grad()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16), (offload or contextlib.nullcontext()):
            loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.item(), grads, torch.cuda.max_memory_allocated() / 2**20,
                        offload.host_bytes / 2**20 if offload else 0, len(offload.stored) if offload else 0))
    (l0, g0, m0, _, _), (lp, gp, _, _, _), (l1, g1, m1, host, n) = results
    return {"check": "offload_vs_plain", "loss_diff": abs(l0 - l1),
            "max_grad_diff": max((g0[k] - g1[k]).abs().max().item() for k in g0),
            "plain_twice_loss_diff": abs(l0 - lp),
            "plain_twice_max_grad_diff": max((g0[k] - gp[k]).abs().max().item() for k in g0),
            "grad_scale": max(g0[k].abs().max().item() for k in g0), "offloaded_tensors": n,
            "host_mib": round(host, 1), "peak_mib_plain": round(m0), "peak_mib_offload": round(m1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated configuration names")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profile", default="", help="comma-separated configurations to run once more, profiled "
                        "(kernel tables written to --profile-dir; never read tokens/s from those runs)")
    parser.add_argument("--profile-dir", default=".")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--workdir", default="/tmp/selfllm-bench")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--tflops", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.list:
        print("\n".join(CONFIGS))
        return
    if args.child:
        print("RESULT " + json.dumps(run_one(args.child, args.steps, args.tflops, Path(args.workdir))), flush=True)
        return
    tflops = matmul_tflops()
    print(json.dumps(check_varlen()), flush=True)
    print(json.dumps(check_offload()), flush=True)
    profiles = [n for n in args.profile.split(",") if n]
    names = args.only.split(",") if args.only else [] if profiles else list(CONFIGS)  # --profile alone: only it
    runs = [(n, False) for n in names] + [(n, True) for n in profiles]
    losses: dict[str, list[float]] = {}
    for i, (name, profile) in enumerate(runs):
        if CONFIGS[name][3].get("unsloth") and importlib.util.find_spec("unsloth") is None:
            print(json.dumps({"config": name, "skipped": "unsloth is not installed"}), flush=True)
            continue
        cmd = [sys.executable, __file__, "--child", name, "--steps", str(args.steps),
               "--tflops", str(tflops), "--workdir", args.workdir]
        env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
        if profile:
            env["SELFLLM_PROFILE"] = str(Path(args.profile_dir).resolve())
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [l[7:] for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if lines and profile:
            print(json.dumps({"config": name, "profiled": f"{args.profile_dir}/{name}.txt"}), flush=True)
        elif lines:
            print(lines[-1], flush=True)
            losses[name] = json.loads(lines[-1])["losses"]
        else:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            print(json.dumps({"config": name, "mix": CONFIGS[name][3]["mix"], "cap_gib": CONFIGS[name][3].get("cap_gib"),
                              "error": " | ".join(tail)[-600:]}), flush=True)
        key = CONFIGS[name][0]
        if all(CONFIGS[n][0] != key for n, _ in runs[i + 1:]):
            shutil.rmtree(Path(args.workdir) / key, ignore_errors=True)  # a 7-9B folder is 15-19 GB
    for seed in [n for n in losses if n.endswith("-seed-same")]:
        for course in (seed.replace("-seed-same", "-course-same"), seed.replace("-seed-same", "-offload-same")):
            if course in losses:
                print(json.dumps(same_data_check(seed, course, losses[seed], losses[course])), flush=True)


def same_data_check(seed: str, course: str, a: list[float], b: list[float]) -> dict:
    """Quality: per-step losses of the seed's batching and the course's path on the same data."""
    diffs = [abs(x - y) for x, y in zip(a, b)]
    return {"check": "same_data_losses", "seed": seed, "course": course, "steps": len(diffs),
            "max_abs_diff": round(max(diffs), 4), "mean_abs_diff": round(sum(diffs) / len(diffs), 4)}


if __name__ == "__main__":
    main()
