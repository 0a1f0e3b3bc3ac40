"""Manifest signing: HMAC and Ed25519 keys detected by format, tampering detected."""

from __future__ import annotations

import copy

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from chaperone_sidecar.recording.manifest import (
    ED25519_ALG, HMAC_ALG, KeyFileError, build_manifest, check_signature, key_from_bytes,
    load_key, manifest_file, sign_manifest,
)

CHUNKS = [
    {"key": "sessions/ns/p/s1/chunk-00000000.jsonl", "sha256": "aa" * 32, "bytes": 10, "events": 2,
     "firstSeq": 0, "lastSeq": 1, "firstHash": "11" * 32, "lastHash": "22" * 32},
    {"key": "sessions/ns/p/s1/chunk-00000002.jsonl", "sha256": "bb" * 32, "bytes": 10, "events": 3,
     "firstSeq": 2, "lastSeq": 4, "firstHash": "33" * 32, "lastHash": "44" * 32},
]
META = {"session": "s1", "namespace": "ns", "pod": "p", "identity": {"creator": "alice"},
        "startTime": "2025-01-01T00:00:00.000000Z"}
ENDED = {"endTime": "2025-01-01T00:01:00.000000Z", "reason": "closed"}


def _ed25519_pem() -> tuple[bytes, bytes]:
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = private.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, public


def test_build_manifest_summarises_the_chunks():
    m = build_manifest(META, ENDED, CHUNKS)
    assert m["events"] == 5 and m["firstHash"] == "11" * 32 and m["lastHash"] == "44" * 32
    assert [c["key"] for c in m["chunks"]] == [c["key"] for c in CHUNKS]
    assert m["identity"] == {"creator": "alice"} and m["endReason"] == "closed"


def test_hmac_signature_and_tampering(tmp_path):
    path = tmp_path / "hmac"
    path.write_bytes(b"a-shared-secret-of-some-length\n")  # the newline of `echo > file` is ignored
    key = load_key(path)
    assert key.alg == HMAC_ALG and key.can_sign
    signed = sign_manifest(build_manifest(META, ENDED, CHUNKS), key)
    assert check_signature(signed, key) is None
    assert check_signature(signed, key_from_bytes(b"a-shared-secret-of-some-length")) is None

    for field, value in (("events", 4), ("endReason", "recovered"), ("identity", {"creator": "mallory"})):
        tampered = dict(signed, **{field: value})
        assert check_signature(tampered, key) == "manifest signature does not match its content"
    tampered = copy.deepcopy(signed)
    tampered["chunks"][1]["sha256"] = "cc" * 32
    assert check_signature(tampered, key) == "manifest signature does not match its content"
    other = key_from_bytes(b"another-secret-entirely-0123")
    assert "not by" in check_signature(signed, other)


def test_ed25519_private_signs_public_verifies(tmp_path):
    pem, public_pem = _ed25519_pem()
    (tmp_path / "key.pem").write_bytes(pem)
    (tmp_path / "pub.pem").write_bytes(public_pem)
    signer, verifier = load_key(tmp_path / "key.pem"), load_key(tmp_path / "pub.pem")
    assert signer.alg == verifier.alg == ED25519_ALG and signer.key_id == verifier.key_id
    assert not verifier.can_sign
    signed = sign_manifest(build_manifest(META, ENDED, CHUNKS), signer)
    assert signed["signature"]["alg"] == "Ed25519"
    assert check_signature(signed, verifier) is None
    tampered = dict(signed, lastHash="55" * 32)
    assert check_signature(tampered, verifier) == "manifest signature does not match its content"
    with pytest.raises(KeyFileError):
        sign_manifest(signed, verifier)


def test_ed25519_openssh_format():
    private = Ed25519PrivateKey.generate()
    ssh_private = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                        serialization.NoEncryption())
    ssh_public = private.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                   serialization.PublicFormat.OpenSSH)
    signer, verifier = key_from_bytes(ssh_private), key_from_bytes(ssh_public + b" comment\n")
    signed = sign_manifest(build_manifest(META, ENDED, CHUNKS), signer)
    assert check_signature(signed, verifier) is None


def test_algorithm_confusion_is_refused():
    pem, _ = _ed25519_pem()
    signed = sign_manifest(build_manifest(META, ENDED, CHUNKS), key_from_bytes(pem))
    # the PEM bytes used as an HMAC secret must not verify an Ed25519 manifest
    assert "signed with Ed25519" in check_signature(signed, key_from_bytes(b"x" * 40))


def test_unsigned_manifest_fails_verification():
    unsigned = sign_manifest(build_manifest(META, ENDED, CHUNKS), None)
    assert unsigned["signature"] is None
    assert check_signature(unsigned, key_from_bytes(b"x" * 40)) == "manifest is not signed"


def test_bad_keys_are_refused(tmp_path):
    with pytest.raises(KeyFileError, match="at least 16"):
        key_from_bytes(b"short\n")
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with pytest.raises(KeyFileError, match="unsupported key type"):
        key_from_bytes(ec_pem)
    with pytest.raises(KeyFileError, match="cannot read"):
        key_from_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    with pytest.raises(KeyFileError, match="cannot read key file"):
        load_key(tmp_path / "missing")


def test_stored_form_is_readable_and_reverifies():
    key = key_from_bytes(b"k" * 32)
    signed = sign_manifest(build_manifest(META, ENDED, CHUNKS), key)
    import json
    stored = manifest_file(signed)
    assert stored.startswith(b"{\n  ")
    assert check_signature(json.loads(stored), key) is None
