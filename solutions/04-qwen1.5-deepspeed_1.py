"""Notebook 04, exercise 1: a ZeRO-3 memory row for Qwen1.5-14B on 4 GPUs.

ZeRO-3 keeps a quarter of the bf16 weights on each GPU (plus the layer being computed); the
answer to "does it fit 24 GB?" is read from the row's total, not guessed.
"""

from selfllm_utils import exercises, memory, registry

T = registry.get("qwen1.5")
MY_ESTIMATE = memory.estimate_memory(T, zero_stage=3, num_gpus=4)
print(MY_ESTIMATE)
FITS_24GB = MY_ESTIMATE.total_gib <= 24

RESULT = exercises.check_zero3_row(T, MY_ESTIMATE, FITS_24GB)
