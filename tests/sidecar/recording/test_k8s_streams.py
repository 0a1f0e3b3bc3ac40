"""The exec/attach/port-forward wire protocols (recording/k8s_streams.py): the channel protocol
and SPDY/3.1 as kubectl, the apiserver and the kubelet write them - and what an agent could
send instead (cut frames, zlib bombs, other versions, garbage base64)."""

from __future__ import annotations

import struct
import zlib

import pytest

from chaperone_sidecar.recording import k8s_streams as ks


def deflater():
    return zlib.compressobj(9, zlib.DEFLATED, 15, 9, zdict=ks.SPDY_DICTIONARY)


def syn_stream(deflate, stream_id: int, headers: dict[str, str]) -> bytes:
    block = deflate.compress(ks.header_block(headers)) + deflate.flush(zlib.Z_SYNC_FLUSH)
    body = struct.pack(">IIBB", stream_id, 0, 0, 0) + block
    return struct.pack(">HHI", 0x8003, 1, len(body)) + body


@pytest.mark.parametrize("name,expected", [
    ("v5.channel.k8s.io", (5, False, False)),
    ("v4.channel.k8s.io", (4, False, False)),
    ("channel.k8s.io", (1, False, False)),
    ("v4.base64.channel.k8s.io", (4, True, False)),
    ("SPDY/3.1+portforward.k8s.io", (3, False, True)),
])
def test_subprotocols(name, expected):
    protocol = ks.channel_protocol(name)
    assert protocol is not None
    assert (protocol.version, protocol.base64, protocol.spdy) == expected


def test_an_unknown_subprotocol_is_none():
    assert ks.channel_protocol("v6.channel.k8s.io") is None
    assert ks.channel_protocol("") is None


def test_channel_messages_round_trip_binary_and_base64():
    binary = ks.channel_protocol("v5.channel.k8s.io")
    b64 = ks.channel_protocol("v4.base64.channel.k8s.io")
    assert binary is not None and b64 is not None
    for protocol in (binary, b64):
        content = ks.channel_content(protocol, 1, b"\x00bytes\xff")
        assert ks.parse_channel_message(protocol, content) == ks.ChannelMessage(1, b"\x00bytes\xff")
    assert ks.channel_content(b64, 2, b"hi") == b"2aGk="
    assert ks.parse_channel_message(binary, b"") is None
    with pytest.raises(ks.StreamError):
        ks.parse_channel_message(b64, b"1not base64!")
    with pytest.raises(ks.StreamError):
        ks.parse_channel_message(b64, b"xaGk=")


def test_frames_cut_anywhere_come_out_whole():
    deflate = deflater()
    wire = (syn_stream(deflate, 1, {"streamtype": "error", "port": "8080", "requestid": "0"})
            + syn_stream(deflate, 3, {"streamtype": "data", "port": "8080", "requestid": "0"})
            + ks.data_frames(3, b"GET / HTTP/1.1\r\n\r\n", ks.FLAG_FIN))
    reader = ks.SpdyReader()
    frames = []
    for i in range(len(wire)):  # one byte at a time
        frames += reader.feed(wire[i:i + 1])
    assert reader.pending == 0
    assert [(f.kind, f.stream_id, f.headers.get("streamtype")) for f in frames] == [
        ("SYN_STREAM", 1, "error"), ("SYN_STREAM", 3, "data"), ("DATA", 3, None)]
    assert frames[2].data == b"GET / HTTP/1.1\r\n\r\n" and frames[2].fin


def test_a_repeated_header_is_seen_whole():
    """An agent naming two ports in one stream: both are judged (the kubelet reads one)."""
    plain = struct.pack(">I", 2)
    for name, value in (("port", "8080"), ("port", "22")):
        plain += struct.pack(">I", len(name)) + name.encode() + struct.pack(">I", len(value)) + value.encode()
    assert ks.parse_header_block(plain) == {"port": "8080,22"}
    assert ks.parse_header_block(ks.header_block({"port": "80\x0022"})) == {"port": "80,22"}


def test_the_writer_keeps_the_peers_decompressor_in_step():
    """Re-encoded header frames and the proxy's own SYN_REPLY, read by a fresh reader (the
    peer's zlib context), in order."""
    agent = deflater()
    seen = ks.SpdyReader()
    frames = seen.feed(syn_stream(agent, 1, {"streamtype": "error", "port": "22"})
                       + syn_stream(agent, 3, {"streamtype": "data", "port": "8080"}))
    writer = ks.SpdyWriter()
    wire = writer.reencode(frames[1]) + writer.syn_reply(1, {}) + writer.reencode(frames[0])
    peer = ks.SpdyReader().feed(wire)
    assert [(f.kind, f.stream_id, f.headers) for f in peer] == [
        ("SYN_STREAM", 3, {"streamtype": "data", "port": "8080"}), ("SYN_REPLY", 1, {}),
        ("SYN_STREAM", 1, {"streamtype": "error", "port": "22"})]
    data = ks.data_frames(5, b"x", 0)
    assert writer.reencode(ks.SpdyReader().feed(data)[0]) == data  # data frames pass as they are


def test_data_frames_split_at_the_length_limit():
    payload = b"a" * (ks.MAX_FRAME + 10)
    frames = ks.SpdyReader().feed(ks.data_frames(7, payload, ks.FLAG_FIN))
    assert [len(f.data) for f in frames] == [ks.MAX_FRAME, 10]
    assert [f.fin for f in frames] == [False, True]
    assert ks.SpdyReader().feed(ks.data_frames(7, b"", ks.FLAG_FIN))[0].fin


def test_what_cannot_be_parsed_is_an_error():
    with pytest.raises(ks.StreamError, match="version 2"):
        ks.SpdyReader().feed(struct.pack(">HHI", 0x8002, 1, 10) + b"\0" * 10)
    with pytest.raises(ks.StreamError, match="inflate"):
        ks.SpdyReader().feed(struct.pack(">HHI", 0x8003, 2, 8) + struct.pack(">I", 1) + b"junk")
    # A header block that inflates past 1 MiB (a zlib bomb from the agent) is refused.
    deflate = deflater()
    huge = ks.header_block({"x": "a" * (ks.MAX_HEADER_BLOCK + 1)})
    block = deflate.compress(huge) + deflate.flush(zlib.Z_SYNC_FLUSH)
    assert len(block) < 10_000
    body = struct.pack(">I", 1) + block
    with pytest.raises(ks.StreamError, match="beyond"):
        ks.SpdyReader().feed(struct.pack(">HHI", 0x8003, 2, len(body)) + body)
    with pytest.raises(ks.StreamError, match="header pairs"):
        ks.parse_header_block(struct.pack(">I", 5000))
    with pytest.raises(ks.StreamError, match="malformed"):
        ks.parse_header_block(struct.pack(">II", 1, 50) + b"short")
