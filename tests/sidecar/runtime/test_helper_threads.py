"""helper_threads: the threads the event loop hands work to run under SCHED_BATCH (they never
preempt the loop on wakeup); the loop itself, and any thread that did not ask, keep the default
policy; a platform that refuses the policy leaves the thread as it was, without an error."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from chaperone_sidecar import helper_threads
from chaperone_sidecar.proxy import event_loop_factory


def in_thread(fn):
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def test_the_calling_thread_and_only_it_yields_to_the_event_loop():
    def run():
        assert os.sched_getscheduler(0) == os.SCHED_OTHER
        return helper_threads.yield_to_event_loop(), os.sched_getscheduler(0)

    assert in_thread(run) == (True, os.SCHED_BATCH)
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the test's own (main) thread untouched


def test_executor_threads_yield_to_the_event_loop():
    pool = helper_threads.executor("test-helpers", 2)
    try:
        policies = {pool.submit(os.sched_getscheduler, 0).result() for _ in range(8)}
        names = {pool.submit(lambda: threading.current_thread().name).result() for _ in range(8)}
    finally:
        pool.shutdown()
    assert policies == {os.SCHED_BATCH}
    assert all(n.startswith("test-helpers") for n in names)


def test_a_refused_policy_leaves_the_thread_as_it_was(monkeypatch):
    def refuse(pid, policy, param):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    assert in_thread(lambda: (helper_threads.yield_to_event_loop(), os.sched_getscheduler(0))) == \
        (False, os.SCHED_OTHER)
    monkeypatch.delattr(os, "SCHED_BATCH")
    assert in_thread(helper_threads.yield_to_event_loop) is False


@pytest.mark.parametrize("choice", ["auto", "asyncio"])
def test_the_proxy_loops_default_executor_yields_to_it(choice):
    factory, _ = event_loop_factory(choice)

    async def main():
        loop_thread = os.sched_getscheduler(0)
        return loop_thread, await asyncio.to_thread(os.sched_getscheduler, 0), \
            await asyncio.get_running_loop().run_in_executor(None, lambda: threading.current_thread().name)

    with asyncio.Runner(loop_factory=factory) as runner:
        loop_policy, helper_policy, name = runner.run(main())
    assert loop_policy == os.SCHED_OTHER and helper_policy == os.SCHED_BATCH
    assert name.startswith("chaperone-io")
