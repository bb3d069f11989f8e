"""`make test` runs the suite in two pytest-xdist workers (one test file each at a time: --dist
loadfile). Each worker gets one torch thread, and so do the command-line subprocesses its tests start:
two workers of two threads each would oversubscribe a 2-core runner and spin-wait on it."""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):  # set by xdist before it reads this file
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
