"""Training with the library's own Trainer: arguments from the registry, token-budget packing, a loss curve.

The seeds padded every batch to its longest example; for Chat-甄嬛 (82 tokens on average) most of
the GPU's work was on pad tokens. The course lays examples end to end instead
(`DataCollatorWithFlattening`): no pad tokens, and positions that restart per example keep them
apart in attention (tested in tests/test_training.py). How many go into one micro-batch is a
token budget (`TrainConfig.batch_tokens`, fitted to the card by `memory.token_budget`), not a
count of sequences: a learner's longer chats then take more micro-batches, not more memory.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import importlib.util
import time
from pathlib import Path

from transformers import Trainer, TrainerCallback

from . import records
from .registry import LAUNCH_TIMEOUT_S, TrainConfig

LOSS_PNG = "loss.png"


def liger_on(cfg: TrainConfig) -> bool:
    """Whether this run uses Liger's kernels: asked for, and a GPU with liger-kernel installed."""
    import torch

    return bool(cfg.use_liger and torch.cuda.is_available() and importlib.util.find_spec("liger_kernel"))


def training_args(cfg: TrainConfig, output_dir: str | Path, **overrides):
    """`TrainingArguments` from a TrainConfig; keyword overrides win (e.g. eval settings).

    Gradient checkpointing is switched on by `models.add_lora` on the model itself (the
    argument's name differs between transformers releases), not here.
    """
    import torch
    from transformers import TrainingArguments

    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    per_device = 1 if cfg.packing else cfg.per_device_train_batch_size  # a packed row is a micro-batch
    kwargs = dict(
        output_dir=str(output_dir), per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate, num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps, logging_steps=cfg.logging_steps, save_steps=cfg.save_steps,
        warmup_steps=cfg.warmup_steps, optim=cfg.optim, seed=cfg.seed, bf16=bf16,
        use_liger_kernel=liger_on(cfg),
        # compiled layers fuse their own norms and activations: Liger keeps only the fused loss
        **({"liger_kernel_config": {"rope": False, "rms_norm": False, "swiglu": False}}
           if liger_on(cfg) and compiling(cfg) else {}),
        # recorded offline: TensorBoard event files in the run folder (records.py reads them back);
        # the tokens counted feed the tokens/s that CourseTrainer.log adds
        report_to=records.REPORT_TO, include_num_input_tokens_seen="non_padding", save_total_limit=2,
        ddp_timeout=LAUNCH_TIMEOUT_S,  # a frozen process ends a launch after this, not 30 min
        # packed batches have no attention_mask column to keep; the collator builds what is needed
        remove_unused_columns=False,
        # no waiting on the GPU inside a step, where the host could already prepare the next one:
        # a NaN loss is logged as NaN (not replaced by the mean), batches go over from pinned memory
        logging_nan_inf_filter=False,
    )
    kwargs.update(overrides)
    kwargs["accelerator_config"] = {"non_blocking": True, **kwargs.get("accelerator_config", {})}
    args = TrainingArguments(**kwargs)
    if cfg.packing and args.world_size == 1 and "include_num_input_tokens_seen" not in overrides:
        args.include_num_input_tokens_seen = "no"  # CourseTrainer counts packed tokens itself
    return args


def collator(tokenizer, packing: bool):
    """`PackedCollator` for packed runs, else padding to the longest of each batch (the seeds')."""
    from transformers import DataCollatorForSeq2Seq

    if packing:
        return PackedCollator()
    return DataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True, label_pad_token_id=-100)


class PackedCollator:
    """Lays the examples of a packed row (`pack_dataset`: one micro-batch) end to end, no padding.

    transformers' `DataCollatorWithFlattening` does the work; the batch carries each sequence's
    boundaries (`cu_seq_lens_q`), which the variable-length attention below uses instead of a
    [tokens x tokens] mask.
    """

    def __init__(self):
        from transformers import DataCollatorWithFlattening

        self.flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100,
                                                  return_flash_attn_kwargs=True)

    def __call__(self, features: list[dict]) -> dict:
        return self.flatten([{"input_ids": ids, "labels": labels} for f in features
                             for ids, labels in zip(f["input_ids"], f["labels"])])


def best_fit(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices grouped into micro-batches of at most `budget` tokens, by best fit decreasing.

    Longest first, each sequence goes into the fullest micro-batch that still has room for it,
    else starts a new one: micro-batches come out nearly full (few steps of small leftovers),
    no sequence is split, and each index appears exactly once. A sequence longer than the
    budget gets a micro-batch of its own.
    """
    bins: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, bin), sorted: the first that fits is the fullest
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        j = bisect.bisect_left(rooms, (n, -1))
        if j < len(rooms):
            room, b = rooms.pop(j)
        else:
            room, b = budget, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(rooms, (room - n, b))
    return bins


def split_evenly(groups: list[list[int]], parts: int) -> list[list[int]]:
    """Split the micro-batches holding the most examples in two until their count is a multiple
    of `parts` (the processes of a launch). Otherwise the distributed sampler evens the ranks
    out by training some micro-batches twice an epoch. One-example micro-batches stay whole."""
    groups = [list(g) for g in groups]
    while len(groups) % parts:
        big = max(range(len(groups)), key=lambda j: len(groups[j]))
        if len(groups[big]) < 2:
            break
        whole = groups.pop(big)
        groups += [whole[::2], whole[1::2]]  # alternate members: halves of similar length
    return groups


@dataclasses.dataclass
class PackReport:
    """What packing made of a dataset: how many micro-batches, how full they are."""

    examples: int
    micro_batches: int
    tokens: int
    budget: int
    over_budget: int  # examples longer than the budget, each alone in its micro-batch
    repeated: int = 0  # micro-batches the sampler repeats so that each process gets as many

    def __str__(self) -> str:
        fill = self.tokens / max(1, self.micro_batches * self.budget)
        line = (f"{self.examples} examples -> {self.micro_batches} micro-batches of at most "
                f"{self.budget:,} tokens ({fill:.0%} full on average)")
        if self.over_budget:
            line += f"; {self.over_budget} example(s) longer than the budget, each alone"
        if self.repeated:
            line += f"; {self.repeated} micro-batch(es) trained twice an epoch to even out the processes"
        return line


def pack_dataset(ds, budget: int, parts: int = 1):
    """Group a tokenized dataset into micro-batches of `budget` tokens; returns (dataset, report).

    Each row of the result is one micro-batch: lists of the members' `input_ids` and `labels`.
    The Trainer then takes one row a device a step (its sampler shuffles the rows each epoch),
    so every example is seen exactly once an epoch; with `parts` processes the rows come in a
    multiple of `parts` (`split_evenly`), so no process repeats another's.
    """
    import datasets
    import pyarrow.compute as pc

    lengths: list[int] = []
    for batch in ds.select_columns(["input_ids"]).with_format("arrow").iter(batch_size=10_000):
        lengths += pc.list_value_length(batch["input_ids"]).to_pylist()
    groups = split_evenly(best_fit(lengths, budget), parts)

    def gather(rows: dict) -> dict:
        members = [ds[group] for group in rows["members"]]
        return {"input_ids": [m["input_ids"] for m in members], "labels": [m["labels"] for m in members]}

    packed = datasets.Dataset.from_dict({"members": groups}).map(
        gather, batched=True, batch_size=64, remove_columns=["members"], desc="packing")
    report = PackReport(len(lengths), len(groups), sum(lengths), budget,
                        sum(n > budget for n in lengths), -len(groups) % parts)
    return packed, report


def sequences(feature: dict) -> list[list[int]]:
    """The token ids of each example in a dataset row: several in a packed row, one otherwise."""
    ids = feature["input_ids"]
    return ids if ids and isinstance(ids[0], list) else [ids]


def _packed(ds) -> bool:
    """Whether a dataset's rows are already micro-batches (`pack_dataset`'s output)."""
    feature = ds.features["input_ids"]
    return hasattr(feature, "feature") and hasattr(feature.feature, "feature")


class OutOfMemory(RuntimeError):
    """Ran out of GPU memory: one line that names the budget and what to change.

    In a notebook IPython shows `_render_traceback_`'s lines instead of CUDA's 40-line traceback.
    """

    def __init__(self, cfg: TrainConfig):
        tokens = cfg.batch_tokens
        fixes = [f"cfg = dataclasses.replace(cfg, batch_tokens={tokens // 2})" if tokens else
                 "lower per_device_train_batch_size"]
        if not cfg.gradient_checkpointing:
            fixes.append("gradient_checkpointing=True")
        fixes.append(f"a shorter max_length (now {cfg.max_length})")
        size = f"batch_tokens={tokens:,}" if tokens else f"{cfg.per_device_train_batch_size} sequences a batch"
        super().__init__(f"out of GPU memory at {size}: set {' or '.join(fixes)}; "
                         "close other notebooks holding a model (restart their kernels)")

    def _render_traceback_(self) -> list[str]:
        return [f"OutOfMemory: {self}"]


OFFLOAD_MIN_BYTES = 1 << 20  # smaller saved tensors stay where they are: a copy costs more than it frees
# Host copies are cut from pinned buffers of this many bytes, reused every step. PyTorch's own
# pinned allocator rounds each request up to a power of two and keeps every size it has seen:
# steps of varying length then held 3.0 GiB for 1.2 GiB of copies (one H200, 2026-12-02).
OFFLOAD_CHUNK_BYTES = 1 << 28


class OffloadActivations:
    """Keeps the tensors autograd saves in one forward in host memory until backward needs them.

    With gradient checkpointing each decoder layer saves only its input hidden state
    (tokens x hidden in bf16); on a 6 GB card those inputs are the largest thing that grows with
    the step (DeepSeek-7B: 240 KB a token). Inside `with offload:` every saved tensor of at least
    OFFLOAD_MIN_BYTES that is not a parameter is copied to pinned host memory on a side CUDA
    stream while the next layer computes, and its GPU memory is freed once the copy is done.
    In backward each one comes back the same way, and the one before it (the next that backward
    needs) is copied in the background while this layer is recomputed: double buffering, as
    Unsloth's and torchtune's activation offloading do, with PyTorch's own
    `torch.autograd.graph.saved_tensors_hooks`. Without CUDA it makes a plain host copy, so the
    bookkeeping runs (and is tested) on a CPU too. The values never change: the copies are exact.

    The copies go into pinned buffers of `chunk_bytes` (a power of two) that every step reuses,
    each into the first buffer with room: a layer's small saved tensors fill the gap its input
    left (placed one after another, GLM-4's layers with the checkpoint inside, 128 MiB + 4 MiB
    each, held one buffer each: 10.9 GiB pinned for 5.8 GiB of copies, H200 runs 16-19). The side
    stream writes and reads them in order, so a step never overwrites a copy the last one still
    reads. One object serves a whole run; `host_bytes` is what the last forward copied out,
    `host_capacity` the pinned memory it holds.
    """

    def __init__(self, min_bytes: int = OFFLOAD_MIN_BYTES, chunk_bytes: int = OFFLOAD_CHUNK_BYTES):
        import torch

        self.min_bytes, self.chunk_bytes = min_bytes, chunk_bytes
        self.chunks: list = []  # host buffers (uint8), pinned with CUDA
        self.fill: list[int] = []  # bytes of each buffer this step's copies use
        self.stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self.stored: dict[int, tuple] = {}  # key -> (host copy, device, copy-done event)
        self.pending: list = []  # (GPU tensor, event): kept alive until its copy to host is done
        self.prefetched: dict[int, tuple] = {}  # key -> (GPU tensor, event): copied back early
        self.done: set[int] = set()  # keys backward has taken back
        self.host_bytes = 0
        self._hooks = None

    def __enter__(self):
        import torch

        for _, event in self.prefetched.values():  # copied back, never needed: their memory is
            if event is not None:                   # reused once the copies are done
                torch.cuda.current_stream().wait_event(event)
        self.stored.clear()
        self.prefetched.clear()
        self.done.clear()
        self.host_bytes = 0
        self.fill = [0] * len(self.chunks)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._release(keep=0)

    def _release(self, keep: int) -> None:
        """Let the GPU reuse the memory of all but the last `keep` tensors being copied out: the
        compute stream waits for their copies first (no CPU wait)."""
        import torch

        while len(self.pending) > keep:
            _, event = self.pending.pop(0)
            if event is not None:
                torch.cuda.current_stream().wait_event(event)

    @property
    def host_capacity(self) -> int:
        return sum(c.numel() for c in self.chunks)

    def _host(self, tensor, pin: bool):
        """A free slice of the first reused buffer with room, shaped like `tensor` (a new buffer if none has)."""
        import torch

        nbytes = tensor.numel() * tensor.element_size()
        chunk = next((i for i, used in enumerate(self.fill) if used + nbytes <= self.chunks[i].numel()), None)
        if chunk is None:
            size = max(self.chunk_bytes, 1 << (nbytes - 1).bit_length())
            self.chunks.append(torch.empty(size, dtype=torch.uint8, pin_memory=pin))
            self.fill.append(0)
            chunk = len(self.chunks) - 1
        offset = self.fill[chunk]
        self.fill[chunk] = offset + -(-nbytes // 512) * 512  # the next slice 512-byte aligned
        flat = self.chunks[chunk][offset:offset + nbytes]
        return flat.view(tensor.dtype).view(tensor.shape)

    def pack(self, tensor):
        import torch

        if (isinstance(tensor, torch.nn.Parameter) or tensor.layout != torch.strided
                or tensor.numel() * tensor.element_size() < self.min_bytes):
            return tensor  # kept as it is
        key = len(self.stored)
        cuda = tensor.is_cuda and self.stream is not None
        host = self._host(tensor, pin=cuda)
        event = None
        if cuda:
            self.stream.wait_stream(torch.cuda.current_stream())  # the tensor is computed
            with torch.cuda.stream(self.stream):
                host.copy_(tensor, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            self.pending.append((tensor, event))
            self._release(keep=1)  # double buffer: the copy of this one overlaps the next layer
        else:
            host.copy_(tensor)
        self.stored[key] = (host, tensor.device, event)
        self.host_bytes += host.numel() * host.element_size()
        return key

    def _fetch(self, key: int):
        """Start copying a stored tensor back to its GPU on the side stream; (tensor, event).

        The GPU tensor comes from the compute stream's memory, in the order the host asks: once
        backward is done with it, the next layer's tensors reuse it. Made on the side stream, each
        stayed reserved until the GPU caught up with the host, which in backward runs many layers
        ahead: DeepSeek-7B at 4,864 tokens reserved 0.54 GiB more than it allocated (0.27 this way),
        and under a 5.5 GiB cap the allocator freed its cache and waited for the GPU 8 times a step
        (`num_alloc_retries`): 20% slower (one H200, 2026-12-03: runs 20-21, docs/SPEED_HISTORY.md, README).
        """
        import torch

        host, device, copied = self.stored[key]
        if device.type != "cuda":
            return host.clone(), None
        gpu = torch.empty_like(host, device=device)
        free = torch.cuda.Event()
        free.record()  # on the compute stream: from here on nothing else uses gpu's memory
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(copied)
            self.stream.wait_event(free)
            gpu.copy_(host, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        return gpu, event

    def unpack(self, key):
        import torch

        if not isinstance(key, int):
            return key
        gpu, event = self.prefetched.pop(key, None) or self._fetch(key)
        self.done.add(key)
        if event is not None:
            torch.cuda.current_stream().wait_event(event)
        earlier = [k for k in self.stored if k < key and k not in self.prefetched and k not in self.done]
        if earlier and self.stored[earlier[-1]][1].type == "cuda":  # what backward needs next
            self.prefetched[earlier[-1]] = self._fetch(earlier[-1])
        return gpu


class RunMeter(TrainerCallback):
    """What the course records beside each logged loss: tokens/s since the last log, the peak
    memory so far (the GPU's reserved memory; on a CPU the process's resident peak) and the
    token budget. Its clock starts where training (or a resumed run) starts."""

    def __init__(self, batch_tokens: int | None):
        self.batch_tokens = batch_tokens
        self.last: tuple[float, int] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = (time.perf_counter(), state.num_input_tokens_seen)

    def values(self, state) -> dict[str, float]:
        import resource

        import torch

        now, seen = time.perf_counter(), state.num_input_tokens_seen
        then, before = self.last or (now, seen)
        self.last = (now, seen)
        peak = (torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available()
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)  # KiB on Linux
        out = {"peak_memory_gib": round(peak, 3)}
        if now > then and seen > before:
            out["tokens_per_second"] = round((seen - before) / (now - then), 1)
        if self.batch_tokens:
            out["batch_tokens"] = self.batch_tokens
        return out


class CourseTrainer(Trainer):
    """The library's Trainer; running out of GPU memory ends in one line (`OutOfMemory`), and each
    logged loss comes with what `RunMeter` measures (into the TensorBoard events too).

    With `cfg.offload_activations` each training forward runs inside `OffloadActivations`
    (`trainer.offload`), which keeps the checkpointed layer inputs in host memory.
    """

    course_cfg: TrainConfig
    offload: OffloadActivations | None = None
    compiled: CompiledLayers | None = None
    meter: RunMeter | None = None

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self.meter is not None:  # a training log, not eval or the summary
            logs.update(self.meter.values(self.state))
        super().log(logs, *args, **kwargs)

    def train(self, *args, **kwargs):
        import torch

        try:
            return super().train(*args, **kwargs)
        except torch.OutOfMemoryError:
            raise OutOfMemory(self.course_cfg) from None

    def training_step(self, model, inputs, *args, **kwargs):
        if self.args.include_num_input_tokens_seen == "no" and "cu_seq_lens_q" in inputs:
            # packed, so no padding: the batch's size is its token count, read without waiting
            # for the GPU (the Trainer's own count calls .item() on every micro-batch)
            self.state.num_input_tokens_seen += inputs["input_ids"].numel()
        return super().training_step(model, inputs, *args, **kwargs)

    def compute_loss(self, model, inputs, *args, **kwargs):
        import torch

        if self.offload is None or not torch.is_grad_enabled():
            return super().compute_loss(model, inputs, *args, **kwargs)
        with self.offload:  # backward runs after: the copies come back through the saved keys
            return super().compute_loss(model, inputs, *args, **kwargs)


VARLEN = "selfllm_varlen"


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                     scaling: float | None = None, **kwargs):
    """Causal attention over a packed batch, one block per sequence, with no mask tensor.

    For packed batches transformers' sdpa path builds a [tokens x tokens] block mask, which keeps
    PyTorch off its flash kernel; `torch.nn.attention.varlen.varlen_attn` (FlashAttention inside
    PyTorch, CUDA only) takes the sequence boundaries instead. Elsewhere (the CPU, generation)
    the plain sdpa path runs, so results are the same everywhere.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or not query.is_cuda or query.shape[0] != 1:
        if cu is not None:  # packed, on the CPU: one causal sdpa call per sequence
            return _per_sequence(module, query, key, value, cu, scaling), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    from torch.nn.attention.varlen import varlen_attn

    # [tokens, heads, dim]; fewer key/value heads (grouped-query attention) need no copies:
    # the FlashAttention kernel shares each one across its group of query heads itself
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    cu = cu.to(device=q.device, dtype=torch.int32)
    n = int(kwargs.get("max_length_q") or (cu[1:] - cu[:-1]).max())
    out = varlen_attn(q, k, v, cu, cu, n, n, scale=scaling, **_causal_kwarg(varlen_attn))
    return out.unsqueeze(0), None


def _causal_kwarg(fn) -> dict:
    import inspect

    params = inspect.signature(fn).parameters
    return {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}


def _per_sequence(module, query, key, value, cu, scaling):
    import torch.nn.functional as F

    import torch

    groups = query.shape[1] // key.shape[1]
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        k, v = (t[:, :, a:b].repeat_interleave(groups, dim=1) for t in (key, value))
        outs.append(F.scaled_dot_product_attention(query[:, :, a:b], k, v, is_causal=True, scale=scaling))
    return torch.cat(outs, dim=2).transpose(1, 2)


def use_varlen_attention(model) -> None:
    """Register `varlen_attention` with transformers and switch the (base) model to it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, flash_attention_mask)  # no mask tensor is built
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(VARLEN)


class LossCurve(TrainerCallback):
    """Draws the training (and eval) loss as it is logged, and saves the final plot as a PNG.

    In a notebook the figure updates in place; elsewhere it is only saved.
    """

    def __init__(self, path: str | Path | None = None, live: bool | None = None):
        self.path = Path(path) if path else None
        self.live = _in_notebook() if live is None else live
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.eval_steps: list[int] = []
        self.eval_losses: list[float] = []
        self._handle = None
        self.every_s = 2.0  # redraw at most this often: drawing costs more than a tiny step
        self._drawn = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        """Start from the state's history: a resumed run's curve keeps the steps before the stop."""
        history = state.log_history
        self.steps = [h["step"] for h in history if "loss" in h]
        self.losses = [float(h["loss"]) for h in history if "loss" in h]
        self.eval_steps = [h["step"] for h in history if "eval_loss" in h]
        self.eval_losses = [float(h["eval_loss"]) for h in history if "eval_loss" in h]

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.steps.append(state.global_step)
            self.losses.append(float(logs["loss"]))
        if "eval_loss" in logs:
            self.eval_steps.append(state.global_step)
            self.eval_losses.append(float(logs["eval_loss"]))
        if self.live and self.losses and time.monotonic() - self._drawn > self.every_s:
            self._show()

    def on_train_end(self, args, state, control, **kwargs):
        if self.live and self.losses:
            self._show()  # the final curve, whatever the throttle skipped
        path = self.path or Path(args.output_dir) / LOSS_PNG
        if self.losses and state.is_world_process_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.figure().savefig(path, dpi=100, bbox_inches="tight")
            self.path = path

    def figure(self):
        import matplotlib

        matplotlib.use("Agg") if not self.live else None
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(self.steps, self.losses, marker=".", label="train")
        if self.eval_losses:
            ax.plot(self.eval_steps, self.eval_losses, marker="o", label="eval")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        plt.close(fig)
        return fig

    def _show(self) -> None:
        from IPython.display import display

        fig = self.figure()
        self._drawn = time.monotonic()
        if self._handle is None:
            self._handle = display(fig, display_id=True)
        else:
            self._handle.update(fig)


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython

        return get_ipython() is not None and hasattr(get_ipython(), "kernel")
    except ImportError:
        return False


def logged(run, key: str = "loss") -> dict[int, float]:
    """One logged value by step ("loss", "eval_loss", "eval_accuracy"...), from a Trainer that
    has trained, or from the trainer_state.json it wrote into a run folder (another process)."""
    import json

    if hasattr(run, "state"):
        history = run.state.log_history
    else:
        history = json.loads((Path(run) / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h[key] for h in history if key in h}


class StepClock(TrainerCallback):
    """Wall-clock time at the end of each optimizer step (evaluation and saving come after it),
    once the GPU has finished the step's work: for `tokens_per_second`.

    On a GPU each step's end is a CUDA event, read back only when `times` is asked for: waiting
    for the GPU at every step would leave it idle while the host prepares the next batch, and
    the clock would slow down the run it measures.
    """

    def __init__(self):
        self.marks: list = []  # perf_counter() seconds, or CUDA events after `origin`
        self.origin: tuple | None = None  # (perf_counter(), event) both taken when training begins

    def on_train_begin(self, args, state, control, **kwargs):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the event below completes at once: it marks "now"
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.origin = (time.perf_counter(), event)

    def on_step_end(self, args, state, control, **kwargs):
        import torch

        if self.origin is None:
            self.marks.append(time.perf_counter())
            return
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.marks.append(event)

    @property
    def times(self) -> list[float]:
        if self.origin is None:
            return list(self.marks)
        start, first = self.origin
        if self.marks:
            self.marks[-1].synchronize()
        return [start + first.elapsed_time(event) / 1000 for event in self.marks]


def tokens_per_second(info: dict, accumulation: int, warmup: int = 2) -> float:
    """Training tokens/s: all ranks' tokens over rank 0's step times (a StepClock's).

    `info` is {"ranks": [{"tokens": per micro-batch, "step_times": per step}, ...]}, as
    train_zero3 writes it in run_info.json; a micro-batch's tokens count for its step by position.

    The first `warmup` steps are left out (allocation, compilation, the first gathers), and so
    is the time between steps that evaluation or checkpointing took.
    """
    steps = [r["step_times"] for r in info["ranks"]][0]
    if len(steps) <= warmup + 1:
        raise ValueError(f"{len(steps)} steps: too few to time after {warmup} warm-up steps")
    gaps = [b - a for a, b in zip(steps[warmup:], steps[warmup + 1:])]
    typical = sorted(gaps)[len(gaps) // 2]
    kept = [i for i, g in enumerate(gaps, start=warmup + 1) if g < 3 * typical]  # no eval/save
    tokens = sum(sum(r["tokens"][i * accumulation:(i + 1) * accumulation]) for r in info["ranks"]
                 for i in kept)
    return tokens / sum(gaps[i - warmup - 1] for i in kept)


def fp32_rope(model) -> int:
    """Recompute each RoPE `inv_freq` buffer in fp32; returns how many were rounded to bf16.

    DeepSpeed's bf16 engine casts the whole model, buffers too, so RoPE's frequencies train
    rounded to bf16 while inference elsewhere computes them in fp32: on the 14B under ZeRO-3 (train_zero3) a
    reloaded adapter's logits were 0.18 apart on average from the trained model's, and exactly
    equal once inv_freq was rounded alike. Buffers are not partitioned: each rank fixes its own.
    """
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    fixed = 0
    for module in model.modules():
        inv = getattr(module, "inv_freq", None)
        if not isinstance(inv, torch.Tensor) or inv.dtype == torch.float32:
            continue
        kind = getattr(module, "rope_type", "default")
        init = getattr(module, "compute_default_rope_parameters", None) if kind == "default" else None
        init = init or ROPE_INIT_FUNCTIONS[kind]  # older transformers keep "default" there
        fresh = init(module.config)[0].to(device=inv.device, dtype=torch.float32)
        module.inv_freq = fresh
        if isinstance(getattr(module, "original_inv_freq", None), torch.Tensor):
            module.original_inv_freq = fresh.clone()
        fixed += 1
    return fixed


class Fp32Rope(TrainerCallback):
    """Puts RoPE back in fp32 once the Trainer has built the DeepSpeed engine (see `fp32_rope`)."""

    def __init__(self):
        self.fixed = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.fixed = fp32_rope(model)


def liger_loss_for_glm(model) -> bool:
    """Liger's fused linear + cross-entropy loss for native GLM-4 (`glm`), which Liger does not list.

    The Trainer's `use_liger_kernel` patches only the model types Liger names. GLM-4-9B-chat-hf
    is `glm`, so its loss built the full [tokens x 151,552] logits in fp32, about 1.8 MB a token:
    the largest item on a 24 GB card. Its causal-LM head is the same as GLM-4-0414's (`glm4`),
    whose Liger forward serves as it is. Returns whether the model was patched.
    """
    from types import MethodType

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config.model_type != "glm":
        return False
    from liger_kernel.transformers.model.glm4 import lce_forward

    base.forward = MethodType(lce_forward, base)
    return True


@functools.cache
def lora_linear_op():
    """`selfllm::lora_linear(x, W, bias, a, bt, s)`: x W^T + bias + s * a bt in one output tensor.

    An operator of its own because `torch.compile` turns `addmm(W x, a, bt)` into a copy of the
    whole W x output before the product adds into it: one device-to-device copy per LoRA layer
    and pass, 620 MB for Qwen2-7B's MLP at 16,384 tokens and 3% of a compiled step on an H200
    (profile, 2026-12-02). Inside its own operator the adapter's product adds into W x in place.
    The base weight is frozen: the backward gives x, a and bt their gradients only.
    """
    import torch

    @torch.library.custom_op("selfllm::lora_linear", mutates_args=(),
                             schema="(Tensor x, Tensor weight, Tensor? bias, Tensor a, Tensor bt, float scale) -> Tensor")
    def lora_linear(x, weight, bias, a, bt, scale):
        out = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]), weight, bias)
        return out.addmm_(a.reshape(-1, a.shape[-1]), bt, alpha=scale).view(*x.shape[:-1], weight.shape[0])

    @lora_linear.register_fake
    def _(x, weight, bias, a, bt, scale):
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    def setup_context(ctx, inputs, output):
        _, weight, _, a, bt, ctx.scale = inputs
        ctx.save_for_backward(weight, a, bt)

    def backward(ctx, grad):
        weight, a, bt = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        gx = (g @ weight).view(*grad.shape[:-1], weight.shape[1])
        ga = (g @ bt.t()).mul_(ctx.scale).view(a.shape)
        gbt = (a.reshape(-1, a.shape[-1]).t() @ g).mul_(ctx.scale)
        return gx, None, None, ga, gbt, None

    lora_linear.register_autograd(backward, setup_context=setup_context)
    return lora_linear


def lora_addmm_forward(self, x, *args, **kwargs):
    """A LoRA layer's training forward: W x + s * B (A x), the second product added into the first.

    peft computes B (A x) as its own [tokens x out] tensor, scales it, then adds it: three passes
    over the layer's whole output, and before that a copy of x in fp32 that bf16 autocast casts
    straight back. One product accumulates s * (A x) B^T into W x instead: the same sum. On an
    H100 (Qwen2-7B, 96 sequences a step) those copies were about a sixth of the GPU time in a
    profile, and the fused sum gained another 2.6% once they were gone (13,436 -> 13,782
    tokens/s). A plain frozen `nn.Linear` base goes through `lora_linear_op` (no copy of W x
    when compiled); others (4-bit) add with `addmm`. `FastLora` puts it on while training.
    """
    import torch

    if self.disable_adapters or self.merged:
        return type(self).forward(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    lora_a, lora_b, base = self.lora_A[name], self.lora_B[name], self.base_layer
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    # no autocast to cast x for the adapter (a plain fp32 or bf16 loop): cast it here
    a = lora_a(self.lora_dropout[name](x if autocast or x.dtype == lora_a.weight.dtype
                                       else x.to(lora_a.weight.dtype)))
    if type(base) is torch.nn.Linear and not base.weight.requires_grad:
        dtype = torch.get_autocast_dtype(device) if autocast else base.weight.dtype
        bias = None if base.bias is None else base.bias.to(dtype)
        return torch.ops.selfllm.lora_linear(x.to(dtype), base.weight.to(dtype), bias, a.to(dtype),
                                             lora_b.weight.t().to(dtype), self.scaling[name])
    result = base(x, *args, **kwargs)
    flat = torch.addmm(result.reshape(-1, result.shape[-1]), a.to(result.dtype).reshape(-1, a.shape[-1]),
                       lora_b.weight.t().to(result.dtype), alpha=self.scaling[name])
    return flat.view(result.shape)


class FastLora(TrainerCallback):
    """Trains each plain LoRA linear layer with `lora_addmm_forward`; peft's forward is back after.

    Skipped where it cannot apply: several active adapters, merged or DoRA-like variants, LoRA
    biases, and ZeRO-3 partitioned weights (DeepSpeed gathers a weight only when its own module
    runs). `self.layers` lists the layers it switched.
    """

    def __init__(self):
        self.layers: list = []

    @staticmethod
    def applies(module) -> bool:
        import torch

        adapters = getattr(module, "active_adapters", None)
        if not hasattr(module, "lora_A") or not adapters or len(adapters) != 1:
            return False
        name = adapters[0]
        if name not in module.lora_A or name not in module.lora_B:
            return False
        lora_a, lora_b = module.lora_A[name], module.lora_B[name]
        return (isinstance(lora_a, torch.nn.Linear) and isinstance(lora_b, torch.nn.Linear)
                and lora_b.bias is None and not getattr(module, "lora_variant", {}).get(name)
                and not hasattr(lora_b.weight, "ds_id"))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        import types

        self.layers = [m for m in model.modules() if self.applies(m)]
        lora_linear_op()  # registered once, before anything compiles the forward that calls it
        for layer in self.layers:
            layer.forward = types.MethodType(lora_addmm_forward, layer)

    def on_train_end(self, args, state, control, **kwargs):
        for layer in self.layers:
            del layer.forward  # the class's own (peft's) forward again
        self.layers = []


class FrozenGC(TrainerCallback):
    """Keep Python's full garbage collections from stalling the GPU.

    A full collection walks every object the process holds, and after loading and compiling a
    model those are many: on an H200 (GLM-4-9B, 24 GiB, 2026-12-02) a run made 3-4 of them, the
    longest pausing the host 0.37-0.53 s while the GPU ran dry. After the first step (the
    compilation) everything alive is moved out of the collector's reach (`gc.freeze`); what
    training makes afterwards is collected as usual. Undone when training ends.
    """

    def __init__(self):
        self.frozen = False

    def on_step_end(self, args, state, control, **kwargs):
        import gc

        if not self.frozen:
            gc.collect()
            gc.freeze()
            self.frozen = True

    def on_train_end(self, args, state, control, **kwargs):
        import gc

        if self.frozen:
            gc.unfreeze()
            self.frozen = False


def can_compile() -> bool:
    """Whether `torch.compile` can generate GPU kernels here: CUDA, Triton, a Volta or newer GPU."""
    import torch

    return bool(torch.cuda.is_available() and importlib.util.find_spec("triton")
                and torch.cuda.get_device_capability() >= (7, 0))


def compiling(cfg: TrainConfig) -> bool:
    """Whether this run compiles its decoder layers: asked for (or chosen by memory.token_budget),
    packed, and `can_compile`."""
    return bool(cfg.compile_layers and cfg.packing and can_compile())


class CompiledLayers(TrainerCallback):
    """Compiles each decoder layer with `torch.compile` for training; plain layers again after.

    A 4-bit step on a small card launches thousands of small kernels from Python (bitsandbytes'
    dequantize, peft's LoRA, the norms): the GPU waits for the host. Compiling one layer turns
    its forward and backward into a few fused kernels called from generated code; all layers
    share one graph (dynamic shapes: every packed micro-batch has its own length), compiled in the
    first step. `OffloadActivations` and `FastLora` work through it unchanged, as torchtune and
    Unsloth compile per layer too. `self.layers` lists the layers it compiled.

    This callback places the checkpoint itself, the same on every transformers version (before
    5.23 transformers checkpointed around a layer's call, from 5.23 its forward, inside what is
    compiled). Around the compiled layer (the default) the recompute runs the whole compiled
    forward again. Inside (`checkpoint_inside`, `TrainConfig.checkpoint_inside`) AOTAutograd's
    backward recomputes only what it reads (no down projection): Qwen2-7B under 24 GiB ran 8%
    faster, but the backward holds more at once and compiling takes longer; `memory.token_budget`
    weighs that (H200, 2026-12-03, docs/SPEED_HISTORY.md runs 13-16). From transformers 5.25 (which
    installs `kernels`) each attention forward sets and resets a module-level context variable;
    inside a checkpoint Dynamo would break the graph there, since eager checkpointing replays side
    effects in the recompute. This one leaves nothing behind, so Dynamo is told not to replay it
    (`skip_fwd_side_effects_in_bwd_under_checkpoint`, while training only).
    """

    def __init__(self, backend: str = "inductor", checkpoint_inside: bool = False):
        self.backend = backend  # "aot_eager": the same graphs without generated kernels (CPU tests)
        self.checkpoint_inside = checkpoint_inside
        self.layers: list = []
        self.checkpointed: list = []  # layers whose checkpoint this callback runs
        self._skip_side_effects: bool | None = None  # Dynamo's setting before training, restored after

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        import torch._dynamo.config as dynamo
        from transformers.modeling_layers import GradientCheckpointingLayer

        self.layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        self.checkpointed = [m for m in self.layers if m.gradient_checkpointing]
        for layer in self.checkpointed:
            layer.gradient_checkpointing = False  # transformers' own checkpoint: placed here instead
            if self.checkpoint_inside:  # an instance attribute: what the compiled call runs
                layer.forward = functools.partial(self._checkpointed, layer, layer.forward,
                                                  layer._gradient_checkpointing_func)
        for layer in self.layers:
            layer.compile(dynamic=True, backend=self.backend)
        if self.checkpoint_inside and self.checkpointed and \
                hasattr(dynamo, "skip_fwd_side_effects_in_bwd_under_checkpoint"):  # not in every torch
            self._skip_side_effects = dynamo.skip_fwd_side_effects_in_bwd_under_checkpoint
            dynamo.skip_fwd_side_effects_in_bwd_under_checkpoint = True
        if not self.checkpoint_inside:  # around: the compiled call under the checkpoint
            for layer in self.checkpointed:
                layer._compiled_call_impl = functools.partial(self._checkpointed, layer, layer._compiled_call_impl,
                                                              layer._gradient_checkpointing_func)

    @staticmethod
    def _checkpointed(layer, run, checkpoint, *args, **kwargs):
        """`run` (the layer's forward or its compiled call) under transformers' checkpoint function,
        while training with gradients."""
        import torch

        if layer.training and torch.is_grad_enabled():
            return checkpoint(functools.partial(run, **kwargs), *args)
        return run(*args, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        for layer in self.layers:
            layer._compiled_call_impl = None  # nn.Module.compile's own switch: eager again
        for layer in self.checkpointed:
            layer.gradient_checkpointing = True
            vars(layer).pop("forward", None)  # the class's forward again
        if self._skip_side_effects is not None:
            import torch._dynamo.config as dynamo

            dynamo.skip_fwd_side_effects_in_bwd_under_checkpoint = self._skip_side_effects
            self._skip_side_effects = None
        self.layers, self.checkpointed = [], []


def make_trainer(model, tokenizer, train_ds, cfg: TrainConfig, output_dir: str | Path,
                 eval_ds=None, callbacks: list | None = None, args=None, compute_metrics=None,
                 preprocess_logits_for_metrics=None, **overrides):
    """A `Trainer` with the course's collator, a LossCurve (`trainer.loss_curve`), a RunMeter
    (`trainer.meter`: tokens/s, peak memory and budget beside each logged loss), RoPE kept
    in fp32 under DeepSpeed's bf16 engine (`trainer.rope_fix`, see `fp32_rope`), LoRA layers
    trained with one fused product (`trainer.fast_lora`, see `FastLora`) and the garbage
    collector kept off the objects of loading and compiling (`FrozenGC`).

    Packed runs group the datasets into micro-batches of `cfg.batch_tokens` tokens first
    (`pack_dataset`; `trainer.pack_report` says how); fit the budget with `memory.token_budget`.
    `args`: TrainingArguments built earlier (under ZeRO-3 they must exist before the model is
    loaded, so it loads already partitioned); otherwise built here from cfg and overrides.
    """
    import torch

    pack_report = None
    args = args or training_args(cfg, output_dir, **overrides)
    if cfg.packing:
        if cfg.batch_tokens is None:
            raise ValueError("cfg.batch_tokens is None: fit it to this GPU first, "
                             "cfg = memory.token_budget(T, cfg, quant).config, or set it by hand")
        if not _packed(train_ds):
            train_ds, pack_report = pack_dataset(train_ds, cfg.batch_tokens, args.world_size)
        if eval_ds is not None and not _packed(eval_ds):
            eval_ds, _ = pack_dataset(eval_ds, cfg.batch_tokens, args.world_size)
    curve, rope, fast, meter = LossCurve(), Fp32Rope(), FastLora(), RunMeter(cfg.batch_tokens)
    if cfg.packing and torch.cuda.is_available():
        use_varlen_attention(model)
    if liger_on(cfg):
        liger_loss_for_glm(model)
    trainer = CourseTrainer(
        model=model, args=args, train_dataset=train_ds,
        eval_dataset=eval_ds, data_collator=collator(tokenizer, cfg.packing),
        processing_class=tokenizer, callbacks=[curve, rope, fast, meter, FrozenGC(), *(callbacks or [])],
        compute_metrics=compute_metrics, preprocess_logits_for_metrics=preprocess_logits_for_metrics,
    )
    trainer.course_cfg, trainer.pack_report, trainer.meter = cfg, pack_report, meter
    trainer.offload = OffloadActivations() if cfg.offload_activations else None
    trainer.compiled = CompiledLayers(checkpoint_inside=bool(cfg.checkpoint_inside)) if compiling(cfg) else None
    if trainer.compiled:
        trainer.add_callback(trainer.compiled)
    trainer.loss_curve, trainer.rope_fix, trainer.fast_lora = curve, rope, fast
    return trainer
