"""The signed manifest that closes a session: which chunks, their digests, and who signed it.

Why: the hash chain shows that events were not edited *relative to each other*, but someone
with write access to the bucket could rewrite a whole session and recompute every hash. The
manifest lists every chunk's SHA-256, the event count and the first/last hash, and is signed
with a key only the sidecar holds (a mounted Secret), so a rewritten session fails ``verify``.

Key material is read from a file and its format decides the algorithm:

* a PEM (PKCS#8) or OpenSSH **Ed25519** private key -> Ed25519 (the reader needs only the
  public key, PEM or ``ssh-ed25519 ...``);
* anything else -> an **HMAC-SHA256** secret (surrounding whitespace, e.g. the newline of
  ``echo secret > file``, is stripped; at least 16 bytes). The reader needs the same secret.

The signature covers the canonical JSON of the manifest without its ``signature`` field; the
stored file is indented JSON for people, which does not matter since it is re-canonicalised.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .events import canonical_json, genesis_hash

MANIFEST_VERSION = 1
HMAC_ALG, ED25519_ALG = "HMAC-SHA256", "Ed25519"


class KeyFileError(ValueError):
    """The key file is unusable (wrong type, too short, unreadable)."""


@dataclass(frozen=True)
class ManifestKey:
    """A signing and/or verification key. ``private`` is None for a verify-only Ed25519 key."""

    alg: str
    key_id: str
    secret: bytes | None = None  # HMAC
    private: Ed25519PrivateKey | None = None
    public: Ed25519PublicKey | None = None

    @property
    def can_sign(self) -> bool:
        return self.secret is not None or self.private is not None

    def sign(self, data: bytes) -> bytes:
        if self.secret is not None:
            return hmac.new(self.secret, data, hashlib.sha256).digest()
        if self.private is None:
            raise KeyFileError("this is a public key: it can verify manifests but not sign them")
        return self.private.sign(data)

    def verify(self, data: bytes, signature: bytes) -> bool:
        if self.secret is not None:
            return hmac.compare_digest(self.sign(data), signature)
        assert self.public is not None
        try:
            self.public.verify(signature, data)
            return True
        except InvalidSignature:
            return False


def _ed25519(private: Ed25519PrivateKey | None, public: Ed25519PublicKey) -> ManifestKey:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    key_id = "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]
    return ManifestKey(ED25519_ALG, key_id, private=private, public=public)


def key_from_bytes(data: bytes) -> ManifestKey:
    """Detect the key type from its bytes (see the module docstring)."""
    text = data.strip()
    loaders: list[Callable[[], Any]] = []  # each returns some cryptography key; checked below
    if text.startswith(b"-----BEGIN OPENSSH PRIVATE KEY"):
        loaders.append(lambda: serialization.load_ssh_private_key(text, password=None))
    elif text.startswith(b"ssh-ed25519 "):
        loaders.append(lambda: serialization.load_ssh_public_key(text))
    elif text.startswith(b"-----BEGIN") and b"PUBLIC KEY" in text.split(b"\n", 1)[0]:
        loaders.append(lambda: serialization.load_pem_public_key(text))
    elif text.startswith(b"-----BEGIN"):
        loaders.append(lambda: serialization.load_pem_private_key(text, password=None))
    for load in loaders:
        try:
            key = load()
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"cannot read the key: {exc}") from None
        if isinstance(key, Ed25519PrivateKey):
            return _ed25519(key, key.public_key())
        if isinstance(key, Ed25519PublicKey):
            return _ed25519(None, key)
        raise KeyFileError(f"unsupported key type {type(key).__name__}: use Ed25519 or an HMAC secret")
    if len(text) < 16:
        raise KeyFileError("an HMAC secret must be at least 16 bytes")
    key_id = "hmac:" + hashlib.sha256(b"chaperone-key-id\x00" + text).hexdigest()[:16]
    return ManifestKey(HMAC_ALG, key_id, secret=text)


def load_key(path: str | Path) -> ManifestKey:
    try:
        return key_from_bytes(Path(path).read_bytes())
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc}") from None


def build_manifest(meta: Mapping[str, Any], ended: Mapping[str, Any],
                   chunks: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The manifest of a finished session from the spool's meta, end marker and shipped log."""
    session = meta["session"]
    return {
        "version": MANIFEST_VERSION,
        "session": session,
        "namespace": meta.get("namespace", ""),
        "pod": meta.get("pod", ""),
        "identity": meta.get("identity", {}),
        "startTime": meta.get("startTime", ""),
        "endTime": ended.get("endTime", ""),
        "endReason": ended.get("reason", ""),
        "events": sum(int(c["events"]) for c in chunks),
        # events refused while the spool was unavailable and not yet reported by an error
        # event when the session ended (earlier losses are error events in the chain)
        "unrecordedEvents": int(ended.get("unrecorded", 0)),
        "genesis": genesis_hash(session),
        "firstHash": chunks[0]["firstHash"] if chunks else "",
        "lastHash": chunks[-1]["lastHash"] if chunks else "",
        "chunks": [{k: c[k] for k in ("key", "sha256", "bytes", "events", "firstSeq", "lastSeq",
                                      "firstHash", "lastHash")} for c in chunks],
    }


def signed_bytes(manifest: Mapping[str, Any]) -> bytes:
    return canonical_json({k: v for k, v in manifest.items() if k != "signature"})


def sign_manifest(manifest: dict[str, Any], key: ManifestKey | None) -> dict[str, Any]:
    """Add the ``signature`` field (``null`` when no key is configured: verify will fail it)."""
    manifest = {k: v for k, v in manifest.items() if k != "signature"}
    manifest["signature"] = None if key is None else {
        "alg": key.alg, "keyId": key.key_id,
        "value": base64.b64encode(key.sign(signed_bytes(manifest))).decode("ascii"),
    }
    return manifest


def manifest_file(manifest: Mapping[str, Any]) -> bytes:
    return json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False).encode() + b"\n"


def check_signature(manifest: Mapping[str, Any], key: ManifestKey) -> str | None:
    """None when the signature holds, else what is wrong with it."""
    signature = manifest.get("signature")
    if not isinstance(signature, Mapping):
        return "manifest is not signed"
    if signature.get("alg") != key.alg:
        return f"manifest signed with {signature.get('alg')}, but the key given is {key.alg}"
    if signature.get("keyId") != key.key_id:
        return f"manifest signed by key {signature.get('keyId')}, not by {key.key_id}"
    try:
        value = base64.b64decode(str(signature.get("value", "")), validate=True)
    except ValueError:
        return "signature value is not base64"
    if not key.verify(signed_bytes(manifest), value):
        return "manifest signature does not match its content"
    return None
