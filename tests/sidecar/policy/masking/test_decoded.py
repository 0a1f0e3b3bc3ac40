"""Decoded views (issue 11): JSON escapes, base64-wrapped secrets and binary printable runs.

Each secret here is one an agent gets back by one obvious decoding step (``json.loads``,
``base64.b64decode``, ``strings``); each test fails on the masker before ``decoded.py``.
"""

from __future__ import annotations

import base64
import json
import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chaperone_sidecar.policy.masking import decoded
from chaperone_sidecar.policy.masking.decoded import canonical_json_strings, mask_base64, mask_binary
from chaperone_sidecar.policy.masking.detectors import ALL, resolve_rules
from chaperone_sidecar.policy.masking.masker import Masker
from chaperone_sidecar.policy.masking.prefilter import JSON_ESCAPE
from chaperone_sidecar.policy.masking.spans import prefilter_for
from chaperone_sidecar.policy.model import MaskSpec

from .samples import ALL_RULES, AWS_KEY_ID, AWS_SECRET

M = Masker([MaskSpec(detectors=("all",))])
KEY = AWS_KEY_ID.decode()
CREDENTIALS = (f"[default]\naws_access_key_id = {KEY}\n"
               f"aws_secret_access_key = {AWS_SECRET.decode()}\n").encode()


def u_escape(text: str) -> str:
    return "".join(f"\\u{ord(c):04x}" for c in text)


# ---------------------------------------------------------------------------- JSON escapes

@pytest.mark.parametrize("literal", [
    "\\u0041" + KEY[1:],  # the example
    u_escape(KEY),  # every character escaped
    KEY[:10] + "\\u" + f"{ord(KEY[10]):04X}" + KEY[11:],  # upper-case hex, in the middle
])
def test_unicode_escaped_key_is_masked_and_json_stays_valid(literal):
    body = ('{"k": "' + literal + '", "note": "caf\\u00e9 \\"q\\" \\n"}').encode()
    assert json.loads(body)["k"] == KEY  # what the agent would get
    r = M.mask_bytes(body, "application/json")
    doc = json.loads(r.body)
    assert doc["k"] == "[MASKED:aws-access-key-id]" and r.counts == {"aws-access-key-id": 1}
    assert doc["note"] == 'café "q" \n'


def test_escaped_key_name_and_escaped_slashes_in_a_secret_key():
    secret = AWS_SECRET.decode().replace("/", "\\/")
    body = ('{"aws_secret_access_key": "' + secret + '", "pass\\u0077ord": "hunter2-x"}').encode()
    r = M.mask_bytes(body, "application/json")
    doc = json.loads(r.body)
    assert doc == {"aws_secret_access_key": "[MASKED:aws-secret-key]", "password": "[MASKED:secret-json-key]"}


def test_escapes_in_ndjson_and_sse_lines():
    body = b'{"a": "\\u0041' + AWS_KEY_ID[1:] + b'"}\n{"b": 1}\n'
    r = M.mask_bytes(body, "application/x-ndjson")
    assert [json.loads(line) for line in r.body.splitlines()] == [
        {"a": "[MASKED:aws-access-key-id]"}, {"b": 1}]
    sse = b'event: x\ndata: {"t": "\\u0041' + AWS_KEY_ID[1:] + b'"}\n\n'
    assert AWS_KEY_ID[1:] not in M.mask_bytes(sse, "text/event-stream").body


def test_escapes_without_a_secret_leave_the_bytes_untouched():
    body = b'{"x": "caf\\u00e9 \\/ \\ud83d\\ude00", "y": "\\ud800"}'
    r = M.mask_bytes(body, "application/json")
    assert r.body is body and not r.changed


def test_canonicalisation_keeps_lone_surrogates_valid_json():
    text = b'{"a": "\\ud800 \\u0041", "b": "\\"\\\\"}'
    out = canonical_json_strings(text)
    assert json.loads(out) == json.loads(text) and out.isascii()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"\\", b"u", b"00", b"0041", b"00e9", b"002F", b"007a", b"/", b"x", b'"', b"\n"]),
                max_size=40))
def test_the_escape_trigger_finds_what_canonicalisation_looks_for(pieces):
    """The one pass's ``JSON_ESCAPE`` gates ``canonical_json_strings`` in ``mask_decoded``: it
    must occur exactly where the canonicalisation's own pattern matches (a miss would leave an
    escaped secret unread)."""
    assert JSON_ESCAPE.pattern == decoded._NONCANONICAL_ESCAPE.pattern
    text = b"".join(pieces)
    hits = prefilter_for(resolve_rules([ALL])).hits(text).positions((JSON_ESCAPE,))
    assert hits == [m.end() for m in decoded._NONCANONICAL_ESCAPE.finditer(text)]  # matches never overlap


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.recursive(st.none() | st.integers() | st.text(max_size=30),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                    max_leaves=8))
def test_canonical_form_means_the_same_document(value):
    for text in (json.dumps(value), json.dumps(value, ensure_ascii=False).replace("/", "\\/")):
        raw = text.encode("utf-8", "surrogatepass")
        try:
            expected = json.loads(raw)
        except ValueError:
            continue
        assert json.loads(canonical_json_strings(raw).decode("utf-8", "surrogatepass")) == expected


# ---------------------------------------------------------------------------- base64

@pytest.mark.parametrize("encode", [
    base64.b64encode,
    base64.urlsafe_b64encode,
    lambda b: base64.b64encode(b).rstrip(b"="),
    lambda b: base64.urlsafe_b64encode(b).rstrip(b"="),
], ids=["standard", "urlsafe", "standard-unpadded", "urlsafe-unpadded"])
def test_base64_of_a_credentials_file_is_masked_whole(encode):
    blob = encode(CREDENTIALS + b"\xfe\xff")  # + binary bytes: urlsafe chars appear in the encoding
    body = json.dumps({"config": blob.decode(), "other": base64.b64encode(b"nothing to see here").decode()}).encode()
    r = M.mask_bytes(body, "application/json")
    doc = json.loads(r.body)
    assert doc["config"] == "[MASKED:aws-access-key-id]"
    assert doc["other"] == base64.b64encode(b"nothing to see here").decode()  # untouched
    assert r.counts == {"aws-access-key-id": 1}


def test_base64_in_yaml_text_headers_and_nested_twice():
    yaml = b"data:\n  creds: " + base64.b64encode(CREDENTIALS) + b"\n  name: YWRtaW4=\n"
    r = M.mask_bytes(yaml, "application/yaml")
    assert base64.b64encode(CREDENTIALS) not in r.body and b"YWRtaW4=" in r.body
    inner = json.dumps({"url": base64.b64encode(b"key=" + AWS_KEY_ID).decode()}).encode()
    outer = json.dumps({"v": base64.b64encode(inner).decode()}).encode()
    assert json.loads(M.mask_bytes(outer, "application/json").body) == {"v": "[MASKED:aws-access-key-id]"}
    assert M.mask_values(["text/plain", "Basic " + base64.b64encode(CREDENTIALS).decode()])[1] == \
        "Basic [MASKED:aws-access-key-id]"


def test_base64_after_an_equals_sign_is_decoded():
    """KEY=<base64> (an env file, a ConfigMap's properties, a query string) was never decoded
    before session 12: the run was refused for the "=" before it. A key followed by "=" and its
    value is still not decoded as a run itself."""
    blob = base64.b64encode(CREDENTIALS).decode()
    env = f"AWS_CREDENTIALS_BLOB={blob}\nREGION=eu-west-1\n".encode()
    masked = M.mask_bytes(env, "text/plain").body
    assert masked == b"AWS_CREDENTIALS_BLOB=[MASKED:aws-access-key-id]\nREGION=eu-west-1\n"
    query = b"GET /cb?state=abc&token=" + base64.urlsafe_b64encode(b"key=" + AWS_KEY_ID) + b"&x=1"
    assert mask_base64(query, ALL_RULES) == b"GET /cb?state=abc&token=[MASKED:aws-access-key-id]&x=1"
    clean = b"SOME_LONG_CONFIG_NAME=" + base64.b64encode(b"nothing secret in here at all") + b"\n"
    assert mask_base64(clean, ALL_RULES) is clean


def test_base64_after_an_escape_and_short_runs():
    body = json.dumps({"pem": "line\n" + base64.b64encode(CREDENTIALS).decode()}).encode()
    assert b"MASKED" in M.mask_bytes(body, "application/json").body
    assert mask_base64(b"abc " + base64.b64encode(AWS_KEY_ID)[:12], ALL_RULES) == \
        b"abc " + base64.b64encode(AWS_KEY_ID)[:12]  # too short to hold a secret


def test_base64_masking_is_idempotent():
    body = json.dumps({"a": base64.b64encode(CREDENTIALS).decode()}).encode()
    once = M.mask_bytes(body, "application/json")
    assert not M.mask_bytes(once.body, "application/json").changed


# ---------------------------------------------------------------------------- binary

def test_binary_printable_runs_are_masked_in_place_length_preserving():
    blob = (b"\x89PNG\r\n\x1a\n\x00\x00" + b"tEXt\x00key=" + AWS_KEY_ID + b"\x00\xff\xfe" * 20
            + b"\x12\x40" + base64.b64encode(CREDENTIALS) + b"\x00\x01")
    r = M.mask_bytes(blob, "image/png")
    assert r.binary and r.changed and len(r.body) == len(blob)
    assert AWS_KEY_ID not in r.body and base64.b64encode(CREDENTIALS) not in r.body
    assert r.body.startswith(b"\x89PNG\r\n\x1a\n\x00\x00tEXt\x00key=[MASKED:aws-access-]\x00")
    assert r.body.endswith(b"*" * 10 + b"\x00\x01") and r.counts == {"aws-access-key-id": 2}


@pytest.mark.parametrize("cut", range(1, 9))
def test_a_slice_inside_a_base64_run_is_decoded_at_every_alignment(cut):
    """A ranged response may start inside a base64 run that began before it (``in_place``:
    ``phases``). Decoded from its first byte only, three cuts in four read noise."""
    blob = base64.b64encode(b"x" * 3000 + b"aws_access_key_id = " + AWS_KEY_ID + b"\n" + b"y" * 3000) + b"\n"
    part = blob[cut:]
    r = M.mask_bytes(part, "application/octet-stream", in_place=True)
    assert r.counts == {"aws-access-key-id": 1} and len(r.body) == len(part)
    assert (mask_binary(part, ALL_RULES) == part) == (cut % 4 != 0)  # what phases=False missed


@pytest.mark.parametrize("cut", range(1, 40, 3))
def test_a_slice_inside_a_wrapped_base64_line_joins_the_next_lines(cut):
    """Wrapped base64 (76 columns) cut inside its first line: the cut line's length is no
    multiple of 4, so it joins the next lines only from ``end % 4`` on - the key's encoding
    crosses the first line break here."""
    blob = base64.encodebytes(b"x" * 40 + b"key " + AWS_KEY_ID + b" " + b"y" * 600)
    assert blob.index(b"\n") == 76
    r = M.mask_bytes(blob[cut:], "application/octet-stream", in_place=True)
    assert r.counts == {"aws-access-key-id": 1}, cut


def test_binary_with_gzip_is_masked_and_re_encoded():
    import gzip

    blob = b"\x00\xff" * 100 + b" " + AWS_KEY_ID + b" " + b"\xfe" * 100
    r = M.mask_bytes(gzip.compress(blob), "application/octet-stream", "gzip")
    plain = gzip.decompress(r.body)
    assert AWS_KEY_ID not in plain and len(plain) == len(blob)


def test_binary_without_secrets_is_returned_as_is():
    blob = bytes(range(256)) * 50
    assert mask_binary(blob, ALL_RULES) is blob
    r = M.mask_bytes(blob, "application/octet-stream")
    assert r.body is blob and r.binary and not r.changed


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_wrapped_base64_is_one_run_in_json_and_text(newline):
    """GitHub's contents API wraps base64 at 60 columns: a key straddling a wrap is found."""
    import textwrap

    encoded = base64.b64encode(b"x" * 50 + CREDENTIALS).decode()  # the key spans bytes 80-100
    lines = textwrap.wrap(encoded, 60)  # 45 bytes a line: the key straddles the second wrap
    assert not any(KEY in base64.b64decode(line).decode("latin-1") for line in lines)
    wrapped = newline.join(lines) + newline
    body = json.dumps({"type": "file", "encoding": "base64", "content": wrapped}).encode()
    assert json.loads(M.mask_bytes(body, "application/json").body)["content"] == \
        "[MASKED:aws-access-key-id]" + newline
    assert M.mask_bytes(wrapped.encode(), "text/plain").body == b"[MASKED:aws-access-key-id]" + newline.encode()


def test_a_run_at_the_end_of_a_line_never_swallows_the_next_line():
    encoded = base64.b64encode(b"id: " + AWS_KEY_ID).decode()  # 32 chars, no padding
    assert len(encoded) % 4 == 0 and not encoded.endswith("=")
    yaml = f"creds: {encoded}\nname: keep-me\n".encode()
    assert M.mask_bytes(yaml, "application/yaml").body == b"creds: [MASKED:aws-access-key-id]\nname: keep-me\n"


def _may_start_a_kept_run(text: bytes, m: re.Match[bytes]) -> bool:
    """What ``_runs`` can keep of a match: one holding an upper-case letter, or the first line
    of wrapped base64 (a length multiple of 4 after the "n" of a "\\n" escape, no padding, a
    line break, CR or backslash after it)."""
    a, b = m.span()
    if re.search(rb"[A-Z]", m.group()):
        return True
    a += a > 0 and text[a - 1:a] == b"\\"
    return (b - a) % 4 == 0 and not m.group().endswith(b"=") and text[b:b + 1] in (b"\n", b"\r", b"\\")


def test_run_search_is_the_regex_search():
    """``decoded._run_matches`` (candidate stretches found in C) gives exactly the matches of
    ``_B64_RUN.finditer`` from any position that ``_runs`` can keep: runs glued to "=", padding
    of 0-3 "=", stretches of 15-17, runs cut by the start position, escapes and line breaks,
    lines of wrapped base64 in lower case."""
    rnd = random.Random(21)
    kept_lower = 0
    for _ in range(5000):
        lower = rnd.random() < 0.5  # no upper-case letter at all: only wrapped lines are kept
        alphabet, letters = (b"a09+/_-=\\n \"\n\r.:", b"a3/") if lower else (b"aZ09+/_-=\\n \"\n\r.:", b"aB3/")
        text = bytes(rnd.choice(alphabet) if rnd.random() < 0.1 else rnd.choice(letters)
                     for _ in range(rnd.randrange(120)))
        text = text.replace(b"=", b"=" * rnd.randrange(1, 4))
        pos = rnd.randrange(len(text) + 1)
        want = [m.span() for m in decoded._B64_RUN.finditer(text, pos) if _may_start_a_kept_run(text, m)]
        kept_lower += sum(1 for a, b in want if not re.search(rb"[A-Z]", text[a:b]))
        assert [m.span() for m in decoded._run_matches(text, pos)] == want, (text, pos)
    assert kept_lower > 50  # the wrapped-line case was drawn, not only the upper-case one


def _wrapped_end_line_by_line(text: bytes, b: int, line: int) -> int:
    """The specification of the wrapped-run join: line by line, while the line so far is of a
    multiple of 4 characters without padding, the next line (raw or escaped break) joins."""
    while line % 4 == 0 and text[b - 1] != 0x3D and (c := decoded._WRAPPED.match(text, b)):
        line, b = c.end() - c.start(1), c.end()
    return b


def test_wrapped_lines_join_as_line_by_line():
    """``_wrapped_end`` (all the full lines in one match, then the last line) ends a wrapped run
    where the line-by-line join does: lines of 3-9 characters, padding, raw and escaped CR/LF,
    quotes, a text ending mid-line."""
    rnd = random.Random(16)
    seps = [b"\n", b"\r\n", b"\\n", b"\\r\\n", b"\r", b" ", b'"']
    joined_lines = 0
    for _ in range(4000):
        parts = [b"QUJD" * rnd.randrange(1, 5)]
        for _ in range(rnd.randrange(0, 6)):
            parts.append(rnd.choice(seps) + b"aB3/"[rnd.randrange(4)::][:1] * rnd.choice([4, 8, 3, 5, 9])
                         + b"=" * rnd.choice([0, 0, 0, 1, 2]))
        text = b"".join(parts) + rnd.choice([b"", b"\n", b'"', b"x"])
        b = len(parts[0])
        want = _wrapped_end_line_by_line(text, b, b)
        assert decoded._wrapped_end(text, 0, b) == want, text
        joined_lines += want > b
    assert joined_lines > 1000
