"""Masking throughput: the one-pass engine against the engine before it, in one alternating run.

    python bench/bench_masking.py [--rounds N] [--size BYTES] [--markdown]

Corpora of 1 MiB each (deterministic), with no secrets and with secrets (every detector's
samples from ``tests/sidecar/policy/masking/samples.py`` planted every ~8 KiB):

=========  ====================================================================================
text       the proxy benchmark's 1 MiB ``text/plain`` body (``bench/upstream.py``: lorem ipsum)
prose      log-like text: words, capitalised names, numbers, dates, paths, hex ids
json       an API response: objects with a 64-hex digest, ``\\u00e9`` escapes, dates, free text
sse        an Anthropic message stream: ``content_block_delta`` events of ~100 bytes
base64     a JSON document with a 60-column wrapped base64 file (GitHub's contents API)
binary     random bytes (masked as binary: printable runs, length preserving)
=========  ====================================================================================

``--floods`` masks the trigger floods of the hostile-body tests instead (a unit repeated to
1 MiB; CPU seconds per MiB, old engine against new).

Each corpus is masked whole (``decoded.mask_decoded`` / ``mask_binary``: what
``Masker.mask_bytes`` runs after decoding) and streamed in 64 KiB chunks (``StreamMasker``),
by the product engine (``chaperone_sidecar.policy.masking``) and by the engine before issue 16
(``tests/sidecar/policy/masking/reference``), alternating old/new per round. Reported: MB/s from
the best (lowest) CPU time (``time.process_time``) of the rounds - the machine is shared, so
the least disturbed run is the best estimate - and the median, plus whether both engines gave
the same output. The first call of each engine (regex caches) is excluded; each timed call gets
a fresh copy of the body (the prefilter caches its last result by identity).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO, REPO / "sidecar"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from bench.upstream import BODY_1M  # noqa: E402
from chaperone_sidecar.policy.masking import decoded as new_decoded  # noqa: E402
from chaperone_sidecar.policy.masking import detectors as new_detectors  # noqa: E402
from chaperone_sidecar.policy.masking import stream as new_stream  # noqa: E402
from tests.sidecar.policy.masking.reference import decoded as old_decoded  # noqa: E402
from tests.sidecar.policy.masking.reference import detectors as old_detectors  # noqa: E402
from tests.sidecar.policy.masking.reference import stream as old_stream  # noqa: E402
from tests.sidecar.policy.masking.samples import planted  # noqa: E402

MIB = 1 << 20
CHUNK = 64 * 1024
_WORDS = ("the request failed because the upstream returned an error after retrying "
          "Deployment Service Alice Bob Kubernetes GET POST /api/v1/namespaces default "
          "processed records in seconds status ok warning cache miss").split()


def _fill(size: int, piece: Callable[[random.Random, int], bytes], seed: int) -> bytes:
    rnd = random.Random(seed)
    out, i = bytearray(), 0
    while len(out) < size:
        out += piece(rnd, i)
        i += 1
    return bytes(out[:size])


def _prose(rnd: random.Random, i: int) -> bytes:
    words = " ".join(rnd.choice(_WORDS) for _ in range(12))
    return (f"2026-12-04T18:{i % 60:02d}:{i % 59:02d}Z INFO {words} id={rnd.getrandbits(48):x} "
            f"took {rnd.randint(1, 5000)} ms /var/log/app/{i % 17}.log\n").encode()


def _json_objects(size: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    objs: list[dict] = []
    body = b""
    while len(body) < size:
        for _ in range(200):
            i = len(objs)
            objs.append({"id": i, "digest": hashlib.sha256(str(i).encode()).hexdigest(),
                         "name": f"caf\u00e9 {i}", "created": f"2024-01-{i % 28 + 1:02d}T10:00:00Z",
                         "text": " ".join(rnd.choice(_WORDS) for _ in range(8)), "count": rnd.randint(0, 10**6)})
        body = json.dumps(objs).encode()
    return body


def _sse(rnd: random.Random, i: int) -> bytes:
    delta = json.dumps({"type": "content_block_delta", "index": 0,
                        "delta": {"type": "text_delta", "text": " ".join(rnd.choice(_WORDS) for _ in range(4))}})
    return b"event: content_block_delta\ndata: " + delta.encode() + b"\n\n"


def _base64_doc(size: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    raw = rnd.randbytes(size * 3 // 4)
    b64 = base64.b64encode(raw)
    lines = [b64[i:i + 60] for i in range(0, len(b64), 60)]
    content = "\n".join(x.decode() for x in lines)
    return json.dumps({"type": "file", "encoding": "base64", "path": "data.bin", "content": content}).encode()


def corpora(size: int = MIB) -> dict[str, tuple[bytes, bool, bool]]:
    """name -> (body, json_strings, binary)."""
    return {
        "text": ((BODY_1M * (size // len(BODY_1M) + 1))[:size], False, False),
        "prose": (_fill(size, _prose, 1), False, False),
        "json": (_json_objects(size, 2)[:size], True, False),
        "sse": (_fill(size, _sse, 3), True, False),
        "base64": (_base64_doc(size, 4)[:size], True, False),
        "binary": (random.Random(5).randbytes(size), False, True),
    }


def with_secrets(body: bytes, every: int = 8192, seed: int = 6) -> bytes:
    """``body`` with a secret of each detector in turn planted every ~``every`` bytes (at a
    line feed or space, so the surrounding text stays what it was), JSON-escaped in JSON."""
    rnd = random.Random(seed)
    samples = planted()
    out, at, k = [], 0, 0
    while at + every < len(body):
        cut = at + every
        for sep in (b" ", b"\n"):
            j = body.find(sep, cut, cut + 256)
            if j >= 0:
                cut = j + 1
                break
        _, secret, _ = samples[k % len(samples)]
        k += 1
        if rnd.random() < 0.5:
            secret = json.dumps(secret.decode())[1:-1].encode()  # as inside a JSON string
        out += [body[at:cut], b" ", secret, b" "]
        at = cut
    out.append(body[at:])
    return b"".join(out)


def _engines() -> dict[str, dict[str, Callable]]:
    new_rules = new_detectors.resolve_rules(["all"])
    old_rules = old_detectors.resolve_rules(["all"])

    def whole(mod, rules):
        def run(body: bytes, js: bool, binary: bool) -> bytes:
            counts: dict[str, int] = {}
            if binary:
                return mod.mask_binary(body, rules, None, counts)
            return mod.mask_decoded(body, rules, None, counts, json_strings=js)
        return run

    def streamed(mod, rules):
        def run(body: bytes, js: bool, binary: bool) -> bytes:
            masker = mod.StreamMasker(rules, json_mode=js, sniff=binary)
            out = [masker.feed(body[i:i + CHUNK]) for i in range(0, len(body), CHUNK)]
            out.append(masker.finish())
            return b"".join(out)
        return run

    return {"old": {"whole": whole(old_decoded, old_rules), "stream": streamed(old_stream, old_rules)},
            "new": {"whole": whole(new_decoded, new_rules), "stream": streamed(new_stream, new_rules)}}


def run(rounds: int = 5, size: int = MIB, modes: tuple[str, ...] = ("whole", "stream")) -> list[dict]:
    engines = _engines()
    rows = []
    bodies = corpora(size)
    for name, (clean, js, binary) in bodies.items():
        for secrets in (False, True):
            body = with_secrets(clean) if secrets else clean
            for mode in modes:
                times: dict[str, list[float]] = {"old": [], "new": []}
                outputs: dict[str, bytes] = {}
                for eng in ("old", "new"):  # warm-up (compile, caches): not timed
                    outputs[eng] = engines[eng][mode](body, js, binary)
                for r in range(rounds):
                    for eng in (("old", "new") if r % 2 == 0 else ("new", "old")):
                        # A fresh copy: the prefilter caches its last result by identity.
                        fresh = bytes(bytearray(body))
                        t0 = time.process_time()
                        engines[eng][mode](fresh, js, binary)
                        times[eng].append(time.process_time() - t0)
                row = {"corpus": name, "secrets": secrets, "mode": mode, "bytes": len(body),
                       "same": outputs["old"] == outputs["new"], "masked": outputs["new"] != body}
                for eng in ("old", "new"):
                    row[f"{eng}_best_mbs"] = len(body) / max(min(times[eng]), 1e-9) / 1e6
                    row[f"{eng}_median_mbs"] = len(body) / max(statistics.median(times[eng]), 1e-9) / 1e6
                rows.append(row)
                print(_line(row), flush=True)
    return rows


def _line(row: dict) -> str:
    return (f"{row['corpus']:8s} {'secrets' if row['secrets'] else 'clean':7s} {row['mode']:6s} "
            f"old {row['old_best_mbs']:8.1f} MB/s (median {row['old_median_mbs']:7.1f})  "
            f"new {row['new_best_mbs']:8.1f} MB/s (median {row['new_median_mbs']:7.1f})  "
            f"x{row['new_best_mbs'] / row['old_best_mbs']:6.1f}  same={row['same']}")


def engines(rounds: int = 5) -> list[tuple[str, str, float]]:
    """The candidate one-pass engines, each finding every trigger of every detector (the
    literal anchors and the fixed-shape patterns of ``prefilter.py``) in the clean 1 MiB text,
    prose and JSON corpora: (engine, corpus, MB/s from the best CPU time).

    * ``hyperscan``: the product's prefilter (all occurrences, overlapping ones included);
    * ``re2``: one combined alternation (``google-re2``, if importable - not a dependency):
      leftmost non-overlapping matches only, so it could only gate, not locate;
    * ``re``: the same alternation in Python's ``re``;
    * ``find``: ``bytes.find`` per literal anchor over a lowered copy, and ``re`` for the
      patterns (what the engine before issue 16 did, one pass per anchor).
    """
    import re

    from chaperone_sidecar.policy.masking.spans import prefilter_for

    rules = new_detectors.resolve_rules(["all"])
    triggers = [t for r in rules for t in r.triggers]
    literals = [t for t in triggers if t.width is not None and t.caseless]
    shapes = [t for t in triggers if t not in literals]
    alternation = (b"(?i:" + b"|".join(t.pattern for t in literals) + b")|" + b"|".join(t.pattern for t in shapes))
    needles = [re.sub(rb"\\x([0-9a-f]{2})", lambda m: bytes.fromhex(m.group(1).decode()), t.pattern)
               for t in literals]  # prefilter.literal escapes every non-alphanumeric byte
    shape_res = [re.compile(t.pattern) for t in shapes]
    pre = prefilter_for(rules)
    finders: dict[str, Callable[[bytes], object]] = {
        "hyperscan": lambda text: pre._db.scan(text, match_event_handler=lambda *a: None, scratch=pre._scratch()),
        "re": lambda text, c=re.compile(alternation): list(c.finditer(text)),
        "find": lambda text: ([text.lower().find(n) for n in needles], [list(r.finditer(text)) for r in shape_res]),
    }
    try:
        import re2  # type: ignore[import-not-found]

        combined = re2.compile(alternation)
        finders["re2"] = lambda text: list(combined.finditer(text))
    except ImportError:
        print("google-re2 not installed: re2 not measured")
    out = []
    bodies = corpora()
    for name in ("text", "prose", "json"):
        body = bodies[name][0]
        for engine, find in finders.items():
            best = min(_cpu(find, body) for _ in range(rounds if engine != "re" else 1))
            out.append((engine, name, len(body) / best / 1e6))
            print(f"{engine:10s} {name:6s} {len(body) / best / 1e6:9.1f} MB/s", flush=True)
    return out


FLOODS = (b"-----BEGIN ", b"AKIA", b"a@b.c", b"1 ", b"eyJhbGciOi.")


def floods(rounds: int = 3, size: int = MIB) -> list[tuple[str, float, float, bool]]:
    """Trigger floods (tests/sidecar/policy/masking/test_hostile.py): ``size`` bytes of one
    unit and a card at the end, masked whole (JSON mode) by the engine before issue 16 and
    the product engine, alternating: (unit, old and new best CPU seconds, same output)."""
    engines = _engines()
    out = []
    for unit in FLOODS:
        body = (unit * (size // len(unit) + 1))[:size] + b" 4111 1111 1111 1111"
        outputs = {eng: engines[eng]["whole"](body, True, False) for eng in ("old", "new")}
        times: dict[str, list[float]] = {"old": [], "new": []}
        for r in range(rounds):
            for eng in (("old", "new") if r % 2 == 0 else ("new", "old")):
                times[eng].append(_cpu(lambda b, e=eng: engines[e]["whole"](b, True, False), bytes(bytearray(body))))
        same = outputs["old"] == outputs["new"]
        out.append((unit.decode(), min(times["old"]), min(times["new"]), same))
        print(f"{unit.decode()!r:16s} old {min(times['old']):7.3f} s  new {min(times['new']):7.3f} s "
              f"(median {statistics.median(times['new']):.3f}) per {size / MIB:g} MiB  same={same}", flush=True)
    return out


def _cpu(fn: Callable[[bytes], object], body: bytes) -> float:
    t0 = time.process_time()
    fn(body)
    return max(time.process_time() - t0, 1e-9)


def markdown(rows: list[dict]) -> str:
    lines = ["| corpus (1 MiB) | secrets | path | before (MB/s, best / median) | one-pass (MB/s, best / median) "
             "| speed-up | same output |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['corpus']} | {'yes' if r['secrets'] else 'no'} | {r['mode']} | "
                     f"{r['old_best_mbs']:.1f} / {r['old_median_mbs']:.1f} | "
                     f"{r['new_best_mbs']:.1f} / {r['new_median_mbs']:.1f} | "
                     f"{r['new_best_mbs'] / r['old_best_mbs']:.1f}x | {'yes' if r['same'] else '**no**'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size", type=int, default=MIB)
    ap.add_argument("--modes", default="whole,stream")
    ap.add_argument("--markdown", action="store_true", help="print a docs/benchmarks.md table at the end")
    ap.add_argument("--engines", action="store_true", help="only compare the candidate one-pass engines")
    ap.add_argument("--floods", action="store_true", help="only mask the trigger floods (CPU s per MiB)")
    args = ap.parse_args(argv)
    if args.engines:
        engines(args.rounds)
        return 0
    if args.floods:
        return 0 if all(same for *_, same in floods(args.rounds, args.size)) else 1
    rows = run(args.rounds, args.size, tuple(args.modes.split(",")))
    if args.markdown:
        print(markdown(rows))
    return 0 if all(r["same"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
