"""The demo's world: the secrets, the fake HTTPS tickets API, and the proxy's config directory.

Everything the proxy is configured with and everything the agent talks to, with no Chaperone
code involved: :class:`TicketsAPI` is the upstream (its own CA, wants the bearer token only the
proxy holds), :func:`write_config` lays out ``chaperone.yaml``, the ClaudeConnection, the
AccessPolicy, the token, the upstream CA and the manifest signing key. The steps
(:mod:`.steps`) check outcomes against the constants here.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ..api import API_VERSION

NAMESPACE = "demo"
AGENT_USER = "dana"  # whose agent this is (the proxy's identity)
APPROVER = "alice"  # who approves
TOKEN = "tickets-token-9f2c41d7e0b84a"  # held by the proxy only
AWS_KEY_ID = "AKIAZ7DEMO5EXAMPLE42"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYDEMOKEY42x"  # 40 chars, the shape of a real one
DB_PASSWORD = "correct-horse-battery-staple"


# ============================================================================ the upstream

def _issue_ca_and_leaf(directory: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for localhost/127.0.0.1 (ca.crt, cert, key)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Tickets API demo CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    ca_file, cert_file, key_file = directory / "ca.crt", directory / "server.crt", directory / "server.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.touch(mode=0o600)
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return ca_file, cert_file, key_file


class TicketsAPI:
    """The fake upstream: a JSON tickets service over HTTPS that insists on the real token."""

    def __init__(self, directory: Path):
        self.ca_file, cert, key = _issue_ca_and_leaf(directory)
        self.seen: list[dict[str, Any]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _send(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                api.seen.append({"method": self.command, "path": self.path,
                                 "authorization": self.headers.get("Authorization", ""),
                                 "body": body.decode(errors="replace")})
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self._send(401, {"error": "unauthorized", "message": "a valid bearer token is required"})
                    return
                route = (self.command, self.path)
                if route == ("GET", "/tickets/42"):
                    self._send(200, {"id": 42, "title": "Checkout returns 500 for EU customers",
                                     "status": "open", "customer": "ACME GmbH", "amount_eur": 129})
                elif route == ("DELETE", "/tickets/42"):
                    self._send(204, {})
                elif route == ("GET", "/deployments/billing/config"):
                    self._send(200, {"service": "billing", "region": "eu-central-1",
                                     "aws_access_key_id": AWS_KEY_ID,
                                     "aws_secret_access_key": AWS_SECRET,
                                     "database": {"host": "billing-db.internal", "user": "billing",
                                                  "password": DB_PASSWORD}})
                elif route == ("POST", "/tickets/42/refund"):
                    self._send(200, {"ticket": 42, "refunded": True, "amount_eur": 129})
                else:
                    self._send(404, {"error": "not found", "path": self.path})

            do_GET = do_POST = do_DELETE = do_PUT = _handle

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def requests_to(self, method: str, path: str) -> list[dict[str, Any]]:
        return [s for s in self.seen if s["method"] == method and s["path"] == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ============================================================================ the config dir

def write_config(conf: Path, api: TicketsAPI) -> None:
    """chaperone.yaml, the connection, the policy, the token, the upstream CA, the signing key."""
    import yaml
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    for sub in ("connections", "policies", "credentials/tickets-api", "upstream-ca/tickets-api"):
        (conf / sub).mkdir(parents=True, exist_ok=True)
    (conf / "chaperone.yaml").write_text(yaml.safe_dump(
        {"namespace": NAMESPACE, "user": AGENT_USER, "approvalMode": "hold"}, sort_keys=False))
    (conf / "connections" / "tickets-api.yaml").write_text(yaml.safe_dump({
        "apiVersion": API_VERSION, "kind": "ClaudeConnection", "metadata": {"name": "tickets-api"},
        "spec": {"type": "http", "hosts": ["localhost"],
                 "credentials": {"source": "secret", "secretRef": {"name": "tickets-token", "tokenKey": "token"},
                                 "header": "Authorization", "prefix": "Bearer "},
                 "upstreamCA": {"kind": "Secret", "name": "tickets-ca", "key": "ca.crt"},
                 "recording": {"bodies": "truncated", "mode": "strict"}}}, sort_keys=False))
    (conf / "policies" / "tickets.yaml").write_text(yaml.safe_dump({
        "apiVersion": API_VERSION, "kind": "AccessPolicy", "metadata": {"name": "tickets-guardrails"},
        "spec": {
            "connections": ["tickets-api"],
            "defaultEffect": "block",
            "masking": {"detectors": ["aws-access-key-id", "aws-secret-key", "secret-json-key"]},
            "rules": [
                {"name": "reads", "match": {"methods": ["GET"]}, "allow": {}},
                {"name": "no-deletes", "match": {"methods": ["DELETE"]},
                 "block": {"message": "Agents may not delete tickets; ask the support lead to close it."}},
                {"name": "refunds-need-approval", "match": {"methods": ["POST"], "paths": ["/tickets/*/refund"]},
                 "requireApproval": {"approvers": {"users": [APPROVER]}, "minApprovals": 1,
                                     "mode": "hold", "holdSeconds": 40, "timeoutSeconds": 120,
                                     "grant": {"scope": "exact", "ttlSeconds": 300}}},
            ]}}, sort_keys=False))
    token_file = conf / "credentials" / "tickets-api" / "token"
    token_file.touch(mode=0o600)
    token_file.write_text(TOKEN)
    shutil.copyfile(api.ca_file, conf / "upstream-ca" / "tickets-api" / "ca.crt")
    # The manifest signing key (Ed25519): the proxy signs with the private key; verifying
    # needs only the public key.
    private = Ed25519PrivateKey.generate()
    key_file = conf / "manifest.key"
    key_file.touch(mode=0o600)
    key_file.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    (conf / "manifest.pub").write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
