"""SSE masking: the event-stream parser, the Anthropic re-framer (secrets split across
deltas), other events masked whole, and the property that any chunking of the stream (and any
split of the text into deltas) gives the same assembled, masked text."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chaperone_sidecar.policy.masking.masker import Masker
from chaperone_sidecar.policy.masking.spans import mask_text
from chaperone_sidecar.policy.masking.sse import SSEMasker, SSEParser, serialize
from chaperone_sidecar.policy.model import MaskSpec

from .samples import ALL_RULES

MASKER = Masker([MaskSpec(detectors=("all",))])
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
KEY_ID = "AKIAIOSFODNN7EXAMPLE"


def ev(name: str, obj: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(obj)}\n\n".encode()


def delta(index: int, kind: str, text: str) -> bytes:
    field = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "partial_json"}[kind]
    return ev("content_block_delta", {"type": "content_block_delta", "index": index,
                                      "delta": {"type": kind, field: text}})


def message(parts: list[str], kind: str = "text_delta", extra: bytes = b"") -> bytes:
    block = {"text_delta": {"type": "text", "text": ""}, "thinking_delta": {"type": "thinking", "thinking": ""},
             "input_json_delta": {"type": "tool_use", "id": "t1", "name": "bash", "input": {}}}[kind]
    return b"".join([
        ev("message_start", {"type": "message_start", "message": {"id": "m", "content": []}}),
        ev("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}),
        *[delta(0, kind, p) + extra for p in parts],
        ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}}),
        ev("message_stop", {"type": "message_stop"}),
    ])


def drive(masker: SSEMasker, chunks) -> bytes:
    out = [c for chunk in chunks for c in masker(chunk)] + masker(b"")
    assert all(out), "an empty chunk would end a chunked HTTP/1 body"
    return b"".join(out)


def events(raw: bytes) -> list[dict]:
    """Parse the output as an SSE client does: every event has a name and JSON data."""
    parsed = SSEParser().feed(raw, final=True)
    out = []
    for fields in parsed:
        names = [v.decode() for n, v in fields if n == b"event"]
        data = b"\n".join(v for n, v in fields if n == b"data")
        obj = json.loads(data)  # valid JSON, or this raises
        assert names and names[-1] == obj["type"], fields
        out.append(obj)
    return out


def assembled(raw: bytes, field: str = "text") -> str:
    """The block text an SDK builds by concatenating the deltas of index 0."""
    return "".join(e["delta"][field] for e in events(raw)
                   if e["type"] == "content_block_delta" and e["index"] == 0 and field in e["delta"])


# ---------------------------------------------------------------------------- the parser

@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_parser_line_ends_and_multiline_data(eol):
    raw = eol.join([b"\xef\xbb\xbf: a comment", b"event: x", b"data: one", b"data:two", b"data",
                    b"id: 7", b"", b"data: second", b"", b""])
    for cut in range(len(raw) + 1):  # a CR at a chunk end must wait for a possible LF
        p = SSEParser()
        got = p.feed(raw[:cut]) + p.feed(raw[cut:], final=True)
        assert got == [[(None, b" a comment"), (b"event", b"x"), (b"data", b"one"), (b"data", b"two"),
                        (b"data", b""), (b"id", b"7")], [(b"data", b"second")]], cut


def test_parser_never_dispatches_an_unterminated_event():
    """As the spec says of clients: an event cut off by the end is discarded - and an empty
    chunk mid-stream (reported like the end) cannot cut one in two."""
    p = SSEParser()
    assert p.feed(b"data: a\n\ndata: b") == [[(b"data", b"a")]]
    assert p.pending == len(b"data: b")
    assert p.feed(b"", final=True) == []
    assert p.feed(b"c\n\n") == [[(b"data", b"bc")]]


def test_serialize_round_trips_multiline_data_and_comments():
    fields = [(None, b"c"), (b"event", b"e"), (b"data", b"a\nb"), (b"retry", b"")]
    assert serialize(fields) == b":c\nevent: e\ndata: a\ndata: b\nretry:\n\n"
    parsed = SSEParser().feed(serialize(fields), final=True)
    assert parsed == [[(None, b"c"), (b"event", b"e"), (b"data", b"a"), (b"data", b"b"), (b"retry", b"")]]


# ---------------------------------------------------------------------------- Anthropic

@pytest.mark.parametrize("at", range(1, len(SECRET)))
def test_secret_split_across_two_text_deltas_is_masked(at):
    raw = message(["creds: aws_secret_access_key = " + SECRET[:at], SECRET[at:] + " done."])
    s = SSEMasker(MASKER)
    out = drive(s, [raw])
    for half in (SECRET[:at], SECRET[at:]):
        assert len(half) < 6 or half.encode() not in out
    assert assembled(out) == "creds: aws_secret_access_key = [MASKED:aws-secret-key] done."
    assert s.counts == {"aws-secret-key": 1}
    kinds = [e["type"] for e in events(out)]
    assert kinds[0] == "message_start" and kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]


@pytest.mark.parametrize("kind,field", [("thinking_delta", "thinking"), ("input_json_delta", "partial_json")])
def test_thinking_and_tool_input_are_masked_across_deltas(kind, field):
    parts = ["The id is " + KEY_ID[:7], KEY_ID[7:15], KEY_ID[15:] + "."]
    if kind == "input_json_delta":
        parts = ['{"cmd": "use ' + KEY_ID[:7], KEY_ID[7:15], KEY_ID[15:] + '", "pan": 41111111', '11111111}']
    out = drive(SSEMasker(MASKER), [message(parts, kind)])
    text = assembled(out, field)
    assert KEY_ID[:7] not in text and KEY_ID[15:] + '"' not in text
    if kind == "input_json_delta":  # the assembled tool input is still JSON; a bare card is quoted
        assert json.loads(text) == {"cmd": "use [MASKED:aws-access-key-id]", "pan": "[MASKED:credit-card]"}
    else:
        assert text == "The id is [MASKED:aws-access-key-id]."


def test_prose_flows_at_once_and_a_possible_prefix_is_held_until_decided():
    s = SSEMasker(MASKER)
    s(message([])[: message([]).index(b"event: content_block_stop")])  # start, no deltas
    out = b"".join(s(delta(0, "text_delta", "Hello there, how are you? ")))
    assert assembled(out) == "Hello there, how are you? "  # nothing could start a secret: no delay
    out = b"".join(s(delta(0, "text_delta", "Key: AKIAIOSF")))
    assert assembled(out) == "Key: "  # the start of a key id waits
    assert b"".join(s(ev("ping", {"type": "ping"}))) == ev("ping", {"type": "ping"}).replace(b": ", b": ", 1)
    out = b"".join(s(delta(0, "text_delta", "ODNN7EXAMPLE and more ")))
    assert assembled(out) == "[MASKED:aws-access-key-id] and more "


def test_held_text_is_released_before_content_block_stop():
    s = SSEMasker(MASKER)
    out = drive(s, [message(["see AKIAIOSFODNN7EXAMPL"])])  # 19 chars: could still grow
    names = [e["type"] for e in events(out)]
    stop = names.index("content_block_stop")
    assert names[stop - 1] == "content_block_delta"
    assert assembled(out) == "see AKIAIOSFODNN7EXAMPL"  # never became a key: released as is


def test_a_ping_between_the_halves_does_not_release_them():
    out = drive(SSEMasker(MASKER), [message(["k " + KEY_ID[:10], KEY_ID[10:]], extra=ev("ping", {"type": "ping"}))])
    assert KEY_ID[:10].encode() not in out and assembled(out) == "k [MASKED:aws-access-key-id]"


def test_initial_text_of_content_block_start_continues_in_the_deltas():
    raw = b"".join([
        ev("content_block_start", {"type": "content_block_start", "index": 2,
                                   "content_block": {"type": "text", "text": "id " + KEY_ID[:12]}}),
        delta(2, "text_delta", KEY_ID[12:] + " ok"),
        ev("content_block_stop", {"type": "content_block_stop", "index": 2}),
    ])
    out = drive(SSEMasker(MASKER), [raw])
    evs = events(out)
    text = evs[0]["content_block"]["text"] + "".join(e["delta"]["text"] for e in evs if e["type"] == "content_block_delta")
    assert text == "id [MASKED:aws-access-key-id] ok" and KEY_ID[:12].encode() not in out


def test_other_events_are_masked_whole_and_pass_otherwise():
    raw = (b': keep-alive AKIAIOSFODNN7EXAMPLE\n\n'
           b'data: {"choices": [{"delta": {"content": "key AKIAIOSFODNN7EXAMPLE"}}]}\n\n'
           b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0, '
           b'"delta": {"type": "signature_delta", "signature": "c2ln"}}\n\n'
           b"data: [DONE]\n\n")
    s = SSEMasker(MASKER)
    out = drive(s, [raw])
    assert KEY_ID.encode() not in out and out.count(b"[MASKED:aws-access-key-id]") == 2
    assert out.endswith(b'"signature": "c2ln"}}\n\ndata: [DONE]\n\n')
    assert s.counts == {"aws-access-key-id": 2}


def test_an_over_long_event_switches_to_byte_masking_with_bounded_memory():
    s = SSEMasker(MASKER, max_event_bytes=4096)
    out = b"".join(s(message(["a " + KEY_ID[:5]])[:-200]))  # a block holding a prefix, mid-stream
    big = b"data: " + b"x" * 3000 + b" " + KEY_ID.encode() + b" " + b"y" * 3000
    for i in range(0, len(big), 500):
        out += b"".join(s(big[i:i + 500]))
        assert s.held < 4096 + 40 * 1024
    out += b"".join(s(b"\n\n")) + b"".join(s(b""))
    assert KEY_ID.encode() not in out and b"[MASKED:aws-access-key-id]" in out
    assert s.errors and "masked as bytes" in s.errors[0]


# ---------------------------------------------------------------------------- properties

TEXT = st.lists(st.sampled_from(["Here ", "is ", "the ", "key: ", "aws_secret_access_key = ", SECRET, KEY_ID,
                                 "\n", "ok. ", "café ", "✓ ", "4111 1111 1111 1111", "eyJ", "@", "jo@example.com"]),
                max_size=12).map("".join)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(TEXT, st.data())
def test_any_chunking_and_any_split_into_deltas_gives_the_masked_text(text, data):
    """However the text is split into deltas and the bytes into chunks, the SDK assembles the
    text masked as a whole (``mask_text`` over the whole text)."""
    points = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    parts = [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]
    raw = message(parts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=20)))
    # mitmproxy passes b"" only at the end (see StreamMasker on empty HTTP/2 DATA frames)
    chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)]) if b > a]
    out = drive(SSEMasker(MASKER), chunks)
    assert assembled(out) == mask_text(text.encode(), ALL_RULES).decode()


def test_json_escapes_in_deltas_are_decoded_before_masking():
    """The SDK decodes JSON escapes: ``\\u0041KIA...`` split across deltas (even an escaped
    delta type) is the key once decoded, so it is masked."""
    raw = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
           b'"delta":{"type":"text\\u005fdelta","text":"id \\u0041KIAIOSF"}}\n\n'
           b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
           b'"delta":{"type":"text_delta","text":"\\u004fDNN7EXAMPLE."}}\n\n'
           b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n')
    out = drive(SSEMasker(MASKER), [raw])
    assert assembled(out) == "id [MASKED:aws-access-key-id]."
    assert b"IOSF" not in out


def chat_chunk(content=None, finish=None, args=None) -> bytes:
    delta = {}
    if content is not None:
        delta["content"] = content
    if args is not None:
        delta["tool_calls"] = [{"index": 0, "function": {"arguments": args}}]
    return ("data: " + json.dumps({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt",
                                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n").encode()


def chat_text(raw: bytes) -> tuple[str, str]:
    text, args = "", ""
    for fields in SSEParser().feed(raw, final=True):
        data = b"\n".join(v for n, v in fields if n == b"data")
        if data == b"[DONE]":
            continue
        for choice in json.loads(data)["choices"]:
            text += choice["delta"].get("content") or ""
            for call in choice["delta"].get("tool_calls") or []:
                args += call["function"]["arguments"]
    return text, args


@pytest.mark.parametrize("finish_chunk", [True, False])
def test_openai_chat_chunks_are_masked_across_events(finish_chunk):
    raw = b"".join([chat_chunk("key " + KEY_ID[:9]), chat_chunk(KEY_ID[9:] + " end"),
                    chat_chunk(args='{"k": "' + KEY_ID[:4]), chat_chunk(args=KEY_ID[4:] + '"}'),
                    chat_chunk(finish="stop") if finish_chunk else b"", b"data: [DONE]\n\n"])
    out = drive(SSEMasker(MASKER), [raw])
    text, args = chat_text(out)
    assert text == "key [MASKED:aws-access-key-id] end"
    assert json.loads(args) == {"k": "[MASKED:aws-access-key-id]"}
    assert KEY_ID[:9].encode() not in out and out.endswith(b"data: [DONE]\n\n")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, 200), max_size=6), st.lists(st.integers(0, 4000), max_size=10))
def test_json_escapes_inside_partial_json_are_decoded_across_deltas(points, cuts):
    """``partial_json`` is JSON text: the tool input the SDK assembles and parses may spell a
    key with ``\\u`` escapes (an escape itself cut between two deltas). Masked on the decoded
    text, so the parsed input holds no key; the same for OpenAI tool-call arguments."""
    tool_input = '{"command": "echo \\u0041KIAIOSF\\u004fDNN7EXAMPLE", "b64": "%s", "n": 1}' % (
        base64.b64encode(b"aws_access_key_id=" + KEY_ID.encode()).decode())
    points = sorted({min(p, len(tool_input)) for p in points})
    parts = [tool_input[a:b] for a, b in zip([0, *points], [*points, len(tool_input)])]
    raw = message(parts, kind="input_json_delta")
    cuts = sorted({min(c, len(raw)) for c in cuts})
    out = drive(SSEMasker(MASKER), [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)]) if b > a])
    parsed = json.loads(assembled(out, "partial_json"))
    assert parsed == {"command": "echo [MASKED:aws-access-key-id]", "b64": "[MASKED:aws-access-key-id]", "n": 1}
    chat = b"".join([*(chat_chunk(args=p) for p in parts), chat_chunk(finish="tool_calls"), b"data: [DONE]\n\n"])
    _, args = chat_text(drive(SSEMasker(MASKER), [chat]))
    assert json.loads(args) == parsed
