"""Throwaway PKI for the test bed: a CA, server and client certificates, a signing key pair.

Why: the control plane must authenticate users the way a real cluster does (client certificates
whose CN is the user name and whose O fields are the groups), serve TLS that clients verify
against a CA, and sign service-account tokens. Generating all of that with `cryptography` keeps
the test bed free of `openssl`/`cfssl` binaries. The same CA helper is meant to be reused for
webhook serving certificates.

ECDSA P-256 keys are used throughout: key generation is instant (RSA-2048 costs ~100 ms a key,
which adds up across many client certs) and kube-apiserver, kubectl, etcd, Python's ssl module
and ES256 service-account tokens all accept them.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertAuthority", "KeyPair", "CertPair", "generate_key", "key_pem", "public_key_pem"]

# Certificates live as long as a test session could plausibly last, plus slack for clock skew.
_VALIDITY = _dt.timedelta(days=7)
_SKEW = _dt.timedelta(minutes=5)


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # PKCS#8 is the one format every consumer here (Go crypto/tls, Python ssl) reads.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass(frozen=True)
class KeyPair:
    """A private/public key pair on disk (e.g. the service-account token signing key)."""

    private_key_path: Path
    public_key_path: Path

    @classmethod
    def write(cls, directory: Path, name: str) -> KeyPair:
        key = generate_key()
        priv, pub = directory / f"{name}.key", directory / f"{name}.pub"
        _write_private(priv, key_pem(key))
        pub.write_bytes(public_key_pem(key))
        return cls(priv, pub)


@dataclass(frozen=True)
class CertPair:
    """A certificate and its private key, both as PEM bytes and as files on disk."""

    cert_path: Path
    key_path: Path
    cert_pem: bytes
    key_pem: bytes


class CertAuthority:
    """A self-signed CA that issues server and client certificates."""

    def __init__(self, common_name: str = "chaperone-testbed-ca") -> None:
        self._key = generate_key()
        now = _now()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW)
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write_cert(self, path: Path) -> Path:
        path.write_bytes(self.cert_pem)
        return path

    def issue(
        self,
        common_name: str,
        *,
        organizations: Sequence[str] = (),
        dns_names: Iterable[str] = (),
        ip_addresses: Iterable[str] = (),
        server: bool = False,
        client: bool = False,
    ) -> tuple[bytes, bytes]:
        """Issue a leaf certificate; returns (cert_pem, key_pem).

        For client certificates kube-apiserver maps CN to the user name and each O to a group.
        """
        if not (server or client):
            raise ValueError("a certificate must be for server and/or client use")
        key = generate_key()
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        attrs += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in organizations]
        now = _now()
        usages = []
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW)
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_encipherment=False, key_cert_sign=False,
                    crl_sign=False, content_commitment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)

    def write_server_cert(
        self,
        directory: Path,
        name: str,
        *,
        dns_names: Iterable[str] = ("localhost",),
        ip_addresses: Iterable[str] = ("127.0.0.1",),
    ) -> CertPair:
        cert, key = self.issue(
            name, dns_names=dns_names, ip_addresses=ip_addresses, server=True
        )
        return _write_pair(directory, name, cert, key)

    def write_client_cert(
        self, directory: Path, name: str, *, user: str, groups: Sequence[str] = ()
    ) -> CertPair:
        cert, key = self.issue(user, organizations=groups, client=True)
        return _write_pair(directory, name, cert, key)


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _write_private(path: Path, data: bytes) -> None:
    # Private keys are created owner-only from the start rather than chmod-ed afterwards.
    path.touch(mode=0o600, exist_ok=True)
    path.write_bytes(data)


def _write_pair(directory: Path, name: str, cert: bytes, key: bytes) -> CertPair:
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert)
    _write_private(key_path, key)
    return CertPair(cert_path, key_path, cert, key)
