"""The write-ahead spool and the asyncio Recorder in front of it (no store involved here)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from chaperone_sidecar.recording import Recorder
from chaperone_sidecar.recording.events import ChainChecker, new_event, split_lines
from chaperone_sidecar.recording.recovery import adopt
from chaperone_sidecar.recording.spool import RecorderMetrics, SessionSpool, SpoolConfig, SpoolUnavailable

REPO = Path(__file__).resolve().parents[3]


class FakeClock:
    """Deterministic event times: +1 ms per call."""

    def __init__(self) -> None:
        self.now = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        self.now += timedelta(milliseconds=1)
        return self.now


def run(coro):
    return asyncio.run(coro)


def spool_files(directory: Path, session: str) -> list[Path]:
    return sorted((directory / session).glob("seg-*"), key=lambda p: int(p.name[4:12]))


def spool_events(directory: Path, session: str) -> list[dict]:
    """All events in a session's spool, after checking the whole chain."""
    checker = ChainChecker(session)
    events = []
    for seg in spool_files(directory, session):
        lines, tail = split_lines(seg.read_bytes())
        assert tail == b"", f"{seg} has a torn tail"
        for number, line in enumerate(lines, 1):
            event, problems = checker.check_line(seg.name, number, line)
            assert problems == [], problems
            events.append(event)
    return events


def recorder(tmp_path: Path, **config) -> Recorder:
    return Recorder(SpoolConfig(tmp_path / "spool", **config), namespace="ns", pod="pod-1",
                    identity={"namespace": "ns", "pod": "pod-1", "creator": "alice"},
                    session="s1", clock=FakeClock())


def test_concurrent_appends_are_chained_in_order(tmp_path):
    async def main():
        rec = recorder(tmp_path)
        await rec.start({"mode": "explicit"})
        sealed = await asyncio.gather(*(rec.record("request", flow=f"f{i}", data={"i": i}) for i in range(500)))
        await rec.flush()
        return rec, sealed

    rec, sealed = run(main())
    assert [e["seq"] for e in sealed] == list(range(1, 501))  # gather keeps submission order
    events = spool_events(tmp_path / "spool", "s1")
    assert [e["type"] for e in events[:2]] == ["session-start", "request"]
    assert [e["data"].get("i") for e in events[1:]] == list(range(500))
    assert events[1]["identity"]["creator"] == "alice" and events[1]["time"].endswith("Z")
    assert rec.metrics.events_appended == 501
    assert rec.metrics.bytes_appended == sum(p.stat().st_size for p in spool_files(tmp_path / "spool", "s1"))


async def settled(rec, timeout: float = 10.0) -> None:
    """Wait until the writer did what it does after answering (a due group fsync, rotation)."""
    deadline = time.monotonic() + timeout
    while rec._spool.maintenance_due():
        assert time.monotonic() < deadline, "the writer never ran the due group fsync"
        await asyncio.sleep(0.005)


def test_group_fsync_every_n_events_and_flush_forces(tmp_path):
    async def main():
        rec = recorder(tmp_path, fsync_every=10, fsync_interval=60)
        await rec.start()
        for i in range(99):
            await rec.record("request", data={"i": i})
        await settled(rec)
        at_100 = rec.metrics.fsyncs
        for i in range(3):
            await rec.record("request", data={"i": i})
        await settled(rec)
        at_103 = rec.metrics.fsyncs
        await rec.flush()
        return at_100, at_103, rec.metrics.fsyncs

    # 100 events (session-start + 99): one fsync per 10, done by the writer after it answered
    # the appends; 3 more wait for their group until flush() forces it
    assert run(main()) == (10, 10, 11)


def test_group_fsync_after_interval(tmp_path):
    async def main():
        rec = recorder(tmp_path, fsync_every=1000, fsync_interval=0.05)
        await rec.start()
        for i in range(5):
            await rec.record("request", data={"i": i})
        immediately = rec.metrics.fsyncs
        await asyncio.sleep(0.3)
        later = rec.metrics.fsyncs
        await rec.record("request")
        assert await rec.flush() is True
        return immediately, later, rec.metrics.fsyncs

    assert run(main()) == (0, 1, 2)


def test_file_io_never_runs_on_the_event_loop_thread(tmp_path, monkeypatch):
    calls: list[tuple[str, int]] = []
    for name in ("write", "fdatasync", "fsync"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, _real=real, _name=name: (
            calls.append((_name, threading.get_ident())), _real(*a))[1])

    async def main():
        rec = recorder(tmp_path, fsync_every=4)
        await rec.start()
        await asyncio.gather(*(rec.record("request", data={"i": i}) for i in range(50)))
        await rec.flush()
        return threading.get_ident()

    loop_thread = run(main())
    names = {name for name, _ in calls}
    assert {"write", "fdatasync"} <= names
    assert all(ident != loop_thread for _, ident in calls)


def test_segments_rotate_by_size(tmp_path):
    async def main():
        rec = recorder(tmp_path, segment_bytes=2000)
        await rec.start()
        for i in range(60):
            await rec.record("request", data={"i": i, "pad": "x" * 100})
        big = await rec.record("response", data={"body": "y" * 5000})  # larger than a segment
        await rec.record("request", data={"after": True})
        await rec.flush()
        return big

    big = run(main())
    segments = spool_files(tmp_path / "spool", "s1")
    closed = [s for s in segments if s.suffix == ".jsonl"]
    assert len(closed) >= 5 and segments[-1].suffix == ".open"
    events = spool_events(tmp_path / "spool", "s1")
    assert len(events) == 63
    for seg in segments:
        first = json.loads(split_lines(seg.read_bytes())[0][0])
        assert seg.name == f"seg-{first['seq']:08d}{seg.suffix}"  # named after its first event
        lines = split_lines(seg.read_bytes())[0]
        assert seg.stat().st_size <= 2000 or len(lines) == 1
    assert any(seg.name.startswith(f"seg-{big['seq']:08d}") for seg in segments)


def test_segments_rotate_by_age(tmp_path):
    async def main():
        rec = recorder(tmp_path, segment_max_age=0.1)
        await rec.start()
        await rec.record("request")
        await asyncio.sleep(0.4)
        return spool_files(tmp_path / "spool", "s1")

    segments = run(main())
    assert [s.suffix for s in segments] == [".jsonl"]


def unwritable(tmp_path: Path) -> Path:
    """A spool path nobody can create, root included: its parent is a regular file."""
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    return blocker / "spool"


def test_strict_refuses_when_the_spool_cannot_be_written(tmp_path):
    async def main():
        rec = Recorder(SpoolConfig(unwritable(tmp_path), mode="strict"), namespace="ns", pod="p",
                       session="s1")
        with pytest.raises(SpoolUnavailable):
            await rec.start()
        with pytest.raises(SpoolUnavailable):
            await rec.record("request")
        with pytest.raises(SpoolUnavailable):
            await rec.flush()
        return rec

    rec = run(main())
    assert rec.metrics.events_dropped == 2 and not rec.healthy


def test_best_effort_reports_and_continues(tmp_path):
    async def main():
        rec = Recorder(SpoolConfig(unwritable(tmp_path), mode="best-effort"), namespace="ns",
                       pod="p", session="s1")
        await rec.start()
        results = [await rec.record("request", data={"i": i}) for i in range(3)]
        flushed = await rec.flush()
        closed = await rec.close()
        return rec, results, flushed, closed

    rec, results, flushed, closed = run(main())
    assert results == [None, None, None] and flushed is False and closed is False
    assert rec.metrics.events_dropped == 5  # session-start, 3 requests, session-end
    kinds = [e["kind"] for e in rec.errors]
    assert "recovery-failed" in kinds and "spool-unavailable" in kinds  # both reported, no raise
    assert any("not writable" in e["message"] for e in rec.errors)


@pytest.mark.parametrize("mode", ["strict", "best-effort"])
def test_size_cap_refuses_or_drops(tmp_path, mode):
    async def main():
        rec = recorder(tmp_path, mode=mode, max_spool_bytes=4000, segment_bytes=1000)
        await rec.start()
        outcomes = []
        for i in range(40):
            try:
                outcomes.append(await rec.record("request", data={"i": i, "pad": "p" * 100}) is not None)
            except SpoolUnavailable as exc:
                assert "cap" in str(exc)
                outcomes.append(False)
        return rec, outcomes

    rec, outcomes = run(main())
    assert outcomes[0] and not outcomes[-1] and outcomes.count(True) < 40
    assert rec.metrics.events_dropped == outcomes.count(False)
    assert sum(p.stat().st_size for p in spool_files(tmp_path / "spool", "s1")) <= 4000
    spool_events(tmp_path / "spool", "s1")  # what is on disk still chains


DISK_FULL_WRITER = textwrap.dedent('''
    import asyncio, json, resource, signal, sys
    from chaperone_sidecar.recording import Recorder
    from chaperone_sidecar.recording.spool import SpoolConfig, SpoolUnavailable
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # make the kernel return EFBIG instead
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    async def main(directory, mode):
        rec = Recorder(SpoolConfig(directory, mode=mode, segment_bytes=1 << 30, fsync_every=8),
                       namespace="ns", pod="p", session="s1")
        await rec.start()
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, hard))  # a disk that fills up
        outcomes = []
        for i in range(80):
            try:
                ok = await rec.record("request", data={"i": i, "pad": "x" * 300}) is not None
            except SpoolUnavailable:
                ok = False
            outcomes.append(ok)
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space is back
        after = await rec.record("request", data={"i": "after"})
        await rec.flush()
        print(json.dumps({"outcomes": outcomes, "after": after is not None,
                          "dropped": rec.metrics.events_dropped, "errors": rec.errors}))

    asyncio.run(main(sys.argv[1], sys.argv[2]))
''')


@pytest.mark.parametrize("mode", ["strict", "best-effort"])
def test_disk_full_mid_session_keeps_the_chain_and_records_the_gap(tmp_path, mode):
    """A real kernel write failure (RLIMIT_FSIZE -> EFBIG, partial writes included), in a child
    process so the limit cannot hit pytest itself. Root cannot bypass it, unlike chmod."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(REPO / d) for d in ("sidecar", "testbed")))
    out = subprocess.run([sys.executable, "-c", DISK_FULL_WRITER, str(tmp_path / "spool"), mode],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    ok = result["outcomes"]
    assert ok[0] and not ok[-1] and result["after"]
    assert ok == sorted(ok, reverse=True)  # once full, every later write fails until space returns
    assert result["dropped"] == ok.count(False)
    assert any("File too large" in e["message"] for e in result["errors"])
    events = spool_events(tmp_path / "spool", "s1")
    written = [e["data"]["i"] for e in events if e["type"] == "request"]
    assert written == [i for i, good in enumerate(ok) if good] + ["after"]
    gap = [e for e in events if e["type"] == "error"]
    assert len(gap) == 1 and gap[0]["data"]["droppedEvents"] == ok.count(False)
    assert gap[0]["data"]["kind"] == "spool-unavailable"


# ---- recovery of a crashed writer's spool (recovery.adopt) ----------------------------------

def crashed_session(tmp_path: Path, events: int, **config) -> tuple[SpoolConfig, SessionSpool]:
    """A session written with the sync API and abandoned without finish() (a crash)."""
    cfg = SpoolConfig(tmp_path / "spool", **config)
    spool = SessionSpool(cfg, "crashed", {"session": "crashed", "namespace": "ns", "pod": "p",
                                          "identity": {"creator": "alice"}}, RecorderMetrics(), FakeClock())
    batch = []
    for i in range(events):
        event = new_event("request", data={"i": i})
        event["time"] = "2025-01-01T00:00:00.000000Z"
        batch.append(event)
    assert all(isinstance(r, dict) for r in spool.write(batch))
    spool.release()  # the process died: its flock is gone, files stay
    return cfg, spool


def test_adopt_cuts_a_torn_tail_and_closes_the_session(tmp_path):
    cfg, _ = crashed_session(tmp_path, 20, segment_bytes=1000)
    segments = spool_files(cfg.directory, "crashed")
    assert segments[-1].suffix == ".open"
    with open(segments[-1], "ab") as f:
        f.write(b'{"data":{"i":20},"hash":"ab')  # the write the crash interrupted
    metrics = RecorderMetrics()
    adopted = adopt(cfg, "crashed", metrics, FakeClock())
    assert adopted is not None and adopted.recovered["tornBytes"] == 27
    assert adopted.recovered["problems"] == []
    assert metrics.torn_tails == 1 and adopted.ended["reason"] == "recovered"
    events = spool_events(cfg.directory, "crashed")
    assert [e["data"]["i"] for e in events[:20]] == list(range(20))
    assert [e["type"] for e in events[20:]] == ["error", "session-end"]
    assert events[20]["data"]["kind"] == "unclean-shutdown" and events[20]["data"]["tornBytes"] == 27
    assert events[21]["identity"] == {"creator": "alice"}
    assert all(s.suffix == ".jsonl" for s in spool_files(cfg.directory, "crashed"))
    adopted.release()


def test_adopt_skips_a_live_session(tmp_path):
    cfg = SpoolConfig(tmp_path / "spool")
    live = SessionSpool(cfg, "live", {"session": "live"}, RecorderMetrics(), FakeClock())
    live.write([new_event("request")])
    assert adopt(cfg, "live", RecorderMetrics(), FakeClock()) is None
    live.release()
    assert adopt(cfg, "live", RecorderMetrics(), FakeClock()) is not None


def test_adopt_after_a_crash_inside_finish_adds_nothing(tmp_path):
    cfg, spool = crashed_session(tmp_path, 3)
    spool._ensure_dir()
    end = new_event("session-end", data={"reason": "closed"})
    end["time"] = "2025-01-01T00:00:01.000000Z"
    spool.write([end])
    spool.release()  # died after writing session-end, before ended.json
    adopted = adopt(cfg, "crashed", RecorderMetrics(), FakeClock())
    assert adopted.ended["reason"] == "closed"
    assert [e["type"] for e in spool_events(cfg.directory, "crashed")][-1] == "session-end"
    assert len(spool_events(cfg.directory, "crashed")) == 4


def test_adopt_removes_segments_confirmed_before_the_crash(tmp_path):
    cfg, spool = crashed_session(tmp_path, 10, segment_bytes=600)
    spool._ensure_dir()
    first = spool.closed_segments()[0]
    lines = split_lines(first.read_bytes())[0]
    last = json.loads(lines[-1])
    with open(cfg.directory / "crashed" / "shipped.jsonl", "wb") as f:  # confirmed, not yet deleted
        f.write(json.dumps({"key": "k", "bytes": len(first.read_bytes()), "lastSeq": last["seq"],
                            "lastHash": last["hash"]}).encode() + b"\n")
    spool.release()
    adopted = adopt(cfg, "crashed", RecorderMetrics(), FakeClock())
    assert not first.exists() and adopted.recovered["problems"] == []
    adopted.release()


def test_adopt_removes_an_empty_leftover(tmp_path):
    cfg = SpoolConfig(tmp_path / "spool")
    (cfg.directory / "empty").mkdir(parents=True)
    assert adopt(cfg, "empty", RecorderMetrics(), FakeClock()) is None
    assert not (cfg.directory / "empty").exists()


def test_close_does_not_wait_for_a_session_that_cannot_finish(tmp_path):
    from chaperone_sidecar.recording.shipper import DirStore

    async def main():
        rec = Recorder(SpoolConfig(unwritable(tmp_path)), namespace="ns", pod="p", session="s1",
                       store=DirStore(tmp_path / "out"))
        with pytest.raises(SpoolUnavailable):
            await rec.start()
        started = asyncio.get_running_loop().time()
        shipped = await rec.close(timeout=30)
        return shipped, asyncio.get_running_loop().time() - started

    shipped, took = run(main())
    assert shipped is False and took < 5


def test_misuse_is_refused_without_breaking_the_chain(tmp_path):
    async def main():
        rec = recorder(tmp_path)
        with pytest.raises(RuntimeError, match="start"):
            await rec.record("request")
        await rec.start()
        with pytest.raises(ValueError, match="unknown event type"):
            await rec.append({"type": "bogus"})
        with pytest.raises(ValueError, match="canonical-JSON"):
            await rec.record("request", data={"t": float("nan")})
        await rec.record("request", data={"fine": True})
        await rec.flush()
        assert await rec.close() is False  # no store: stays in the spool
        with pytest.raises(RuntimeError):
            await rec.record("request")

    run(main())
    events = spool_events(tmp_path / "spool", "s1")
    assert [e["type"] for e in events] == ["session-start", "request", "session-end"]
    assert (tmp_path / "spool" / "s1" / "ended.json").exists()
