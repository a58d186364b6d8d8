"""selfllm_utils: the support package of the self-llm fine-tuning course.

Modules in reading order, each importing only those before it (tests/test_layering.py checks):
registry -> data -> smoke -> formatting -> models -> training -> memory -> inference ->
metrics -> evaluation -> distributed -> webdemo -> cli. Notebooks import modules, not names, so a
call says where its code lives: `from selfllm_utils import formatting; formatting.tokenize_messages(...)`.
"""

__all__ = ["registry", "data", "smoke", "formatting", "models", "training", "memory", "metrics",
           "inference", "evaluation", "distributed", "webdemo", "exercises"]
