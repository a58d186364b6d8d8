"""Notebook 03, exercise 2: Qwen2 chat answers end with <|im_end|>, not the base eos <|endoftext|>."""

from selfllm_utils import exercises, models, registry

T = registry.get("qwen2")
tokenizer = models.load_tokenizer(models.model_path(T), T.family)
END_TOKEN = "<|im_end|>"

RESULT = exercises.check_end_of_answer(tokenizer, T.family, END_TOKEN)
