"""selfllm_utils: the support package of the self-llm fine-tuning course.

Modules in reading order, each importing only those before it:
registry -> data -> smoke -> formatting -> models -> training -> inference -> webdemo -> cli.
Notebooks import modules, not names, so a call says where its code lives:
`from selfllm_utils import formatting; formatting.tokenize_messages(...)`.
"""

__all__ = ["registry", "data", "smoke", "formatting", "models", "training", "inference"]
