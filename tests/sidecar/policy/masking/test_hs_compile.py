"""hs_compile: the masking database is compiled in a child process and loaded serialized, so
the sidecar never makes Hyperscan's compiler resident (issue 16, idle RSS); it finds what an
in-process compile finds, and any failure of the child falls back to compiling in process."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import hyperscan
import pytest

from chaperone_sidecar.policy.masking import hs_compile
from chaperone_sidecar.policy.masking.detectors import ALL, resolve_rules
from chaperone_sidecar.policy.masking.prefilter import MASKED, SHARED_TRIGGERS, Prefilter

REPO = Path(__file__).resolve().parents[4]

TEXT = (b'{"aws_secret_access_key": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "id": "AKIAIOSFODNN7EXAMPLE",'
        b' "to": "alice@example.com", "ssn": "078-05-1120", "card": "4111 1111 1111 1111",'
        b' "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln", "x": "[MASKED:email]"}\n'
        b"-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\nAuthorization: Bearer abc123DEF456ghi789")


def _triggers():
    return sorted({t for r in resolve_rules([ALL]) for t in r.triggers} | set(SHARED_TRIGGERS),
                  key=lambda t: (t.pattern, t.caseless))


def _flags(triggers):
    return [hyperscan.HS_FLAG_CASELESS if t.caseless else 0 for t in triggers]


def _matches(db, text: bytes) -> list[tuple[int, int]]:
    found: list[tuple[int, int]] = []
    db.scan(text, match_event_handler=lambda id_, start, end, flags, ctx: found.append((id_, end)),
            scratch=db.scratch.clone())
    return sorted(found)


def test_the_child_compiled_database_finds_what_an_in_process_one_finds():
    triggers = _triggers()
    expressions, flags = [t.pattern for t in triggers], _flags(triggers)
    text = TEXT * 3 + bytes(range(256))
    loaded = hs_compile.compile_database(expressions, flags)
    assert _matches(loaded, text) == _matches(hs_compile.compile_in_process(expressions, flags), text)
    assert len(_matches(loaded, text)) > 20
    assert Prefilter(triggers).hits(TEXT).positions((MASKED,))  # [MASKED: found


def test_a_failing_child_falls_back_to_compiling_here(monkeypatch, caplog):
    triggers = _triggers()
    expressions, flags = [t.pattern for t in triggers], _flags(triggers)
    monkeypatch.setattr(sys, "executable", str(REPO / "no-such-python"))
    with caplog.at_level(logging.WARNING, logger="chaperone.masking"):
        db = hs_compile.compile_database(expressions, flags)
    assert "compiling it here" in caplog.text
    assert _matches(db, TEXT) == _matches(hs_compile.compile_in_process(expressions, flags), TEXT)


def test_an_invalid_expression_is_still_an_error():
    with pytest.raises(hs_compile.ENGINE_ERRORS, match="(?i)parenthesis"):
        hs_compile.compile_database([b"(unclosed"], [0])


RESIDENT = r"""
import chaperone_sidecar.policy.masking.detectors, chaperone_sidecar.policy.masking.decoded
mapping, kib = None, 0
for line in open("/proc/self/smaps"):
    parts = line.split()
    if "-" in parts[0] and not parts[0].endswith(":"):
        mapping = parts[5] if len(parts) > 5 else ""
    elif parts[0] == "Rss:" and mapping and ("/hyperscan/" in mapping or "/libhs.so" in mapping):
        kib += int(parts[1])
print(kib)
"""


def test_the_sidecar_never_makes_the_compiler_resident():
    """Importing the detectors (which builds the database of every detector and the base64
    tail's) leaves ~1.6 MB of Hyperscan resident (the wheel's extension and the system's
    libhs.so.5 together); compiled in process it was ~5.3 MB (the compiler's code pages)."""
    out = subprocess.run([sys.executable, "-c", RESIDENT], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(REPO / "sidecar"), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert 0 < int(out.stdout) < 3 * 1024, f"{int(out.stdout)} KiB of hyperscan resident"
