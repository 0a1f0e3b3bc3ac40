"""Protobuf wire-format pieces shared by the OTLP encoders (:mod:`.otlp_spans`,
:mod:`.otlp_metrics`, :mod:`.otlp_logs`): varints, length-delimited fields, ``AnyValue`` /
``KeyValue`` (opentelemetry-proto's ``common.proto``), attributes with a cache of their
encoded pieces, instrumentation scopes and resources.

Why not protobuf: building one Python protobuf object per attribute and value was the largest
part of telemetry's CPU per request (docs/benchmarks.md, "Per-request CPU: telemetry"), and
protobuf with opentelemetry-proto's classes is ~3 MB of RSS in every exporting sidecar
(:mod:`.otlp_http` has the measurement). Each encoder is tested by parse-equality against the
SDK's encoder (protobuf stays a test dependency).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["FIXED64", "SFIXED64", "DOUBLE", "FIXED32", "TAGS", "Unsupported", "Writer", "CACHE",
           "varint", "field", "value", "key_value"]

log = logging.getLogger("chaperone.telemetry")

FIXED64 = struct.Struct("<Q").pack
SFIXED64 = struct.Struct("<q").pack
DOUBLE = struct.Struct("<d").pack
FIXED32 = struct.Struct("<I").pack
_CACHE_MAX = 4096  # encoded KeyValues kept (a few hundred bytes each at most: bounded memory)
_CACHEABLE = 256  # a longer string value (a URL with a query ...) is encoded, not cached


class Unsupported(Exception):
    """A value OTLP's ``AnyValue`` cannot hold (the SDK's encoder raises for it too)."""


def varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64: two's complement, ten bytes
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


TAGS = {(f, w): varint(f << 3 | w) for f in range(1, 17) for w in (0, 1, 2, 5)}


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (a message, string, bytes or packed repeated scalars)."""
    return TAGS[number, 2] + varint(len(payload)) + payload


def value(v: Any) -> bytes:
    """An ``AnyValue`` message's bytes (its oneof is always written, even when zero)."""
    if v is None:
        return b""
    if isinstance(v, bool):
        return b"\x10\x01" if v else b"\x10\x00"
    if isinstance(v, str):
        return field(1, v.encode("utf-8"))
    if isinstance(v, int):
        if not -(1 << 63) <= v < (1 << 63):
            raise Unsupported("int64 out of range")
        return b"\x18" + varint(v)
    if isinstance(v, float):
        return b"\x21" + DOUBLE(v)
    if isinstance(v, bytes):
        return field(7, v)
    if isinstance(v, Sequence):
        return field(5, b"".join(field(1, value(x)) for x in v))
    if isinstance(v, Mapping):
        return field(6, b"".join(field(1, key_value(str(k), x)) for k, x in v.items()))
    raise Unsupported(type(v).__name__)


def key_value(key: str, v: Any) -> bytes:
    return field(1, key.encode("utf-8")) + field(2, value(v))


class Writer:
    """Attributes, scopes and resources; the KeyValue cache (keyed by field number, key, type
    and value: the same piece under the same field number is the same bytes in any message)
    outlives a batch."""

    def __init__(self, cache: dict[tuple[int, str, type, Any], bytes]) -> None:
        self.cache = cache

    def attributes(self, number: int, attributes: Mapping[str, Any] | None) -> bytes:
        """Repeated ``KeyValue`` field ``number``; a value ``AnyValue`` cannot hold leaves its
        attribute out with an error in the log, as the SDK's ``_encode_attributes`` does."""
        if not attributes:
            return b""
        cache = self.cache
        parts: list[bytes] = []
        append = parts.append
        tag = TAGS[number, 2]
        for key, v in attributes.items():
            kind = type(v)
            # floats are not cached: -0.0 == 0.0 would share one encoding (and they vary anyway)
            cacheable = (kind is str and len(v) <= _CACHEABLE) or kind is int or kind is bool
            ckey = (number, key, kind, v) if cacheable else None
            piece = cache.get(ckey) if ckey is not None else None
            if piece is None:
                try:
                    piece = tag + varint(len(kv := key_value(key, v))) + kv
                except Unsupported as error:
                    log.error("Failed to encode key %s: %s", key, error)
                    continue
                if ckey is not None:
                    if len(cache) >= _CACHE_MAX:
                        cache.clear()
                    cache[ckey] = piece
            append(piece)
        return b"".join(parts)

    def scope(self, scope: Any) -> bytes:
        """An ``InstrumentationScope`` message (empty for None)."""
        if scope is None:
            return b""
        return b"".join((field(1, scope.name.encode("utf-8")) if scope.name else b"",
                         field(2, scope.version.encode("utf-8")) if scope.version else b"",
                         self.attributes(3, scope.attributes)))

    def resource(self, resource: Any) -> bytes:
        """A ``Resource`` message."""
        return self.attributes(1, resource.attributes)

    def grouped(self, resources: Mapping[Any, Mapping[Any, Sequence[bytes]]]) -> bytes:
        """The repeated ``Resource{Spans,Metrics,Logs}`` of an export request: per resource its
        ``Resource``, per scope a ``Scope...`` message holding the scope and the encoded items
        (each already a field 2 of it), and the schema URLs - the framing the three signals
        share (``resources``: resource -> scope (None: none) -> encoded items)."""
        out = []
        for resource, scopes in resources.items():
            body = [field(1, self.resource(resource))]
            for scope, items in scopes.items():
                schema = scope.schema_url if scope is not None else None
                body.append(field(2, field(1, self.scope(scope)) + b"".join(items)
                                  + (field(3, schema.encode("utf-8")) if schema else b"")))
            if resource.schema_url:
                body.append(field(3, resource.schema_url.encode("utf-8")))
            out.append(field(1, b"".join(body)))
        return b"".join(out)


CACHE: dict[tuple[int, str, type, Any], bytes] = {}
