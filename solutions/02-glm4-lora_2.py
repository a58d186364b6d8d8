"""Notebook 02, exercise 2: a three-answer record; mid answers end in <|user|>, the last in the end.

Earlier turns go into "history" as [user, assistant] pairs; every answer is trained.
"""

from selfllm_utils import exercises, models, registry

T = registry.get("glm4")
tokenizer = models.load_tokenizer(models.model_path(T), T.family)
my_dialogue = {
    "instruction": "那你可愿意入宫？",
    "input": "",
    "output": "臣女但凭天意。",
    "history": [["你是谁？", "家父是大理寺少卿甄远道。"], ["你今年几岁？", "臣女今年十七。"]],
}

RESULT = exercises.check_glm4_targets(tokenizer, T, my_dialogue)
