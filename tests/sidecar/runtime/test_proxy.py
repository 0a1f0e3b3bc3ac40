"""The pieces of the runtime that need no process: modes, trust bundle, addon order, services."""

from __future__ import annotations

import asyncio

import pytest
from cryptography import x509

from chaperone_sidecar.addons import ADDON_ORDER, build_addons
from chaperone_sidecar.config import ConnectionMount, SidecarConfig
from chaperone_sidecar.proxy import build_trust_bundle, lean_core_addons, listen_modes
from chaperone_sidecar.services import InjectorRegistry, SidecarServices, build_services
from chaperone_sidecar.snapshot import build_snapshot
from chaperone_sidecar.sources import Sources
from chaperone_testbed.pki import CertAuthority


def snapshot(*conns, mounts=()):
    return build_snapshot(conns, [], namespace="ns", mounts=mounts)


CLAUDE = {"metadata": {"name": "claude"}, "spec": {"type": "anthropic", "baseURL": "https://api.anthropic.com"}}
GW = {"metadata": {"name": "gw"}, "spec": {"type": "http", "baseURL": "http://[fd00::5]:8080/base"}}


def test_listen_modes_are_loopback_and_follow_reverse_connections():
    config = SidecarConfig(standalone=True, proxy_port=15001)
    snap = snapshot(CLAUDE, GW, mounts=[ConnectionMount("claude", "anthropic", reverse_port=15100),
                                        ConnectionMount("gw", "http", reverse_port=15101)])
    assert listen_modes(config, snap, ipv6=True) == [
        "regular@127.0.0.1:15001", "regular@::1:15001",
        "reverse:https://api.anthropic.com:443@127.0.0.1:15100",
        "reverse:http://[fd00::5]:8080@127.0.0.1:15101"]
    transparent = SidecarConfig(standalone=True, mode="transparent", proxy_port=15001)
    assert listen_modes(transparent, snapshot(), ipv6=False) == ["transparent@127.0.0.1:15001"]
    custom = SidecarConfig(standalone=True, listen_host="10.0.0.1")
    assert listen_modes(custom, snapshot(), ipv6=True) == ["regular@10.0.0.1:15001"]
    from mitmproxy.proxy.mode_specs import ProxyMode

    for spec in listen_modes(config, snap, ipv6=True):
        ProxyMode.parse(spec)  # every spec is valid for mitmproxy


def test_trust_bundle_has_public_and_upstream_cas(tmp_path):
    ca = CertAuthority("private-upstream")
    good = ca.write_cert(tmp_path / "good.crt")
    bad = tmp_path / "bad.crt"
    bad.write_text("not a certificate")
    first = build_trust_bundle(tmp_path / "work", [("internal", str(good)), ("broken", str(bad)),
                                                   ("missing", str(tmp_path / "nope"))])
    certs = x509.load_pem_x509_certificates(first.read_bytes())
    assert len(certs) > 50  # certifi / system CAs
    assert ca.cert in certs
    # Same content, same file; different content, a new file name (mitmproxy caches by path).
    assert build_trust_bundle(tmp_path / "work", [("internal", str(good))]) == first
    second = build_trust_bundle(tmp_path / "work", [])
    assert second != first and not first.exists()
    assert ca.cert not in x509.load_pem_x509_certificates(second.read_bytes())


def test_lean_core_addons():
    names = [type(a).__name__ for a in lean_core_addons()]
    assert names == ["Core", "Proxyserver", "NextLayer", "TlsConfig", "DisableH2C"]


def test_build_addons_in_the_documented_order():
    services = SidecarServices(config=SidecarConfig(standalone=True), sources=Sources("ns"))
    addons = build_addons(services)
    assert [type(a) for a in addons] == list(ADDON_ORDER)
    assert [cls.__name__ for cls in ADDON_ORDER] == ["Identify", "Route", "Enforce", "Approve", "KubeStreams",
                                                     "WidenRanges", "InjectCredentials", "Mask", "TrimRanges",
                                                     "McpTools", "ToolUse", "Record", "Telemetry"]
    assert all(a.services is services for a in addons)


def test_injector_registry_follows_the_snapshot(tmp_path):
    from chaperone_sidecar.credentials.credential_sources import CredentialsUnavailable

    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "token").write_text("s3cret")
    config = SidecarConfig(standalone=True)
    registry = InjectorRegistry(config)
    http_conn = {"metadata": {"name": "api"}, "spec": {"type": "http", "hosts": ["api.example.com"],
                                                       "credentials": {"source": "secret",
                                                                       "secretRef": {"name": "s"}}}}
    unmounted = {"metadata": {"name": "nomount"}, "spec": {"type": "http", "hosts": ["x.example.com"],
                                                            "credentials": {"source": "secret",
                                                                            "secretRef": {"name": "s"}}}}
    snap = build_snapshot([http_conn, unmounted], [], namespace="ns",
                          mounts=[ConnectionMount("api", "http", credentials_dir=str(creds))])
    registry.update(snap)
    first = registry.get("api")
    assert first.kind == "http"
    with pytest.raises(CredentialsUnavailable, match="nomount"):
        registry.get("nomount")  # a secret source without a mounted directory
    with pytest.raises(CredentialsUnavailable, match="no credentials are set up"):
        registry.get("ghost")
    registry.update(snap)
    assert registry.get("api") is first  # unchanged spec: the same injector
    http_conn["spec"]["credentials"]["prefix"] = "Token "
    registry.update(build_snapshot([http_conn], [], namespace="ns",
                                   mounts=[ConnectionMount("api", "http", credentials_dir=str(creds))]))
    assert registry.get("api") is not first
    with pytest.raises(CredentialsUnavailable):
        registry.get("nomount")  # gone with its connection


def test_build_services_standalone(tmp_path):
    config = SidecarConfig.from_files(tmp_path, env={})

    async def go():
        services = await build_services(config)
        try:
            assert services.kube is None and services.oidc is None
            assert type(services.sources).__name__ == "FileSources"
            assert type(services.grants).__name__ == "MemoryGrants"
            assert type(services.rate_limiter).__name__ == "MemoryRateLimiter"
            assert type(services.approval_backend).__name__ == "LocalApprovalStore"
            assert services.approvals is not None and services.recorder is not None
            assert services.tracer is not None and services.meter is not None
            await services.sources.start()
            assert services.snapshot().generation == 1
        finally:
            await services.aclose()
    asyncio.run(go())
