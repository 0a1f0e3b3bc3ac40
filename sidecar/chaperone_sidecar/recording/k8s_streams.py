"""The wire protocols of ``kubectl exec``/``attach``/``port-forward`` streams, parsed.

Pure parsing, no proxy in it: the KubeStreams addon (``addons/sessions.py``) feeds it the
messages of an upgraded exec/attach/portforward connection and gets back which stream each
payload belongs to, so it can mask output and record the session (docs/exec-sessions.md).

**Channel protocol** (WebSocket; the apiserver's ``wsstream``, kubectl >= 1.30 for exec and
attach). The subprotocol the server chose (``Sec-WebSocket-Protocol`` of the 101) names the
version: ``v5.channel.k8s.io`` .. ``channel.k8s.io`` carry binary messages whose first byte is
the channel - 0 stdin, 1 stdout, 2 stderr, 3 error (a ``metav1.Status`` JSON with the exit
code), 4 resize (JSON), and in v5 255 *close* (its payload: the channel being closed). The
``base64.channel.k8s.io`` variants carry text messages: an ASCII digit, then base64. A
port-forward over the channel protocol (``portforward.k8s.io``, ``v4.channel.k8s.io`` with
``?ports=``) has two channels per port, data ``2i`` and error ``2i+1``; the first message on
each starts with the port, two bytes little-endian.

**SPDY/3.1** (kubectl's fallback; ``SPDY/3.1+portforward.k8s.io`` tunnels it inside WebSocket
binary messages, which is how kubectl >= 1.31 port-forwards). Frames: control frames
(``SYN_STREAM`` opens a stream; its header block names it: ``streamtype`` stdin, stdout,
stderr, error, resize - or data/error plus ``port`` for a port-forward) and data frames
(stream id, flags, 24-bit length, payload). Header blocks are zlib-compressed with the SPDY/3
dictionary, one compression context per direction for the whole connection, so every header
block of a direction is inflated in order even when only some are needed. A data frame may be
rewritten with a new payload (masking changes its length); header frames are passed on
byte for byte, so the peers' compression contexts stay in step. moby/spdystream, which both
kubectl and the kubelet use, implements no SPDY flow control (it ignores ``WINDOW_UPDATE``),
so a changed data length upsets no window. Frames arrive cut anywhere: :class:`SpdyReader`
buffers up to one frame and returns complete ones.

Bounds, because the agent writes half of this: a frame is at most 2**24 - 1 bytes (the
format's own limit), an inflated header block at most ``MAX_HEADER_BLOCK`` (1 MiB, the
kubelet's own ``defaultMaxHeaderFieldSize``); anything malformed raises :class:`StreamError`
and the addon closes the connection (what cannot be parsed cannot be masked).
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

__all__ = ["StreamError", "ChannelProtocol", "channel_protocol", "ChannelMessage",
           "parse_channel_message", "channel_content", "SpdyFrame", "SpdyReader", "SpdyWriter",
           "header_block", "parse_header_block", "data_frames", "exit_status", "EXEC_CHANNELS",
           "CLOSE_CHANNEL", "SPDY_TUNNEL", "SYN_STREAM", "FLAG_FIN"]

EXEC_CHANNELS = {0: "stdin", 1: "stdout", 2: "stderr", 3: "error", 4: "resize"}
CLOSE_CHANNEL = 255  # v5: "the client is done writing to channel N"
SPDY_TUNNEL = "SPDY/3.1+portforward.k8s.io"
_CHANNEL_VERSIONS = {"v5.channel.k8s.io": 5, "v4.channel.k8s.io": 4, "v3.channel.k8s.io": 3,
                     "v2.channel.k8s.io": 2, "channel.k8s.io": 1, "portforward.k8s.io": 1}
_BASE64_VERSIONS = {"v5.base64.channel.k8s.io": 5, "v4.base64.channel.k8s.io": 4,
                    "base64.channel.k8s.io": 1, "v4.base64.portforward.k8s.io": 4}
MAX_FRAME = (1 << 24) - 1
MAX_HEADER_BLOCK = 1 << 20

SPDY_DICTIONARY = bytes.fromhex(
    "000000076f7074696f6e73000000046865616400000004706f7374000000037075740000000664656c65746500000005"
    "7472616365000000066163636570740000000e6163636570742d636861727365740000000f6163636570742d656e636f"
    "64696e670000000f6163636570742d6c616e67756167650000000d6163636570742d72616e6765730000000361676500"
    "000005616c6c6f770000000d617574686f72697a6174696f6e0000000d63616368652d636f6e74726f6c0000000a636f"
    "6e6e656374696f6e0000000c636f6e74656e742d6261736500000010636f6e74656e742d656e636f64696e6700000010"
    "636f6e74656e742d6c616e67756167650000000e636f6e74656e742d6c656e67746800000010636f6e74656e742d6c6f"
    "636174696f6e0000000b636f6e74656e742d6d64350000000d636f6e74656e742d72616e67650000000c636f6e74656e"
    "742d74797065000000046461746500000004657461670000000665787065637400000007657870697265730000000466"
    "726f6d00000004686f73740000000869662d6d617463680000001169662d6d6f6469666965642d73696e63650000000d"
    "69662d6e6f6e652d6d617463680000000869662d72616e67650000001369662d756e6d6f6469666965642d73696e6365"
    "0000000d6c6173742d6d6f646966696564000000086c6f636174696f6e0000000c6d61782d666f727761726473000000"
    "06707261676d610000001270726f78792d61757468656e7469636174650000001370726f78792d617574686f72697a61"
    "74696f6e0000000572616e676500000007726566657265720000000b72657472792d6166746572000000067365727665"
    "7200000002746500000007747261696c6572000000117472616e736665722d656e636f64696e67000000077570677261"
    "64650000000a757365722d6167656e74000000047661727900000003766961000000077761726e696e67000000107777"
    "772d61757468656e746963617465000000066d6574686f64000000036765740000000673746174757300000006323030"
    "204f4b0000000776657273696f6e00000008485454502f312e310000000375726c000000067075626c69630000000a73"
    "65742d636f6f6b69650000000a6b6565702d616c697665000000066f726967696e313030313031323031323032323035"
    "323036333030333032333033333034333035333036333037343032343035343036343037343038343039343130343131"
    "343132343133343134343135343136343137353032353034353035323033204e6f6e2d417574686f7269746174697665"
    "20496e666f726d6174696f6e323034204e6f20436f6e74656e74333031204d6f766564205065726d616e656e746c7934"
    "303020426164205265717565737434303120556e617574686f72697a656434303320466f7262696464656e343034204e"
    "6f7420466f756e6435303020496e7465726e616c20536572766572204572726f72353031204e6f7420496d706c656d65"
    "6e746564353033205365727669636520556e617661696c61626c654a616e20466562204d617220417072204d6179204a"
    "756e204a756c204175672053657074204f6374204e6f76204465632030303a30303a3030204d6f6e2c205475652c2057"
    "65642c205468752c204672692c205361742c2053756e2c20474d546368756e6b65642c746578742f68746d6c2c696d61"
    "67652f706e672c696d6167652f6a70672c696d6167652f6769662c6170706c69636174696f6e2f786d6c2c6170706c69"
    "636174696f6e2f7868746d6c2b786d6c2c746578742f706c61696e2c746578742f6a6176617363726970742c7075626c"
    "6963707269766174656d61782d6167653d677a69702c6465666c6174652c73646368636861727365743d7574662d3863"
    "6861727365743d69736f2d383835392d312c7574662d2c2a2c656e713d302e")
assert len(SPDY_DICTIONARY) == 1423  # the SPDY/3 header dictionary (moby/spdystream)

_SYN_STREAM, _SYN_REPLY, _RST_STREAM, _HEADERS = 1, 2, 3, 8
SYN_STREAM = _SYN_STREAM
_CONTROL_NAMES = {1: "SYN_STREAM", 2: "SYN_REPLY", 3: "RST_STREAM", 4: "SETTINGS", 6: "PING",
                  7: "GOAWAY", 8: "HEADERS", 9: "WINDOW_UPDATE"}
FLAG_FIN = 0x01


class StreamError(ValueError):
    """The stream cannot be parsed (so it cannot be masked): the connection must be closed."""


# ============================================================================ channel protocol

@dataclass(frozen=True)
class ChannelProtocol:
    """How the messages of one WebSocket connection are framed."""

    name: str  # the negotiated subprotocol
    version: int  # 1..5 for the channel protocol
    base64: bool = False
    spdy: bool = False  # SPDY/3.1 frames tunnelled in binary messages


def channel_protocol(subprotocol: str) -> ChannelProtocol | None:
    """The protocol a 101's ``Sec-WebSocket-Protocol`` names, or None when it is none of
    Kubernetes' (the addon then refuses to relay what it cannot read)."""
    name = subprotocol.strip()
    if name == SPDY_TUNNEL:
        return ChannelProtocol(name, 3, spdy=True)
    if name in _CHANNEL_VERSIONS:
        return ChannelProtocol(name, _CHANNEL_VERSIONS[name])
    if name in _BASE64_VERSIONS:
        return ChannelProtocol(name, _BASE64_VERSIONS[name], base64=True)
    return None


@dataclass(frozen=True)
class ChannelMessage:
    channel: int
    payload: bytes


def parse_channel_message(protocol: ChannelProtocol, content: bytes) -> ChannelMessage | None:
    """One WebSocket message of the channel protocol; None for an empty message (no channel).
    Raises StreamError for a base64 message that does not decode."""
    if not content:
        return None
    if not protocol.base64:
        return ChannelMessage(content[0], bytes(content[1:]))
    digit = content[:1]
    if not digit.isdigit():
        raise StreamError(f"base64 channel message starts with {digit!r}, not a channel digit")
    try:
        payload = base64.b64decode(bytes(content[1:]), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise StreamError(f"base64 channel message does not decode: {exc}") from None
    return ChannelMessage(int(digit), payload)


def channel_content(protocol: ChannelProtocol, channel: int, payload: bytes) -> bytes:
    """The message content carrying ``payload`` on ``channel`` (inverse of the parser)."""
    if protocol.base64:
        return str(channel).encode("ascii") + base64.b64encode(payload)
    return bytes([channel]) + payload


def exit_status(payload: bytes) -> dict[str, Any]:
    """The exec's outcome from the error channel's ``metav1.Status``: ``{"status": "Success"}``
    or ``{"status": "Failure", "exitCode": 1, "message": ...}``. A non-JSON payload (v1
    servers write plain text) is a failure with that message."""
    try:
        status = json.loads(payload)
    except ValueError:
        return {"status": "Failure", "message": payload.decode("utf-8", "replace")[:1024]}
    if not isinstance(status, dict):
        return {"status": "Failure", "message": str(status)[:1024]}
    out: dict[str, Any] = {"status": str(status.get("status") or "Failure")}
    if status.get("message"):
        out["message"] = str(status["message"])[:1024]
    causes = (status.get("details") or {}).get("causes") or [] if isinstance(
        status.get("details"), dict) else []
    for cause in causes:
        if isinstance(cause, dict) and cause.get("reason") == "ExitCode":
            try:
                out["exitCode"] = int(cause.get("message", ""))
            except ValueError:
                pass
    if out["status"] == "Success":
        out["exitCode"] = 0
    return out


# ============================================================================ SPDY/3.1

@dataclass
class SpdyFrame:
    """One complete frame. ``raw`` is the frame as received (what is forwarded unless the
    payload of a data frame is rewritten); ``headers`` only for SYN_STREAM/SYN_REPLY/HEADERS."""

    raw: bytes
    control: bool
    stream_id: int = 0
    type: int = 0  # control frame type (0 for data frames)
    flags: int = 0
    data: bytes = b""  # a data frame's payload
    headers: dict[str, str] = field(default_factory=dict)
    block: bytes = b""  # the inflated header block (re-encoded by SpdyWriter)

    @property
    def kind(self) -> str:
        return _CONTROL_NAMES.get(self.type, f"control-{self.type}") if self.control else "DATA"

    @property
    def fin(self) -> bool:
        return bool(self.flags & FLAG_FIN)


def data_frames(stream_id: int, payload: bytes, flags: int) -> bytes:
    """Data frame(s) carrying ``payload`` (split at the 24-bit length limit; ``flags`` on the
    last one). An empty payload still makes one frame when it carries FIN."""
    out = bytearray()
    chunks = [payload[i:i + MAX_FRAME] for i in range(0, len(payload), MAX_FRAME)] or [b""]
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        out += struct.pack(">II", stream_id & 0x7FFFFFFF,
                           ((flags if last else 0) << 24) | len(chunk)) + chunk
    return bytes(out)


class SpdyReader:
    """Complete SPDY frames out of one direction's byte stream (cut anywhere)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._inflate = zlib.decompressobj(zdict=SPDY_DICTIONARY)

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[SpdyFrame]:
        self._buf += data
        frames: list[SpdyFrame] = []
        while len(self._buf) >= 8:
            length = int.from_bytes(self._buf[5:8], "big")
            if len(self._buf) < 8 + length:
                break
            raw = bytes(self._buf[:8 + length])
            del self._buf[:8 + length]
            frames.append(self._frame(raw))
        return frames

    def _frame(self, raw: bytes) -> SpdyFrame:
        first, second = struct.unpack(">II", raw[:8])
        flags, body = second >> 24, raw[8:]
        if not first & 0x80000000:
            return SpdyFrame(raw, False, stream_id=first & 0x7FFFFFFF, flags=flags, data=body)
        version, type_ = (first >> 16) & 0x7FFF, first & 0xFFFF
        if version != 3:
            raise StreamError(f"SPDY version {version} (only SPDY/3.1 is spoken here)")
        frame = SpdyFrame(raw, True, type=type_, flags=flags)
        if type_ in (_SYN_STREAM, _SYN_REPLY, _HEADERS, _RST_STREAM):
            if len(body) < 4:
                raise StreamError(f"short {frame.kind} frame")
            frame.stream_id = int.from_bytes(body[:4], "big") & 0x7FFFFFFF
        if type_ == _SYN_STREAM:
            if len(body) < 10:
                raise StreamError("short SYN_STREAM frame")
            frame.block = self._inflated(body[10:])
        elif type_ in (_SYN_REPLY, _HEADERS):
            frame.block = self._inflated(body[4:])
        if frame.block:
            frame.headers = parse_header_block(frame.block)
        return frame

    def _inflated(self, block: bytes) -> bytes:
        """Inflate one header block (the direction's zlib context)."""
        try:
            plain = self._inflate.decompress(block, MAX_HEADER_BLOCK)
        except zlib.error as exc:
            raise StreamError(f"SPDY header block does not inflate: {exc}") from None
        if self._inflate.unconsumed_tail:
            raise StreamError(f"SPDY header block inflates beyond {MAX_HEADER_BLOCK} bytes")
        if not plain:
            raise StreamError("empty SPDY header block")
        return plain


class SpdyWriter:
    """One direction's header compression context, owned by the proxy.

    Why re-encode every header frame instead of passing it on: to answer a stream itself (a
    refused port-forward stream gets a ``SYN_REPLY`` and an error message from the proxy), the
    proxy must write header blocks into the peer's zlib context - and then every header block
    of that direction must come from the same compressor, in wire order.
    """

    def __init__(self) -> None:
        self._deflate = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zdict=SPDY_DICTIONARY)

    def _block(self, plain: bytes) -> bytes:
        return self._deflate.compress(plain) + self._deflate.flush(zlib.Z_SYNC_FLUSH)

    def _control(self, type_: int, flags: int, body: bytes) -> bytes:
        if len(body) > MAX_FRAME:
            raise StreamError("SPDY control frame too long")
        return struct.pack(">HHI", 0x8003, type_, (flags << 24) | len(body)) + body

    def reencode(self, frame: SpdyFrame) -> bytes:
        """A received header frame with its block compressed by this writer; other frames as
        received."""
        if not frame.control or not frame.block:
            return frame.raw
        fixed = frame.raw[8:18] if frame.type == _SYN_STREAM else frame.raw[8:12]
        return self._control(frame.type, frame.flags, fixed + self._block(frame.block))

    def syn_reply(self, stream_id: int, headers: dict[str, str], flags: int = 0) -> bytes:
        return self._control(_SYN_REPLY, flags,
                             struct.pack(">I", stream_id) + self._block(header_block(headers)))


def header_block(headers: dict[str, str]) -> bytes:
    """An uncompressed SPDY/3 header block (names lower-cased)."""
    out = bytearray(struct.pack(">I", len(headers)))
    for name, value in headers.items():
        for part in (name.lower().encode(), value.encode()):
            out += struct.pack(">I", len(part)) + part
    return bytes(out)


def parse_header_block(plain: bytes) -> dict[str, str]:
    """The pairs of an inflated header block; a repeated name's values joined by commas."""
    try:
        (count,), pos = struct.unpack_from(">I", plain, 0), 4
        if count > 1000:  # the kubelet's defaultMaxHeaderCount
            raise struct.error(f"{count} header pairs")
        headers: dict[str, str] = {}
        for _ in range(count):
            (size,) = struct.unpack_from(">I", plain, pos)
            name = plain[pos + 4:pos + 4 + size].decode("utf-8", "replace").lower()
            pos += 4 + size
            (size,) = struct.unpack_from(">I", plain, pos)
            value = plain[pos + 4:pos + 4 + size]
            pos += 4 + size
            if pos > len(plain):
                raise struct.error("pair runs past the block")
            # Several values of one name are NUL-separated; a repeated name is kept joined.
            text = value.decode("utf-8", "replace").replace("\x00", ",")
            headers[name] = f"{headers[name]},{text}" if name in headers else text
    except struct.error as exc:
        raise StreamError(f"malformed SPDY header block: {exc}") from None
    return headers
