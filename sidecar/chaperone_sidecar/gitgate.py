"""The gate of a streamed git push: its ref updates judged before any of its body leaves.

A push larger than the sidecar's ``stream_large_bodies`` (1 MiB; git itself chunks a push above
``http.postBuffer``, 1 MiB) streams: mitmproxy forwards the headers and then each chunk as it
arrives, and the ``request`` hook fires only after the whole body has gone. The commands that
say which refs the push updates are the body's first pkt-lines, though, so the body is held
back - not buffered whole - until they have arrived:

1. Route judges the flow on its headers with the updates *pending* (``GitAction.pending``:
   refs/operations/forcePush conditions hold for no update yet, so only services and
   repositories decide) and installs this gate as the request's stream function;
2. the gate holds every chunk until the command list and its push options are complete, plus
   up to :data:`PACK_PEEK` bytes of the pack (its first commits, for the fast-forward proof), at
   most :data:`HOLD_LIMIT` bytes in all;
3. then it calls ``judge`` with what it holds. ``judge`` (Route's) classifies it exactly and
   evaluates the policies; a result no stricter than the headers' decision releases the held
   bytes and everything after them unchanged. A stricter one closes the gate.

A closed gate lets nothing of the push through: the upstream gets the flush packet ``0000`` (a
push with no commands, which a receive-pack answers without changing anything), then - when the
request declared a ``Content-Length``, which the upstream still expects - zeros for every byte
that follows, never the agent's data. Route then answers the agent with the refusal instead of
whatever the upstream said (``refusal_for``). Unreadable commands (garbage, more than
:data:`HOLD_LIMIT` bytes, a body that ends first) close the gate too: fail closed.

**Decision (approvals)**: the gate is synchronous (a stream function cannot await), so it cannot
open an ApprovalRequest or hold the push for one; a streamed push that only an approval could let
through is refused, naming the rule, and docs/git.md says to push it in smaller parts. (The
approval path stays for pushes whose body is read before they are judged: up to 1 MiB.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .gitwire import PktError, Truncated, read_pkt

__all__ = ["GitPushGate", "PACK_PEEK", "HOLD_LIMIT", "commands_end"]

PACK_PEEK = 256 * 1024  # bytes of the pack held for its leading commits (fast-forward proof)
HOLD_LIMIT = 4 * 1024 * 1024  # never hold more than this: commands longer than that are refused


class _Scanner:
    """Finds where the command list (and its push options) ends, reading each pkt-line once
    however the body is cut into chunks (a re-scan per chunk would cost quadratic time)."""

    def __init__(self) -> None:
        self.pos, self.first, self.options, self.in_options = 0, True, False, False

    def end(self, data: bytes | bytearray) -> int | None:
        """Offset just after the commands (and options), or None when more is needed; raises
        :class:`PktError` when the bytes are not pkt-lines."""
        try:
            while True:
                p = read_pkt(data, self.pos)
                self.pos = p.end
                if p.kind == "flush":
                    if self.in_options or not self.options:
                        return self.pos
                    self.in_options = True  # push options follow the commands' flush
                    continue
                if self.first and p.kind == "data":
                    _, nul, rest = p.payload.partition(b"\0")
                    self.options = bool(nul) and b"push-options" in rest.split(b"\0", 1)[0].split()
                self.first = False
        except Truncated:
            return None


def commands_end(data: bytes) -> int | None:
    """Offset just after the command list (and its push options), or None when more is needed.

    Raises :class:`PktError` when the bytes are not pkt-lines. Only the framing is read here;
    :mod:`.policy.classify.git` reads the commands themselves.
    """
    return _Scanner().end(data)


class GitPushGate:
    """A request stream function (see the module docstring).

    ``judge(held) -> verdict``: called once with the held bytes (the body so far, decoded
    framing-wise as the upstream would see it); a verdict of ``None`` releases the push, anything
    else closes the gate and is kept in :attr:`verdict`. ``content_length``: the request's
    declared length, or None (chunked).
    """

    def __init__(self, judge: Callable[[bytes, bool], Any], content_length: int | None) -> None:
        self.judge = judge
        self.content_length = content_length
        self.held = bytearray()
        self.state = "holding"  # holding | open | closed
        self.verdict: Any = None
        self.sent = 0  # bytes given to the upstream
        self._end: int | None = None  # where the commands end, once known (-1: unreadable)
        self._scanner = _Scanner()

    def __call__(self, data: bytes) -> list[bytes]:
        if self.state == "open":
            return self._send(data)
        if self.state == "closed":
            return self._fill(len(data)) if data else []
        self.held += data
        end_of_body = not data
        end = self._end
        if end is None:
            try:
                end = self._end = self._scanner.end(self.held)
            except PktError:
                end = self._end = -1
        ready = end is not None and (end < 0 or len(self.held) - end >= PACK_PEEK)
        if not (ready or end_of_body or len(self.held) >= HOLD_LIMIT):
            return []  # hold: [] sends nothing (b"" would end a chunked body)
        self.verdict = self.judge(bytes(self.held), end is not None and end >= 0)
        held = bytes(self.held)
        self.held.clear()
        if self.verdict is None:
            self.state = "open"
            return self._send(held)
        self.state = "closed"
        if self.content_length is None:
            return self._send(b"0000")
        head = b"0000"[:self.content_length]
        return self._send(head) + self._fill(len(held) - len(head))

    def _send(self, data: bytes) -> list[bytes]:
        self.sent += len(data)
        return [data] if data else []

    def _fill(self, size: int) -> list[bytes]:
        """Zeros for what a declared Content-Length still expects (nothing for a chunked body)."""
        if self.content_length is None or size <= 0:
            return []
        size = min(size, self.content_length - self.sent)
        return self._send(b"\0" * size) if size > 0 else []
