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

import time

import pytest

from chaperone_sidecar.policy.masking import decoded, detectors

RULES = detectors.resolve_rules(["all"])
MIB = 1 << 20
BOUND = 3.0  # CPU seconds per MiB


def _fill(unit: bytes) -> bytes:
    return (unit * (MIB // len(unit) + 1))[:MIB]


@pytest.mark.parametrize("unit", [b"1 ", b"1-", b"1 2-", b"4111 ", b"4111-", b"12 ", b"ssn1 1 1 1 1 1 1 1 1 1 1 1 1 1 ",
                                  b"eyJhbGciOi.", b"ey"], ids=repr)
def test_a_hostile_mib_masks_in_bounded_time(unit):
    body = _fill(unit) + b" 4111 1111 1111 1111"
    counts: dict[str, int] = {}
    started = time.process_time()
    out = decoded.mask_decoded(body, RULES, None, counts, json_strings=True)
    spent = time.process_time() - started
    assert spent < BOUND, f"{unit!r}: {spent:.2f} s CPU for 1 MiB"
    assert out.endswith(b"[MASKED:credit-card]")
