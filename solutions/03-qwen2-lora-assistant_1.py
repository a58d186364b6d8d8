"""Notebook 03, exercise 1: one identity record edited to a new name.

The record keeps its question, the answer names the new assistant; the course appends and
trains <|im_end|> after it. To make the model use it, put it (and the other records that name the
old identity, edited the same way) in the data and train again.
"""

from selfllm_utils import exercises, models, registry

T = registry.get("qwen2")
tokenizer = models.load_tokenizer(models.model_path(T), T.family)
NAME = "不要葱姜蒜"
NEW_NAME = "小葱"
my_record = {"instruction": "你是谁？", "input": "",
             "output": "我是名为小葱的小助手，可以回答你的问题，也可以和你聊天。"}

RESULT = exercises.check_new_persona(tokenizer, T, my_record, NAME, NEW_NAME)
