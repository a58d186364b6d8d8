"""Notebook 02, exercise 1: the token GLM-4 writes after an answer in the middle of a chat.

GLM-4's template writes no end token after an answer: the next role token follows. When the
user speaks next, that is <|user|>; only the last answer of a text ends with <|endoftext|>.
"""

from selfllm_utils import exercises, models, registry

T = registry.get("glm4")
tokenizer = models.load_tokenizer(models.model_path(T), T.family)
MID_STOP = "<|user|>"

RESULT = exercises.check_glm4_mid_stop(tokenizer, T.family, MID_STOP)
