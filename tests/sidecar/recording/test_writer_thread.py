"""The recorder's one writer thread (issue 16): fed by a queue, no executor hop per batch.

What it must keep: an append returns only once its line is in the segment file (strict
recording's write-ahead guarantee), concurrent appends share one ``write()``, a cancelled
caller's events are still written and nothing hangs, the thread ends with ``close()``, and
the spool's deadlines (group fsync, age rotation) run without any append to wake it.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

from chaperone_sidecar.recording import Recorder
from chaperone_sidecar.recording.spool import SpoolConfig


def recorder(tmp_path: Path, **config) -> Recorder:
    return Recorder(SpoolConfig(tmp_path / "spool", **config), namespace="ns", pod="pod-1", session="s1")


def segment_bytes(tmp_path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted((tmp_path / "spool" / "s1").glob("seg-*")))


def test_one_dedicated_thread_writes_everything_and_ends_with_close(tmp_path, monkeypatch):
    writers: list[str] = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: (writers.append(threading.current_thread().name),
                                                       real_write(fd, data))[1])

    async def main():
        rec = recorder(tmp_path)
        await rec.start()
        before = set(threading.enumerate())
        await asyncio.gather(*(rec.record("request", data={"i": i}) for i in range(200)))
        for i in range(20):  # sequential appends: each its own batch
            await rec.record("response", data={"i": i})
        spawned = {t.name for t in set(threading.enumerate()) - before}
        writer = rec._writer
        await rec.close()
        return writer, spawned

    writer, spawned = asyncio.run(main())
    assert writer is not None and writer.name == "chaperone-spool" and not writer.is_alive()
    assert not {n for n in spawned if n.startswith("chaperone")}  # no executor spun up per batch
    assert set(writers) == {"chaperone-spool"}
    assert len(writers) < 200  # concurrent appends shared writes


def test_an_append_returns_only_once_its_line_is_in_the_file(tmp_path):
    async def main():
        rec = recorder(tmp_path)
        await rec.start()
        seen = []
        for i in range(30):
            sealed = await rec.record("request", data={"marker": f"m-{i}-end"})
            seen.append(f'"m-{i}-end"'.encode() in segment_bytes(tmp_path) and sealed["seq"] == i + 1)
        many = await rec.append_many([{"type": "request", "data": {"k": "many-a"}},
                                      {"type": "bogus"},  # refused alone, the others written
                                      {"type": "request", "data": {"k": "many-b"}}])
        data = segment_bytes(tmp_path)
        await rec.close()
        return seen, many, data

    seen, many, data = asyncio.run(main())
    assert all(seen)
    assert isinstance(many[0], dict) and isinstance(many[1], ValueError) and isinstance(many[2], dict)
    assert many[2]["seq"] == many[0]["seq"] + 1 and b"many-a" in data and b"many-b" in data


def test_a_cancelled_append_is_still_written_and_nothing_hangs(tmp_path):
    async def main():
        rec = recorder(tmp_path)
        await rec.start()
        tasks = [asyncio.create_task(rec.record("request", data={"c": i})) for i in range(50)]
        await asyncio.sleep(0)
        for task in tasks[::2]:
            task.cancel()
        done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        after = await asyncio.wait_for(rec.record("request", data={"c": "after"}), 5)
        assert await asyncio.wait_for(rec.close(), 10) is False  # no store: not shipped
        return done, after

    done, after = asyncio.run(main())
    assert sum(isinstance(r, asyncio.CancelledError) for r in done) >= 1
    data = segment_bytes(tmp_path)
    assert all(f'"c":{i}'.encode() in data for i in range(50))  # cancelled or not: written
    assert after["seq"] == 51


def test_deadlines_run_without_appends(tmp_path):
    """Nothing appended after the first events: the thread itself wakes for the group fsync
    (50 ms) and the age rotation."""
    async def main():
        rec = recorder(tmp_path, fsync_interval=0.05, segment_max_age=0.2)
        await rec.start()
        await rec.record("request")
        await asyncio.sleep(0.6)
        fsyncs, closed = rec.metrics.fsyncs, rec.metrics.segments_closed
        await rec.close()
        return fsyncs, closed

    fsyncs, closed = asyncio.run(main())
    assert fsyncs >= 1 and closed == 1
    assert list((tmp_path / "spool" / "s1").glob("seg-*.jsonl"))


def test_the_writer_thread_yields_to_the_event_loop(tmp_path):
    # SCHED_BATCH (helper_threads): a hand-off wakes it without preempting the loop.
    async def main():
        rec = recorder(tmp_path)
        await rec.start()
        try:
            await rec.record("request", data={})
            return os.sched_getscheduler(rec._writer.native_id), os.sched_getscheduler(0)
        finally:
            await rec.close()

    assert asyncio.run(main()) == (os.SCHED_BATCH, os.SCHED_OTHER)
