"""aws-chunked decoding: every framing botocore and the AWS CLI produce, in any split."""

from __future__ import annotations

import io

import pytest
from botocore.httpchecksum import AwsChunkedWrapper, Crc32Checksum
from mitmproxy import http

from chaperone_sidecar.credentials.aws_chunked import (
    AwsChunkedDecoder,
    decode_aws_chunked,
    is_aws_chunked,
    unwrap_request,
)
from chaperone_sidecar.credentials.credential_sources import InjectionError

PAYLOAD = bytes(range(256)) * 9 + b"tail"


def botocore_encoded(payload: bytes, chunk_size: int = 1000) -> bytes:
    """Exactly what botocore sends for STREAMING-UNSIGNED-PAYLOAD-TRAILER."""
    wrapper = AwsChunkedWrapper(io.BytesIO(payload), checksum_cls=Crc32Checksum,
                                checksum_name="x-amz-checksum-crc32", chunk_size=chunk_size)
    return wrapper.read()


def signed_encoded(payload: bytes, chunk: int = 700) -> bytes:
    out = b""
    for i in range(0, len(payload), chunk):
        part = payload[i:i + chunk]
        out += b"%x;chunk-signature=%s\r\n%s\r\n" % (len(part), b"e" * 64, part)
    return out + b"0;chunk-signature=" + b"e" * 64 + b"\r\n\r\n"


def test_botocore_trailer_encoding():
    wire = botocore_encoded(PAYLOAD)
    payload, trailers = decode_aws_chunked(wire)
    assert payload == PAYLOAD
    crc = Crc32Checksum()
    crc.update(PAYLOAD)
    assert trailers == [("x-amz-checksum-crc32", crc.b64digest())]


def test_signed_chunks_and_empty_body():
    assert decode_aws_chunked(signed_encoded(PAYLOAD)) == (PAYLOAD, [])
    assert decode_aws_chunked(b"0\r\n\r\n") == (b"", [])
    assert decode_aws_chunked(botocore_encoded(b"")) [0] == b""


@pytest.mark.parametrize("encode", [botocore_encoded, signed_encoded])
def test_any_split_decodes_the_same(encode):
    wire = encode(PAYLOAD)
    for step in (1, 2, 3, 7, 64, 999, 1001, len(wire)):
        decoder = AwsChunkedDecoder()
        out = b"".join(decoder(wire[i:i + step]) for i in range(0, len(wire), step))
        assert decoder(b"") == b"" and out == PAYLOAD and decoder.done
        assert decoder.decoded_length == len(PAYLOAD)


def test_trailer_signature_is_dropped():
    wire = (b"4;chunk-signature=aa\r\ndata\r\n0;chunk-signature=bb\r\n"
            b"x-amz-checksum-crc32c:AAAAAA==\r\nx-amz-trailer-signature:cc\r\n\r\n")
    assert decode_aws_chunked(wire) == (b"data", [("x-amz-checksum-crc32c", "AAAAAA==")])


@pytest.mark.parametrize("wire, message", [
    (b"zz\r\nabc\r\n0\r\n\r\n", "size line"),
    (b"3\r\nabcX\r\n0\r\n\r\n", "CRLF"),
    (b"3\r\nabc\r\n", "truncated"),
    (b"10\r\nabc", "truncated"),
    (b"0\r\nno-colon-here\r\n\r\n", "trailer"),
    (b"0\r\n\r\nextra", "after the final chunk"),
    (b"1" * 9000, "too long"),
])
def test_malformed_bodies_are_refused(wire, message):
    with pytest.raises(InjectionError, match=message):
        decode_aws_chunked(wire)


def _request(wire: bytes | None, **extra) -> http.Request:
    req = http.Request.make("PUT", "https://b.s3.amazonaws.com/k")
    req.headers = http.Headers(**{
        "content_encoding": "gzip,aws-chunked", "transfer_encoding": "chunked",
        "x_amz_content_sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
        "x_amz_trailer": "x-amz-checksum-crc32", "x_amz_sdk_checksum_algorithm": "CRC32",
        "x_amz_decoded_content_length": str(len(PAYLOAD)), **extra})
    req.raw_content = wire
    return req


def test_unwrap_buffered_request():
    req = _request(botocore_encoded(PAYLOAD))
    assert is_aws_chunked(req)
    assert unwrap_request(req) is None
    assert req.raw_content == PAYLOAD
    assert req.headers["content-length"] == str(len(PAYLOAD))
    assert req.headers["content-encoding"] == "gzip"  # other encodings are kept
    for gone in ("transfer-encoding", "x-amz-trailer", "x-amz-decoded-content-length"):
        assert gone not in req.headers
    assert req.headers["x-amz-checksum-crc32"]  # the trailer became a header
    assert req.headers["x-amz-sdk-checksum-algorithm"] == "CRC32"
    assert not is_aws_chunked(_request(b"", x_amz_content_sha256="UNSIGNED-PAYLOAD",
                                       content_encoding="gzip"))


def test_unwrap_streamed_request():
    req = _request(None)
    decoder = unwrap_request(req)
    assert isinstance(decoder, AwsChunkedDecoder)
    assert req.headers["content-length"] == str(len(PAYLOAD))
    assert "x-amz-sdk-checksum-algorithm" not in req.headers  # its trailer cannot follow
    with pytest.raises(InjectionError, match="x-amz-decoded-content-length"):
        unwrap_request(_request(None, x_amz_decoded_content_length="abc"))
    req = _request(None)
    del req.headers["x-amz-decoded-content-length"]
    with pytest.raises(InjectionError, match="without x-amz-decoded-content-length"):
        unwrap_request(req)


def test_declared_length_must_match():
    with pytest.raises(InjectionError, match="decodes to"):
        unwrap_request(_request(botocore_encoded(PAYLOAD),
                                x_amz_decoded_content_length=str(len(PAYLOAD) + 1)))
