"""This process's share of the machine. `-j N` checks N models at once, one per worker process: each worker
takes 1/N of the automatic memory budget (budget.py) and of the CPU cores for onnxruntime's operator threads,
so that N probes together stay within what one takes alone (onnxruntime's default gives every session all
the cores, and N sessions on them slowed each other down: docs/architecture.md has the numbers).

Standard library only; set once in each worker (many.py).
"""

from __future__ import annotations

import os

#: processes checking models at once, this one included (set_workers)
_workers = [1]


def set_workers(count: int) -> None:
    _workers[0] = max(1, count)


def workers() -> int:
    return _workers[0]


def runtime_threads() -> int:
    """Threads for one onnxruntime session's operators (``SessionOptions.intra_op_num_threads``): 0,
    onnxruntime's default of one per core, in a process alone; else the cores this process may run on, divided
    among the workers."""
    if workers() <= 1:
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // workers())
