"""Reading sessions back and verifying them: every single-byte change is caught and located."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chaperone_sidecar.recording import Recorder
from chaperone_sidecar.recording.events import Chain, canonical_json, encode_body, new_event, split_lines
from chaperone_sidecar.recording.manifest import build_manifest, key_from_bytes, manifest_file, sign_manifest
from chaperone_sidecar.recording.reader import (
    SessionNotFound,
    SessionRef,
    find_session,
    list_sessions,
    load_session,
    open_store,
    verify_session,
)
from chaperone_sidecar.recording.shipper import DirStore, ShipperConfig
from chaperone_sidecar.recording.spool import SpoolConfig

KEY = key_from_bytes(b"reader-test-hmac-secret-0123456789")
REF = SessionRef("team-a", "agent-0", "s-1")


class MemoryStore:
    """Objects in a dict: lets hypothesis flip bytes without touching a disk per example."""

    description = "memory://"

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = dict(objects)

    def get(self, key: str) -> bytes:
        return self.objects[key]

    def list(self, prefix: str = ""):
        return iter(sorted(k for k in self.objects if k.startswith(prefix)))


def record(tmp_path, ref: SessionRef = REF, n: int = 40, key=KEY) -> DirStore:
    """A real session through Recorder -> spool -> shipper -> directory store."""
    store = DirStore(tmp_path / "store")

    async def main():
        rec = Recorder(SpoolConfig(tmp_path / f"spool-{ref.session}", segment_bytes=1500),
                       namespace=ref.namespace, pod=ref.pod, session=ref.session,
                       identity={"namespace": ref.namespace, "pod": ref.pod, "creator": "alice"},
                       store=store, key=key, shipping=ShipperConfig(poll_interval=0.02))
        await rec.start({"mode": "explicit"})
        for i in range(n):
            body = encode_body("héllo ✓ \"quoted\"\nline" if i % 3 else bytes([0xff, i % 256, 0x00]))
            await rec.record("request", flow=f"f{i}", data={"i": i, "method": "POST", "body": body})
        assert await rec.close()

    asyncio.run(main())
    return store


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    store = record(tmp_path_factory.mktemp("rec"))
    return {k: store.get(k) for k in store.list()}


def test_an_intact_session_verifies(recorded):
    report = verify_session(MemoryStore(recorded), REF, KEY)
    assert report.ok and report.signature == "valid" and report.events == 42 and report.chunks >= 4
    assert report.to_dict()["problems"] == []


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_single_byte_change_is_caught_and_located(recorded, data):
    chunks = sorted(k for k in recorded if "/chunk-" in k)
    key = data.draw(st.sampled_from(chunks), label="chunk")
    original = recorded[key]
    offset = data.draw(st.integers(0, len(original) - 1), label="offset")
    value = data.draw(st.integers(0, 255).filter(lambda b: b != original[offset]), label="byte")
    tampered = original[:offset] + bytes([value]) + original[offset + 1:]

    report = verify_session(MemoryStore({**recorded, key: tampered}), REF, KEY)

    assert not report.ok
    line = original[:offset].count(b"\n") + 1  # the newline belongs to the line it ends
    first_seq = int(key.rsplit("chunk-", 1)[1][:8])
    spot = report.problems[0]
    assert (spot.where, spot.line, spot.seq) == (key, line, first_seq + line - 1), [str(p) for p in report.problems]
    assert any(p.kind == "chunk digest differs from the manifest" and p.where == key for p in report.problems)


def test_a_manifest_change_breaks_the_signature(recorded):
    mkey = REF.prefix + "manifest.json"
    manifest = json.loads(recorded[mkey])
    manifest["identity"]["creator"] = "mallory"
    report = verify_session(MemoryStore({**recorded, mkey: manifest_file(manifest)}), REF, KEY)
    assert report.signature == "invalid"
    assert [str(p) for p in report.problems] == [
        f"{mkey} line 0 (seq None): manifest signature does not match its content"]


def test_a_rewritten_and_rechained_session_fails_without_the_key(recorded):
    """An attacker with bucket access rewrites an event, re-chains everything after it and
    rebuilds the manifest: every hash holds, only the signature (which needs the key) fails."""
    chunks = sorted((k for k in recorded if "/chunk-" in k), key=lambda k: int(k.rsplit("chunk-", 1)[1][:8]))
    chain, forged, entries = Chain(REF.session), {}, []
    for key in chunks:
        lines = split_lines(recorded[key])[0]
        out = b""
        for line in lines:
            event = json.loads(line)
            if event["data"].get("i") == 5:
                event["data"]["method"] = "GET"
            out += chain.seal(event)[1]
        forged[key] = out
        first, last = json.loads(split_lines(out)[0][0]), json.loads(split_lines(out)[0][-1])
        from chaperone_sidecar.recording.events import sha256_hex
        entries.append({"key": key, "sha256": sha256_hex(out), "bytes": len(out), "events": len(lines),
                        "firstSeq": first["seq"], "lastSeq": last["seq"], "firstHash": first["hash"],
                        "lastHash": last["hash"]})
    original = json.loads(recorded[REF.prefix + "manifest.json"])
    meta = {k: original[k] for k in ("session", "namespace", "pod", "identity", "startTime")}
    forged_manifest = build_manifest(meta, {"endTime": original["endTime"], "reason": "closed"}, entries)
    objects = {**recorded, **forged}
    for signer in (None, key_from_bytes(b"the-attackers-own-secret-key")):
        objects[REF.prefix + "manifest.json"] = manifest_file(sign_manifest(forged_manifest, signer))
        report = verify_session(MemoryStore(objects), REF, KEY)
        assert not report.ok and report.signature in ("missing", "invalid")
        assert verify_session(MemoryStore(objects), REF, None).ok  # why the CLI insists on --key


def test_missing_and_extra_chunks_are_named(recorded):
    chunks = sorted((k for k in recorded if "/chunk-" in k), key=lambda k: int(k.rsplit("chunk-", 1)[1][:8]))
    objects = dict(recorded)
    removed = objects.pop(chunks[1])
    report = verify_session(MemoryStore(objects), REF, KEY)
    assert report.problems[0].where == chunks[1] and report.problems[0].kind == "chunk missing from the store"
    second = report.problems[1]  # and the link that breaks because of it
    assert second.where == chunks[2] and second.line == 1 and second.kind == "seq mismatch"

    objects[chunks[1]] = removed
    stray = REF.prefix + "chunk-99999999.jsonl"
    objects[stray] = removed
    report = verify_session(MemoryStore(objects), REF, KEY)
    assert report.problems[0].where == stray and report.problems[0].kind == "chunk not in the manifest"


def test_missing_or_unreadable_manifest(recorded):
    mkey = REF.prefix + "manifest.json"
    objects = {k: v for k, v in recorded.items() if k != mkey}
    report = verify_session(MemoryStore(objects), REF, KEY)
    assert [p.kind for p in report.problems] == ["manifest missing (session not closed, or the manifest was removed)"]
    assert list_sessions(MemoryStore(objects))[0].status == "open"
    report = verify_session(MemoryStore({**objects, mkey: b"{not json"}), REF, KEY)
    assert report.problems[0].kind.startswith("manifest is not JSON")


def test_list_find_and_load(tmp_path):
    store = record(tmp_path, REF, n=3)
    record(tmp_path, SessionRef("team-b", "agent-9", "s-2"), n=2)
    record(tmp_path, SessionRef("team-b", "agent-8", "s-1"), n=1)
    sessions = list_sessions(store)
    assert [str(s.ref) for s in sessions] == ["team-a/agent-0/s-1", "team-b/agent-8/s-1", "team-b/agent-9/s-2"]
    assert sessions[0].status == "closed" and sessions[0].to_dict()["events"] == 5
    assert [str(s.ref) for s in list_sessions(store, namespace="team-b", pod="agent-9")] == ["team-b/agent-9/s-2"]
    assert find_session(store, "s-2") == SessionRef("team-b", "agent-9", "s-2")
    assert find_session(store, "team-a/agent-0/s-1") == REF
    with pytest.raises(SessionNotFound, match="ambiguous"):
        find_session(store, "s-1")
    with pytest.raises(SessionNotFound, match="no session"):
        find_session(store, "nope")
    with pytest.raises(SessionNotFound):
        load_session(store, SessionRef("x", "y", "z"))
    loaded = load_session(store, REF)
    assert [e["type"] for e in loaded.events] == ["session-start"] + ["request"] * 3 + ["session-end"]
    assert loaded.manifest["identity"]["creator"] == "alice"


def test_open_store_needs_exactly_one_source(tmp_path):
    with pytest.raises(ValueError):
        open_store()
    with pytest.raises(ValueError):
        open_store(bucket="b", directory=str(tmp_path))
    assert open_store(directory=str(tmp_path)).description == str(tmp_path)


def test_events_from_a_foreign_session_are_refused(tmp_path):
    """Splicing a valid event of another session in breaks the chain (per-session genesis)."""
    store = record(tmp_path, REF, n=2)
    other = Chain("s-other")
    foreign = other.seal(dict(new_event("request", data={"i": 0}), time="2025-01-01T00:00:00.000000Z"))[1]
    key = sorted(k for k in store.list() if "/chunk-" in k)[0]
    objects = {k: store.get(k) for k in store.list()}
    lines = split_lines(objects[key])[0]
    objects[key] = lines[0] + foreign + b"".join(lines[2:])
    report = verify_session(MemoryStore(objects), REF, KEY)
    assert report.problems[0].line == 2 and report.problems[0].kind == "session mismatch"
    assert canonical_json(json.loads(foreign)) + b"\n" == foreign
