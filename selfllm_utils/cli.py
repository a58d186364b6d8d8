"""`selfllm`: thin commands over the package, for learners and instructors.

    selfllm doctor [--json]          versions, GPU, smoke or real mode, which tutorials fit and why
    selfllm download <tutorial>|--all   real weights from ModelScope into the course cache
    selfllm webdemo [--tutorial qwen2] [--adapter PATH] [--port N] [--address A]
    selfllm eval --tutorial T [--adapter PATH] [--json]   the held-out evaluation of a trained adapter
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys

from . import registry

PACKAGES = ("torch", "transformers", "peft", "datasets", "accelerate", "bitsandbytes", "deepspeed",
            "modelscope", "liger-kernel", "streamlit")


def versions() -> dict[str, str | None]:
    """Installed versions of the libraries the course relies on (None when missing)."""
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def gpu() -> dict | None:
    """The first CUDA device's name and memory, or None on a machine without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
            "count": torch.cuda.device_count()}


def cached_models() -> list[str]:
    """Tutorials whose real weights are already in the course cache (complete folders only)."""
    from . import models

    found = []
    for tutorial in registry.TUTORIALS.values():
        folder = registry.home() / "models" / tutorial.modelscope_id
        try:
            models.check_model_dir(folder)
            found.append(tutorial.key)
        except RuntimeError:
            pass
    return found


def fit_report(memory_gib: float | None) -> dict[str, str]:
    """For each tutorial: does its course recipe fit this GPU, by memory.estimate_memory."""
    from . import memory

    report = {}
    for t in registry.TUTORIALS.values():
        quant = "4bit" if t.key == "deepseek" else "bf16"  # notebook 01's default path
        cfg = t.config
        est = memory.estimate_memory(t, quant=quant, optimizer=cfg.optim, liger=cfg.use_liger,
                                     gradient_checkpointing=cfg.gradient_checkpointing,
                                     embeddings_on_cpu=cfg.embeddings_on_cpu)
        if memory_gib is None:
            report[t.key] = f"no GPU: smoke mode only (the real recipe needs ~{est.total_gib:.0f} GiB, {quant})"
        else:
            verdict = "fits" if est.total_gib <= memory_gib else "does not fit"
            report[t.key] = f"{verdict}: ~{est.total_gib:.1f} GiB needed ({quant}), {memory_gib} GiB here"
    return report


def doctor(as_json: bool = False) -> dict:
    """Everything an instructor needs to know about a machine, in one object."""
    device = gpu()
    info = {
        "host": platform.node(), "python": sys.version.split()[0], "versions": versions(), "gpu": device,
        "smoke_mode": registry.smoke_mode(), "home": str(registry.home()),
        "cached_models": cached_models(),
        "tutorials": fit_report(device["memory_gib"] if device else None),
    }
    if as_json:
        print(json.dumps(info, ensure_ascii=False))
    else:
        print(f"Python {info['python']}, course cache {info['home']}")
        for name, version in info["versions"].items():
            print(f"  {name:14s} {version or '-- not installed'}")
        print(f"GPU: {device['name']} x{device['count']}, {device['memory_gib']} GiB" if device
              else "GPU: none (CPU only)")
        print(f"mode: {'smoke (small stand-in models)' if info['smoke_mode'] else 'real models'}")
        print(f"cached models: {', '.join(info['cached_models']) or 'none'}")
        for key, verdict in info["tutorials"].items():
            print(f"  {key:8s} {verdict}")
    return info


def download(keys: list[str]) -> None:
    """Fill the cache with the real weights; errors are one line, never a stack trace."""
    from . import models

    for key in keys:
        tutorial = registry.get(key)
        try:
            path = models.download(tutorial)
        except RuntimeError as err:
            raise SystemExit(f"selfllm download: {err}") from None
        print(f"{key}: {tutorial.modelscope_id} -> {path}")


def evaluate(key: str, adapter: str | None, as_json: bool) -> dict:
    """The held-out report of an adapter (or the bare base), as the notebooks show it."""
    import contextlib
    from pathlib import Path

    from . import evaluation, inference, models

    tutorial = registry.get(key)
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        raise SystemExit(f"selfllm eval: no adapter_config.json in {adapter}: pass the folder "
                         "inference.save_adapter wrote (e.g. output/qwen2-assistant/adapter)")
    with contextlib.redirect_stdout(sys.stderr):  # --json: the report is all of stdout
        model, tokenizer = inference.load_adapter(tutorial, adapter) if adapter else models.load_model(tutorial)
        report = evaluation.evaluate(model, tokenizer, tutorial, label=adapter or "base")
    print(json.dumps(report.to_dict(), ensure_ascii=False) if as_json else report.table())
    return report.to_dict()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="selfllm", description="self-llm fine-tuning course")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("doctor", help="versions, GPU, mode, which tutorials fit")
    p.add_argument("--json", action="store_true", help="one JSON line (for an instructor to collect)")
    p = sub.add_parser("download", help="real weights from ModelScope into SELFLLM_HOME")
    p.add_argument("tutorial", nargs="?", choices=list(registry.TUTORIALS))
    p.add_argument("--all", action="store_true")
    p = sub.add_parser("webdemo", help="the Streamlit chat demo")
    p.add_argument("--tutorial", default="qwen2", choices=list(registry.TUTORIALS))
    p.add_argument("--adapter", help="a LoRA adapter folder saved by the course")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--address", default="127.0.0.1", help="0.0.0.0 to serve a room (careful)")
    p = sub.add_parser("eval", help="held-out evaluation of a trained adapter")
    p.add_argument("--tutorial", required=True, choices=list(registry.TUTORIALS))
    p.add_argument("--adapter", help="a LoRA adapter folder saved by the course (default: the base)")
    p.add_argument("--json", action="store_true", help="one JSON object (for an instructor to collect)")
    args = parser.parse_args(argv)
    if args.command == "doctor":
        doctor(as_json=args.json)
    elif args.command == "download":
        if not args.all and not args.tutorial:
            parser.error("name a tutorial or pass --all")
        download(list(registry.TUTORIALS) if args.all else [args.tutorial])
    elif args.command == "eval":
        evaluate(args.tutorial, args.adapter, args.json)
    elif args.command == "webdemo":
        from . import webdemo

        proc = webdemo.serve(tutorial=args.tutorial, adapter=args.adapter, port=args.port,
                             address=args.address)
        print(f"chat demo on http://{args.address}:{args.port} (Ctrl-C stops it)")
        try:
            proc.wait()
        except KeyboardInterrupt:
            proc.terminate()


if __name__ == "__main__":
    main()
