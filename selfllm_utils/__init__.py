"""selfllm_utils: the support package of the self-llm fine-tuning course.

Modules in reading order, each importing only those before it (tests/test_layering.py checks):
registry -> quiet -> data -> smoke -> formatting -> cache -> models -> records -> training ->
checkpoints -> memory -> inference -> metrics -> evaluation -> distributed -> webdemo -> deploy -> cli.
Notebooks import modules, not names, so a call says where its code lives:
`from selfllm_utils import formatting; formatting.tokenize_messages(...)`.
"""

__all__ = ["registry", "data", "smoke", "formatting", "models", "records", "training", "memory",
           "metrics", "inference", "evaluation", "distributed", "webdemo", "deploy", "exercises"]

from . import quiet as _quiet

_quiet.known_noise()  # the libraries' known harmless warnings, hidden once (quiet.py says why)
