"""The streamed-push gate: holds a push's body until its commands are judged, then passes it
whole or lets nothing of it through."""

from __future__ import annotations

import pytest

from chaperone_sidecar.gitgate import HOLD_LIMIT, PACK_PEEK, GitPushGate, commands_end

ZERO = "0" * 40


def pkt(line: bytes) -> bytes:
    return b"%04x" % (len(line) + 4) + line


COMMANDS = pkt(f"{ZERO} {'1' * 40} refs/heads/main\0report-status side-band-64k\n".encode()) + b"0000"
PACK = b"PACK" + bytes(range(256)) * (PACK_PEEK // 128)  # 2 x PACK_PEEK of "pack"


class Judge:
    def __init__(self, verdict=None):
        self.verdict, self.calls = verdict, []

    def __call__(self, held: bytes, complete: bool):
        self.calls.append((held, complete))
        return self.verdict


def feed(gate: GitPushGate, body: bytes, size: int = 4096) -> bytes:
    out = b""
    for i in range(0, len(body), size):
        out += b"".join(gate(body[i:i + size]))
    return out + b"".join(gate(b""))


def test_commands_end():
    assert commands_end(COMMANDS + b"PACK") == len(COMMANDS)
    assert commands_end(COMMANDS[:-2]) is None
    assert commands_end(b"0000") == 4  # git's probe
    options = pkt(f"{ZERO} {'1' * 40} refs/heads/x\0report-status push-options\n".encode()) + b"0000"
    assert commands_end(options) is None  # the options' own flush is still to come
    with_opts = options + pkt(b"ci.skip\n") + b"0000"
    assert commands_end(with_opts + b"PACK") == len(with_opts)
    with pytest.raises(ValueError):
        commands_end(b"garbage!")


def test_an_allowed_push_is_held_then_passed_whole():
    judge = Judge(None)
    gate = GitPushGate(judge, None)
    assert gate(COMMANDS) == []  # held: the commands alone, without any of the pack yet
    assert feed(gate, PACK) == COMMANDS + PACK
    (held, complete), = judge.calls
    assert complete and held.startswith(COMMANDS) and len(held) >= len(COMMANDS) + PACK_PEEK


def test_a_refused_chunked_push_sends_only_a_flush():
    judge = Judge("refused")
    gate = GitPushGate(judge, None)
    assert feed(gate, COMMANDS + PACK) == b"0000"
    assert gate.verdict == "refused" and gate.state == "closed"


def test_a_refused_push_with_a_length_sends_zeros_of_that_length():
    body = COMMANDS + PACK
    gate = GitPushGate(Judge("refused"), len(body))
    out = feed(gate, body, size=1000)
    assert len(out) == len(body) and out.startswith(b"0000") and set(out[4:]) == {0}


def test_unreadable_commands_are_judged_at_once_as_incomplete():
    judge = Judge("refused")
    gate = GitPushGate(judge, None)
    assert b"".join(gate(b"not pkt-lines at all")) == b"0000"
    assert judge.calls == [(b"not pkt-lines at all", False)]


def test_a_body_ending_early_or_too_long_is_judged_incomplete():
    judge = Judge("refused")
    gate = GitPushGate(judge, None)
    assert gate(COMMANDS[:10]) == []
    assert b"".join(gate(b"")) == b"0000"  # the end of the body: judged with what came
    assert judge.calls == [(COMMANDS[:10], False)]
    endless = pkt(b"shallow " + b"a" * 40 + b"\n") * (HOLD_LIMIT // 48 + 10)
    judge = Judge("refused")
    gate = GitPushGate(judge, None)
    feed(gate, endless, size=65536)
    assert len(judge.calls) == 1 and not judge.calls[0][1] and len(judge.calls[0][0]) <= HOLD_LIMIT + 65536
