"""How much GPU memory a LoRA / QLoRA run needs, before you start it.

A learner's first question about a 7B fine-tune is "will it fit on my card?". This module
answers it from the model's shape alone (the registry's `reference_config`), in five parts:

    total = weights + LoRA (params + grads) + optimizer states + activations + overhead

Weights (the frozen base model):
    bf16: 2 bytes a parameter.
    4bit: every decoder `nn.Linear` is stored as nf4: 0.5 byte a parameter, plus one absmax per
    block of 64 weights, itself quantised to 8 bits in blocks of 256 with an fp32 scale
    (double quantisation): 0.5 + 1/64 + 4/(64*256) = 0.516 byte. Embeddings and lm_head
    (which transformers never quantises) stay bf16, norms go to fp32 (`models.prepare_4bit`).
    peft's own `prepare_model_for_kbit_training` would also cast embeddings and lm_head to
    fp32: 4 bytes instead of 2, +1.6 GiB on DeepSeek-7B; the course skips that copy.
LoRA: r * (in + out) parameters for each targeted projection of each layer, counted from the
    shapes; peft keeps them in fp32 (4 bytes) and their gradients too (4 bytes).
Optimizer: AdamW keeps two fp32 moments, 8 bytes a trainable parameter (2 for 8-bit Adam).
    A *paged* optimizer (`paged_adamw_32bit`) needs the same bytes, but in CUDA unified memory
    that is moved to CPU RAM when the GPU runs short, instead of ending the run with OOM.
Activations, for `batch_tokens` tokens in one micro-batch (the peak of forward + backward):
    with gradient checkpointing: each layer's input hidden state (bf16, 2*h bytes a token), plus
    one layer's working set while it is recomputed, plus the logits; without: every layer's
    working set, plus the logits. A Llama-like layer keeps 28*h + 8*I bytes a token in bf16
    (norm inputs in fp32, q, k, v, attention output, the four MLP intermediates) and 42*h + 8*I
    in 4-bit (fp32 norm outputs and bf16 copies of the layers' inputs): constants measured on an
    H100 (DeepSeek-7B shape, transformers 5.17). The logits are batch_tokens x vocab and the
    loss works on an fp32 copy: bf16 logits, fp32 logits, fp32 log-probabilities, then the fp32
    gradient, 12 bytes an entry (measured); for a 100k vocabulary that is 1.2 MB a token, often
    the largest single item. Liger's fused loss (`liger=True`) computes it in chunks of rows
    and never holds the whole tensor.
Overhead: the CUDA context and cuBLAS workspaces, which `torch.cuda.max_memory_allocated` does
    not show but `nvidia-smi` does: OVERHEAD_GIB.
Offloaded activations (`offload_activations`, with checkpointing; `training.OffloadActivations`):
    the layer inputs checkpointing keeps (2*h bytes a token a layer) wait in pinned host memory
    instead, and only OFFLOAD_IN_FLIGHT of them are on the GPU at a time (the one being copied
    out, or the next one coming back). The host then holds every layer's input and a few more
    saved tensors of the same size (the final norm's input, the loss's): (layers + 2) copies, in
    pinned buffers of 256 MiB that hold as many whole copies as fit: `host_gib`. With the
    embedding table on the CPU, `host_gib` also holds one micro-batch of its rows (2*h bytes a
    token, pinned on the way to the GPU).

Checked against `torch.cuda.max_memory_allocated` on an H100 (DeepSeek-7B shape, random
weights, the course's `models.load_model` + `add_lora` + `training.make_trainer`): within
0.1 GiB for 4-bit at 1k-4k tokens with and without checkpointing, and for bf16 at 1k tokens;
bf16 with checkpointing at 4k tokens is over by 0.7 GiB (4%): there the logits and the layer
recompute are not alive at the same time. With Liger the estimate is 1-10% high with
checkpointing without it; Liger's fused RMSNorm and SwiGLU (and FastLora) keep fewer
activations, modelled by LIGER_LAYER_FACTOR; with the checkpoint inside compiled layers the
backward holds more of a layer at once (CKPT_INSIDE_LAYER_FACTOR). `token_budget` turns the
estimate around: the most tokens a micro-batch may hold on this card (benchmarks/train_speed.py
prints its estimate beside each measured peak).

ZeRO (DeepSpeed) divides per GPU: stage 1 the optimizer states, stage 2 also the gradients,
stage 3 also the parameters (each GPU then gathers one layer, or the lm_head, at a time).
`offload` moves the optimizer states (and, with stage 3, the parameters) to CPU RAM. Without
ZeRO every GPU holds everything (plain data parallel): more GPUs give speed, not memory.

What it leaves out, so keep a little margin: PyTorch's caching allocator keeps freed blocks
(nvidia-smi may show 1-3 GiB more; `models.load_model` sets
`PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` to reduce it), transient copies such as a
dequantised 4-bit weight, and DeepSpeed's communication buffers.
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass, field

from . import registry
from .registry import TrainConfig, Tutorial

GIB = 2**30
OVERHEAD_GIB = 0.75  # CUDA context (~0.5 GiB) + cuBLAS workspace, measured by nvidia-smi, not torch
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # nf4 weight + 8-bit absmax per 64 + fp32 scale per 256 blocks
LOGIT_BYTES = 12  # per logit entry: bf16 logits, fp32 copy, fp32 log-probs / their gradient
LAYER_H_BYTES = {"bf16": 28, "4bit": 42}  # working set of one layer: LAYER_H_BYTES*h + 8*I a token
DEFAULT_BATCH_TOKENS = 4096  # what `estimate_memory` assumes when no budget is given
# The course's training path (Liger's fused RMSNorm/SwiGLU, training.FastLora) keeps fewer
# activations a layer than the formula: 0.70 of it. From Qwen2-7B without checkpointing on an H100
# (63.2 GiB allocated at 10,496 tokens, 2026-11-26); on one H200 (2026-12-01) the estimate is then
# 0-4% above the measured peaks, with and without checkpointing, bf16 and 4-bit (tests/test_memory.py).
LIGER_LAYER_FACTOR = 0.70
# With the checkpoint inside each compiled layer (TrainConfig.checkpoint_inside) the backward holds
# more of a layer at once: one H200 (2026-12-03, transformers 5.24, docs/SPEED_HISTORY.md runs 13-16) measured Qwen2-7B
# at 22.18 GiB (16,384 tokens) and 22.06 (16,128), GLM-4-9B offloaded at 21.74 (16,384): GLM-4's, the
# larger factor (Qwen2 alone would need 0.92). Run 22 (README) put GLM-4 on Chat-甄嬛 at 21.83, 0.4% above:
# within MARGIN (1.14 would cover it, and cut Qwen2's step at 24 GiB from 16,128 to 15,872 tokens).
CKPT_INSIDE_LAYER_FACTOR = 1.11
# With offloaded activations, layer inputs on the GPU at once besides the layer at work; with 1
# the estimate was 5% above the peaks measured on one H200 at 4,096-6,144 tokens (2026-12-02).
OFFLOAD_IN_FLIGHT = 1
# saved tensors of a layer input's size besides the layers' inputs: measured 2 on DeepSeek-7B (32
# copies, 30 layers) and 5 on GLM-4-9B (45 copies, 40 layers; one H200, 2026-12-02)
OFFLOAD_EXTRA_COPIES = 6
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw_torch": 8, "adamw_torch_fused": 8,
                         "paged_adamw_32bit": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2, "sgd": 0}
QUANTS = ("bf16", "4bit")
# bitsandbytes pages an optimizer state only for tensors this large (optim/optimizer.py,
# get_state_buffer); smaller ones stay in ordinary GPU memory, and on a CPU nothing is paged.
PAGED_MIN_NUMEL = 100_000


def linear_shapes(ref: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each projection in one decoder layer, by module name.

    Covers the Llama-like layouts of the course (llama, qwen2) and native GLM-4 (`gate_up_proj`
    fuses gate and up). Grouped-query attention shrinks k and v to the key/value heads.
    """
    h, inter = ref["hidden_size"], ref["intermediate_size"]
    heads = ref["num_attention_heads"]
    head_dim = ref.get("head_dim") or h // heads
    q, kv = heads * head_dim, ref.get("num_key_value_heads", heads) * head_dim
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "down_proj": (inter, h)}
    if ref["model_type"] == "glm":
        shapes["gate_up_proj"] = (h, 2 * inter)
    else:
        shapes.update(gate_proj=(h, inter), up_proj=(h, inter))
    return shapes


def lora_param_count(tutorial: Tutorial, lora_r: int = 8) -> int:
    """Trainable LoRA parameters: r * (in + out) for each target projection in each layer."""
    ref, shapes = tutorial.reference_config, linear_shapes(tutorial.reference_config)
    unknown = set(tutorial.lora_targets) - set(shapes)
    if unknown:
        raise ValueError(f"no shape known for LoRA targets {sorted(unknown)} of {tutorial.key}")
    per_layer = sum(lora_r * sum(shapes[name]) for name in tutorial.lora_targets)
    return per_layer * ref["num_hidden_layers"]


def base_param_counts(tutorial: Tutorial) -> tuple[int, int]:
    """(parameters in quantisable decoder linears, all other parameters) of the full model.

    The others are embeddings, lm_head (unless tied), the two norms of each layer, the final
    norm, and q/k/v biases (Qwen2 always has them, GLM-4 through `attention_bias`).
    """
    ref = tutorial.reference_config
    h, layers, vocab = ref["hidden_size"], ref["num_hidden_layers"], ref["vocab_size"]
    shapes = linear_shapes(ref)
    linear = layers * sum(i * o for i, o in shapes.values())
    biases = sum(shapes[n][1] for n in ("q_proj", "k_proj", "v_proj"))
    has_bias = ref["model_type"] == "qwen2" or ref.get("attention_bias", False)
    embeddings = vocab * h * (1 if ref.get("tie_word_embeddings") else 2)
    other = embeddings + layers * (2 * h + (biases if has_bias else 0)) + h
    return linear, other


def _activation_bytes(ref: dict, tokens: int, quant: str, checkpointing: bool,
                      liger: bool, offload: bool = False, inside: bool = False) -> tuple[float, float]:
    """(all activation bytes, of which logits and loss) at the peak of one forward + backward."""
    h, inter, layers = ref["hidden_size"], ref["intermediate_size"], ref["num_hidden_layers"]
    vocab = ref["vocab_size"]
    layer = tokens * (LAYER_H_BYTES[quant] * h + 8 * inter)
    if liger:  # rows in chunks of ~tokens*h/vocab (rounded up to a power of 2), input grad kept
        chunk = 2 ** math.ceil(math.log2(max(1, math.ceil(tokens / math.ceil(vocab / h)))))
        logits = min(chunk, tokens) * vocab * LOGIT_BYTES + tokens * h * 4
    else:
        logits = tokens * vocab * LOGIT_BYTES
    layer *= CKPT_INSIDE_LAYER_FACTOR if inside else LIGER_LAYER_FACTOR if liger else 1.0
    # with checkpointing: the layer inputs, and one layer's working set while it is recomputed
    # offloaded: only OFFLOAD_IN_FLIGHT of those inputs are on the GPU at once
    kept = OFFLOAD_IN_FLIGHT if offload and checkpointing else layers
    stored = kept * tokens * h * 2 + layer if checkpointing else layers * layer
    return stored + logits, logits


@dataclass
class MemoryEstimate:
    """Peak GPU memory of one training run, per GPU, in GiB, by part (see the module docstring).

    `lora_gib` holds the adapter's parameters and gradients, `optimizer_gib` its Adam moments;
    `logits_gib` is the part of `activations_gib` spent on logits and loss.
    """

    setting: str
    weights_gib: float
    lora_gib: float
    optimizer_gib: float
    activations_gib: float
    logits_gib: float
    overhead_gib: float
    lora_params: int
    host_gib: float = 0.0  # pinned host memory: offloaded activations, embedding rows (not in total_gib)
    total_gib: float = field(init=False)

    def __post_init__(self) -> None:
        self.total_gib = (self.weights_gib + self.lora_gib + self.optimizer_gib
                          + self.activations_gib + self.overhead_gib)

    def table(self) -> str:
        """A few aligned lines for a notebook: one per part, then the total."""
        rows = [("weights", self.weights_gib, "frozen base model"),
                ("LoRA", self.lora_gib, f"{self.lora_params / 1e6:.1f} M params + grads, fp32"),
                ("optimizer", self.optimizer_gib, "Adam moments of the LoRA params"),
                ("activations", self.activations_gib, f"of which logits/loss {self.logits_gib:.2f}"),
                ("overhead", self.overhead_gib, "CUDA context, workspaces"),
                ("total", self.total_gib, "")]
        if self.host_gib:
            rows.append(("host RAM", self.host_gib, "pinned: offloaded activations, embedding rows (not GPU memory)"))
        lines = [self.setting] + [f"  {name:<12}{gib:7.2f} GiB  {note}" for name, gib, note in rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def estimate_memory(tutorial: Tutorial | str, quant: str = "bf16", batch_tokens: int | None = None,
                    lora_r: int = 8, gradient_checkpointing: bool = True, optimizer: str = "adamw",
                    zero_stage: int = 0, num_gpus: int = 1, offload: bool = False,
                    liger: bool = False, embeddings_on_cpu: bool = False,
                    offload_activations: bool = False, checkpoint_inside: bool = False) -> MemoryEstimate:
    """Estimate the peak GPU memory of LoRA training per GPU; the formula is in the module docstring.

    Args:
        tutorial: A registry Tutorial or its key ("deepseek", ...); its full-size shape is used.
        quant: "bf16" (LoRA) or "4bit" (QLoRA: nf4, double quantisation).
        batch_tokens: Tokens in one micro-batch on one GPU, padding included (a padded batch
            counts batch size x its longest example). Default: DEFAULT_BATCH_TOKENS.
        lora_r: LoRA rank.
        gradient_checkpointing: Recompute activations in backward instead of keeping them.
        optimizer: A Trainer `optim` name (adamw_torch, paged_adamw_32bit, paged_adamw_8bit, ...).
        zero_stage: DeepSpeed ZeRO stage 0-3 (0: no ZeRO).
        num_gpus: GPUs the ZeRO states are divided across.
        offload: Move optimizer states (and, at stage 3, parameters) to CPU RAM.
        liger: Liger's fused linear + cross-entropy loss (GPU only), which never builds the
            full logits tensor (`TrainConfig.use_liger`).
        embeddings_on_cpu: The input embedding table lives in CPU memory
            (`TrainConfig.embeddings_on_cpu`, `models.embeddings_to_cpu`); tied tables stay.
        offload_activations: Checkpointed layer inputs wait in host memory
            (`TrainConfig.offload_activations`); the host RAM they take is `host_gib`.
        checkpoint_inside: The checkpoint inside each compiled layer (`TrainConfig.checkpoint_inside`):
            a bigger working set of a layer in backward (CKPT_INSIDE_LAYER_FACTOR).

    Returns:
        A MemoryEstimate; print it for a table.

    Raises:
        ValueError: an unknown quant, optimizer or stage, offload without ZeRO, or 4-bit weights
            with ZeRO-3 (which does not shard them; use stage 2, see COURSE.md note 9).
    """
    t = registry.get(tutorial) if isinstance(tutorial, str) else tutorial
    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {QUANTS}, got {quant!r}")
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZER_STATE_BYTES)}")
    if zero_stage not in (0, 1, 2, 3) or num_gpus < 1:
        raise ValueError(f"zero_stage must be 0-3 and num_gpus >= 1, got {zero_stage}, {num_gpus}")
    if offload and zero_stage == 0:
        raise ValueError("offload needs DeepSpeed ZeRO (zero_stage 1-3)")
    if quant == "4bit" and zero_stage == 3:
        raise ValueError("4-bit weights with ZeRO-3 are not supported here; use zero_stage=2")
    if offload_activations and (not gradient_checkpointing or zero_stage):
        raise ValueError("offload_activations needs gradient checkpointing and no ZeRO: it offloads the "
                         "checkpointed layer inputs of one process")
    if checkpoint_inside and not gradient_checkpointing:
        raise ValueError("checkpoint_inside needs gradient checkpointing: it places the checkpoint")
    ref = t.reference_config
    tokens = batch_tokens or DEFAULT_BATCH_TOKENS
    linear, other = base_param_counts(t)
    if quant == "4bit":
        weights = linear * NF4_BYTES + other * 2  # embeddings, lm_head bf16 (norms fp32: tiny)
    else:
        weights = (linear + other) * 2
    if embeddings_on_cpu and not ref.get("tie_word_embeddings"):
        weights -= ref["vocab_size"] * ref["hidden_size"] * 2  # the bf16 table, off the GPU
    n_lora = lora_param_count(t, lora_r)
    params, grads = n_lora * 4.0, n_lora * 4.0
    states = n_lora * OPTIMIZER_STATE_BYTES[optimizer]
    if zero_stage >= 1:
        states = 0.0 if offload else states / num_gpus
    if zero_stage >= 2:
        grads /= num_gpus
    if zero_stage == 3:
        layer = (linear + other - ref["vocab_size"] * ref["hidden_size"]) / ref["num_hidden_layers"]
        gathered = 2 * max(layer, ref["vocab_size"] * ref["hidden_size"])  # one module at a time
        weights = gathered + (0.0 if offload else weights / num_gpus)
        params = 0.0 if offload else params / num_gpus
    activations, logits = _activation_bytes(ref, tokens, quant, gradient_checkpointing, liger,
                                            offload_activations, checkpoint_inside)
    host = 0.0
    if embeddings_on_cpu and not ref.get("tie_word_embeddings"):  # a micro-batch's rows, pinned on
        # their way to the GPU (models.CpuEmbedding), in one of PyTorch's power-of-two pinned blocks
        host += 2 ** math.ceil(math.log2(tokens * ref["hidden_size"] * 2))
    if offload_activations:  # copies cut from reused pinned buffers (training.OffloadActivations)
        from .training import OFFLOAD_CHUNK_BYTES, OFFLOAD_MIN_BYTES

        copies, copy = ref["num_hidden_layers"] + OFFLOAD_EXTRA_COPIES, tokens * ref["hidden_size"] * 2
        if copy > OFFLOAD_CHUNK_BYTES:
            host += copies * 2 ** math.ceil(math.log2(copy))  # a buffer of its own each
        else:
            host += math.ceil(copies / (OFFLOAD_CHUNK_BYTES // (-(-copy // 512) * 512))) * OFFLOAD_CHUNK_BYTES
        # the checkpoint inside a compiled layer saves 2 more tensors a layer, the size of its rotary
        # tables (cos, sin: GLM-4 4 MiB at 16,384 tokens); where the inputs fill their buffers they take
        # buffers of their own: 6.13 GiB pinned against 5.88 estimated without them (H200, run 22)
        table = tokens * int((ref.get("head_dim") or ref["hidden_size"] // ref["num_attention_heads"])
                             * ref.get("partial_rotary_factor", 1.0)) * 2
        if checkpoint_inside and table >= OFFLOAD_MIN_BYTES:
            host += math.ceil(ref["num_hidden_layers"] * 2 * table / OFFLOAD_CHUNK_BYTES) * OFFLOAD_CHUNK_BYTES
    setting = (f"{t.key}, {quant}, {tokens:,} tokens a batch, LoRA r={lora_r}, "
               f"{'checkpointing' if gradient_checkpointing else 'no checkpointing'}, {optimizer}"
               + (f", ZeRO-{zero_stage} on {num_gpus} GPU(s)" if zero_stage else "")
               + (", offload" if offload else "") + (", Liger loss" if liger else "")
               + (", embeddings on CPU" if embeddings_on_cpu else "")
               + (", activations offloaded to host RAM" if offload_activations else "")
               + (", checkpoint inside compiled layers" if checkpoint_inside else ""))
    return MemoryEstimate(setting, weights / GIB, (params + grads) / GIB, states / GIB,
                          activations / GIB, logits / GIB, OVERHEAD_GIB, n_lora, host / GIB)


def fits(tutorial: Tutorial | str, gib: float, **kw) -> bool:
    """Whether the estimated peak (`estimate_memory(tutorial, **kw)`) fits in `gib` GiB."""
    return estimate_memory(tutorial, **kw).total_gib <= gib


def paged_tensors(model) -> tuple[int, int]:
    """(trainable tensors whose Adam states a paged optimizer would page, all trainable tensors).

    At r=8 no LoRA matrix of a 7B model reaches PAGED_MIN_NUMEL (8 x 11008 = 88,064), so
    "paged" changes nothing there: the memory is saved by 4-bit weights and checkpointing.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    return sum(p.numel() >= PAGED_MIN_NUMEL for p in trainable), len(trainable)


def format_table(estimates: list[MemoryEstimate]) -> str:
    """A Markdown table, one estimate a row, to compare settings side by side."""
    head = "| setting | weights | LoRA | optimizer | activations (logits) | total GiB |\n" \
           "| --- | --- | --- | --- | --- | --- |"
    rows = [f"| {e.setting} | {e.weights_gib:.2f} | {e.lora_gib:.2f} | {e.optimizer_gib:.2f} | "
            f"{e.activations_gib:.2f} ({e.logits_gib:.2f}) | {e.total_gib:.2f} |" for e in estimates]
    return "\n".join([head, *rows])


# token_budget: the largest micro-batch (a multiple of BUDGET_STEP tokens, at most
# MAX_BATCH_TOKENS) whose estimated peak stays MARGIN below the memory this process may use;
# checkpointing is left off only where that still gives AUTO_NO_CHECKPOINT_TOKENS or more.
# MARGIN: of the GPU's memory, for the allocator's fragmentation and the estimate's error. DeepSeek-7B
# QLoRA under 5.5 GiB (0.275 GiB kept free) reserved 0.27-0.35 GiB more than it allocated, the estimate
# 0.06 above; long chats touched the cap in a few steps (18 allocator retries; H200, 2026-12-03, README run 21).
MARGIN = 0.05
BUDGET_STEP = 128
MAX_BATCH_TOKENS = 16_384  # past this a step gains little speed and an epoch has few steps
AUTO_NO_CHECKPOINT_TOKENS = 8_192
# Activation offloading is switched on (cfg.offload_activations=None) where offloading lets a step
# of at least OFFLOAD_MIN_GAIN times the tokens fit, the copies take at most HOST_SHARE of the free
# host memory (the data, the Python process and the pinned copies share it) and, with layers not
# compiled, the card would otherwise get fewer than OFFLOAD_BELOW_TOKENS. Measured on one H200
# (2026-12-02): DeepSeek-7B QLoRA under 5.5 GiB, 2,560 -> 4,864 tokens, 1.33x the tokens/s in one run
# (4,096 by hand: 1.42x in another; a small step is bound by the host launching kernels); GLM-4-9B
# under 24 GiB, 11,136 -> 16,384 tokens: 7,319 -> 7,360 tokens/s with plain layers (no gain), with
# compiled layers 8,695 -> 9,134 (two calls on one machine; docs/SPEED_HISTORY.md).
OFFLOAD_BELOW_TOKENS = 8_192
OFFLOAD_MIN_GAIN = 1.25
HOST_SHARE = 0.5
# With compiled layers (bf16, where measured) the checkpoint goes inside them where that still fits
# at least this share of the step it fits around them. One H200 (2026-12-03, docs/SPEED_HISTORY.md runs 13-14):
# inside, Qwen2-7B ran 8.3% faster at the same 16,384 tokens; a step of 13,072 tokens (0.8 of it)
# ran at 2.7% fewer tokens/s than the full ones.
INSIDE_MIN_SHARE = 0.9
# ... and where the run is long enough to pay back its longer compiling: a first step of 48-96 s
# inside against 23-34 s around, full steps ~0.12 s shorter (Qwen2-7B, 16k tokens; docs/SPEED_HISTORY.md runs 16-18), so
# ~500 steps on an H200 (fewer on a slower card). Three epochs of Chat-甄嬛 are about 55 steps.
INSIDE_MIN_STEPS = 500


def gpu_memory_gib() -> float | None:
    """GPU memory this process may fill (free + what it already holds, within a per-process
    cap such as `torch.cuda.set_per_process_memory_fraction`), or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda: 1.0)()
    return min(free + torch.cuda.memory_reserved(), total * fraction) / GIB


def host_memory_gib() -> float | None:
    """Host memory available to a new allocation (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    try:
        import psutil

        return psutil.virtual_memory().available / GIB
    except ImportError:
        return None


@dataclass
class TokenBudget:
    """The chosen micro-batch size of a packed run, why, and the config that carries it."""

    config: TrainConfig  # the input config with batch_tokens and gradient_checkpointing set
    estimate: MemoryEstimate | None  # the estimated peak at that budget (None on a CPU)
    gpu_gib: float | None  # the memory it was fitted to
    reason: str

    @property
    def tokens(self) -> int | None:
        return self.config.batch_tokens

    @property
    def fits(self) -> bool:
        """Whether the estimated peak keeps MARGIN free (a budget set by hand may not)."""
        if self.estimate is None or self.gpu_gib is None:
            return True
        return self.estimate.total_gib - self.estimate.overhead_gib <= self.gpu_gib * (1 - MARGIN)

    def __str__(self) -> str:
        size = f"{self.tokens:,} tokens a micro-batch" if self.tokens else "padded batches"
        offload = ", activations offloaded to host RAM" if self.config.offload_activations else ""
        return (f"batch_tokens: {size}, checkpointing {'on' if self.config.gradient_checkpointing else 'off'}"
                f"{offload} ({self.reason})")


def _largest_fit(t: Tutorial, usable: float, checkpointing: bool, **kw) -> int:
    """The most tokens (a multiple of BUDGET_STEP, <= MAX_BATCH_TOKENS) whose estimated allocated
    peak fits in `usable` GiB; 0 if not even BUDGET_STEP does. The estimate grows with tokens."""
    def peak(n: int) -> float:
        est = estimate_memory(t, batch_tokens=n, gradient_checkpointing=checkpointing, **kw)
        return est.total_gib - est.overhead_gib  # the CUDA context is not in what torch may use

    lo, hi = 0, MAX_BATCH_TOKENS // BUDGET_STEP
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if peak(mid * BUDGET_STEP) <= usable else (lo, mid - 1)
    return lo * BUDGET_STEP


def run_steps(cfg: TrainConfig, data_tokens: int | None, batch_tokens: int) -> int | None:
    """About how many optimizer steps a packed run takes: `cfg.max_steps` if set, else from the
    training set's tokens (packs fill a budget nearly full); None when neither is known."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    if data_tokens is None:
        return None
    packs = math.ceil(data_tokens / batch_tokens)
    return math.ceil(cfg.num_train_epochs * math.ceil(packs / cfg.gradient_accumulation_steps))


def token_budget(tutorial: Tutorial | str, cfg: TrainConfig, quant: str = "bf16",
                 gpu_gib: float | None = None, zero_stage: int = 0, num_gpus: int = 1,
                 offload: bool = False, host_gib: float | None = None,
                 data_tokens: int | None = None) -> TokenBudget:
    """The one place that sets `cfg.batch_tokens`: how many tokens a packed micro-batch holds here.

    Set by hand (`cfg.batch_tokens`), it is kept (with a warning if the estimate says it will
    not fit). Otherwise, on a CPU, the fixed `registry.CPU_BATCH_TOKENS`; on a GPU, the largest
    budget whose `estimate_memory` peak stays MARGIN below `gpu_gib` (default: what
    `gpu_memory_gib` finds) for this model, quant, LoRA rank, optimizer and plan. The budget
    always holds one example of `cfg.max_length` tokens, so no example is ever split. With
    `cfg.gradient_checkpointing=None` checkpointing is switched on only where the card would
    otherwise hold fewer than AUTO_NO_CHECKPOINT_TOKENS, and always under ZeRO-3.

    With checkpointing on and `cfg.offload_activations=None`, the checkpointed layer inputs are
    offloaded to host memory (`training.OffloadActivations`) where the step would otherwise hold
    fewer than OFFLOAD_BELOW_TOKENS, offloading lets one of at least OFFLOAD_MIN_GAIN times the
    tokens fit, and its pinned copies (`estimate.host_gib`) take at most
    HOST_SHARE of `host_gib` (default: what `host_memory_gib` finds); without that much host
    memory the budget falls back to keeping them on the GPU, and says so. On a 6 GB card it nearly
    doubles the step. With layers not compiled it also needs a step below OFFLOAD_BELOW_TOKENS
    (bigger ones already keep the GPU busy).

    With `cfg.compile_layers=None` the decoder layers are compiled (`training.CompiledLayers`) on
    a GPU that can (`training.can_compile`) in a one-process run without ZeRO. With
    `cfg.checkpoint_inside=None` their checkpoint goes inside them (bf16) where the bigger working
    set of that backward still leaves a step of INSIDE_MIN_SHARE of the one around them, unless
    the run is known to be short (`run_steps` from `cfg.max_steps` or `data_tokens`, the training
    set's tokens, below INSIDE_MIN_STEPS): its longer compiling would not pay back.

    Raises:
        ValueError: not even one `max_length` example fits, naming what to change.
    """
    t = registry.get(tutorial) if isinstance(tutorial, str) else tutorial
    kw = dict(quant=quant, lora_r=cfg.lora_r, optimizer=cfg.optim, zero_stage=zero_stage,
              num_gpus=num_gpus, offload=offload, liger=cfg.use_liger,
              embeddings_on_cpu=cfg.embeddings_on_cpu)
    gib = gpu_memory_gib() if gpu_gib is None else gpu_gib
    if not cfg.packing:
        return TokenBudget(cfg, None, gib, f"not packed: {cfg.per_device_train_batch_size} "
                           "sequences a batch, padded to the longest")
    ckpt = cfg.gradient_checkpointing
    # compiled layers: on a GPU that can (training.can_compile), one process without ZeRO (the
    # runs measured); measured on H200s (2026-12-02, docs/SPEED_HISTORY.md; each ratio within one run): DeepSeek-7B QLoRA 1.40x the
    # tokens/s, GLM-4-9B under 24 GiB 1.19x, Qwen2-7B 1.02x, a first step of 14-26 s (4.2 s plain)
    if cfg.compile_layers is None and gib is not None:
        from . import training  # here: importing the Trainer is slow, and a budget on a CPU needs none

        compiled = not zero_stage and num_gpus == 1 and training.can_compile()
    else:
        compiled = bool(cfg.compile_layers)
    compile_why = "; decoder layers compiled (torch.compile, in the first step)" if compiled else ""

    def chosen(tokens: int, checkpointing: bool, reason: str, off: bool = False,
               inside: bool = False) -> TokenBudget:
        new = dataclasses.replace(cfg, batch_tokens=tokens, gradient_checkpointing=checkpointing,
                                  offload_activations=off, compile_layers=bool(compiled),
                                  checkpoint_inside=inside)
        est = estimate_memory(t, batch_tokens=tokens, gradient_checkpointing=checkpointing,
                              offload_activations=off, checkpoint_inside=inside, **kw)
        return TokenBudget(new, est if gib is not None else None, gib, reason)

    if cfg.batch_tokens:
        by_hand = ("no GPU: the fixed CPU budget, registry.CPU_BATCH_TOKENS"
                   if gib is None and cfg.batch_tokens == registry.CPU_BATCH_TOKENS else "set by hand")
        checkpointing = True if ckpt is None else ckpt
        found = chosen(cfg.batch_tokens, checkpointing, by_hand + compile_why,
                       bool(cfg.offload_activations and checkpointing and not zero_stage and gib is not None),
                       bool(cfg.checkpoint_inside and checkpointing and compiled))
        if not found.fits:
            peak = found.estimate.total_gib - found.estimate.overhead_gib
            found.reason += f"; estimated peak {peak:.1f} GiB > {gib * (1 - MARGIN):.1f} GiB: may run out of memory"
        return found
    if gib is None:
        return chosen(registry.CPU_BATCH_TOKENS, True if ckpt is None else ckpt,
                      "no GPU: the fixed CPU budget, registry.CPU_BATCH_TOKENS")
    usable = gib * (1 - MARGIN)
    why = "as set"
    if ckpt is None and zero_stage == 3:  # without checkpointing ZeRO-3 outgrew the estimate: out of
        # memory at 9,344 tokens estimated at 132 of 140 GiB (Qwen1.5-14B, one H200, 2026-12-02)
        ckpt, why = True, "ZeRO-3 keeps it on (its peak without it is not modelled)"
    fits = {c: _largest_fit(t, usable, c, **kw) for c in ([False, True] if ckpt is None else [ckpt])}
    if ckpt is None:
        ckpt = fits[False] < AUTO_NO_CHECKPOINT_TOKENS or fits[False] < cfg.max_length
        why = (f"without it only {fits[False]:,} would fit" if ckpt else "the card holds a full budget without it")

    def offloading(tokens: int, inside: bool) -> tuple[int, bool, str]:
        """The step with the checkpointed activations offloaded where that is worth it."""
        if not ckpt or zero_stage or cfg.offload_activations is False:
            return tokens, False, ""
        off_tokens = _largest_fit(t, usable, True, offload_activations=True, checkpoint_inside=inside, **kw)
        need = estimate_memory(t, batch_tokens=off_tokens, offload_activations=True, checkpoint_inside=inside,
                               **kw).host_gib
        host = host_memory_gib() if host_gib is None else host_gib
        if cfg.offload_activations is None and (off_tokens < tokens * OFFLOAD_MIN_GAIN
                                                or (tokens >= OFFLOAD_BELOW_TOKENS and not compiled)):
            return tokens, False, ""  # no gain worth the copies: nothing to say
        if host is None or need > host * HOST_SHARE:
            return tokens, False, (f"; activations stay on the GPU: offloading them ({off_tokens:,} tokens) needs "
                                   f"{need:.1f} GiB of host RAM, " + (f"{host:.1f} GiB available" if host is not None
                                                                    else "and the free host RAM is unknown"))
        return off_tokens, True, (f"; offloading the checkpointed activations lets {off_tokens:,} tokens fit "
                                  f"instead of {tokens:,} ({need:.1f} GiB pinned host RAM of {host:.0f} GiB available)")

    tokens, off, off_why = offloading(fits[ckpt], False)
    inside = False
    if compiled and ckpt and (cfg.checkpoint_inside or (cfg.checkpoint_inside is None and quant == "bf16")):
        in_plan = offloading(_largest_fit(t, usable, True, checkpoint_inside=True, **kw), True)
        steps = run_steps(cfg, data_tokens, in_plan[0])
        worth = in_plan[0] >= INSIDE_MIN_SHARE * tokens  # its bigger backward leaves most of the step
        if cfg.checkpoint_inside or (worth and (steps is None or steps >= INSIDE_MIN_STEPS)):
            inside, (tokens, off, off_why) = True, in_plan
            off_why += (f"; checkpoint inside the compiled layers (a faster backward, a longer first step): "
                        f"{tokens:,} tokens fit that way")
        elif worth:
            off_why += (f"; checkpoint around the compiled layers: about {steps} steps do not pay back the longer "
                        f"compiling inside them (from {INSIDE_MIN_STEPS})")
    if tokens < cfg.max_length:
        need = estimate_memory(t, batch_tokens=cfg.max_length, gradient_checkpointing=True, **kw)
        raise ValueError(
            f"{t.key} ({quant}) does not fit {gib:.1f} GiB: one {cfg.max_length}-token example needs "
            f"~{need.total_gib - need.overhead_gib:.1f} GiB with checkpointing; lower max_length"
            + (", use 4-bit (QUANT = \"4bit\")" if quant == "bf16" else "") + " or a GPU with more memory")
    found = chosen(tokens, ckpt, f"fitted to {gib:.1f} GiB with {MARGIN:.0%} kept free; checkpointing "
                   f"{'on' if ckpt else 'off'}: {why}{off_why}{compile_why}", off, inside)
    found.reason += f"; estimated peak {found.estimate.total_gib - found.estimate.overhead_gib:.1f} GiB"
    return found
