"""Deployment speed on this machine: merge, convert, quantize and serve SmolLM2 (notebook 03's model
in smoke mode), one JSON line per step.

    SELFLLM_SMOKE=1 python benchmarks/deploy_speed.py [--adapter PATH] [--out DIR] [--quant Q4_K_M]

Without --adapter, a fresh LoRA adapter (peft's default: B = 0) on the course's targets stands in
for a trained one: merging, converting and serving cost the same. Printed per step: seconds and the
size of what it wrote; for the server (llama-cpp-python, this machine's cores), generated tokens per
second over the held-out prompts, greedy, up to 128 tokens each, one request at a time, for the f16
and the quantized file. Each step is timed once, as a learner runs it (the converter and quantizer
each start a fresh Python process, which is part of their time).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from selfllm_utils import deploy, evaluation, inference, models, registry


def emit(**row) -> None:
    print(json.dumps(row, ensure_ascii=False), flush=True)


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*")) if path.is_dir() else path.stat().st_size


def fresh_adapter(tutorial: registry.Tutorial, folder: Path) -> Path:
    from peft import get_peft_model

    model, tokenizer = models.load_model(tutorial)
    peft_model = get_peft_model(model, models.lora_config(tutorial, registry.smoke_config(tutorial)))
    return inference.save_adapter(peft_model, tokenizer, folder)


def serve_speed(exported: deploy.Export, tutorial: registry.Tutorial, max_tokens: int) -> None:
    from openai import OpenAI

    prompts = evaluation.heldout_prompts(tutorial, 10)
    with deploy.export_server(exported, port=8766, timeout=300) as server:
        client = OpenAI(base_url=server.url, api_key="local")
        for alias, path in server.ggufs.items():
            client.chat.completions.create(model=alias, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=1)  # loads the file: not timed
            tokens, start = 0, time.perf_counter()
            for p in prompts:
                r = client.chat.completions.create(model=alias, messages=[{"role": "user", "content": p}],
                                                   max_tokens=max_tokens, temperature=0)
                tokens += r.usage.completion_tokens
            seconds = time.perf_counter() - start
            emit(step="serve", file=path.name, prompts=len(prompts), tokens=tokens,
                 seconds=round(seconds, 2), tokens_per_s=round(tokens / seconds, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tutorial", default="qwen2")
    parser.add_argument("--adapter", help="a saved adapter (default: a fresh one)")
    parser.add_argument("--out", help="working folder (default: a temporary one, removed)")
    parser.add_argument("--quant", default=deploy.QUANT)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    tutorial = registry.get(args.tutorial)
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="deploy-speed-"))
    emit(machine=platform.node(), cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
         date=datetime.date.today().isoformat(), smoke=registry.smoke_mode(), tutorial=tutorial.key,
         llama_cpp_python=deploy.installed_llama_cpp())
    try:
        adapter = Path(args.adapter) if args.adapter else fresh_adapter(tutorial, work / "adapter")
        deploy.converter()  # fetched once (pip download) and cached: not part of the timings
        start = time.perf_counter()
        merged = deploy.merge(tutorial, adapter, work / "export" / "merged")
        emit(step="merge", seconds=round(time.perf_counter() - start, 2), bytes=size(merged))
        start = time.perf_counter()
        f16 = deploy.convert(merged, work / "export" / "model-F16.gguf", tutorial.family)
        emit(step="convert f16", seconds=round(time.perf_counter() - start, 2), bytes=size(f16))
        start = time.perf_counter()
        quantized, kind = deploy.quantize(f16, work / "export", "model", args.quant)
        emit(step=f"quantize {kind}", seconds=round(time.perf_counter() - start, 2), bytes=size(quantized))
        exported = deploy.Export(tutorial.key, work / "export", merged, f16, quantized, kind)
        serve_speed(exported, tutorial, args.max_tokens)
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
