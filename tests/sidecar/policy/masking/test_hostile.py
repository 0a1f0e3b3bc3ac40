"""Hostile bodies cost linear, small time (docs/masking.md, "Hostile bodies").

Whoever controls upstream data chooses the body that is masked. These floods were the
finders' worst cases: ``"1 " * 500000`` took ~15 s per MiB (every window of digit groups
tried at every group, a Python callback per trigger hit), ``eyJhbGciOi.`` repeated was
quadratic (3.4 s for 512 KiB, 15 s per MiB). Each 1 MiB body must now mask in well under the
bound (measured 0.2-0.8 s CPU; the bound leaves room for a loaded 2-core machine, and the old
code misses it fivefold). The results are those of the reference engine
(``test_differential.test_hostile_floods_mask_identically``).
"""

from __future__ import annotations

import json
import time

import pytest

from chaperone_sidecar.policy.masking import decoded, detectors, stream
from chaperone_sidecar.policy.masking.masker import Masker
from chaperone_sidecar.policy.masking.sse import SSEMasker
from chaperone_sidecar.policy.model import MaskSpec

RULES = detectors.resolve_rules(["all"])
MIB = 1 << 20
BOUND = 3.0  # CPU seconds per MiB


def _fill(unit: bytes) -> bytes:
    return (unit * (MIB // len(unit) + 1))[:MIB]


@pytest.mark.parametrize("unit", [b"1 ", b"1-", b"1 2-", b"4111 ", b"4111-", b"12 ", b"ssn1 1 1 1 1 1 1 1 1 1 1 1 1 1 ",
                                  b"eyJhbGciOi.", b"ey", b"-----BEGIN PRIVATE KEY-----",
                                  b"-----BEGIN PRIVATE KEY-----\nMIIB\n"], ids=repr)
def test_a_hostile_mib_masks_in_bounded_time(unit):
    body = _fill(unit) + b" 4111 1111 1111 1111"
    counts: dict[str, int] = {}
    started = time.process_time()
    out = decoded.mask_decoded(body, RULES, None, counts, json_strings=True)
    spent = time.process_time() - started
    assert spent < BOUND, f"{unit!r}: {spent:.2f} s CPU for 1 MiB"
    assert out.endswith(b"[MASKED:credit-card]")


# A base64 run first (so the body has one), then a flood of lines that may be wrapped base64 but
# hold no upper-case letter: each line once joined on to the end of the flood and searched it for
# an upper-case letter - quadratic (lines of 16: 10.9 s for 128 KiB; lines of 60: 1.5 s).
_RUN_FIRST = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldY go\n"
WRAPPED_FLOODS = {
    "lines of 16": (b"abcdefghijklmnop\n", False),
    "lines of 60": (b"abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwx\n", False),
    "CRLF lines": (b"abcdefghijklmnop\r\n", False),
    "escaped lines in JSON": (b"abcdefghijklmnop\\n", True),
}


@pytest.mark.parametrize("name", list(WRAPPED_FLOODS))
def test_lower_case_lines_after_a_base64_run_mask_in_bounded_time(name):
    unit, js = WRAPPED_FLOODS[name]
    body = _RUN_FIRST + _fill(unit) + b" 4111 1111 1111 1111"
    if js:
        body = b'{"a": "' + body + b'"}'
    started = time.process_time()
    out = decoded.mask_decoded(body, RULES, None, {}, json_strings=js)
    spent = time.process_time() - started
    assert spent < BOUND, f"{name}: {spent:.2f} s CPU for 1 MiB"
    assert b"[MASKED:credit-card]" in out and b"4111 1111" not in out
    started = time.process_time()
    masker = stream.StreamMasker(RULES, json_mode=js)
    streamed = b"".join([masker.feed(body[i:i + 65536]) for i in range(0, len(body), 65536)] + [masker.finish()])
    spent = time.process_time() - started
    assert spent < BOUND, f"{name}, streamed: {spent:.2f} s CPU for 1 MiB"
    assert streamed == out


def test_a_wrapped_run_whose_upper_case_letter_comes_late_is_still_one_run():
    """What the flood's shortcut must not lose: lower-case lines joined with a later line that
    has an upper-case letter are one run, decoded and masked whole."""
    import base64
    secret = base64.b64encode(b"id: AKIAIOSFODNN7EXAMPLE and some padding bytes to wrap " * 3)
    lines = [b"abcdefghijklmnop" * 4] * 3  # lower-case lines first (not base64 of the secret: noise)
    encoded = b"\n".join(lines + [secret[i:i + 64] for i in range(0, len(secret), 64)])
    body = _RUN_FIRST + encoded + b"\nend\n"
    out = decoded.mask_decoded(body, RULES, None, {})
    assert b"abcdefghijklmnop" not in out and b"[MASKED:aws-access-key-id]" in out


def _streamed_scan_bytes(body: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple[int, bytes]:
    """Bytes the detectors scanned to stream ``body`` in 16 KiB chunks, and the output. Work
    counted, not time: the two floods' CPU times swung on a loaded CI box (a 1 MiB working set
    suffers cache contention a 120 KiB one does not: 7.9x here, 20.3x there for the same code)."""
    scanned = 0
    detectors_scan = stream.scan

    def counting_scan(text, rules, *args, **kwargs):
        nonlocal scanned
        scanned += len(text) - kwargs.get("pos", 0)
        return detectors_scan(text, rules, *args, **kwargs)

    monkeypatch.setattr(stream, "scan", counting_scan)
    masker = stream.StreamMasker(RULES)
    out = b"".join([masker.feed(body[i:i + 16384]) for i in range(0, len(body), 16384)] + [masker.finish()])
    monkeypatch.setattr(stream, "scan", detectors_scan)
    return scanned, out


@pytest.mark.parametrize("unit", [b"AKIA", b"a@b.c"], ids=repr)
def test_a_streamed_flood_of_overlapping_matches_costs_linear_time(unit, monkeypatch):
    """A flood of overlapping matches is one finding until it ends, so the stream holds all of
    it; draining per chunk rescanned all that was held (quadratic: 256 KiB 0.6 s, 2 MiB ~28 s).
    Judged by the work done, which a loaded box cannot skew: the detectors scan each byte of
    the flood at most about twice (FLOOD_HOLD's doubling; per chunk it was ~N/32 KiB times -
    30x for the larger flood), and eight times the flood is eight times the work. The output is
    the whole body's: one token for the flood, the card after it masked. (Since session 13 a
    stream holds at most MAX_HELD: the larger flood stays under it.)"""
    def body(size: int) -> bytes:
        return (unit * (size // len(unit) + 1))[:size] + b" x 4111 1111 1111 1111 end"

    large_size = stream.MAX_HELD - 64 * 1024
    small, _ = _streamed_scan_bytes(body(large_size // 8), monkeypatch)
    large, out = _streamed_scan_bytes(body(large_size), monkeypatch)
    assert large <= 3 * large_size, f"{unit!r}: {large} bytes scanned for a {large_size}-byte flood"
    assert large / small < 10, f"{unit!r}: {small} bytes scanned for {large_size // 8}, {large} for {large_size}"
    assert out == decoded.mask_decoded(body(large_size), RULES, None, {})
    assert out.endswith(b"[MASKED:credit-card] end") and out.count(b"[MASKED:") == 2


def _delta(text: str) -> bytes:
    data = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}
    return b"event: content_block_delta\ndata: " + json.dumps(data).encode() + b"\n\n"


@pytest.mark.parametrize("piece", ["AKIA", "a@b.c"])
def test_streamed_llm_text_flooding_one_match_costs_linear_time(piece):
    """A model asked to repeat "AKIA" streams it a few bytes per event; the text is masked as one
    stream across events (sse.py), so the flood was drained per event over all that was held:
    8 KiB of text took 5.1 s, 32 KiB ~80 s (quadratic). 32 KiB now: ~0.2 s measured."""
    start = (b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
             b'"content_block":{"type":"text","text":""}}\n\n')
    body = start + b"".join(_delta(piece) for _ in range((32 << 10) // len(piece))) + _delta(" done")
    started = time.process_time()
    masker = SSEMasker(Masker([MaskSpec(detectors=("all",))]))
    out = b"".join([masker.feed(body[i:i + 4096]) for i in range(0, len(body), 4096)] + [masker.finish()])
    spent = time.process_time() - started
    assert spent < BOUND, f"{piece!r}: {spent:.2f} s CPU for 32 KiB of streamed text"
    texts = "".join(json.loads(line[6:])["delta"]["text"] for line in out.split(b"\n")
                    if line.startswith(b"data: ") and b"text_delta" in line)
    assert texts.count("[MASKED:") == 1 and texts.endswith(" done") and piece not in texts
