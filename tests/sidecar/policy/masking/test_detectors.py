"""Detectors: table-driven positives/negatives per detector, validators, the SSN FP rate."""

from __future__ import annotations

import json
import re
import random
from pathlib import Path

import pytest
import yaml

from chaperone_sidecar.policy.masking.detectors import (
    DETECTOR_NAMES,
    RULES,
    resolve_rules,
    secret_key_name,
    ssn_valid,
    validate_detectors,
)
from chaperone_sidecar.policy.masking.spans import mask_text

from .samples import AWS_KEY_ID, AWS_SECRET, encrypted_ec_pem, key_material, make_jwt, mask, rsa_pem

REPO = Path(__file__).resolve().parents[4]

JWT = make_jwt()

# (detector, input, fragments that must be gone, fragments that must stay)
POSITIVE = [
    ("aws-access-key-id", AWS_KEY_ID, [AWS_KEY_ID], []),
    ("aws-access-key-id", b'{"AccessKeyId": "ASIAY34FZKBOKMUTVV7A"}', [b"ASIAY34FZKBOKMUTVV7A"], [b"AccessKeyId"]),
    ("aws-access-key-id", b"aws_access_key_id=AKIAI44QH8DHBEXAMPLE\n", [b"AKIAI44QH8DHBEXAMPLE"], [b"aws_access_key_id="]),
    ("aws-access-key-id", b'"line\\nAKIAIOSFODNN7EXAMPLE"', [AWS_KEY_ID], [b"\\n"]),
    ("aws-secret-key", b"aws_secret_access_key = " + AWS_SECRET, [AWS_SECRET], [b"aws_secret_access_key = "]),
    ("aws-secret-key", b'"SecretAccessKey": "je7MtGbClwBF/2Zp9Utk/h3yCo8nvbEXAMPLEKEY"', [b"je7MtGbClwBF"], [b"SecretAccessKey"]),
    ("aws-secret-key", b"<SecretAccessKey>" + AWS_SECRET + b"</SecretAccessKey>", [AWS_SECRET], [b"</SecretAccessKey>"]),
    ("aws-secret-key", b'export AWS_SECRET_ACCESS_KEY="' + AWS_SECRET + b'"', [AWS_SECRET], []),
    ("aws-secret-key", b'{"secretAccessKey":"' + AWS_SECRET + b'"}', [AWS_SECRET], []),
    ("aws-secret-key", b'"{\\"SecretAccessKey\\":\\"' + AWS_SECRET + b'\\"}"', [AWS_SECRET], []),
    ("private-key", rsa_pem(), key_material(rsa_pem()), []),
    ("private-key", rsa_pem("pkcs8"), key_material(rsa_pem("pkcs8")), []),
    ("private-key", rsa_pem("openssh"), key_material(rsa_pem("openssh")), []),
    ("private-key", encrypted_ec_pem(), key_material(encrypted_ec_pem()), []),
    ("private-key", b"before\n" + rsa_pem() + b"after", key_material(rsa_pem()), [b"before\n", b"after"]),
    # Truncated: BEGIN without END still masks the key material that follows.
    ("private-key", rsa_pem()[:900], key_material(rsa_pem()[:900])[:-1], []),
    ("jwt", JWT, [JWT.split(b".")[0], JWT.split(b".")[2]], []),
    ("jwt", b"token=" + make_jwt(indent=2) + b"&x=1", [make_jwt(indent=2)[:20]], [b"token=", b"&x=1"]),
    ("jwt", b'"a\\n' + JWT + b'"', [JWT[:30]], [b"\\n"]),
    ("bearer-token", b"Authorization: Bearer abc123", [b"abc123"], [b"Authorization: Bearer "]),
    ("bearer-token", b'{"authorization": "Bearer ya29.a0AfH6SMBx-3jk"}', [b"ya29.a0AfH6SMBx-3jk"], [b'"}']),
    ("bearer-token", b"proxy-authorization: bearer xyz~+/=", [b"xyz~+/="], []),
    ("bearer-token", b"curl -H 'Authorization: Bearer sk-ant-api03-abc' x", [b"sk-ant-api03-abc"], [b"' x"]),
    ("bearer-token", b"use Bearer 9f8e7d6c5b4a39281706f5e4d3c2b1a0 now", [b"9f8e7d6c5b4a3928"], [b" now"]),
    ("bearer-token", json.dumps({"access_token": "2YotnFZFEjr1zCsicMWpAA", "token_type": "Bearer",
                                 "expires_in": 3600, "refresh_token": "tGzv3JOkF0XG5Qx2TlKWIA"}, indent=2).encode(),
     [b"2YotnFZFEjr1zCsicMWpAA", b"tGzv3JOkF0XG5Qx2TlKWIA"], [b'"expires_in": 3600']),
    ("secret-json-key", b'{"password": "hunter2"}', [b"hunter2"], [b'"password": "']),
    ("secret-json-key", b'{"client_secret":"abc","apiKey":"k1","api_key":"k2","db_passwd":"p"}',
     [b'"abc"', b'"k1"', b'"k2"', b'"p"'], [b"client_secret", b"apiKey"]),
    ("secret-json-key", b'{"private_key": "-----BEGIN X-----\\nabc", "X-Api-Key": "zzz"}', [b"abc", b"zzz"], []),
    ("secret-json-key", b'{"password": "a\\"b\\\\c"}', [b'a\\"b'], []),
    ("email", b"mail alice@example.com now", [b"alice@example.com"], [b"mail ", b" now"]),
    ("email", b"first.last+tag@sub.example.co.uk", [b"first.last"], []),
    ("email", b'"line\\nbob@corp.io"', [b"bob@corp.io"], [b"\\n"]),
    ("credit-card", b"4111 1111 1111 1111", [b"4111"], []),
    ("credit-card", b"4111-1111-1111-1111", [b"4111"], []),
    ("credit-card", b"4111111111111111", [b"4111"], []),
    ("credit-card", b"amex 3782 822463 10005.", [b"3782"], [b"amex ", b"."]),
    ("credit-card", b'{"pan":"5555555555554444"}', [b"5555555555554444"], []),
    ("credit-card", b"6011111111111117", [b"6011111111111117"], []),
    ("credit-card", b"2223003122003222", [b"2223003122003222"], []),
    ("credit-card", b"name,4012888888881881,exp", [b"4012888888881881"], [b"name,", b",exp"]),
    ("credit-card", b"card 4111 1111 1111 1111 12/25", [b"4111"], [b" 12/25"]),  # not one 18-digit number
    ("credit-card", b"Order 12 4111 1111 1111 1111", [b"4111"], [b"Order 12 "]),
    ("credit-card", b"4111 1111 1111 1111 0A", [b"4111"], [b" 0A"]),
    ("credit-card", b"4111 1111 1111 1111 5555 5555 5555 4444", [b"4111", b"5555"], []),
    ("us-ssn", b"SSN: 123-45-6789", [b"123-45-6789"], [b"SSN: "]),
    ("us-ssn", b'{"ssn": "219-09-9998"}', [b"219-09-9998"], [b'{"ssn": "']),
    ("us-ssn", b"social security number 536 22 1234", [b"536 22 1234"], []),
    ("us-ssn", b'{"socialSecurityNumber":"536221234"}', [b"536221234"], []),
    ("us-ssn", b"Taxpayer ID: 536-22-1234", [b"536-22-1234"], []),
    ("us-ssn", b"customerSSN=536-22-1234", [b"536-22-1234"], []),
]

NEGATIVE = [
    ("aws-access-key-id", b"AKIAIOSFODNN7EXAMPL"),  # 19 characters
    ("aws-access-key-id", b"AIDAJQABLZS4A3QDU576"),  # a user id, not a credential
    ("aws-access-key-id", b"akiaiosfodnn7example"),
    ("aws-secret-key", AWS_SECRET),  # no credential label
    ("aws-secret-key", b'"sha1": "da39a3ee5e6b4b0d3255bfef95601890afd80709"'),
    ("aws-secret-key", b"aws_secret_access_key = tooShort"),
    ("aws-secret-key", b"aws_secret_access_key = " + AWS_SECRET + b"X"),  # 41 characters
    ("private-key", b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"),
    ("private-key", b"-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----"),
    ("private-key", b"the words PRIVATE KEY in prose"),
    ("jwt", b"eyJub3QiOiJhIGp3dCJ9.eyJzdWIiOiIxIn0.c2ln"),  # header without "alg"
    ("jwt", b"eyJhbGciOiJIUzI1NiJ9"),  # one segment
    ("jwt", b"version 1.2.3 www.example.com"),
    ("jwt", b"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0"),  # two segments
    ("bearer-token", b"Bearer authentication is a scheme"),
    ("bearer-token", b"the bearer of this letter"),
    ("bearer-token", b'{"access_token": "abcdef123456", "token_type": "mac"}'),
    ("bearer-token", b"Authorization: Basic dXNlcjpwYXNz"),
    ("secret-json-key", b'{"NextToken": "abc", "nextPageToken": "def", "token_type": "Bearer"}'),
    ("secret-json-key", b'{"max_tokens": 1024, "input_tokens": 5, "SecretId": "prod/db"}'),
    ("secret-json-key", b'{"passwordLastUsed": "2024-01-01", "monkey": "banana", "keyName": "k"}'),
    ("secret-json-key", b'{"password": ""}'),
    ("email", b"logo@2x.png"),
    ("email", b"git@github.com:org/repo.git"),
    ("email", b"user@localhost"),
    ("email", b"@example.com"),
    ("email", b"a@b.c"),
    ("credit-card", b"4111 1111 1111 1112"),  # Luhn fails
    ("credit-card", b"4111 1111-1111 1111"),  # mixed separators
    ("credit-card", b"1700000000000"),  # epoch milliseconds
    ("credit-card", b"3.4111111111111111"),  # a decimal
    ("credit-card", b"41111111111111111111"),  # 20 digits
    ("credit-card", b"9111111111111111"),  # no card network starts with 9 (and Luhn-valid)
    ("credit-card", b"x4111111111111111"),  # glued to a word
    ("credit-card", b"4111 11 11 1111 1111"),  # not a card grouping
    ("us-ssn", b"SSN: 000-12-3456"),
    ("us-ssn", b"SSN: 666-12-3456"),
    ("us-ssn", b"SSN: 912-34-5678"),
    ("us-ssn", b"SSN: 123-00-4567"),
    ("us-ssn", b"SSN: 123-45-0000"),
    ("us-ssn", b"order 123-45-6789 shipped"),  # no SSN label
    ("us-ssn", b"SSN: 123-45-67890"),
    ("us-ssn", b"SSN: 123-45-6789-1"),
    ("us-ssn", b"classnames 123-45-6789"),  # "ssn" inside a word is no label
    ("us-ssn", b"SSN" + b" " * 40 + b"123-45-6789"),  # label too far away
]


@pytest.mark.parametrize(("name", "text", "gone", "kept"), POSITIVE, ids=[f"{p[0]}-{i}" for i, p in enumerate(POSITIVE)])
def test_positive(name, text, gone, kept):
    out = mask(text, name)
    assert f"[MASKED:{name}".encode() in out
    for fragment in gone:
        assert fragment not in out, out
    for fragment in kept:
        assert fragment in out, out


@pytest.mark.parametrize(("name", "text"), NEGATIVE, ids=[f"{n[0]}-{i}" for i, n in enumerate(NEGATIVE)])
def test_negative(name, text):
    assert mask(text, name) == text


def test_secret_json_key_keeps_json_valid():
    body = json.dumps({"password": 'a"b\\c\n\u00e9', "user": {"api_key": "x" * 5000}}).encode()
    out = mask(body, "secret-json-key")
    doc = json.loads(out)
    assert doc["password"] == "[MASKED:secret-json-key]"
    # One match covers 4096 characters; the token it leaves is glued to the rest of the value,
    # so the next round masks the remainder too.
    assert doc["user"]["api_key"] == "[MASKED:secret-json-key]"


def test_pem_inside_json_keeps_json_valid():
    body = json.dumps({"data": {"tls.key": rsa_pem().decode(), "tls.crt": "-----BEGIN CERTIFICATE-----\nMIIB"}}).encode()
    doc = json.loads(mask(body, "private-key"))
    assert doc["data"]["tls.key"] == "[MASKED:private-key]\n"
    assert doc["data"]["tls.crt"].startswith("-----BEGIN CERTIFICATE-----")


def test_unterminated_pem_masks_to_end_of_key_material():
    pem = rsa_pem()
    body = b'{"k": "' + pem.replace(b"\n", b"\\n")[:1200] + b'", "next": 1}'
    out = mask(body, "private-key")
    assert json.loads(out) == {"k": "[MASKED:private-key]", "next": 1}


def test_every_detector_has_cases_and_matches_the_crd():
    assert set(DETECTOR_NAMES) == {p[0] for p in POSITIVE} == {n[0] for n in NEGATIVE}
    crd = yaml.safe_load((REPO / "crds" / "accesspolicies.chaperone.dev.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    enum = schema["properties"]["spec"]["properties"]["masking"]["properties"]["detectors"]["items"]["enum"]
    assert set(enum) == set(DETECTOR_NAMES) | {"all"}


def test_validate_detectors():
    assert validate_detectors(["jwt", "all", "email"]) == []
    errors = validate_detectors(["jwt", "ssn", "Email"])
    assert len(errors) == 2 and "unknown detector 'ssn'" in errors[0] and "us-ssn" in errors[0]


def test_resolve_rules():
    assert {r.name for r in resolve_rules(["all"])} == set(DETECTOR_NAMES)
    assert {r.name for r in resolve_rules(["jwt", "nope"])} == {"jwt"}
    assert resolve_rules([]) == ()


def _max_width(items, groups: dict | None = None) -> float:
    """Longest string a parsed regex can match (inf when unbounded)."""
    from re import _constants as c

    groups = {} if groups is None else groups
    total = 0.0
    for op, av in items:
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
            lo, hi, sub = av
            total += float("inf") if hi == c.MAXREPEAT else hi * _max_width(sub, groups)
        elif op is c.SUBPATTERN:
            width = _max_width(av[-1], groups)
            groups[av[0]] = width
            total += width
        elif op is c.BRANCH:
            total += max(_max_width(b, groups) for b in av[1])
        elif op is c.GROUPREF:
            total += groups[av]
        elif op in (c.ASSERT, c.ASSERT_NOT, c.AT):
            pass  # zero width
        else:
            total += 1
    return total


def test_rules_are_bounded():
    """stream.py sizes its window from max_len: every pattern's longest match must fit in it
    (the unterminated-PEM run is the one open-ended part, handled by continuation mode)."""
    from re import _parser

    for rules in RULES.values():
        for rule in rules:
            parsed = _parser.parse(rule.pattern.pattern, rule.pattern.flags)
            items = list(parsed)
            if rule.continuation is not None:  # BEGIN marker, then (closed block | open run)
                op, (_, (closed, run)) = items[-1]
                assert _max_width(run) == float("inf")  # continuation mode handles this one
                items = items[:-1] + list(closed)
            width = _max_width(items)
            if rule.runs:  # a run of digit groups is open-ended; each card window is bounded
                assert width == float("inf")
                continue
            assert width <= rule.max_len, (rule.name, width, rule.max_len)
            assert rule.max_len <= 12 * 1024


@pytest.mark.parametrize(("key", "secret"), [
    ("password", True), ("db_password", True), ("Passwd", True), ("client_secret", True),
    ("apiKey", True), ("x-api-key", True), ("access_token", True), ("refreshToken", True),
    ("private_key", True), ("SecretString", True), ("aws_secret_access_key", True),
    ("NextToken", False), ("nextPageToken", False), ("token_type", False), ("max_tokens", False),
    ("SecretId", False), ("secretName", False), ("monkey", False), ("passwordLastUsed", False),
])
def test_secret_key_name(key, secret):
    assert secret_key_name(key) is secret


@pytest.mark.parametrize(("ssn", "valid"), [
    ((1, 1, 1), True), ((665, 99, 9999), True), ((667, 1, 1), True), ((899, 1, 1), True),
    ((0, 1, 1), False), ((666, 1, 1), False), ((900, 1, 1), False), ((999, 1, 1), False),
    ((123, 0, 1), False), ((123, 45, 0), False),
])
def test_ssn_validation(ssn, valid):
    assert ssn_valid(*ssn) is valid


SSN_SAMPLE = 100_000
SSN_FP_BOUND = 0.001  # documented: < 0.1% of unlabelled random 9-digit numbers are flagged


def _numbers(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10**9) for _ in range(SSN_SAMPLE)]


def _flagged(lines: list[bytes]) -> float:
    counts: dict[str, int] = {}
    mask_text(b"\n".join(lines), resolve_rules(["us-ssn"]), counts=counts)
    return counts.get("us-ssn", 0) / len(lines)


def _dashed(n: int) -> bytes:
    s = f"{n:09d}"
    return f"{s[:3]}-{s[3:5]}-{s[5:]}".encode()


@pytest.mark.parametrize("fmt", ["dashed", "bare"])
def test_ssn_false_positive_rate_without_label(fmt):
    """100k seeded random 9-digit numbers in ordinary text and JSON: (almost) none flagged."""
    numbers = _numbers(20240501)
    render = _dashed if fmt == "dashed" else (lambda n: f"{n:09d}".encode())
    lines = []
    for i, n in enumerate(numbers):
        value = render(n)
        lines.append(b'{"id": "' + value + b'"}' if i % 2 else b"order " + value + b" shipped")
    assert _flagged(lines) < SSN_FP_BOUND


@pytest.mark.parametrize("fmt", ["dashed", "bare"])
def test_ssn_with_label_flags_exactly_the_valid_ones(fmt):
    numbers = _numbers(7)
    render = _dashed if fmt == "dashed" else (lambda n: f"{n:09d}".encode())
    rate = _flagged([b"SSN: " + render(n) for n in numbers])
    valid = sum(ssn_valid(n // 10**6, n // 10**4 % 100, n % 10**4) for n in numbers) / len(numbers)
    assert rate == pytest.approx(valid, abs=1e-9)
    assert 0.85 < rate < 0.90  # 898/1000 * 99/100 * 9999/10000 of random numbers pass the SSA rules


# A long run glued before (or after) a secret must not hide it: an agent that knows the
# secret's shape cuts it out of the run (issue 11, "long run swallows the real match").
_JWT = make_jwt()
GLUED = [
    ("credit-card", b"0" * 30 + b" 4111 1111 1111 1111", [b"4111 1111 1111 1111"]),
    ("credit-card", b"0" * 300 + b" 4111 1111 1111 1111 9", [b"4111 1111 1111 1111"]),
    ("credit-card", b"1234 " * 40 + b"4111 1111 1111 1111", [b"4111 1111 1111 1111"]),
    ("credit-card", b"12-" * 40 + b"5555-5555-5555-4444", [b"5555-5555-5555-4444"]),
    ("credit-card", b"1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 4111 1111 1111 1111", [b"4111 1111 1111 1111"]),
    ("aws-access-key-id", b"AAAA" + AWS_KEY_ID, [AWS_KEY_ID]),
    ("aws-access-key-id", b"XAKIAIOSFODNN7EXAMPLE", [AWS_KEY_ID]),
    ("aws-access-key-id", AWS_KEY_ID + b"1", [AWS_KEY_ID]),
    ("aws-access-key-id", b"AKIA" + AWS_KEY_ID, [AWS_KEY_ID[4:]]),  # a decoy "AKIA" first
    ("jwt", b"AAAA" + _JWT, [_JWT.split(b".")[0], _JWT.split(b".")[2]]),
    ("jwt", b"eyAAAAAAAAAAAAAA" + _JWT, [_JWT.split(b".")[0], _JWT.split(b".")[2]]),
    ("jwt", b"ey" + b"A" * 2000 + _JWT, [_JWT.split(b".")[0], _JWT.split(b".")[2]]),
    ("email", b"x" * 70 + b"alice@example.com", [b"alice@example.com"]),
    ("email", b"alice@example.com" + b"x" * 30, [b"alice@example.c"]),
    ("email", b"\\\\bob@corp.io", [b"bob@corp.io"]),
]


@pytest.mark.parametrize(("name", "text", "gone"), GLUED, ids=[f"{g[0]}-{i}" for i, g in enumerate(GLUED)])
def test_a_glued_prefix_does_not_hide_a_secret(name, text, gone):
    out = mask(text, name)
    assert f"[MASKED:{name}".encode() in out
    for fragment in gone:
        assert fragment not in out, out


def _luhn_card(length: int, rnd: random.Random) -> bytes:
    """A Visa-prefixed number of ``length`` digits that passes Luhn."""
    body = [4] + [rnd.randrange(10) for _ in range(length - 2)]
    total = 0
    for i, d in enumerate(reversed(body)):  # the check digit will sit right of these
        total += (d * 2 - 9 if d * 2 > 9 else d * 2) if i % 2 == 0 else d
    return "".join(map(str, body + [(-total) % 10])).encode()


def _layouts(digits: bytes) -> list[list[int]]:
    """Every grouping the card finder accepts for ``digits``: one group, 4-4-...-x (x 1-4),
    and Amex / Diners 4-6-5 / 4-6-4."""
    n = len(digits)
    out = [[n]]
    fours = (n - 1) // 4
    if 1 <= n - 4 * fours <= 4 and fours >= 3:
        out.append([4] * fours + [n - 4 * fours])
    if n in (14, 15):
        out.append([4, 6, n - 10])
    return out


@pytest.mark.parametrize("sep", [b" ", b"-"])
def test_every_card_layout_is_found_inside_any_stretch_of_digit_groups(sep):
    """The card trigger (a layout's head, on to the end of its stretch of digits and
    separators) fires for every layout the finder accepts, wherever the card sits in the
    stretch: a trigger that missed one would let that card through unmasked."""
    rnd = random.Random(16)
    for length in range(13, 20):
        digits = _luhn_card(length, rnd)
        for layout in _layouts(digits):
            groups, at = [], 0
            for size in layout:
                groups.append(digits[at:at + size])
                at += size
            card = sep.join(groups)
            for before, after in ((b"card ", b"."), (b"ref 12 7 ", b" 9 x"), (b"x 1-2 ", b"")):
                text = before + card + after
                masked = mask(text, "credit-card")
                assert card not in masked and b"[MASKED:credit-card" in masked, (layout, text)


def test_the_domain_check_before_an_address_turns_away_only_what_no_address_matches(monkeypatch):
    """``_email_find`` skips an "@" whose next bytes cannot begin a domain (``_DOMAIN_HEAD``:
    a label, a dot, a letter or digit) before its costlier matches. Around "@" in text built of
    the bytes an address is made of, and of what ends one, the finder finds exactly what it
    finds without that check - labels up to the 63 bytes they may have, and one byte longer."""
    from chaperone_sidecar.policy.masking import detectors

    rnd = random.Random(16)
    local = [b"a", b"b.c", b"9", b"%", b"+", b"-", b"\\n", b" ", b'"', b"x" * 64]
    texts = [b"a@" + b"x" * n + b".io" for n in (61, 62, 63, 64)]
    texts += [b"a@" + b"x" * 62 + b"-.io", b"a@-x.io", b"a@x..io", b"a@x.-io", b"a@x.", b"a@.x.io", b"a@x.1"]
    pieces = [b"a", b"b0", b"7", b"-", b".", b".", b"io", b"com", b"x" * 62, b"\\n", b" ", b"@", b"%"]
    for _ in range(3000):
        if rnd.random() < 0.3:
            domain = b"".join(rnd.choice(pieces) for _ in range(rnd.randrange(0, 7)))
        else:  # labels (up to one byte longer than a label may be), a top-level domain, what follows
            labels = [rnd.choice([b"a", b"b0", b"7", b"-a", b"a-", b"x" * 62, b"x" * 63, b"x" * 64, b""])
                      for _ in range(rnd.randrange(1, 4))]
            domain = (b".".join(labels) + b"." + rnd.choice([b"io", b"com", b"c", b"7z", b""])
                      + rnd.choice([b"", b" ", b"-", b"x", b"\\n", b"@b.io"]))
        texts.append(b"".join(rnd.choice(local) for _ in range(rnd.randrange(1, 5))) + b"@" + domain)

    def found(text: bytes) -> list[tuple[int, int]]:
        ats = [i for i in range(len(text)) if text[i] == ord("@")]
        return [m.span() for m in detectors._email_find(text, 0, ats)]

    checked = [found(t) for t in texts]
    monkeypatch.setattr(detectors, "_DOMAIN_HEAD", re.compile(b""))  # matches everywhere: no check
    assert [found(t) for t in texts] == checked
    assert sum(1 for spans in checked if spans) > 500  # addresses were found, not only refused
