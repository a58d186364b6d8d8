"""The GPU benchmark's configurations are checked here, on the CPU, before GPU time is spent on them."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
import time

import pytest

from selfllm_utils import registry

PATH = registry.repo_root() / "benchmarks" / "train_speed.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_speed", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_per_step_figures_group_micro_batches_and_time_each_step(bench) -> None:
    """Steps of 2 micro-batches ending at 10.5, 12.0 and 12.25 s of a run started at 10.0 s."""
    tokens, seconds = bench.per_step([5, 7, 100, 1, 3, 0], 2, 10.0, [10.5, 12.0, 12.25])
    assert tokens == [12, 101, 3]
    assert seconds == [0.5, 1.5, 0.25]


def test_the_full_step_rate_leaves_out_partly_filled_packs_and_the_warm_up(bench) -> None:
    """Warm-up 1 (so steps 2 on are timed): a 500-token pack and a 5 s pause (a save) are left out."""
    tokens = [1000, 1000, 1000, 500, 990, 1000, 1000]
    seconds = [9.0, 9.0, 1.0, 0.9, 1.0, 5.0, 1.0]
    assert bench.full_steps_rate(tokens, seconds, warmup=1) == (round(2990 / 3.0), 1)
    assert bench.full_steps_rate(tokens, seconds, warmup=3) == (round(1990 / 2.0), 0)


def test_profiled_kernels_split_by_kind_and_count_overlap_once(bench) -> None:
    """A matmul 0-0.4 s overlapping attention 0.3-0.5 s, a copy 0.45-0.9 s on the side stream
    (not compute) and a norm 1.0-1.1 s (times in microseconds, as the profiler gives them):
    0.6 s of compute, each kind its own time."""
    split = bench.kernel_split([("nvjet_tst_192x192_64x4_h_bz_TNT", 0.0, 4e5),
                                ("void pytorch_flash::flash_bwd_kernel<cutlass::bfloat16_t>", 3e5, 5e5),
                                ("Command Buffer Full", 2e6, 3e6),  # the host waiting: no kernel
                                ("Memcpy DtoH (Device -> Pinned)", 4.5e5, 9e5),
                                ("triton_red_fused_rms_norm_0", 1e6, 1.1e6)])
    assert split == {"busy_s": 0.6, "copy_s": 0.45, "matmul_s": 0.4, "attention_s": 0.2, "other_s": 0.1}


def test_every_configuration_names_a_tutorial_and_a_quant(bench) -> None:
    for name, (key, quant, cfg, opts) in bench.CONFIGS.items():
        assert name.startswith(key), name
        registry.get(key)
        assert quant in ("bf16", "4bit") and isinstance(cfg, registry.TrainConfig)
        assert set(opts) <= {"trl", "unsloth", "pack_tokens", "cap_gib", "steps", "mix", "padded_packs",
                             "recompute_last", "frozen_gc"}, name
        assert opts["mix"] in bench.MIXES, name
        assert bool(opts.get("trl") or opts.get("unsloth")) == ("pack_tokens" in opts), name


@pytest.mark.parametrize("mix", ["chat", "alpaca", "long"])
def test_the_defaults_are_what_a_learner_gets(bench, mix: str) -> None:
    """The course's rows run the registry's config, with only max_length raised for long data:
    the budget is left to memory.token_budget, as in a notebook."""
    for name, key in ((f"deepseek-qlora-course-{mix}", "deepseek"), (f"glm4-course-24g-{mix}", "glm4"),
                      (f"qwen2-course-24g-{mix}", "qwen2"), (f"qwen2-course-{mix}", "qwen2")):
        cfg = bench.CONFIGS[name][2]
        # 6 GB: one 4,096-token example fits 4-bit DeepSeek-7B once its activations are offloaded
        assert cfg == dataclasses.replace(registry.get(key).config, max_length=bench.MIXES[mix][2]), name
        assert cfg.batch_tokens is None and cfg.gradient_checkpointing is None
    assert bench.CONFIGS[f"qwen2-course-24g-{mix}"][3]["cap_gib"] == 24
    assert bench.CONFIGS[f"deepseek-qlora-course-{mix}"][3]["cap_gib"] == 5.5
    assert any(bench.CONFIGS[n][3].get("trl") for n in bench.CONFIGS if n.endswith(f"-{mix}"))
    # Unsloth is the anchor on the 6 GB card, under the same cap
    assert any(o.get("unsloth") and o["cap_gib"] == 5.5 and o["mix"] == mix for _, _, _, o in bench.CONFIGS.values())


@pytest.mark.parametrize("mix", ["chat", "alpaca", "long"])
def test_length_mixes_have_their_means_and_tails(bench, mix: str) -> None:
    mean, longest, max_length = bench.MIXES[mix]
    totals = [p + a for p, a in bench.mix_lengths(mix, 4000)]
    assert abs(sum(totals) / len(totals) - mean) < 0.15 * mean
    assert max(totals) <= max(longest, max_length) and min(totals) >= 2
    if mix == "long":
        assert max(totals) == longest and sum(t >= 1000 for t in totals) > 0.25 * len(totals)


def test_padded_packs_pad_the_course_packs(bench, smoke_models) -> None:
    """The seed side of a quality pair: the same sequences a step, padded to the longest."""
    import datasets

    from selfllm_utils import training

    rows = [{"input_ids": list(range(5, 5 + n)), "labels": list(range(5, 5 + n))} for n in (7, 3, 5, 9)]
    packed, _ = training.pack_dataset(datasets.Dataset.from_list(rows), 12)
    counts: list[int] = []
    collate = bench.counting(bench.padded_packs(smoke_models.tokenizer("deepseek")), counts)
    batch = collate([packed[0]])
    assert batch["input_ids"].shape[0] == len(packed[0]["input_ids"]) > 1
    assert counts == [sum(len(ids) for ids in packed[0]["input_ids"])]  # real tokens, not pads


def test_step_losses_are_the_losses_a_log_every_step_shows(bench, smoke_models, identity_records,
                                                          tmp_path) -> None:
    """The benchmark logs as a learner does (every 10 steps); the losses it records for each
    step without logging are the ones logging every step would show, accumulation included."""
    import datasets

    from selfllm_utils import data, formatting, models, training

    tutorial = registry.get("qwen2")
    cfg = dataclasses.replace(registry.smoke_config(tutorial), max_steps=3, logging_steps=1,
                              per_device_train_batch_size=2, gradient_accumulation_steps=2, packing=False)
    model, tokenizer = smoke_models.model("qwen2")
    ds = datasets.Dataset.from_list(identity_records[:8], features=data.FEATURES)
    train_ds, _ = formatting.build_dataset(ds, tokenizer, tutorial, system="")
    trainer = training.make_trainer(models.add_lora(model, tutorial, cfg), tokenizer, train_ds, cfg,
                                    tmp_path, disable_tqdm=True)
    losses_of = bench.step_losses(trainer, cfg.gradient_accumulation_steps)
    trainer.train()
    logged = list(training.logged(trainer).values())
    assert len(logged) == cfg.max_steps and len(set(logged)) > 1
    assert losses_of() == pytest.approx(logged, abs=1e-4)  # the log rounds to 4 digits


@pytest.fixture(scope="module")
def zero3_bench():
    path = registry.repo_root() / "benchmarks" / "zero3_gpu.py"
    sys.path.insert(0, str(path.parent))  # it imports train_speed for the random model
    spec = importlib.util.spec_from_file_location("zero3_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_multi_gpu_runs_are_the_plans_the_readme_names(zero3_bench) -> None:
    """1/2/4 GPUs for each plan family; each run's options parse and force what its name says."""
    from selfllm_utils import distributed, train_zero3

    t = registry.get("qwen1.5")
    for suffix, forced in (("", None), ("-zero3", "zero3"), ("-24g", None)):
        for n in (1, 2, 4):
            gpus, extra = zero3_bench.RUNS[f"{n}gpu{suffix}"]
            args = train_zero3.parse_args(["--output", "x", *extra])
            assert gpus == n and train_zero3.forced_plan(args)[0] == forced
            if suffix == "-24g":  # planned for 24 GiB cards: offload on one or two, as its docstring says
                plan = distributed.choose_plan(t, t.config, gpu_gib=args.gpu_gib, num_gpus=n)
                assert (plan.name == "zero3-offload") == (n < 4)


def test_gc_pauses_record_each_collection_and_its_generation(bench) -> None:
    import gc

    junk = [[i] for i in range(300_000)]  # a full collection has these to walk: it takes a while
    with bench.gc_pauses() as pauses:
        gc.collect(0)
        before = time.perf_counter()
        gc.collect(2)
        after = time.perf_counter()
    gc.collect(0)  # after the block: not recorded
    assert [g for g, _, _ in pauses] == [0, 2] and len(junk) == 300_000
    generation, start, seconds = pauses[1]
    assert before <= start and 0 < seconds and start + seconds <= after  # when it began, how long


def test_gc_pauses_are_placed_in_the_step_the_host_was_in(bench) -> None:
    from transformers import TrainerControl, TrainerState, TrainingArguments

    clock = bench.host_step_ends()
    args, state = TrainingArguments(output_dir="/tmp/unused", report_to=[]), TrainerState()
    ends = []
    for _ in range(3):
        clock.on_step_end(args, state, TrainerControl())
        ends.append(time.perf_counter())
    assert clock.times == sorted(clock.times) and len(clock.times) == 3 and clock.times[-1] <= ends[-1]
    host = [1.0, 2.0, 3.0]
    pauses = [(2, 0.5, 0.2), (0, 1.5, 0.001), (2, 2.5, 0.3), (1, 3.5, 0.05)]
    # step 1 until 1.0, step 2 until 2.0, ...; a pause after the last end belongs to the next step
    assert bench.gc_by_step(pauses, host) == [(1, 2, 0.2), (3, 2, 0.3), (4, 1, 0.05)]


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("report", PATH.with_name("report.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _line(config: str, tps: int, **kw) -> str:
    mix = config.split("-")[-2] if config.split("-")[-1].isdigit() else config.split("-")[-1]
    return json.dumps({"config": config, "mix": mix, "tokens_per_s": tps, "peak_allocated_gib": 5.1,
                       "peak_reserved_gib": 5.4, **kw}) + "\n"


def test_the_speed_table_checks_targets_against_the_best_anchor_of_the_run(report, tmp_path) -> None:
    """A course row meets 6,000 tokens/s and 1.15x the best Unsloth row of its mix, not the first one."""
    results = tmp_path / "run.jsonl"
    results.write_text(
        '{"check": "varlen_vs_unpacked"}\n'
        + _line("deepseek-unsloth-chat-4096", 5000, unsloth="2026.10.9", pack_tokens=4096, cap_gib=5.5)
        + _line("deepseek-unsloth-chat-5120", 6000, unsloth="2026.10.9", pack_tokens=5120, cap_gib=5.5)
        + _line("deepseek-qlora-course-chat", 6600, batch_tokens=4864, cap_gib=5.5, checkpointing=True)
        + _line("qwen2-course-24g-chat", 12999, batch_tokens=16128, cap_gib=24, checkpointing=True,
                checkpoint_inside=True)
        + _line("qwen2-24g-ckptaround-chat", 12000, batch_tokens=16384, cap_gib=24, checkpointing=True)
        + '{"config": "glm4-course-24g-long", "mix": "long", "cap_gib": 24, "error": "out of GPU memory"}\n',
        encoding="utf-8")
    rows = report.table(results).splitlines()[2:]
    assert [r.split("|")[5].strip() for r in rows] == ["**6,600**", "5,000", "6,000", "**12,999**", "12,000",
                                                       "出错：out of GPU memory"]  # a failure stays in the table
    assert "≥ 6,000 ✓；1.10 倍 Unsloth（≥ 1.15 ✗）" in rows[0]
    assert "≥ 13,000 ✗" in rows[3] and "检查点层内" in rows[3]
    assert "课程，手动设置（检查点层外）" in rows[4] and "≥" not in rows[4]  # a variant is not the default
    marked = f"<!-- speed-table: {results.name} qwen2,glm4 -->\nold\n<!-- /speed-table -->"
    shown = report.update(marked, root=tmp_path).splitlines()[3:-1]  # a marker naming models shows only theirs
    assert [r.split("|")[5].strip() for r in shown] == ["**12,999**", "12,000", "出错：out of GPU memory"]


def test_tools_are_compared_by_their_full_steps_where_every_row_has_that_rate(report, tmp_path) -> None:
    """A partly filled pack cost the course's row 10%: the ratio uses both tools' full-step rates
    and the row shows that rate beside the one over every timed step; a run without the field
    for every anchor keeps comparing all steps."""
    unsloth = dict(unsloth="2026.10.9", pack_tokens=5120, cap_gib=5.5)
    course = dict(batch_tokens=4864, cap_gib=5.5, checkpointing=True)
    results = tmp_path / "run.jsonl"
    results.write_text(_line("deepseek-unsloth-alpaca-5120", 7000, tokens_per_s_full=7000, short_steps=0, **unsloth)
                       + _line("deepseek-qlora-course-alpaca", 7700, tokens_per_s_full=8400, short_steps=1, **course),
                       encoding="utf-8")
    head, _, row, *_ = report.table(results).split("\n")
    assert "按装满的步比" in head
    assert "**7,700**（满步 8,400）" in row and "1.20 倍 Unsloth（≥ 1.15 ✓）" in row
    results.write_text(_line("deepseek-unsloth-alpaca-5120", 7000, **unsloth)
                       + _line("deepseek-qlora-course-alpaca", 7700, tokens_per_s_full=8400, short_steps=1, **course),
                       encoding="utf-8")
    head, _, row, *_ = report.table(results).split("\n")
    assert "按装满的步比" not in head and "1.10 倍 Unsloth（≥ 1.15 ✗）" in row


def test_rows_of_a_second_machine_are_compared_only_with_that_machines(report, tmp_path) -> None:
    """Unsloth and one course row ran on a fresh machine: only that row gets a ratio; a marker
    naming model@cap shows that group alone."""
    unsloth = dict(unsloth="2026.10.9", pack_tokens=5120, cap_gib=5.5)
    course = dict(batch_tokens=4864, cap_gib=5.5, checkpointing=True)
    results = tmp_path / "run.jsonl"
    results.write_text(json.dumps({"run": 22, "second_machine": ["deepseek-unsloth-chat-5120", "deepseek-unsloth-long-5120",
                                                                 "deepseek-qlora-course-long"]}) + "\n"
                       + _line("deepseek-qlora-course-chat", 10000, **course)
                       + _line("qwen2-course-chat", 17000, batch_tokens=16384)
                       + _line("deepseek-unsloth-chat-5120", 5000, **unsloth)
                       + _line("deepseek-unsloth-long-5120", 5000, **unsloth)
                       + _line("deepseek-qlora-course-long", 6000, **course), encoding="utf-8")
    rows = report.table(results).splitlines()[2:]
    assert "对照在另一台机器上，不比" in rows[0] and "倍" not in rows[0]
    assert "1.20 倍 Unsloth" in rows[2] and "（第二台机器）" in rows[2] and "（第二台机器）" in rows[3]
    shown = report.update(f"<!-- speed-table: {results.name} qwen2@none -->\n<!-- /speed-table -->",
                          root=tmp_path).splitlines()[3:-1]
    assert [r.split("|")[5].strip() for r in shown] == ["**17,000**"]


def test_a_configuration_run_again_counts_by_its_last_line(report, tmp_path) -> None:
    """Run 23 tried the Qwen2 rows on a library that failed at load, then ran them again: the table
    shows the second line once, in the place it ran; the file keeps both."""
    results = tmp_path / "run.jsonl"
    results.write_text('{"config": "qwen2-course-24g-chat", "mix": "chat", "cap_gib": 24, "error": "offline"}\n'
                       + _line("glm4-course-24g-chat", 10000, batch_tokens=16384, cap_gib=24)
                       + _line("qwen2-course-24g-chat", 13900, batch_tokens=16128, cap_gib=24), encoding="utf-8")
    assert [r["config"] for r in report.load(results)] == ["glm4-course-24g-chat", "qwen2-course-24g-chat"]
    rows = report.table(results).splitlines()[2:]
    assert [r.split("|")[5].strip() for r in rows] == ["**13,900**", "**10,000**"]


@pytest.mark.parametrize("doc", ["README.md", "docs/SPEED_HISTORY.md"])
def test_the_readme_speed_tables_are_their_results_files_rendered(report, doc: str) -> None:
    """Every figure of a marked table comes from the committed JSON lines the GPU run printed."""
    text = (registry.repo_root() / doc).read_text(encoding="utf-8")
    assert report.BLOCK.search(text), f"{doc} has no <!-- speed-table: FILE --> block"
    assert report.update(text) == text, f"a speed table of {doc} differs from its results file: " \
        f"run python benchmarks/report.py --update {doc}"
