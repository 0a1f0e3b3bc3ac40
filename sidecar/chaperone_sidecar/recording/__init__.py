"""Session recording: every request, response, decision and approval, chained, spooled, shipped.

``Recorder`` is the front door the proxy addons use::

    recorder = Recorder(SpoolConfig("/var/run/chaperone/spool"), namespace=ns, pod=pod,
                        identity=SessionIdentity(...), store=S3Store(bucket), key=load_key(path))
    await recorder.start()                       # ships leftovers of a crashed predecessor
    await recorder.record("request", flow=flow.id, data={...masked...})
    await recorder.close()                       # session-end, last chunk, signed manifest

Design (why it never blocks the proxy's event loop): ``append``/``append_many`` add the
events as one entry with one future to the loop iteration's batch, which a callback at the end
of the iteration hands to a ``queue.SimpleQueue``. One dedicated writer thread (started with
the recorder, stopped by ``close``) takes everything handed over so far as a batch,
seals the events into the chain, writes them with one ``write()`` per segment and answers the
whole batch with a single ``loop.call_soon_threadsafe``; a due group fsync (``fsync_every``
events or ``fsync_interval`` seconds, whichever first) or age rotation runs in that thread
after the batch was answered. Concurrent appends therefore share writes and fsyncs, and the
loop only ever waits on futures. (Until issue 16 a writer *task* handed each batch to a
one-thread executor - a task wake-up, an executor future and its chaining per batch; the
thread costs one callback and one queue put per loop iteration and one thread-safe callback
per batch.)
``append`` returns once the line is in the file (the page cache: it survives a crash of the
process, not of the kernel) - never after an fsync it did not ask for; ``flush()`` forces
the fsync. The shipper is a task of its own (the sidecar's http11 client for S3, threads for
the disk).

Strict mode: ``append`` raises ``SpoolUnavailable`` when the line could not be written, so the
caller refuses the traffic. Best-effort mode: ``append`` returns None, ``metrics`` counts the
drop and ``errors`` keeps the report; in both modes the next successful write is preceded by an
``error`` event saying how many events were lost, so the recording itself shows the gap.
"""

from __future__ import annotations

import asyncio
import queue
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .. import helper_threads
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
        # Entries (kind, payload, future): "events" with a list of prepared events (the future
        # gets a list of results), "flush", "end" (payload: the reason), "stop". Collected on
        # the loop during one loop iteration (_pending) and handed to the writer thread as one
        # batch by a callback at its end (_handoff): under load the thread then gets as large
        # batches as a per-iteration writer task got, and is woken once per iteration, not per
        # append (each wake-up takes the GIL from the loop).
        self._pending: list[tuple[str, Any, asyncio.Future]] = []
        self._queue: queue.SimpleQueue[list[tuple[str, Any, asyncio.Future]]] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: threading.Thread | None = None
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
        loop = self._loop = asyncio.get_running_loop()
        self._spool.meta["startTime"] = format_time(self.clock())
        self._adopted = await asyncio.to_thread(self._adopt_leftovers)
        self._writer = threading.Thread(target=self._write_loop, args=(loop,), name="chaperone-spool",
                                        daemon=True)
        self._writer.start()
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
        result = (await self._enqueue("events", [self._prepare(event)]))[0]
        if isinstance(result, BaseException):
            raise result
        return result

    async def append_many(self, events: Sequence[Mapping[str, Any]]) -> list[Any]:
        """Append several events in this order, as one queue entry with one future.

        Per event, what ``append`` would return or raise, as
        ``asyncio.gather(*(append(e) for e in events), return_exceptions=True)`` gives it: the
        sealed dict, None (best-effort, not written) or the exception.
        """
        prepared: list[dict[str, Any]] = []
        refused: dict[int, Exception] = {}
        for i, event in enumerate(events):
            try:
                prepared.append(self._prepare(event))
            except Exception as exc:
                refused[i] = exc
        written = iter(await self._enqueue("events", prepared) if prepared else ())
        return [refused[i] if i in refused else next(written) for i in range(len(events))]

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
        if self._writer is not None:
            await self._enqueue("stop", None)
            await asyncio.to_thread(self._writer.join)
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
        return shipped

    async def _enqueue(self, kind: str, payload: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._pending:
            loop.call_soon(self._handoff)
        self._pending.append((kind, payload, future))
        try:
            return await future
        except asyncio.CancelledError:
            future.cancel()  # the writer skips cancelled futures (the events are still written)
            raise

    def _handoff(self) -> None:
        """Event loop, once per iteration with appends: everything collected goes to the
        writer thread as one batch."""
        batch, self._pending = self._pending, []
        self._queue.put(batch)

    # ---- the writer thread ---------------------------------------------------------------------

    def _write_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Batches from the queue until "stop"; between batches, or when the spool's next
        deadline passes without one, the group fsync and the age rotation."""
        helper_threads.yield_to_event_loop()  # a hand-off wakes it without preempting the loop
        get = self._queue.get
        while True:
            deadline = self._spool.next_deadline()
            try:
                batch = get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                batch = []
            else:
                while True:  # everything handed over meanwhile joins the batch
                    try:
                        batch += self._queue.get_nowait()
                    except queue.Empty:
                        break
            if batch:
                try:
                    results = self._process(batch)
                except Exception as exc:  # a bug, not an I/O error: fail the callers, do not hang them
                    results = [exc if kind != "events" else [exc] * len(payload) for kind, payload, _ in batch]
                if not _hand_back(loop, self._settle, batch, results):
                    return  # the loop is gone (process shutting down): the lines are written, nobody waits
            # Only after the callers have their answers: an append returns once its line is in
            # the file, so no flow waits for a group fsync (1-5 ms) or an age rotation.
            if self._spool.maintenance_due():
                self._maintain()
            if self._spool.closed_new and self._shipper is not None:
                self._spool.closed_new = 0
                if not _hand_back(loop, self._shipper.wake):
                    return
            if any(kind == "stop" for kind, _, _ in batch):
                return

    def _maintain(self) -> None:
        """Writer thread: the group fsync and the age rotation, when due."""
        try:
            self._spool.tick()
        except OSError as exc:
            self._spool.report("rotate-failed", str(exc))

    def _process(self, items: list[tuple[str, Any, asyncio.Future]]) -> list[Any]:
        """Writer thread: the events of consecutive entries in one run (one write per run),
        control operations in order. Per entry: a list of per-event results ("events") or
        one result."""
        results: list[Any] = [True] * len(items)
        run: list[dict[str, Any]] = []
        owners: list[tuple[int, int]] = []  # (entry, its number of events) in the run

        def write_run() -> None:
            written, start = self._spool.write(run), 0
            for index, count in owners:
                results[index], start = written[start:start + count], start + count
            run.clear()
            owners.clear()

        for index, (kind, payload, _) in enumerate(items):
            if kind == "events":
                run.extend(payload)
                owners.append((index, len(payload)))
                continue
            if run:
                write_run()
            try:
                if kind == "flush":
                    self._spool.sync()
                    results[index] = self._spool.healthy or SpoolUnavailable(
                        f"spool {self.config.directory}: events were lost (see errors)")
                elif kind == "end":
                    self._spool.finish(payload)
            except (OSError, SpoolUnavailable) as exc:
                self._spool.report("finish-failed", str(exc))
                results[index] = SpoolUnavailable(f"spool {self.config.directory}: {exc}")
        if run:
            write_run()
        return results

    def _settle(self, items: list, results: list) -> None:
        """Event loop: answer a batch (best-effort turns SpoolUnavailable into None)."""
        best_effort = self.config.mode != "strict"
        for (kind, _, future), result in zip(items, results, strict=True):
            if future.done():  # the caller was cancelled; the event was still written
                continue
            if kind == "events":
                if best_effort:
                    result = [None if isinstance(r, SpoolUnavailable) else r for r in result]
                future.set_result(result)
            elif isinstance(result, SpoolUnavailable) and best_effort:
                future.set_result(None)
            elif isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)


def _hand_back(loop: asyncio.AbstractEventLoop, callback: Any, *args: Any) -> bool:
    """Writer thread: schedule ``callback`` on the recorder's loop; False once that loop is closed
    (a process or test tearing down before the recorder stopped), which ends the thread instead of
    raising in it."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        return False
    return True
