"""Notebook 04, exercise 3: the plan the course picks for 8 cards of 16 GB.

Ask distributed.choose_plan for that machine and read its name and reason.
"""

from selfllm_utils import distributed, exercises, registry

T = registry.get("qwen1.5")
plan = distributed.choose_plan(T, T.config, gpu_gib=16, num_gpus=8)
print(plan)
MY_PLAN = plan.name

RESULT = exercises.check_plan_for_cards(T, MY_PLAN)
