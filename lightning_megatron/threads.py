"""CPU threads per rank, unless the user chose (``OMP_NUM_THREADS``): one per rank when the ranks compute on the CPU,
the node's cores shared out among its ranks when they drive GPUs.

Lightning sets threads only in the process that launches the others (its children, and ranks started by torchrun or
SLURM, keep torch's default of one thread per core), so N ranks on C cores ran N x C threads. OpenMP's spinning
barriers make that several times slower, and a busy machine does the same to a single rank. The tiny recipe on our
shared 2-core machine, one process: 3.5 steps/s with one thread and 0.9 with two when nothing else ran (load average
1), 2.6-2.9 and 0.34-0.57 at load average 7-9.
"""

from __future__ import annotations

import os

import torch

USER_THREADS = os.environ.get("OMP_NUM_THREADS")
"""The user's choice, read when the package is imported: Lightning's launcher sets the variable itself later."""


def cores_available() -> int:
    """Cores this process may run on (its CPU affinity, which containers and SLURM restrict)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_threads(local_ranks: int, device_type: str) -> int:
    """Intra-op threads for each of ``local_ranks`` ranks of a node computing on ``device_type``."""
    if device_type == "cpu":
        return 1
    return max(1, cores_available() // max(1, local_ranks))


def set_threads(local_ranks: int, device_type: str) -> int:
    """Apply :func:`default_threads` unless the user set ``OMP_NUM_THREADS``; returns the threads this rank uses."""
    if USER_THREADS is None:
        threads = default_threads(local_ranks, device_type)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # processes this rank starts (data workers) follow
    return torch.get_num_threads()
