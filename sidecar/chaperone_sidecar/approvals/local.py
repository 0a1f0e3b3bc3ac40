"""Standalone-mode ApprovalRequests: one JSON file per request in a directory.

``chaperone proxy`` on a laptop has no apiserver, so requests are stored as files holding the
same object shape as the CRD (``metadata``, ``spec``, ``status``); ``chaperone approve|deny
NAME`` calls :meth:`LocalApprovalStore.decide`, and the held flow notices by polling the
file's ``stat`` every ~100 ms (cheap, portable, no inotify dependency).

Writes are atomic (temp file + rename; creation via ``link`` so an existing name is never
overwritten), and decisions are serialised with ``flock`` so two approvers deciding at once
cannot lose a review. The decision rules mirror admission: reviews per user, N-of-M, a single
denial is final, a final decision never changes, no decision after ``expiresAt``. There is no
self-approval check: standalone mode has one local user, who is also the approver.
"""

from __future__ import annotations

import asyncio
import builtins
import datetime as dt
import fcntl
import json
import os
import re
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from ..api import API_VERSION, KIND_APPROVAL_REQUEST
from ..timefmt import format_rfc3339, parse_rfc3339
from . import ApprovalError, BackendError, Conflict

__all__ = ["LocalApprovalStore"]

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DECISIONS = ("Approved", "Denied")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class LocalApprovalStore:
    """The backend interface of ``KubeApprovalBackend`` over a directory, plus ``decide``."""

    def __init__(self, directory: str | os.PathLike, *, poll_interval: float = 0.1,
                 namespace: str = "local") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.poll_interval = poll_interval
        self.namespace = namespace

    # ------------------------------------------------------------------ files
    def path(self, name: str) -> Path:
        if not _NAME.match(name or ""):  # the name becomes a file name: no traversal
            raise ApprovalError(f"invalid ApprovalRequest name {name!r}")
        return self.directory / f"{name}.json"

    def _write(self, path: Path, obj: dict, *, exclusive: bool = False) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(obj, fh, indent=2, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            if exclusive:
                try:
                    os.link(tmp, path)  # atomic, and fails instead of replacing
                except FileExistsError:
                    raise Conflict(f"ApprovalRequest {path.stem} exists", 409) from None
            else:
                os.replace(tmp, path)
                tmp = ""
        finally:
            if tmp:
                os.unlink(tmp)

    def load(self, name: str) -> dict | None:
        try:
            return json.loads(self.path(name).read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise ApprovalError(f"ApprovalRequest file {self.path(name)} is corrupt: {exc}") from exc

    def list(self) -> list[dict]:
        """Every stored request, oldest first."""
        found = [obj for p in self.directory.glob("*.json")
                 if not p.name.startswith(".")  # temp files of writes in progress
                 and (obj := self.load(p.stem)) is not None]
        return sorted(found, key=lambda o: ((o.get("metadata") or {}).get("creationTimestamp", ""),
                                            (o.get("metadata") or {}).get("name", "")))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.directory / ".lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ backend API
    def _create(self, obj: dict) -> dict:
        meta = dict(obj.get("metadata") or {})
        meta.update(namespace=self.namespace, uid=str(uuid.uuid4()),
                    creationTimestamp=format_rfc3339(_now()), resourceVersion="1")
        obj = {"apiVersion": API_VERSION, "kind": KIND_APPROVAL_REQUEST,
               **obj, "metadata": meta}
        obj.setdefault("status", {"phase": "Pending"})
        self._write(self.path(meta.get("name", "")), obj, exclusive=True)
        return obj

    @staticmethod
    async def _off_loop(fn, *args):
        # Disk I/O in a worker thread; OS errors become BackendError like the apiserver's.
        try:
            return await asyncio.to_thread(fn, *args)
        except OSError as exc:
            raise BackendError(f"approval store: {exc}") from exc

    async def create(self, obj: dict) -> dict:
        return await self._off_loop(self._create, obj)

    async def get(self, name: str) -> dict | None:
        return await self._off_loop(self.load, name)

    # builtins.list: inside the class, ``list`` is the method above
    async def find(self, labels: Mapping[str, str]) -> builtins.list[dict]:
        def scan() -> builtins.list[dict]:
            return [o for o in self.list()
                    if all(((o.get("metadata") or {}).get("labels") or {}).get(k) == v
                           for k, v in labels.items())]
        return await self._off_loop(scan)

    async def wait(self, name: str, timeout: float,
                   done: Callable[[dict], bool]) -> dict | None:
        """Poll the file's stat; re-read only when it changed. None when it does not exist."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        path = self.path(name)
        seen: tuple[int, int, int] | None = None
        obj: dict | None = None
        while True:
            try:
                st = os.stat(path)  # microseconds on a local disk: fine on the loop
            except FileNotFoundError:
                return None
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp != seen:
                seen = stamp
                obj = await self.get(name)
                if obj is None:
                    return None
                if done(obj):
                    return obj
            remaining = deadline - loop.time()
            if remaining <= 0:
                return obj
            await asyncio.sleep(min(self.poll_interval, remaining))

    async def close(self) -> None:
        return None

    # ------------------------------------------------------------------ deciding (the CLI)
    def decide(self, name: str, decision: str, user: str, reason: str = "", *,
               groups: tuple[str, ...] = (), now: dt.datetime | None = None) -> dict:
        """Record ``user``'s review; make the decision final when it is (N-of-M, or a denial).

        Returns the stored object. Raises ``ApprovalError`` for an unknown name, a final or
        expired request, a repeated review, or a decision other than Approved/Denied.
        """
        decision = decision.capitalize()
        if decision not in DECISIONS:
            raise ApprovalError(f"decision must be Approved or Denied, got {decision!r}")
        if not user:
            raise ApprovalError("a decision needs the deciding user")
        now = now or _now()
        with self._locked():
            obj = self.load(name)
            if obj is None:
                raise ApprovalError(f"no ApprovalRequest named {name!r} in {self.directory}")
            spec = obj.setdefault("spec", {})
            if spec.get("decision"):
                raise ApprovalError(f"{name} is final: {spec['decision']} by {spec.get('decidedBy')} "
                                    f"at {spec.get('decidedAt')}")
            expires = parse_rfc3339(spec.get("expiresAt"))
            if expires is not None and now >= expires:
                raise ApprovalError(f"{name} expired at {spec.get('expiresAt')}; the agent has to ask again")
            reviews = [r for r in spec.get("reviews") or () if isinstance(r, dict)]
            if any(r.get("user") == user for r in reviews):
                raise ApprovalError(f"{user} already reviewed {name}; each approver decides once")
            review = {"user": user, "groups": list(groups), "decision": decision, "time": format_rfc3339(now)}
            if reason:
                review["reason"] = reason
            reviews.append(review)
            spec["reviews"] = reviews
            needed = int(spec.get("minApprovals") or 1)
            approvals = sum(1 for r in reviews if r.get("decision") == "Approved")
            status = obj.setdefault("status", {})
            if decision == "Denied" or approvals >= needed:
                spec.update(decision=decision, decidedBy=user, decidedAt=format_rfc3339(now))
                if reason:
                    spec["reason"] = reason
                status["phase"] = decision
            status["approvals"] = f"{approvals}/{needed}"
            meta = obj.setdefault("metadata", {})
            meta["resourceVersion"] = str(int(meta.get("resourceVersion") or 0) + 1)
            self._write(self.path(name), obj)
            return obj
