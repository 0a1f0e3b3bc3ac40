"""Helper threads yield to the event loop: waking one never preempts the loop (issue 16).

The proxy's event loop shares its CPU with a few helper threads that it hands work to: the
spool writer (every recorded event), the masking pool (bodies of 64 KiB and more), the loop's
default executor (the shipper's disk work, ``asyncio.to_thread``) and the OCSF exporter. Each
hand-off wakes one, and Linux lets a freshly woken thread preempt the running one: under 1 MiB
load on one CPU the loop was preempted 3.3 times per request (0.8 without recording), the
spool writer woke 2.5 times per request to write ~1 event each, and the loop came back to
colder caches every time.

A thread under ``SCHED_BATCH`` is never run over the current thread on wakeup (the kernel's
fair class skips wakeup preemption for it); it runs when the loop waits for I/O or at the end
of the loop's time slice, with the same weight (CPU share) as before - it is not starved, and
what is handed over meanwhile joins its batch. Nothing waits longer when the loop is idle: a
flow waiting for its recorded event leaves the loop in ``epoll_wait``, and the writer runs at
once. Measured (bench/analysis.md "Session 16"): the loop's preemptions per 1 MiB request
3.3 -> 1.1, the writer's wake-ups 2.5 -> 1.3 per request; CPU per request alternating with the
session's start (bench/ab.py, 5 rounds) 1 MiB text 4,449 -> 4,311 us and 1 KiB 1,119 -> 975;
a second rotation (3 rounds each) 1 MiB 3,768 -> 3,588, 1 KiB 866 -> 870 (no change). Latency
in that rotation: 1 KiB unchanged (p99 at concurrency 1 2.40 vs 2.56 ms, at 32 38.6 vs 38.7);
1 MiB at concurrency 32 unchanged (p99 139 vs 141 ms), at concurrency 1 p99 9.99 -> 12.5 ms (a
helper now runs when the loop waits, and the loop, woken meanwhile, may wait for the GIL).

``SCHED_BATCH`` needs no privilege (only the real-time policies do). Where the platform has
no such policy (not Linux) or a seccomp profile refuses the call, the thread keeps the default
policy and the proxy works as before: :func:`yield_to_event_loop` says which happened.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

__all__ = ["yield_to_event_loop", "executor"]

log = logging.getLogger("chaperone.runtime")

def yield_to_event_loop() -> bool:
    """Put the calling thread under ``SCHED_BATCH``; False where the platform refused it."""
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None or not hasattr(os, "sched_setscheduler"):
        return False
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))  # 0: the calling thread (Linux)
    except OSError as exc:
        log.debug("helper thread keeps the default scheduling policy: %s", exc)
        return False
    return True


def executor(name: str, max_workers: int | None = None) -> ThreadPoolExecutor:
    """A thread pool whose threads :func:`yield_to_event_loop` as they start (``max_workers``
    None: concurrent.futures' default, what asyncio's own default executor has)."""
    return ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=name,
                              initializer=yield_to_event_loop)
