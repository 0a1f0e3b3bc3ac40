"""ApprovalRequests through the Kubernetes API, on the sidecar's one :class:`~..kubeclient.KubeClient`.

The backend is four calls (create, get, list by label, wait for one name); transport, token
rotation, 429/503 retries and the watch loop are the shared client's (:mod:`..kubeclient`), so
the feeders and the approvals use one session and one token reader per process. Its errors
(:class:`~..kubeclient.KubeError`) become the approvals interface's ``BackendError`` /
``Conflict`` here, at the backend boundary, because the approval service handles one error type
for both backends (this one and the standalone ``LocalApprovalStore``).

Waiting is a :class:`~..kubeclient.ListWatch` with ``fieldSelector=metadata.name=NAME``: a list
(for the object and a resourceVersion), then a watch from that version; a watch that ends
(server timeout, dropped connection, apiserver restart) resumes from the last version seen,
``410 Gone`` re-lists, ``429``/``503`` wait what ``Retry-After`` asks. The whole wait is bounded
by the caller's timeout; permanent failures (403, missing CRD) raise at once.

A create retried after a 503 that answers ``409`` with an object carrying the same labels was
our own earlier attempt: that object is returned, so a retry never opens a second request.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Mapping
from typing import Any

from ..api import API_VERSION, APPROVAL_REQUESTS, KIND_APPROVAL_REQUEST, collection_path
from ..kubeclient import KubeClient, KubeError, ListWatch
from . import BackendError, Conflict

__all__ = ["KubeApprovalBackend"]


class KubeApprovalBackend:
    """Create, find, get and wait for ApprovalRequests in one namespace.

    Needs RBAC ``create, get, list, watch`` on ``approvalrequests.chaperone.dev`` in
    ``namespace``. ``close`` closes the client's session (the sidecar closes it at shutdown;
    a later call would open a new one).
    """

    def __init__(self, client: KubeClient, namespace: str, *, watch_timeout_seconds: int = 240,
                 retry_delay: float = 0.5) -> None:
        self.client = client
        self.namespace = namespace
        self.watch_timeout_seconds = max(1, int(watch_timeout_seconds))
        self.retry_delay = retry_delay
        self.watch_restarts = 0  # watches resumed after an end or an error (telemetry, tests)

    @property
    def transient_retried(self) -> int:
        """Calls repeated after a 429/503 (the client's count: telemetry, tests)."""
        return self.client.transient_retried

    @property
    def _collection(self) -> str:
        return collection_path(APPROVAL_REQUESTS, self.namespace)

    async def _call(self, what: str, method: str, path: str, *,
                    params: Mapping[str, str] | None = None, body: Any = None) -> tuple[Any, int]:
        """(data, how often it was repeated after a 429/503); KubeError -> BackendError."""
        try:
            return await self.client.call(method, path, params=params, body=body)
        except KubeError as exc:
            raise _backend_error(what, exc) from exc

    # ------------------------------------------------------------------ API
    async def create(self, obj: dict) -> dict:
        """Create ``obj`` (metadata.name set by the caller); ``Conflict`` when the name is taken."""
        obj = {**obj, "apiVersion": API_VERSION, "kind": KIND_APPROVAL_REQUEST,
               "metadata": {**obj.get("metadata", {}), "namespace": self.namespace}}
        name = obj["metadata"].get("name")
        before = self.client.transient_retried
        try:
            data, _ = await self.client.call("POST", self._collection, body=obj)
        except KubeError as exc:
            if exc.status == 409 and name and self.client.transient_retried > before:
                # An earlier attempt may have been processed after all (a 503 from a proxy in
                # front of the apiserver): the same name with the same labels is ours.
                existing = await self.get(name)
                labels = (obj["metadata"].get("labels") or {})
                if existing is not None and labels and \
                        (existing.get("metadata") or {}).get("labels") == labels:
                    return existing
            raise _backend_error(f"creating ApprovalRequest {name}", exc) from exc
        return data

    async def get(self, name: str) -> dict | None:
        try:
            data, _ = await self.client.call("GET", f"{self._collection}/{name}")
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise _backend_error(f"reading ApprovalRequest {name}", exc) from exc
        return data

    async def find(self, labels: Mapping[str, str]) -> list[dict]:
        """ApprovalRequests carrying all ``labels``."""
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        data, _ = await self._call(f"listing ApprovalRequests ({selector})", "GET", self._collection,
                                   params={"labelSelector": selector})
        return list(data.get("items") or ())

    async def wait(self, name: str, timeout: float,
                   done: Callable[[dict], bool]) -> dict | None:
        """The object once ``done(obj)``, or its latest state when ``timeout`` runs out.

        None when the object does not exist or was deleted. Transient failures (dropped
        connections, 5xx, 429) are retried until the deadline; permanent ones (403, missing
        CRD) raise ``BackendError``.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        stream = ListWatch(self.client, self._collection, {"fieldSelector": f"metadata.name={name}"},
                           watch_timeout=max(1, min(self.watch_timeout_seconds, math.ceil(timeout))),
                           retry_delay=self.retry_delay, backoff_max=max(self.retry_delay, 5.0),
                           what=f"ApprovalRequest {name}")
        obj: dict | None = None
        listed = False
        try:
            # At least one request's worth of time for the first list, even for a tiny budget.
            async with asyncio.timeout_at(max(deadline, loop.time() + self.client.request_timeout)) as scope, \
                    contextlib.aclosing(aiter(stream)) as events:
                async for event in events:
                    if event.type == "LISTED":
                        obj = event.items[0] if event.items else None
                        if not listed:
                            listed = True
                            scope.reschedule(deadline)
                        if obj is None or done(obj):
                            return obj
                    elif event.type == "DELETED":
                        return None
                    else:
                        obj = event.object
                        if done(obj):
                            return obj
                    if loop.time() >= deadline:
                        return obj
        except TimeoutError:
            if not listed:
                raise BackendError(f"reading ApprovalRequest {name}: no answer before the deadline") from None
            return obj
        except KubeError as exc:
            raise _backend_error(f"waiting for ApprovalRequest {name}", exc) from exc
        finally:
            self.watch_restarts += stream.restarts
        return obj  # not reached: the stream never ends

    async def close(self) -> None:
        await self.client.aclose()


def _backend_error(what: str, exc: KubeError) -> BackendError:
    cls = Conflict if exc.status == 409 else BackendError
    return cls(f"{what}: {exc}", exc.status, exc.retry_after)
