"""NDJSON masking: records masked as JSON documents as their line ends, Ollama's streamed text
masked across records, any chunking giving the same records."""

from __future__ import annotations

import base64
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chaperone_sidecar.policy.masking.masker import Masker
from chaperone_sidecar.policy.masking.ndjson import NDJSONMasker
from chaperone_sidecar.policy.masking.spans import mask_text
from chaperone_sidecar.policy.model import MaskSpec

from .samples import ALL_RULES

MASKER = Masker([MaskSpec(detectors=("all",))])
KEY_ID = "AKIAIOSFODNN7EXAMPLE"


def drive(m: NDJSONMasker, chunks) -> bytes:
    out = [c for chunk in chunks for c in m(chunk)] + m(b"")
    assert all(out)
    return b"".join(out)


def records(raw: bytes) -> list[dict]:
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


def test_each_record_is_masked_when_its_line_ends():
    m = NDJSONMasker(MASKER)
    assert m(b'{"id": 1, "key": "' + KEY_ID.encode()[:8]) == []  # the record is not complete
    assert m(KEY_ID.encode()[8:] + b'"}\r\n{"id"') == [b'{"id": 1, "key": "[MASKED:aws-access-key-id]"}\r\n']
    assert m(b': 2}\n') == [b'{"id": 2}\n']
    assert m.counts == {"aws-access-key-id": 1} and m.held == 0


def test_json_escapes_inside_a_record_are_seen_decoded():
    """Records go through the whole-body Masker, which reads JSON strings decoded."""
    escaped = b'{"k": "\\u0041KIAIOSFODNN7EXAMPLE"}\n'
    out = drive(NDJSONMasker(MASKER), [escaped])
    assert b"IOSFODNN7EXAMPLE" not in out and records(out)[0]["k"].startswith("[MASKED:")


def test_ollama_text_split_across_records_is_masked():
    parts = ["Use ", KEY_ID[:6], KEY_ID[6:13], KEY_ID[13:], " to log in."]
    raw = b"".join(json.dumps({"model": "m", "response": p, "done": False}).encode() + b"\n" for p in parts)
    raw += json.dumps({"model": "m", "response": "", "done": True, "eval_count": 5}).encode() + b"\n"
    out = drive(NDJSONMasker(MASKER), [raw])
    recs = records(out)
    assert len(recs) == len(parts) + 1 and recs[-1]["done"] is True and recs[-1]["eval_count"] == 5
    assert "".join(r["response"] for r in recs) == "Use [MASKED:aws-access-key-id] to log in."
    assert KEY_ID[:6].encode() not in out


def test_chat_records_and_a_stream_that_ends_without_done():
    parts = ["id ", KEY_ID[:10], KEY_ID[10:]]
    raw = b"".join(json.dumps({"message": {"role": "assistant", "content": p}}).encode() + b"\n" for p in parts)
    out = drive(NDJSONMasker(MASKER), [raw])
    text = "".join(r["message"]["content"] for r in records(out))
    assert text == "id [MASKED:aws-access-key-id]"


def test_a_line_that_is_not_json_is_masked_as_text():
    out = drive(NDJSONMasker(MASKER), [b"plain " + KEY_ID.encode() + b"\n"])
    assert out == b"plain [MASKED:aws-access-key-id]\n"


def test_an_over_long_record_falls_back_to_byte_masking():
    m = NDJSONMasker(MASKER, max_record_bytes=1000)
    body = b'{"blob": "' + b"x" * 2000 + b" " + KEY_ID.encode() + b'"}\n'
    out = drive(m, [body[i:i + 300] for i in range(0, len(body), 300)])
    assert KEY_ID.encode() not in out and m.errors


def test_an_over_long_record_still_decodes_escapes_and_base64():
    """After the switch to byte masking, a ``\\u``-escaped key and a base64-wrapped one (escapes
    cut by the chunking) are still masked: the byte masker decodes them too."""
    m = NDJSONMasker(MASKER, max_record_bytes=1000)
    wrapped = base64.b64encode(b"id=" + KEY_ID.encode()).decode()
    body = (b'{"blob": "' + b"x" * 2000 + rb' \\u0041 \u0041KIAIOSFODNN7EXAMPLE", "f": "' + wrapped.encode()
            + b'"}\n' + json.dumps({"next": "\\u0041KIAIOSFODNN7EXAMPLE"}).encode() + b"\n")
    out = drive(m, [body[i:i + 7] for i in range(0, len(body), 7)])
    docs = records(out)
    assert docs[0]["blob"].endswith(" \\u0041 [MASKED:aws-access-key-id]") and docs[0]["f"] == "[MASKED:aws-access-key-id]"
    assert docs[1] == {"next": "\\u0041KIAIOSFODNN7EXAMPLE"}  # an escaped backslash, not an escape


RECORD = st.fixed_dictionaries({"response": st.sampled_from(["a ", KEY_ID[:9], KEY_ID[9:], " ok", "x@y.io", ""]),
                                "done": st.just(False)})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(RECORD, max_size=8), st.data())
def test_any_chunking_gives_the_same_records_and_masked_text(recs, data):
    raw = b"".join(json.dumps(r).encode() + b"\n" for r in recs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=10)))
    chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)]) if b > a]
    out = drive(NDJSONMasker(MASKER), chunks)
    whole = drive(NDJSONMasker(MASKER), [raw])
    assert out == whole
    text = "".join(r.get("response", "") for r in records(out))
    assert text == mask_text("".join(r["response"] for r in recs).encode(), ALL_RULES).decode()
