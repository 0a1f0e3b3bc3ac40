"""Canonical JSON, the hash chain and the chain checker (pure functions, no I/O)."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, strategies as st

from chaperone_sidecar.recording.events import (
    Chain, ChainChecker, SessionIdentity, canonical_json, decode_body, encode_body, event_hash,
    genesis_hash, new_event, outline, split_lines, who,
)


def test_canonical_json_sorted_compact_utf8():
    assert canonical_json({"b": 1, "a": {"d": [1, 2], "c": "é"}}) == '{"a":{"c":"é","d":[1,2]},"b":1}'.encode()
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                    max_leaves=20))
def test_canonical_json_round_trips(value):
    encoded = canonical_json(value)
    assert canonical_json(json.loads(encoded)) == encoded


def test_genesis_is_per_session():
    assert genesis_hash("a") != genesis_hash("b")
    assert len(genesis_hash("a")) == 64


def _chain(n: int, session: str = "s1") -> tuple[list[dict], list[bytes]]:
    chain = Chain(session)
    events, lines = [], []
    for i in range(n):
        event = new_event("request", flow=f"f{i}", data={"i": i})
        event["time"] = f"2025-01-01T00:00:{i:02d}.000000Z"
        sealed, line = chain.seal(event)
        events.append(sealed)
        lines.append(line)
    return events, lines


def test_chain_links_each_event_to_the_previous():
    events, lines = _chain(5)
    assert events[0]["prev"] == genesis_hash("s1")
    for before, after in zip(events, events[1:]):
        assert after["prev"] == before["hash"]
    for event, line in zip(events, lines):
        assert event["hash"] == event_hash(event)
        assert line == canonical_json(event) + b"\n"
        assert [e["seq"] for e in events] == list(range(5))


def test_unserialisable_event_leaves_the_chain_unchanged():
    chain = Chain("s1")
    with pytest.raises(ValueError):
        chain.seal({"type": "request", "data": {"x": object()}})
    with pytest.raises(ValueError):
        chain.seal({"type": "request", "data": {"x": "\ud800"}})  # lone surrogate: not UTF-8
    assert (chain.seq, chain.last_hash) == (0, genesis_hash("s1"))


def _check(lines: list[bytes], session: str = "s1"):
    checker = ChainChecker(session)
    problems = []
    for number, line in enumerate(lines, 1):
        problems += checker.check_line("chunk", number, line)[1]
    return problems


def test_checker_accepts_an_intact_chain():
    assert _check(_chain(10)[1]) == []


def test_checker_names_an_edited_event():
    events, lines = _chain(6)
    edited = dict(events[3], data={"i": 999})
    lines[3] = canonical_json(edited) + b"\n"
    problems = _check(lines)
    assert [(p.line, p.seq, p.kind) for p in problems] == [(4, 3, "hash mismatch")]
    assert problems[0].expected == event_hash(edited) and problems[0].found == events[3]["hash"]


def test_checker_names_a_removed_event_once():
    _, lines = _chain(6)
    del lines[2]
    problems = _check(lines)
    assert [(p.line, p.seq, p.kind) for p in problems] == [
        (3, 2, "seq mismatch"), (3, 2, "prev does not match the previous event's hash")]


def test_checker_names_swapped_events():
    _, lines = _chain(6)
    lines[2], lines[3] = lines[3], lines[2]
    problems = _check(lines)
    assert problems[0].line == 3 and problems[0].seq == 2


def test_checker_rejects_events_from_another_session():
    _, lines = _chain(3, session="other")
    kinds = {p.kind for p in _check(lines, session="s1")}
    assert "session mismatch" in kinds


def test_checker_rejects_non_canonical_bytes_even_with_valid_hashes():
    events, lines = _chain(2)
    lines[1] = json.dumps(events[1], indent=1).replace("\n", " ").encode() + b"\n"
    assert [p.kind for p in _check(lines)] == ["bytes differ from the canonical form"]


@given(st.binary(max_size=300))
def test_body_round_trip(body):
    stored = encode_body(body)
    assert decode_body(stored) == body and stored["size"] == len(body)
    assert ("text" in stored) == _is_utf8(body)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_body_extras_and_none():
    assert encode_body(None) is None
    assert encode_body("hi", truncated=True) == {"text": "hi", "size": 2, "truncated": True}


def test_split_lines_separates_a_torn_tail():
    assert split_lines(b'{"a":1}\n{"b":2}\n{"c"') == ([b'{"a":1}\n', b'{"b":2}\n'], b'{"c"')
    assert split_lines(b"") == ([], b"")


def test_only_a_newline_ends_a_line():
    # A raw CR (only in a corrupt line: canonical JSON escapes it) does not split the line.
    assert split_lines(b'{"a":"x\ry"}\r\n{"b":2}\n\n') == ([b'{"a":"x\ry"}\r\n', b'{"b":2}\n', b"\n"], b"")
    assert outline(b'{"a":"x\ry"}\r\n{"b":2}\n\n') == (3, b'{"a":"x\ry"}\r\n', b"\n", 22)


def test_outline_agrees_with_split_lines():
    rnd = random.Random(16)
    cases = [b"", b"\n", b"x", b"a\n", b"a\nb", b"\n\nx", b'{"a":1}\n{"b":2}\n{"c"']
    cases += [bytes(rnd.choice(b"ab\n\r") for _ in range(rnd.randrange(40))) for _ in range(2000)]
    for data in cases:
        lines, tail = split_lines(data)
        assert outline(data) == (len(lines), lines[0] if lines else b"", lines[-1] if lines else b"",
                                 len(data) - len(tail)), data


def test_identity_and_who():
    ident = SessionIdentity(namespace="ns", pod="p", service_account="agent", creator="alice")
    assert ident.to_dict() == {"namespace": "ns", "pod": "p", "serviceAccount": "agent", "creator": "alice"}
    assert who(ident.to_dict()) == "alice"
    assert who({"namespace": "ns", "serviceAccount": "agent"}) == "system:serviceaccount:ns:agent"
    assert who({**ident.to_dict(), "onBehalfOf": "bob@example.com"}) == "bob@example.com"


def test_new_event_refuses_unknown_types():
    with pytest.raises(ValueError):
        new_event("bogus")
