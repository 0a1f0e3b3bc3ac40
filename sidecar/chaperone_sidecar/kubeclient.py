"""The sidecar's one Kubernetes API client: requests, one token reader, one list+watch loop.

Every part of the sidecar that talks to the apiserver (the connection and policy feeders in
:mod:`.sources`, the ApprovalRequest backend in :mod:`.approvals.kube`, and through it the grant
proofs of :mod:`.approvals.proof`) goes through one :class:`KubeClient` per process: one
:class:`~.http11.Client` (the sidecar's own HTTP/1.1 client: a keep-alive pool, TLS with the
cluster CA), one :class:`TokenFile`, one error type (:class:`KubeError`), one watch parser
(:class:`ListWatch`).

**Why our own module and not a library** - measured with ``python -m
bench.kubeclient_cost --with DIR`` (Python 3.11; import cost in a process that already loaded
asyncio, ssl, aiohttp, aiohttp.web and PyYAML as the sidecar has, median of 3; round trips as a
ServiceAccount against the test bed's kube-apiserver 1.33 on loopback, median of 30)::

    client                          idle RSS   import   list of 20   patch -> watch event
    this module (aiohttp)           +1.2 MB     4 ms    2.4 ms       3.6 ms
    lightkube 0.22 (httpx, anyio)   +11.9 MB  164 ms    2.8 ms       3.9 ms
    kubernetes_asyncio 36.1         +36.8 MB  167 ms    (not run: its import alone rules it out)
    kubernetes 33.1 (sync)          +46.2 MB  216 ms    (synchronous: would pin a thread per watch)

The sidecar is a lean per-pod process (idle RSS ~80 MB against a target of 80 MB, see
docs/benchmarks.md): lightkube would add 15 % to it, kubernetes_asyncio 46 %, for four verbs on
three paths, and neither is faster on the wire (the round trip is the apiserver's). So: this
module - first on aiohttp, since issue 16 (session 5) on :mod:`.http11`, which takes aiohttp's
~12 MB out of the sidecar (h11 is mitmproxy's own). (The operator, one process per cluster, keeps
the official client for its few calls, made off the loop; it imports this package's names from
:mod:`.api`.)

What it does:

* :class:`TokenFile` - the projected ServiceAccount token, re-read (off the event loop) every
  ``refresh_seconds`` and at once after a ``401`` (the kubelet rotates the file well before the
  token expires); a failed re-read keeps the previous token.
* :meth:`KubeClient.request` - one JSON request. ``401`` re-reads the token and retries once;
  ``429``/``503`` (API priority and fairness; "storage is (re)initializing" while a CRD's watch
  cache starts) mean the apiserver did not process the request and are retried up to
  ``transient_retries`` times, waiting what ``Retry-After`` asks (capped at ``max_retry_after``),
  else ``retry_delay`` doubling. Anything else non-2xx, and any transport failure, raises
  :class:`KubeError` (``status`` 0 when there was no answer).
* :meth:`KubeClient.watch` - the events of one watch call, split on newlines as the chunks
  arrive (an event may span chunks; at most 32 MiB), ended when the server ends it; a stream
  cut short (no last chunk) is an error, not an end.
* :class:`ListWatch` - the informer loop: **list** (paginated), then **watch** from the list's
  ``resourceVersion`` with bookmarks; a watch that ends or drops resumes from the last version
  seen (bookmarks included); ``410 Gone`` - as a status or as an ``ERROR`` event - re-lists;
  transient failures (no answer, 401, 429, 5xx, a garbled stream) back off exponentially (or as
  ``Retry-After`` asks) and resume; permanent ones (403, 404: missing RBAC or CRD) raise
  :class:`KubeError` for the caller to decide (the feeders log and retry, a held flow fails).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .http11 import Client, HTTPError

__all__ = ["KubeClient", "KubeError", "TokenFile", "ListWatch", "WatchEvent", "retry_after",
           "RETRY_STATUS"]

log = logging.getLogger("chaperone.kube")

RETRY_STATUS = frozenset({429, 503})  # the apiserver did not process the request: try again
_MAX_LINE = 32 * 1024 * 1024  # one watch event; CRD objects are far smaller


class KubeError(Exception):
    """The apiserver refused (``status``: its HTTP status) or did not answer (``status`` 0)."""

    def __init__(self, status: int, message: str, body: Any = None,
                 retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status
        self.message = message
        self.body = body
        self.retry_after = retry_after  # seconds the server asked to wait (Retry-After), if any

    @property
    def transient(self) -> bool:
        """Worth retrying: no answer, overload or a server error."""
        return self.status == 0 or self.status == 429 or self.status >= 500


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


def _message(data: Any) -> str:
    """The message of a Kubernetes ``Status`` answer, or the start of whatever came back."""
    if isinstance(data, dict) and data.get("message"):
        return str(data["message"])
    return str(data)[:500]


class TokenFile:
    """A bearer token read from a (projected, rotating) file, re-read every ``refresh_seconds``
    and on demand (after a 401). No file: no token (a test apiserver without authentication)."""

    def __init__(self, path: Path | None, refresh_seconds: float = 60.0) -> None:
        self.path = path
        self.refresh_seconds = refresh_seconds
        self._token = ""
        self._read_at = -math.inf

    async def get(self, force: bool = False) -> str:
        if self.path is None:
            return ""
        now = time.monotonic()
        if force or now - self._read_at >= self.refresh_seconds:
            try:
                # Off the loop: a slow or hung filesystem must not stall every held flow.
                token = (await asyncio.to_thread(self.path.read_text)).strip()
            except OSError as exc:
                if not self._token:
                    raise KubeError(0, f"cannot read the service-account token {self.path}: {exc}") from None
                log.warning("keeping the previous token: cannot re-read %s: %s", self.path, exc)
            else:
                self._token = token
            self._read_at = now
        return self._token


class KubeClient:
    """A minimal async Kubernetes API client (JSON requests and watches) on :mod:`.http11`.

    Use it on one event loop (connections belong to their loop); :meth:`aclose` closes the
    connections, and the next call opens new ones.
    """

    def __init__(self, server: str, token_file: str | Path | None, ca_file: str | Path | None = None, *,
                 token_refresh_seconds: float = 60.0, request_timeout: float = 10.0,
                 transient_retries: int = 4, retry_delay: float = 0.5,
                 max_retry_after: float = 5.0) -> None:
        self.server = server.rstrip("/")
        self.token = TokenFile(Path(token_file) if token_file else None, token_refresh_seconds)
        self.ca_file = Path(ca_file) if ca_file else None
        self.request_timeout = request_timeout
        self.transient_retries = max(0, transient_retries)
        self.retry_delay = retry_delay
        self.max_retry_after = max_retry_after
        self.transient_retried = 0  # calls repeated after a 429/503 (telemetry, tests)
        self._client: Client | None = None

    def _http(self) -> Client:
        if self._client is None:
            context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
            # No limit on connections: every held flow's watch is a long-lived one of its own;
            # a few idle ones are kept for the requests.
            self._client = Client(ssl_context=context, connect_timeout=self.request_timeout,
                                  read_timeout=None, max_idle=4)
        return self._client

    async def _headers(self, force: bool = False) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "chaperone-sidecar"}
        if token := await self.token.get(force):
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def backoff(self, wait: float | None, attempt: int) -> float:
        """Seconds before retrying a 429/503: Retry-After (capped), else doubling retry_delay."""
        if wait is None:
            wait = self.retry_delay * (2 ** attempt)
        return min(wait, self.max_retry_after)

    async def request(self, method: str, path: str, *, params: Mapping[str, str] | None = None,
                      body: Any = None, content_type: str = "application/json") -> Any:
        """One request; the decoded JSON body. Raises :class:`KubeError` (see the module doc)."""
        return (await self.call(method, path, params=params, body=body, content_type=content_type))[0]

    async def call(self, method: str, path: str, *, params: Mapping[str, str] | None = None,
                   body: Any = None, content_type: str = "application/json") -> tuple[Any, int]:
        """:meth:`request`, also saying how many times it was repeated after a 429/503 (a
        create repeated after a 503 may have been processed the first time)."""
        data = json.dumps(body).encode() if body is not None else None
        reread, transient = False, 0
        while True:
            headers = await self._headers(force=reread)
            if data is not None:
                headers["Content-Type"] = content_type
            try:
                resp = await self._http().request(method, self.server + path, params=params, body=data,
                                                  headers=headers, timeout=self.request_timeout)
            except HTTPError as exc:
                raise KubeError(0, f"{method} {path}: {exc.__class__.__name__}: {exc}") from exc
            status, reason, raw = resp.status, resp.reason, resp.body
            wait = retry_after(resp.headers.get("Retry-After"))
            try:
                decoded = json.loads(raw) if raw else None
            except ValueError:
                decoded = raw.decode(errors="replace")
            if status == 401 and not reread:
                reread = True  # the token may have rotated: read the file again, once
                continue
            if status in RETRY_STATUS and transient < self.transient_retries:
                delay = self.backoff(wait, transient)
                transient += 1
                self.transient_retried += 1
                log.info("%s %s: HTTP %s (%s); retrying in %.1fs", method, path, status,
                         _message(decoded), delay)
                await asyncio.sleep(delay)
                continue
            if status >= 300:
                raise KubeError(status, _message(decoded) if decoded else (reason or ""), decoded, wait)
            return decoded, transient

    async def watch(self, path: str, params: Mapping[str, str], *,
                    timeout_seconds: int) -> AsyncIterator[dict[str, Any]]:
        """Events of one watch call as dicts ({"type", "object"}); ends when the server ends it.

        A non-200 answer raises :class:`KubeError` (a 401 first forces a token re-read, so the
        next attempt uses the rotated token)."""
        headers = await self._headers()
        # No total timeout: the server ends the watch (timeoutSeconds); a silent connection is
        # dropped 30 s after the server should have ended it.
        query = {**params, "watch": "1", "timeoutSeconds": str(timeout_seconds)}
        try:
            async with self._http().stream("GET", self.server + path, params=query, headers=headers,
                                           read_timeout=timeout_seconds + 30) as resp:
                if resp.status != 200:
                    if resp.status == 401:
                        await self.token.get(force=True)
                    raw = await resp.read(_MAX_LINE)
                    try:
                        decoded = json.loads(raw) if raw else None
                    except ValueError:
                        decoded = raw.decode(errors="replace")
                    raise KubeError(resp.status, _message(decoded) if decoded else (resp.reason or ""),
                                    decoded, retry_after(resp.headers.get("Retry-After")))
                buffer = bytearray()
                async for chunk in resp.chunks():
                    buffer += chunk
                    while (end := buffer.find(b"\n")) >= 0:
                        line = bytes(buffer[:end]).strip()
                        del buffer[:end + 1]
                        if line:
                            yield _event(line)
                    if len(buffer) > _MAX_LINE:
                        raise KubeError(0, "watch event larger than 32 MiB")
                if buffer.strip():
                    yield _event(bytes(buffer))
        except HTTPError as exc:
            raise KubeError(0, f"watch {path}: {exc.__class__.__name__}: {exc}") from exc

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


def _event(line: bytes) -> dict[str, Any]:
    try:
        event = json.loads(line)
    except ValueError as exc:
        raise KubeError(0, f"unreadable watch event: {exc}") from None
    if not isinstance(event, dict):
        raise KubeError(0, "unreadable watch event: not an object")
    return event


@dataclass
class WatchEvent:
    """``LISTED`` (a full list: ``items`` replaces whatever the consumer held), ``ADDED``,
    ``MODIFIED`` or ``DELETED`` (``object``)."""

    type: str
    object: dict[str, Any] = field(default_factory=dict)
    items: list[dict[str, Any]] = field(default_factory=list)


class ListWatch:
    """list + watch of one collection as a stream of :class:`WatchEvent` (see the module doc).

    Iterate it; iterating again after it raised resumes from the last version seen. ``lists``
    counts lists (a ``410 Gone`` re-lists), ``restarts`` resumed watches, ``last_error`` the
    last failure.
    """

    def __init__(self, client: KubeClient, path: str, params: Mapping[str, str] | None = None, *,
                 watch_timeout: int = 290, retry_delay: float = 0.2, backoff_max: float = 30.0,
                 what: str = "") -> None:
        self.client = client
        self.path = path
        self.params = dict(params or {})
        self.watch_timeout = max(1, int(watch_timeout))
        self.retry_delay = retry_delay
        self.backoff_max = backoff_max
        self.what = what or path
        self.resource_version: str | None = None
        self.lists = 0
        self.restarts = 0
        self.last_error = ""

    def __aiter__(self) -> AsyncGenerator[WatchEvent, None]:
        return self._run()

    async def _run(self) -> AsyncGenerator[WatchEvent, None]:
        attempt = 0
        while True:
            watching = False
            try:
                if self.resource_version is None:
                    yield WatchEvent("LISTED", items=await self._list())
                    attempt = 0
                watching = True
                async for event in self._watch():
                    attempt = 0
                    yield event
                self.restarts += 1  # the server ended the watch: resume from the last version
            except KubeError as exc:
                if exc.status == 410:
                    log.info("watch of %s expired (410 Gone); listing again", self.what)
                    self.resource_version = None
                    continue
                self.last_error = str(exc)
                # A 401 on a watch forced a token re-read: the next attempt uses the rotated
                # token (a request re-reads and retries by itself, so its 401 is final).
                if not (exc.transient or (watching and exc.status == 401)):
                    raise  # missing RBAC or CRD, a refused token: the caller decides
                if exc.status in RETRY_STATUS and exc.retry_after is not None:
                    delay = min(exc.retry_after, self.client.max_retry_after)
                else:
                    delay = min(self.retry_delay * (2 ** attempt), self.backoff_max)
                attempt += 1
                self.restarts += 1
                log.info("list/watch of %s failed (%s); resuming in %.1fs", self.what, exc, delay)
                await asyncio.sleep(delay)

    async def _list(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        params = {**self.params, "limit": "500"}
        while True:
            page = await self.client.request("GET", self.path, params=params)
            items += [obj for obj in (page.get("items") or []) if isinstance(obj, dict)]
            meta = page.get("metadata") or {}
            if not meta.get("continue"):
                break
            params = {**self.params, "limit": "500", "continue": meta["continue"]}
        self.resource_version = str(meta.get("resourceVersion") or "")
        self.lists += 1
        return items

    async def _watch(self) -> AsyncIterator[WatchEvent]:
        params = {**self.params, "allowWatchBookmarks": "true"}
        if self.resource_version:
            params["resourceVersion"] = self.resource_version
        async for event in self.client.watch(self.path, params, timeout_seconds=self.watch_timeout):
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                raise KubeError(int(obj.get("code") or 0), str(obj.get("message") or obj), obj)
            meta = obj.get("metadata") or {}
            if meta.get("resourceVersion"):
                self.resource_version = str(meta["resourceVersion"])
            if kind in ("ADDED", "MODIFIED", "DELETED"):
                yield WatchEvent(kind, obj)
