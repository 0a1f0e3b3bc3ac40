"""ApprovalRequests through the Kubernetes API, with aiohttp and the watch API.

Why aiohttp and not the ``kubernetes`` client: the sidecar holds flows on mitmproxy's event
loop, and the official client is synchronous (a held flow would pin a thread per watch). Only
four calls are needed (create, get, list by label, watch one name), so raw REST is small.

Authentication is the sidecar's own service-account token. Projected tokens rotate (the
kubelet rewrites the file well before expiry), so the file is re-read every
``token_refresh_seconds`` and at once after a 401.

Waiting uses ``list`` with ``fieldSelector=metadata.name=NAME`` (for the object and a
resourceVersion), then ``watch`` from that version. A watch that ends (server timeout,
dropped connection, apiserver restart) resumes from the last version seen; ``410 Gone``
(version too old) re-lists. The whole wait is bounded by the caller's timeout.

Transient answers. ``429 Too Many Requests`` (API priority and fairness, and - Kubernetes 1.33 -
"storage is (re)initializing" while the watch cache of a just-created or just-restarted
resource starts) and ``503 Service Unavailable`` mean the apiserver did not process the
request. Every call (create, get, list, watch) is retried: create, get and list up to
``transient_retries`` times, waiting what ``Retry-After`` asks (capped at ``max_retry_after``
seconds; without the header ``retry_delay`` doubling per attempt); a watch until the caller's
deadline, waiting the same way. Then the status is raised as a ``BackendError`` (``transient``).
A create retried after a 503 that answers ``409`` with an object carrying the same labels was
our own earlier attempt: that object is returned, so a retry never opens a second request.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import os
import ssl
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Mapping

import aiohttp

from . import BackendError, Conflict

__all__ = ["KubeApprovalBackend", "GROUP", "VERSION", "PLURAL"]

log = logging.getLogger("chaperone.approvals.kube")

GROUP, VERSION, PLURAL = "chaperone.dev", "v1alpha1", "approvalrequests"
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
RETRY_STATUS = frozenset({429, 503})  # the apiserver did not process the request: try again


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delay-seconds or an HTTP date), None if absent
    or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class KubeApprovalBackend:
    """Create, find, get and wait for ApprovalRequests in one namespace.

    Needs RBAC ``create, get, list, watch`` on ``approvalrequests.chaperone.dev`` in
    ``namespace``. Open and close it on the loop that uses it (aiohttp sessions are per loop).
    """

    def __init__(self, server: str, namespace: str, *, token_file: str | os.PathLike,
                 ca_file: str | os.PathLike | None = None, token_refresh_seconds: float = 60.0,
                 request_timeout: float = 10.0, watch_timeout_seconds: int = 240,
                 retry_delay: float = 0.5, transient_retries: int = 4,
                 max_retry_after: float = 5.0) -> None:
        self.server = server.rstrip("/")
        self.namespace = namespace
        self.token_file = Path(token_file)
        self.ca_file = Path(ca_file) if ca_file else None
        self.token_refresh_seconds = token_refresh_seconds
        self.request_timeout = request_timeout
        self.watch_timeout_seconds = max(1, int(watch_timeout_seconds))
        self.retry_delay = retry_delay
        self.transient_retries = max(0, transient_retries)
        self.max_retry_after = max_retry_after
        self.transient_retried = 0  # calls repeated after a 429/503 (telemetry, tests)
        self.watch_restarts = 0  # watches resumed after an end or an error (telemetry, tests)
        self._session: aiohttp.ClientSession | None = None
        self._token = ""
        self._token_read = -math.inf

    @classmethod
    def in_cluster(cls, namespace: str | None = None, *, token_file: str | os.PathLike | None = None,
                   **kwargs: Any) -> "KubeApprovalBackend":
        """From the standard in-pod environment (KUBERNETES_SERVICE_HOST/PORT, the SA mount)."""
        host = os.environ["KUBERNETES_SERVICE_HOST"]
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if ":" in host:
            host = f"[{host}]"
        if namespace is None:
            namespace = (SA_DIR / "namespace").read_text().strip()
        return cls(f"https://{host}:{port}", namespace,
                   token_file=token_file or SA_DIR / "token",
                   ca_file=kwargs.pop("ca_file", SA_DIR / "ca.crt"), **kwargs)

    # ------------------------------------------------------------------ plumbing
    @property
    def _collection(self) -> str:
        return f"/apis/{GROUP}/{VERSION}/namespaces/{self.namespace}/{PLURAL}"

    async def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ctx, limit=0),
                timeout=aiohttp.ClientTimeout(total=self.request_timeout),
            )
        return self._session

    async def _bearer(self, force: bool = False) -> str:
        now = time.monotonic()
        if force or now - self._token_read >= self.token_refresh_seconds:
            try:
                # Off the loop: a slow or hung filesystem must not stall every held flow.
                token = (await asyncio.to_thread(self.token_file.read_text)).strip()
            except OSError as exc:
                if not self._token:
                    raise BackendError(f"cannot read service-account token {self.token_file}: {exc}")
                log.warning("keeping the previous token: cannot re-read %s: %s", self.token_file, exc)
            else:
                self._token = token
            self._token_read = now
        return self._token

    async def _call(self, method: str, path: str, *, params: Mapping[str, str] | None = None,
                    body: Any = None) -> tuple[int, Any]:
        """One JSON request (see :meth:`_request`)."""
        status, data, _ = await self._request(method, path, params=params, body=body)
        return status, data

    async def _request(self, method: str, path: str, *, params: Mapping[str, str] | None = None,
                       body: Any = None) -> tuple[int, Any, bool]:
        """One JSON request: (status, data, whether it was repeated after a 429/503).

        A 401 re-reads the token (it may have rotated) and retries once; a 429/503 is retried
        up to ``transient_retries`` times, waiting what ``Retry-After`` asks.
        """
        session = await self._client()
        reread, transient = False, 0
        while True:
            headers = {"Authorization": f"Bearer {await self._bearer()}",
                       "Accept": "application/json"}
            try:
                async with session.request(method, self.server + path, params=params,
                                           json=body, headers=headers) as resp:
                    status = resp.status
                    wait = retry_after(resp.headers.get("Retry-After"))
                    try:
                        data = await resp.json(content_type=None)
                    except ValueError:
                        data = await resp.text()
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                raise BackendError(f"{method} {path}: {exc.__class__.__name__}: {exc}") from exc
            if status == 401 and not reread:
                reread = True
                await self._bearer(force=True)
                continue
            if status in RETRY_STATUS and transient < self.transient_retries:
                delay = self._backoff(wait, transient)
                transient += 1
                self.transient_retried += 1
                log.info("%s %s: HTTP %s (%s); retrying in %.1fs", method, path, status,
                         _message(data), delay)
                await asyncio.sleep(delay)
                continue
            return status, data, transient > 0

    def _backoff(self, wait: float | None, attempt: int) -> float:
        """Seconds before retrying a 429/503: Retry-After (capped), else doubling retry_delay."""
        if wait is None:
            wait = self.retry_delay * (2 ** attempt)
        return min(wait, self.max_retry_after)

    @staticmethod
    def _error(what: str, status: int, data: Any, retry_after: float | None = None) -> BackendError:
        cls = Conflict if status == 409 else BackendError
        return cls(f"{what}: HTTP {status}: {_message(data)}", status, retry_after)

    # ------------------------------------------------------------------ API
    async def create(self, obj: dict) -> dict:
        """Create ``obj`` (metadata.name set by the caller); ``Conflict`` when the name is taken."""
        obj = {**obj, "apiVersion": f"{GROUP}/{VERSION}", "kind": "ApprovalRequest",
               "metadata": {**obj.get("metadata", {}), "namespace": self.namespace}}
        name = obj["metadata"].get("name")
        status, data, retried = await self._request("POST", self._collection, body=obj)
        if status == 409 and retried and name:
            # An earlier attempt may have been processed after all (a 503 from a proxy in
            # front of the apiserver): the same name with the same labels is ours.
            existing = await self.get(name)
            labels = (obj["metadata"].get("labels") or {})
            if existing is not None and labels and \
                    (existing.get("metadata") or {}).get("labels") == labels:
                return existing
        if status not in (200, 201):
            raise self._error(f"creating ApprovalRequest {name}", status, data)
        return data

    async def get(self, name: str) -> dict | None:
        status, data = await self._call("GET", f"{self._collection}/{name}")
        if status == 404:
            return None
        if status != 200:
            raise self._error(f"reading ApprovalRequest {name}", status, data)
        return data

    async def find(self, labels: Mapping[str, str]) -> list[dict]:
        """ApprovalRequests carrying all ``labels``."""
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        status, data = await self._call("GET", self._collection, params={"labelSelector": selector})
        if status != 200:
            raise self._error(f"listing ApprovalRequests ({selector})", status, data)
        return list(data.get("items") or ())

    async def _list_one(self, name: str) -> tuple[dict | None, str]:
        params = {"fieldSelector": f"metadata.name={name}"}
        status, data = await self._call("GET", self._collection, params=params)
        if status != 200:
            raise self._error(f"listing ApprovalRequest {name}", status, data)
        items = data.get("items") or []
        return (items[0] if items else None), (data.get("metadata") or {}).get("resourceVersion", "")

    async def _watch(self, name: str, rv: str, seconds: float) -> AsyncIterator[dict]:
        """Events of one watch call (ends when the server closes it)."""
        session = await self._client()
        params = {"watch": "1", "fieldSelector": f"metadata.name={name}",
                  "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(max(1, min(self.watch_timeout_seconds, math.ceil(seconds))))}
        if rv:
            params["resourceVersion"] = rv
        headers = {"Authorization": f"Bearer {await self._bearer()}", "Accept": "application/json"}
        # No total timeout: the server ends the watch (timeoutSeconds) and the caller bounds it.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.request_timeout)
        async with session.get(self.server + self._collection, params=params, headers=headers,
                               timeout=timeout) as resp:
            if resp.status == 401:
                await self._bearer(force=True)  # next attempt uses the rotated token
            if resp.status != 200:
                try:
                    data = await resp.json(content_type=None)
                except ValueError:
                    data = await resp.text()
                raise self._error(f"watching ApprovalRequest {name}", resp.status, data,
                                  retry_after(resp.headers.get("Retry-After")))
            buf = b""
            # Lines can exceed aiohttp's readline limit (large bodyPreview + reviews): split here.
            async for chunk in resp.content.iter_any():
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)

    async def wait(self, name: str, timeout: float,
                   done: Callable[[dict], bool]) -> dict | None:
        """The object once ``done(obj)``, or its latest state when ``timeout`` runs out.

        None when the object does not exist or was deleted. Transient failures (dropped
        connections, 5xx, 429) are retried until the deadline; permanent ones (403, missing
        CRD) raise ``BackendError``.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        obj: dict | None = None
        rv = ""
        need_list, listed = True, False
        while True:
            remaining = deadline - loop.time()
            try:
                if need_list:
                    # At least one request's worth of time, even for a tiny remaining budget.
                    obj, rv = await asyncio.wait_for(
                        self._list_one(name), max(remaining, self.request_timeout))
                    need_list, listed = False, True
                    if obj is None or done(obj):
                        return obj
                    remaining = deadline - loop.time()
                if remaining <= 0:
                    return obj
                async with asyncio.timeout(remaining):
                    async for event in self._watch(name, rv, remaining):
                        kind, item = event.get("type"), event.get("object") or {}
                        if kind == "ERROR":
                            if item.get("code") == 410:  # our version was compacted away
                                need_list = True
                            else:
                                log.info("watch of %s reported %s; resuming", name, item.get("message"))
                                await asyncio.sleep(self.retry_delay)
                            break
                        rv = (item.get("metadata") or {}).get("resourceVersion") or rv
                        if kind == "BOOKMARK":
                            continue
                        if kind == "DELETED":
                            return None
                        obj = item
                        if done(obj):
                            return obj
            except TimeoutError:
                if not listed:
                    raise BackendError(f"reading ApprovalRequest {name}: timed out")
                if loop.time() >= deadline:
                    return obj
                # a socket-level timeout, not ours: resume below
            except BackendError as exc:
                if exc.status == 410:
                    need_list = True
                elif not (exc.transient or (listed and exc.status == 401)):
                    raise  # 401 on a watch: the token was re-read, the next attempt uses it
                else:
                    # 429/503: wait what Retry-After asks (capped) - retrying at once would only
                    # add load to an apiserver that is starting up or shedding it.
                    delay = self._backoff(exc.retry_after, 0) if exc.status in RETRY_STATUS \
                        else self.retry_delay
                    log.info("waiting for %s: %s; resuming in %.1fs", name, exc, delay)
                    await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            except (aiohttp.ClientError, OSError, ValueError) as exc:
                log.info("watch of %s dropped (%s: %s); resuming", name, exc.__class__.__name__, exc)
                await asyncio.sleep(min(self.retry_delay, max(0.0, deadline - loop.time())))
            if loop.time() >= deadline:
                if not listed:
                    raise BackendError(f"reading ApprovalRequest {name}: no answer before the deadline")
                return obj
            self.watch_restarts += 1

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _message(data: Any) -> str:
    """The message of a Kubernetes ``Status`` answer, or the start of whatever came back."""
    if isinstance(data, dict) and data.get("message"):
        return str(data["message"])
    return str(data)[:500]
