"""OTLP/HTTP transport: POST a serialised OTLP request with the standard library, retried.

Why hand-written: the SDK's OTLP/HTTP exporters (opentelemetry-exporter-otlp-proto-http) bring
``requests`` (urllib3, charset_normalizer, idna) and protobuf with opentelemetry-proto's
generated classes into the sidecar process - measured +3.3 MB RSS on an interpreter that
already holds mitmproxy and the SDK (docs/benchmarks.md, "Telemetry, session 5"), in every pod
that exports. The bodies are written by our own encoders (:mod:`.otlp_spans`,
:mod:`.otlp_metrics`, :mod:`.otlp_logs`); what is left is one POST, which ``http.client``
does in the exporter's own thread (the SDK's batch processor and periodic reader call
``export`` off the event loop: blocking is fine there).

Same environment as the SDK's exporters (1.45), per signal (``TRACES``/``METRICS``/``LOGS``)
first, then the generic variable: ``OTEL_EXPORTER_OTLP_[SIGNAL_]HEADERS`` (W3C baggage format,
leniently parsed as the SDK does), ``_TIMEOUT`` (seconds, default 10: the whole export,
retries included), ``_COMPRESSION`` (``gzip``, ``deflate`` or ``none``), ``_CERTIFICATE`` (CA
bundle; default certifi's, as ``requests``), ``_CLIENT_CERTIFICATE``/``_CLIENT_KEY`` (mTLS).
The endpoint is given by the caller (``telemetry_setup`` resolves ``..._ENDPOINT``). Retries as
the SDK's ``_OTLPHTTPClient``: up to 6 attempts on 429/502/503/504 and connection errors,
backoff ``2**n`` seconds with 20 % jitter or the server's ``Retry-After``, within the timeout;
a connection error is retried once at once first (a stale kept-alive connection). A request
over 64 MiB (uncompressed) is dropped, as the SDK's ``max_request_size``. Not supported:
``OTEL_PYTHON_EXPORTER_OTLP_HTTP_*_CREDENTIAL_PROVIDER`` (a ``requests.Session`` by
definition) and the exporters' self-metrics (``OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED``).
"""

from __future__ import annotations

import email.utils
import gzip
import http.client
import logging
import math
import os
import random
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from opentelemetry.util.re import parse_env_headers

__all__ = ["OtlpHttpClient", "MAX_REQUEST_SIZE", "USER_AGENT"]

log = logging.getLogger("chaperone.telemetry")

MAX_REQUEST_SIZE = 64 << 20
USER_AGENT = "chaperone-sidecar-otlp"
_RETRYABLE = frozenset({429, 502, 503, 504})
_MAX_ATTEMPTS = 6
_DEFAULT_TIMEOUT = 10.0


def setting(env: Mapping[str, str], signal: str, name: str) -> str:
    """``OTEL_EXPORTER_OTLP_{SIGNAL}_{NAME}``, else ``OTEL_EXPORTER_OTLP_{NAME}``, else ``""``."""
    return (env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_{name}")
            or env.get(f"OTEL_EXPORTER_OTLP_{name}") or "").strip()


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    try:
        at = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(at.timestamp() - time.time(), 0.0) if at.tzinfo else None


class OtlpHttpClient:
    """One signal's OTLP/HTTP endpoint: :meth:`export` posts a serialised request (see the
    module docstring for the settings it reads and how it retries)."""

    def __init__(self, signal: str, endpoint: str, env: Mapping[str, str] | None = None, *,
                 jitter: float = 0.2) -> None:
        env = os.environ if env is None else env
        self.signal = signal
        self.endpoint = endpoint
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"OTLP/HTTP endpoint {endpoint!r} is not an http(s) URL")
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname, parts.port
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        raw_timeout = setting(env, signal, "TIMEOUT")
        try:
            self.timeout = float(raw_timeout) if raw_timeout else _DEFAULT_TIMEOUT
        except ValueError:
            log.warning("Invalid OTLP timeout %r, using %s seconds", raw_timeout, _DEFAULT_TIMEOUT)
            self.timeout = _DEFAULT_TIMEOUT
        self.compression = setting(env, signal, "COMPRESSION").lower() or "none"
        if self.compression not in ("none", "gzip", "deflate"):
            log.warning("Unsupported OTLP compression %r: none used", self.compression)
            self.compression = "none"
        self.headers = {"content-type": "application/x-protobuf", "user-agent": USER_AGENT}
        self.headers.update(parse_env_headers(setting(env, signal, "HEADERS"), liberal=True))
        if self.compression != "none":
            self.headers.setdefault("content-encoding", self.compression)
        self.context: ssl.SSLContext | None = None
        if self.https:
            cafile = setting(env, signal, "CERTIFICATE")
            if not cafile:
                import certifi  # the CA bundle requests verifies with by default

                cafile = certifi.where()
            self.context = ssl.create_default_context(cafile=cafile)
            cert = setting(env, signal, "CLIENT_CERTIFICATE")
            if cert:
                self.context.load_cert_chain(cert, setting(env, signal, "CLIENT_KEY") or None)
        self.jitter = min(max(jitter, 0.0), 1.0)
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # ------------------------------------------------------------------ one attempt
    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        conn = self._conn
        if conn is None:
            if self.https:
                conn = http.client.HTTPSConnection(self.host, self.port, timeout=timeout,
                                                   context=self.context)
            else:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
            self._conn = conn
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _post(self, body: bytes, timeout: float) -> tuple[int, str, str | None]:
        """(status, reason, Retry-After) of one POST; raises OSError/HTTPException when the
        connection fails (it is then closed)."""
        conn = self._connection(max(timeout, 0.001))
        try:
            conn.request("POST", self.path, body=body, headers=self.headers)
            resp = conn.getresponse()
            resp.read()  # the connection is kept alive for the next batch
        except (OSError, http.client.HTTPException):
            self._close()
            raise
        if resp.will_close:
            self._close()
        return resp.status, resp.reason, resp.getheader("retry-after")

    def _submit(self, body: bytes, deadline: float) -> tuple[int, str, str | None]:
        try:
            return self._post(body, deadline - time.monotonic())
        except (OSError, http.client.HTTPException):
            if deadline - time.monotonic() <= 0:
                raise
            return self._post(body, deadline - time.monotonic())  # a stale pooled connection

    # ------------------------------------------------------------------ export
    def export_batch(self, encode: Callable[[Any], bytes], batch: Any) -> bool:
        """Encode ``batch`` (one of the fast encoders) and :meth:`export` it: what each
        signal's exporter does. An encoder error fails the batch, logged, as the SDK's
        exporters report one; nothing is posted then, nor once shut down."""
        if self._stop.is_set():
            log.warning("OTLP %s exporter already shut down, batch dropped", self.signal)
            return False
        try:
            body = encode(batch)
        except Exception as error:  # noqa: BLE001 - as the SDK's export: a failed batch
            log.error("Failed to encode the OTLP %s batch: %s", self.signal, error)
            return False
        return self.export(body)

    def export(self, body: bytes) -> bool:
        """Post ``body`` (a serialised ``Export*ServiceRequest``); True once the endpoint
        answered 2xx/3xx. Failures are logged, as the SDK's exporters log them."""
        if self._stop.is_set():
            log.warning("OTLP %s exporter already shut down, batch dropped", self.signal)
            return False
        if len(body) > MAX_REQUEST_SIZE:
            log.warning("Dropping %s batch: serialized size %d bytes exceeds max_request_size %d "
                        "bytes.", self.signal, len(body), MAX_REQUEST_SIZE)
            return False
        if self.compression == "gzip":
            body = gzip.compress(body, mtime=0)
        elif self.compression == "deflate":
            body = zlib.compress(body)
        deadline = time.monotonic() + self.timeout
        with self._lock:
            for attempt in range(_MAX_ATTEMPTS):
                backoff = 2 ** attempt * random.uniform(1 - self.jitter, 1 + self.jitter)
                status, reason = None, ""
                try:
                    status, reason, retry_after = self._submit(body, deadline)
                except (OSError, http.client.HTTPException) as exc:
                    reason, retryable = str(exc) or type(exc).__name__, True
                else:
                    if 200 <= status < 400:
                        return True
                    retryable = status in _RETRYABLE
                    if retryable and (after := _retry_after(retry_after)) is not None:
                        backoff = after
                if not retryable:
                    log.error("Failed to export %s batch code: %s, reason: %s", self.signal,
                              status, reason)
                    return False
                if attempt + 1 == _MAX_ATTEMPTS or backoff > deadline - time.monotonic() \
                        or self._stop.is_set():
                    log.error("Failed to export %s batch due to timeout, max retries or shutdown "
                              "(last: %s %s).", self.signal, status, reason)
                    return False
                log.warning("Transient error %s %s encountered while exporting %s batch, "
                            "retrying in %.2fs.", status or "", reason, self.signal, backoff)
                if self._stop.wait(backoff):
                    break
        return False

    def shutdown(self) -> None:
        self._stop.set()
        with self._lock:
            self._close()
