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
"""

from __future__ import annotations

import asyncio
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


class KubeApprovalBackend:
    """Create, find, get and wait for ApprovalRequests in one namespace.

    Needs RBAC ``create, get, list, watch`` on ``approvalrequests.chaperone.dev`` in
    ``namespace``. Open and close it on the loop that uses it (aiohttp sessions are per loop).
    """

    def __init__(self, server: str, namespace: str, *, token_file: str | os.PathLike,
                 ca_file: str | os.PathLike | None = None, token_refresh_seconds: float = 60.0,
                 request_timeout: float = 10.0, watch_timeout_seconds: int = 240,
                 retry_delay: float = 0.5) -> None:
        self.server = server.rstrip("/")
        self.namespace = namespace
        self.token_file = Path(token_file)
        self.ca_file = Path(ca_file) if ca_file else None
        self.token_refresh_seconds = token_refresh_seconds
        self.request_timeout = request_timeout
        self.watch_timeout_seconds = max(1, int(watch_timeout_seconds))
        self.retry_delay = retry_delay
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
        """One JSON request; a 401 re-reads the token (it may have rotated) and retries once."""
        session = await self._client()
        for attempt in (0, 1):
            headers = {"Authorization": f"Bearer {await self._bearer(force=attempt == 1)}",
                       "Accept": "application/json"}
            try:
                async with session.request(method, self.server + path, params=params,
                                           json=body, headers=headers) as resp:
                    status = resp.status
                    try:
                        data = await resp.json(content_type=None)
                    except ValueError:
                        data = await resp.text()
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                raise BackendError(f"{method} {path}: {exc.__class__.__name__}: {exc}") from exc
            if status != 401 or attempt == 1:
                return status, data
        raise AssertionError("unreachable")

    @staticmethod
    def _error(what: str, status: int, data: Any) -> BackendError:
        message = data.get("message") if isinstance(data, dict) else str(data)[:500]
        cls = Conflict if status == 409 else BackendError
        return cls(f"{what}: HTTP {status}: {message}", status)

    # ------------------------------------------------------------------ API
    async def create(self, obj: dict) -> dict:
        """Create ``obj`` (metadata.name set by the caller); ``Conflict`` when the name is taken."""
        obj = {**obj, "apiVersion": f"{GROUP}/{VERSION}", "kind": "ApprovalRequest",
               "metadata": {**obj.get("metadata", {}), "namespace": self.namespace}}
        status, data = await self._call("POST", self._collection, body=obj)
        if status not in (200, 201):
            raise self._error(f"creating ApprovalRequest {obj['metadata'].get('name')}", status, data)
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
                raise self._error(f"watching ApprovalRequest {name}", resp.status, data)
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
                    log.info("waiting for %s: %s; resuming", name, exc)
                    await asyncio.sleep(min(self.retry_delay, max(0.0, deadline - loop.time())))
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
