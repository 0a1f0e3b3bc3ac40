"""Streaming masker: secrets split across chunks, latency, over-long PEM blocks, mitmproxy's
stream-callable contract, encodings and sniffing."""

from __future__ import annotations

import gzip
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chaperone_sidecar.policy.masking import BodyTooLarge, Masker, StreamMasker, mask_text, resolve_rules
from chaperone_sidecar.policy.masking.stream import WINDOW, required_window
from chaperone_sidecar.policy.model import MaskSpec

from .samples import ALL_RULES, AWS_KEY_ID, key_material, planted, rsa_pem

PLANTED = planted()
MASKER = Masker([MaskSpec(detectors=("all",))])


def run(stream: StreamMasker, chunks) -> bytes:
    """Drive the callable exactly as mitmproxy 11's state_stream_response_body does."""
    sent: list[bytes] = []
    for data in chunks:
        out = stream(data)
        sent.extend([out] if isinstance(out, bytes) else out)
    end = stream(b"")
    end = [] if end == b"" else ([end] if isinstance(end, bytes) else end)
    sent.extend(end)
    # An empty chunk would be framed as "0\r\n\r\n" and end a chunked HTTP/1 body early.
    assert all(sent), "the stream callable produced an empty chunk"
    return b"".join(sent)


def split(body: bytes, cuts) -> list[bytes]:
    points = sorted({min(max(c, 0), len(body)) for c in cuts})
    return [body[a:b] for a, b in zip([0, *points], [*points, len(body)])]


def batch(body: bytes) -> bytes:
    return mask_text(body, ALL_RULES)


@pytest.mark.parametrize(("kind", "secret", "fragments"), PLANTED, ids=[f"{p[0]}-{i}" for i, p in enumerate(PLANTED)])
def test_one_byte_chunks(kind, secret, fragments):
    body = b"head\n" + secret + b" tail"
    out = run(MASKER.stream("text/plain"), [body[i : i + 1] for i in range(len(body))])
    assert out == batch(body)
    assert f"[MASKED:{kind}".encode() in out
    assert not any(f in out for f in fragments)


FILLER = st.binary(max_size=80) | st.text(max_size=80).map(lambda t: t.encode("utf-8", "surrogatepass"))
SEPARATORS = st.sampled_from([b" ", b"\n", b"\t", b"\r\n", b'"', b", "])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_planted_secret_never_survives_any_chunking(data):
    picks = data.draw(st.lists(st.sampled_from(PLANTED), min_size=1, max_size=3))
    parts = [data.draw(FILLER)]
    for _, secret, _ in picks:
        sep = data.draw(SEPARATORS)
        parts += [sep, secret, sep, data.draw(FILLER)]
    body = b"".join(parts)
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=40))
    out = run(MASKER.stream("text/plain"), split(body, cuts))
    for _, _, fragments in picks:
        assert not any(f in out for f in fragments)
    assert out == batch(body)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=30))
def test_arbitrary_bytes_stream_like_the_whole_body(body, cuts):
    assert run(MASKER.stream("text/plain"), split(body, cuts)) == batch(body)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.dictionaries(st.sampled_from(["id", "pan", "ssn", "note", "password"]),
                                st.integers(0, 10**19) | st.sampled_from(["4111 1111 1111 1111", "SSN: 536-22-1234", "x"]),
                                max_size=5), max_size=5), st.lists(st.integers(0, 3000), max_size=20))
def test_json_lines_stay_json(events, cuts):
    """SSE carrying JSON: numbers replaced by tokens are quoted, every event still parses."""
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    out = run(MASKER.stream("text/event-stream"), split(body, cuts))
    assert out == mask_text(body, ALL_RULES, json_strings=True)
    for line in out.split(b"\n"):
        if line:
            json.loads(line[len(b"data: "):])


def test_card_number_as_json_number_is_quoted():
    body = b'{"pan": 4111111111111111, "note": "card 4111111111111111"}'
    out = run(MASKER.stream("application/json"), [body[:20], body[20:]])
    assert json.loads(out) == {"pan": "[MASKED:credit-card]", "note": "card [MASKED:credit-card]"}


def test_sse_lines_flow_without_delay():
    s = MASKER.stream("text/event-stream")
    assert s(b"data: hello\n\n") == [b"data: hello\n\n"]
    # Only a tail that may still grow into a secret is held: a trailing word could be the
    # local part of an address, "AKIAIOSF" the start of a key id.
    assert s(b"data: partial") == [b"data: "]
    assert s(b" line AKIAIOSF") == [b"partial line "]
    assert s(b"ODNN7EXAMPLE\n\n") == [b"[MASKED:aws-access-key-id]\n\n"]
    assert s.held == 0 and s(b"") == []


def test_prose_flows_word_by_word():
    """No line feed for kilobytes (an LLM's paragraph): only the last word is held, not the
    line (the masker used to hold up to 32 KiB of a line without a line feed)."""
    s = MASKER.stream("text/plain")
    out = b""
    for word in [b"The ", b"quick ", b"brown ", b"fox ", b"jumps. "] * 200:
        got = b"".join(s(word))
        assert s.held <= len(word)
        out += got
    assert out + b"".join(s(b"")) == b"The quick brown fox jumps. " * 200


@pytest.mark.parametrize("tail", [b"sec", b"secret_key", b"secret_key = wJalr", b"jo@exa", b"eyJhbGciOiJIUzI1NiJ9",
                                  b"4111 1111", b"-----BEGIN RSA PRIV", b"Authorization: Bearer abc"])
def test_a_possible_secret_prefix_is_held(tail):
    s = MASKER.stream("text/plain")
    out = b"".join(s(b"some prose, then " + tail))
    assert out == b"some prose, then "[: len(out)] and len(out) >= len(b"some prose, ") - 1
    assert not out.endswith(tail[:2])


def test_long_line_is_emitted_behind_the_window():
    s = MASKER.stream("application/octet-stream")
    out = b""
    for _ in range(200):
        out += b"".join(s(b"a" * 1024))
        assert s.held < 2 * WINDOW + 1024  # memory stays bounded
    assert len(out) >= 200 * 1024 - 2 * WINDOW
    assert out + b"".join(s(b"")) == b"a" * 200 * 1024


def test_oauth_context_after_a_line_break_is_waited_for():
    body = json.dumps({"access_token": "2YotnFZFEjr1zCsicMWpAA", "scope": "x", "token_type": "Bearer"}, indent=2).encode()
    out = run(Masker([MaskSpec(detectors=("bearer-token",))]).stream("application/json"), [body[:40], body[40:]])
    assert b"2YotnFZFEjr1zCsicMWpAA" not in out and b"[MASKED:bearer-token]" in out


def test_pem_longer_than_the_window():
    """BEGIN without END within 8 KiB: masked from BEGIN and dropped until the key material
    ends; the END line passes. Held data stays bounded however long the block is."""
    material = b"\n".join([b"QUJD" * 16] * 2000)  # 130 KiB of base64 lines
    body = b"before\n-----BEGIN RSA PRIVATE KEY-----\n" + material + b"\n-----END RSA PRIVATE KEY-----\nafter\n"
    s = MASKER.stream("text/plain")
    out = b""
    for i in range(0, len(body), 1000):
        out += b"".join(s(body[i : i + 1000]))
        assert s.held <= required_window(ALL_RULES)
    out += b"".join(s(b""))
    assert out == b"before\n[MASKED:private-key]-----END RSA PRIVATE KEY-----\nafter\n" == batch(body)
    assert s.counts == {"private-key": 1}


def test_pem_split_everywhere():
    pem = rsa_pem()
    body = b'{"key": ' + json.dumps(pem.decode()).encode() + b"}\n" + pem
    for size in (1, 7, 64, 4096):
        out = run(MASKER.stream("text/plain"), [body[i : i + size] for i in range(0, len(body), size)])
        assert out == batch(body)
        assert not any(line in out for line in key_material(pem))


def test_empty_data_frame_mid_stream_flushes_but_keeps_masking():
    s = MASKER.stream("text/plain")
    first = s(b"key AKIAIOSFODNN7EXAMPLE and more")
    flushed = s(b"")  # an HTTP/2 DATA frame without payload looks like the end
    later = s(b" then ASIAY34FZKBOKMUTVV7A\n")
    assert b"".join(first + flushed + later + s(b"")) == (
        b"key [MASKED:aws-access-key-id] and more then [MASKED:aws-access-key-id]\n")


def test_gzip_stream_is_decoded_and_masked():
    body = b"line one\nkey " + AWS_KEY_ID + b"\n" * 100
    encoded = gzip.compress(body)
    s = MASKER.stream("text/plain", "gzip")
    out = run(s, [encoded[i : i + 10] for i in range(0, len(encoded), 10)])
    assert out == batch(body) and s.errors == []


def test_truncated_gzip_stream_is_noted_not_raised():
    encoded = gzip.compress(b"hello " + AWS_KEY_ID + b"\n")
    s = MASKER.stream("text/plain", "gzip")
    assert run(s, [encoded[:-8]]) == b"hello [MASKED:aws-access-key-id]\n"
    assert s.errors and "truncated" in s.errors[0]


def test_gzip_bomb_in_a_stream_is_refused():
    bomb = gzip.compress(bytes(64 * 1024 * 1024), 9)
    s = MASKER.stream("text/plain", "gzip", max_decoded_bytes=1024 * 1024)
    with pytest.raises(BodyTooLarge):
        for i in range(0, len(bomb), 4096):
            s(bomb[i : i + 4096])


def test_binary_is_sniffed_and_passed_through():
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4 + AWS_KEY_ID
    s = MASKER.stream("image/png")
    assert run(s, [png[:100], png[100:]]) == png and s.binary
    text = b"AWS_ACCESS_KEY_ID=" + AWS_KEY_ID + b"\n"
    s = MASKER.stream("application/octet-stream")
    assert run(s, [text]) == b"AWS_ACCESS_KEY_ID=[MASKED:aws-access-key-id]\n" and s.binary is False


def test_no_rules_pass_through_and_window_check():
    s = Masker([]).stream("text/plain")
    assert s(b"AKIAIOSFODNN7EXAMPLE") == [b"AKIAIOSFODNN7EXAMPLE"]
    with pytest.raises(ValueError, match="window"):
        StreamMasker(resolve_rules(["all"]), window=1024)


def test_usable_as_mitmproxy_stream_attribute():
    from mitmproxy.test import tflow

    flow = tflow.tflow(resp=True)
    flow.response.stream = MASKER.stream("text/plain")
    assert callable(flow.response.stream)
    assert run(flow.response.stream, [b"x " + AWS_KEY_ID, b"\n"]) == b"x [MASKED:aws-access-key-id]\n"


def test_keyed_stream_tokens_match_batch():
    keyed = Masker([MaskSpec(detectors=("all",))], hash_key=b"k")
    body = b"a " + AWS_KEY_ID + b"\n"
    assert run(keyed.stream("text/plain"), [body[:5], body[5:]]) == keyed.mask_bytes(body, "text/plain").body
