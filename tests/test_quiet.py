"""The libraries' known harmless messages are hidden once the package is imported; others still show."""

from __future__ import annotations

import subprocess
import sys

from selfllm_utils import quiet

# In a fresh interpreter with Python's default warning filters (pytest installs its own): the real
# DeepSpeed import (on a machine without a GPU it logs the accelerator line), then one message of
# each kind the course hides, and one FutureWarning it must not hide.
SCRIPT = '''
import logging, warnings
import selfllm_utils
import deepspeed
warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use `torch.distributed.all_gather_single` instead.", FutureWarning)
warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
    "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already `pip install kernels`", "offline")
logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
warnings.warn("an unknown future change", FutureWarning)
'''


def test_known_noise_is_hidden_and_the_rest_shows() -> None:
    run = subprocess.run([sys.executable, "-W", "default", "-c", SCRIPT], capture_output=True,
                         text=True, timeout=300, check=True)
    shown = run.stdout + run.stderr
    hidden_messages = ("unable to detect it", "all_gather_into_tensor", "is_gradient_checkpointing",
                       "pip install kernels")
    for hidden in hidden_messages:
        assert hidden not in shown, f"{hidden!r} still shown:\n{shown}"
    assert "an unknown future change" in shown  # only the known messages are hidden


def test_known_noise_twice_adds_one_filter() -> None:
    import logging

    quiet.known_noise()
    quiet.known_noise()
    filters = [f for f in logging.getLogger("DeepSpeed").filters if isinstance(f, quiet._DropLines)]
    assert len(filters) == 1
