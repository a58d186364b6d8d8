"""The libraries' known, harmless messages, silenced in one place, each with the reason it is harmless.

A learner cannot tell noise from trouble, so a warning the course knows to be harmless is hidden
here, by its exact message, through the library's own channel (its logger, or a `warnings`
filter); everything else still shows. `selfllm_utils/__init__.py` calls `known_noise()` once,
so notebooks, the CLI and the training subprocesses of notebook 04 are all covered.
"""

from __future__ import annotations

import logging
import warnings

# (category, message regex): Python warnings, shown in notebooks and in every training process
WARNINGS = (
    # DeepSpeed 0.19 calls the old names of two torch.distributed collectives on every ZeRO-3
    # step; torch 2.13 still runs them (notebook 04's log had ~150 copies of these two lines)
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),
    (FutureWarning, r"`torch\.distributed\.reduce_scatter_tensor` is deprecated"),
    # peft 0.21 asks the model for the old property name; transformers 5 answers it correctly
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    # smoke mode on a CPU: the Trainer asks for pinned memory, which only a GPU would use
    (UserWarning, r"'pin_memory' argument is set as true but no accelerator is found"),
)
# (logger name, message start): log records of the libraries' own loggers
LOG_LINES = (
    # DeepSpeed on a machine without a GPU (smoke mode): CPU is the right choice there
    ("DeepSpeed", "Setting accelerator to CPU. If you have GPU or other accelerator"),
    # bitsandbytes on a CPU with AVX512-BF16 looks for an optional faster 4-bit CPU kernel on the
    # Hub (offline: never found) and falls back to its own; only smoke mode runs 4-bit on a CPU
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
)


class _DropLines(logging.Filter):
    """Drops a logger's records whose message starts with one of the known harmless lines."""

    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def known_noise() -> None:
    """Hide the messages above (and only those). Safe to call more than once.

    A filter on the logger itself, not a level: the libraries reset their loggers' levels when
    they configure them, but keep its filters.
    """
    for category, message in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in {name for name, _ in LOG_LINES}:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) for f in logger.filters):
            logger.addFilter(_DropLines(tuple(start for n, start in LOG_LINES if n == name)))
