"""Worker threads shared by the simulator and the dataset writers (numpy, zlib and file writes release the GIL)."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def default_workers(workers: int | None) -> int:
    """``workers`` as a thread count >= 1; None: up to 4, the CPU count."""
    return min(4, os.cpu_count() or 1) if workers is None else max(1, int(workers))


def run_parallel(pool: ThreadPoolExecutor | None, k: int, fn, m: int) -> None:
    """fn(j) for j in range(m), split into contiguous slices over the pool's threads (PIL encoding and file
    writes release the GIL)."""
    if pool is None or m < 8:
        for j in range(m):
            fn(j)
        return
    bounds = np.linspace(0, m, k + 1).astype(int)

    def run(a_b):
        for j in range(a_b[0], a_b[1]):
            fn(j)

    list(pool.map(run, zip(bounds[:-1], bounds[1:])))
