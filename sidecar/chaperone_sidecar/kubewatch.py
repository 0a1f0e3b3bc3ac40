"""The sidecar's own view of the Kubernetes API: a minimal aiohttp client and list+watch.

:class:`KubeClient` authenticates with the sidecar's ServiceAccount token, re-read from the
projected file on every request because the kubelet rotates it. The sidecar needs only JSON
requests and watches on a handful of paths, so this is a few dozen lines on aiohttp rather
than the official client (which would pull a synchronous stack into the proxy's event loop).

:class:`Reflector` keeps one collection in memory: **list** (paginated), then **watch** from
the list's ``resourceVersion`` with bookmarks; a watch that ends or drops is resumed from the
last seen resourceVersion, a ``410 Gone`` (too old) re-lists, other failures retry with
exponential backoff. :class:`~.sources.KubeSources` runs one per kind and turns their items
into Snapshots.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Mapping

__all__ = ["KubeClient", "KubeError", "Reflector"]

# The logger name predates this module: log filters and dashboards select on it.
log = logging.getLogger("chaperone.sources")

_MAX_LINE = 32 * 1024 * 1024  # one watch event; CRD objects are far smaller


class KubeError(Exception):
    def __init__(self, status: int, message: str, body: Any = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.body = body


class _Gone(Exception):
    """The watch's resourceVersion is too old (410): re-list."""


class KubeClient:
    """A minimal async Kubernetes API client on aiohttp, authenticated with a token file."""

    def __init__(self, server: str, token_file: Path | None, ca_file: Path | None, *,
                 request_timeout: float = 30.0):
        self.server = server.rstrip("/")
        self.token_file = token_file
        self.ca_file = ca_file
        self.request_timeout = request_timeout
        self._session: Any = None

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "chaperone-sidecar"}
        if self.token_file is not None:
            try:
                token = self.token_file.read_text().strip()
            except OSError as exc:
                raise KubeError(0, f"cannot read the service-account token {self.token_file}: {exc}") from None
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _get_session(self) -> Any:
        import aiohttp

        if self._session is None:
            context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context))
        return self._session

    async def request(self, method: str, path: str, *, params: Mapping[str, str] | None = None,
                      body: Any = None, content_type: str = "application/json") -> Any:
        """One request; returns the decoded JSON body, raises KubeError for non-2xx."""
        import aiohttp

        headers = self._headers()
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body).encode()
        async with self._get_session().request(
                method, self.server + path, params=params, data=data, headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.request_timeout)) as resp:
            raw = await resp.read()
        try:
            decoded = json.loads(raw) if raw else None
        except ValueError:
            decoded = raw.decode(errors="replace")
        if resp.status >= 300:
            message = decoded.get("message") if isinstance(decoded, dict) else str(decoded)[:300]
            raise KubeError(resp.status, message or resp.reason or "", decoded)
        return decoded

    async def watch(self, path: str, params: Mapping[str, str], *,
                    read_timeout: float) -> AsyncIterator[dict[str, Any]]:
        """Watch events as dicts ({"type", "object"}); ends when the server closes the watch."""
        import aiohttp

        async with self._get_session().get(
                self.server + path, params={**params, "watch": "1"}, headers=self._headers(),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.request_timeout,
                                              sock_read=read_timeout)) as resp:
            if resp.status == 410:
                raise _Gone()
            if resp.status >= 300:
                raw = await resp.read()
                raise KubeError(resp.status, raw.decode(errors="replace")[:300])
            buffer = bytearray()
            async for chunk in resp.content.iter_any():
                buffer += chunk
                while (end := buffer.find(b"\n")) >= 0:
                    line = bytes(buffer[:end]).strip()
                    del buffer[:end + 1]
                    if line:
                        yield json.loads(line)
                if len(buffer) > _MAX_LINE:
                    raise KubeError(0, "watch event larger than 32 MiB")
            if buffer.strip():
                yield json.loads(bytes(buffer))

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class Reflector:
    """list + watch of one resource collection into ``items`` (name -> object)."""

    def __init__(self, client: KubeClient, path: str, on_change: Callable[[], None], what: str, *,
                 watch_timeout: int = 290, backoff_max: float = 30.0):
        self.client = client
        self.path = path
        self.on_change = on_change
        self.what = what
        self.items: dict[str, dict[str, Any]] = {}
        self.synced = asyncio.Event()
        self.resource_version: str | None = None
        self.watch_timeout = watch_timeout
        self.backoff_max = backoff_max
        self.lists = 0  # how many times we listed (tests: 410 Gone re-lists)
        self.last_error = ""

    async def run(self) -> None:
        backoff = 0.2
        while True:
            try:
                if self.resource_version is None:
                    await self._list()
                await self._watch()
                backoff = 0.2
            except _Gone:
                log.info("watch of %s expired (410 Gone); listing again", self.what)
                self.resource_version = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("list/watch of %s failed (%s); retrying in %.1fs", self.what,
                            self.last_error, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.backoff_max)

    async def _list(self) -> None:
        items: dict[str, dict[str, Any]] = {}
        params: dict[str, str] = {"limit": "500"}
        while True:
            page = await self.client.request("GET", self.path, params=params)
            for obj in page.get("items") or []:
                name = (obj.get("metadata") or {}).get("name")
                if name:
                    items[name] = obj
            meta = page.get("metadata") or {}
            if not meta.get("continue"):
                break
            params = {"limit": "500", "continue": meta["continue"]}
        self.items = items
        self.resource_version = str(meta.get("resourceVersion") or "")
        self.lists += 1
        self.synced.set()
        self.on_change()

    async def _watch(self) -> None:
        params = {"resourceVersion": self.resource_version or "", "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(self.watch_timeout)}
        async for event in self.client.watch(self.path, params, read_timeout=self.watch_timeout + 30):
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    raise _Gone()
                raise KubeError(int(obj.get("code") or 0), str(obj.get("message") or obj))
            meta = obj.get("metadata") or {}
            if meta.get("resourceVersion"):
                self.resource_version = str(meta["resourceVersion"])
            if kind == "BOOKMARK":
                continue
            name = meta.get("name")
            if not name:
                continue
            if kind in ("ADDED", "MODIFIED"):
                self.items[name] = obj
            elif kind == "DELETED":
                self.items.pop(name, None)
            else:
                continue
            self.on_change()
