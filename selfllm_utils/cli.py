"""`selfllm`: thin commands over the package, for learners and instructors.

    selfllm doctor [--json]          versions, GPU, smoke or real mode, which tutorials fit and why
    selfllm download <tutorial>|--all   real weights from ModelScope into the course cache
    selfllm webdemo [--tutorial qwen2] [--adapter PATH] [--port N] [--max-context N] [--timeout S]
                    [--max-message-chars N] [--public [--address A] [--password]]   127.0.0.1 unless --public
    selfllm eval --tutorial T [--adapter PATH] [--json]   the held-out evaluation of a trained adapter
    selfllm export --tutorial T --adapter PATH --out DIR [--quant Q4_K_M] [--no-gguf]
                    merged bf16 folder, f16 and quantized GGUF, Ollama Modelfile
    selfllm serve --gguf FILE [--port 8000] [--public] [--timeout S]   OpenAI-compatible API
    selfllm verify-export --tutorial T --adapter PATH --out DIR   the served model answers as trained
    selfllm torchrun [torchrun's options] -m selfllm_utils.train_zero3 ...   torchrun; Ctrl-C: one line
"""

from __future__ import annotations

import argparse
import contextlib
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
    """Tutorials whose real weights are already in the course cache (complete folders only).

    The same lookup as loading a model (`models.local_model`): any layout ModelScope wrote.
    """
    from . import models

    found = []
    for tutorial in registry.TUTORIALS.values():
        try:
            models.local_model(tutorial)
            found.append(tutorial.key)
        except RuntimeError:
            pass
    return found


def fit_report(memory_gib: float | None, gpus: int = 1, host_gib: float | None = None) -> dict[str, str]:
    """For each tutorial: the token budget its course recipe gets on this GPU, and why
    (`memory.token_budget`, the same call the notebooks make), or why it does not fit.
    `host_gib`, the free host RAM (default: this machine's), decides whether the checkpointed
    activations may be offloaded there: the verdict says how much that needs, or why not.
    A tutorial whose notebook launches a script (`Tutorial.script`: notebook 04's train_zero3)
    spreads over this machine's `gpus` and picks its plan first
    (`distributed.choose_plan`: on one 24 GB card, ZeRO-3 with offload)."""
    from . import distributed, memory

    report = {}
    for t in registry.TUTORIALS.values():
        quant = "4bit" if t.key == "deepseek" else "bf16"  # notebook 01's default path
        if memory_gib is None:
            least = memory.estimate_memory(t, quant, batch_tokens=t.config.max_length, optimizer=t.config.optim,
                                           liger=t.config.use_liger, embeddings_on_cpu=t.config.embeddings_on_cpu)
            report[t.key] = (f"no GPU: smoke mode only (the real recipe needs at least "
                             f"~{least.total_gib:.0f} GiB, {quant})")
            continue
        try:
            if t.script:  # its notebook launches a script (train_zero3), which chooses a plan
                plan = distributed.choose_plan(t, t.config, quant, memory_gib, gpus)
                report[t.key] = f"fits ({quant}, {plan.name} on {gpus} GPU(s)): {plan}"
            else:
                budget = memory.token_budget(t, t.config, quant, gpu_gib=memory_gib, host_gib=host_gib)
                report[t.key] = f"fits ({quant}): {budget}"
        except ValueError as err:
            report[t.key] = f"does not fit: {err}"
    return report


def doctor(as_json: bool = False) -> dict:
    """Everything an instructor needs to know about a machine, in one object."""
    from . import memory

    device = gpu()
    host_ram = memory.host_memory_gib()  # offloaded activations need it (the verdicts say how much)
    info = {
        "host": platform.node(), "python": sys.version.split()[0], "versions": versions(), "gpu": device,
        "host_ram_gib": round(host_ram, 1) if host_ram is not None else None,
        "smoke_mode": registry.smoke_mode(), "home": str(registry.home()),
        "cached_models": cached_models(),
        "tutorials": fit_report(device["memory_gib"] if device else None, device["count"] if device else 1,
                                host_ram),
    }
    if as_json:
        print(json.dumps(info, ensure_ascii=False))
    else:
        print(f"Python {info['python']}, course cache {info['home']}")
        for name, version in info["versions"].items():
            print(f"  {name:14s} {version or '-- not installed'}")
        print(f"GPU: {device['name']} x{device['count']}, {device['memory_gib']} GiB" if device
              else "GPU: none (CPU only)")
        print(f"host RAM available: {info['host_ram_gib']} GiB" if host_ram is not None
              else "host RAM available: unknown (activations are not offloaded)")
        print(f"mode: {'smoke (small stand-in models)' if info['smoke_mode'] else 'real models'}")
        print(f"cached models: {', '.join(info['cached_models']) or 'none'}")
        for key, verdict in info["tutorials"].items():
            print(f"  {key:8s} {verdict}")
    return info


def download(keys: list[str], command: str | None = None) -> None:
    """Fill the cache with the real weights; errors are one line, never a stack trace.

    `command` is the learner's own command line, repeated in the hint when a download fails.
    """
    from . import models

    for key in keys:
        tutorial = registry.get(key)
        try:
            path = models.download(tutorial, command=command)
        except RuntimeError as err:
            raise SystemExit(f"selfllm download: {err}") from None
        print(f"{key}: {tutorial.modelscope_id} -> {path}")


def serve_demo(args: argparse.Namespace) -> int:
    """`selfllm webdemo`: check everything first, then serve; a wrong setting is one line, not a
    traceback. Relative adapter paths also work from notebooks/ (`webdemo.find_adapter`)."""
    import getpass
    import os

    from . import webdemo

    app_args = [f"--{name.replace('_', '-')}={value}" for name in
                ("max_context", "timeout", "first_token_timeout", "max_message_chars")
                if (value := getattr(args, name)) is not None]
    # an explicit --address is kept, 127.0.0.1 too; --public alone means every interface
    address = args.address or ("0.0.0.0" if args.public else webdemo.LOCAL)
    try:
        webdemo.parse_args(app_args)  # a wrong number fails here, before the password is asked
        if args.password:
            password = getpass.getpass("password for the demo's visitors: ")
            if not password:
                raise ValueError("--password: the password is empty, so anyone could get in; "
                                 "type one, or leave out --password")
            os.environ[webdemo.PASSWORD_ENV] = password
        adapter = webdemo.find_adapter(args.adapter) if args.adapter else None
        return webdemo.run(args.tutorial, adapter, args.port, address, args.public, app_args)
    except (OSError, ValueError) as err:
        raise SystemExit(f"selfllm webdemo: {err}") from None


def evaluate(key: str, adapter: str | None, as_json: bool) -> dict:
    """The held-out report of an adapter (or the bare base), as the notebooks show it."""
    from . import evaluation, inference, models

    tutorial = registry.get(key)
    try:
        adapter = str(inference.check_adapter(adapter)) if adapter else None
    except (OSError, ValueError) as err:
        raise SystemExit(f"selfllm eval: {err}") from None
    with contextlib.redirect_stdout(sys.stderr):  # --json: the report is all of stdout
        model, tokenizer = inference.load_adapter(tutorial, adapter) if adapter else models.load_model(tutorial)
        report = evaluation.evaluate(model, tokenizer, tutorial, label=adapter or "base")
    print(json.dumps(report.to_dict(), ensure_ascii=False) if as_json else report.table())
    return report.to_dict()


def export(args: argparse.Namespace) -> dict:
    """`selfllm export`: every bad input is one line and a non-zero exit; nothing half-written
    is left looking complete (deploy writes under temporary names)."""
    from . import deploy

    try:
        result = deploy.export(registry.get(args.tutorial), args.adapter, args.out,
                               quant=None if args.no_gguf else args.quant, gguf=not args.no_gguf)
    except (OSError, ValueError, RuntimeError) as err:
        raise SystemExit(f"selfllm export: {err}") from None
    for name in ("merged", "gguf", "quantized", "modelfile"):
        if getattr(result, name):
            print(f"{name:10s} {getattr(result, name)}")
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    return {"notes": result.notes}


def serve_api(args: argparse.Namespace) -> int:
    """`selfllm serve`: the OpenAI-compatible server on a GGUF until Ctrl-C or SIGTERM."""
    from . import deploy

    host = "0.0.0.0" if args.public else deploy.LOCAL
    try:
        return deploy.run(args.gguf, args.port, host, args.public, args.timeout)
    except (OSError, ValueError, RuntimeError, TimeoutError) as err:
        raise SystemExit(f"selfllm serve: {err}") from None


def verify_export(args: argparse.Namespace) -> bool:
    """`selfllm verify-export`: the proof table; exit 1 naming each prompt that differs."""
    from . import deploy

    tutorial = registry.get(args.tutorial)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # library chatter off the table
            proof = deploy.verify(tutorial, args.adapter, args.out, port=args.port)
    except (OSError, ValueError, RuntimeError, TimeoutError) as err:
        raise SystemExit(f"selfllm verify-export: {err}") from None
    print(proof.table())
    if not proof.ok:
        raise SystemExit("selfllm verify-export: " + "; ".join(proof.failures()))
    return True


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["torchrun"]:  # every later word is torchrun's (argparse would read its options)
        from . import distributed

        sys.exit(distributed.torchrun(argv[1:]))
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
    p.add_argument("--public", action="store_true", help="let other machines in (0.0.0.0 unless "
                   "--address): prints a warning; use --password or an SSH tunnel instead")
    p.add_argument("--address", help="the address to bind (default 127.0.0.1; with --public 0.0.0.0)")
    p.add_argument("--password", action="store_true", help="ask for a password that visitors "
                   "must type (or set SELFLLM_WEBDEMO_PASSWORD)")
    p.add_argument("--max-context", type=int, help="token budget of prompt + answer")
    p.add_argument("--timeout", type=float, help="seconds without a new token (default 60)")
    p.add_argument("--first-token-timeout", type=float,
                   help="seconds to wait for the first token (default: 600 on a CPU)")
    p.add_argument("--max-message-chars", type=int,
                   help="longest question or system prompt a visitor may send (default 8000)")
    p = sub.add_parser("eval", help="held-out evaluation of a trained adapter")
    p.add_argument("--tutorial", required=True, choices=list(registry.TUTORIALS))
    p.add_argument("--adapter", help="a LoRA adapter folder saved by the course (default: the base)")
    p.add_argument("--json", action="store_true", help="one JSON object (for an instructor to collect)")
    p = sub.add_parser("export", help="merged folder, GGUF files and an Ollama Modelfile of an adapter")
    p.add_argument("--tutorial", required=True, choices=list(registry.TUTORIALS))
    p.add_argument("--adapter", required=True, help="a LoRA adapter folder saved by the course")
    p.add_argument("--out", required=True, help="a new folder for everything exported")
    p.add_argument("--quant", default="Q4_K_M", help="llama.cpp quantization type (default Q4_K_M)")
    p.add_argument("--no-gguf", action="store_true", help="only the merged folder")
    p = sub.add_parser("serve", help="an OpenAI-compatible API on a GGUF file (llama-cpp-python)")
    p.add_argument("--gguf", required=True, help="a GGUF file written by `selfllm export`")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--public", action="store_true", help="listen on 0.0.0.0 (other machines too)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the server")
    p = sub.add_parser("verify-export", help="prove the exported model answers like the adapter")
    p.add_argument("--tutorial", required=True, choices=list(registry.TUTORIALS))
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True, help="the folder `selfllm export` wrote")
    p.add_argument("--port", type=int, default=8765, help="port of the temporary server")
    sub.add_parser("torchrun", help="torchrun, same options (notebook 04's launch): Ctrl-C ends in "
                   "the training script's one line, not torchrun's traceback")
    args = parser.parse_args(argv)
    if args.command == "doctor":
        doctor(as_json=args.json)
    elif args.command == "download":
        if not args.all and not args.tutorial:
            parser.error("name a tutorial or pass --all")
        if args.all:
            download(list(registry.TUTORIALS), command="selfllm download --all")
        else:
            download([args.tutorial])
    elif args.command == "eval":
        evaluate(args.tutorial, args.adapter, args.json)
    elif args.command == "webdemo":
        sys.exit(serve_demo(args))
    elif args.command == "export":
        export(args)
    elif args.command == "serve":
        sys.exit(serve_api(args))
    elif args.command == "verify-export":
        verify_export(args)


if __name__ == "__main__":
    main()
