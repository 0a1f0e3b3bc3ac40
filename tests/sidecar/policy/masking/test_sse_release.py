"""Streamed LLM text: what is held back, and that a secret split anywhere is still masked
(issue 16: time to first token).

A trailing word of a text delta is a base64 run that may still continue, and the base64 view
masks a run whole when its decoding holds a secret; ``stream._releasable`` lets the start of
such a run go out as far as its decoding cannot be part of a secret. These tests pin both
sides: the first token of an answer is not held when no enabled detector can start with it,
and an adversary splitting a secret - plain or base64-encoded - at any byte across two events
still gets it masked, exactly as the whole text would be, or with a released prefix that
decodes to bytes before the secret.
"""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chaperone_sidecar.policy.masking.masker import Masker
from chaperone_sidecar.policy.masking.spans import scan
from chaperone_sidecar.policy.masking.sse import SSEMasker
from chaperone_sidecar.policy.model import MaskSpec

from .samples import planted
from .test_sse import assembled, delta, drive, ev, message

# The detectors of examples/aws-policy.yaml and the e2e profile: the documented starting set.
SECRETS = ("aws-access-key-id", "aws-secret-key", "private-key", "jwt")
MASKERS = {"secrets": Masker([MaskSpec(detectors=SECRETS)]), "all": Masker([MaskSpec(detectors=("all",))])}
SAMPLES = {name: [(kind, text) for kind, text, _ in planted() if name == "all" or kind in SECRETS]
           for name in MASKERS}


def whole(masker: Masker, text: bytes) -> bytes:
    """The text masked as one buffered body (detectors and decoded views)."""
    return masker.mask_bytes(text, "text/plain").body


def start() -> bytes:
    raw = message([])
    return raw[: raw.index(b"event: content_block_stop")]


# ---------------------------------------------------------------------------- first token

def test_first_word_goes_out_at_once_with_the_secret_detectors():
    s = SSEMasker(MASKERS["secrets"])
    s(start())
    out = b"".join(s(delta(0, "text_delta", "Hello")))
    assert assembled(out) == "Hello"  # was held until the next delta (it could grow into base64)
    assert assembled(b"".join(s(delta(0, "text_delta", "!")))) == "!"


def test_first_word_waits_when_it_may_be_an_address():
    """With ``email`` on, ``Hello`` may be the local part of ``Hello@example.com``: it waits."""
    s = SSEMasker(MASKERS["all"])
    s(start())
    assert assembled(b"".join(s(delta(0, "text_delta", "Hello")))) == ""
    assert assembled(b"".join(s(delta(0, "text_delta", "!")))) == "Hello!"


@pytest.mark.parametrize("word", ["AKIA", "eyJhbGci", "QUtJQUlPU0ZP", "ZXlKaGJHY2k"])
def test_a_word_that_may_start_a_secret_or_its_base64_waits(word):
    """A key id's or JWT's start, and the base64 of one (``QUtJQ...`` decodes to ``AKIA``)."""
    s = SSEMasker(MASKERS["secrets"])
    s(start())
    out = assembled(b"".join(s(delta(0, "text_delta", "see " + word))))
    assert out in ("see ", "see")


def test_released_start_of_a_run_that_turns_out_to_hold_a_secret():
    """``Hello`` went out; the run goes on and decodes (from its first character, as a buffered
    body's would) to 6 bytes and then a key id: the rest of the run is masked, and what went
    out decodes to those 6 bytes only."""
    tail = "AAA" + base64.b64encode(b"AKIAIOSFODNN7EXAMPLE and more").decode()
    s = SSEMasker(MASKERS["secrets"])
    out = drive(s, [message(["Hello", tail, " done."])])
    assert assembled(out) == "Hello[MASKED:aws-access-key-id] done."
    assert whole(MASKERS["secrets"], ("Hello" + tail + " done.").encode()) == b"[MASKED:aws-access-key-id] done."
    assert s.counts == {"aws-access-key-id": 1}


# ---------------------------------------------------------------------------- split anywhere

@pytest.mark.parametrize("name", list(MASKERS))
def test_every_sample_secret_split_at_every_byte_across_two_deltas(name):
    """For each detector's sample secret: two text deltas, cut at every byte of the secret -
    the assembled text is the whole text masked."""
    masker = MASKERS[name]
    for kind, secret in SAMPLES[name]:
        text = "Here it is: " + secret.decode() + " - done."
        expected = whole(masker, text.encode()).decode()
        assert f"[MASKED:{kind}]" in expected
        lo = text.index(secret.decode())
        for at in range(lo, lo + len(secret) + 1):
            out = drive(SSEMasker(masker), [message([text[:at], text[at:]])])
            assert assembled(out) == expected, (kind, at)


def secret_start(masker: Masker, decoded: bytes) -> int:
    """Where the first match that is a finding starts in the decoded bytes (a label included)."""
    return min(c.match_start for c in scan(decoded, masker.rules) if c.finding is not None)


def _check_released(masker: Masker, text: str, run: str, secret_at: int, parts: list[str]) -> None:
    """Assembled equals the whole text masked, or that with a released prefix of the run
    before its token - one that decodes only to bytes before the secret's match (``secret_at``)."""
    expected = whole(masker, text.encode()).decode()
    got = assembled(drive(SSEMasker(masker), [message(parts)]))
    i = expected.index("[MASKED:")
    assert got.startswith(expected[:i])
    j = got.index("[MASKED:", i)
    released = got[i:j]
    assert run.startswith(released), (released, parts)
    assert 6 * len(released) <= 8 * secret_at, (released, secret_at, parts)  # no bit of the secret
    assert got[j:] == expected[i:], parts


PADS = [("secrets", b""), ("secrets", b"Hello"), ("secrets", b"\x89PNG\r\n\x1a\n"), ("secrets", "ünïcode ".encode()),
        ("all", b"Hello"), ("all", b"\xff\xfe\x00\x01")]


@pytest.mark.parametrize("name,pad", PADS)
def test_base64_of_each_sample_split_at_every_byte(name, pad):
    """The base64 of (pad + a detector's sample secret), glued in prose, cut at every byte of
    the run into two deltas, and one character per delta."""
    masker = MASKERS[name]
    for kind, secret in SAMPLES[name]:
        if kind == "private-key":
            secret = secret[:200] + b"\n-----END RSA PRIVATE KEY-----\n"  # every cut of a 2 KiB run: slow
        for encode in (base64.b64encode, base64.urlsafe_b64encode) if pad == b"Hello" else (base64.b64encode,):
            run = encode(pad + secret).decode()
            text = "The file: " + run + " - end"
            if "[MASKED:" not in whole(masker, text.encode()).decode():
                continue  # a sample the base64 view does not find (no upper-case letter ...)
            lo, at_ = text.index(run), secret_start(masker, pad + secret)
            for at in range(lo, lo + len(run) + 1):
                _check_released(masker, text, run, at_, [text[:at], text[at:]])
            _check_released(masker, text, run, at_, list(text))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=24), st.sampled_from([s for _, s in SAMPLES["secrets"] if len(s) < 200]),
       st.sampled_from(["", "Hello", "x ", "\n"]), st.data())
def test_base64_secret_any_split_into_deltas(pad, secret, before, data):
    run = base64.b64encode(pad + secret).decode()
    text = before + run + " ok"
    points = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=10)))
    parts = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    masker = MASKERS["secrets"]
    expected = whole(masker, text.encode()).decode()
    if "[MASKED:" not in expected:
        got = assembled(drive(SSEMasker(masker), [message(parts)]))
        assert got == expected
        return
    _check_released(masker, text, run, secret_start(masker, pad + secret), parts)


def test_openai_chunks_release_the_first_word_too():
    chunk = {"id": "c", "object": "chat.completion.chunk", "model": "m",
             "choices": [{"index": 0, "delta": {"content": "Hello"}, "finish_reason": None}]}
    s = SSEMasker(MASKERS["secrets"])
    out = b"".join(s(b"data: " + json.dumps(chunk).encode() + b"\n\n"))
    assert json.loads(out.split(b"data: ", 1)[1])["choices"][0]["delta"]["content"] == "Hello"
    assert ev  # the helpers of test_sse are shared
