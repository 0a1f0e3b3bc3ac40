"""Masking a newline-delimited JSON stream (``application/x-ndjson``, ``application/jsonl``)
record by record, and the text a client concatenates across records.

Each record (one line; LF or CRLF) is masked as a small JSON body with the whole-body
:class:`~.masker.Masker` as soon as its line feed arrives - so whatever the Masker detects in a
JSON document (decoded string values included) it detects here, and field rules apply to each
record's document. A line that is not JSON is masked as text. Lines flow with no added
latency: a record is held only until its line feed.

**Text split across records.** Streaming LLM APIs that speak NDJSON send the answer a few
characters per record, and the client joins them: a secret split across two records would
reach it whole. For the formats known here (Ollama's ``/api/generate`` ``response`` and
``thinking``, ``/api/chat`` ``message.content`` and ``message.thinking``) those string fields
are fed through one :class:`~.sse.TextStream` per field across records, which holds back only
a tail that could still become a secret; each record carries what was released (possibly
``""``). The held rest is released into the record with ``"done": true`` (and at the end of
the stream, as one extra record ``{"<field>": "..."}`` when no such record came). A secret
split across records of any other field or format is **not** reassembled (documented
limitation: there is no general way to know which fields a client concatenates).

A record longer than ``MAX_RECORD_BYTES`` (1 MiB) switches the rest of the stream to the
byte-level streaming masker in JSON mode (bounded memory), after the held text is released; it
decodes JSON escapes and base64 runs too (see ``stream.py``), so nothing a record's decoded
view would have shown escapes that way.
"""

from __future__ import annotations

import json
from typing import Any

from .encoding import StreamDecoder
from .masker import Masker
from .sse import TextStream, compact_json
from .stream import DecodedStream, StreamMasker

MAX_RECORD_BYTES = 1024 * 1024
# Paths of string fields whose values a client concatenates across records (Ollama).
TEXT_PATHS: tuple[tuple[str, ...], ...] = (("response",), ("thinking",), ("message", "content"),
                                          ("message", "thinking"))


def _get(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _set(obj: dict[str, Any], path: tuple[str, ...], value: str) -> None:
    for key in path[:-1]:
        obj = obj.setdefault(key, {})
    obj[path[-1]] = value


class NDJSONMasker(DecodedStream):
    """Feed raw NDJSON bytes, get masked records; the interface of ``StreamMasker``."""

    binary = False

    def __init__(self, masker: Masker, *, decoder: StreamDecoder | None = None,
                 max_record_bytes: int = MAX_RECORD_BYTES) -> None:
        self.masker = masker
        self.decoder = decoder
        self.max_record_bytes = max_record_bytes
        self.errors: list[str] = []
        self._counts: dict[str, int] = {}
        self._line = b""
        self._texts: dict[tuple[str, ...], TextStream] = {}
        self._raw: StreamMasker | None = None

    @property
    def counts(self) -> dict[str, int]:
        out = dict(self._counts)
        streams = [t.masker for t in self._texts.values()] + ([self._raw] if self._raw else [])
        for s in streams:
            for kind, n in s.counts.items():
                out[kind] = out.get(kind, 0) + n
        return out

    @property
    def held(self) -> int:
        return len(self._line) + sum(t.masker.held for t in self._texts.values()) + (
            self._raw.held if self._raw is not None else 0)


    def _push(self, data: bytes, final: bool) -> bytes:
        if self._raw is not None:
            masked = self._raw.feed(data)
            return masked + self._raw.finish() if final else masked
        buf = self._line + data
        out: list[bytes] = []
        start = 0
        while (lf := buf.find(b"\n", start)) >= 0:
            out.append(self._record(buf[start:lf + 1]))
            start = lf + 1
        self._line = buf[start:]
        if final:
            if self._line:
                out.append(self._record(self._line))
                self._line = b""
            out.append(self._release_all())
        elif len(self._line) > self.max_record_bytes:
            out.append(self._release_all())
            self._raw = StreamMasker(self.masker.rules, self.masker.hash_key, json_mode=True)
            rest, self._line = self._line, b""
            self.errors.append(f"a record exceeded {self.max_record_bytes} bytes: the rest of the "
                               "stream was masked as bytes, not per record")
            out.append(self._raw.feed(rest))
        return b"".join(out)

    def _record(self, line: bytes) -> bytes:
        body = line.rstrip(b"\r\n")
        end = line[len(body):]
        if not body.strip():
            return line
        looks_json = body.lstrip()[:1] in (b"{", b"[")
        if looks_json:
            streamed = self._streamed(body)
            if streamed is not None:
                return streamed + end
        return self._mask(body, looks_json) + end

    def _mask(self, body: bytes, looks_json: bool) -> bytes:
        result = self.masker.mask_bytes(body, "application/json" if looks_json else "text/plain")
        for kind, n in result.counts.items():
            self._counts[kind] = self._counts.get(kind, 0) + n
        return result.body

    def _streamed(self, body: bytes) -> bytes | None:
        """A record with concatenated text fields: those go through their streams (unmasked
        before, as a token in place would move where later matches start), the rest of the
        record is masked whole. None when the record has no such field."""
        if not any(f'"{p[-1]}"'.encode() in body for p in TEXT_PATHS):
            return None
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        if not isinstance(obj, dict):
            return None
        done = obj.get("done") is True
        texts: dict[tuple[str, ...], str | None] = {}
        for path in TEXT_PATHS:
            value = _get(obj, path)
            if isinstance(value, str):
                texts[path] = value
                _set(obj, path, "")
            elif done and path in self._texts:
                texts[path] = None
        if not texts:
            return None
        try:
            obj = json.loads(self._mask(compact_json(obj), True))
        except ValueError:
            return None
        for path, value in texts.items():
            stream = self._texts.get(path)
            if stream is None:
                stream = self._texts[path] = TextStream(self.masker, json_mode=False)
            text = stream.feed(value) if value is not None else ""
            if done:
                text += stream.finish()
                self._finished(self._texts.pop(path))
            if value is not None or text:
                _set(obj, path, text)
        return compact_json(obj)

    def _finished(self, stream: TextStream) -> None:
        for kind, n in stream.masker.counts.items():
            self._counts[kind] = self._counts.get(kind, 0) + n

    def _release_all(self) -> bytes:
        obj: dict[str, Any] = {}
        for path in list(self._texts):
            stream = self._texts.pop(path)
            text = stream.finish()
            self._finished(stream)
            if text:
                _set(obj, path, text)
        return compact_json(obj) + b"\n" if obj else b""


__all__ = ["MAX_RECORD_BYTES", "NDJSONMasker", "TEXT_PATHS"]
