"""Scanning, merging and replacement: tokens, keyed hashes, idempotence, overlapping matches."""

from __future__ import annotations

import re

from chaperone_sidecar.policy.masking.spans import (
    MASK_TOKEN_RE,
    Finding,
    adjacent,
    anchored,
    apply,
    mask_text,
    mask_token,
    merge,
    scan,
)

from .samples import ALL_RULES, AWS_KEY_ID, make_jwt, mask


def test_merge_unions_overlaps_and_keeps_neighbours_apart():
    findings = [Finding(10, 20, "b"), Finding(0, 5, "a"), Finding(5, 8, "c"), Finding(15, 30, "d"), Finding(12, 14, "e")]
    assert merge(findings) == [Finding(0, 5, "a"), Finding(5, 8, "c"), Finding(10, 30, "b")]


def test_merge_names_the_earliest_longest_finding():
    assert merge([Finding(3, 9, "short"), Finding(3, 12, "long")]) == [Finding(3, 12, "long")]


def test_apply_replaces_and_counts():
    counts: dict[str, int] = {}
    out = apply(b"0123456789", [Finding(1, 3, "x"), Finding(5, 6, "y")], None, counts)
    assert out == b"0[MASKED:x]34[MASKED:y]6789"
    assert counts == {"x": 1, "y": 1}
    assert apply(b"0123456789", [Finding(5, 6, "y")], None, None, start=4, end=8) == b"4[MASKED:y]67"


def test_keyed_tokens_are_stable_and_distinct():
    a1 = mask_token("jwt", b"secret-one", b"key")
    assert a1 == mask_token("jwt", b"secret-one", b"key")
    assert a1 != mask_token("jwt", b"secret-two", b"key")
    assert a1 != mask_token("jwt", b"secret-one", b"other key")
    assert re.fullmatch(rb"\[MASKED:jwt:[0-9a-f]{12}\]", a1)
    assert MASK_TOKEN_RE.fullmatch(a1) and MASK_TOKEN_RE.fullmatch(mask_token("us-ssn", b"x", None))
    assert b"secret-one" not in a1


def test_same_secret_same_token_across_bodies():
    one = mask(b"id " + AWS_KEY_ID + b" in body one", hash_key=b"k")
    two = mask(b'{"k": "' + AWS_KEY_ID + b'"}', hash_key=b"k")
    token = MASK_TOKEN_RE.search(one).group()
    assert token in two and token.startswith(b"[MASKED:aws-access-key-id:")


def test_findings_inside_existing_tokens_are_dropped():
    text = b'{"password": "[MASKED:secret-json-key]", "token": "[MASKED:email:0123456789ab]"}'
    assert [c.finding for c in scan(text, ALL_RULES) if c.finding] == []
    # but a value that merely contains a token is still masked whole
    assert mask(b'{"password": "[MASKED:x] hunter2"}') == b'{"password": "[MASKED:secret-json-key]"}'


def test_masking_creates_boundaries_and_rescans():
    """A JWT glued to an email: the second address only has a boundary once the JWT is masked."""
    text = make_jwt() + b"alice.smith@example.com"
    out = mask(text)
    assert out == b"[MASKED:jwt].smith@example.com" or b"@example.com" not in out
    assert mask(out) == out
    glued = b"alice@example.co.uk_bob@example.com"
    assert mask(glued) == b"[MASKED:email]"


def test_adjacent():
    assert adjacent(b"ab", [Finding(1, 2, "x")])
    assert not adjacent(b" b ", [Finding(1, 2, "x")])
    assert adjacent(b"b ", [Finding(0, 1, "x")], before=b"a")
    assert not adjacent(b"b ", [Finding(0, 1, "x")], before=b"\n")


def test_anchored_finder_respects_pos_and_dedupes():
    pattern = re.compile(rb"k(\d)")
    find = anchored(pattern, lambda text, i: (i, i - 1))
    text = b"k1 k2 k3"
    assert [m.group() for m in find(text, 0, [0, 1, 3, 6])] == [b"k1", b"k2", b"k3"]
    assert [m.group() for m in find(text, 3, [0, 1, 3, 6])] == [b"k2", b"k3"]


def test_scan_pos_sees_lookbehind_context():
    text = b"x4111111111111111"  # glued to the "x" before pos: no card
    assert not [c for c in scan(text, ALL_RULES, pos=1) if c.finding]
    assert [c for c in scan(b" " + text[1:], ALL_RULES, pos=1) if c.finding]
    assert mask_text(b"", ALL_RULES) == b""
    assert mask_text(b"abc", ()) == b"abc"
