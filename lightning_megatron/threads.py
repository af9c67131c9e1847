"""CPU threads per rank: the node's cores shared out among its ranks, unless the user chose (``OMP_NUM_THREADS``).

Lightning sets this only in the process that launches the others (its children, and ranks started by torchrun or
SLURM, keep torch's default of one thread per core), so N ranks on C cores ran N x C threads; with OpenMP's
spinning barriers that made CPU training several times slower, and far worse on a busy machine.
"""

from __future__ import annotations

import os

import torch


def cores_available() -> int:
    """Cores this process may run on (its CPU affinity, which containers and SLURM restrict)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def share_cores(local_ranks: int) -> int:
    """Give this rank ``cores / local_ranks`` intra-op threads (at least one) unless ``OMP_NUM_THREADS`` is set;
    returns the number of threads it uses."""
    if "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, cores_available() // max(1, local_ranks))
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # processes this rank starts (data workers) follow
    return torch.get_num_threads()
