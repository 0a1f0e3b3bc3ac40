"""Differential test (issue 16): the one-pass engine masks exactly like the engine before it.

The oracle is ``reference/`` (the detectors, scanning, decoded views and stream masker as they
were before the Hyperscan prefilter). Generated corpora - text with planted secrets of every
detector, at the start and the end, glued to token characters, JSON-escaped (``\\u0041``
too), base64-encoded (plain, URL-safe, wrapped, nested), inside binary noise, next to long
digit runs, decoys and unicode - are masked by both, whole (text pipeline, binary, headers)
and streamed in random chunks; the outputs and counts must be identical.

``test_corpus_exercises_every_rule`` is the check on the check: with any one rule's trigger
replaced by one that never occurs (the rule silently dropped from the prefilter), the
comparison must find a difference on this corpus.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import random
import re

import pytest

from chaperone_sidecar.policy.masking import decoded, detectors, spans, stream
from chaperone_sidecar.policy.masking.prefilter import Trigger

from .reference import decoded as ref_decoded
from .reference import detectors as ref_detectors
from .reference import spans as ref_spans
from .reference import stream as ref_stream
from .samples import AWS_KEY_ID, AWS_SECRET, BEARER, make_jwt, planted, rsa_pem

NEW_RULES = detectors.resolve_rules(["all"])
OLD_RULES = ref_detectors.resolve_rules(["all"])

_WORDS = [b"the", b"key", b"token", b"secret", b"pass", b"Bearer", b"auth", b"tin", b"tax", b"SSN",
          b"social", b"caf\xc3\xa9", b"\xf0\x9f\x94\x91", b"ey", b"eyJ", b"AKIA", b"ASIA", b"@", b"-----BEGIN",
          b"12", b"4111", b"2024-01-05", b"0", b"x", b"Zm9v", b"\\n", b"\\u0041", b"\\/", b'"', b":",
          b"=", b"{", b"}", b",", b"\n", b" ", b"  ", b"\t", b"-", b".", b"/", b"[MASKED:x]"]


def _secrets() -> list[bytes]:
    jwt = make_jwt()
    pem = rsa_pem()
    out = [s for _, s, _ in planted()]
    out += [
        b"ASIA" + AWS_KEY_ID[4:], b"AAAA" + AWS_KEY_ID + b"ZZ", b"AKIAdecoy" + AWS_KEY_ID,
        b"SecretAccessKey=" + AWS_SECRET, b'"secretAccessKey":"' + AWS_SECRET + b'"',
        b"AAAA" + jwt, b"eyXXXXXXXX" + jwt, jwt + b"alice@example.com", jwt.replace(b"eyJ", b"ewo", 1),
        b"authorization: Bearer " + BEARER, b"Bearer " + BEARER, b"bearer short",
        b"Authorization: Bearer onlythelabelmakesthisatoken",
        b'{"access_token":"2YotnFZFEjr1zCsicMWpAA","token_type":"Bearer"}',
        b'{"id_token": "abc.def-ghi_123"} "token_type": "bearer"',
        b'{"password":"hunter2"}', b'{"nextToken":"abc"}', b'{"api_key": "k-123"}', b'{"pass\\u0077ord":"x1"}',
        b"x" * 70 + b"alice@example.com", b"alice@example.comxx" + b"y" * 20, b"git@github.com", b"logo@2x.png",
        b"\\nbob.smith@mail.example.org",
        b"0" * 30 + b" 4111 1111 1111 1111", b"4111 1111 1111 1111 12", b"378282246310005", b"3782 822463 10005",
        b"4111111111111111", b"41111111111111112", b"5555-5555-5555-4444x", b"1234 5678 9012 3456 7890 1234",
        b"ssn 123-45-6789", b"Social Security: 536 22 1234", b'{"ssn": "536221234", "id": "536221235"}',
        b"taxpayer id 536-22-1234", b"SSN: 666-22-1234", b"tin: 536221234",
        pem, pem[: len(pem) // 2], json.dumps({"k": pem.decode()}).encode(),
        b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
    ]
    return out


SECRETS = _secrets()


def _encode(rnd: random.Random, secret: bytes) -> bytes:
    how = rnd.randrange(8)
    if how == 0:
        return json.dumps(secret.decode("utf-8", "replace")).encode()
    if how == 1:  # every upper-case letter escaped, as a hostile JSON string would
        inner = "".join(f"\\u{ord(c):04x}" if c.isupper() else c for c in secret.decode("latin-1"))
        return b'"' + inner.encode("latin-1") + b'"'
    if how == 2:
        return base64.b64encode(b"prefix " + secret)
    if how == 3:
        return base64.urlsafe_b64encode(secret).rstrip(b"=")
    if how == 4:  # wrapped (GitHub contents API: 60 columns, JSON-escaped line feeds)
        b64 = base64.b64encode(secret * 3)
        return b"\\n".join(b64[i:i + 60] for i in range(0, len(b64), 60))
    if how == 5:  # nested: base64 of JSON holding base64
        inner = base64.b64encode(b'{"key": "' + secret + b'"}')
        return base64.b64encode(b'{"data": "' + inner + b'"}')
    return secret


def document(seed: int, size: int = 1500) -> bytes:
    rnd = random.Random(seed)
    parts: list[bytes] = []
    if rnd.random() < 0.3:
        parts.append(_encode(rnd, rnd.choice(SECRETS)))  # at the very start
    while sum(map(len, parts)) < size:
        r = rnd.random()
        if r < 0.15:
            parts.append(_encode(rnd, rnd.choice(SECRETS)))
        elif r < 0.2:
            parts.append(bytes((rnd.choice(b"0123456789"),)) * rnd.randrange(5, 60))
        elif r < 0.25:
            parts.append(b" ".join(str(rnd.randrange(10**4)).zfill(4).encode() for _ in range(rnd.randrange(2, 8))))
        else:
            parts.append(rnd.choice(_WORDS))
            if rnd.random() < 0.7:
                parts.append(b" ")
    if rnd.random() < 0.3:
        parts.append(_encode(rnd, rnd.choice(SECRETS)))  # at the very end
    return b"".join(parts)


CORPUS = [document(seed) for seed in range(160)]


def _both(doc: bytes, js: bool, key: bytes | None = None, new_rules=NEW_RULES, old_rules=OLD_RULES):
    new_counts: dict[str, int] = {}
    old_counts: dict[str, int] = {}
    new = decoded.mask_decoded(doc, new_rules, key, new_counts, json_strings=js)
    old = ref_decoded.mask_decoded(doc, old_rules, key, old_counts, json_strings=js)
    return (new, new_counts), (old, old_counts)


def _stream(mod, rules, doc: bytes, cuts: list[int], js: bool) -> bytes:
    masker = mod.StreamMasker(rules, json_mode=js)
    points = [0, *sorted(set(cuts)), len(doc)]
    out = [masker.feed(doc[a:b]) for a, b in zip(points, points[1:], strict=False) if b > a]
    out.append(masker.finish())
    return b"".join(out)


@pytest.mark.parametrize("js", [False, True], ids=["text", "json"])
def test_whole_bodies_mask_identically(js):
    masked = 0
    for i, doc in enumerate(CORPUS):
        key = b"k" if i % 5 == 0 else None
        new, old = _both(doc, js, key)
        assert new == old, f"document {i}"
        masked += new[0] != doc
    assert masked > len(CORPUS) * 0.8  # the corpus is not vacuous


def test_every_detector_fires_on_the_corpus():
    counts: dict[str, int] = {}
    for doc in CORPUS:
        decoded.mask_decoded(doc, NEW_RULES, None, counts, json_strings=True)
    assert set(counts) == set(detectors.DETECTOR_NAMES)


def test_single_detectors_mask_identically():
    for name in detectors.DETECTOR_NAMES:
        new_rules, old_rules = detectors.resolve_rules([name]), ref_detectors.resolve_rules([name])
        for i, doc in enumerate(CORPUS[:60]):
            new, old = _both(doc, True, None, new_rules, old_rules)
            assert new == old, f"{name}, document {i}"


def test_binary_and_plain_scans_mask_identically():
    rnd = random.Random(7)
    for i, doc in enumerate(CORPUS[:80]):
        noisy = b"".join(rnd.randbytes(rnd.randrange(0, 40)) + piece for piece in doc.split(b" "))
        new_counts: dict[str, int] = {}
        old_counts: dict[str, int] = {}
        assert decoded.mask_binary(noisy, NEW_RULES, None, new_counts) == \
            ref_decoded.mask_binary(noisy, OLD_RULES, None, old_counts), f"document {i}"
        assert new_counts == old_counts
        assert spans.mask_text(doc, NEW_RULES) == ref_spans.mask_text(doc, OLD_RULES)
        assert decoded.mask_base64(doc, NEW_RULES) == ref_decoded.mask_base64(doc, OLD_RULES)


@pytest.mark.parametrize("js", [False, True], ids=["text", "json"])
def test_streams_mask_identically_in_any_chunks(js):
    rnd = random.Random(11 + js)
    for i, doc in enumerate(CORPUS[:100]):
        cuts = [rnd.randrange(len(doc) + 1) for _ in range(rnd.choice((1, 3, 10, 40)))]
        new = _stream(stream, NEW_RULES, doc, cuts, js)
        old = _stream(ref_stream, OLD_RULES, doc, cuts, js)
        assert new == old, f"document {i}, cuts {sorted(set(cuts))}"


def test_long_hostile_runs_mask_identically():
    """Digit runs, base64 blobs and trigger floods far longer than any window."""
    card = b"4111 1111 1111 1111"
    docs = [
        b"1" * 200_000 + b" " + card,
        b"1 " * 50_000 + card,
        b"SSN " * 20_000 + b"536-22-1234",
        b"ey" * 30_000 + make_jwt(),
        b"@" * 50_000 + b"alice@example.com",
        base64.b64encode(random.Random(3).randbytes(120_000) + AWS_KEY_ID + b" tail"),
        b"AKIA" * 20_000 + AWS_KEY_ID,
    ]
    for doc in docs:
        new, old = _both(doc, True)
        assert new == old
        assert new[1], "a secret was planted at the end"


_B64_HEAD_OR_TAIL = re.compile(rb"[A-Z][A-Za-z0-9+/_-]{15}|[A-Za-z0-9+/_-]{15}[A-Z]")


def _short_runs(n: int, seed: int = 17) -> list[bytes]:
    """Base64 runs of 16-30 characters of a small secret whose upper-case letters all sit in
    the middle: no 16-character window starts or ends with one (``ePRUIGFAYmMuaW8g``)."""
    rnd = random.Random(seed)
    secrets = [b"a@bc.io", b"ssn 536-22-1234", b"password=hunter22", AWS_KEY_ID]
    out: list[bytes] = []
    while len(out) < n:
        raw = rnd.randbytes(rnd.randrange(4)) + b" " + rnd.choice(secrets) + b" " + rnd.randbytes(rnd.randrange(4))
        run = base64.b64encode(raw).rstrip(b"=")
        if len(run) < decoded.B64_MIN or not re.search(rb"[A-Z]", run) or _B64_HEAD_OR_TAIL.search(run) \
                or re.search(rb"[+/]", run):
            continue
        if ref_decoded.mask_decoded(run, OLD_RULES) != run:  # the reference finds the secret
            out.append(run)
    return out


def test_short_base64_runs_with_inner_upper_case_mask_identically():
    """A base64 run of 16-30 characters whose upper-case letters are all in its middle is
    decoded like any other (session 5: the engine looked only for windows that start or end
    with an upper-case letter and let these through unmasked)."""
    runs = _short_runs(12)
    docs = [b"x " + r + b" y" for r in runs] + [b'{"v": "' + r + b'"}' for r in runs]
    docs.append(b"lower case prose " * 50 + b" ".join(runs))
    for doc in docs:
        new, old = _both(doc, True)
        assert new == old, doc
        assert new[1], f"{doc!r}: the planted secret is masked"


def test_corpus_exercises_every_rule():
    """Dropping any one rule from the prefilter (a trigger that never occurs) is caught."""
    never = (Trigger(rb"\x00never\x00", 7),)
    for k, rule in enumerate(NEW_RULES):
        crippled = NEW_RULES[:k] + (dataclasses.replace(rule, triggers=never),) + NEW_RULES[k + 1:]
        assert any(_both(doc, True, None, crippled)[0] != _both(doc, True)[1] for doc in CORPUS), \
            f"rule {k} ({rule.name}) could be dropped unnoticed"


def test_string_state_matches_the_reference():
    """``ends_in_string`` (one C-level match per call) against the reference's scan of every
    string, on random mixes of quotes, escapes, backslashes and line feeds."""
    rnd = random.Random(13)
    alphabet = [b'"', b"\\", b"\\\\", b'\\"', b"\n", b"a", b" ", b"\\u0041", b":", b"x\"y"]
    for _ in range(4000):
        text = b"".join(rnd.choice(alphabet) for _ in range(rnd.randrange(0, 24)))
        for in_string in (False, True):
            assert spans.ends_in_string(text, in_string) == ref_spans.ends_in_string(text, in_string), \
                (text, in_string)


@pytest.mark.parametrize("js", [False, True], ids=["text", "json"])
def test_secret_key_words_arriving_late_are_held(js):
    """The stream holds a key only while a key word can still make it a secret's: a word far
    from its quote (a 96-character key), split at every byte, masks like the reference."""
    doc = b'{"note": "x", "' + b"x" * 88 + b'password": "hunter2", "' + b"y" * 90 + b'": "z"}\n'
    whole = ref_decoded.mask_decoded(doc, OLD_RULES, json_strings=js)
    assert b"hunter2" not in whole
    for cut in range(1, len(doc)):
        assert _stream(stream, NEW_RULES, doc, [cut], js) == _stream(ref_stream, OLD_RULES, doc, [cut], js), cut


def test_prefilter_keeps_no_large_body_alive():
    """The per-thread cache of the last scan holds small texts only (a 64 MiB body must not
    stay in memory until the thread's next scan)."""
    import sys

    from chaperone_sidecar.policy.masking.prefilter import CACHE_MAX

    pre = spans.prefilter_for(NEW_RULES)
    small, large = b"x" * 100 + b"AKIA", b"x" * (CACHE_MAX + 1)
    before = sys.getrefcount(small)
    assert pre.hits(small) is pre.hits(small)  # cached: the cache holds a reference
    assert sys.getrefcount(small) == before + 1
    before = sys.getrefcount(large)
    pre.hits(large)
    assert sys.getrefcount(large) == before  # not held


def _group_runs(seed: int, n: int = 3000) -> bytes:
    """Digit groups of card-like sizes (4, 6, 5, 1-3, 13-19) with spaces, dashes and mixes,
    Luhn-valid cards among them: every window shape of the card finder, at random."""
    rnd = random.Random(seed)
    parts: list[bytes] = []
    for _ in range(n):
        r = rnd.random()
        if r < 0.05:
            parts.append(rnd.choice((b"4111 1111 1111 1111", b"3782 822463 10005", b"5555-5555-5555-4444",
                                     b"4111111111111111", b"378282246310005")))
        else:
            size = rnd.choice((4, 4, 4, 4, 6, 5, 1, 2, 3, 13, 16, 19, 20))
            parts.append(bytes(rnd.choice(b"0123456789") for _ in range(size)))
        parts.append(rnd.choice((b" ", b" ", b"-", b"  ", b"x", b" ", b"-")))
    return b"".join(parts)


HOSTILE = {  # 32 KiB each here (the timing test below masks 1 MiB of the slow ones)
    name: (unit * (32768 // len(unit) + 1))[:32768] for name, unit in {
        "1 ": b"1 ", "1-": b"1-", "1 2-": b"1 2-", "4111 ": b"4111 ", "4111-": b"4111-", "12 ": b"12 ",
        "4111 1111 ": b"4111 1111 ", "4111 1 1 1": b"4111 1 1 1 ", "4-6": b"4111-111111-", "1a": b"1a",
        "ssn+groups": b"ssn" + b"1 " * 20, "SSN ": b"SSN ", "a@b.c": b"a@b.c", "eyJ": b"eyJ",
        "-----BEGIN ": b"-----BEGIN ", "AKIA": b"AKIA", "\\u0041": b"\\u0041", '"password":"': b'"password":"',
    }.items()
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_floods_mask_identically(name):
    """Trigger floods and digit-group runs (the finders' worst cases) mask like the reference,
    whole and streamed."""
    doc = HOSTILE[name] + b" 4111 1111 1111 1111 ssn 536-22-1234"
    new, old = _both(doc, True)
    assert new == old
    cuts = list(range(4093, len(doc), 4093))
    assert _stream(stream, NEW_RULES, doc, cuts, True) == _stream(ref_stream, OLD_RULES, doc, cuts, True)


def test_random_digit_group_runs_mask_identically():
    for seed in range(12):
        doc = _group_runs(seed)
        new, old = _both(doc, seed % 2 == 0)
        assert new == old, f"seed {seed}"
        assert new[1].get("credit-card"), "cards were planted"
        assert spans.mask_text(doc, NEW_RULES) == ref_spans.mask_text(doc, OLD_RULES)
