"""bench/sse_ttft.py through real sidecars: the first token of a streamed answer is not held
back with the secret detectors, and is with ``email`` on (issue 16).

A structural check, not a timing one: the upstream waits 150 ms between two deltas, so a first
token that reaches the client within 150 ms was not held for the next delta, and one that took
longer was (a loaded machine adds milliseconds, not 150). The whole answer arrives unchanged on
both paths (``measure`` asserts it). Fails on the code before ``stream._releasable``: every
detector set held ``Hello`` until ``!`` arrived (its base64 run could continue).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import paths, sse_ttft  # noqa: E402

INTERVAL_MS = 150.0


def test_first_token_is_held_only_when_an_enabled_detector_may_start_with_it(tmp_path):
    upstream = sse_ttft.AnthropicUpstream(tmp_path / "upstream", INTERVAL_MS / 1000)
    env = paths.Env(tmp_path, upstream, paths.interception_ca(tmp_path / "ca"))
    ttft = {}
    try:
        for name in ("chaperone-masking-secrets", "chaperone-masking"):
            path = sse_ttft.make(name)
            path.start(env)
            try:
                ttft[name] = sse_ttft.measure(path, upstream, env.client_cafiles, 1)["ttft"][0]
            finally:
                path.stop()
    finally:
        upstream.stop()
    assert ttft["chaperone-masking-secrets"] < INTERVAL_MS, ttft  # "Hello" went out as it came
    assert ttft["chaperone-masking"] >= INTERVAL_MS, ttft  # with email on it waited for "!"
