"""Crash recovery of the spool: adopt the sessions a crashed recorder left behind.

Why: a sidecar that is SIGKILLed or OOM-killed leaves its session directory on the pod's
emptyDir - possibly a torn last line, an ``.open`` segment, no ``session-end`` and no manifest.
The next recorder's ``start()`` lists those directories (:func:`leftovers`) and takes each one
whose lock is free over (:func:`adopt`), so the recording ends in a verified chain and is shipped
like any other. Kept apart from :mod:`.spool` because it runs once per start, never on the
write path. The recorder (:class:`chaperone_sidecar.recording.Recorder`) calls it directly.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any

from .events import Chain, ChainChecker, format_time, new_event, sha256_hex, split_lines
from .spool import (
    CLOSED,
    OPEN,
    SESSION_NAME,
    RecorderMetrics,
    SessionSpool,
    SpoolConfig,
    SpoolUnavailable,
    fsync_dir,
    read_json,
    segment_seq,
)

__all__ = ["adopt", "leftovers"]


def adopt(config: SpoolConfig, name: str, metrics: RecorderMetrics,
          clock: Callable[[], Any]) -> SessionSpool | None:
    """Take over a crashed writer's session: None if it is live (locked) or empty.

    Re-validates the chain over the unshipped segments, cuts a torn last line (a write the
    crash interrupted: bytes after the last newline), closes the open segment and, if the
    session never ended, appends an ``error`` event describing the crash plus a
    ``session-end`` (reason ``recovered``) that continue the chain.

    Nothing here needs free space to succeed (it only cuts, renames and deletes) except those
    two closing events and ``ended.json``: when the disk is full they wait in
    ``spool.pending_close`` and the shipper writes them once it has freed space.
    ``meta.json`` is only written if missing (a crash before the first segment: then the
    session is empty and removed).
    """
    path = config.directory / name
    if not SESSION_NAME.match(name) or not path.is_dir():
        return None
    meta = read_json(path / "meta.json") or {"session": name}
    spool = SessionSpool(config, name, meta, metrics, clock)
    try:
        spool._ensure_dir()
    except SpoolUnavailable:
        return None  # a live recorder holds it
    shipped = spool.shipped()
    if shipped:
        spool.chain = Chain(name, shipped[-1]["lastSeq"] + 1, shipped[-1]["lastHash"])
    report: dict[str, Any] = {"tornBytes": 0, "problems": []}
    checker = ChainChecker(name, spool.chain.seq, spool.chain.last_hash)
    last_event: dict[str, Any] | None = None
    last_line = b""
    segments = sorted([*path.glob(f"seg-*{OPEN}"), *path.glob(f"seg-*{CLOSED}")], key=segment_seq)
    for seg in segments:
        if segment_seq(seg) < spool.chain.seq:  # confirmed before the crash, not yet deleted
            seg.unlink(missing_ok=True)
            continue
        data = seg.read_bytes()
        lines, tail = split_lines(data)
        if tail:
            with open(seg, "r+b") as f:
                f.truncate(len(data) - len(tail))
                os.fsync(f.fileno())
            report["tornBytes"] += len(tail)
            metrics.add("torn_tails")
        for number, line in enumerate(lines, 1):
            last_event, problems = checker.check_line(seg.name, number, line)
            report["problems"] += [str(p) for p in problems]
            last_line = line
        if not lines:
            seg.unlink(missing_ok=True)
            continue
        if seg.suffix == OPEN:
            os.replace(seg, seg.with_suffix(CLOSED))
        size = len(data) - len(tail)
        spool.unshipped_bytes += size
        metrics.add("backlog_segments")
        metrics.add("backlog_bytes", size)
    fsync_dir(path)
    if last_line:  # continue after the last stored line (its hash, or its bytes' hash)
        spool.chain = Chain(name, checker.seq, checker.last_hash or sha256_hex(last_line))
    spool.ended = read_json(path / "ended.json")
    spool.recovered = report
    if spool.ended is None and last_event and last_event.get("type") == "session-end":
        spool.pending_close = []  # crash inside finish(): only ended.json is missing
        spool.pending_reason = str(last_event.get("data", {}).get("reason", "closed"))
    elif spool.ended is None:
        if not shipped and not checker.events:
            spool.remove()
            return None
        identity = meta.get("identity", {})
        now = format_time(clock())
        error = new_event("error", identity=identity, data={
            "kind": "unclean-shutdown", "tornBytes": report["tornBytes"],
            "problems": report["problems"][:20],
            "message": "recorder stopped without closing the session; spool recovered"})
        end = new_event("session-end", identity=identity, data={"reason": "recovered"})
        error["time"] = end["time"] = now
        spool.pending_close = [error, end]
    # On a full disk these writes fail: the session is adopted all the same, so the shipper
    # ships (and frees) its segments, then retries them (SessionSpool.complete_recovery).
    # Failing here instead would leave the leftover unshipped, its space never freed.
    spool.complete_recovery()
    return spool


def leftovers(config: SpoolConfig) -> list[str]:
    """Names of the session directories in the spool (live ones included: adopt skips those)."""
    try:
        return sorted(p.name for p in config.directory.iterdir() if p.is_dir())
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return []
        raise
