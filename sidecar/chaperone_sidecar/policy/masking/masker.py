"""``Masker``: masking for whole bodies, built once from the ``MaskSpec``s of a decision.

Order of work for one body (``mask_bytes``):

1. Content-Encoding is decoded with the smallest ``max_body_bytes`` of the specs as the cap
   (a bomb raises ``BodyTooLarge``; an unknown coding raises ``UnsupportedEncoding``: the
   caller refuses the message rather than forward it unmasked).
2. Binary bodies (``MaskResult.binary``): a body is binary when its content type is not a
   text type *and* it is not UTF-8 (or contains NUL). Only their printable ASCII runs are
   scanned, and findings are masked in place, length preserving (``decoded.mask_binary``):
   rewriting anything else inside images or protobufs would corrupt them.
3. JSON bodies get the field rules first (parsed, matched values replaced, re-serialised
   compactly), then the detectors over the serialised text; other text gets the detectors.
   In JSON (and NDJSON/SSE) a detector hit outside a string - a bare number such as a card
   number - is replaced by a quoted token so the document stays valid JSON. The detectors see
   the decoded views an agent would see (``decoded.py``): JSON strings with ``\\uXXXX`` /
   ``\\/`` escapes canonicalised, and base64 runs decoded (a secret inside masks the whole
   run).
4. If anything was masked, the original codings are re-applied; otherwise the original bytes
   are returned untouched (no re-serialisation, no re-compression).

Counts per kind (``{"jwt": 2, "field": 1}``) come back for recordings and metrics. Building a
``Masker`` never raises: unknown detectors and bad paths land in ``errors`` (admission reports
them through ``validate_detectors`` / ``fields.compile_path`` before this point).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from ..model import MaskSpec
from .decoded import mask_base64, mask_binary, mask_decoded
from .detectors import ALL, DETECTOR_NAMES, resolve_rules, validate_detectors
from .encoding import BodyTooLarge, MaskingError, StreamDecoder, decode, encode, parse_content_encoding
from .fields import FIELD_KIND, CompiledPath, apply_paths, compile_path
from .kubernetes import KIND as SECRET_KIND
from .kubernetes import mask_secrets
from .lines import LineMasker
from .spans import Rule, mask_text
from .stream import StreamMasker
from .wide_text import HEAD, codec_of, from_utf8, to_utf8

DEFAULT_MAX_BODY_BYTES = MaskSpec().max_body_bytes

_TEXT_HINTS = ("json", "xml", "yaml", "javascript", "ecmascript", "x-www-form-urlencoded",
               "csv", "graphql", "event-stream", "html", "x-sh", "toml", "sql", "jwt")


def _mime(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def is_text_type(content_type: str | None) -> bool:
    """``text/*`` and structured text types (JSON, XML, YAML, form data, SSE ...)."""
    mime = _mime(content_type)
    return mime.startswith("text/") or any(h in mime for h in _TEXT_HINTS)


def is_json_type(content_type: str | None) -> bool:
    """``application/json``, ``*+json``, ``application/x-amz-json-1.1`` ..."""
    mime = _mime(content_type)
    return "json" in mime and "ndjson" not in mime and "json-seq" not in mime


def _json_lines(content_type: str | None, body: bytes = b"") -> bool:
    """JSON documents or JSON per line (NDJSON, SSE): replaced bare values must be quoted."""
    mime = _mime(content_type)
    if not mime:
        return body.lstrip()[:1] in (b"{", b"[")
    return "json" in mime or mime == "text/event-stream"


def _looks_utf8(body: bytes) -> bool:
    if b"\x00" in body:
        return False
    if body.isascii():
        return True
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class NestedTooDeep(MaskingError):
    """A JSON body nested beyond what the parser (or the field walk) reaches: the field rules
    cannot see into it, so it is refused rather than passed with its fields unmasked."""


@dataclass(frozen=True)
class MaskResult:
    """The masked body and what happened to it."""

    body: bytes
    counts: Mapping[str, int] = field(default_factory=dict)  # kind -> replacements
    binary: bool = False  # binary: only its printable runs were scanned (masked in place)
    notes: tuple[str, ...] = ()  # e.g. field rules skipped because the JSON did not parse

    @property
    def changed(self) -> bool:
        return bool(self.counts)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class Masker:
    """All masking of one direction of a flow, compiled once and reused for every body."""

    _CLEAN_MAX_ENTRIES = 4096  # bound of the clean-value cache (see ``mask_values``)
    _CLEAN_MAX_CHARS = 512  # longer values are scanned every time, never cached

    def __init__(self, specs: Iterable[MaskSpec] = (), *, hash_key: bytes | None = None,
                 direction: Literal["request", "response"] | None = None) -> None:
        """``direction`` keeps only specs whose target covers it (``None`` keeps all)."""
        chosen = [s for s in specs if direction is None or s.target in (direction, "both")]
        names = list(dict.fromkeys(d for s in chosen for d in s.detectors))
        errors = validate_detectors(names)
        paths: dict[str, CompiledPath] = {}
        for spec in chosen:
            for p in spec.fields:
                try:
                    paths.setdefault(p, compile_path(p))
                except ValueError as exc:
                    errors.append(str(exc))
        self.rules: tuple[Rule, ...] = resolve_rules(names)
        self.detectors: tuple[str, ...] = tuple(
            n for n in DETECTOR_NAMES if ALL in names or n in names)
        self.paths: tuple[CompiledPath, ...] = tuple(paths.values())
        self.max_body_bytes = min((s.max_body_bytes for s in chosen), default=DEFAULT_MAX_BODY_BYTES)
        # Kubernetes Secret data (policy/masking/kubernetes.py): every body must be JSON.
        self.kubernetes_secrets = any(s.kubernetes_secrets == "mask" for s in chosen)
        self.hash_key = hash_key
        self.errors: tuple[str, ...] = tuple(errors)
        # Short strings the detectors found nothing in (see ``mask_values``). Only clean values
        # are kept, so the set never holds anything a detector calls a secret.
        self._clean: set[str] = set()

    @property
    def active(self) -> bool:
        """False when there is nothing to mask (no detectors, no field rules)."""
        return bool(self.rules or self.paths or self.kubernetes_secrets)

    def mask_bytes(self, body: bytes, content_type: str | None = None,
                   content_encoding: str | None = None, *, in_place: bool = False) -> MaskResult:
        """Mask one whole body. Never raises for an identity-encoded body within the size
        limit; raises ``MaskingError`` subclasses (``BodyTooLarge``, ``UnsupportedEncoding``,
        ``DecodeError``) when the body cannot be masked and must be refused. ``in_place``:
        masked as a binary body whatever it holds, length preserving (a ranged response: its
        bytes must stay at their offsets; field rules and Secret data need a whole document)."""
        if not self.active or not body:
            return MaskResult(body)
        codings = parse_content_encoding(content_encoding)
        if codings:
            plain = decode(body, codings, self.max_body_bytes)
        elif len(body) > self.max_body_bytes:
            raise BodyTooLarge(self.max_body_bytes)
        else:
            plain = body
        counts: dict[str, int] = {}
        if not in_place and (wide := codec_of(plain[:HEAD], content_type)) is not None:
            # Both views (wide_text.py): the bytes as they are (in place, so the code units stay
            # aligned) - the label may be the agent's - then the text the mark or label names.
            plain = mask_binary(plain, self.rules, self.hash_key, counts)
            decoded = to_utf8(plain, wide)
            if decoded is not None:
                inner = self.mask_bytes(decoded[0], _mime(content_type) or None)  # (no charset: no loop)
                for kind, n in inner.counts.items():
                    counts[kind] = counts.get(kind, 0) + n
                if not counts:
                    return MaskResult(body, notes=inner.notes)
                masked = from_utf8(inner.body, wide, decoded[1]) if inner.changed else plain
                return MaskResult(encode(masked, codings) if codings else masked, counts, notes=inner.notes)
        if self.kubernetes_secrets and not in_place:  # raises NotJSON (refused) for protobuf, CBOR ...
            plain, n = mask_secrets(plain)
            if n:
                counts[SECRET_KIND] = n
        if in_place or (not is_text_type(content_type) and not _looks_utf8(plain)):
            masked = mask_binary(plain, self.rules, self.hash_key, counts, phases=in_place)
            if not counts:
                return MaskResult(body, binary=True)
            return MaskResult(encode(masked, codings) if codings else masked, counts, binary=True)
        notes: list[str] = []
        masked = plain
        # Field rules apply to anything that parses as JSON, whatever the label: a mislabelled
        # upstream (moto answers GetSecretValue as text/html) must not switch masking off.
        if self.paths and (is_json_type(content_type) or plain.lstrip()[:1] in (b"{", b"[")):
            masked = self._mask_fields(plain, counts, notes)
        masked = mask_decoded(masked, self.rules, self.hash_key, counts,
                              json_strings=_json_lines(content_type, plain))
        if not counts:
            return MaskResult(body, notes=tuple(notes))
        return MaskResult(encode(masked, codings) if codings else masked, counts, notes=tuple(notes))

    def mask_str(self, text: str) -> tuple[str, dict[str, int]]:
        """Detectors over a string (headers, URLs, recorded fields), base64 runs in it decoded;
        field rules do not apply."""
        if text in self._clean:
            return text, {}
        counts: dict[str, int] = {}
        raw = text.encode("utf-8", "surrogateescape")
        masked = mask_base64(mask_text(raw, self.rules, self.hash_key, counts), self.rules,
                             self.hash_key, counts)
        if counts:
            return masked.decode("utf-8", "surrogateescape"), counts
        self._remember_clean((text,))
        return text, counts

    def mask_values(self, values: list[str]) -> list[str]:
        """``mask_str`` over each value (header values: no line feeds), cheaply.

        Two shortcuts, both exact: values seen clean before are not scanned again (User-Agent,
        Accept, Content-Type ... repeat on every request), and the rest are scanned once,
        joined by line feeds, instead of one scan each - a scan has a fixed cost per detector
        that dwarfs a short value. Only when the joined scan finds something are those values
        masked one by one, so a match never spans two values.
        """
        unknown = [v for v in dict.fromkeys(values) if v not in self._clean]
        if not unknown or not self.rules:
            return list(values)
        joined = "\n".join(unknown).encode("utf-8", "surrogateescape")
        counts: dict[str, int] = {}
        if joined.count(b"\n") == len(unknown) - 1:  # no value has a line feed of its own
            mask_base64(mask_text(joined, self.rules, self.hash_key, counts), self.rules,
                        self.hash_key, counts)
            if not counts:
                self._remember_clean(unknown)
                return list(values)
        return [self.mask_str(v)[0] for v in values]

    def _remember_clean(self, values: Iterable[str]) -> None:
        if len(self._clean) >= self._CLEAN_MAX_ENTRIES:
            self._clean.clear()  # unique values (dates, request IDs) churn it; start over
        self._clean.update(v for v in values if len(v) <= self._CLEAN_MAX_CHARS)

    def _mask_fields(self, body: bytes, counts: dict[str, int], notes: list[str]) -> bytes:
        try:
            document = json.loads(body)
            document, n = apply_paths(document, self.paths, self.hash_key)
            if not n:
                return body
            try:
                out = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates from \ud800-style escapes
                out = json.dumps(document, separators=(",", ":")).encode("ascii")
        except RecursionError:
            # Valid JSON, but deeper than Python's parser goes (~1 000 levels; no API nests like
            # that): passing it would let a field rule's value through wrapped in brackets.
            # Refused (fail closed) - session 11; it was passed with a note before.
            raise NestedTooDeep("a JSON body nested deeper than the masking can parse: its field rules "
                                "cannot be applied, so it is refused") from None
        except ValueError as exc:
            # Not JSON after all (an error page, truncated): the detectors still run over the
            # text; the note lets the recording say the field rules did not.
            notes.append(f"field rules not applied: body is not parseable JSON ({type(exc).__name__})")
            return body
        counts[FIELD_KIND] = counts.get(FIELD_KIND, 0) + n
        return out

    def can_stream(self, content_type: str | None) -> bool:
        """False when field rules may apply to this body (they need the whole JSON document).

        Any label but an event stream may carry JSON (upstreams mislabel), so with field rules
        only SSE is streamed; its events are masked by the detectors as they pass.
        """
        if self.kubernetes_secrets:
            return False
        return not self.paths or _mime(content_type) == "text/event-stream"

    def lines(self, content_type: str | None = None, content_encoding: str | None = None) -> LineMasker:
        """Whole-body masking line by line, for JSON-lines streams that never end (a
        Kubernetes watch, NDJSON) when ``can_stream`` says no (see ``lines.py``)."""
        codings = parse_content_encoding(content_encoding)
        decoder = StreamDecoder(codings, self.max_body_bytes) if codings else None
        return LineMasker(self, content_type, decoder)

    def stream(self, content_type: str | None = None, content_encoding: str | None = None,
               *, max_decoded_bytes: int | None = None, batch: int = 0, in_place: bool = False) -> StreamMasker:
        """A streaming masker for one body (detectors only; see ``can_stream``).

        With a Content-Encoding the stream is decoded (capped at ``max_decoded_bytes``,
        default ``max_body_bytes``, against bombs) and emitted identity-encoded. An identity
        stream has no total limit: bounding it is the proxy's job (it is streamed because it
        is long). A non-text content type is sniffed: a binary stream has its printable runs
        masked in place, length preserving (as a buffered binary body); ``batch`` and
        ``in_place``: see ``StreamMasker``.
        """
        codings = parse_content_encoding(content_encoding)
        decoder = None
        if codings:
            decoder = StreamDecoder(codings, max_decoded_bytes or self.max_body_bytes)
        return StreamMasker(self.rules, self.hash_key, decoder=decoder,
                            sniff=not is_text_type(content_type), json_mode=_json_lines(content_type),
                            batch=batch, in_place=in_place, wide=not in_place, content_type=content_type)
