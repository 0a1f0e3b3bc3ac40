"""Transcript lines of recorded exec/attach/port-forward sessions (recording/transcript.py)."""

from __future__ import annotations

from chaperone_sidecar.recording.events import encode_body
from chaperone_sidecar.recording.transcript import format_line, transcript_line


def event(**data):
    return {"type": "stream", "time": "2026-12-04T18:31:02.392000Z", "data": {"elapsedMs": 261, **data}}


def test_lines_for_each_channel():
    assert transcript_line(event(channel="open", subresource="portforward", pod="ns/web",
                                 protocol="SPDY/3.1+portforward.k8s.io"))["text"] == \
        "$ kubectl port-forward ns/web -c (default)  [SPDY/3.1+portforward.k8s.io]"
    assert transcript_line(event(channel="open", stream=1, streamType="error", port="22",
                                 refused="No tunnels."))["text"] == \
        "stream 1 error port 22 REFUSED: No tunnels."
    assert transcript_line(event(channel="data", direction="out", port="8080", size=120,
                                 fin=True))["text"] == "port 8080 pod -> agent: 120 bytes (end)"
    failed = transcript_line(event(channel="error", exit={"status": "Failure", "exitCode": 2,
                                                          "message": "terminated"}))
    assert (failed["channel"], failed["text"]) == ("exit", "exit status 2 (terminated)")
    held = transcript_line(event(channel="stdout", data=encode_body(b"tail"), undelivered=True))
    assert held["text"].startswith("tail") and "never delivered" in held["text"]
    assert transcript_line(event(channel="stdout", size=0)) is None  # an empty frame
    assert transcript_line(event(channel="close", closes="stdin"))["text"] == "(stdin closed by the agent)"


def test_control_sequences_are_escaped_and_lines_continue_under_the_first():
    entry = transcript_line(event(channel="stdout", data=encode_body(b"\x1b]0;owned\x07a\nb\n"),
                                  masked={"jwt": 1}))
    lines = format_line(entry)
    assert len(lines) == 2
    assert lines[0].endswith("stdout | \\x1b]0;owned\\x07a  [masked jwt x1]")
    assert "+261ms" in lines[0] and "18:31:02.392" in lines[0]
    assert lines[1].strip() == "b" and lines[1].index("b") == lines[0].index("| ") + 2
