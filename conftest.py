"""Settings for every test session, the package tests and the notebooks (nbval) alike."""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one PyTorch thread each. With the default (a thread per core)
    # four threads fight over two cores and the CPU runs slower, not faster. nbval's kernels
    # start from this environment, so the notebooks get the setting too.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
