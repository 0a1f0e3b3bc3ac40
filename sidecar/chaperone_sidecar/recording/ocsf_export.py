"""Export the flows' OCSF API Activity events (:mod:`.ocsf`) to a JSONL file, an S3 prefix and
OTLP logs, off the event loop.

Why a queue and a thread: a SIEM feed must never slow or block a flow. ``submit`` (called by
Record with the events it just appended) is one ``put_nowait`` on a bounded
``queue.Queue``; when the queue is full the events are dropped and counted
(``chaperone_ocsf_dropped`` on ``/metrics``), never waited for. One daemon thread pairs
the events per flow, maps them and hands the JSON lines to every sink.

Sinks (each optional; configured by environment, docs/telemetry.md):

``CHAPERONE_OCSF_FILE``
    a path: one OCSF event per line, appended and flushed after each batch; rotated to
    ``<path>.1`` at ``CHAPERONE_OCSF_FILE_MAX_BYTES`` (16 MiB), one generation kept.
``CHAPERONE_OCSF_S3_PREFIX``
    a key prefix in the recording bucket (``CHAPERONE_S3_BUCKET``, same endpoint, region and
    credentials as the recording shipper - the same :class:`~.s3http.AioS3Store` and its
    ``put`` with our SHA-256 as the checksum). Lines are batched into objects
    ``{prefix}/{namespace}/{pod}/{session}/ocsf-{n:06d}.jsonl`` of up to
    ``CHAPERONE_OCSF_S3_BATCH_BYTES`` (1 MiB) or every ``CHAPERONE_OCSF_S3_INTERVAL`` seconds
    (30). A failed upload keeps its batch for the next try, up to 8 MiB (then dropped,
    counted). The store's coroutines run on the thread's own event loop, never the proxy's.
``CHAPERONE_OCSF_OTLP_ENDPOINT``
    an OTLP/HTTP logs URL (``http://collector:4318/v1/logs``): each event is a log record whose
    body is the OCSF event (a map), ``event_name`` ``ocsf.api_activity``, attributes
    ``ocsf.class_uid`` and ``ocsf.activity_id``; the SDK's ``BatchLogRecordProcessor`` hands
    them to :class:`~chaperone_sidecar.otlp_logs.OTLPLogExporter` (our encoder and stdlib HTTP
    client: no protobuf or ``requests`` in the sidecar). ``OTEL_EXPORTER_OTLP_[LOGS_]HEADERS``/
    ``_TIMEOUT``/``_COMPRESSION``/``_CERTIFICATE`` apply as to the other OTLP signals.

``CHAPERONE_OCSF_QUEUE`` bounds the queue (10000 events). What is exported is only ever the
recording's masked and redacted form, without bodies (:mod:`.ocsf`): the recording must be on
for a flow for it to be exported.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .. import contract as c
from .. import helper_threads
from .events import format_time, utc_now
from .ocsf import CLASS_UID, FlowEvents

__all__ = ["OcsfExporter", "FileSink", "S3Sink", "OtlpLogSink", "exporter_from_env"]

log = logging.getLogger("chaperone.ocsf")

ENV_FILE = c.ENV_OCSF_FILE
ENV_S3_PREFIX = c.ENV_OCSF_S3_PREFIX
ENV_S3_BATCH = "CHAPERONE_OCSF_S3_BATCH_BYTES"
ENV_S3_INTERVAL = "CHAPERONE_OCSF_S3_INTERVAL"
ENV_OTLP = c.ENV_OCSF_OTLP_ENDPOINT
ENV_QUEUE = "CHAPERONE_OCSF_QUEUE"
ENV_FILE_MAX = "CHAPERONE_OCSF_FILE_MAX_BYTES"

_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str).encode


class FileSink:
    """Appends JSON lines to a file (created with its directory, mode 0600), rotated at
    ``max_bytes`` to ``<path>.1`` (one generation kept: at most twice ``max_bytes`` on disk -
    the file often shares the spool volume, whose size limit the recording needs)."""

    name = "file"

    def __init__(self, path: str | Path, max_bytes: int = 16 << 20) -> None:
        self.path = Path(path)
        self.max_bytes = max(1, max_bytes)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open()

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._fh = os.fdopen(fd, "ab")
        self.size = os.fstat(fd).st_size

    def write(self, events: list[dict[str, Any]], lines: list[bytes]) -> None:
        pending: list[bytes] = []
        for line in lines:  # rotate between lines, never inside one
            if self.size and self.size + len(line) > self.max_bytes:
                self._fh.write(b"".join(pending))
                pending = []
                self._fh.close()
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
                self._open()
            pending.append(line)
            self.size += len(line)
        self._fh.write(b"".join(pending))
        self._fh.flush()

    def tick(self, now: float) -> None:
        pass

    def close(self) -> None:
        self._fh.close()


class S3Sink:
    """Batches lines into objects under a prefix of an :class:`~.shipper.ObjectStore`."""

    name = "s3"
    MAX_PENDING = 8 << 20

    def __init__(self, store: Any, prefix: str, *, namespace: str, pod: str, session: str,
                 batch_bytes: int = 1 << 20, interval: float = 30.0) -> None:
        self.store = store
        self.base = f"{prefix.strip('/')}/{namespace}/{pod}/{session}/".lstrip("/")
        self.batch_bytes, self.interval = batch_bytes, interval
        self.buffer: list[bytes] = []
        self.size = 0
        self.n = 0
        self.since = time.monotonic()
        self.dropped = 0
        self.uploaded: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def write(self, events: list[dict[str, Any]], lines: list[bytes]) -> None:
        for line in lines:  # objects of about batch_bytes, however many lines came at once
            self.buffer.append(line)
            self.size += len(line)
            if self.size >= self.batch_bytes:
                self.flush()

    def tick(self, now: float) -> None:
        if self.buffer and now - self.since >= self.interval:
            self.flush()

    def _call(self, result: Any) -> Any:
        if not inspect.isawaitable(result):
            return result
        if self._loop is None:
            self._loop = asyncio.new_event_loop()  # this thread's own: never the proxy's loop
        return self._loop.run_until_complete(result)

    def flush(self) -> None:
        if not self.buffer:
            return
        data = b"".join(self.buffer)
        key = f"{self.base}ocsf-{self.n:06d}.jsonl"
        try:
            self._call(self.store.put(key, data, sha256=hashlib.sha256(data).hexdigest(),
                                      content_type="application/x-ndjson"))
        except Exception as exc:
            log.warning("uploading OCSF events to %s failed: %s", key, exc)
            while self.size > self.MAX_PENDING and self.buffer:  # keep the newest
                self.size -= len(self.buffer.pop(0))
                self.dropped += 1
            self.since = time.monotonic()
            return
        self.uploaded.append(key)
        self.n += 1
        self.buffer, self.size, self.since = [], 0, time.monotonic()

    def close(self) -> None:
        self.flush()
        if self._loop is not None:
            close = getattr(self.store, "aclose", None)
            if close is not None:
                try:
                    self._loop.run_until_complete(close())
                except Exception:
                    pass
            self._loop.close()


class OtlpLogSink:
    """Each event as an OTLP log record (opentelemetry-sdk logs, :mod:`~chaperone_sidecar.otlp_logs`'
    OTLP/HTTP exporter)."""

    name = "otlp"

    def __init__(self, endpoint: str, *, resource: Mapping[str, str] | None = None,
                 exporter: Any = None) -> None:
        # The SDK's logs package (and our exporter built on it) load only in a sidecar with
        # this sink configured.
        from opentelemetry.sdk._logs import LoggerProvider
        from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
        from opentelemetry.sdk.resources import Resource

        from ..otlp_logs import OTLPLogExporter

        if exporter is None:
            exporter = OTLPLogExporter(endpoint)
        attrs = {k: v for k, v in (resource or {}).items() if v}
        attrs.setdefault("service.name", "chaperone-sidecar")
        self.provider = LoggerProvider(resource=Resource.create(attrs))
        self.provider.add_log_record_processor(BatchLogRecordProcessor(exporter))
        self.logger = self.provider.get_logger("chaperone.ocsf")

    def write(self, events: list[dict[str, Any]], lines: list[bytes]) -> None:
        from opentelemetry._logs import SeverityNumber

        for event in events:
            severity = SeverityNumber.WARN if event.get("severity_id", 1) >= 3 else SeverityNumber.INFO
            self.logger.emit(timestamp=int(event.get("time", 0)) * 1_000_000, body=event,
                             severity_number=severity, severity_text=event.get("severity"),
                             event_name="ocsf.api_activity",
                             attributes={"ocsf.class_uid": CLASS_UID,
                                         "ocsf.activity_id": event.get("activity_id", 0)})

    def tick(self, now: float) -> None:
        pass

    def close(self) -> None:
        self.provider.shutdown()  # flushes


class OcsfExporter:
    """The bounded queue and the export thread (see the module docstring)."""

    def __init__(self, sinks: Iterable[Any], *, queue_size: int = 10000,
                 tick_seconds: float = 1.0) -> None:
        self.sinks = list(sinks)
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, queue_size))
        self.pairs = FlowEvents()
        self.tick_seconds = tick_seconds
        self.submitted = self.dropped = self.exported = self.errors = 0
        self._thread: threading.Thread | None = None
        self._warned = -60.0

    # ------------------------------------------------------------------ loop side
    def submit(self, events: Iterable[Mapping[str, Any]]) -> None:
        """Queue a flow's events (sealed or not); never blocks: a full queue drops them."""
        events = [e for e in events if isinstance(e, Mapping) and e.get("flow")]
        if not events:
            return
        if any("time" not in e for e in events):  # lost (not sealed): stamped now
            stamp = format_time(utc_now())
            events = [e if "time" in e else {**e, "time": stamp} for e in events]
        try:
            self.queue.put_nowait(events)
            self.submitted += len(events)
        except queue.Full:
            self.dropped += len(events)
            now = time.monotonic()
            if now - self._warned >= 60:  # a flood must not flood the log too
                self._warned = now
                log.warning("the OCSF export queue is full: %d events dropped so far (the "
                            "recording still holds them)", self.dropped)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="chaperone-ocsf", daemon=True)
            self._thread.start()

    async def aclose(self, timeout: float = 10.0) -> None:
        """Export what is queued, close the sinks (in a thread: never on the loop)."""
        await asyncio.to_thread(self.close, timeout)

    def close(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            self._close_sinks()
            return
        try:
            self.queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        self._thread = None

    def metrics(self) -> dict[str, int]:
        return {"submitted": self.submitted, "dropped": self.dropped + sum(
            getattr(s, "dropped", 0) for s in self.sinks), "exported": self.exported,
            "errors": self.errors + self.pairs.failed, "orphaned": self.pairs.orphaned}

    # ------------------------------------------------------------------ thread side
    def _run(self) -> None:
        helper_threads.yield_to_event_loop()
        stop = False
        while not stop:
            try:
                item = self.queue.get(timeout=self.tick_seconds)
            except queue.Empty:
                item = ()
            batch: list[Any] = []
            while item is not None:
                batch.extend(item)
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
            stop = item is None
            self._export(batch)
            now = time.monotonic()
            for sink in self.sinks:
                try:
                    sink.tick(now)
                except Exception:
                    self.errors += 1
                    log.exception("OCSF sink %s failed", sink.name)
        self._close_sinks()

    def _export(self, batch: list[Mapping[str, Any]]) -> None:
        if not batch:
            return
        try:
            events = self.pairs.add(batch)
            lines = [_ENCODE(e).encode("utf-8") + b"\n" for e in events]
        except Exception:
            self.errors += 1
            log.exception("mapping events to OCSF failed")
            return
        if not events:
            return
        for sink in self.sinks:
            try:
                sink.write(events, lines)
            except Exception:
                self.errors += 1
                log.exception("OCSF sink %s failed", sink.name)
        self.exported += len(events)

    def _close_sinks(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:
                log.exception("closing OCSF sink %s failed", sink.name)


def exporter_from_env(env: Mapping[str, str], *, s3_store: Any = None, namespace: str = "",
                      pod: str = "", session: str = "",
                      resource: Mapping[str, str] | None = None) -> OcsfExporter | None:
    """The exporter the ``CHAPERONE_OCSF_*`` variables ask for, or None when none is set.
    ``s3_store`` is the recording's store (``CHAPERONE_OCSF_S3_PREFIX`` needs one)."""
    sinks: list[Any] = []
    if env.get(ENV_FILE, "").strip():
        sinks.append(FileSink(env[ENV_FILE].strip(), int(env.get(ENV_FILE_MAX) or 16 << 20)))
    if env.get(ENV_S3_PREFIX, "").strip():
        if s3_store is None:
            log.error("%s is set but no recording bucket is configured (CHAPERONE_S3_BUCKET): "
                      "OCSF events are not shipped to S3", ENV_S3_PREFIX)
        else:
            sinks.append(S3Sink(s3_store, env[ENV_S3_PREFIX].strip(), namespace=namespace or "default",
                                pod=pod or "local", session=session or "session",
                                batch_bytes=int(env.get(ENV_S3_BATCH) or 1 << 20),
                                interval=float(env.get(ENV_S3_INTERVAL) or 30)))
    if env.get(ENV_OTLP, "").strip():
        try:
            sinks.append(OtlpLogSink(env[ENV_OTLP].strip(), resource=resource))
        except (ValueError, OSError) as exc:  # not an http(s) URL, a certificate that does not load
            log.error("%s is unusable, OCSF events are not sent as OTLP logs: %s", ENV_OTLP, exc)
    if not sinks:
        return None
    return OcsfExporter(sinks, queue_size=int(env.get(ENV_QUEUE) or 10000))
