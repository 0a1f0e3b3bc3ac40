"""The per-namespace interception CA: pure helpers, mitmproxy compatibility, and
`ensure_namespace_ca` against the real apiserver (create, idempotence, rotation with overlap)."""

from __future__ import annotations

import base64
import datetime as dt
import stat
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from chaperone_operator import ca

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone.utc)
DAY = dt.timedelta(days=1)


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _fp(pem: bytes) -> bytes:
    return _cert(pem).fingerprint(hashes.SHA256())


# --------------------------------------------------------------------------- pure helpers
def test_new_ca_is_a_ca():
    cert_pem, key_pem = ca.new_ca("Chaperone interception CA test", NOW, 10 * DAY)
    cert = _cert(cert_pem)
    assert cert.not_valid_after_utc == NOW + 10 * DAY
    assert cert.not_valid_before_utc == NOW - ca.CLOCK_SKEW
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    assert cert.subject == cert.issuer
    assert b"PRIVATE KEY" in key_pem and ca._valid_pair(cert_pem, key_pem)
    with pytest.raises(ValueError, match="timezone"):
        ca.new_ca("x", NOW.replace(tzinfo=None))


def test_needs_rotation():
    cert_pem, _ = ca.new_ca("t", NOW, 100 * DAY)
    assert not ca.needs_rotation(cert_pem, NOW, 30 * DAY)
    assert not ca.needs_rotation(cert_pem, NOW + 69 * DAY, 30 * DAY)
    assert ca.needs_rotation(cert_pem, NOW + 70 * DAY, 30 * DAY)
    assert ca.needs_rotation(cert_pem, NOW + 200 * DAY, 30 * DAY)
    assert ca.needs_rotation(b"garbage", NOW)


def test_trust_bundle_keeps_unexpired_previous_cas():
    old, _ = ca.new_ca("old", NOW - 100 * DAY, 120 * DAY)       # expires NOW + 20d
    older, _ = ca.new_ca("older", NOW - 200 * DAY, 150 * DAY)   # expired NOW - 50d
    cur, _ = ca.new_ca("current", NOW, 365 * DAY)
    bundle = ca.trust_bundle(cur, [old + older, old, b"not pem"], NOW)
    assert [_fp(p) for p in ca.certificate_pems(bundle)] == [_fp(cur), _fp(old)]
    # Once the old CA expires it leaves the bundle.
    later = ca.trust_bundle(cur, [bundle], NOW + 21 * DAY)
    assert [_fp(p) for p in ca.certificate_pems(later)] == [_fp(cur)]


def test_kubernetes_objects():
    cert_pem, key_pem = ca.new_ca("t", NOW)
    secret = ca.ca_secret("agents", "chaperone-ca", cert_pem, key_pem)
    assert secret["type"] == "kubernetes.io/tls"
    data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    assert set(data) == {"tls.crt", "tls.key", "mitmproxy-ca.pem", "mitmproxy-dhparam.pem"}
    assert data["mitmproxy-ca.pem"] == key_pem + cert_pem
    assert b"BEGIN DH PARAMETERS" in data["mitmproxy-dhparam.pem"]
    cm = ca.trust_bundle_configmap("agents", "chaperone-ca-bundle", cert_pem)
    assert cm["data"] == {"ca.crt": cert_pem.decode()}
    assert cm["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "chaperone"


def test_mitmproxy_loads_the_secret_from_a_read_only_directory(tmp_path):
    """Exactly what the sidecar does with the mounted Secret: confdir = the mount."""
    from mitmproxy.certs import CertStore

    cert_pem, key_pem = ca.new_ca("Chaperone interception CA agents",
                                  dt.datetime.now(dt.timezone.utc))
    secret = ca.ca_secret("agents", "chaperone-ca", cert_pem, key_pem)
    confdir = tmp_path / "ca"
    confdir.mkdir()
    for key, value in secret["data"].items():
        (confdir / key).write_bytes(base64.b64decode(value))
    before = sorted(p.name for p in confdir.iterdir())
    confdir.chmod(stat.S_IRUSR | stat.S_IXUSR)  # like a read-only Secret volume
    try:
        store = CertStore.from_store(confdir, "mitmproxy", 2048)
        assert store.default_ca.to_pem() == cert_pem
        entry = store.get_cert("api.example.com", [x509.DNSName("api.example.com")])
        leaf = x509.load_pem_x509_certificate(entry.cert.to_pem())
        leaf.verify_directly_issued_by(_cert(cert_pem))
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "api.example.com" in san.get_values_for_type(x509.DNSName)
    finally:
        confdir.chmod(stat.S_IRWXU)
    # mitmproxy wrote nothing (this holds even when root ignores the mode bits).
    assert sorted(p.name for p in confdir.iterdir()) == before


# --------------------------------------------------------------------------- real apiserver
@pytest.fixture
def core(control_plane):
    from kubernetes import client

    return client.CoreV1Api(control_plane.api_client())


@pytest.fixture
def namespace(control_plane):
    name = f"ca-{uuid.uuid4().hex[:8]}"
    control_plane.create_namespace(name)
    return name


def _objects(core, ns):
    secret = core.read_namespaced_secret("chaperone-ca", ns)
    cm = core.read_namespaced_config_map("chaperone-ca-bundle", ns)
    data = {k: base64.b64decode(v) for k, v in secret.data.items()}
    return secret, cm, data


@pytest.mark.controlplane
def test_ensure_creates_then_is_idempotent(core, namespace):
    first = ca.ensure_namespace_ca(core, namespace, NOW)
    assert first.created and first.secret_updated and first.bundle_updated and not first.rotated
    secret, cm, data = _objects(core, namespace)
    assert secret.type == "kubernetes.io/tls"
    assert secret.metadata.labels["app.kubernetes.io/component"] == "interception-ca"
    assert ca.certificate_pems(cm.data["ca.crt"].encode()) == [data["tls.crt"]]
    assert data["mitmproxy-ca.pem"] == data["tls.key"] + data["tls.crt"]
    assert first.fingerprint == _fp(data["tls.crt"]).hex()

    second = ca.ensure_namespace_ca(core, namespace, NOW + DAY)
    assert not (second.created or second.rotated or second.secret_updated
                or second.bundle_updated)
    secret2, cm2, _ = _objects(core, namespace)
    assert secret2.metadata.resource_version == secret.metadata.resource_version
    assert cm2.metadata.resource_version == cm.metadata.resource_version


@pytest.mark.controlplane
def test_rotation_keeps_the_previous_ca_in_the_bundle(core, namespace):
    validity, renew = 90 * DAY, 30 * DAY
    ca.ensure_namespace_ca(core, namespace, NOW, validity=validity, renew_before=renew)
    _, _, old = _objects(core, namespace)

    near_expiry = NOW + 61 * DAY  # inside the renew window
    result = ca.ensure_namespace_ca(core, namespace, near_expiry, validity=validity,
                                    renew_before=renew)
    assert result.rotated and not result.created and result.secret_updated
    _, cm, new = _objects(core, namespace)
    assert new["tls.crt"] != old["tls.crt"] and new["tls.key"] != old["tls.key"]
    bundle = ca.certificate_pems(cm.data["ca.crt"].encode())
    assert [_fp(p) for p in bundle] == [_fp(new["tls.crt"]), _fp(old["tls.crt"])]

    # Stable within the overlap, then the old CA leaves the bundle once it expired.
    assert not ca.ensure_namespace_ca(core, namespace, near_expiry + DAY, validity=validity,
                                      renew_before=renew).bundle_updated
    after = ca.ensure_namespace_ca(core, namespace, NOW + 91 * DAY, validity=validity,
                                   renew_before=renew)
    assert after.bundle_updated and not after.rotated
    _, cm, _ = _objects(core, namespace)
    assert ca.certificate_pems(cm.data["ca.crt"].encode()) == [new["tls.crt"]]


@pytest.mark.controlplane
def test_broken_secret_is_replaced_and_foreign_type_refused(core, namespace, control_plane):
    from kubernetes import client

    cert_pem, _ = ca.new_ca("t", NOW)
    other_cert, other_key = ca.new_ca("other", NOW)
    # A tls Secret whose key does not match its certificate: unusable, replaced.
    core.create_namespaced_secret(namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name="chaperone-ca"), type="kubernetes.io/tls",
        data={"tls.crt": base64.b64encode(cert_pem).decode(),
              "tls.key": base64.b64encode(other_key).decode()}))
    result = ca.ensure_namespace_ca(core, namespace, NOW)
    assert result.created and result.secret_updated
    _, _, data = _objects(core, namespace)
    assert ca._valid_pair(data["tls.crt"], data["tls.key"])

    other_ns = f"{namespace}-x"
    control_plane.create_namespace(other_ns)
    core.create_namespaced_secret(other_ns, client.V1Secret(
        metadata=client.V1ObjectMeta(name="chaperone-ca"), type="Opaque", data={}))
    with pytest.raises(ca.CAError, match="kubernetes.io/tls"):
        ca.ensure_namespace_ca(core, other_ns, NOW)


@pytest.mark.controlplane
def test_ensure_accepts_an_api_client_and_custom_names(control_plane, namespace):
    from kubernetes import client

    result = ca.ensure_namespace_ca(control_plane.api_client(), namespace, NOW,
                                    secret_name="interception-ca",
                                    bundle_name="interception-ca-bundle")
    assert result.created
    core = client.CoreV1Api(control_plane.api_client())
    assert core.read_namespaced_secret("interception-ca", namespace).type == "kubernetes.io/tls"
    assert "ca.crt" in core.read_namespaced_config_map("interception-ca-bundle", namespace).data
