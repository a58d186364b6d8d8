"""Tokenizer and model loading (ModelScope download, bf16 or 4-bit), and LoRA through peft.

One call serves both paths: in smoke mode the folder is a cached stand-in (smoke.py), otherwise
the real weights from ModelScope; either way `from_pretrained` loads it the same way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import cache, registry, smoke
from .registry import ChatFamily, TrainConfig, Tutorial

WEIGHT_FILES = ("*.safetensors", "*.bin")
# Any one of these is a whole tokenizer. Without them AutoTokenizer still loads one, from
# tokenizer_config.json alone: a few special tokens, and "hello world" encodes to nothing.
TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))


class ModelFolderError(RuntimeError):
    """A model folder that would not load as the model it claims to be; the message says which
    file or tensors are missing and what to do."""


def local_model(tutorial: Tutorial) -> Path:
    """The tutorial's complete model folder in the course cache, found with no network.

    Any layout ModelScope has written counts (cache.local_copy). Raises ModelFolderError in one
    line naming what is missing: the whole folder, or a file of a cut-off download.
    """
    cache_dir = registry.home() / "models"
    folder = cache.local_copy(tutorial.modelscope_id, cache_dir)
    if folder is None:
        raise ModelFolderError(f"{tutorial.modelscope_id} is not in the course cache {cache_dir}")
    return check_model_dir(folder)


def download(tutorial: Tutorial, command: str | None = None) -> Path:
    """The real weights: the complete local copy if there is one, else ModelScope fills the gaps.

    Local first, so a workshop's pre-filled cache loads offline in seconds; the network only for
    a missing or cut-off folder (ModelScope resumes it). `command` is what the learner should run
    on a connected machine (default `selfllm download <tutorial>`).
    """
    try:
        return local_model(tutorial)
    except RuntimeError as err:
        missing = str(err)
    try:
        path = cache.fetch(tutorial.modelscope_id, registry.home() / "models")
    except Exception as err:  # network errors come in many types; one line tells the learner
        reason = str(err).splitlines()[0][:200] if str(err) else ""
        raise ModelFolderError(
            f"{missing}, and it could not be downloaded from ModelScope ({type(err).__name__}: "
            f"{reason}). Are you offline? Fill the cache on a connected machine with "
            f"`{command or 'selfllm download ' + tutorial.key}` and point SELFLLM_HOME at it, "
            "or set SELFLLM_SMOKE=1."
        ) from None
    return check_model_dir(path)


def check_model_dir(path: Path) -> Path:
    """Refuse a folder that cannot load, or would load wrong, with a sentence instead of a stack
    trace mid-training (or a tokenizer that silently encodes nothing).

    Raises:
        ModelFolderError: no config.json, the remote-code GLM-4, no weights, a shard its index
            lists, or no tokenizer file (`TOKENIZER_FILES`).
    """
    config = path / "config.json"
    if not config.exists():
        raise ModelFolderError(f"{path} has no config.json: not a model folder, or a partial download")
    if json.loads(config.read_text()).get("model_type") == "chatglm":
        raise ModelFolderError(f"{path} is the remote-code GLM-4 checkpoint (ZhipuAI/glm-4-9b-chat), "
                               "whose code breaks as transformers moves; use ZhipuAI/glm-4-9b-chat-hf instead")
    if not any(f for pattern in WEIGHT_FILES for f in path.glob(pattern)):
        raise ModelFolderError(f"{path} has no weight files: the download was cut off; run it again")
    # a cut-off sharded download: some shards done, others still ModelScope's *.incomplete files
    for index in path.glob("*.index.json"):
        missing = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values())
                         - {f.name for f in path.iterdir()})
        if missing:
            raise ModelFolderError(f"{path} lacks {len(missing)} weight file(s) its {index.name} lists "
                                   f"({missing[0]}, ...): the download was cut off; run it again")
    if not any(all((path / name).is_file() for name in names) for names in TOKENIZER_FILES):
        raise ModelFolderError(f"{path} has no tokenizer.json (nor tokenizer.model, nor vocab.json with "
                               "merges.txt): the tokenizer would load nearly empty; copy the whole "
                               "model folder, or download it again")
    return path


def model_path(tutorial: Tutorial, smoke_mode: bool | None = None) -> Path:
    """Where the tutorial's weights are: the smoke stand-in or the downloaded real model."""
    use_smoke = registry.smoke_mode() if smoke_mode is None else smoke_mode
    return smoke.model_dir(tutorial) if use_smoke else download(tutorial)


def stop_ids(tokenizer, family: ChatFamily) -> list[int]:
    """Ids of every token that ends an answer in this family (generation stops on any)."""
    ids = tokenizer.convert_tokens_to_ids(list(family.stop_tokens))
    if None in ids or tokenizer.convert_ids_to_tokens(ids) != list(family.stop_tokens):  # None: no unk
        raise ValueError(f"tokenizer lacks a stop token of {family.name}: {family.stop_tokens}")
    return ids


def load_tokenizer(path: Path | str, family: ChatFamily):
    """The model's own tokenizer, padded on the right, with a pad token if it lacks one."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = family.pad_token
    return tokenizer


def _quantization(dtype):
    """nf4 with double quantisation: 4-bit weights (~0.5 byte a parameter), computed in `dtype`.

    nf4 spaces its 16 levels like the normal distribution of trained weights; double quantisation
    also stores the per-block scales in 8 bits, saving another ~0.4 GB on a 7B model.
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)


def load_dtype() -> torch.dtype:
    """What `load_model` loads weights in: bf16 on a GPU, fp32 on a CPU (no fast bf16 math there)."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def load_model(tutorial: Tutorial, quant: str = "bf16", smoke_mode: bool | None = None,
               path: Path | str | None = None):
    """(model, tokenizer) of a tutorial: bf16 (or fp32 on a CPU), or 4-bit with quant="4bit".

    The model's generation config gets the family's stop tokens, so `generate` and anything
    saved from this model stop at the end of a turn. On a GPU the model goes to this process's
    GPU (LOCAL_RANK under a launcher), except under ZeRO-3, where DeepSpeed places the slices.
    `path`, a local model folder, is checked first (`check_model_dir`); without it, the
    download or the smoke stand-in.
    """
    from transformers import AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    if quant not in ("bf16", "4bit"):
        raise ValueError(f"quant must be 'bf16' or '4bit', got {quant!r}")
    path = check_model_dir(Path(path)) if path else model_path(tutorial, smoke_mode)
    tokenizer = load_tokenizer(path, tutorial.family)
    cuda = torch.cuda.is_available()
    # grow memory segments instead of caching fixed blocks: reserved stays near allocated
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    dtype = load_dtype()
    # transformers 5.25 turns on Hub kernels whenever `kernels` is installed (it now requires it) and
    # fetches them at load time: offline, a GPU load fails ("kernels-community/rotary ... offline
    # mode", H200 2026-12-04). On a GPU the course compiles each layer, which fuses the rotary
    # embedding those kernels speed up, with nothing to download.
    kwargs = {"dtype": dtype, "use_kernels": False}
    if cuda and not is_deepspeed_zero3_enabled():  # under ZeRO-3, DeepSpeed places each slice
        rank = os.environ.get("LOCAL_RANK")
        kwargs["device_map"] = {"": int(rank) if rank else torch.cuda.current_device()}
    if quant == "4bit":
        kwargs["quantization_config"] = _quantization(dtype)
    model, loading = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    if loading["missing_keys"]:  # from_pretrained fills them with random numbers, and only logs it
        missing = sorted(loading["missing_keys"])
        raise ModelFolderError(f"{path}: its weight files lack {len(missing)} tensor(s) the model needs "
                               f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): they "
                               "would start random; a shard was cut off or replaced: download it again")
    if quant == "4bit" and not cuda:
        _keep_4bit_trainable_on_cpu(model)
    model.generation_config.eos_token_id = stop_ids(tokenizer, tutorial.family)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _keep_4bit_trainable_on_cpu(model) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference (smoke mode).

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a layer's weights on its first no-grad
    eval forward (the "before" answer a notebook generates), and the repacked path has no
    backward: LoRA layers trained afterwards got no gradient through the base weights, silently
    (tests/test_models.py). Keeping the training layout costs the tiny stand-ins nothing.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def lora_config(tutorial: Tutorial, cfg: TrainConfig):
    """peft's LoraConfig on the registry's target modules for this architecture."""
    from peft import LoraConfig, TaskType

    return LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=list(tutorial.lora_targets),
                      r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout)


def _enable_checkpointing(model, keep_last: bool = True) -> None:
    """Non-reentrant checkpointing of every decoder layer but the last (`keep_last`).

    The last layer's backward starts as soon as the loss is computed, so recomputing it only
    repeats the forward just done (1/28 of Qwen2-7B's recomputation). Its activations are
    already counted at the peak (`memory.estimate_memory` adds one layer's and the loss's), so
    keeping them costs no budget. Not with `OffloadActivations`: they would all go to host memory.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    ckpt = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if keep_last and len(layers) > 1:
        layers[-1].gradient_checkpointing = False


def prepare_4bit(model, gradient_checkpointing: bool, keep_last: bool = True):
    """peft's `prepare_model_for_kbit_training`, minus its fp32 copy of embeddings and lm_head.

    Like peft: freeze every weight, keep the small norm weights in fp32 for stable training,
    make the embeddings' output require grad so checkpointing can backpropagate. Unlike peft:
    the embedding and output matrices stay in bf16: casting them to fp32 costs 1.7 GB on
    DeepSeek-7B, a third of a 6 GB card, for no gain when they are frozen.
    """
    for param in model.parameters():
        param.requires_grad = False
        if param.ndim == 1 and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
    if gradient_checkpointing:
        _enable_checkpointing(model, keep_last)
    model.enable_input_require_grads()
    return model


class CpuEmbedding(torch.nn.Module):
    """A frozen embedding table looked up on the CPU; the rows go to the GPU (`embeddings_to_cpu`)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        # a plain tensor, not a parameter or buffer: `model.to(...)` and the Trainer leave it on
        # the CPU, and `model.device` (its first parameter's) stays the GPU
        self.weight = weight.detach().to("cpu")
        self.num_embeddings, self.embedding_dim = self.weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not ids.is_cuda:
            return torch.nn.functional.embedding(ids, self.weight)
        # the rows land in pinned memory and go over without the host waiting for the copy
        # (PyTorch keeps a pinned block until its copy is done before it hands the block out again)
        rows = torch.empty(ids.numel(), self.embedding_dim, dtype=self.weight.dtype, pin_memory=True)
        torch.index_select(self.weight, 0, ids.cpu().flatten(), out=rows)
        return rows.view(*ids.shape, self.embedding_dim).to(ids.device, non_blocking=True)


def embeddings_to_cpu(model) -> int:
    """Move the frozen input embedding table to CPU memory; returns the GPU bytes it frees.

    The table is a lookup, no arithmetic, and on DeepSeek-7B in 4-bit it frees 0.8 GB of a
    6 GB card for activations, so a step holds twice the tokens. The price is the lookup and
    the copy each step: 25-37 ms of a GLM-4-9B step of 16,384 tokens (1-2%) in a profile
    when the rows went over from pageable memory (H200, 2026-12-02); they now go from pinned
    memory without the host waiting (`CpuEmbedding`), not timed apart. The table leaves the state
    dict: merge into a freshly loaded model (`inference.merge_and_save` does), never save this
    one whole. A table tied to lm_head stays: the loss needs it on the GPU.
    """
    old = model.get_input_embeddings()
    out = model.get_output_embeddings()
    if isinstance(old, CpuEmbedding) or (out is not None and out.weight is old.weight):
        return 0
    freed = old.weight.numel() * old.weight.element_size() if old.weight.is_cuda else 0
    model.set_input_embeddings(CpuEmbedding(old.weight))
    del old
    if freed:
        torch.cuda.empty_cache()
    return freed


def add_lora(model, tutorial: Tutorial, cfg: TrainConfig):
    """Wrap a model with LoRA, ready to train, with or without gradient checkpointing.

    With checkpointing and a frozen base, no input of a checkpointed block requires grad and
    backward fails ("element 0 of tensors does not require grad", the seeds' most reported
    error); `enable_input_require_grads` and non-reentrant checkpointing prevent it. A 4-bit
    model goes through `prepare_4bit`, which does the same. `cfg.embeddings_on_cpu` moves the
    embedding table off the GPU first (`embeddings_to_cpu`).
    """
    from peft import get_peft_model

    if cfg.gradient_checkpointing is None:
        raise ValueError("cfg.gradient_checkpointing is None ('decide for this GPU'): resolve it "
                         "first, cfg = memory.token_budget(T, cfg, quant).config, or set True/False")
    if cfg.embeddings_on_cpu:  # first: the hooks below go on the embedding module in use
        embeddings_to_cpu(model)
    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_4bit(model, cfg.gradient_checkpointing, not cfg.offload_activations)
    elif cfg.gradient_checkpointing:
        _enable_checkpointing(model, not cfg.offload_activations)
        model.enable_input_require_grads()
    # a training forward that builds a KV cache also breaks packed batches (COURSE.md)
    model.config.use_cache = False
    return get_peft_model(model, lora_config(tutorial, cfg))
