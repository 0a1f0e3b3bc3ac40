"""The spool device full while the store is down (issue 11, item 10), on a real small tmpfs.

The deadlock this guards against: with no free page left, confirming a shipped chunk needed a
new block (the append to ``shipped.jsonl``) *before* its segment was deleted, so nothing was
ever freed and strict mode refused all traffic until a restart. Here the kernel's own ENOSPC
(a tmpfs of a few hundred KiB), a store that is down and then back, and the recorder must heal
without a restart, losing nothing it accepted.

The store is a :class:`DirStore` (on the test's ordinary disk) with an outage switch: the
integration test (``tests/sidecar/integration/test_disk_full.py``) does the same against the
real S3 server and the sidecar process. Crash safety (SIGKILL between the upload and the
delete, and inside the disk-full fallback) is checked with child processes killed at exactly
those points.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from chaperone_sidecar.recording import Recorder
from chaperone_sidecar.recording.events import new_event
from chaperone_sidecar.recording.manifest import key_from_bytes
from chaperone_sidecar.recording.reader import SessionRef, list_sessions, load_session, verify_session
from chaperone_sidecar.recording.shipper import DirStore, ShipperConfig
from chaperone_sidecar.recording.spool import RecorderMetrics, SessionSpool, SpoolConfig, SpoolUnavailable

REPO = Path(__file__).resolve().parents[3]
KEY = key_from_bytes(b"recording-test-hmac-secret-0123456789")
FAST = ShipperConfig(backoff_base=0.05, backoff_max=0.3, poll_interval=0.05)


class FlakyStore(DirStore):
    """A directory store that can be "down" (every call fails, as an unreachable S3 does)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "store unreachable")

    def put(self, key, data, **kwargs):
        self._check()
        return super().put(key, data, **kwargs)

    def head(self, key):
        self._check()
        return super().head(key)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


async def fill(rec: Recorder, accepted: list) -> int:
    """Append until the tmpfs is full: big events first, then small ones until every page is
    taken (a refused big write leaves pages a small one still fits in). Returns refusals."""
    refused, i = 0, len(accepted)
    for pad, stop_after in ((3000, 3), (0, 20)):
        streak = 0
        while streak < stop_after:
            try:
                await rec.record("request", data={"i": i, "pad": "x" * pad})
                accepted.append(i)
                streak = 0
            except SpoolUnavailable:
                refused += 1
                streak += 1
            i += 1
            assert i < 100_000, "the tmpfs never filled"
    return refused


def test_full_spool_recovers_by_itself_once_the_store_is_back(small_tmpfs, tmp_path):
    spool_dir = small_tmpfs("256k")
    store = FlakyStore(tmp_path / "store")
    store.down = True

    async def main():
        rec = Recorder(SpoolConfig(spool_dir, segment_bytes=16_000, segment_max_age=0.2),
                       namespace="ns", pod="pod-1", session="s1", store=store, shipping=FAST,
                       key=KEY)
        await rec.start()
        accepted: list = []
        refused = await fill(rec, accepted)
        await asyncio.sleep(0.5)  # age rotation closes the open segment; the store is still down
        try:
            await rec.record("request", data={"i": "still-full"})
            still_full = False
        except SpoolUnavailable:
            still_full = True
        full = free_bytes(spool_dir)
        errors = list(rec.errors)
        store.down = False  # S3 is back: the recorder must free space and accept traffic again
        deadline, back = time.monotonic() + 20, None
        while time.monotonic() < deadline:
            try:
                await rec.record("request", data={"i": "back"})
                back = time.monotonic()
                break
            except SpoolUnavailable:
                await asyncio.sleep(0.05)
        recovered_in = None if back is None else back - (deadline - 20)
        # and keeps accepting, as the backlog drains: 200 more, each retried (as an agent
        # retries a 503) while the rest of the backlog is still on its way out
        deadline = time.monotonic() + 30
        for n in range(200 if back else 0):
            while True:
                try:
                    await rec.record("request", data={"i": f"after-{n}", "pad": "y" * 500})
                    break
                except SpoolUnavailable:
                    assert time.monotonic() < deadline, "the spool filled up again for good"
                    await asyncio.sleep(0.05)
        shipped = await rec.close(timeout=30)
        return rec, accepted, refused, still_full, full, errors, recovered_in, shipped

    rec, accepted, refused, still_full, full, errors, recovered_in, shipped = asyncio.run(main())
    assert refused >= 20 and still_full and full < 4096, (refused, still_full, full)
    assert any("No space left" in e["message"] for e in errors), errors
    assert recovered_in is not None, f"strict mode never let traffic through again: {rec.errors[-3:]}"
    assert shipped and not any(spool_dir.iterdir()), list(spool_dir.rglob("*"))
    ref = SessionRef("ns", "pod-1", "s1")
    report = verify_session(store, ref, KEY)
    assert report.ok, [str(p) for p in report.problems]
    events = load_session(store, ref).events
    recorded = [e["data"]["i"] for e in events if e["type"] == "request"]
    assert recorded == accepted + ["back"] + [f"after-{n}" for n in range(200)]  # nothing lost
    gaps = [e for e in events if e["type"] == "error"]
    assert sum(g["data"]["droppedEvents"] for g in gaps) == rec.metrics.events_dropped
    assert rec.metrics.backlog_segments == 0 and rec.metrics.backlog_bytes == 0


def test_out_of_inodes_heals_too(small_tmpfs, tmp_path):
    """The other way a device is full: no inode left (``nr_inodes``), plenty of blocks. New
    segment files cannot be created; confirming a chunk must not need a new file either
    (``shipped.jsonl`` is created with the session, while inodes are there), or the shipped
    segments' inodes are never given back."""
    spool_dir = small_tmpfs("4m", inodes=12)
    store = FlakyStore(tmp_path / "store")
    store.down = True

    async def main():
        rec = Recorder(SpoolConfig(spool_dir, segment_bytes=1500, segment_max_age=0.2),
                       namespace="ns", pod="pod-1", session="s1", store=store, shipping=FAST,
                       key=KEY)
        await rec.start()
        accepted, refused = [], 0
        for i in range(400):
            try:
                await rec.record("request", data={"i": i, "pad": "x" * 400})
                accepted.append(i)
            except SpoolUnavailable:
                refused += 1
        errors = list(rec.errors)
        store.down = False
        deadline = time.monotonic() + 20
        while True:
            try:
                await rec.record("request", data={"i": "back"})
                break
            except SpoolUnavailable:
                if time.monotonic() > deadline:
                    return rec, accepted, refused, errors, None
                await asyncio.sleep(0.05)
        return rec, accepted, refused, errors, await rec.close(timeout=30)

    rec, accepted, refused, errors, shipped = asyncio.run(main())
    assert refused and any("No space left" in e["message"] for e in errors), errors
    assert shipped is not None, f"never healed: {rec.errors[-3:]}"
    assert shipped and not any(spool_dir.iterdir())
    ref = SessionRef("ns", "pod-1", "s1")
    assert verify_session(store, ref, KEY).ok
    recorded = [e["data"]["i"] for e in load_session(store, ref).events if e["type"] == "request"]
    assert recorded == accepted + ["back"]


def spool_with_segments(directory: Path, n: int) -> SessionSpool:
    spool = SessionSpool(SpoolConfig(directory, segment_bytes=3000), "s1",
                         {"session": "s1", "namespace": "ns", "pod": "pod-1"}, RecorderMetrics(),
                         lambda: datetime(2025, 1, 1, tzinfo=timezone.utc))
    events = []
    for i in range(n):
        event = new_event("request", data={"i": i, "pad": "z" * 400})
        event["time"] = "2025-01-01T00:00:00.000000Z"
        events.append(event)
    assert all(isinstance(r, dict) for r in spool.write(events))
    spool.rotate()
    return spool


def ship_entry(segment: Path) -> dict:
    from chaperone_sidecar.recording.events import sha256_hex, split_lines

    data = segment.read_bytes()
    lines = split_lines(data)[0]
    first, last = json.loads(lines[0]), json.loads(lines[-1])
    return {"key": f"sessions/ns/pod-1/s1/chunk-{first['seq']:08d}.jsonl", "sha256": sha256_hex(data),
            "bytes": len(data), "events": len(lines), "firstSeq": first["seq"],
            "lastSeq": last["seq"], "firstHash": first["hash"], "lastHash": last["hash"]}


def test_confirming_a_chunk_on_a_full_disk_frees_its_segment(small_tmpfs):
    """The ENOSPC path itself: no free page at all, ``record_shipped`` must still free the
    segment and keep the confirmation (durably: a later reader of the spool sees it)."""
    directory = small_tmpfs("128k")
    spool = spool_with_segments(directory, 40)
    segments = spool.closed_segments()
    assert len(segments) >= 3
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:  # take every free page
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    assert free_bytes(directory) == 0
    entries = [ship_entry(s) for s in segments]
    before = segments[0].stat().st_size
    spool.record_shipped(entries[0], segments[0])  # raised ENOSPC before the fix
    assert not segments[0].exists() and free_bytes(directory) >= before - 4096
    assert spool.shipped() == entries[:1]
    assert spool.unshipped_bytes == sum(e["bytes"] for e in entries[1:])
    # a new reader of the same spool (the next process) sees the confirmation too
    again = SessionSpool(spool.config, "s1", spool.meta, RecorderMetrics(), spool.clock)
    assert again.shipped() == entries[:1]
    filler.unlink()
    spool.record_shipped(entries[1], segments[1])  # with space again: all in the log
    assert spool.shipped() == entries[:2]
    assert [p.name for p in (directory / "s1").iterdir() if p.name.startswith("shipped")] == \
        ["shipped.jsonl"]
    spool.release()


def test_a_torn_shipped_log_does_not_swallow_the_next_confirmation(tmp_path):
    """A crash (or ENOSPC) in the middle of an append leaves half a line in ``shipped.jsonl``;
    the next append must not glue its line onto it."""
    spool = spool_with_segments(tmp_path / "spool", 20)
    segments = spool.closed_segments()
    entries = [ship_entry(s) for s in segments[:2]]
    spool.record_shipped(entries[0], segments[0])
    with open(tmp_path / "spool" / "s1" / "shipped.jsonl", "ab") as f:
        f.write(b'{"key": "sessions/ns/po')
    spool.record_shipped(entries[1], segments[1])
    assert spool.shipped() == entries


def test_a_chunk_in_both_the_log_and_a_marker_counts_once(tmp_path):
    """A crash after folding a marker into the log and before deleting the marker: the chunk
    is listed twice on disk, once in ``shipped()`` and in the manifest."""
    from chaperone_sidecar.recording.spool import marker_name

    spool = spool_with_segments(tmp_path / "spool", 20)
    segments = spool.closed_segments()
    entries = [ship_entry(s) for s in segments[:2]]
    spool.record_shipped(entries[0], segments[0])
    spool.record_shipped(entries[1], segments[1])
    marker = tmp_path / "spool" / "s1" / marker_name(entries[1])
    marker.touch()
    assert spool.shipped() == entries
    bad = dict(entries[1], firstHash="not-hex")  # a name cannot carry it: no marker
    assert marker_name(bad) is None and len(marker.name) <= 255
    spool.record_shipped(ship_entry(segments[2]), segments[2])  # folds: the marker goes
    assert not marker.exists() and len(spool.shipped()) == 3
    spool.release()


# ---- SIGKILL at the worst moments ----------------------------------------------------------------

KILLED_SHIPPER = textwrap.dedent('''
    import asyncio, errno, json, os, signal, sys
    from pathlib import Path
    from chaperone_sidecar.recording import Recorder
    from chaperone_sidecar.recording.manifest import key_from_bytes
    from chaperone_sidecar.recording.shipper import DirStore, ShipperConfig
    from chaperone_sidecar.recording.spool import SpoolConfig
    from chaperone_sidecar.recording import spool as spool_mod

    spool_dir, store_dir, where = sys.argv[1], sys.argv[2], sys.argv[3]

    def die():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    class Store(DirStore):
        puts = 0
        def put(self, key, data, **kw):
            etag = super().put(key, data, **kw)
            Store.puts += 1
            if where == "after-upload" and Store.puts == 2:
                die()  # the chunk is in the store; its segment is still in the spool
            return etag

    if where == "after-log":  # confirmation durable, segment not yet deleted
        real_unlink = Path.unlink
        def unlink(self, *a, **kw):
            if self.name.startswith("seg-") and self.suffix == ".jsonl":
                die()
            return real_unlink(self, *a, **kw)
        Path.unlink = unlink
    if where.startswith("marker"):  # the disk is full: the log cannot grow
        def no_space(*a, **kw):
            raise OSError(errno.ENOSPC, "No space left on device")
        spool_mod.SessionSpool._append_shipped = no_space
        real_truncate = os.truncate
        def truncate(path, length):
            if where == "marker-before-truncate":
                die()  # renamed to its marker, not yet emptied
            real_truncate(path, length)
            if where == "marker-after-truncate":
                die()
        spool_mod.os.truncate = truncate

    async def main():
        rec = Recorder(SpoolConfig(spool_dir, segment_bytes=2000, segment_max_age=0.1),
                       namespace="ns", pod="pod-1", session="doomed", store=Store(store_dir),
                       shipping=ShipperConfig(poll_interval=0.05, backoff_base=0.05),
                       key=key_from_bytes(b"recording-test-hmac-secret-0123456789"))
        await rec.start()
        for i in range(60):
            await rec.record("request", data={"i": i, "pad": "p" * 100})
            print(i, flush=True)
        await rec.flush()
        await asyncio.sleep(10)  # the shipper dies somewhere in here

    asyncio.run(main())
''')


@pytest.mark.parametrize("where", ["after-upload", "after-log", "marker-before-truncate",
                                   "marker-after-truncate"])
def test_sigkill_between_upload_and_delete_loses_and_duplicates_nothing(tmp_path, where):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(REPO / d) for d in ("sidecar", "testbed")))
    spool_dir, store_dir = tmp_path / "spool", tmp_path / "store"
    out = subprocess.run([sys.executable, "-c", KILLED_SHIPPER, str(spool_dir), str(store_dir), where],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == -9, out.stderr  # killed where asked, not crashed on its own
    written = [int(line) for line in out.stdout.split()]
    assert written, out.stderr
    assert list(store_dir.rglob("chunk-*")), "nothing was uploaded before the kill"
    store = DirStore(store_dir)

    async def restart():
        rec = Recorder(SpoolConfig(spool_dir), namespace="ns", pod="pod-1", session="next",
                       store=store, shipping=FAST, key=KEY)
        await rec.start()
        return await rec.close(timeout=30)

    assert asyncio.run(restart())
    assert not any(spool_dir.iterdir()), list(spool_dir.rglob("*"))
    for summary in list_sessions(store):
        report = verify_session(store, summary.ref, KEY)
        assert report.ok, (summary.ref, [str(p) for p in report.problems])
    doomed = SessionRef("ns", "pod-1", "doomed")
    events = load_session(store, doomed).events
    assert [e["data"]["i"] for e in events if e["type"] == "request"][:len(written)] == written
    assert events[-1]["type"] == "session-end" and events[-1]["data"]["reason"] == "recovered"
    manifest = load_session(store, doomed).manifest
    keys = [c["key"] for c in manifest["chunks"]]
    assert len(keys) == len(set(keys)) == len(list((store_dir / "sessions/ns/pod-1/doomed").glob("chunk-*")))


def test_restart_on_a_full_disk_ships_the_leftover_and_heals(small_tmpfs, tmp_path):
    """A crashed writer filled the spool device: the next start must adopt its session even
    though the closing events (``unclean-shutdown`` + ``session-end``) cannot be written yet,
    ship its segments - which frees the space - then close it. Before the fix adoption failed
    with ENOSPC, the leftover was never shipped and the new session could never write."""
    directory = small_tmpfs("128k")
    crashed = SessionSpool(SpoolConfig(directory, segment_bytes=3000), "crashed",
                           {"session": "crashed", "namespace": "ns", "pod": "pod-1"},
                           RecorderMetrics(), lambda: datetime(2025, 1, 1, tzinfo=timezone.utc))
    written, i = [], 0
    for pad, stop_after in ((1000, 3), (0, 20)):
        streak = 0
        while streak < stop_after:
            event = new_event("request", data={"i": i, "pad": "q" * pad})
            event["time"] = "2025-01-01T00:00:00.000000Z"
            if isinstance(crashed.write([event])[0], dict):
                written.append(i)
                streak = 0
            else:
                streak += 1
            i += 1
    crashed.release()  # SIGKILL: no session-end, the open segment left behind
    assert free_bytes(directory) < 4096 and written
    store = DirStore(tmp_path / "store")

    async def restart():
        rec = Recorder(SpoolConfig(directory, segment_max_age=0.2), namespace="ns", pod="pod-1",
                       session="next", store=store, shipping=FAST, key=KEY)
        try:
            await rec.start()  # session-start may be refused: the disk is still full
        except SpoolUnavailable:
            pass
        deadline = time.monotonic() + 20
        while True:
            try:
                await rec.record("request", data={"i": "next"})
                break
            except SpoolUnavailable:
                assert time.monotonic() < deadline, f"never healed: {rec.errors[-3:]}"
                await asyncio.sleep(0.05)
        return rec, await rec.close(timeout=30)

    rec, shipped = asyncio.run(restart())
    assert shipped and not any(directory.iterdir()), list(directory.rglob("*"))
    for name, requests in (("crashed", written), ("next", ["next"])):
        ref = SessionRef("ns", "pod-1", name)
        report = verify_session(store, ref, KEY)
        assert report.ok, (name, [str(p) for p in report.problems])
        events = load_session(store, ref).events
        assert [e["data"]["i"] for e in events if e["type"] == "request"] == requests
    events = load_session(store, SessionRef("ns", "pod-1", "crashed")).events
    assert [e["type"] for e in events[-2:]] == ["error", "session-end"]
    assert events[-1]["data"]["reason"] == "recovered"
    assert events[-2]["data"]["kind"] == "unclean-shutdown"
