"""An exec/attach/port-forward session as a terminal transcript, from its ``stream`` events.

``chaperone sessions replay`` shows each recorded session under the flow that opened it
(the ``kubectl exec`` request, its decision and the 101): the command, what was typed on
stdin, stdout and stderr as the agent received them (masked), the exit status from the error
channel, and for a port-forward each stream's port, refusals and byte counts (the tunnel's
content is never recorded). Each line carries the event's time and the milliseconds since the
session opened. The events are written by ``addons/sessions.py``; their ``data`` holds
``channel`` (open, stdin, stdout, stderr, error, resize, close, data, end), ``direction``,
``data`` (``{"text"}`` or ``{"base64"}``, masked), ``size``, ``masked``, ``exit``, ``port``.

Terminal control sequences in recorded output are shown escaped (``\\x1b[0m``), so replaying a
session cannot drive the reader's terminal.
"""

from __future__ import annotations

import shlex
from typing import Any

from .events import decode_body

__all__ = ["transcript_line", "format_line"]

_MAX_TEXT = 4000  # characters of one frame shown; the recording holds more


def _text(stored: Any, limit: int = _MAX_TEXT) -> str:
    if not isinstance(stored, dict):
        return ""
    raw = decode_body(stored)
    text = raw.decode("utf-8", "replace")
    if len(text) > limit:
        text = text[:limit] + f"... (+{len(text) - limit} chars)"
    # Everything but line feeds and printable text escaped: no control sequence reaches the
    # terminal of whoever replays the session.
    return "".join(c if c == "\n" or c.isprintable() else repr(c)[1:-1] for c in text)


def transcript_line(event: dict[str, Any]) -> dict[str, Any] | None:
    """One transcript entry for a ``stream`` event (None for events not worth a line)."""
    data = event.get("data") or {}
    channel = str(data.get("channel", ""))
    entry: dict[str, Any] = {"time": event.get("time"), "elapsedMs": data.get("elapsedMs"),
                             "channel": channel, "text": ""}
    masked = data.get("masked")
    if channel == "open" and data.get("subresource"):
        command = data.get("command")
        target = f"{data.get('pod', '?')} -c {data.get('container') or '(default)'}"
        what = {"exec": "exec", "attach": "attach", "portforward": "port-forward"}.get(
            str(data["subresource"]), str(data["subresource"]))
        entry["text"] = f"$ kubectl {what} {target}" + (
            f" -- {shlex.join(command)}" if command else "") + (
            f" (ports {','.join(data['ports'])})" if data.get("ports") else "") + (
            f"  [{data.get('protocol')}]" if data.get("protocol") else "")
    elif channel == "open":
        state = f" REFUSED: {data['refused']}" if data.get("refused") else ""
        entry["text"] = (f"stream {data.get('stream')} {data.get('streamType', '')} "
                         f"port {data.get('port')}{state}")
    elif channel in ("stdin", "stdout", "stderr"):
        entry["text"] = _text(data.get("data")) or (
            f"<{data.get('size', 0)} bytes not recorded>" if data.get("size") else "")
        if not entry["text"]:
            return None
    elif channel == "error" and isinstance(data.get("exit"), dict):
        exit_ = data["exit"]
        code = exit_.get("exitCode")
        entry["channel"] = "exit"
        entry["text"] = f"exit status {code if code is not None else '?'}" + (
            f" ({exit_['message']})" if exit_.get("message") and code != 0 else "")
    elif channel == "error":
        entry["text"] = _text(data.get("data")) or f"{data.get('size', 0)} bytes"
        if data.get("closed"):
            entry["text"] = f"closed: {data['closed']}"
    elif channel == "data":
        direction = "agent -> pod" if data.get("direction") == "in" else "pod -> agent"
        entry["text"] = f"port {data.get('port')} {direction}: {data.get('size', 0)} bytes" + (
            " (end)" if data.get("fin") else "")
    elif channel == "resize":
        entry["text"] = _text(data.get("data"))
    elif channel == "close":
        entry["text"] = f"({data.get('closes')} closed by the agent)"
    elif channel == "end":
        exit_ = data.get("exit") or {}
        entry["text"] = f"(session ended after {data.get('durationMs')} ms" + (
            f", exit status {exit_.get('exitCode')}" if exit_.get("exitCode") is not None else "") + ")"
    else:
        entry["text"] = channel
    if masked:
        entry["masked"] = masked
    if data.get("undelivered"):
        entry["text"] += "  (held for masking when the connection closed: never delivered)"
    return entry


def format_line(entry: dict[str, Any], indent: int = 21) -> list[str]:
    """The printed lines of one entry: time, +elapsed, channel, then the text (a multi-line
    frame continues under its first line)."""
    time = str(entry.get("time") or "")[11:23]
    elapsed = entry.get("elapsedMs")
    head = f"{'':{indent}}{time:12} {'+' + str(elapsed) + 'ms' if elapsed is not None else '':>9} " \
           f"{entry.get('channel', ''):6} | "
    parts = str(entry.get("text", "")).split("\n")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()
    if entry.get("masked"):
        parts[0] += f"  [masked {', '.join(f'{k} x{v}' for k, v in sorted(entry['masked'].items()))}]"
    return [head + parts[0]] + [" " * len(head) + p for p in parts[1:]]
