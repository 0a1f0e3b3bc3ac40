"""Credential injection: the agent never holds target credentials; the sidecar adds them.

One ``CredentialInjector`` per ClaudeConnection, built from the connection's spec and the
directory its Secret is mounted at::

    injector = CredentialInjector.for_connection(conn["spec"], Path("/etc/chaperone/conn/x"))
    await injector.start()                  # web identity: first STS exchange + refresh task
    ...
    decoder = injector.apply(flow.request)  # in the addon's request hook
    await injector.aclose()

``apply`` works on a mitmproxy ``http.Request`` (anything shaped like ``request.HTTPLike``), mutates it
in place, and is cheap and non-blocking: credentials come from a cache (a ``readlink``/``stat``
decides whether mounted files changed; STS refreshes run in a worker thread in the
background). It raises ``CredentialsUnavailable`` (answer 503) or ``InjectionError`` (answer
400); it returns an ``AwsChunkedDecoder`` only when an aws-chunked upload is being streamed, for
the addon to install as ``flow.request.stream`` (call ``apply`` from ``requestheaders`` then).

Per connection type (``spec.type``):

* ``aws``: strip the agent's SigV4 signature, re-sign with botocore (``aws_sigv4``); credentials
  from the Secret (``StaticAWSSource``) or AssumeRoleWithWebIdentity (``WebIdentitySource``).
* ``http``: ``credentials.header`` (default ``Authorization``) = ``prefix`` + token.
* ``anthropic``: ``x-api-key``; the agent's ``x-api-key``/``Authorization`` removed.
* ``kubernetes``: ``Authorization: Bearer`` from the Secret's token key, or from a projected
  service-account token file passed as ``token_file``.

``credentials.source: none`` leaves http/anthropic/kubernetes requests untouched and sends aws
requests unsigned (anonymous) after stripping the agent's signature.

**Loading point of the AWS signer** (issue 16): ``aws_sigv4`` (botocore's ``auth``,
``awsrequest`` and ``credentials`` modules, ~3-6 MB of RSS with what they import) is imported
by :meth:`CredentialInjector.for_connection` when it builds the injector of an ``aws``
connection - i.e. when the snapshot first holds one (``services.InjectorRegistry.update``) -
not when this package is imported: a pod without AWS connections never loads it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .aws_chunked import AwsChunkedDecoder
from .credential_sources import StaticAWSSource, TokenSource, WebIdentitySource, utcnow
from .headers import HeaderInjector, anthropic_injector, http_injector, kubernetes_injector
from .request import HTTPLike

if TYPE_CHECKING:
    from .aws_sigv4 import AWSResigner

__all__ = ["CredentialInjector"]


def _spec_of(connection: dict) -> dict:
    # Accept the whole ClaudeConnection object as well as its spec.
    if "type" not in connection and isinstance(connection.get("spec"), dict):
        return connection["spec"]
    return connection


class CredentialInjector:
    """The credentials of one connection, applied to each of its requests."""

    def __init__(self, kind: str, injector: AWSResigner | HeaderInjector | None,
                 source: object | None = None) -> None:
        self.kind = kind
        self.injector = injector
        self.source = source  # the refreshable source, if any (for start/aclose)

    def __repr__(self) -> str:
        return f"CredentialInjector(kind={self.kind!r}, injector={self.injector!r})"

    @classmethod
    def for_connection(cls, connection_spec: dict, secret_dir: Path | str | None, *,
                       token_file: Path | str | None = None, pod_name: str | None = None,
                       clock: Callable[[], datetime] = utcnow) -> CredentialInjector:
        """Build from a ClaudeConnection spec and the mount directory of its Secret.

        ``token_file``: a projected service-account token (kubernetes: used instead of the
        Secret's token key; aws webIdentity: default ``secret_dir/token``). ``pod_name`` makes
        the default role session name ``chaperone-POD`` (default: ``$HOSTNAME``).
        """
        spec = _spec_of(connection_spec)
        kind = spec.get("type")
        creds = spec.get("credentials") or {"source": "none"}
        source_kind = creds.get("source", "none")
        ref = creds.get("secretRef") or {}

        def need_dir() -> Path:
            if secret_dir is None:
                raise ValueError(f"connection type {kind} with credentials.source "
                                 f"{source_kind} needs the Secret's mount directory")
            return Path(secret_dir)

        def token() -> TokenSource:
            if token_file is not None and kind == "kubernetes":
                return TokenSource.from_file(token_file)
            return TokenSource(need_dir(), ref.get("tokenKey", "token"))

        if kind == "aws":
            # Imported here, not at the top, for memory only: botocore's signer is loaded when
            # the first aws connection's injector is built (module docstring, docs/benchmarks.md).
            from .aws_sigv4 import AWSResigner

            aws = spec.get("aws") or {}
            source: Any = None
            if source_kind == "secret":
                source = StaticAWSSource(
                    need_dir(),
                    access_key_id_key=ref.get("accessKeyIdKey", "AWS_ACCESS_KEY_ID"),
                    secret_access_key_key=ref.get("secretAccessKeyKey", "AWS_SECRET_ACCESS_KEY"),
                    session_token_key=ref.get("sessionTokenKey", "AWS_SESSION_TOKEN"))
            elif source_kind == "webIdentity":
                if not aws.get("roleArn"):
                    raise ValueError("credentials.source webIdentity needs aws.roleArn")
                pod = pod_name or os.environ.get("HOSTNAME") or "sidecar"
                source = WebIdentitySource(
                    role_arn=aws["roleArn"],
                    token=TokenSource.from_file(token_file or need_dir() / "token"),
                    session_name=(aws.get("sessionName") or f"chaperone-{pod}")[:64],
                    region=aws.get("region") or "us-east-1",
                    endpoint_url=aws.get("endpointURL"), clock=clock)
            resigner = AWSResigner(source, region=aws.get("region"),
                                   endpoint_url=aws.get("endpointURL"), clock=clock)
            return cls(kind, resigner, source if source_kind == "webIdentity" else None)
        if kind == "postgres":  # no request to inject into: postgres/upstream.py logs in itself
            return cls(kind, None)
        if kind not in ("http", "anthropic", "kubernetes", "mcp"):
            raise ValueError(f"unknown connection type {kind!r}")
        if source_kind == "none" and not (kind == "kubernetes" and token_file is not None):
            return cls(kind, None)
        if source_kind != "secret" and not (kind == "kubernetes" and token_file is not None):
            raise ValueError(f"credentials.source {source_kind!r} is not supported for {kind}")
        if kind in ("http", "mcp"):  # an MCP server takes a header or bearer token like HTTP
            return cls(kind, http_injector(token(), header=creds.get("header"),
                                           prefix=creds.get("prefix")))
        if kind == "anthropic":
            return cls(kind, anthropic_injector(token()))
        return cls(kind, kubernetes_injector(token()))

    def apply(self, request: HTTPLike) -> AwsChunkedDecoder | None:
        """Replace the agent's credentials on ``request`` (in place); see the module doc."""
        if self.injector is None:
            return None
        return self.injector.apply(request)

    async def start(self) -> None:
        """Fetch refreshable credentials once and keep them fresh (no-op for static ones)."""
        if isinstance(self.source, WebIdentitySource):
            await self.source.start()

    async def aclose(self) -> None:
        if isinstance(self.source, WebIdentitySource):
            await self.source.aclose()
