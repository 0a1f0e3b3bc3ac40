"""Write-ahead spool: the durable local copy of a session before (and until) it reaches S3.

Why: the proxy must never lose an event because S3 is slow or down, and in ``strict`` mode it
must know *before forwarding* that the event is on disk. So every event is sealed into the hash
chain and appended to a segment file in the pod's emptyDir first; the shipper uploads closed
segments later and deletes them only once S3 confirmed them.

Layout of one session (``{spool}/{session}/``)::

    lock                  flock()ed by the live writer; free lock + files = leftover of a crash
    meta.json             session, namespace, pod, identity, startTime (for the object keys)
    seg-00000000.open     the segment being appended (name = seq of its first event)
    seg-00000000.jsonl    a closed segment, ready to ship (rotated by size, age, or session end)
    shipped.jsonl         one line per chunk S3 confirmed (key, sha256, seqs, last hash)
    shipped-{first}-...   a chunk S3 confirmed while shipped.jsonl could not grow (disk full):
                          an empty file whose name is the entry (:func:`marker_name`)
    ended.json            written after the session-end event: the session is complete

Threading: :class:`SessionSpool` is synchronous and is driven from the recorder's single
writer thread (write/sync/rotate) and the shipper's thread (segments it reads, confirms and
deletes). The two share only file renames (atomic) and counters under a lock. The asyncio
front end, :class:`chaperone_sidecar.recording.Recorder`, is in the package ``__init__``.

Crash recovery (adopting a crashed writer's session at the next start) is in :mod:`.recovery`,
which builds on this module; the recorder calls it directly (this module never imports it).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .events import Chain, format_time, new_event, split_lines
from .shipper import chunk_key

OPEN, CLOSED = ".open", ".jsonl"
SESSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")


def check_name(kind: str, value: str) -> str:
    """Session/namespace/pod names become path and key components: keep them boring."""
    if not isinstance(value, str) or not SESSION_NAME.match(value):
        raise ValueError(f"invalid {kind} {value!r}: use letters, digits, '.', '_' or '-'")
    return value


class SpoolUnavailable(RuntimeError):
    """The spool cannot be written (read-only, disk full, size cap reached)."""


@dataclass
class SpoolConfig:
    """Spool settings. Defaults suit a proxy: fsync at most every 64 events or 50 ms."""

    directory: Path
    mode: Literal["strict", "best-effort"] = "strict"
    fsync_every: int = 64  # events per group fsync
    fsync_interval: float = 0.05  # seconds an event may wait for its group fsync
    segment_bytes: int = 1 << 20  # rotate (close, make shippable) at this size
    segment_max_age: float = 10.0  # ...or when the oldest event in the open segment is this old
    max_spool_bytes: int | None = None  # cap on unshipped bytes; stay below the emptyDir limit
    max_error_reports: int = 100

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        if self.mode not in ("strict", "best-effort"):
            raise ValueError(f"spool mode must be 'strict' or 'best-effort', not {self.mode!r}")


@dataclass
class RecorderMetrics:
    """Counters for telemetry (read them; they only grow, except the backlog gauges)."""

    events_appended: int = 0
    bytes_appended: int = 0
    events_dropped: int = 0  # not recorded because the spool was unavailable
    fsyncs: int = 0
    segments_closed: int = 0
    backlog_segments: int = 0  # closed segments not yet confirmed by S3
    backlog_bytes: int = 0
    uploads: int = 0
    upload_failures: int = 0
    manifests: int = 0
    torn_tails: int = 0  # torn last lines discarded at recovery
    spool_errors: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + amount)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write a small file so a crash leaves either the old or the new content."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        tmp.unlink(missing_ok=True)  # a half-written tmp would hold space a full disk needs
        raise
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def segment_seq(path: Path) -> int:
    return int(path.name.split("-", 1)[1].split(".", 1)[0])


SHIPPED_LOG, MARKER_PREFIX = "shipped.jsonl", "shipped-"
_MARKER = re.compile(r"^shipped-(\d{8,})-(\d{8,})-(\d+)-([0-9a-f]{64})-([0-9a-f]{64})-([0-9a-f]{64})$")


def marker_name(entry: dict[str, Any]) -> str | None:
    """The file name that records a confirmed chunk without a data block (disk full).

    ``shipped-{firstSeq}-{lastSeq}-{bytes}-{sha256}-{firstHash}-{lastHash}`` (about 230 of the
    255 bytes a name may have): everything the manifest and recovery need; the object key
    and the event count follow from the session and the seqs. None when the entry does not fit
    that shape (a corrupt line's hash is not hex): the caller keeps the segment and retries.
    """
    try:
        name = (f"{MARKER_PREFIX}{int(entry['firstSeq']):08d}-{int(entry['lastSeq']):08d}-"
                f"{int(entry['bytes'])}-{entry['sha256']}-{entry['firstHash']}-{entry['lastHash']}")
    except (KeyError, TypeError, ValueError):
        return None
    if not _MARKER.match(name) or entry.get("events") != entry["lastSeq"] - entry["firstSeq"] + 1:
        return None
    return name


def parse_marker(name: str, meta: dict[str, Any], session: str) -> dict[str, Any] | None:
    """The ``shipped.jsonl`` entry a :func:`marker_name` stands for (None: not a marker)."""
    m = _MARKER.match(name)
    if m is None:
        return None
    first, last = int(m[1]), int(m[2])
    return {"key": chunk_key(meta.get("namespace", "unknown"), meta.get("pod", "unknown"), session,
                             first),
            "sha256": m[4], "bytes": int(m[3]), "events": last - first + 1, "firstSeq": first,
            "lastSeq": last, "firstHash": m[5], "lastHash": m[6]}


class SessionSpool:
    """The files of one session in the spool (see the module docstring for the layout)."""

    def __init__(self, config: SpoolConfig, session: str, meta: dict[str, Any],
                 metrics: RecorderMetrics, clock: Callable[[], Any]) -> None:
        self.config = config
        self.session = check_name("session", session)
        self.meta = meta
        self.metrics = metrics
        self.clock = clock
        self.dir = config.directory / session
        self.chain = Chain(session)
        self.ended: dict[str, Any] | None = None
        self.recovered: dict[str, Any] | None = None  # what recovery found, if adopted
        # recovery's closing events (error + session-end) it could not write yet (disk full);
        # [] = written, only ended.json missing. None: nothing pending.
        self.pending_close: list[dict[str, Any]] | None = None
        self.pending_reason = "recovered"  # the session-end reason finish() will record
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._seg_path: Path | None = None
        self._seg_size = 0
        self._seg_first_at: float | None = None  # monotonic time of the segment's first line
        self._unsynced = 0
        self._unsynced_since: float | None = None
        self._gap: dict[str, Any] | None = None  # events lost while unavailable, to report
        self._committed: tuple[int, str] = (0, "")  # chain state of the last line on disk
        self._bytes_lock = threading.Lock()
        self.unshipped_bytes = 0
        self.closed_new = 0  # segments closed since the writer last told the shipper
        self.errors: deque[dict[str, str]] = deque(maxlen=config.max_error_reports)

    @property
    def healthy(self) -> bool:
        """False while refused events wait to be reported (the last write failed)."""
        return self._gap is None

    def report(self, kind: str, message: str) -> None:
        """Keep an error report in memory (best-effort mode's "report and continue")."""
        self.metrics.add("spool_errors")
        self.errors.append({"time": format_time(self.clock()), "kind": kind, "message": message})

    # ---- writer side (one thread) ------------------------------------------------------------

    def _ensure_dir(self) -> None:
        if self._lock_fd is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise SpoolUnavailable(f"session {self.session} is locked by another recorder") from None
            self._lock_fd = fd
            # Created now, empty, while inodes are available: confirming a shipped chunk then
            # never needs a new file - on a device out of inodes it could not get one, and the
            # shipped segments would keep theirs (as disk-full markers) for good.
            try:
                os.close(os.open(self.dir / SHIPPED_LOG, os.O_WRONLY | os.O_CREAT, 0o600))
            except OSError:
                pass  # created by the first confirmation instead
        if not (self.dir / "meta.json").exists():
            write_atomic(self.dir / "meta.json", json.dumps(self.meta, sort_keys=True).encode())

    def _open_segment(self, first_seq: int) -> None:
        self._ensure_dir()
        path = self.dir / f"seg-{first_seq:08d}{OPEN}"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._seg_path, self._seg_size, self._seg_first_at = path, os.fstat(self._fd).st_size, None
        fsync_dir(self.dir)

    def write(self, events: list[dict[str, Any]]) -> list[Any]:
        """Seal and append events; per event the sealed dict or the exception that refused it.

        Lines go out with one ``write()`` per segment. On failure the file is cut back to its
        last complete line (ftruncate) and the chain rewound to the last line on disk, so file
        and chain always agree; the refused events become a gap, reported by an ``error``
        event ahead of the next successful write.
        """
        results: list[Any] = [None] * len(events)
        todo: list[tuple[int, dict[str, Any]]] = list(enumerate(events))
        if self._gap is not None:
            todo.insert(0, (-1, self._gap_event()))
        self._committed = (self.chain.seq, self.chain.last_hash)
        buf = bytearray()
        items: list[tuple[int, dict[str, Any], int]] = []  # (index, sealed, line length)
        try:
            for index, event in todo:
                try:
                    sealed, line = self.chain.seal(event)
                except ValueError as exc:  # not serialisable: refuse this one event only
                    if index >= 0:
                        results[index] = exc
                    continue
                used = self._seg_size + len(buf)  # the segment's size once buf is written
                if used and used + len(line) > self.config.segment_bytes:
                    self._commit(buf, items, results)
                    self.rotate()
                    buf, items = bytearray(), []
                buf += line
                items.append((index, sealed, len(line)))
            self._commit(buf, items, results)
        except (OSError, SpoolUnavailable) as exc:
            self.chain.seq, self.chain.last_hash = self._committed
            failure = exc if isinstance(exc, SpoolUnavailable) else SpoolUnavailable(
                f"spool {self.dir} not writable: {exc}")
            self._note_failure(failure, results.count(None))
            results = [failure if r is None else r for r in results]
        return results

    def _commit(self, buf: bytearray, items: list, results: list) -> None:
        if not items:
            return
        if self._fd is None:
            self._open_segment(items[0][1]["seq"])
        fd = self._fd
        assert fd is not None  # _open_segment opened it or raised
        cap = self.config.max_spool_bytes
        if cap is not None and self.unshipped_bytes + len(buf) > cap:
            raise SpoolUnavailable(f"spool size cap of {cap} bytes reached (S3 backlog)")
        start, written, view = self._seg_size, 0, memoryview(buf)
        try:
            while written < len(buf):
                written += os.write(fd, view[written:])
        except OSError:
            try:
                os.ftruncate(fd, start)
                written = 0
            except OSError:  # cannot cut: keep the complete lines, close the segment on its
                self._seg_size += written  # torn tail (cut when shipped or recovered)
                for index, sealed, length in items:
                    if (written := written - length) < 0:
                        break
                    self._accept(index, sealed, length, results)
                try:
                    self.rotate()
                except OSError:
                    pass
            raise
        self._seg_size += written
        for index, sealed, length in items:
            self._accept(index, sealed, length, results)

    def _accept(self, index: int, sealed: dict, length: int, results: list) -> None:
        if index >= 0:
            results[index] = sealed
        else:
            self._gap = None
        self._committed = (sealed["seq"] + 1, sealed["hash"])
        now = time.monotonic()
        if self._seg_first_at is None:
            self._seg_first_at = now
        if self._unsynced_since is None:
            self._unsynced_since = now
        self._unsynced += 1
        with self._bytes_lock:
            self.unshipped_bytes += length
        self.metrics.add("events_appended")
        self.metrics.add("bytes_appended", length)

    def _note_failure(self, exc: Exception, dropped: int) -> None:
        self.report("spool-unavailable", str(exc))
        self.metrics.add("events_dropped", dropped)
        if self._gap is None:
            self._gap = {"since": format_time(self.clock()), "dropped": 0}
        self._gap["dropped"] += dropped
        self._gap["reason"] = str(exc)

    def _gap_event(self) -> dict[str, Any]:
        assert self._gap is not None
        event = new_event("error", data={"kind": "spool-unavailable", "message": self._gap["reason"],
                                         "droppedEvents": self._gap["dropped"],
                                         "since": self._gap["since"]})
        event["time"] = format_time(self.clock())
        event["identity"] = self.meta.get("identity", {})
        return event

    def sync(self) -> None:
        """fdatasync the open segment. A failing fsync is reported, not raised: the lines are
        in the page cache and survive a process crash; only a kernel crash could lose them."""
        if self._fd is not None and self._unsynced:
            try:
                os.fdatasync(self._fd)
                self.metrics.add("fsyncs")
            except OSError as exc:
                self.report("fsync-failed", f"{self._seg_path}: {exc}")
        self._unsynced, self._unsynced_since = 0, None

    def next_deadline(self) -> float | None:
        """Monotonic time of the next due group fsync or age rotation (None: nothing due)."""
        due = []
        if self._unsynced_since is not None:
            due.append(self._unsynced_since + self.config.fsync_interval)
        if self._seg_first_at is not None:
            due.append(self._seg_first_at + self.config.segment_max_age)
        return min(due) if due else None

    def maintenance_due(self) -> bool:
        """Whether :meth:`tick` has work: a group fsync (count or age) or an age rotation."""
        deadline = self.next_deadline()
        return self._unsynced >= self.config.fsync_every or (
            deadline is not None and time.monotonic() >= deadline)

    def tick(self) -> None:
        """Run whatever is due: the group fsync (``fsync_every`` lines or ``fsync_interval``
        seconds) and the age rotation."""
        now = time.monotonic()
        if self._unsynced >= self.config.fsync_every or (
                self._unsynced_since is not None and now >= self._unsynced_since + self.config.fsync_interval):
            self.sync()
        if self._seg_first_at is not None and now >= self._seg_first_at + self.config.segment_max_age:
            self.rotate()

    def rotate(self) -> None:
        """Close the open segment (fsync, rename to .jsonl) so the shipper can take it."""
        if self._fd is None:
            return
        self.sync()
        fd, path, size = self._fd, self._seg_path, self._seg_size
        self._fd, self._seg_path, self._seg_size, self._seg_first_at = None, None, 0, None
        os.close(fd)
        assert path is not None
        if size == 0:
            path.unlink(missing_ok=True)
            return
        os.replace(path, path.with_suffix(CLOSED))
        fsync_dir(self.dir)
        self.closed_new += 1
        self.metrics.add("segments_closed")
        self.metrics.add("backlog_segments")
        self.metrics.add("backlog_bytes", size)

    def finish(self, reason: str) -> None:
        """After the session-end event: close the last segment and mark the session ended."""
        self._ensure_dir()
        self.rotate()
        self.ended = {"endTime": format_time(self.clock()), "reason": reason,
                      "events": self.chain.seq, "lastHash": self.chain.last_hash,
                      "unrecorded": self._gap["dropped"] if self._gap else 0}
        write_atomic(self.dir / "ended.json", json.dumps(self.ended, sort_keys=True).encode())

    def complete_recovery(self) -> bool:
        """Write what adoption could not (see ``pending_close``); True once the session ended.

        Runs in the shipper's thread after it shipped (and so freed) the closed segments, as
        often as needed: a failed attempt is not a gap - the events are kept and retried -
        so it leaves neither an ``error`` event nor a drop count behind.
        """
        if self.pending_close is None:
            return True
        if self.pending_close:
            results = self.write(self.pending_close)
            failed = [e for e, r in zip(self.pending_close, results, strict=True) if isinstance(r, Exception)]
            if failed:
                if self._gap is not None:
                    self.metrics.add("events_dropped", -self._gap["dropped"])
                    self._gap = None
                self.pending_close = failed
                return False
            self.pending_close = []
        try:
            self.finish(self.pending_reason)
        except OSError as exc:
            self.report("finish-failed", f"{self.dir / 'ended.json'}: {exc} (retried)")
            return False
        self.pending_close = None
        return True

    # ---- shipper side --------------------------------------------------------------------------

    def closed_segments(self) -> list[Path]:
        try:
            return sorted(self.dir.glob(f"seg-*{CLOSED}"), key=segment_seq)
        except OSError:
            return []

    def shipped(self) -> list[dict[str, Any]]:
        """Chunks the store confirmed, in seq order: ``shipped.jsonl`` plus the disk-full
        markers not yet folded into it (a torn last line of the log is ignored; a chunk listed
        twice - a crash between folding a marker and deleting it - counts once)."""
        entries = self._logged()
        seen = {e.get("firstSeq") for e in entries}
        for _, entry in self._markers():
            if entry["firstSeq"] not in seen:
                seen.add(entry["firstSeq"])
                entries.append(entry)
        return sorted(entries, key=lambda e: e.get("firstSeq", -1))

    def record_shipped(self, entry: dict[str, Any], segment: Path) -> None:
        """Remember a confirmed chunk durably, then delete its segment.

        Normally a line in ``shipped.jsonl`` (fsynced) and only then the unlink, so a crash
        between the two re-confirms the chunk (HEAD) instead of losing it from the manifest.
        That append may need a new block: on a full disk it fails, and if it were allowed to
        block the unlink nothing would ever be freed (issue 11/10). Then the confirmation goes
        into the segment's *name* instead - a rename needs no data block - and the renamed
        file is emptied, which frees the space: see :func:`marker_name`.
        """
        self.fold_markers()
        try:
            self._append_shipped([entry])
        except OSError as exc:
            marker = marker_name(entry)
            if marker is None:  # cannot be encoded in a name (corrupt hashes): retry later
                raise
            self.report("shipped-log-unwritable",
                        f"{segment.name}: confirmed in the store, recorded as {marker[:24]}... "
                        f"because shipped.jsonl cannot grow: {exc}")
            path = self.dir / marker
            os.replace(segment, path)
            fsync_dir(self.dir)
            os.truncate(path, 0)  # frees the space; the name is the record
        else:
            segment.unlink(missing_ok=True)
        with self._bytes_lock:
            self.unshipped_bytes = max(0, self.unshipped_bytes - entry["bytes"])
        self.metrics.add("backlog_segments", -1)
        self.metrics.add("backlog_bytes", -entry["bytes"])

    def _append_shipped(self, entries: list[dict[str, Any]]) -> None:
        """Append lines to ``shipped.jsonl`` and fsync; on failure cut the file back, so a
        short write never glues the next line onto half of this one. A torn tail a crash
        left behind is cut first for the same reason."""
        data = b"".join(json.dumps(e, sort_keys=True).encode() + b"\n" for e in entries)
        fd = os.open(self.dir / SHIPPED_LOG, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            start = os.fstat(fd).st_size
            if start and os.pread(fd, 1, start - 1) != b"\n":
                with open(fd, "rb", closefd=False) as f:
                    start = f.read().rfind(b"\n") + 1
                os.ftruncate(fd, start)
            written = 0
            try:
                while written < len(data):
                    written += os.write(fd, data[written:])
                os.fsync(fd)
            except OSError:
                try:
                    os.ftruncate(fd, start)
                except OSError:
                    pass
                raise
        finally:
            os.close(fd)

    def _markers(self) -> list[tuple[Path, dict[str, Any]]]:
        try:
            names = list(self.dir.glob(f"{MARKER_PREFIX}*"))  # "shipped-": not shipped.jsonl
        except OSError:
            return []
        out = []
        for path in names:
            entry = parse_marker(path.name, self.meta, self.session)
            if entry is not None:
                out.append((path, entry))
        return sorted(out, key=lambda item: item[1]["firstSeq"])

    def fold_markers(self) -> None:
        """Move disk-full markers into ``shipped.jsonl`` once it can grow again (log first,
        then delete the markers: a crash in between lists a chunk twice, which ``shipped``
        reads once). Silently leaves them while the disk is still full."""
        markers = self._markers()
        if not markers:
            return
        logged = {e.get("firstSeq") for e in self._logged()}
        todo = [entry for _, entry in markers if entry["firstSeq"] not in logged]
        try:
            if todo:
                self._append_shipped(todo)
            for path, _ in markers:
                path.unlink(missing_ok=True)
            fsync_dir(self.dir)
        except OSError:
            pass

    def _logged(self) -> list[dict[str, Any]]:
        try:
            data = (self.dir / SHIPPED_LOG).read_bytes()
        except OSError:
            return []
        return [json.loads(line) for line in split_lines(data)[0]]

    def discard(self, segment: Path) -> None:
        """Drop a closed segment without a single complete line (nothing to ship)."""
        size = segment.stat().st_size
        segment.unlink(missing_ok=True)
        self.metrics.add("backlog_segments", -1)
        self.metrics.add("backlog_bytes", -size)

    def finished(self) -> bool:
        """Ended and every segment shipped. A stray ``.open`` (its close failed) keeps the
        session here until the next start's recovery closes it."""
        return self.ended is not None and self._fd is None and not any(self.dir.glob("seg-*"))

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def remove(self) -> None:
        """Delete the session's spool directory (everything is confirmed in S3)."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.release()
