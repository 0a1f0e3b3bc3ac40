"""The per-namespace interception CA: the certificate authority sidecars use to terminate agents'
TLS, and the trust bundle agents verify it with.

Why per namespace: a pod can only mount Secrets and ConfigMaps of its own namespace, and a CA key
that leaks from one namespace must not let anyone impersonate servers to agents in another.

Objects (names from InjectionSettings; defaults below):
* Secret `chaperone-ca` (type kubernetes.io/tls), mounted into sidecars only, as mitmproxy's
  `confdir`: `tls.crt`, `tls.key`, `mitmproxy-ca.pem` (key + certificate, the file mitmproxy
  loads) and `mitmproxy-dhparam.pem` (mitmproxy would otherwise try to *write* it on start, and
  the mount is read-only).
* ConfigMap `chaperone-ca-bundle` with `ca.crt`, mounted into agent containers.

Rotation: when the current CA is within `renew_before` of expiry, a new CA replaces it in the
Secret, and the trust bundle keeps every previous CA until that CA itself expires. Sidecars
started before the rotation keep signing with the old key, and agents that loaded the bundle
before it keep trusting the old CA; both keep working as long as the pod lives less than
`renew_before` past the rotation (30 days by default). The current CA comes first in the bundle.

Pure helpers (`new_ca`, `needs_rotation`, `trust_bundle`, `ca_secret`,
`trust_bundle_configmap`) take the time as an argument; `ensure_namespace_ca` does the reads and
writes with the official kubernetes client and no kopf, so any handler can call it.
"""

from __future__ import annotations

import base64
import datetime as dt
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

__all__ = [
    "CAError", "CAResult", "DEFAULT_RENEW_BEFORE", "DEFAULT_VALIDITY", "MITMPROXY_CA_KEY",
    "MITMPROXY_DHPARAM_KEY", "TRUST_BUNDLE_KEY", "ca_secret", "certificate_pems",
    "ensure_namespace_ca", "needs_rotation", "new_ca", "trust_bundle", "trust_bundle_configmap",
]

DEFAULT_SECRET_NAME = "chaperone-ca"
DEFAULT_BUNDLE_NAME = "chaperone-ca-bundle"
DEFAULT_VALIDITY = dt.timedelta(days=365)
DEFAULT_RENEW_BEFORE = dt.timedelta(days=30)
CLOCK_SKEW = dt.timedelta(hours=1)   # notBefore is backdated by this much
KEY_SIZE = 2048   # RSA: mitmproxy signs leaf certificates with (and serves) the CA key itself

MITMPROXY_CA_KEY = "mitmproxy-ca.pem"
MITMPROXY_DHPARAM_KEY = "mitmproxy-dhparam.pem"
TRUST_BUNDLE_KEY = "ca.crt"
LABELS = {"app.kubernetes.io/managed-by": "chaperone",
          "app.kubernetes.io/component": "interception-ca"}


class CAError(RuntimeError):
    """The CA objects exist in a shape the operator must not overwrite."""


# --------------------------------------------------------------------------- pure helpers
def new_ca(common_name: str, now: dt.datetime,
           validity: dt.timedelta = DEFAULT_VALIDITY) -> tuple[bytes, bytes]:
    """A fresh self-signed CA: (certificate PEM, PKCS#8 private key PEM)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_SIZE)
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Chaperone"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
    ])
    now = _utc(now)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + validity)
        # pathlen 0: it signs leaf certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def needs_rotation(cert_pem: bytes, now: dt.datetime,
                   renew_before: dt.timedelta = DEFAULT_RENEW_BEFORE) -> bool:
    """True when the certificate is unreadable or expires within `renew_before` of `now`."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return True
    return _utc(now) >= cert.not_valid_after_utc - renew_before


def certificate_pems(bundle_pem: bytes) -> list[bytes]:
    """Each certificate of a PEM bundle, re-encoded (unparseable input yields [])."""
    try:
        certs = x509.load_pem_x509_certificates(bundle_pem)
    except ValueError:
        return []
    return [c.public_bytes(serialization.Encoding.PEM) for c in certs]


def trust_bundle(current_cert_pem: bytes, previous: list[bytes], now: dt.datetime) -> bytes:
    """The current CA first, then previous CAs that are still valid at `now` (newest first),
    each certificate once."""
    now = _utc(now)
    current = x509.load_pem_x509_certificate(current_cert_pem)
    seen = {current.fingerprint(hashes.SHA256())}
    keep: list[x509.Certificate] = []
    for pem in previous:
        for cert in _load_all(pem):
            fp = cert.fingerprint(hashes.SHA256())
            if fp not in seen and cert.not_valid_after_utc > now:
                seen.add(fp)
                keep.append(cert)
    keep.sort(key=lambda c: (c.not_valid_after_utc, c.fingerprint(hashes.SHA256())),
              reverse=True)
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [current, *keep])


def ca_secret(namespace: str, name: str, cert_pem: bytes, key_pem: bytes) -> dict[str, Any]:
    """The Secret the sidecar mounts as mitmproxy's confdir."""
    from mitmproxy.certs import DEFAULT_DHPARAM  # what mitmproxy itself writes; lazy: heavy

    data = {
        "tls.crt": cert_pem,
        "tls.key": key_pem,
        MITMPROXY_CA_KEY: key_pem + cert_pem,   # mitmproxy: key first, then the certificate
        MITMPROXY_DHPARAM_KEY: DEFAULT_DHPARAM,
    }
    return {
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(LABELS)},
        "data": {k: base64.b64encode(v).decode() for k, v in sorted(data.items())},
    }


def trust_bundle_configmap(namespace: str, name: str, bundle_pem: bytes) -> dict[str, Any]:
    """The ConfigMap agents mount; `ca.crt` holds only interception CAs (docs/injection.md)."""
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(LABELS)},
        "data": {TRUST_BUNDLE_KEY: bundle_pem.decode()},
    }


def _utc(now: dt.datetime) -> dt.datetime:
    if now.tzinfo is None:
        raise ValueError("`now` must be timezone-aware (UTC)")
    return now.astimezone(dt.UTC)


def _load_all(pem: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        return []


def _valid_pair(cert_pem: bytes, key_pem: bytes) -> bool:
    """The key parses and belongs to the certificate, which is a CA."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (ValueError, TypeError, x509.ExtensionNotFound):
        return False
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    return constraints.ca and (
        key.public_key().public_bytes(serialization.Encoding.PEM, pub)
        == cert.public_key().public_bytes(serialization.Encoding.PEM, pub))


# --------------------------------------------------------------------------- API I/O
@dataclass(frozen=True)
class CAResult:
    """What `ensure_namespace_ca` found or did."""

    namespace: str
    created: bool           # there was no usable CA; a new one was written
    rotated: bool           # a CA near expiry was replaced (the old one stays in the bundle)
    secret_updated: bool    # the Secret was written (created, rotated or repaired)
    bundle_updated: bool    # the ConfigMap was written
    not_after: dt.datetime  # expiry of the current CA
    fingerprint: str        # SHA-256 of the current CA certificate, hex


def ensure_namespace_ca(api: Any, namespace: str, now: dt.datetime, *,
                        secret_name: str = DEFAULT_SECRET_NAME,
                        bundle_name: str = DEFAULT_BUNDLE_NAME,
                        validity: dt.timedelta = DEFAULT_VALIDITY,
                        renew_before: dt.timedelta = DEFAULT_RENEW_BEFORE,
                        attempts: int = 5) -> CAResult:
    """Make sure `namespace` has a valid CA Secret and an up-to-date trust bundle ConfigMap.

    `api`: a kubernetes.client.CoreV1Api (or an ApiClient, wrapped). Idempotent: a second call
    with nothing to do writes nothing. Writes use resourceVersion preconditions; a conflict
    (another operator replica, a concurrent handler) re-reads and retries.
    """
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core = api if hasattr(api, "read_namespaced_secret") else client.CoreV1Api(api)
    last_error: Exception | None = None
    for _ in range(attempts):
        try:
            return _ensure_once(core, namespace, _utc(now), secret_name, bundle_name,
                                validity, renew_before)
        except ApiException as exc:
            if exc.status != 409:  # 409: AlreadyExists or a stale resourceVersion
                raise
            last_error = exc
    raise CAError(f"{namespace}: CA objects kept changing under us ({attempts} conflicts): "
                  f"{last_error}")


def _read(read: Any, name: str, namespace: str) -> Any:
    from kubernetes.client.exceptions import ApiException

    try:
        return read(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _ensure_once(core: Any, namespace: str, now: dt.datetime, secret_name: str,
                 bundle_name: str, validity: dt.timedelta,
                 renew_before: dt.timedelta) -> CAResult:
    secret = _read(core.read_namespaced_secret, secret_name, namespace)
    data = {k: base64.b64decode(v) for k, v in ((secret.data or {}) if secret else {}).items()}
    if secret is not None and secret.type != "kubernetes.io/tls":
        # Secret type is immutable; never delete an object that may not be ours.
        raise CAError(f"Secret {namespace}/{secret_name} exists with type {secret.type!r}; "
                      "the interception CA needs a kubernetes.io/tls Secret of that name")
    cert_pem, key_pem = data.get("tls.crt", b""), data.get("tls.key", b"")
    usable = secret is not None and _valid_pair(cert_pem, key_pem)
    rotated = usable and needs_rotation(cert_pem, now, renew_before)
    previous: list[bytes] = [cert_pem] if rotated else []
    if not usable or rotated:
        cert_pem, key_pem = new_ca(f"Chaperone interception CA {namespace}", now, validity)
    # The trust bundle is written first: agents must trust a new CA before any sidecar can
    # sign with it. If the Secret write then fails, the next call rotates again and the unused
    # CA simply ages out of the bundle.
    cm = _read(core.read_namespaced_config_map, bundle_name, namespace)
    old_bundle = ((cm.data or {}).get(TRUST_BUNDLE_KEY, "") if cm else "").encode()
    bundle = trust_bundle(cert_pem, [old_bundle, *previous], now)
    bundle_updated = False
    if cm is None:
        core.create_namespaced_config_map(namespace,
                                          trust_bundle_configmap(namespace, bundle_name, bundle))
        bundle_updated = True
    elif bundle != old_bundle:
        body = trust_bundle_configmap(namespace, bundle_name, bundle)
        body["metadata"]["resourceVersion"] = cm.metadata.resource_version
        body["metadata"]["labels"] = {**(cm.metadata.labels or {}), **LABELS}
        body["data"] = {**(cm.data or {}), **body["data"]}
        core.replace_namespaced_config_map(bundle_name, namespace, body)
        bundle_updated = True

    desired = ca_secret(namespace, secret_name, cert_pem, key_pem)
    secret_updated = False
    if secret is None:
        core.create_namespaced_secret(namespace, desired)
        secret_updated = True
    elif data != {k: base64.b64decode(v) for k, v in desired["data"].items()}:
        # Also repairs a Secret missing the mitmproxy files (e.g. written by hand).
        desired["metadata"]["resourceVersion"] = secret.metadata.resource_version
        desired["metadata"]["labels"] = {**(secret.metadata.labels or {}), **LABELS}
        core.replace_namespaced_secret(secret_name, namespace, desired)
        secret_updated = True

    cert = x509.load_pem_x509_certificate(cert_pem)
    return CAResult(namespace=namespace, created=not usable, rotated=rotated,
                    secret_updated=secret_updated, bundle_updated=bundle_updated,
                    not_after=cert.not_valid_after_utc,
                    fingerprint=cert.fingerprint(hashes.SHA256()).hex())
