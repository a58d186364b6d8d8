"""Notebook 01, exercise 2: the trainable LoRA parameters of DeepSeek-7B at another rank.

Each adapted projection (in -> out) gets A (r x in) and B (out x r): r * (in + out) parameters,
linear in r. So doubling r from the course's 8 to 16 doubles the count given at r=8.
"""

from selfllm_utils import exercises, memory, registry

T = registry.get("deepseek")
RANK = 16
PREDICTED = memory.lora_param_count(T, T.config.lora_r) * RANK // T.config.lora_r

RESULT = exercises.check_lora_rank(T, RANK, PREDICTED)
