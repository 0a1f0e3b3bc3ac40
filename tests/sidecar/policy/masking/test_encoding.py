"""Content-Encoding: round trips, corrupt/truncated input, and decompression bombs refused."""

from __future__ import annotations

import gzip
import time
import tracemalloc
import zlib

import brotli
import pytest

from chaperone_sidecar.policy.masking.encoding import (
    BodyTooLarge,
    DecodeError,
    StreamDecoder,
    UnsupportedEncoding,
    decode,
    encode,
    parse_content_encoding,
)

MiB = 1024 * 1024
GiB = 1024 * MiB
TEXT = b'{"message": "hello world", "n": 12345}\n' * 2000


def _gzip_zeros(total: int, member: int = 64 * MiB) -> bytes:
    """``total`` bytes of zeros as a multi-member gzip: one member compressed incrementally,
    then repeated (a valid gzip stream; 10 GiB of zeros is ~10 MB this way)."""
    obj = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = bytes(MiB)
    one = b"".join(obj.compress(chunk) for _ in range(member // MiB)) + obj.flush()
    return one * (total // member)


def _br_zeros(total: int, quality: int = 1) -> bytes:
    obj = brotli.Compressor(quality=quality)
    chunk = bytes(MiB)
    return b"".join(obj.process(chunk) for _ in range(total // MiB)) + obj.finish()


def _deflate_zeros(total: int, raw: bool = False) -> bytes:
    obj = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS if raw else zlib.MAX_WBITS)
    chunk = bytes(MiB)
    return b"".join(obj.compress(chunk) for _ in range(total // MiB)) + obj.flush()


@pytest.mark.parametrize(("header", "codings"), [
    (None, ()), ("", ()), ("identity", ()), ("gzip", ("gzip",)), ("x-gzip", ("gzip",)),
    ("GZIP", ("gzip",)), ("deflate, br", ("deflate", "br")), (" br ,identity", ("br",)),
])
def test_parse_content_encoding(header, codings):
    assert parse_content_encoding(header) == codings


@pytest.mark.parametrize("header", ["zstd", "gzip, compress", "chunked"])
def test_unsupported_encoding(header):
    with pytest.raises(UnsupportedEncoding, match="unsupported content-encoding"):
        parse_content_encoding(header)
    with pytest.raises(UnsupportedEncoding):
        encode(b"x", ["zstd"])


@pytest.mark.parametrize("codings", [("gzip",), ("deflate",), ("br",), ("gzip", "br"), ("br", "deflate", "gzip"), ()])
def test_round_trip(codings):
    encoded = encode(TEXT, codings)
    if codings:
        assert encoded != TEXT and len(encoded) < len(TEXT)
    assert decode(encoded, codings, 10 * MiB) == TEXT


def test_foreign_encoders_decode():
    assert decode(gzip.compress(TEXT), ["gzip"], MiB) == TEXT
    assert decode(zlib.compress(TEXT), ["deflate"], MiB) == TEXT  # zlib-wrapped (RFC 9110)
    raw = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    assert decode(raw.compress(TEXT) + raw.flush(), ["deflate"], MiB) == TEXT  # raw deflate
    assert decode(brotli.compress(TEXT), ["br"], MiB) == TEXT


def test_multi_member_gzip_and_trailing_garbage():
    body = gzip.compress(b"one ") + gzip.compress(b"two")
    assert decode(body, ["gzip"], MiB) == b"one two"
    assert decode(body + b"\x00\x00garbage", ["gzip"], MiB) == b"one two"
    with pytest.raises(DecodeError):  # brotli has no members: trailing bytes are an error
        decode(brotli.compress(b"x") + b"junk", ["br"], MiB)


def test_empty_body_with_encoding():
    assert decode(b"", ["gzip"], MiB) == b""
    assert decode(b"", ["br"], MiB) == b""


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br"])
def test_truncated_and_corrupt(coding):
    encoded = encode(TEXT, [coding])
    with pytest.raises(DecodeError, match="truncated"):
        decode(encoded[: len(encoded) // 2], [coding], 10 * MiB)
    with pytest.raises(DecodeError):
        decode(b"\x1f\x8b\x08\x00 this is not compressed data at all", [coding], 10 * MiB)


def test_identity_over_limit():
    with pytest.raises(BodyTooLarge) as exc:
        decode(b"x" * 2000, [], 1024)
    assert exc.value.limit == 1024
    assert decode(b"x" * 1024, [], 1024) == b"x" * 1024


def test_cap_is_exact():
    body = encode(b"a" * 5000, ["gzip"])
    assert decode(body, ["gzip"], 5000) == b"a" * 5000
    with pytest.raises(BodyTooLarge):
        decode(body, ["gzip"], 4999)


def _refused_within_bounds(body: bytes, codings: tuple[str, ...], cap: int = 8 * MiB) -> None:
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(BodyTooLarge, match="decompressed body exceeds"):
            decode(body, codings, cap)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.monotonic() - started
    # Refused after about `cap` bytes: bounded memory (cap + one step + slack) and time.
    assert peak < cap + 24 * MiB, f"peak {peak / MiB:.1f} MiB"
    assert elapsed < 5, f"{elapsed:.1f}s"


def test_gzip_bomb_10_gib_refused():
    bomb = _gzip_zeros(10 * GiB)
    assert len(bomb) < 16 * MiB  # ~1000:1 per member
    _refused_within_bounds(bomb, ("gzip",))


@pytest.mark.parametrize(("size", "quality"), [(GiB, 1), (GiB, 5)])
def test_brotli_bomb_refused(size, quality):
    bomb = _br_zeros(size, quality)
    assert len(bomb) < MiB
    _refused_within_bounds(bomb, ("br",))


@pytest.mark.parametrize("raw", [False, True])
def test_deflate_bomb_refused(raw):
    _refused_within_bounds(_deflate_zeros(256 * MiB, raw), ("deflate",))


def test_nested_bomb_refused():
    """A gzip bomb wrapped in brotli ("gzip, br") is capped at every stage."""
    inner = _gzip_zeros(GiB)
    _refused_within_bounds(brotli.compress(inner, quality=1), ("gzip", "br"))


def test_stream_decoder_incremental_with_cap():
    encoded = encode(TEXT, ["gzip"])
    dec = StreamDecoder(["gzip"], max_bytes=len(TEXT))
    out = b"".join(dec.feed(encoded[i : i + 7]) for i in range(0, len(encoded), 7)) + dec.finish()
    assert out == TEXT and dec.total == len(TEXT)
    dec = StreamDecoder(["br"], max_bytes=len(TEXT) - 1)
    with pytest.raises(BodyTooLarge):
        for i in range(0, len(encoded), 100):
            dec.feed(encode(TEXT, ["br"])[i : i + 100])
        dec.finish()


def test_stream_decoder_without_cap_and_truncation():
    dec = StreamDecoder(["deflate"])
    encoded = encode(TEXT, ["deflate"])
    assert dec.feed(encoded[:-4]) and dec.max_bytes is None
    with pytest.raises(DecodeError, match="truncated"):
        dec.finish()
