"""Session recording: every request, response, decision and approval, chained, spooled, shipped.

``Recorder`` is the front door the proxy addons use::

    recorder = Recorder(SpoolConfig("/var/run/chaperone/spool"), namespace=ns, pod=pod,
                        identity=SessionIdentity(...), store=S3Store(bucket), key=load_key(path))
    await recorder.start()                       # ships leftovers of a crashed predecessor
    await recorder.record("request", flow=flow.id, data={...masked...})
    await recorder.close()                       # session-end, last chunk, signed manifest

Design (why it never blocks the proxy's event loop): ``append`` only puts the event on a queue
and awaits a future. One writer task takes everything queued so far as a batch and hands it to
a dedicated single thread, which seals the events into the chain and writes them with one
``write()`` per segment; group fsync (``fsync_every`` events or ``fsync_interval`` seconds,
whichever first) runs in that thread too, after the batch's appends were answered.
Concurrent appends therefore share writes and fsyncs, and the loop only ever waits on futures.
``append`` returns once the line is in the file (the page cache: it survives a crash of the
process, not of the kernel) - never after an fsync it did not ask for; ``flush()`` forces
the fsync. The shipper is another task that does its boto3 calls in threads.

Strict mode: ``append`` raises ``SpoolUnavailable`` when the line could not be written, so the
caller refuses the traffic. Best-effort mode: ``append`` returns None, ``metrics`` counts the
drop and ``errors`` keeps the report; in both modes the next successful write is preceded by an
``error`` event saying how many events were lost, so the recording itself shows the gap.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .events import EVENT_TYPES, SessionIdentity, format_time, new_event, utc_now
from .manifest import ManifestKey
from .recovery import adopt, leftovers
from .shipper import Shipper, ShipperConfig
from .spool import RecorderMetrics, SessionSpool, SpoolConfig, SpoolUnavailable, check_name

__all__ = ["Recorder", "new_session_id"]


def new_session_id(clock: Callable[[], Any] = utc_now) -> str:
    """Sortable and unique: ``20250102T030405Z-1a2b3c4d``."""
    return f"{clock():%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


class Recorder:
    """Records one session: async append to the spool, background shipping to a store."""

    def __init__(self, spool: SpoolConfig, *, namespace: str, pod: str,
                 identity: SessionIdentity | Mapping[str, Any] | None = None, session: str | None = None,
                 store: Any = None, shipping: ShipperConfig | None = None,
                 key: ManifestKey | None = None, clock: Callable[[], Any] | None = None) -> None:
        self.config = spool
        self.clock = clock or utc_now
        self.metrics = RecorderMetrics()
        if isinstance(identity, SessionIdentity):
            identity = identity.to_dict()
        self.identity = dict(identity or {"namespace": namespace, "pod": pod})
        self.session_id = session or new_session_id(self.clock)
        meta = {"session": self.session_id, "namespace": check_name("namespace", namespace),
                "pod": check_name("pod", pod), "identity": self.identity, "startTime": ""}
        self._spool = SessionSpool(spool, self.session_id, meta, self.metrics, self.clock)
        self._shipper = Shipper(store, self.metrics, key=key, config=shipping) if store else None
        self._adopted: list[SessionSpool] = []
        self._queue: list[tuple[str, Any, asyncio.Future]] = []
        self._wake = asyncio.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._writer: asyncio.Task | None = None
        self._state = "new"

    @property
    def errors(self) -> list[dict[str, str]]:
        """Recent error reports (spool failures, torn tails, fsync errors), oldest first."""
        return list(self._spool.errors) + [e for s in self._adopted for e in s.errors]

    @property
    def healthy(self) -> bool:
        """False while events are being lost (the spool refused the last write)."""
        return self._spool.healthy

    @property
    def ships(self) -> bool:
        """Whether recordings leave the spool (an S3 or directory store is configured)."""
        return self._shipper is not None

    @property
    def upload_error(self) -> str | None:
        return self._shipper.last_error if self._shipper else None

    async def start(self, data: Mapping[str, Any] | None = None) -> None:
        """Adopt leftover sessions, start the writer and shipper, record ``session-start``.

        Strict mode raises SpoolUnavailable when even that first event cannot be written.
        """
        loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chaperone-spool")
        self._spool.meta["startTime"] = format_time(self.clock())
        self._adopted = await loop.run_in_executor(self._executor, self._adopt_leftovers)
        self._writer = loop.create_task(self._write_loop(), name="chaperone-spool-writer")
        if self._shipper is not None:
            for spool in (*self._adopted, self._spool):
                self._shipper.add(spool)
            self._shipper.start()
        self._state = "open"
        await self.append(new_event("session-start", data=data))

    def _adopt_leftovers(self) -> list[SessionSpool]:
        adopted = []
        try:
            names = leftovers(self.config)
        except OSError as exc:
            self._spool.report("recovery-failed", f"cannot list {self.config.directory}: {exc}")
            return []
        for name in names:
            if name == self.session_id:
                continue
            try:
                spool = adopt(self.config, name, self.metrics, self.clock)
            except Exception as exc:  # one bad leftover must not stop this session
                self._spool.report("recovery-failed", f"{name}: {type(exc).__name__}: {exc}")
                continue
            if spool is not None:
                adopted.append(spool)
        return adopted

    async def append(self, event: Mapping[str, Any]) -> dict[str, Any] | None:
        """Append one event; returns it sealed (seq, time, prev, hash) once it is in the spool.

        The recorder owns ``event`` from here on: do not mutate it. Strict mode raises
        SpoolUnavailable if it could not be written; best-effort returns None.
        """
        return await self._enqueue("event", self._prepare(event))

    async def append_many(self, events: list[Mapping[str, Any]]) -> list[Any]:
        """Append several events in this order, queued together (no task per event).

        Per event, what ``append`` would return or raise, as
        ``asyncio.gather(*(append(e) for e in events), return_exceptions=True)`` gives it: the
        sealed dict, None (best-effort, not written) or the exception.
        """
        loop = asyncio.get_running_loop()
        pending: list[Any] = []
        for event in events:
            try:
                prepared = self._prepare(event)
            except Exception as exc:
                pending.append(exc)
                continue
            future = loop.create_future()
            self._queue.append(("event", prepared, future))
            pending.append(future)
        self._wake.set()
        results: list[Any] = []
        try:
            for item in pending:
                if isinstance(item, BaseException):
                    results.append(item)
                    continue
                try:
                    results.append(await item)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    results.append(exc)
        except asyncio.CancelledError:
            for item in pending:  # the writer skips cancelled futures (the events are written)
                if isinstance(item, asyncio.Future) and not item.done():
                    item.cancel()
            raise
        return results

    def _prepare(self, event: Mapping[str, Any]) -> dict[str, Any]:
        if self._state not in ("open", "closing"):
            raise RuntimeError(f"recorder is {self._state}; call start() first")
        if event.get("type") not in EVENT_TYPES:
            raise ValueError(f"unknown event type {event.get('type')!r}")
        event = dict(event)
        event.pop("session", None)
        moment = event.get("time") or self.clock()
        event["time"] = moment if isinstance(moment, str) else format_time(moment)
        event.setdefault("identity", self.identity)
        event.setdefault("data", {})
        return event

    async def record(self, type: str, *, flow: str | None = None,
                     data: Mapping[str, Any] | None = None,
                     identity: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """``append(new_event(type, flow=..., data=..., identity=...))``."""
        return await self.append(new_event(type, flow=flow, data=data, identity=identity))

    async def flush(self) -> bool:
        """Write and fsync everything appended so far. False (best-effort) if events were lost."""
        return bool(await self._enqueue("flush", None))

    async def close(self, reason: str = "closed", timeout: float = 30.0) -> bool:
        """Record ``session-end``, close the last segment and wait up to ``timeout`` seconds for
        the shipper to upload everything and the manifest. True if all of it is in the store;
        otherwise the rest stays in the spool for the next start."""
        if self._state != "open":
            return False
        self._state = "closing"
        deadline = time.monotonic() + timeout
        while True:
            try:
                if await self.append(new_event("session-end", data={"reason": reason})) is not None:
                    break
            except SpoolUnavailable:
                pass
            # A spool full of backlog drains as the shipper uploads: retry until the deadline.
            # Anything else will not heal by waiting: the manifest counts the unrecorded events.
            backlog = self._shipper is not None and self.metrics.backlog_segments > 0
            if not backlog or time.monotonic() + 0.1 > deadline:
                break
            await asyncio.sleep(0.1)
        try:
            await self._enqueue("end", reason)
        except SpoolUnavailable:
            pass  # no ended.json: the next start recovers what is on disk
        self._state = "closed"
        self._wake.set()
        if self._writer is not None:
            await self._writer
        shipped = self._spool.ended is not None
        if self._shipper is not None:
            if not shipped:  # cannot complete in this process; the next start recovers it
                self._shipper.forget(self.session_id)
            shipped = await self._shipper.drain(None, timeout) and shipped
            await self._shipper.stop()
        else:
            shipped = False
        for spool in (self._spool, *self._adopted):
            spool.release()  # leftovers of our own stay adoptable by the next start
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        return shipped

    async def _enqueue(self, kind: str, payload: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((kind, payload, future))
        self._wake.set()
        return await future

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._state == "closed":
                    return
                await self._idle(loop)
            if self._queue:
                items, self._queue = self._queue, []
                try:
                    results = await loop.run_in_executor(self._executor, self._process, items)
                except Exception as exc:  # a bug, not an I/O error: fail the callers, do not hang them
                    results = [exc] * len(items)
                self._settle(items, results)
            # Only after the callers have their answers: an append returns once its line is in
            # the file, so no flow waits for a group fsync (1-5 ms) or an age rotation.
            if self._spool.maintenance_due():
                await loop.run_in_executor(self._executor, self._maintain)
            if self._spool.closed_new and self._shipper is not None:
                self._spool.closed_new = 0
                self._shipper.wake()

    async def _idle(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait for an append or the spool's next deadline (a timer, not ``wait_for``: that
        costs a task per wait)."""
        deadline = self._spool.next_deadline()
        self._wake.clear()
        timer = None if deadline is None else loop.call_later(
            max(0.0, deadline - time.monotonic()), self._wake.set)
        try:
            await self._wake.wait()
        finally:
            if timer is not None:
                timer.cancel()

    def _maintain(self) -> None:
        """Writer thread: the group fsync and the age rotation, when due."""
        try:
            self._spool.tick()
        except OSError as exc:
            self._spool.report("rotate-failed", str(exc))

    def _process(self, items: list[tuple[str, Any, asyncio.Future]]) -> list[Any]:
        """Writer thread: events in runs (one write per run), control operations in order."""
        results: list[Any] = []
        run: list[dict[str, Any]] = []
        for kind, payload, _ in [*items, ("stop", None, None)]:
            if kind == "event":
                run.append(payload)
                continue
            if run:
                results += self._spool.write(run)
                run = []
            try:
                if kind == "flush":
                    self._spool.sync()
                    results.append(self._spool.healthy or SpoolUnavailable(
                        f"spool {self.config.directory}: events were lost (see errors)"))
                elif kind == "end":
                    self._spool.finish(payload)
                    results.append(True)
            except (OSError, SpoolUnavailable) as exc:
                self._spool.report("finish-failed", str(exc))
                results.append(SpoolUnavailable(f"spool {self.config.directory}: {exc}"))
        return results

    def _settle(self, items: list, results: list) -> None:
        strict = self.config.mode == "strict"
        for (_, _, future), result in zip(items, results, strict=True):
            if future.done():  # the caller was cancelled; the event was still written
                continue
            if isinstance(result, SpoolUnavailable) and not strict:
                future.set_result(None)
            elif isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
