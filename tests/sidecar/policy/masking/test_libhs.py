"""libhs: the system's Hyperscan library through ctypes. The test bed installs it (Debian's
libvectorscan5, `make system-deps`), so a machine without it fails here instead of masking
silently on the slower wheel; every database it builds must find exactly what the wheel's finds."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import hyperscan
import pytest

from bench.bench_masking import corpora
from chaperone_sidecar.policy.masking import hs_compile, libhs
from chaperone_sidecar.policy.masking.detectors import ALL, resolve_rules
from chaperone_sidecar.policy.masking.prefilter import SHARED_TRIGGERS, Prefilter

REPO = Path(__file__).resolve().parents[4]
SIZE = 64 * 1024


def _triggers():
    # every pattern, the native card trigger's too (the specification test_stretches.py checks against)
    return sorted({t for r in resolve_rules([ALL]) for t in r.triggers} | set(SHARED_TRIGGERS),
                  key=lambda t: (t.pattern, t.caseless))


def _flags(triggers):
    return [libhs.HS_FLAG_CASELESS if t.caseless else 0 for t in triggers]


def _texts() -> dict[str, bytes]:
    texts = {name: body for name, (body, _, _) in corpora(SIZE).items()}
    texts["akia-flood"] = b"AKIA akia1234567890123456 " * 2000
    texts["digits-flood"] = b"4111 1111 1111 1111 " * 2000
    texts["all-bytes"] = bytes(range(256)) * 64
    texts["empty"] = b""
    return texts


def _hits(db, text, scratch=None) -> Counter:
    found: Counter = Counter()
    db.scan(text, match_event_handler=lambda id_, start, end, flags, ctx: ctx.update([(id_, end)]), context=found,
            scratch=scratch or db.scratch.clone())
    return found


@pytest.fixture(scope="module")
def lib() -> libhs.Library:
    loaded = libhs.load()
    assert loaded is not None, f"{libhs.LIBRARY_NAME} does not load: install libvectorscan5 (make system-deps)"
    return loaded


def test_masking_scans_with_the_system_library(lib):
    assert hs_compile.system_library() is lib
    assert hs_compile.engine_name().startswith(f"system {libhs.LIBRARY_NAME} {lib.version}")
    triggers = _triggers()
    prefilter = Prefilter(triggers)
    assert isinstance(prefilter._db, libhs.Database)
    assert prefilter._db.info().startswith(f"Version: {lib.version.split()[0]} Features:")


def test_every_match_is_the_wheels(lib):
    """Every trigger pattern compiled by each engine: the same (trigger, end) matches,
    counted, on every corpus and flood."""
    triggers = _triggers()
    expressions, flags = [t.pattern for t in triggers], _flags(triggers)
    ours = lib.compile(expressions, flags)
    wheel = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    wheel.compile(expressions=expressions, ids=list(range(len(expressions))), elements=len(expressions), flags=flags)
    without = []
    for name, text in _texts().items():
        expected = _hits(wheel, text)
        assert _hits(ours, text) == expected, name
        if not expected:
            without.append(name)
    # No trigger in 64 KiB of these: their matches were the upper-case letters and windows of
    # the base64 patterns, which _stretches.c finds since session 10 (test_stretches.py).
    assert sorted(without) == ["empty", "prose", "sse", "text"]


def test_a_true_return_stops_the_scan(lib):
    db = lib.compile([b"akia"], [libhs.HS_FLAG_CASELESS])
    seen: list[int] = []
    with pytest.raises(libhs.ScanTerminated):
        db.scan(b"x akia AKIA akia", match_event_handler=lambda i, s, e, f, ctx: ctx.append(e) or len(ctx) == 2,
                context=seen)
    assert seen == [6, 11]
    db.scan(b"akia akia", match_event_handler=lambda *a: None)  # scratch still usable afterwards


def test_an_exception_in_the_handler_stops_the_scan_and_is_raised(lib):
    """Never swallowed (ctypes' default: print it, go on - a trigger lost, a secret unmasked)."""
    db = lib.compile([b"akia"], [libhs.HS_FLAG_CASELESS])
    calls: list[int] = []

    def handler(i, s, e, f, ctx):
        calls.append(e)
        raise MemoryError("no room for the hit")

    with pytest.raises(MemoryError, match="no room"):
        db.scan(b"akia akia akia", match_event_handler=handler)
    assert calls == [4]
    assert _hits(db, b"akia akia") == Counter({(0, 4): 1, (0, 9): 1})  # the scratch is fine afterwards


def test_a_serialized_database_scans_like_the_compiled_one(lib):
    triggers = _triggers()
    db = lib.compile([t.pattern for t in triggers], _flags(triggers))
    loaded = lib.deserialize(db.serialize())
    text = _texts()["json"]
    assert _hits(loaded, text) == _hits(db, text)
    with pytest.raises(libhs.HyperscanError, match="hs_deserialize_database"):
        lib.deserialize(b"not a database")


def test_an_invalid_expression_is_named(lib):
    with pytest.raises(libhs.HyperscanError, match="expression 1: .*parenthesis"):
        lib.compile([b"fine", b"(unclosed"], [0, 0])


def test_bytes_like_input_and_one_scratch_per_thread(lib):
    triggers = _triggers()
    db = lib.compile([t.pattern for t in triggers], _flags(triggers))
    text = _texts()["prose"]
    expected = _hits(db, text)
    assert _hits(db, bytearray(text)) == expected and _hits(db, memoryview(text)) == expected
    results: list[Counter] = []

    def worker() -> None:
        scratch = db.scratch.clone()
        for _ in range(5):
            results.append(_hits(db, text, scratch))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 20 and all(r == expected for r in results)


def test_the_wheel_can_be_forced_and_finds_the_same():
    """CHAPERONE_HYPERSCAN=wheel: the prefilter runs on the hyperscan wheel (A/B runs)."""
    code = ("from chaperone_sidecar.policy.masking import hs_compile, spans, detectors;"
            "r = detectors.resolve_rules(['all']); p = spans.prefilter_for(r);"
            "print(hs_compile.engine_name()); print(type(p._db).__module__);"
            "print(sorted(p.hits(b'id AKIAIOSFODNN7EXAMPLE to a@b.io 4111 1111 1111 1111').positions(p.triggers)))")
    outs = []
    for engine in ("wheel", ""):
        env = {**os.environ, "CHAPERONE_HYPERSCAN": engine, "PYTHONPATH": str(REPO / "sidecar")}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        outs.append(out.stdout.splitlines())
    (wheel_name, wheel_module, wheel_hits), (ours_name, ours_module, ours_hits) = outs
    assert wheel_name.startswith("hyperscan wheel") and wheel_module == "hyperscan"
    assert ours_name.startswith("system") and ours_module.endswith("libhs")
    assert wheel_hits == ours_hits != "[]"
