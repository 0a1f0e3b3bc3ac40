"""Masking a Server-Sent Events stream on its *decoded text*, event by event.

Why not the bytes: an LLM's answer arrives as many small events, each carrying a few characters
of text inside a JSON string (``data: {"delta": {"text": "AKIAIOSF"}}`` then
``data: {"delta": {"text": "ODNN7EXAMPLE"}}``). A secret split across two events is split
across two JSON documents with framing in between, so no detector sees it in the bytes, while
the client's SDK joins the halves into the whole secret. The stream is therefore parsed, and
what the client will concatenate is masked as one text.

**Framing** (the WHATWG "event stream interpretation"): a stream framed with LF only takes a
fast path - complete events are what ends with a blank line (``\\n\\n``). Once a CR (or a
BOM) is seen, ``SSEParser`` takes over, exactly per the spec: UTF-8; lines end with
CRLF, LF or a lone CR (a CR at the end of a chunk waits for the next byte); a blank line
dispatches the event; ``:`` starts a comment; ``field: value`` loses one space after the colon;
several ``data`` lines join with LF. A leading BOM is dropped, and so is an event cut off by the
end of the stream (clients discard it too). An event that is rewritten goes out framed with LF
line ends - every SSE client accepts them - with the same fields in the same order.

**Anthropic Messages** (``event: content_block_delta``): the text of ``text_delta``
(``delta.text``), ``thinking_delta`` (``delta.thinking``) and ``input_json_delta``
(``delta.partial_json``, masked in JSON mode: a token replacing a bare number is quoted, so
the assembled tool input stays JSON) is fed, per content block ``index`` and field, into a
:class:`~.stream.StreamMasker`, which holds back only a tail that could still become a secret
(see ``stream.py``). Each delta event goes out carrying what the masker released - the same
event type, valid JSON, only the text changed; a delta whose text is all held is not sent. A
block's held text is released when it is decided: in a later delta, or in one extra delta
emitted just before ``content_block_stop`` (also before ``message_delta``, ``message_stop``,
``error`` and at the end of the stream; never on ``ping`` or unknown events, which could
otherwise split a secret). A ``content_block_start`` carrying initial text feeds it to its
block first. The SDKs (Python ``anthropic``, TypeScript ``@anthropic-ai/sdk``) concatenate the
deltas, so the text they assemble is exactly the masked text (tested with both).

**OpenAI chat completions** (``data: {"object": "chat.completion.chunk", ...}``, also what
OpenAI-compatible servers stream): each choice's ``delta.content`` and ``reasoning_content``,
and each tool call's ``function.arguments`` (JSON mode), are masked the same way across chunks;
a choice's held text goes out in the chunk with its ``finish_reason``, or in one extra chunk
(same ``id``/``model``) before ``data: [DONE]`` and at the end.

**Every other event** (other APIs, ``message_start``, ``signature_delta``, ``citations_delta``,
pings, errors ...) passes byte for byte, masked with the whole-body :class:`~.masker.Masker` as
a small ``text/event-stream`` body - consecutive events of one read together, so a bulk SSE
stream costs one Masker call per read, not per event (``_flush``). Only events that may need
the per-block treatment are parsed (``_MARKERS``: the three delta types, block start/stop, and
any ``\\u`` escape, which could hide a type). Field rules do not apply to streams
(``Masker.can_stream`` sends a body with field rules elsewhere).

**Memory stays flat**: an event is held only until its blank line, and an event larger than
``MAX_EVENT_BYTES`` (1 MiB; no real event comes near) switches the rest of the stream to the
byte-level streaming masker in JSON mode (the old behaviour, bounded memory), after the held
text of every block has been released.

The end of the stream (mitmproxy's final ``b""``) releases what the blocks hold. An empty
HTTP/2 DATA frame mid-stream is reported the same way (see ``StreamMasker``): it releases held
text early but cannot cut an event in two (the parser keeps an unterminated event).

Tool input (``partial_json``, OpenAI ``arguments``) is JSON text the client parses: its
stream masker runs in JSON mode, which decodes ``\\u0041``-style escapes (also one cut between
two deltas) and base64 runs before deciding (see ``stream.py``), so the parsed input holds no
secret. Such a text is re-emitted with those escapes decoded (same JSON meaning).

**Not covered** (accepted): a secret split across the text of two *different* content blocks
or choices (they are different texts for the client too, which would have to join them itself).
"""

from __future__ import annotations

import codecs
import json
from typing import Any

from .encoding import StreamDecoder
from .masker import Masker
from .stream import DecodedStream, StreamMasker

MAX_EVENT_BYTES = 1024 * 1024

# Anthropic Messages: delta type -> (field that carries streamed text, JSON mode)
DELTA_FIELDS: dict[str, tuple[str, bool]] = {
    "text_delta": ("text", False),
    "thinking_delta": ("thinking", False),
    "input_json_delta": ("partial_json", True),
}
# content_block.type -> (field with initial text, delta type that continues it)
BLOCK_FIELDS: dict[str, tuple[str, str]] = {
    "text": ("text", "text_delta"),
    "thinking": ("thinking", "thinking_delta"),
}
# Events after which no block continues: release what is held before passing them on.
_BLOCKS_END = frozenset({"message_delta", "message_stop", "error"})
# Bytes without which no event needs handling one by one (escapes: a type could hide in one).
_MARKERS = (b'"text_delta"', b'"thinking_delta"', b'"input_json_delta"', b"content_block_start",
            b"content_block_stop", b"chat.completion.chunk", b"\\u")
_END_MARKERS = tuple(name.encode() for name in _BLOCKS_END)

Field = tuple[bytes | None, bytes]  # (name, value); name None: a comment


class SSEParser:
    """Bytes in, complete events out: each event is its fields in order (comments included).

    ``pending`` is the size of the event being read (bytes of its complete lines plus the
    unterminated line), for the caller's memory bound. An event without its blank line is never
    dispatched, also not at the end (``final``): the spec has clients discard it. So an empty
    chunk that mitmproxy reports in the middle of a stream (an empty HTTP/2 DATA frame) cannot
    cut an event in two.
    """

    def __init__(self) -> None:
        self._line = b""  # unterminated line
        self._fields: list[Field] = []
        self._size = 0
        self._start = True  # a BOM may come first
        self._cr = False  # the last chunk ended with CR: an LF now belongs to it

    @property
    def pending(self) -> int:
        return self._size + len(self._line)

    def feed(self, data: bytes, final: bool = False) -> list[list[Field]]:
        events: list[list[Field]] = []
        if self._start and (data or final):
            if len(self._line + data) < 3 and not final and b"\xef\xbb\xbf".startswith(self._line + data):
                self._line += data
                return events
            data, self._line = self._line + data, b""
            if data.startswith(b"\xef\xbb\xbf"):
                data = data[3:]
            self._start = False
        if self._cr and data.startswith(b"\n"):
            data = data[1:]
        self._cr = False
        buf = self._line + data
        pos = 0
        while True:
            lf, cr = buf.find(b"\n", pos), buf.find(b"\r", pos)
            if lf < 0 and cr < 0:
                break
            end = lf if cr < 0 or (0 <= lf < cr) else cr
            line = buf[pos:end]
            pos = end + 1
            if buf[end:end + 1] == b"\r":
                if end + 1 == len(buf):
                    self._cr = True  # maybe CRLF split across chunks
                elif buf[end + 1:end + 2] == b"\n":
                    pos += 1
            event = self._take(line)
            if event is not None:
                events.append(event)
        self._line = buf[pos:]
        if final and self._cr:  # a CR at the very end ends its line; the event stays open
            self._cr = False
        return events

    def _take(self, line: bytes) -> list[Field] | None:
        if not line:
            if not self._fields:
                return None
            event, self._fields, self._size = self._fields, [], 0
            return event
        self._size += len(line) + 1
        if line.startswith(b":"):
            self._fields.append((None, line[1:]))
            return None
        name, colon, value = line.partition(b":")
        if colon and value.startswith(b" "):
            value = value[1:]
        self._fields.append((name, value))
        return None


def serialize(fields: list[Field]) -> bytes:
    """One event, LF-framed; a value of ``data`` with line feeds becomes several lines."""
    out: list[bytes] = []
    for name, value in fields:
        if name is None:
            out.append(b":" + value)
        elif name == b"data":
            out.extend(b"data: " + part if part else b"data:" for part in value.split(b"\n"))
        else:
            out.append(name + b": " + value if value else name + b":")
    return b"\n".join(out) + b"\n\n"


def compact_json(obj: Any) -> bytes:
    """Compact JSON, UTF-8 (escaped ASCII when lone surrogates cannot be encoded)."""
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates (from \ud800 escapes) only survive escaped
        return json.dumps(obj, separators=(",", ":")).encode("ascii")


class TextStream:
    """A streaming masker over ``str``: text in, the decided (masked) prefix out."""

    def __init__(self, masker: Masker, json_mode: bool) -> None:
        # Prose (not tool input): a trailing word - a base64 run that may continue - goes out
        # as far as its decoding cannot hold a secret (``stream._releasable``), not a token late.
        self.masker = StreamMasker(masker.rules, masker.hash_key, json_mode=json_mode,
                                   release_runs=not json_mode)
        self._decoder = codecs.getincrementaldecoder("utf-8")("surrogatepass")

    def feed(self, text: str) -> str:
        return self._decoder.decode(self.masker.feed(text.encode("utf-8", "surrogatepass")))

    def finish(self) -> str:
        return self._decoder.decode(self.masker.finish(), final=True)


class _Block:
    """The streamed text of one content block field."""

    def __init__(self, masker: Masker, delta_type: str, field: str, json_mode: bool,
                 event_name: bytes) -> None:
        self.text = TextStream(masker, json_mode)
        self.delta_type = delta_type
        self.field = field
        self.event_name = event_name  # the name its deltas came with, for the release event


class SSEMasker(DecodedStream):
    """Feed raw SSE bytes, get masked, re-framed SSE bytes; ``finish()`` returns the rest.

    The same interface as :class:`~.stream.StreamMasker` (``feed``, ``finish``, ``__call__``
    as mitmproxy's stream callable, ``counts``, ``errors``, ``binary``, ``held``), so the
    Mask addon drives either one.
    """

    binary = False  # an event stream is text by definition

    def __init__(self, masker: Masker, *, decoder: StreamDecoder | None = None,
                 max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self.masker = masker
        self.decoder = decoder
        self.max_event_bytes = max_event_bytes
        self.errors: list[str] = []
        self._counts: dict[str, int] = {}
        self._parser = SSEParser()  # once a CR (or a BOM) is seen: exact line parsing
        self._lines = False
        self._seen = False
        self._buf = b""  # LF-framed fast path: the event not complete yet
        self._batch: list[bytes] = []  # other events, masked together when a call ends
        self._blocks: dict[tuple[Any, str], _Block] = {}
        # OpenAI chat completions: (choice index, field[, tool call index]) -> its text
        self._chat: dict[tuple[Any, ...], TextStream] = {}
        self._chat_meta: dict[str, Any] = {}
        self._raw: StreamMasker | None = None  # after an over-long event: byte-level masking

    # --- public API -------------------------------------------------------------------------

    @property
    def counts(self) -> dict[str, int]:
        out = dict(self._counts)
        streams = [b.text.masker for b in self._blocks.values()] + [t.masker for t in self._chat.values()]
        if self._raw is not None:
            streams.append(self._raw)
        for s in streams:
            for kind, n in s.counts.items():
                out[kind] = out.get(kind, 0) + n
        return out

    @property
    def held(self) -> int:
        """Bytes received but not yet emitted (the event being read and held block text)."""
        held = self._pending + sum(b.text.masker.held for b in self._blocks.values()) + sum(
            t.masker.held for t in self._chat.values())
        return held + (self._raw.held if self._raw is not None else 0)


    # --- internals --------------------------------------------------------------------------

    def _push(self, data: bytes, final: bool) -> bytes:
        if self._raw is not None:
            masked = self._raw.feed(data)
            return masked + self._raw.finish() if final else masked
        out: list[bytes] = []
        if not self._lines and (b"\r" in data or (not self._seen and data[:1] == b"\xef")):
            # CR line ends (or a BOM): from here on, the line parser (exact, slower).
            self._lines, data, self._buf = True, self._buf + data, b""
        self._seen = self._seen or bool(data)
        if self._lines:
            for fields in self._parser.feed(data, final):
                self._fields_event(fields, out)
        else:
            self._buf += data
            end = self._buf.rfind(b"\n\n")
            if end >= 0:
                region, self._buf = self._buf[: end + 2], self._buf[end + 2 :]
                self._region(region, out)
        self._flush(out)
        if final:
            out.append(self._release_all())
        elif self._pending > min(self.max_event_bytes, self.masker.max_body_bytes):
            out.append(self._go_raw())
        return b"".join(out)

    @property
    def _pending(self) -> int:
        return self._parser.pending if self._lines else len(self._buf)

    def _interesting(self, raw: bytes) -> bool:
        """Whether ``raw`` (whole events) may hold an event handled one by one."""
        return (any(m in raw for m in _MARKERS) or (bool(self._blocks) and any(m in raw for m in _END_MARKERS))
                or (bool(self._chat) and b"[DONE]" in raw))

    def _region(self, region: bytes, out: list[bytes]) -> None:
        """Complete LF-framed events: passed on byte for byte (masked in a batch) unless one of
        them is Anthropic content-block traffic, which is taken event by event."""
        if not self._interesting(region) and len(region) <= self.masker.max_body_bytes:
            self._batch.append(region)
            return
        for piece in region.split(b"\n\n"):
            piece = piece.lstrip(b"\n")
            if not piece:
                continue
            if not self._interesting(piece):
                self._batch.append(piece + b"\n\n")
                continue
            fields: list[Field] = []
            for line in piece.split(b"\n"):
                if line.startswith(b":"):
                    fields.append((None, line[1:]))
                else:
                    name, colon, value = line.partition(b":")
                    fields.append((name, value[1:] if colon and value.startswith(b" ") else value))
            self._fields_event(fields, out)

    def _fields_event(self, fields: list[Field], out: list[bytes]) -> None:
        result = self._event(fields)
        if result is None:
            self._batch.append(serialize(fields))
        else:
            self._flush(out)  # what came before goes first
            if result:
                out.append(result)

    def _flush(self, out: list[bytes]) -> None:
        """Mask the batch of other events as one small SSE body with the whole-body Masker."""
        if not self._batch:
            return
        body, self._batch = b"".join(self._batch), []
        if self.masker.active:
            result = self.masker.mask_bytes(body, "text/event-stream")
            for kind, count in result.counts.items():
                self._counts[kind] = self._counts.get(kind, 0) + count
            body = result.body
        out.append(body)

    def _go_raw(self) -> bytes:
        """An event too large to hold: release the blocks, then mask bytes from here on."""
        released = self._release_all()
        self._raw = StreamMasker(self.masker.rules, self.masker.hash_key, json_mode=True)
        if self._lines:
            parser, self._parser = self._parser, SSEParser()
            rest = (serialize(parser._fields)[:-1] if parser._fields else b"") + parser._line
        else:
            rest, self._buf = self._buf, b""
        self.errors.append(f"an event exceeded {min(self.max_event_bytes, self.masker.max_body_bytes)} "
                           "bytes: the rest of the stream was masked as bytes, not per event")
        return released + self._raw.feed(rest)

    def _event(self, fields: list[Field]) -> bytes | None:
        """Bytes to send for an event handled here (b"": nothing now), None: one of the others."""
        data_parts = [v for n, v in fields if n == b"data"]
        name = next((v for n, v in reversed(fields) if n == b"event"), b"")
        kind, obj = None, None
        if data_parts:
            data = b"\n".join(data_parts)
            if self._interesting(data) or name.startswith(b"content_block_"):
                try:
                    obj = json.loads(data)
                except ValueError:
                    obj = None
                if isinstance(obj, dict) and isinstance(obj.get("type"), str):
                    kind = obj["type"]
        if isinstance(obj, dict) and obj.get("object") == "chat.completion.chunk" \
                and isinstance(obj.get("choices"), list):
            return self._chat_chunk(fields, obj)
        if self._chat and data_parts and data.strip() == b"[DONE]":
            return self._release_chat() + serialize(fields)
        if kind == "content_block_delta" and isinstance(obj, dict):
            out = self._delta(fields, name, obj)
            if out is not None:
                return out
        if kind == "content_block_start" and isinstance(obj, dict):
            return serialize(self._start(fields, obj))
        if kind == "content_block_stop" and isinstance(obj, dict):
            prefix = self._release(obj.get("index"))
        elif self._blocks and (name.decode("utf-8", "replace") in _BLOCKS_END or kind in _BLOCKS_END):
            prefix = self._release_all()
        else:
            return None
        return prefix + serialize(self._mask_whole(fields))

    def _delta(self, fields: list[Field], name: bytes, obj: dict[str, Any]) -> bytes | None:
        delta = obj.get("delta")
        if not isinstance(delta, dict) or delta.get("type") not in DELTA_FIELDS:
            return None  # signature_delta, citations_delta ...: masked whole
        field, json_mode = DELTA_FIELDS[delta["type"]]
        text = delta.get(field)
        if not isinstance(text, str):
            return None
        block = self._block(obj.get("index"), delta["type"], field, json_mode, name)
        released = block.text.feed(text)
        if not released:
            return b""  # all held: nothing to send yet
        return serialize(self._with_text(fields, obj, field, released))

    def _block(self, index: Any, delta_type: str, field: str, json_mode: bool, name: bytes) -> _Block:
        key = (index if isinstance(index, (int, str)) else repr(index), field)
        block = self._blocks.get(key)
        if block is None:
            block = self._blocks[key] = _Block(self.masker, delta_type, field, json_mode,
                                               name or b"content_block_delta")
        return block

    def _start(self, fields: list[Field], obj: dict[str, Any]) -> list[Field]:
        """``content_block_start``: initial text starts its block's stream (unmasked, as the
        deltas are - a token already in place would change where later matches can start);
        the rest of the event is masked whole."""
        block = obj.get("content_block")
        if not isinstance(block, dict) or block.get("type") not in BLOCK_FIELDS:
            return self._mask_whole(fields)
        field, delta_type = BLOCK_FIELDS[block["type"]]
        text = block.get(field)
        if not isinstance(text, str) or not text:
            return self._mask_whole(fields)
        block[field] = ""
        rest = self._mask_whole(self._replace_data(fields, compact_json(obj)))
        try:
            masked = json.loads(b"\n".join(v for n, v in rest if n == b"data"))
            masked["content_block"][field] = ""
        except (ValueError, KeyError, TypeError):  # masking made it something else: keep it
            return rest
        stream = self._block(obj.get("index"), delta_type, field, False, b"content_block_delta")
        masked["content_block"][field] = stream.text.feed(text)
        return self._replace_data(rest, compact_json(masked))

    @staticmethod
    def _replace_data(fields: list[Field], data: bytes) -> list[Field]:
        """``fields`` with their ``data`` lines replaced by one ``data`` (where the first was)."""
        out: list[Field] = []
        for n, v in fields:
            if n != b"data":
                out.append((n, v))
            elif data is not None:
                out.append((n, data))
                data = None  # type: ignore[assignment]
        return out

    def _with_text(self, fields: list[Field], obj: dict[str, Any], field: str, text: str) -> list[Field]:
        obj["delta"][field] = text
        masked = [(n, v if n == b"data" else self._mask_value(v)) for n, v in fields]
        return self._replace_data(masked, compact_json(obj))

    def _release(self, index: Any) -> bytes:
        """Emit what the blocks of ``index`` hold (their stream is over), as delta events."""
        key = index if isinstance(index, (int, str)) else repr(index)
        out = []
        for k in [k for k in self._blocks if k[0] == key]:
            out.append(self._release_block(k))
        return b"".join(out)

    def _release_all(self) -> bytes:
        return b"".join(self._release_block(k) for k in list(self._blocks)) + self._release_chat()

    # --- OpenAI chat completions (``data: {"object": "chat.completion.chunk", ...}``) --------

    def _chat_chunk(self, fields: list[Field], obj: dict[str, Any]) -> bytes:
        """Each choice's ``delta.content`` / ``delta.reasoning_content`` and each tool call's
        ``function.arguments`` (JSON mode) as one text across chunks; a choice's held text is
        released into the chunk that carries its ``finish_reason``."""
        self._chat_meta = {k: obj[k] for k in ("id", "object", "created", "model") if k in obj}
        for choice in obj["choices"]:
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            delta = choice.get("delta")
            if isinstance(delta, dict):
                for field in ("content", "reasoning_content"):
                    if isinstance(delta.get(field), str):
                        delta[field] = self._chat_text((index, field), False).feed(delta[field])
                for call in delta.get("tool_calls") or []:
                    fn = call.get("function") if isinstance(call, dict) else None
                    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                        key = (index, "tool", call.get("index", 0))
                        fn["arguments"] = self._chat_text(key, True).feed(fn["arguments"])
            if choice.get("finish_reason") is not None:
                self._chat_finish(choice, index)
        masked = [(n, v if n == b"data" else self._mask_value(v)) for n, v in fields]
        return serialize(self._replace_data(masked, compact_json(obj)))

    def _chat_text(self, key: tuple[Any, ...], json_mode: bool) -> TextStream:
        stream = self._chat.get(key)
        if stream is None:
            stream = self._chat[key] = TextStream(self.masker, json_mode)
        return stream

    def _chat_finish(self, choice: dict[str, Any], index: Any) -> None:
        """Release what the choice's texts hold into ``choice`` (its ``delta``)."""
        for key in [k for k in self._chat if k[0] == index]:
            stream = self._chat.pop(key)
            text = stream.finish()
            for kind, n in stream.masker.counts.items():
                self._counts[kind] = self._counts.get(kind, 0) + n
            if not text:
                continue
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                delta = choice["delta"] = {}
            if key[1] == "tool":
                calls = delta.get("tool_calls")
                if not isinstance(calls, list):
                    calls = delta["tool_calls"] = []
                calls.append({"index": key[2], "function": {"arguments": text}})
            else:
                delta[key[1]] = (delta.get(key[1]) or "") + text

    def _release_chat(self) -> bytes:
        """One extra chunk with what every choice still holds (before ``[DONE]``, at the end)."""
        if not self._chat:
            return b""
        choices: dict[Any, dict[str, Any]] = {}
        for index in dict.fromkeys(k[0] for k in self._chat):
            choice = choices[index] = {"index": index, "delta": {}, "finish_reason": None}
            self._chat_finish(choice, index)
        kept = [c for c in choices.values() if c["delta"]]
        if not kept:
            return b""
        chunk = {**self._chat_meta, "object": "chat.completion.chunk", "choices": kept}
        return serialize([(b"data", compact_json(chunk))])

    def _release_block(self, key: tuple[Any, str]) -> bytes:
        block = self._blocks.pop(key)
        text = block.text.finish()
        for kind, n in block.text.masker.counts.items():
            self._counts[kind] = self._counts.get(kind, 0) + n
        if not text:
            return b""
        obj = {"type": "content_block_delta", "index": key[0],
               "delta": {"type": block.delta_type, block.field: text}}
        return serialize([(b"event", block.event_name), (b"data", compact_json(obj))])

    def _mask_whole(self, fields: list[Field]) -> list[Field]:
        """An event that is not streamed text: ``data`` as one small body, the rest as strings."""
        out: list[Field] = []
        data_parts = [v for n, v in fields if n == b"data"]
        data = b"\n".join(data_parts)
        masked_data = data
        if data_parts and self.masker.active:
            looks_json = data.lstrip()[:1] in (b"{", b"[")
            result = self.masker.mask_bytes(data, "application/json" if looks_json else "text/plain")
            for kind, count in result.counts.items():
                self._counts[kind] = self._counts.get(kind, 0) + count
            masked_data = result.body
        emitted = False
        for n, v in fields:
            if n == b"data":
                if not emitted:
                    out.append((n, masked_data))
                    emitted = True
            else:
                out.append((n, self._mask_value(v)))
        return out

    def _mask_value(self, value: bytes) -> bytes:
        if not value or not self.masker.rules:
            return value
        text = value.decode("utf-8", "surrogateescape")
        masked, counts = self.masker.mask_str(text)
        for kind, n in counts.items():
            self._counts[kind] = self._counts.get(kind, 0) + n
        return masked.encode("utf-8", "surrogateescape")


__all__ = ["MAX_EVENT_BYTES", "SSEMasker", "SSEParser", "TextStream", "compact_json", "serialize"]
