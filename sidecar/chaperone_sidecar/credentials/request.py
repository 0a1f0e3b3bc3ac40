"""The request shape the credential injectors work on: what they need of mitmproxy's
``http.Request`` and its ``Headers``, as Protocols.

Its own module, imported by the package and by every injector module alike: the injectors
need the type at the top of their module, and the package imports the injectors, so the type
cannot live in the package's ``__init__`` without a cycle.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol


class HeadersLike(Protocol):
    """The part of mitmproxy's ``Headers`` used here (case-insensitive, multi-valued)."""

    def get(self, key: str, default: Any = None) -> Any: ...
    def get_all(self, key: str) -> list[str]: ...
    def keys(self) -> Iterable[str]: ...
    def pop(self, key: str, default: Any = None) -> Any: ...
    def __setitem__(self, key: str, value: str) -> None: ...
    def __contains__(self, key: object) -> bool: ...


class HTTPLike(Protocol):
    """A request as mitmproxy's ``http.Request`` presents it. ``path`` includes the query;
    ``raw_content`` is the body as on the wire (``None`` while it is being streamed)."""

    method: str
    scheme: str
    host: str
    port: int
    path: str
    host_header: str | None
    headers: HeadersLike
    raw_content: bytes | None
