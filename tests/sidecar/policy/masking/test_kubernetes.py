"""Kubernetes Secret data masking (issue 11): every shape a Secret is served in, JSON only."""

from __future__ import annotations

import base64
import gzip
import json

import pytest

from chaperone_sidecar.policy.masking.encoding import BodyTooLarge, MaskingError
from chaperone_sidecar.policy.masking.kubernetes import DATA_TOKEN, LAST_APPLIED, TOKEN, mask_secrets
from chaperone_sidecar.policy.masking.masker import Masker
from chaperone_sidecar.policy.model import MaskSpec

from .samples import AWS_KEY_ID

PASSWORD = base64.b64encode(b"hunter2-is-the-password").decode()
M = Masker([MaskSpec(kubernetes_secrets="mask")], direction="response")


def secret(name="db", **extra):
    applied = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
               "data": {"password": PASSWORD}, "stringData": {"user": "admin-plain"}}
    return {"kind": "Secret", "apiVersion": "v1",
            "metadata": {"name": name, "annotations": {LAST_APPLIED: json.dumps(applied)},
                         "managedFields": [{"fieldsV1": {"f:data": {"f:password": {}}}}]},
            "data": {"password": PASSWORD, "tls.key": base64.b64encode(b"k").decode()},
            "stringData": {"user": "admin-plain"}, "type": "Opaque", **extra}


def leaks(body: bytes) -> bool:
    return any(s in body for s in (PASSWORD.encode(), b"admin-plain", b"hunter2"))


def test_get_list_table_and_watch_event_are_all_masked():
    shapes = {
        "get": secret(),
        "list": {"kind": "SecretList", "apiVersion": "v1", "items": [secret("a"), secret("b")]},
        "watch": {"type": "MODIFIED", "object": secret()},
        "table": {"kind": "Table", "rows": [{"cells": ["db"], "object": secret()}]},
    }
    for shape, doc in shapes.items():
        raw = json.dumps(doc).encode()
        assert leaks(raw)
        r = M.mask_bytes(raw, "application/json")
        assert not leaks(r.body), shape
        assert r.counts["kubernetes-secret"] >= 3, shape
        out = json.loads(r.body)
        obj = out.get("object") or (out.get("items") or [None])[0] or \
            (out.get("rows") or [{}])[0].get("object") or out
        assert obj["data"] == {"password": DATA_TOKEN, "tls.key": DATA_TOKEN}  # keys kept
        assert base64.b64decode(obj["data"]["password"]) == TOKEN.encode()  # still base64
        assert obj["stringData"] == {"user": TOKEN}
        applied = json.loads(obj["metadata"]["annotations"][LAST_APPLIED])
        assert applied["data"] == {"password": DATA_TOKEN}
        assert obj["metadata"]["managedFields"][0]["fieldsV1"] == {"f:data": {"f:password": {}}}


def test_masking_is_idempotent_and_leaves_other_documents_alone():
    once = M.mask_bytes(json.dumps(secret()).encode(), "application/json")
    assert not M.mask_bytes(once.body, "application/json").changed
    status = json.dumps({"kind": "Status", "status": "Failure", "code": 404}).encode()
    assert M.mask_bytes(status, "application/json").body is status


def test_unparseable_annotation_is_replaced_whole():
    doc = secret()
    doc["metadata"]["annotations"][LAST_APPLIED] = '{"data": {"password": "' + PASSWORD + '"'  # cut
    out = json.loads(M.mask_bytes(json.dumps(doc).encode(), "application/json").body)
    assert out["metadata"]["annotations"][LAST_APPLIED] == TOKEN


@pytest.mark.parametrize("body,ctype", [
    (b"k8s\x00\n\x0f\n\x02v1\x12\x06Secret" + PASSWORD.encode(), "application/vnd.kubernetes.protobuf"),
    (b"apiVersion: v1\nkind: Secret\ndata:\n  password: " + PASSWORD.encode(), "application/yaml"),
    (b"\xd9\xd9\xf7\xa2dkindfSecret", "application/cbor"),
])
def test_a_secret_that_is_not_json_cannot_be_masked_so_it_is_refused(body, ctype):
    with pytest.raises(MaskingError, match="Accept: application/json"):
        M.mask_bytes(body, ctype)


def test_buffered_watch_lines_are_masked_each():
    body = b"".join(json.dumps({"type": "ADDED", "object": secret(str(i))}).encode() + b"\n" for i in range(3))
    masked, n = mask_secrets(body)
    assert n == 15 and not leaks(masked)  # 2 data + 1 stringData + 2 in the annotation, each and len(masked.splitlines()) == 3


def test_line_masker_streams_events_as_their_line_feed_arrives():
    lm = M.lines("application/json")
    event = json.dumps({"type": "ADDED", "object": secret()}).encode() + b"\n"
    assert lm(event[:100]) == []  # half an event: held
    out = lm(event[100:] + event[:10])  # the first event is complete: out at once
    assert len(out) == 1 and out[0].endswith(b"\n") and not leaks(out[0])
    assert json.loads(out[0])["object"]["data"]["password"] == DATA_TOKEN
    rest = lm(event[10:]) + lm(b"")
    assert not leaks(b"".join(rest)) and lm.counts == {"kubernetes-secret": 10}


def test_line_masker_decodes_gzip_and_caps_a_line():
    m = Masker([MaskSpec(kubernetes_secrets="mask", max_body_bytes=4096)], direction="response")
    wire = gzip.compress(json.dumps({"type": "ADDED", "object": secret()}).encode() + b"\n")
    lm = m.lines("application/json", "gzip")
    out = b"".join(lm(wire) + lm(b""))
    assert not leaks(out) and json.loads(out)["type"] == "ADDED"
    long_line = m.lines("application/json")
    with pytest.raises(BodyTooLarge):
        long_line(b'{"data": {"x": "' + b"A" * 5000)


def test_line_masker_runs_detectors_and_field_rules_per_line():
    m = Masker([MaskSpec(detectors=("all",), fields=("$.object.spec.token",))])
    lm = m.lines("application/x-ndjson")
    body = (json.dumps({"object": {"spec": {"token": "abc"}, "note": AWS_KEY_ID.decode()}}) + "\n").encode()
    out = json.loads(b"".join(lm(body)))
    assert out == {"object": {"spec": {"token": "[MASKED:field]"}, "note": "[MASKED:aws-access-key-id]"}}
