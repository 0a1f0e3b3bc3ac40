"""The README demo: ``chaperone proxy`` (standalone) and a scripted agent session.

Run ``python -m chaperone_sidecar.demo`` (``make demo``). Everything happens on this machine,
in a temporary config directory (``--keep`` leaves it, ``--config-dir`` picks it):

0. A small HTTPS "tickets API" starts on loopback with a certificate from its own CA (the
   connection trusts it as ``upstreamCA``). It wants ``Authorization: Bearer <token>``, a token
   only the proxy holds (``credentials/tickets-api/token``). ``chaperone proxy`` starts with one
   ClaudeConnection and one AccessPolicy from YAML, generates its interception CA on first run,
   records to ``recordings/`` and keeps approvals in ``approvals/``.
1. **allowed** - ``GET /tickets/42``: forwarded with the injected token, 200.
2. **blocked** - ``DELETE /tickets/42``: the policy's JSON refusal (403); never forwarded.
3. **masked** - ``GET /deployments/billing/config``: the upstream returns an AWS key pair and a
   database password; the agent (and the recording) get them masked.
4. **approval** - ``POST /tickets/42/refund`` is held; ``chaperone approvals`` lists it,
   ``chaperone approve NAME`` (a subprocess, as a human would run it) releases it: 200.
5. The proxy stops (the session is closed and signed); ``chaperone sessions replay`` prints the
   recorded session and ``chaperone sessions verify`` checks chain and signature.

The agent is a real HTTP client (``urllib`` through ``HTTPS_PROXY``-style proxying, trusting
only the proxy's CA). Every step checks its outcome; any failure prints why and exits 1.
The whole run is bounded (``--timeout``, default 55 s).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = ["main", "run_demo"]

API = "chaperone.dev/v1alpha1"
NAMESPACE = "demo"
AGENT_USER = "dana"  # whose agent this is (the proxy's identity)
APPROVER = "alice"  # who approves
TOKEN = "tickets-token-9f2c41d7e0b84a"  # held by the proxy only
AWS_KEY_ID = "AKIAZ7DEMO5EXAMPLE42"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYDEMOKEY42x"  # 40 chars, the shape of a real one
DB_PASSWORD = "correct-horse-battery-staple"
PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the directory holding chaperone_sidecar

COMMANDS = {  # subcommand -> module whose main() has it (when entry points are not installed)
    "proxy": "chaperone_sidecar.sidecar_cli",
    "approve": "chaperone_sidecar.standalone_cli",
    "deny": "chaperone_sidecar.standalone_cli",
    "approvals": "chaperone_sidecar.standalone_cli",
    "sessions": "chaperone_sidecar.recording.sessions_cli",
}


class DemoFailure(Exception):
    """A step did not do what it should; the message says what happened instead."""


# ============================================================================ output

def header(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(3, 74 - len(text)), flush=True)


def say(text: str = "") -> None:
    print(text, flush=True)


def indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.rstrip("\n").splitlines())


# ============================================================================ the upstream

def _issue_ca_and_leaf(directory: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for localhost/127.0.0.1 (ca.crt, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    import ipaddress

    now = dt.datetime.now(dt.timezone.utc)
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
        "apiVersion": API, "kind": "ClaudeConnection", "metadata": {"name": "tickets-api"},
        "spec": {"type": "http", "hosts": ["localhost"],
                 "credentials": {"source": "secret", "secretRef": {"name": "tickets-token", "tokenKey": "token"},
                                 "header": "Authorization", "prefix": "Bearer "},
                 "upstreamCA": {"kind": "Secret", "name": "tickets-ca", "key": "ca.crt"},
                 "recording": {"bodies": "truncated", "mode": "strict"}}}, sort_keys=False))
    (conf / "policies" / "tickets.yaml").write_text(yaml.safe_dump({
        "apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "tickets-guardrails"},
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


# ============================================================================ processes

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    paths = [str(PACKAGE_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _entry_points_installed() -> bool:
    try:
        from importlib.metadata import entry_points

        names = {e.name for e in entry_points(group="chaperone.commands")}
        registered = set()
        for entry in entry_points(group="chaperone.commands"):
            registered.add(entry.value.split(":")[0])
        return {"proxy", "sessions"} <= names and "chaperone_sidecar.standalone_cli" in registered
    except Exception:
        return False


def chaperone(*args: str) -> list[str]:
    """argv of ``chaperone ARGS``: the installed CLI when it has every command, else the module."""
    if _entry_points_installed():
        return [sys.executable, "-m", "chaperone_sidecar.cli", *args]
    return [sys.executable, "-m", COMMANDS[args[0]], *args]


def run_cli(*args: str, show: bool = True, check: bool = True, timeout: float = 30) -> str:
    if show:
        say(f"$ chaperone {' '.join(args)}")
    out = subprocess.run(chaperone(*args), env=child_env(), capture_output=True, text=True,
                         timeout=timeout)
    text = out.stdout + (out.stderr if out.returncode else "")
    if show and text.strip():
        say(indent(text))
    if check and out.returncode != 0:
        raise DemoFailure(f"`chaperone {' '.join(args)}` exited with {out.returncode}: {out.stderr.strip()}")
    return out.stdout


class Proxy:
    """``chaperone proxy`` as a child process."""

    def __init__(self, conf: Path):
        self.conf = conf
        self.port, self.health_port = _free_port(), _free_port()
        self.log = conf / "proxy.log"
        self.args = ["proxy", "--config-dir", str(conf), "--port", str(self.port),
                     "--health-port", str(self.health_port)]
        say(f"$ chaperone {' '.join(self.args)}")
        self.proc = subprocess.Popen(chaperone(*self.args), env=child_env(),
                                     stdout=subprocess.DEVNULL, stderr=self.log.open("wb"))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ca_cert(self) -> Path:
        return self.conf / "ca" / "mitmproxy-ca-cert.pem"

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DemoFailure(f"chaperone proxy exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise DemoFailure("chaperone proxy did not become ready in time")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# ============================================================================ the agent

class Agent:
    """A real HTTP client going through the proxy and trusting only the proxy's CA."""

    def __init__(self, proxy: Proxy):
        context = ssl.create_default_context(cafile=str(proxy.ca_cert))
        self.opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({"https": proxy.url, "http": proxy.url}),
            urllib.request.HTTPSHandler(context=context))

    def call(self, method: str, url: str, body: Any = None, timeout: float = 50) -> tuple[int, Any, dict]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method,
                                         headers={"Content-Type": "application/json",
                                                  "User-Agent": "demo-agent/1.0"})
        try:
            with self.opener.open(request, timeout=timeout) as resp:
                status, raw, headers = resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            status, raw, headers = exc.code, exc.read(), dict(exc.headers)
        try:
            parsed: Any = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode(errors="replace")
        return status, parsed, headers


def show_response(status: int, body: Any) -> None:
    text = json.dumps(body, indent=2) if not isinstance(body, str) else body
    say(f"  <- HTTP {status}")
    say(indent(text, "     "))


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise DemoFailure(message)


# ============================================================================ the steps

def step_allowed(agent: Agent, api: TicketsAPI, base: str) -> None:
    header("1. Allowed call: GET /tickets/42")
    say(f"  -> GET {base}/tickets/42   (the agent sends no credentials)")
    status, body, _ = agent.call("GET", f"{base}/tickets/42")
    show_response(status, body)
    expect(status == 200 and isinstance(body, dict) and body.get("id") == 42,
           f"expected 200 with ticket 42, got {status}: {body}")
    seen = api.requests_to("GET", "/tickets/42")
    expect(bool(seen) and seen[-1]["authorization"] == f"Bearer {TOKEN}",
           "the upstream did not receive the injected bearer token")
    say(f"  ok: allowed by rule 'reads'; the upstream saw 'Authorization: Bearer {TOKEN[:8]}...'"
        " injected by the proxy")


def step_blocked(agent: Agent, api: TicketsAPI, base: str) -> None:
    header("2. Blocked call: DELETE /tickets/42")
    say(f"  -> DELETE {base}/tickets/42")
    status, body, headers = agent.call("DELETE", f"{base}/tickets/42")
    show_response(status, body)
    expect(status == 403 and isinstance(body, dict) and body.get("error") == "chaperone_blocked",
           f"expected a 403 chaperone_blocked refusal, got {status}: {body}")
    expect(not api.requests_to("DELETE", "/tickets/42"), "the blocked DELETE reached the upstream")
    say("  ok: refused with rule 'no-deletes'; the upstream never saw the request")


def step_masked(agent: Agent, api: TicketsAPI, base: str) -> None:
    header("3. Masked call: GET /deployments/billing/config")
    say(f"  -> GET {base}/deployments/billing/config   (the upstream answers with live secrets)")
    status, body, _ = agent.call("GET", f"{base}/deployments/billing/config")
    show_response(status, body)
    text = json.dumps(body)
    expect(status == 200 and isinstance(body, dict) and body.get("service") == "billing",
           f"expected 200 with the billing config, got {status}: {body}")
    leaked = [name for name, secret in (("AWS access key id", AWS_KEY_ID),
                                        ("AWS secret key", AWS_SECRET),
                                        ("database password", DB_PASSWORD)) if secret in text]
    expect(not leaked, f"the agent received unmasked secrets: {', '.join(leaked)}")
    expect(api.requests_to("GET", "/deployments/billing/config") != [], "the call never reached the upstream")
    say("  ok: the AWS key pair and the database password were masked before reaching the agent")


def _wait_for_request(approvals_dir: Path, deadline: float) -> str:
    while time.monotonic() < deadline:
        names = sorted(p.stem for p in approvals_dir.glob("*.json") if not p.name.startswith("."))
        if names:
            return names[0]
        time.sleep(0.1)
    raise DemoFailure(f"no ApprovalRequest appeared in {approvals_dir}")


def step_approval(agent: Agent, api: TicketsAPI, base: str, conf: Path, deadline: float) -> None:
    header("4. Approval: POST /tickets/42/refund (held until a human decides)")
    say(f"  -> POST {base}/tickets/42/refund   (the agent's call is held open)")
    result: dict[str, Any] = {}

    def call() -> None:
        started = time.monotonic()
        try:
            result["response"] = agent.call("POST", f"{base}/tickets/42/refund",
                                            {"reason": "double charge", "amount_eur": 129})
        except Exception as exc:  # reported below
            result["error"] = exc
        result["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    name = _wait_for_request(conf / "approvals", deadline)
    expect(not api.requests_to("POST", "/tickets/42/refund"), "the refund reached the upstream before approval")
    expect(thread.is_alive(), f"the held call returned before the approval: {result}")
    say(f"  (meanwhile, a human looks at what is waiting)")
    run_cli("approvals", "--config-dir", str(conf))
    run_cli("approve", name, "--config-dir", str(conf), "--as", APPROVER, "--reason", "refund confirmed with the customer")
    thread.join(max(0.0, deadline - time.monotonic()))
    expect(not thread.is_alive(), "the held call did not complete after the approval")
    expect("error" not in result, f"the held call failed: {result.get('error')}")
    status, body, _ = result["response"]
    say(f"  agent: the held call completed after {result['seconds']:.1f}s")
    show_response(status, body)
    expect(status == 200 and isinstance(body, dict) and body.get("refunded") is True,
           f"expected 200 refunded after approval, got {status}: {body}")
    expect(len(api.requests_to("POST", "/tickets/42/refund")) == 1, "the refund was not forwarded exactly once")
    say(f"  ok: held, approved by {APPROVER} as ApprovalRequest {name}, then forwarded once")


def step_recording(conf: Path) -> None:
    header("5. The recorded session")
    recordings = str(conf / "recordings")
    listing = json.loads(run_cli("sessions", "list", "--dir", recordings, "--json", show=False))
    expect(len(listing) == 1, f"expected one recorded session, found {len(listing)}")
    entry = listing[0]
    session = entry.get("session") or (entry.get("ref") or {}).get("session") or ""
    expect(bool(session), f"cannot tell the session id from {entry}")
    replay = run_cli("sessions", "replay", session, "--dir", recordings, "--body-limit", "160")
    for needle, what in (("reads", "the allowed call"), ("no-deletes", "the blocked call"),
                         ("refunds-need-approval", "the approval rule"),
                         ("[MASKED:aws-secret-key]", "the masked response")):
        expect(needle in replay, f"the replay does not show {what} ({needle!r})")
    # Who approved is in the approval event itself (the replay's one-line-per-flow view may
    # not show it): read the events back through the same reader the CLI uses.
    from .recording.reader import find_session, load_session, open_store

    store = open_store(directory=recordings)
    events = load_session(store, find_session(store, session)).events
    approvals = [e for e in events if e.get("type") == "approval"]
    expect(bool(approvals), "the recording has no approval event")
    for event in approvals:
        data = event.get("data") or {}
        who = data.get("approver") or data.get("approvedBy") or data.get("decidedBy") or ""
        who = ", ".join(who) if isinstance(who, list) else str(who)
        state = data.get("state") or data.get("outcome") or data.get("phase") or "?"
        say(f"  approval event #{event.get('seq')}: {data.get('name')} {state} by {who or '?'}")
    expect(any(APPROVER in json.dumps(e.get("data")) for e in approvals),
           f"no approval event names the approver {APPROVER}")
    for secret in (AWS_SECRET, DB_PASSWORD, TOKEN):
        expect(secret not in replay, "the recording holds an unmasked secret")
    verify = run_cli("sessions", "verify", session, "--dir", recordings, "--key", str(conf / "manifest.pub"))
    expect(verify.startswith("OK"), f"verification failed: {verify}")
    # The stored files, not just the replay, must be free of the secrets.
    stored = b"".join(p.read_bytes() for p in Path(recordings).rglob("*") if p.is_file())
    expect(not any(s.encode() in stored for s in (AWS_SECRET, DB_PASSWORD, TOKEN, AWS_KEY_ID)),
           "a stored recording file holds an unmasked secret")
    say("  ok: every call is in the recording (masked), the chain is intact and the manifest's "
        "Ed25519 signature checks out")


# ============================================================================ main

def run_demo(conf: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    header("0. Setup: a local HTTPS tickets API and `chaperone proxy` (standalone)")
    api = TicketsAPI(conf / "upstream")
    say(f"  tickets API on https://localhost:{api.port} (certificate from its own CA; it needs a"
        " bearer token only the proxy holds)")
    write_config(conf, api)
    say(f"  config dir {conf}:")
    for path in sorted(p for p in conf.rglob("*") if p.is_file() and "upstream" != p.parent.name):
        say(f"    {path.relative_to(conf)}")
    proxy = Proxy(conf)
    try:
        started = time.monotonic()
        proxy.wait_ready(deadline)
        say(f"  proxy ready in {time.monotonic() - started:.1f}s on {proxy.url}; interception CA "
            f"generated at {proxy.ca_cert.relative_to(conf)}")
        expect(proxy.ca_cert.is_file(), "the proxy did not generate its CA")
        agent = Agent(proxy)
        base = f"https://localhost:{api.port}"
        steps = [lambda: step_allowed(agent, api, base), lambda: step_blocked(agent, api, base),
                 lambda: step_masked(agent, api, base),
                 lambda: step_approval(agent, api, base, conf, deadline)]
        for step in steps:
            step()
            if time.monotonic() > deadline:
                raise DemoFailure(f"the demo ran over its {timeout:.0f}s budget")
        say("\n  stopping the proxy (SIGTERM): it closes the session and signs the manifest")
        code = proxy.stop()
        expect(code == 0, f"chaperone proxy exited with {code}")
    except BaseException:
        tail = proxy.log_tail()
        proxy.stop(10)
        if tail:
            say("\n  last lines of the proxy's log:\n" + indent(tail))
        raise
    finally:
        api.close()
    step_recording(conf)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaperone_sidecar.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-dir", help="use this (empty or new) directory instead of a temporary one")
    parser.add_argument("--keep", action="store_true", help="keep the temporary config directory")
    parser.add_argument("--timeout", type=float, default=55.0, help="bound for the whole run (s)")
    args = parser.parse_args(argv)
    if args.config_dir:
        conf = Path(args.config_dir).expanduser().resolve()
        if conf.exists() and any(conf.iterdir()):
            parser.error(f"{conf} is not empty")
        conf.mkdir(parents=True, exist_ok=True)
    else:
        conf = Path(tempfile.mkdtemp(prefix="chaperone-demo-"))
    started = time.monotonic()
    say("Chaperone demo: an agent session through the standalone proxy")
    try:
        run_demo(conf, args.timeout)
    except DemoFailure as exc:
        say(f"\nDEMO FAILED: {exc}")
        return 1
    except Exception as exc:  # noqa: BLE001 - report, never a traceback-only exit
        say(f"\nDEMO FAILED: {type(exc).__name__}: {exc}")
        return 1
    finally:
        if not args.keep and not args.config_dir:
            shutil.rmtree(conf, ignore_errors=True)
        elif conf.exists():
            say(f"\n(config dir kept: {conf})")
    header(f"Demo complete in {time.monotonic() - started:.1f}s: allowed, blocked, masked, "
           "approved, recorded and verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
