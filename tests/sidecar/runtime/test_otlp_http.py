"""otlp_http: the sidecar's OTLP/HTTP client against real HTTP(S) endpoints - the SDK exporters'
environment (per-signal before generic headers, timeout, gzip, CA certificate) and their retry
rules (429/502/503/504 and Retry-After retried, other errors not)."""

from __future__ import annotations

import datetime
import gzip
import ssl
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from chaperone_sidecar.otlp_http import OtlpHttpClient

from .otlp_endpoint import otlp_endpoint
from .otlp_endpoint import url as endpoint_url


@pytest.fixture
def endpoint():
    with otlp_endpoint() as server:
        yield server


def url(server, path="/v1/traces"):
    return endpoint_url(server, path)


def test_headers_gzip_and_path_from_the_sdk_variables(endpoint):
    env = {"OTEL_EXPORTER_OTLP_HEADERS": "authorization=generic,x-only-generic=1",
           "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "Authorization=Bearer%20t0k,x-tenant=a b",
           "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "2.5"}
    client = OtlpHttpClient("traces", url(endpoint, "/otlp/v1/traces?x=1"), env)
    assert client.timeout == 2.5
    assert client.export(b"\x0a\x00payload") and client.export(b"second")
    (path, headers, body), (_, _, second) = endpoint.seen
    headers = {k.lower(): v for k, v in headers.items()}
    assert path == "/otlp/v1/traces?x=1"
    # the per-signal variable wins as a whole, as in the SDK (the generic one is not merged in)
    assert headers["authorization"] == "Bearer t0k" and headers["x-tenant"] == "a b"
    assert "x-only-generic" not in headers
    assert headers["content-type"] == "application/x-protobuf" and headers["content-encoding"] == "gzip"
    assert gzip.decompress(body) == b"\x0a\x00payload" and gzip.decompress(second) == b"second"
    client.shutdown()


def test_transient_errors_are_retried_others_are_not(endpoint):
    client = OtlpHttpClient("metrics", url(endpoint, "/v1/metrics"), {}, jitter=0)
    endpoint.answers = [(503, {"retry-after": "0"}), (429, {"retry-after": "0"}), (200, {})]
    assert client.export(b"x")
    assert len(endpoint.seen) == 3
    endpoint.answers = [(400, {})]
    assert not client.export(b"x")
    assert len(endpoint.seen) == 4  # a 400 is final
    endpoint.answers = [(502, {"retry-after": "30"})]  # a wait beyond the timeout: given up
    started = time.monotonic()
    assert not OtlpHttpClient("metrics", url(endpoint), {"OTEL_EXPORTER_OTLP_TIMEOUT": "1"}).export(b"x")
    assert time.monotonic() - started < 1 and len(endpoint.seen) == 5


def test_a_refused_connection_fails_within_the_timeout():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = OtlpHttpClient("logs", f"http://127.0.0.1:{port}/v1/logs", {"OTEL_EXPORTER_OTLP_TIMEOUT": "1.5"},
                            jitter=0)
    started = time.monotonic()
    assert not client.export(b"x")  # retried after 1 s, then the next 2 s would pass the deadline
    assert 0.9 < time.monotonic() - started < 1.5


def _certificate(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "collector")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    return tmp_path / "cert.pem", tmp_path / "key.pem"


def test_https_verifies_against_the_configured_certificate(endpoint, tmp_path):
    cert, key = _certificate(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    endpoint.socket = context.wrap_socket(endpoint.socket, server_side=True)
    # the signal's own certificate variable, as the SDK reads it
    trusted = OtlpHttpClient("traces", url(endpoint), {"OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": str(cert)})
    assert trusted.export(b"over tls")
    assert endpoint.seen[-1][2] == b"over tls"
    # without it, certifi's bundle (as requests) does not know this CA: refused, nothing sent
    assert not OtlpHttpClient("traces", url(endpoint), {"OTEL_EXPORTER_OTLP_TIMEOUT": "0.5"}).export(b"no")
    assert len(endpoint.seen) == 1


def test_unusable_settings_leave_the_signal_unexported_not_the_proxy_down(tmp_path):
    from chaperone_sidecar.recording.ocsf_export import exporter_from_env
    from chaperone_sidecar.telemetry_setup import setup_telemetry

    with pytest.raises(ValueError):
        OtlpHttpClient("traces", "collector:4318/v1/traces", {})
    setup = setup_telemetry({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318",
                             "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "https://c:4318/v1/metrics",
                             "OTEL_EXPORTER_OTLP_CERTIFICATE": str(tmp_path / "missing.pem")},
                            install_global=False, prometheus_registry=None)
    assert not setup.tracing and not setup.metrics
    assert any(n.startswith("traces: ") and "collector:4318" in n for n in setup.notes)
    assert any(n.startswith("metrics: ") for n in setup.notes)
    sink_file = tmp_path / "o.jsonl"
    exporter = exporter_from_env({"CHAPERONE_OCSF_OTLP_ENDPOINT": "collector:4318/v1/logs",
                                  "CHAPERONE_OCSF_FILE": str(sink_file)})
    assert exporter is not None and [s.name for s in exporter.sinks] == ["file"]
    exporter.close()


def test_export_batch_fails_a_batch_its_encoder_cannot_encode_and_posts_nothing(endpoint):
    client = OtlpHttpClient("logs", url(endpoint, "/v1/logs"), {})

    def broken(batch):
        raise ValueError("an attribute OTLP cannot hold")

    assert not client.export_batch(broken, ["record"])
    assert client.export_batch(lambda batch: b"".join(batch), [b"a", b"b"])
    assert [body for _, _, body in endpoint.seen] == [b"ab"]
    client.shutdown()
    assert not client.export_batch(lambda batch: b"late", [])  # shut down: dropped
    assert len(endpoint.seen) == 1
