"""Masking alone, before/after in one alternating run: the bench corpora, whole and streamed.

    python bench/ab_masking_engine.py --before /tmp/before-checkout [--rounds 3]

Each round runs one child process per checkout (order alternating) that masks every corpus of
``bench/bench_masking.py`` (1 MiB each; clean and with a secret of each detector every ~8 KiB)
whole (``decoded.mask_decoded`` / ``mask_binary``) and streamed in 64 KiB chunks
(``StreamMasker``), with every detector, and reports the best CPU time of five calls. Printed
per row: ms per MiB before and after (best over the rounds), MB/s, the speed-up, and whether the
outputs are the same - compared on the same bytes: the corpora are built once here and handed
to both children (the planted JWT and RSA key are generated per process).

Why next to ``bench_masking.py``: that one compares the product's engine with the reference
engine kept in the tests (the engine before issue 16); this one compares two checkouts of the
product (``git worktree add --detach /tmp/before-checkout main``; build its C extension with
``pip install -e`` in a venv of its own, or copy this tree's build when ``_stretches.c`` is
unchanged), to measure one change.
"""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]

_CHILD = r'''
import hashlib, json, pickle, sys, time
root, corpora_file = sys.argv[1], sys.argv[2]
sys.path[:0] = [root, root + "/sidecar"]
from chaperone_sidecar.policy.masking import decoded, detectors, stream
rules = detectors.resolve_rules(["all"])
out = {}
for key, (body, js, binary) in pickle.load(open(corpora_file, "rb")).items():
    def whole(b):
        if binary:
            return decoded.mask_binary(b, rules, None, {})
        return decoded.mask_decoded(b, rules, None, {}, json_strings=js)
    def streamed(b):
        masker = stream.StreamMasker(rules, json_mode=js, sniff=binary)
        parts = [masker.feed(b[i:i + 65536]) for i in range(0, len(b), 65536)]
        parts.append(masker.finish())
        return b"".join(parts)
    for mode, run in (("whole", whole), ("stream", streamed)):
        run(body)  # warm-up: regex and database caches
        best, result = 1e9, b""
        for _ in range(5):
            fresh = bytes(bytearray(body))  # the prefilter caches its last result by identity
            t0 = time.process_time()
            result = run(fresh)
            best = min(best, time.process_time() - t0)
        out[f"{key} {mode}"] = (best * 1e3 / (len(body) / 2**20), hashlib.sha256(result).hexdigest())
print(json.dumps(out))
'''


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="a checkout of the code before the change")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    from bench.bench_masking import corpora, with_secrets
    bodies = {}
    for name, (clean, js, binary) in corpora().items():
        bodies[f"{name} clean"] = (clean, js, binary)
        bodies[f"{name} secrets"] = (with_secrets(clean), js, binary)
    results: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.NamedTemporaryFile(suffix=".pickle") as handle:
        pickle.dump(bodies, handle)
        handle.flush()
        for r in range(args.rounds):
            sides = [("before", args.before), ("after", str(REPO))]
            for side, root in (sides if r % 2 == 0 else sides[::-1]):
                child = subprocess.run([sys.executable, "-c", _CHILD, root, handle.name],
                                       capture_output=True, text=True, check=True)
                results[side].append(json.loads(child.stdout))
    for key in results["after"][0]:
        before = min(run[key][0] for run in results["before"])
        after = min(run[key][0] for run in results["after"])
        same = results["before"][0][key][1] == results["after"][0][key][1]
        print(f"{key:24s} before {before:7.2f} ms/MiB  after {after:7.2f} ({1.048576e3 / after:6.0f} MB/s)  "
              f"x{before / after:5.2f}  same={same}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
