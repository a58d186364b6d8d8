"""Tutorial 04 on real GPUs: the course's launch script on the full-size Qwen1.5-14B architecture.

Random weights in the reference shape (`train_speed.build_random_model`), Chat-甄嬛 tokenized by the
family's stand-in tokenizer, LoRA r=8 on every projection, the course config. Every run is
`torchrun -m selfllm_utils.train_zero3 --model-dir ...`, the script notebook 04 launches, its
micro-batches sized by the token budget of its plan. One JSON line per run:

    python benchmarks/zero3_gpu.py --data huanhuan.json              # the runs this machine's GPUs allow
    python benchmarks/zero3_gpu.py --data huanhuan.json --only 1gpu,2gpu,resume

- `1gpu`, `2gpu`, `4gpu`: the plan the course picks on these cards (`--plan auto`; on 141 GB
  H200s replicated weights, "ddp"): tokens/s (all GPUs), peak memory per GPU, scaling efficiency
  (N GPUs against N x 1 GPU).
- `1gpu-zero3`, `2gpu-zero3`, `4gpu-zero3`: the seed's plan, ZeRO-3, forced (`--plan zero3`).
- `1gpu-24g`, `2gpu-24g`, `4gpu-24g`: the plan for 24 GB cards (`--gpu-gib 24`: planned, fitted
  and capped as if each GPU had 24 GiB; ZeRO-3 + offload on 1-2 of them).
- `resume`: the `Ngpu` run (N: --resume-gpus) stopped at the middle checkpoint, as if the job died,
  then `--resume`d: what the Trainer restored, its losses after the stop against the
  uninterrupted run's, and the saved adapter reloaded in a fresh plain process (no DeepSpeed,
  one GPU): its logits against the trained model's.
- `seed-json`: seed 003's own DeepSpeed JSON (DeepSpeed's AdamW, optimizer and weight offload,
  1e6 buckets; fp16 switched to bf16) on the smoke model: does its offload bug still happen?
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from selfllm_utils import registry, train_zero3, training

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
T = registry.get("qwen1.5")
STEPS = 10  # optimizer steps of each run; the first 2 are warm-up, not timed

# name: (GPUs, extra arguments of train_zero3)
RUNS: dict[str, tuple[int, list[str]]] = {
    f"{n}gpu{suffix}": (n, extra) for suffix, extra in
    (("", []), ("-zero3", ["--plan", "zero3"]), ("-24g", ["--gpu-gib", "24"])) for n in (1, 2, 4)}
RUNS.update({"resume": (0, []), "seed-json": (2, [])})  # resume: --resume-gpus GPUs, plan auto

# Seed 003's deepspeed_config.json, fp16 replaced by bf16 "auto" (the Trainer runs in bf16).
SEED_DS = {
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupDecayLR", "params": {
        "warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto",
        "total_num_steps": "auto"}},
    "zero_optimization": {
        "stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True}, "overlap_comm": True,
        "contiguous_gradients": True, "allgather_bucket_size": 1e6, "reduce_bucket_size": 1e6,
        "stage3_prefetch_bucket_size": 1e6, "stage3_param_persistence_threshold": 1e6,
        "sub_group_size": 1e9, "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9,
        "stage3_gather_16bit_weights_on_model_save": True},
    "gradient_accumulation_steps": "auto", "gradient_clipping": 1.0, "steps_per_print": 1000,
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}


def launch(out: Path, gpus: int, args: list[str], env: dict | None = None) -> tuple[int, float]:
    """One torchrun of train_zero3; its log goes to out.log. Returns (exit code, seconds)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(gpus), "-m", "selfllm_utils.train_zero3", "--tutorial", T.key, "--output", str(out),
           "--logging-steps", "1", *args]
    start = time.time()
    with open(f"{out}.log", "a") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    return code, time.time() - start


def summary(name: str, out: Path, seconds: float) -> dict:
    """The run's figures from the files train_zero3 wrote."""
    info = json.loads((out / train_zero3.RUN_INFO).read_text())
    accuracy = training.logged(out, "eval_accuracy")
    loss = training.logged(out)
    ranks = info["ranks"]
    return {"run": name, "gpus": len(ranks), "plan": info["plan"], "batch_tokens": info["batch_tokens"],
            "checkpointing": info["gradient_checkpointing"], "budget": info["budget"], "steps": max(loss),
            "tokens_per_s": round(training.tokens_per_second(info, info["gradient_accumulation_steps"])),
            "tokens_per_step": sum(sum(r["tokens"]) for r in ranks) // max(1, len(ranks[0]["step_times"])),
            "peak_allocated_gib": [round(r.get("peak_allocated_gib", 0), 2) for r in ranks],
            "peak_reserved_gib": [round(r.get("peak_reserved_gib", 0), 2) for r in ranks],
            "first_loss": loss[min(loss)], "last_loss": loss[max(loss)],
            "eval_accuracy": accuracy[max(accuracy)] if accuracy else None,
            "train_batch_size": info["train_batch_size"], "wall_s": round(seconds)}


def adapter_check(out: Path, model_dir: Path) -> dict:
    """In this fresh process, without DeepSpeed: is the saved adapter whole, and does base +
    adapter give the logits the trained model gave?"""
    import torch
    from safetensors.torch import load_file

    from selfllm_utils import inference

    tensors = load_file(str(out / train_zero3.ADAPTER / "adapter_model.safetensors"))
    probe = torch.load(out / train_zero3.PROBE)
    model, _ = inference.load_adapter(T, out / train_zero3.ADAPTER, base=model_dir)
    ids = probe["input_ids"].to(model.device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().cpu()
        with model.disable_adapter():
            base = model(input_ids=ids).logits.float().cpu()
        # noise floor: the same reloaded model through another attention kernel
        model.base_model.model.set_attn_implementation("eager")
        eager = model(input_ids=ids).logits.float().cpu()
        model.base_model.model.set_attn_implementation("sdpa")
        # DeepSpeed's bf16 engine casts buffers too: RoPE's inv_freq rounded to bf16?
        rotary = [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
        kept = [m.inv_freq for m in rotary]
        for m in rotary:
            m.inv_freq = m.inv_freq.to(torch.bfloat16).float()
        bf16_rope = model(input_ids=ids).logits.float().cpu()
        for m, freq in zip(rotary, kept):
            m.inv_freq = freq
        # the training process's forward: under bf16 autocast (accelerate wraps the model's forward
        # with it for a bf16 Trainer, the fp32 LoRA matrices included), then also with its kernels
        # (training.use_varlen_attention; Liger's RMSNorm/SwiGLU/RoPE where the run used Liger)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            autocast = model(input_ids=ids).logits.float().cpu()
        info = json.loads((out / train_zero3.RUN_INFO).read_text())
        training.use_varlen_attention(model)
        if info.get("liger"):
            from liger_kernel.transformers import _apply_liger_kernel_to_instance

            _apply_liger_kernel_to_instance(model=model.get_base_model())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            course = model(input_ids=ids).logits.float().cpu()
    return {"autocast_reload_vs_trained_max_diff": (autocast - probe["logits"]).abs().max().item(),
            "autocast_reload_vs_trained_mean_diff": (autocast - probe["logits"]).abs().mean().item(),
            "course_path_reload_vs_trained_max_diff": (course - probe["logits"]).abs().max().item(),
            "course_path_reload_vs_trained_mean_diff": (course - probe["logits"]).abs().mean().item(),
            "course_path_top1_agree": (course.argmax(-1) == probe["logits"].argmax(-1)).float().mean().item(),
            "course_kernels_liger": bool(info.get("liger")),
            "bf16_rope_reload_vs_trained_mean_diff": (bf16_rope - probe["logits"]).abs().mean().item(),
            "bf16_rope_reload_vs_trained_max_diff": (bf16_rope - probe["logits"]).abs().max().item(),
            "rotary_modules": len(rotary),
            "sdpa_vs_eager_mean_diff": (eager - logits).abs().mean().item(),
            "sdpa_vs_eager_max_diff": (eager - logits).abs().max().item(),
            "adapter_tensors": len(tensors),
            "empty_tensors": sum(t.numel() == 0 for t in tensors.values()),
            "lora_B_nonzero": sum(bool(t.abs().sum() > 0) for k, t in tensors.items() if "lora_B" in k),
            "reload_vs_trained_max_diff": (logits - probe["logits"]).abs().max().item(),
            "reload_vs_trained_mean_diff": (logits - probe["logits"]).abs().mean().item(),
            "base_vs_trained_mean_diff": (base - probe["logits"]).abs().mean().item(),
            "top1_agree_reload": (logits.argmax(-1) == probe["logits"].argmax(-1)).float().mean().item(),
            "top1_agree_base": (base.argmax(-1) == probe["logits"].argmax(-1)).float().mean().item(),
            "base_vs_trained_max_diff": (base - probe["logits"]).abs().max().item(),
            "logit_scale": probe["logits"].abs().max().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="Chat-甄嬛 records (huanhuan.json)")
    parser.add_argument("--work", default="/tmp/zero3-gpu", help="model folder and run outputs")
    parser.add_argument("--only", help="comma-separated run names (default: all, in order)")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--resume-gpus", type=int, help="GPUs of the resume run (default: up to 2)")
    parser.add_argument("--check-adapter", nargs=2, metavar=("RUN", "MODEL"), help=argparse.SUPPRESS)
    parser.add_argument("--build-model", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.check_adapter:
        print("RESULT " + json.dumps(adapter_check(*map(Path, args.check_adapter))), flush=True)
        return
    if args.build_model:
        from train_speed import build_random_model

        build_random_model(T, Path(args.build_model))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    model_dir = work / "qwen1.5-14b-random"  # built in a child: this process never touches a GPU
    subprocess.run([sys.executable, __file__, "--data", args.data, "--build-model", str(model_dir)],
                   check=True)
    print(json.dumps({"model": str(model_dir), "build_s": round(time.time() - start)}), flush=True)
    steps = str(args.steps)
    # one evaluation and checkpoint, at the end: the timed steps are training only
    common = ["--model-dir", str(model_dir), "--data", args.data, "--max-steps", steps,
              "--eval-steps", steps, "--eval-fraction", "0.02"]
    env = {"SELFLLM_SMOKE": "0"}
    done: dict[str, dict] = {}
    have = gpu_count()
    resume_gpus = args.resume_gpus or min(2, have)
    for name in args.only.split(",") if args.only else [n for n, (g, _) in RUNS.items() if g <= have]:
        gpus, extra = RUNS[name]
        gpus = gpus or resume_gpus
        out = work / name
        shutil.rmtree(out, ignore_errors=True)  # a warm machine keeps the last call's folders:
        Path(f"{out}.log").unlink(missing_ok=True)  # --resume would find that run finished
        if name == "seed-json":  # the smoke model: the bug is in the offload code path, not the size
            path = work / "seed_ds.json"
            path.write_text(json.dumps(SEED_DS, indent=1))
            # "auto" warm-up is the Trainer's 0 steps, which WarmupDecayLR now refuses: 1 step
            code, secs = launch(out, gpus, ["--deepspeed", str(path), "--max-steps", "4",
                                            "--warmup-steps", os.environ.get("SEED_WARMUP", "1")],
                                {"SELFLLM_SMOKE": "1"})
            line = {"run": name, "exit_code": code, "wall_s": round(secs)}
            if code == 0:
                line.update({k: summary(name, out, secs)[k] for k in ("first_loss", "last_loss", "steps")})
        elif name == "resume":
            half = str(args.steps // 2)
            code, secs = launch(out, gpus, common + ["--stop-at-step", half], env)
            if code == 0:
                code, more = launch(out, gpus, common + ["--resume"], env)
                secs += more
            line = {"run": name, "exit_code": code, "wall_s": round(secs)}
            if code == 0:
                info = json.loads((out / train_zero3.RUN_INFO).read_text())
                line.update(gpus=gpus, plan=info["plan"], restored=info["restored"])
                resumed = training.logged(out)
                line["losses_after_resume"] = {s: resumed[s] for s in sorted(resumed) if s > int(half)}
                if f"{gpus}gpu" in done:
                    straight = training.logged(work / f"{gpus}gpu")
                    line["uninterrupted"] = {s: straight[s] for s in line["losses_after_resume"]}
                check = subprocess.run([sys.executable, __file__, "--data", args.data,
                                        "--check-adapter", str(out), str(model_dir)],
                                       capture_output=True, text=True, env={**os.environ, **env})
                results = [l[7:] for l in check.stdout.splitlines() if l.startswith("RESULT ")]
                line["fresh_process_reload"] = (json.loads(results[-1]) if results
                                                else {"error": check.stderr[-800:]})
        else:
            code, secs = launch(out, gpus, common + extra, env)
            line = summary(name, out, secs) if code == 0 else {"run": name, "exit_code": code}
        if line.get("exit_code"):
            line["log_tail"] = Path(f"{out}.log").read_text()[-1500:]
        done[name] = line
        print(json.dumps(line), flush=True)
    for suffix in ("", "-zero3", "-24g"):
        one = done.get(f"1gpu{suffix}", {})
        for n in (2, 4):
            many = done.get(f"{n}gpu{suffix}", {})
            if "tokens_per_s" in many and "tokens_per_s" in one:
                print(json.dumps({"scaling_efficiency": f"{n}gpu{suffix} / ({n} x 1gpu{suffix})",
                                  "plans": [one["plan"], many["plan"]], "value": round(
                                      many["tokens_per_s"] / (n * one["tokens_per_s"]), 3)}), flush=True)


def gpu_count() -> int:
    """GPUs on this machine, asked in a child process: this one never touches CUDA."""
    found = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                           capture_output=True, text=True)
    return int(found.stdout.strip() or 0)


if __name__ == "__main__":
    main()
