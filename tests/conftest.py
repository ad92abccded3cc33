"""Suite-wide settings. The tiny test models are latency-bound: OpenMP thread wake-ups on a busy 2-core CI
box cost more than the math (measured: 7x slower with 2 threads under load), so every test process and
the subprocesses it starts use one thread per process."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
