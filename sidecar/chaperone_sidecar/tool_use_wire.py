"""The ``tool_use`` blocks of an Anthropic Messages answer: found, judged, replaced on the wire.

Two forms of the same answer (the Messages API, as the official SDKs read it):

* **JSON** (``stream: false``): :func:`rewrite_message` walks ``content`` and replaces a blocked
  ``tool_use`` block *in place* by ``{"type": "text", "text": "[Chaperone blocked tool_use ...]"}``.
* **Message batch results** (``GET .../messages/batches/<id>/results``, JSON Lines):
  :func:`rewrite_batch_line` applies the same to each succeeded result's message, line by line.
* **Server-Sent Events** (``stream: true``): :class:`ToolUseStream` reads the events with the
  sidecar's one SSE parser (:class:`~.policy.masking.sse.SSEParser`, also used by masking) and
  follows each ``tool_use`` block from its ``content_block_start`` through its
  ``input_json_delta`` events (the ``partial_json`` pieces concatenate to the input) to its
  ``content_block_stop``.

**Holding** (only when tool-use rules apply to the request; otherwise the stream passes
untouched and is only observed): from a ``tool_use`` block's start to its stop *every* event is
held - the block's own (so no byte of a blocked input reaches the agent, not even a prefix the
SDK would show as a partial ``input``), and any other event that arrives meanwhile (a text block
interleaved by a hostile upstream, pings), because the SDKs append a block at each
``content_block_start`` and address deltas by ``index``: re-ordering starts would misplace
blocks. At the stop the block is judged and the held events are released in their original
order; a blocked block's events become ``content_block_start`` (an empty ``text`` block) + one
``text_delta`` with the refusal text + its ``content_block_stop``, **at the same index**, so
every later index stays valid. A block still open when ``message_delta``, ``message_stop``,
``error`` or the end of the stream arrives is incomplete: in holding mode it is replaced the same
way (with a "withheld, incomplete" text), never passed half. Text and thinking blocks are never
held: holding costs time to first token only while the model is writing a tool input.

**Decision (text block + ``stop_reason``)**: a blocked ``tool_use`` becomes a text block rather
than, e.g., a ``tool_use`` with rewritten input, because nothing the agent would *execute* may
remain, and the SDKs and agents already handle text; the agent sends the assistant turn back,
so the model reads the refusal in its own turn on the next request. When a message announced
``stop_reason: "tool_use"`` and no ``tool_use`` block of it was let through, the stop reason
becomes ``"end_turn"``: an agent loop that sees ``tool_use`` but finds no block to run would
otherwise spin or fail. With another, allowed block left it stays ``tool_use`` (the agent runs
that one; the API needs no ``tool_result`` for a block it no longer sees).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .policy.masking.sse import SSEParser, compact_json, serialize
from .policy.matching_tool_use import ToolUse
from .policy.tool_use import Verdict, blocked_text, incomplete_text

__all__ = ["MAX_HELD_BYTES", "Judged", "ToolUseStream", "ToolUseTooLarge", "rewrite_message",
           "rewrite_batch_line", "tool_use_of_block"]

MAX_HELD_BYTES = 8 * 1024 * 1024  # held events while a tool input is written (fail closed above)
MAX_INPUT_BYTES = 8 * 1024 * 1024  # a tool input kept for judging and recording

Field = tuple[bytes | None, bytes]
Decide = Callable[[ToolUse], Verdict | None]


class ToolUseTooLarge(Exception):
    """More than ``MAX_HELD_BYTES`` would have to be held: the stream cannot be judged."""


@dataclass
class Judged:
    """A tool_use seen in an answer, with what happened to it."""

    tool_use: ToolUse
    verdict: Verdict | None = None
    replaced: bool = False  # the agent got a text block instead
    model: str = ""
    message_id: str = ""


def _parse_input(raw: str) -> tuple[Any, bool]:
    if not raw.strip():
        return {}, True  # no deltas at all: the SDK keeps the start's (empty) input
    try:
        return json.loads(raw), True
    except ValueError:
        return None, False


def tool_use_of_block(block: dict[str, Any], index: Any = None) -> ToolUse:
    """A JSON answer's ``tool_use`` block as a :class:`ToolUse`."""
    value = block.get("input")
    raw = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    return ToolUse(id=str(block.get("id") or ""), name=str(block.get("name") or ""), input=value,
                   raw=raw, parsed=isinstance(value, dict), index=index)


def rewrite_message(message: Any, decide: Decide | None) -> tuple[bool, list[Judged]]:
    """Judge the tool_use blocks of a JSON answer; replace blocked ones in place.

    Returns (changed, every tool_use seen). ``decide`` None: observe only.
    """
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        return False, []
    model, msg_id = str(message.get("model") or ""), str(message.get("id") or "")
    seen: list[Judged] = []
    changed, kept = False, 0
    content = message["content"]
    for i, block in enumerate(content):
        if not isinstance(block, dict) or block.get("type") != "tool_use":
            continue
        tool_use = tool_use_of_block(block, i)
        verdict = decide(tool_use) if decide is not None else None
        judged = Judged(tool_use, verdict, verdict is not None, model, msg_id)
        seen.append(judged)
        if verdict is None:
            kept += 1
            continue
        content[i] = {"type": "text", "text": blocked_text(tool_use, verdict)}
        changed = True
    if changed and kept == 0 and message.get("stop_reason") == "tool_use":
        message["stop_reason"] = "end_turn"
    return changed, seen


def rewrite_batch_line(line: bytes, decide: Decide | None) -> tuple[bytes, list[Judged]]:
    """One line of a message batch's results (JSONL: ``{"custom_id", "result": {"type":
    "succeeded", "message": {...}}}``): its message judged like a JSON answer. A line that is
    not such a result passes as it is (the SDK could not read a tool_use from it either)."""
    try:
        entry = json.loads(line)
    except ValueError:
        return line, []
    result = entry.get("result") if isinstance(entry, dict) else None
    message = result.get("message") if isinstance(result, dict) else None
    changed, seen = rewrite_message(message, decide)
    if not changed:
        return line, seen
    end = line[len(line.rstrip(b"\r\n")):]
    return json.dumps(entry, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + end, seen


@dataclass
class _Open:
    """A tool_use block being streamed."""

    index: Any
    id: str
    name: str
    start_input: Any
    parts: list[str] = field(default_factory=list)
    size: int = 0
    deltas: bool = False
    cut: bool = False  # more than MAX_INPUT_BYTES: kept as a prefix, not parsed


def _event(name: str, obj: dict[str, Any]) -> bytes:
    return serialize([(b"event", name.encode()), (b"data", compact_json(obj))])


class ToolUseStream:
    """Messages SSE in, SSE for the agent out (``feed``); every tool_use reported to ``seen``.

    ``decide`` None: observe only - nothing is held or changed (the caller passes the original
    bytes on); otherwise tool_use blocks are held, judged and replaced as the module says.
    """

    def __init__(self, decide: Decide | None, seen: Callable[[Judged], None], *,
                 max_held: int = MAX_HELD_BYTES) -> None:
        self.decide = decide
        self.hold = decide is not None
        self.report = seen
        self.max_held = max_held
        self.parser = SSEParser()
        self.open: dict[Any, _Open] = {}
        self.queue: list[tuple[list[Field], Any]] = []  # held events: (fields, parsed data)
        self.queued = 0
        # index -> text, for the held events of that block; kept until the next message, so a
        # stray event for a replaced index (a malformed stream) is dropped, never passed on
        self.replaced: dict[Any, str] = {}
        self.model = ""
        self.message_id = ""
        self.allowed = 0  # tool_use blocks of the current message let through
        self.blocked = 0
        self.judged: list[Judged] = []

    @property
    def held(self) -> int:
        return self.queued

    def feed(self, data: bytes, final: bool = False) -> bytes:
        out: list[bytes] = []
        for fields in self.parser.feed(data, final):
            self._event(fields, out)
        if final:
            self._close_open("the stream ended", out)
            self._release(out)
        return b"".join(out)

    # --- events -----------------------------------------------------------------------------

    def _event(self, fields: list[Field], out: list[bytes]) -> None:
        data = b"\n".join(v for n, v in fields if n == b"data")
        obj: Any = None
        if data:
            try:
                obj = json.loads(data)
            except ValueError:
                obj = None
        kind = obj.get("type") if isinstance(obj, dict) else None
        if kind == "message_start":
            message = obj.get("message") if isinstance(obj.get("message"), dict) else {}
            self.model = str(message.get("model") or "")
            self.message_id = str(message.get("id") or "")
            self.allowed = self.blocked = 0
            self.replaced.clear()
        elif kind in ("content_block_delta", "content_block_stop") and self.hold and not self.open \
                and self._key(obj.get("index")) in self.replaced:
            return  # after its block was replaced: nothing of it goes out
        elif kind == "content_block_start":
            block = obj.get("content_block")
            if isinstance(block, dict) and block.get("type") == "tool_use":
                index = obj.get("index")
                key = self._key(index)
                if key in self.open:  # a second start at an open index: close the first
                    self._finish(self.open.pop(key), out, complete=False)
                self.open[key] = _Open(index, str(block.get("id") or ""), str(block.get("name") or ""),
                                       block.get("input"))
        elif kind == "content_block_delta":
            pending = self.open.get(self._key(obj.get("index")))
            delta = obj.get("delta")
            if pending is not None and isinstance(delta, dict) and delta.get("type") == "input_json_delta":
                self._append(pending, delta.get("partial_json"))
        elif kind == "content_block_stop":
            pending = self.open.pop(self._key(obj.get("index")), None)
            if pending is not None:
                self._queue(fields, obj)
                self._finish(pending, out, complete=True)
                if not self.open:
                    self._release(out)
                return
        elif kind in ("message_delta", "message_stop", "error"):
            self._close_open(f"{kind} arrived", out)
            self._release(out)
            if kind == "message_delta" and self.hold:
                fields = self._stop_reason(fields, obj)
        if self.open and self.hold:
            self._queue(fields, obj)
        else:
            out.append(serialize(fields))

    @staticmethod
    def _key(index: Any) -> Any:
        return index if isinstance(index, (int, str)) else repr(index)

    def _append(self, pending: _Open, part: Any) -> None:
        if not isinstance(part, str):
            return
        pending.deltas = True
        if pending.cut:
            return
        pending.size += len(part)
        if pending.size > MAX_INPUT_BYTES:
            pending.cut = True
            return
        pending.parts.append(part)

    def _queue(self, fields: list[Field], obj: Any) -> None:
        if not self.hold:
            return
        self.queue.append((fields, obj))
        self.queued += sum(len(v) for _, v in fields) + 16
        if self.queued > self.max_held:
            raise ToolUseTooLarge(f"a tool_use block held more than {self.max_held} bytes of events")

    def _finish(self, pending: _Open, out: list[bytes], *, complete: bool) -> None:
        raw = "".join(pending.parts)
        if pending.deltas:
            value, parsed = _parse_input(raw) if not pending.cut else (None, False)
        else:
            value, parsed = pending.start_input, isinstance(pending.start_input, dict)
            raw = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
        tool_use = ToolUse(id=pending.id, name=pending.name, input=value, raw=raw,
                           parsed=parsed and complete, index=pending.index, complete=complete)
        verdict = self.decide(tool_use) if self.decide is not None else None
        judged = Judged(tool_use, verdict, False, self.model, self.message_id)
        if self.hold and (verdict is not None or not complete):
            judged.replaced = True
            self.replaced[self._key(pending.index)] = (
                blocked_text(tool_use, verdict) if verdict is not None and complete
                else incomplete_text(tool_use))
            self.blocked += 1
        else:
            self.allowed += 1
        self.judged.append(judged)
        self.report(judged)

    def _close_open(self, why: str, out: list[bytes]) -> None:
        """Blocks without their stop: judged as incomplete, closed by a synthetic stop."""
        for key in list(self.open):
            pending = self.open.pop(key)
            self._finish(pending, out, complete=False)
            if self.hold:
                stop = {"type": "content_block_stop", "index": pending.index}
                self.queue.append(([(b"event", b"content_block_stop"), (b"data", compact_json(stop))], stop))

    def _release(self, out: list[bytes]) -> None:
        """The held events in order; a replaced block's start/deltas become one text block."""
        queue, self.queue, self.queued = self.queue, [], 0
        for fields, obj in queue:
            kind = obj.get("type") if isinstance(obj, dict) else None
            key = self._key(obj.get("index")) if isinstance(obj, dict) else None
            text = self.replaced.get(key) if kind and kind.startswith("content_block_") else None
            if text is None:
                out.append(serialize(fields))
            elif kind == "content_block_start":
                out.append(_event("content_block_start", {
                    "type": "content_block_start", "index": obj.get("index"),
                    "content_block": {"type": "text", "text": ""}}))
                out.append(_event("content_block_delta", {
                    "type": "content_block_delta", "index": obj.get("index"),
                    "delta": {"type": "text_delta", "text": text}}))
            elif kind == "content_block_stop":
                out.append(serialize(fields))
            # a replaced block's deltas are dropped

    def _stop_reason(self, fields: list[Field], obj: dict[str, Any]) -> list[Field]:
        """``stop_reason: tool_use`` with no tool_use let through: ``end_turn``."""
        delta = obj.get("delta")
        if not (isinstance(delta, dict) and delta.get("stop_reason") == "tool_use"
                and self.blocked and not self.allowed):
            return fields
        delta["stop_reason"] = "end_turn"
        data = compact_json(obj)
        out: list[Field] = []
        for n, v in fields:
            if n != b"data":
                out.append((n, v))
            elif data:
                out.append((n, data))
                data = b""
        return out
