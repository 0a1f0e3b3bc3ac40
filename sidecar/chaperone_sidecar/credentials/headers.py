"""Header credentials: bearer tokens, API keys, the Anthropic ``x-api-key``, Kubernetes tokens.

Why the agent's own value is always removed first: the agent holds no credentials, so whatever
it puts in the credential header is either a placeholder or an attempt to reach the target as
someone else. Removing every occurrence (a header can repeat) before setting ours means the
upstream sees exactly one value, the sidecar's.

Kubernetes: the agent's ``Impersonate-*`` headers are removed as well. Combined with the
sidecar's token they would let the agent act as any user the token may impersonate, an
escalation no policy rule asked for.

Tokens containing CR or LF are refused (``CredentialsUnavailable``): a header value with a line
break could smuggle extra headers upstream.
"""

from __future__ import annotations

from collections.abc import Iterable

from .credential_sources import CredentialsUnavailable, TokenSource
from .request import HTTPLike

KUBERNETES_STRIPPED_PREFIXES = ("impersonate-",)


class HeaderInjector:
    """Sets ``header: prefix + token`` after removing the agent's credential headers."""

    def __init__(self, token: TokenSource, *, header: str = "Authorization",
                 prefix: str = "Bearer ", strip: Iterable[str] = (),
                 strip_prefixes: Iterable[str] = ()) -> None:
        if not header or any(c in header for c in ":\r\n \t"):
            raise ValueError(f"invalid header name {header!r}")
        if "\r" in prefix or "\n" in prefix:
            raise ValueError("header prefix must not contain line breaks")
        self.token = token
        self.header = header
        self.prefix = prefix
        self.strip = tuple(dict.fromkeys(h.lower() for h in (header, *strip)))
        self.strip_prefixes = tuple(p.lower() for p in strip_prefixes)

    def __repr__(self) -> str:
        return f"HeaderInjector(header={self.header!r}, token={self.token!r})"

    def apply(self, request: HTTPLike) -> None:
        value = self.token.value().reveal()  # before touching the request: fail cleanly
        if "\r" in value or "\n" in value:
            raise CredentialsUnavailable(
                f"the token for header {self.header} contains a line break; refusing to send it")
        headers = request.headers
        for name in self.strip:
            headers.pop(name, None)
        if self.strip_prefixes:
            for name in [n for n in headers.keys() if n.lower().startswith(self.strip_prefixes)]:
                headers.pop(name, None)
        headers[self.header] = self.prefix + value
        return None


def http_injector(token: TokenSource, *, header: str | None = None,
                  prefix: str | None = None) -> HeaderInjector:
    """ClaudeConnection type ``http``: ``credentials.header`` / ``credentials.prefix``."""
    return HeaderInjector(token, header=header or "Authorization",
                          prefix="Bearer " if prefix is None else prefix)


def anthropic_injector(token: TokenSource) -> HeaderInjector:
    """Type ``anthropic``: ``x-api-key``; an agent's ``Authorization`` (an OAuth token or a
    placeholder) is removed so the API never sees two identities."""
    return HeaderInjector(token, header="x-api-key", prefix="", strip=("authorization",))


def kubernetes_injector(token: TokenSource) -> HeaderInjector:
    """Type ``kubernetes``: ``Authorization: Bearer`` from a Secret key or a projected
    service-account token file (both are ``TokenSource``s, re-read on rotation)."""
    return HeaderInjector(token, header="Authorization", prefix="Bearer ",
                          strip_prefixes=KUBERNETES_STRIPPED_PREFIXES)
