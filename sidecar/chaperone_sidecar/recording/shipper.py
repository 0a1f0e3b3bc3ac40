"""Ship closed spool segments to S3 (or a local directory) as chunks, then the signed manifest.

Why a separate background task: uploads are slow and S3 may be down for minutes; the proxy
must not wait for them. The shipper runs as one asyncio task. An async store (the sidecar's
:class:`~.s3http.AioS3Store`: its own HTTP/1.1 client + SigV4, no boto3) is awaited on the
loop; a blocking one (:class:`DirStore`, the boto3 :class:`S3Store` the ``sessions`` CLI reads
with) runs in a thread (``asyncio.to_thread``), like the spool's file work (reading a segment, its digests,
the fsynced bookkeeping), so the event loop never blocks on the network or the disk. While the
store fails it retries with exponential backoff and jitter; segments stay in the spool
meanwhile.

A segment is deleted only after the store *confirmed* it: the PUT carries our SHA-256 as
``x-amz-checksum-sha256`` (S3 rejects a body that does not match) and ``x-amz-meta-sha256``;
a HEAD afterwards must show the same length, metadata digest and the PUT's ETag. The
confirmation is fsynced to ``shipped.jsonl`` before the segment is unlinked, so a crash
between the two re-confirms (HEAD) instead of re-uploading.

Disk full: confirming must never need free space, or a full spool could never be emptied
(issue 11/10). When ``shipped.jsonl`` cannot grow, the confirmation becomes the segment's new
*name* and the file is emptied (``SessionSpool.record_shipped``): space is freed with no block
written. Re-uploads are idempotent: object keys are deterministic (the segment's first seq), a
key whose PUT outcome is unknown - a crash or a failure between upload and bookkeeping - is
HEADed first and not PUT again when the identical object is there, and an identical re-PUT
(the HEAD failed too) stores the same bytes under the same key, which ``verify`` accepts.

Object layout (store-relative keys; an S3 prefix, if configured, goes in front)::

    sessions/{namespace}/{pod}/{session}/chunk-{firstSeq:08d}.jsonl
    sessions/{namespace}/{pod}/{session}/manifest.json

Object Lock: when the bucket has it enabled (``GetObjectLockConfiguration``), every chunk and
the manifest is written with ``ObjectLockMode`` (COMPLIANCE by default) and
``ObjectLockRetainUntilDate`` = now + ``retention_days`` (30 by default).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import inspect
import json
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from .events import outline, sha256_hex
from .manifest import ManifestKey, build_manifest, manifest_file, sign_manifest

log = logging.getLogger("chaperone.recording")


def session_prefix(namespace: str, pod: str, session: str) -> str:
    return f"sessions/{namespace}/{pod}/{session}/"


def chunk_key(namespace: str, pod: str, session: str, first_seq: int) -> str:
    return f"{session_prefix(namespace, pod, session)}chunk-{first_seq:08d}.jsonl"


class UploadNotConfirmed(RuntimeError):
    """The store accepted a PUT but a HEAD did not show the same object."""


class ObjectStore(Protocol):
    """What the shipper and the reader need from S3 or a directory (keys are store-relative).

    The shipper also takes a store whose ``put``/``head``/``object_lock_enabled`` are
    coroutines (:class:`~.s3http.AioS3Store`), and closes it with ``aclose`` if it has one.
    """

    description: str

    def put(self, key: str, data: bytes, *, sha256: str, content_type: str,
            lock_mode: str | None = None, retain_until: datetime | None = None) -> str: ...
    def head(self, key: str) -> dict[str, Any] | None: ...
    def get(self, key: str) -> bytes: ...
    def list(self, prefix: str = "") -> Iterator[str]: ...
    def object_lock_enabled(self) -> bool: ...


class S3Store:
    """An S3 bucket (any S3-compatible endpoint) through boto3; thread-safe, blocking calls.

    What ``chaperone sessions`` reads recordings with (list, get); the sidecar ships with
    :class:`~.s3http.AioS3Store` instead and never imports boto3.
    """

    def __init__(self, bucket: str, *, prefix: str = "", client: Any = None, **client_kwargs: Any):
        import boto3  # here, so reading a local directory never needs boto3's import time
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.description = f"s3://{bucket}/{self.prefix}"
        config = Config(connect_timeout=3, read_timeout=20, retries={"mode": "standard", "max_attempts": 2})
        self.client = client or boto3.client("s3", config=config, **client_kwargs)

    def put(self, key: str, data: bytes, *, sha256: str, content_type: str,
            lock_mode: str | None = None, retain_until: datetime | None = None) -> str:
        extra: dict[str, Any] = {}
        if lock_mode and retain_until:
            extra = {"ObjectLockMode": lock_mode, "ObjectLockRetainUntilDate": retain_until}
        # Our SHA-256 as the checksum: S3 refuses a body that does not match the manifest's
        # digest. Content-MD5 as well: Object Lock uploads require it (or an SDK checksum
        # algorithm header, which an explicit checksum value does not send).
        response = self.client.put_object(
            Bucket=self.bucket, Key=self.prefix + key, Body=data, ContentType=content_type,
            Metadata={"sha256": sha256},
            ContentMD5=base64.b64encode(hashlib.md5(data).digest()).decode("ascii"),
            ChecksumSHA256=base64.b64encode(bytes.fromhex(sha256)).decode("ascii"), **extra)
        return str(response.get("ETag", "")).strip('"')

    def head(self, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            r = self.client.head_object(Bucket=self.bucket, Key=self.prefix + key, ChecksumMode="ENABLED")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        checksum = r.get("ChecksumSHA256")
        return {"size": r["ContentLength"], "etag": str(r.get("ETag", "")).strip('"'),
                "sha256": r.get("Metadata", {}).get("sha256"),
                "checksum": base64.b64decode(checksum).hex() if checksum else None,
                "lockMode": r.get("ObjectLockMode"), "retainUntil": r.get("ObjectLockRetainUntilDate")}

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"].read()

    def list(self, prefix: str = "") -> Iterator[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + prefix)
        for page in pages:
            for item in page.get("Contents", []):
                yield item["Key"][len(self.prefix):]

    def object_lock_enabled(self) -> bool:
        from botocore.exceptions import ClientError

        try:
            config = self.client.get_object_lock_configuration(Bucket=self.bucket)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code == "ObjectLockConfigurationNotFoundError":
                return False
            if code in ("AccessDenied", "AccessDeniedException"):
                # Without s3:GetBucketObjectLockConfiguration we cannot know; the bucket's
                # default retention (if any) still applies. Say so once, do not block shipping.
                log.warning("recording: cannot read Object Lock configuration of %s (%s); "
                            "objects are written without explicit retention", self.bucket, code)
                return False
            raise
        return config.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"


class DirStore:
    """A local directory with the same layout (standalone mode); files are made read-only."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.description = str(self.root)

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"bad object key {key!r}")
        return self.root.joinpath(*parts)

    def put(self, key: str, data: bytes, *, sha256: str, content_type: str,
            lock_mode: str | None = None, retain_until: datetime | None = None) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o444)
        os.replace(tmp, path)
        return sha256

    def head(self, key: str) -> dict[str, Any] | None:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        digest = sha256_hex(data)
        return {"size": len(data), "etag": digest, "sha256": digest, "checksum": digest}

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None

    def list(self, prefix: str = "") -> Iterator[str]:
        for dirpath, _, files in sorted(os.walk(self.root)):
            for name in sorted(files):
                key = os.path.relpath(os.path.join(dirpath, name), self.root).replace(os.sep, "/")
                if key.startswith(prefix) and not name.endswith(".tmp"):
                    yield key

    def object_lock_enabled(self) -> bool:
        return False


@dataclass
class ShipperConfig:
    object_lock_mode: str = "COMPLIANCE"  # or GOVERNANCE; used only if the bucket has Object Lock
    retention_days: int = 30
    backoff_base: float = 0.5  # seconds; doubles per failed attempt, with jitter
    backoff_max: float = 30.0
    poll_interval: float = 2.0  # look for work even without a wake-up

    def __post_init__(self) -> None:
        if self.object_lock_mode not in ("COMPLIANCE", "GOVERNANCE"):
            raise ValueError("object_lock_mode must be COMPLIANCE or GOVERNANCE")

    def backoff(self, attempt: int) -> float:
        """Exponential backoff with "equal jitter": never zero, never in lockstep with others."""
        ceiling = min(self.backoff_max, self.backoff_base * (2 ** min(attempt, 30)))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


class Shipper:
    """The background task that empties the spool into the store (see the module docstring)."""

    def __init__(self, store: ObjectStore, metrics: Any, *, key: ManifestKey | None = None,
                 config: ShipperConfig | None = None) -> None:
        self.store = store
        self.metrics = metrics
        self.key = key
        self.config = config or ShipperConfig()
        self._spools: list[Any] = []
        self._done: dict[str, asyncio.Event] = {}
        self._lock_enabled: bool | None = None
        self._unsure: set[str] = set()  # keys whose PUT outcome is unknown: HEAD before PUT
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._inflight: asyncio.Future | None = None
        self.last_error: str | None = None

    def add(self, spool: Any) -> None:
        """Ship this session's closed segments, and its manifest once it has ended."""
        self._spools.append(spool)
        self._done[spool.session] = asyncio.Event()
        if spool.recovered is not None:  # uploads may have happened before the crash
            self._unsure.update(self._key(spool, seg) for seg in spool.closed_segments())
            self._unsure.add(self._manifest_key(spool))
        self.wake()

    def forget(self, session: str) -> None:
        """Stop shipping a session (it stays in the spool for the next start)."""
        self._spools = [s for s in self._spools if s.session != session]
        self._done.pop(session, None)

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="chaperone-shipper")

    async def drain(self, session: str | None, timeout: float) -> bool:
        """Wait until ``session`` (None: every session added) is fully shipped, manifest
        included; False on timeout."""
        pending = [e for name, e in self._done.items() if session in (None, name)]
        self.wake()
        try:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in pending)), timeout)
            return True
        except TimeoutError:
            return False

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop after the upload in flight (bounded); unshipped segments stay in the spool."""
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._inflight is not None:
            await asyncio.wait([self._inflight], timeout=timeout)
        close = getattr(self.store, "aclose", None)
        if close is not None:
            await close()

    async def _thread(self, func: Any, *args: Any) -> Any:
        """``func(*args)`` in a thread - or awaited, when it is a coroutine function (an async
        store's method). Shielded: cancelling the task must not abandon a half-finished
        upload unobserved."""
        if inspect.iscoroutinefunction(func):
            self._inflight = asyncio.ensure_future(func(*args))
        else:
            self._inflight = asyncio.ensure_future(asyncio.to_thread(func, *args))
        return await asyncio.shield(self._inflight)

    async def _run(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                await self._ship_all()
                attempt, self.last_error = 0, None
                delay = self.config.poll_interval
            except Exception as exc:  # the store is down or refusing: back off and retry
                self.metrics.add("upload_failures")
                self.last_error = f"{type(exc).__name__}: {exc}"
                delay = self.config.backoff(attempt)
                attempt += 1
                log.warning("recording: upload to %s failed (attempt %d, retry in %.2fs): %s",
                            self.store.description, attempt, delay, self.last_error)
                try:  # a wake-up does not cut a backoff short: only stop() does
                    await asyncio.wait_for(self._stopping.wait(), delay)
                except TimeoutError:
                    pass
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass

    async def _ship_all(self) -> None:
        for spool in list(self._spools):
            for segment in await self._thread(spool.closed_segments):
                await self._ship_segment(spool, segment)
            # an adopted session whose closing events waited for space (disk full): the
            # segments just shipped freed it
            if getattr(spool, "pending_close", None) is not None:
                if await self._thread(spool.complete_recovery):
                    for segment in await self._thread(spool.closed_segments):
                        await self._ship_segment(spool, segment)
            if await self._thread(spool.finished):
                await self._ship_manifest(spool)
                self._spools.remove(spool)
                self._done[spool.session].set()

    def _key(self, spool: Any, segment: Path) -> str:
        meta = spool.meta
        return chunk_key(meta.get("namespace", "unknown"), meta.get("pod", "unknown"),
                         spool.session, int(segment.name.split("-", 1)[1].split(".")[0]))

    @staticmethod
    def _manifest_key(spool: Any) -> str:
        meta = spool.meta
        return session_prefix(meta.get("namespace", "unknown"), meta.get("pod", "unknown"),
                              spool.session) + "manifest.json"

    async def _retention(self) -> tuple[str | None, datetime | None]:
        if self._lock_enabled is None:
            self._lock_enabled = bool(await self._thread(self.store.object_lock_enabled))
        if not self._lock_enabled:
            return None, None
        until = datetime.now(UTC) + timedelta(days=self.config.retention_days)
        return self.config.object_lock_mode, until.replace(microsecond=0)

    async def _upload(self, key: str, data: bytes, content_type: str, digest: str) -> None:
        """PUT (unless an identical object is already there) and confirm with HEAD."""
        mode, until = await self._retention()

        def matches(head: dict[str, Any] | None, etag: str | None) -> bool:
            if not head:
                return False
            return head["size"] == len(data) and head["sha256"] == digest \
                and head.get("checksum") in (None, digest) and etag in (None, head["etag"])

        if key in self._unsure and matches(await self._thread(self.store.head, key), None):
            self._unsure.discard(key)
            return
        self._unsure.add(key)
        put = functools.partial(self.store.put, key, data, sha256=digest, content_type=content_type,
                                lock_mode=mode, retain_until=until)
        etag = await self._thread(put)
        if not matches(await self._thread(self.store.head, key), etag):
            raise UploadNotConfirmed(f"{self.store.description}{key}: HEAD does not match the PUT")
        self._unsure.discard(key)
        self.metrics.add("uploads")

    def _read_segment(self, spool: Any, segment: Path) -> tuple[bytes, dict[str, Any]] | None:
        """In a thread: the segment's complete lines and its ``shipped.jsonl`` entry (None: it
        held no complete line and was discarded)."""
        data = segment.read_bytes()
        count, first, last, cut = outline(data)
        if cut < len(data):  # only a write cut short by a failing disk leaves this in a closed segment
            spool.report("torn-tail", f"{segment.name}: {len(data) - cut} bytes after the last newline dropped")
            data = data[:cut]
        first_seq = int(segment.name.split("-", 1)[1].split(".")[0])
        entry: dict[str, Any] = {"key": self._key(spool, segment), "sha256": sha256_hex(data),
                                 "bytes": len(data), "events": count, "firstSeq": first_seq,
                                 "lastSeq": first_seq + count - 1}
        for name, line in (("first", first), ("last", last)):
            try:
                entry[f"{name}Hash"] = json.loads(line)["hash"]
            except (ValueError, KeyError, TypeError):  # corrupt line: verify will name it
                entry[f"{name}Hash"] = sha256_hex(line)
        if not count:
            spool.discard(segment)
            return None
        return data, entry

    async def _ship_segment(self, spool: Any, segment: Path) -> None:
        read = await self._thread(self._read_segment, spool, segment)
        if read is None:
            return
        data, entry = read
        await self._upload(entry["key"], data, "application/x-ndjson", entry["sha256"])
        try:
            await self._thread(spool.record_shipped, entry, segment)
        except Exception:
            # uploaded but not recorded: the next attempt HEADs before it PUTs again
            self._unsure.add(entry["key"])
            raise

    def _manifest(self, spool: Any) -> bytes:
        """In a thread: the signed manifest (reads ``shipped.jsonl``)."""
        return manifest_file(sign_manifest(build_manifest(spool.meta, spool.ended, spool.shipped()), self.key))

    async def _ship_manifest(self, spool: Any) -> None:
        data = await self._thread(self._manifest, spool)
        await self._upload(self._manifest_key(spool), data, "application/json", sha256_hex(data))
        self.metrics.add("manifests")
        await self._thread(spool.remove)
