"""Chat with a model, stream its answer, save, reload and merge LoRA adapters.

Prompts go through the same `formatting.render` as training, and generation stops on every stop
token of the family: a tuned model that was trained to end its turn is also asked to stop there.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import formatting, models
from .registry import ChatFamily, Tutorial

FALLBACK_CONTEXT = 4096  # tokens, for a model whose config names no maximum length


@dataclass
class Reply:
    """One generated answer: its text, its new token ids, and whether it ended on a stop token."""

    text: str
    token_ids: list[int]
    stopped: bool  # False means it ran into max_new_tokens without ending its turn


def messages(question: str | list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    """The message list a question is asked as: the system prompt first, when there is one
    (`chat`, `stream_chat` and `deploy`'s OpenAI client ask alike)."""
    if isinstance(question, str):
        question = [{"role": "user", "content": question}]
    return ([{"role": "system", "content": system}] if system else []) + list(question)


def context_limit(model, max_context: int | None = None) -> int:
    """Tokens of prompt + answer the model takes: its `max_position_embeddings` (FALLBACK_CONTEXT
    when the config names none), lowered by `max_context`. The one lookup: `chat` refuses past
    it, the web demo cuts the history to it, so both agree on where the context ends."""
    limit = getattr(model.config, "max_position_embeddings", None) or FALLBACK_CONTEXT
    return min(limit, max_context) if max_context else limit


def _inputs(model, tokenizer, messages: list[dict[str, str]], max_new_tokens: int):
    """The prompt's tensors; past the model's context it is an error, not a garbled answer."""
    formatting.check_messages(messages)
    text = formatting.render(tokenizer, messages, add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    limit = context_limit(model)
    length = inputs["input_ids"].shape[1]
    if length + max_new_tokens > limit:
        raise ValueError(f"the prompt is {length} tokens and max_new_tokens={max_new_tokens}: "
                         f"past the model's context of {limit} tokens (max_position_embeddings); "
                         "shorten the prompt or the history, or lower max_new_tokens")
    return inputs.to(model.device)


def _generate_kwargs(tokenizer, family: ChatFamily, max_new_tokens: int, **gen) -> dict:
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False,
              "eos_token_id": models.stop_ids(tokenizer, family),
              "pad_token_id": tokenizer.pad_token_id}
    if gen.get("temperature", 0) > 0:  # sampling only when asked for
        kwargs.update(do_sample=True, top_p=gen.pop("top_p", 0.9))
    kwargs.update(gen)
    if not kwargs["do_sample"]:
        kwargs.pop("temperature", None), kwargs.pop("top_p", None)
    return kwargs


def chat(model, tokenizer, question: str | list[dict[str, str]], family: ChatFamily,
         system: str | None = None, max_new_tokens: int = 256, **gen) -> Reply:
    """Answer one question (or continue a message list); greedy unless temperature > 0.

    A prompt that leaves no room for max_new_tokens in the model's context is a ValueError: past
    it a model answers garbage (cutting the history is the caller's choice: webdemo.fit_context).
    """
    import torch

    inputs = _inputs(model, tokenizer, messages(question, system), max_new_tokens)
    with torch.no_grad():
        out = model.generate(**inputs, **_generate_kwargs(tokenizer, family, max_new_tokens, **gen))
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    stops = set(models.stop_ids(tokenizer, family))
    return Reply(tokenizer.decode(new, skip_special_tokens=True).strip(), new,
                 bool(new) and new[-1] in stops)


def stream_chat(model, tokenizer, question: str | list[dict[str, str]], family: ChatFamily,
                system: str | None = None, max_new_tokens: int = 256, timeout: float = 60.0,
                first_token_timeout: float | None = None, **gen) -> Iterator[str]:
    """Yield the answer piece by piece as it is generated (for a chat UI).

    `generate` runs in a thread and feeds a TextIteratorStreamer; its `timeout` ends a stalled
    generation with `queue.Empty` instead of hanging the reader forever. The first piece may
    take `first_token_timeout` (default: `timeout`): the model reads the whole prompt first,
    which on a CPU takes far longer than one more token.
    """
    from transformers import TextIteratorStreamer

    inputs = _inputs(model, tokenizer, messages(question, system), max_new_tokens)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True,
                                    timeout=timeout if first_token_timeout is None else first_token_timeout)
    kwargs = {**inputs, **_generate_kwargs(tokenizer, family, max_new_tokens, **gen), "streamer": streamer}
    errors: list[BaseException] = []

    def run() -> None:
        try:
            model.generate(**kwargs)
        except BaseException as err:  # re-raised in the reader's thread below
            errors.append(err)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    for piece in streamer:
        streamer.timeout = timeout  # after the first piece, the usual wait between tokens
        yield piece
    thread.join(timeout)
    if errors:
        raise errors[0]


def save_adapter(model, tokenizer, path: str | Path) -> Path:
    """Save the LoRA adapter with the tokenizer and the generation config (stop tokens) beside it,
    whole or not at all (`checkpoints.writing`: an interrupted save leaves no half adapter)."""
    from . import checkpoints  # here: importing the Trainer is slow, and a web demo never saves

    path = Path(path)
    with checkpoints.writing(path) as partial:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        model.generation_config.save_pretrained(partial)
    return path


def check_adapter(path: str | Path) -> Path:
    """The adapter folder, resolved, or one clear error before any model loads.

    Checked here because peft, given a folder without weights, asks the Hugging Face Hub for a
    repository named like the folder: someone else's weights could load without a word.
    """
    from transformers.utils.peft_utils import ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME

    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: pass the adapter folder that "
                                "inference.save_adapter wrote (notebook 03)")
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder} has no adapter_config.json: not a LoRA adapter folder "
                                "(notebook 03 saves one with inference.save_adapter)")
    if not any((folder / name).is_file() for name in (ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME)):
        raise FileNotFoundError(f"{folder} has no {ADAPTER_SAFE_WEIGHTS_NAME}: the adapter's weights "
                                "are missing (copy them too, or save the adapter again)")
    return folder


def load_adapter(tutorial: Tutorial, path: str | Path, quant: str = "bf16",
                 smoke_mode: bool | None = None, base: str | Path | None = None):
    """(model, tokenizer): the tutorial's base model (or the one in folder `base`) with a saved
    adapter on top, for inference. Only local folders: no hub is ever asked (`check_adapter`)."""
    from peft import PeftModel
    from transformers import GenerationConfig

    path = check_adapter(path)
    model, tokenizer = models.load_model(tutorial, quant=quant, smoke_mode=smoke_mode, path=base)
    model = PeftModel.from_pretrained(model, str(path))
    if (Path(path) / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    return model.eval(), tokenizer


def merge(model):
    """Fold the adapter into the base weights (W + B·A·alpha/r): a plain model, no peft needed.

    Merge into bf16 weights, never into 4-bit ones: rounding the sum back to 4 bits loses most
    of what the adapter learned (load the base in bf16 first, as `merge_and_save` does).
    """
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model.base_model, "is_loaded_in_4bit", False):
        raise ValueError("refusing to merge into 4-bit weights: load the base model in bf16 "
                         "(inference.merge_and_save does) and merge there")
    return model.merge_and_unload()


def merge_and_save(tutorial: Tutorial, adapter: str | Path, out: str | Path,
                   smoke_mode: bool | None = None, base: str | Path | None = None,
                   dtype: str | None = None) -> Path:
    """Load base (bf16) + adapter in this plain process, merge, save model, tokenizer, stop tokens.

    Run it outside DeepSpeed: under ZeRO-3 the weights are partitioned and merging fails. The
    folder is complete or absent: written under a temporary name beside `out`, renamed at the
    end (replacing an older merge only then), so a crash or a full disk never leaves a folder
    that looks like a model. It carries the
    chat template and a generation_config.json with every stop id of the family, so whatever
    serves it (transformers, vLLM, llama.cpp's converter) stops where the tuned model ends a
    turn. `dtype` ("bfloat16") casts the merged weights before saving; None keeps the loaded
    dtype (bf16 on a GPU, fp32 on a CPU).
    """
    import shutil
    import tempfile

    import torch

    out = Path(out)
    model, tokenizer = load_adapter(tutorial, adapter, smoke_mode=smoke_mode, base=base)
    merged = merge(model)
    if dtype is not None:
        merged = merged.to(getattr(torch, dtype))
    merged.generation_config.eos_token_id = models.stop_ids(tokenizer, tutorial.family)
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    if not tokenizer.chat_template:
        tokenizer.chat_template = tutorial.family.chat_template
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():  # a previous merge: replaced only now that the new one is complete
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
