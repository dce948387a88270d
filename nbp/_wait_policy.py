"""How idle OpenMP threads wait, chosen before torch loads libgomp (torch-free on purpose).

libgomp reads its wait policy once, when torch loads it. Its default (threads
spin for a long while after each parallel region) takes a shared core from the
thread that still has work: on a busy 2-core machine 2 threads were hundreds of
times slower than 1. Sleeping waits (``OMP_WAIT_POLICY=PASSIVE``) survive a
busy machine, but on a quiet one every parallel region then pays a thread
wake-up, and a decode step runs ~35 of them. So: a short spin where the cores
are idle when nbp is imported (fewer other runnable tasks than half the
cores, counted until the count settles: a pipe's other end starting with us
once made a quiet machine look busy, and sleeping waits cost a C-driven int8
decode step 1.6x), sleeping waits where they are not. An explicit
``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is kept.

The spin is 3000 rounds of ``pause``, about 0.04 ms here: enough to bridge the
C-driven decode step's gaps (one ``DecodeProgram`` call per step: its kernels
follow each other in C) and the sampler after it. A K600 NBP generation at 2
threads took 0.46-0.49 s with it, 0.46-0.50 s with 10000 rounds and 0.57 s with
sleeping waits (benchmarks/results/cpu_threads_k600_*.json). 10000 rounds was the
default while the step was driven from Python (20-80 us between kernels), at a
price paid when load arrives after the choice was made: a K600-like step under
one busy loop took 30 ms against 22 ms with 3000 rounds or sleeping waits
(benchmarks/results/cpu_threads_under_load_*_spin10k.json).
"""
from __future__ import annotations

import os

SPIN_COUNT = "3000"


def wait_policy_for(busy: float | None, cores: int) -> dict[str, str]:
    """The environment to set for a machine where ``busy`` other tasks run (None: unknown)
    on ``cores`` cores: a short spin when they take under half the cores."""
    if busy is not None and busy < cores / 2:
        return {"GOMP_SPINCOUNT": SPIN_COUNT}
    return {"OMP_WAIT_POLICY": "PASSIVE"}


def other_runnable() -> float | None:
    """Tasks other than this one that are runnable now (Linux: /proc/loadavg's running
    count minus this process), else the 1-minute load average, else None. The count is
    taken now, not averaged: a 1-minute average still holds the user's previous command."""
    try:
        with open("/proc/loadavg") as f:
            return max(0, int(f.read().split()[3].split("/")[0]) - 1)
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def settled_runnable(read=other_runnable, reads: int = 16, interval: float = 0.01) -> float | None:
    """``read()`` (other runnable tasks), read again up to ``reads`` times ``interval`` seconds
    apart while it counts any, keeping the smallest count: a process that is only starting
    (the other end of a pipe, ``nbp ... | python filter.py``: a Python start took ~120 ms
    here) is runnable for a while, a busy one stays runnable. An idle machine pays one
    read; a busy one ~0.16 s, once, at import."""
    import time

    busy = read()
    for _ in range(reads - 1):
        if not busy:
            break
        time.sleep(interval)
        again = read()
        busy = busy if again is None else min(busy, again)
    return busy


# (other runnable tasks, cores, what was set) of the choice made at import; None when the
# user set one.
CHOICE: tuple[float | None, int, dict[str, str]] | None = None


def choose_wait_policy() -> dict[str, str]:
    """Set the wait policy in ``os.environ`` unless the user set one; returns what was set."""
    global CHOICE
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return {}
    busy, cores = settled_runnable(), os.cpu_count() or 1
    chosen = wait_policy_for(busy, cores)
    os.environ.update(chosen)
    CHOICE = (busy, cores, chosen)
    return chosen
