"""wide_text: UTF-16 and UTF-32 bodies are masked as the text they are (session 13) - they were
binary to the masker (a NUL beside every ASCII character) and every secret in them went out."""

from __future__ import annotations

import pytest

from chaperone_sidecar.policy.masking.decoded import mask_binary
from chaperone_sidecar.policy.masking.encoding import DecodeError
from chaperone_sidecar.policy.masking.masker import Masker
from chaperone_sidecar.policy.masking.wide_text import codec_of
from chaperone_sidecar.policy.model import MaskSpec

from .samples import ALL_RULES, AWS_KEY_ID

M = Masker([MaskSpec(detectors=("all",))])
# What PowerShell 5 writes for `Get-ChildItem Env: > env.txt` (UTF-16LE with a mark), shortened.
TEXT = ("\r\nName                           Value\r\n----                           -----\r\n"
        f"AWS_ACCESS_KEY_ID              {AWS_KEY_ID.decode()}\r\n"
        "OWNER                          alice@example.com\r\n")
ENCODINGS = [("utf-16-le", b"\xff\xfe"), ("utf-16-be", b"\xfe\xff"),
             ("utf-32-le", b"\xff\xfe\x00\x00"), ("utf-32-be", b"\x00\x00\xfe\xff")]


def _expected(codec: str, mark: bytes, text: str = TEXT) -> bytes:
    """The UTF-8 text masked, written back in the body's encoding."""
    return mark + M.mask_bytes(text.encode(), "text/plain").body.decode().encode(codec)


def _streamed(body: bytes, chunk: int, content_type: str = "application/octet-stream") -> bytes:
    s = M.stream(content_type)
    return b"".join(piece for i in range(0, len(body), chunk) for piece in s(body[i : i + chunk])) + b"".join(s(b""))


def test_the_mark_or_the_charset_names_the_encoding():
    assert codec_of(b"\xff\xfe\x00\x00").codec == "utf-32-le"  # before UTF-16LE, whose mark it starts with
    assert codec_of(b"\xff\xfeA\x00").codec == "utf-16-le" and codec_of(b"\xff\xfeA\x00").mark == b"\xff\xfe"
    assert codec_of(b"\xfe\xff\x00A", "text/plain; charset=utf-16le").codec == "utf-16-be"  # the mark wins
    assert codec_of(b"A\x00", 'text/plain; charset="UTF-16LE"').codec == "utf-16-le"
    assert codec_of(b"\x00A", "text/csv;charset=utf-16").codec == "utf-16-be"  # RFC 2781: no mark, big-endian
    assert codec_of(b"A\x00B\x00", "application/octet-stream") is None
    assert codec_of(b"\xef\xbb\xbfA", "text/plain; charset=utf-8") is None


@pytest.mark.parametrize("content_type", ["text/plain; charset=utf-16le", "text/plain; charset=UTF-16",
                                          "application/octet-stream; charset=utf-32be"])
def test_a_charset_the_agent_chose_hides_nothing(content_type):
    """S3 answers with the content type it is asked for (``response-content-type``). Trusting
    ``charset=utf-16le`` alone, an ASCII object was read as UTF-16 - its bytes paired into CJK
    characters - and its keys went out: the bytes as they are are masked first (in place)."""
    body = TEXT.encode()
    r = M.mask_bytes(body, content_type)
    assert r.counts == {"aws-access-key-id": 1, "email": 1} and r.body == mask_binary(body, ALL_RULES)
    if "32" in content_type:  # ASCII read as UTF-32 is out of range: a whole body stays binary, a stream fails
        with pytest.raises(DecodeError):
            _streamed(body, 7, content_type)
    else:
        assert _streamed(body, 7, content_type) == r.body


def test_a_charset_without_a_mark_is_read_too():
    """A server honouring ``Accept-Charset: utf-16le`` writes no mark (Java's UTF-16LE does not):
    with the charset ignored, its body was binary to the masker and its keys went out."""
    body = TEXT.encode("utf-16-le")
    r = M.mask_bytes(body, "text/plain; charset=utf-16le")
    assert r.counts == {"aws-access-key-id": 1, "email": 1} and r.body == _expected("utf-16-le", b"")
    assert _streamed(body, 5, "text/plain; charset=utf-16le") == r.body


def test_both_views_at_once():
    """Mislabelled halves: ASCII with a key, then UTF-16LE text with another - each view finds one."""
    ascii_part = b"ascii key " + AWS_KEY_ID + b" end\n\x00"  # an even length: the UTF-16 after it stays aligned
    wide_part = " wide key AKIAI44QH8DHBEXAMPLE end\r\n".encode("utf-16-le")
    body = b"\xff\xfe" + ascii_part + wide_part
    r = M.mask_bytes(body, "application/octet-stream")
    assert r.counts == {"aws-access-key-id": 2}
    assert AWS_KEY_ID not in r.body and "AKIAI44QH8DHBEXAMPLE".encode("utf-16-le") not in r.body
    assert _streamed(body, 3) == r.body


@pytest.mark.parametrize("codec, mark", ENCODINGS, ids=[c for c, _ in ENCODINGS])
def test_a_marked_body_is_masked_as_text_in_its_own_encoding(codec, mark):
    body = mark + TEXT.encode(codec)
    wide_key = AWS_KEY_ID.decode().encode(codec)
    r = M.mask_bytes(body, "application/octet-stream")
    assert r.counts == {"aws-access-key-id": 1, "email": 1} and not r.binary
    assert wide_key in body and wide_key not in r.body and r.body == _expected(codec, mark)
    assert "[MASKED:aws-access-key-id]" in r.body[len(mark):].decode(codec)


def test_a_clean_body_comes_back_as_it_was():
    body = b"\xff\xfe" + "nothing to see\r\n".encode("utf-16-le")
    assert M.mask_bytes(body, "application/octet-stream").body is body


def test_a_stray_byte_after_the_text_does_not_make_it_binary():
    """An agent appending one byte makes the body invalid UTF-16; masked as binary, the key went
    out. The stray byte is kept, after the masked text."""
    body = b"\xff\xfe" + TEXT.encode("utf-16-le") + b"x"
    r = M.mask_bytes(body, "application/octet-stream")
    assert r.counts == {"aws-access-key-id": 1, "email": 1} and r.body == _expected("utf-16-le", b"\xff\xfe") + b"x"
    assert _streamed(body, 7) == r.body


@pytest.mark.parametrize("codec, mark", ENCODINGS, ids=[c for c, _ in ENCODINGS])
@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 64, 4096])
def test_a_stream_is_masked_as_the_whole_body_however_it_is_cut(codec, mark, chunk):
    body = mark + (TEXT * 3).encode(codec)
    assert _streamed(body, chunk) == M.mask_bytes(body, "application/octet-stream").body == _expected(codec, mark, TEXT * 3)


def test_a_marked_stream_of_a_text_type():
    body = b"\xfe\xff" + TEXT.encode("utf-16-be")
    assert _streamed(body, 5, "text/plain; charset=utf-16") == _expected("utf-16-be", b"\xfe\xff")


def test_a_ranged_part_stays_in_place():
    """A 206 must keep its bytes at their offsets: it is masked as binary (not transcoded), so
    UTF-16 in a ranged part is not masked (docs/masking.md, Not covered)."""
    body = b"\xff\xfe" + TEXT.encode("utf-16-le")
    r = M.mask_bytes(body, "application/octet-stream", in_place=True)
    assert r.body == body and r.binary


def test_utf32_that_does_not_decode():
    """A value over U+10FFFF is no UTF-32: a whole body is masked as what it looks like, a
    stream fails (it cannot be half transcoded)."""
    body = b"\xff\xfe\x00\x00" + "key ".encode("utf-32-le") + b"\x00\x00\x11\x00" + AWS_KEY_ID
    assert M.mask_bytes(body, "application/octet-stream").counts == {"aws-access-key-id": 1}  # as binary
    with pytest.raises(DecodeError, match="utf-32-le"):
        _streamed(body, 64)
