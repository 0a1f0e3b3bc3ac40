"""Real-looking secrets shared by the masking tests (generated keys, hand-built JWTs)."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from chaperone_sidecar.policy.masking.detectors import resolve_rules
from chaperone_sidecar.policy.masking.spans import mask_text

ALL_RULES = resolve_rules(["all"])


def mask(text: bytes, *names: str, hash_key: bytes | None = None) -> bytes:
    return mask_text(text, resolve_rules(names or ("all",)), hash_key)


@functools.lru_cache(maxsize=None)
def rsa_pem(fmt: str = "traditional", bits: int = 2048) -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    formats = {
        "traditional": serialization.PrivateFormat.TraditionalOpenSSL,
        "pkcs8": serialization.PrivateFormat.PKCS8,
        "openssh": serialization.PrivateFormat.OpenSSH,
    }
    return key.private_bytes(serialization.Encoding.PEM, formats[fmt], serialization.NoEncryption())


@functools.lru_cache(maxsize=None)
def encrypted_ec_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.BestAvailableEncryption(b"passphrase"))


def b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def make_jwt(claims: dict | None = None, header: dict | None = None, indent: int | None = None) -> bytes:
    """An HS256 JWT built by hand (no JWT library)."""
    head = b64url(json.dumps(header or {"alg": "HS256", "typ": "JWT"}, indent=indent).encode())
    body = b64url(json.dumps(claims or {"sub": "1234567890", "name": "Ada", "iat": 1516239022}).encode())
    sig = b64url(hmac.new(b"secret", head + b"." + body, hashlib.sha256).digest())
    return head + b"." + body + b"." + sig


def key_material(pem: bytes) -> list[bytes]:
    """The base64 lines of a PEM block (what must never survive masking)."""
    return [line for line in pem.splitlines() if line and not line.startswith(b"-----")]


AWS_KEY_ID = b"AKIAIOSFODNN7EXAMPLE"
AWS_SECRET = b"wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
BEARER = b"sk-ant-api03-Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5"


def planted() -> list[tuple[str, bytes, list[bytes]]]:
    """(kind, text to plant, fragments that must not survive) - one or more per detector."""
    pem = rsa_pem()
    jwt = make_jwt()
    return [
        ("aws-access-key-id", AWS_KEY_ID, [AWS_KEY_ID]),
        ("aws-secret-key", b"aws_secret_access_key = " + AWS_SECRET, [AWS_SECRET]),
        ("aws-secret-key", b'{"SecretAccessKey": "' + AWS_SECRET + b'"}', [AWS_SECRET]),
        ("private-key", pem, key_material(pem)),
        ("private-key", json.dumps({"k": pem.decode()}).encode(), key_material(pem)),
        ("jwt", jwt, [jwt.split(b".")[0], jwt.split(b".")[2]]),
        ("bearer-token", b"Authorization: Bearer " + BEARER, [BEARER]),
        ("bearer-token", b'{"access_token": "2YotnFZFEjr1zCsicMWpAA", "token_type": "Bearer"}',
         [b"2YotnFZFEjr1zCsicMWpAA"]),
        ("secret-json-key", b'{"client_secret": "s3cr3t-Value_123"}', [b"s3cr3t-Value_123"]),
        ("email", b"alice.smith@example.co.uk", [b"alice.smith"]),
        ("credit-card", b"4111 1111 1111 1111", [b"4111 1111 1111 1111"]),
        ("credit-card", b"5555-5555-5555-4444", [b"5555-5555-5555-4444"]),
        ("us-ssn", b"SSN: 536-22-1234", [b"536-22-1234"]),
    ]
