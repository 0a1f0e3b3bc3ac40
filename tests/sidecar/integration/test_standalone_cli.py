"""``chaperone approve|deny|approvals`` against a running standalone ``chaperone proxy``.

The proxy holds the agent's request (``requireApproval``, hold mode) while the ApprovalRequest
waits in ``<config-dir>/approvals/``; the commands run as processes, the way a person runs them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
import requests
import yaml

from .pod import API, PYTHONPATH, HTTPSUpstream, base_env, standalone_proxy, wait_for


def cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = base_env()
    env.update({"PYTHONPATH": PYTHONPATH, "USER": "dana", **(env_extra or {})})
    return subprocess.run([sys.executable, "-m", "chaperone_sidecar.standalone_cli", *args], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    root = tmp_path_factory.mktemp("standalone")
    upstream = HTTPSUpstream(root / "upstream")
    conf = root / "conf"
    for sub in ("connections", "policies", "upstream-ca/tickets"):
        (conf / sub).mkdir(parents=True)
    (conf / "upstream-ca" / "tickets" / "ca.crt").write_bytes(upstream.ca_file.read_bytes())
    (conf / "chaperone.yaml").write_text(yaml.safe_dump({"namespace": "laptop", "user": "dana"}))
    (conf / "connections" / "tickets.yaml").write_text(yaml.safe_dump(
        {"apiVersion": API, "kind": "ClaudeConnection", "metadata": {"name": "tickets"},
         "spec": {"type": "http", "hosts": ["localhost"]}}))
    hold = {"mode": "hold", "holdSeconds": 60, "timeoutSeconds": 120}
    (conf / "policies" / "p.yaml").write_text(yaml.safe_dump(
        {"apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "guard"},
         "spec": {"defaultEffect": "allow", "rules": [
             {"name": "deletes-need-alice", "match": {"methods": ["DELETE"]},
              "requireApproval": {"approvers": {"users": ["alice"]}, **hold}},
             {"name": "refunds-need-two", "match": {"methods": ["POST"], "paths": ["/refunds/*"]},
              "requireApproval": {"approvers": {"users": ["alice", "bob"]}, "minApprovals": 2, **hold}}]}}))
    try:
        with standalone_proxy(conf, root / "proxy.log") as proxy:
            port = proxy.port
            session = requests.Session()
            session.trust_env = False
            session.proxies = {"https": f"http://127.0.0.1:{port}"}
            session.verify = str(conf / "ca" / "mitmproxy-ca-cert.pem")
            yield conf, session, upstream
    finally:
        upstream.close()


class Held:
    """An agent call on a thread: it blocks in the proxy until someone decides."""

    def __init__(self, session: requests.Session, method: str, url: str):
        self.response: requests.Response | None = None
        self.thread = threading.Thread(target=self._call, args=(session, method, url), daemon=True)
        self.thread.start()

    def _call(self, session, method, url):
        self.response = session.request(method, url, json={"amount": 10}, timeout=90)

    def result(self, timeout: float = 30) -> requests.Response:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the held call did not complete"
        assert self.response is not None
        return self.response


def wait_pending(conf, rule: str) -> str:
    def find():
        out = cli("approvals", "--config-dir", str(conf), "--json")
        assert out.returncode == 0, out.stderr
        return [o["metadata"]["name"] for o in json.loads(out.stdout) if o["spec"]["rule"]["name"] == rule]
    names = wait_for(find, 20, f"a pending ApprovalRequest for {rule}")
    assert len(names) == 1, names
    return names[0]


def test_deny_refuses_the_held_call_with_who_and_why(proxy):
    conf, session, upstream = proxy
    held = Held(session, "DELETE", f"https://localhost:{upstream.port}/tickets/9")
    name = wait_pending(conf, "deletes-need-alice")
    listing = cli("approvals", "--config-dir", str(conf))
    assert listing.returncode == 0 and name in listing.stdout and "Pending" in listing.stdout
    assert "laptop/guard#deletes-need-alice" in listing.stdout and "DELETE localhost" in listing.stdout
    out = cli("deny", name, "--config-dir", str(conf), "--as", "alice", "--reason", "not on a Friday")
    assert out.returncode == 0 and f"approvalrequest {name} denied by alice" in out.stdout, out.stderr
    resp = held.result()
    body = resp.json()
    assert resp.status_code == 403 and body["error"] == "chaperone_approval_denied", body
    assert body["decided_by"] == "alice" and "not on a Friday" in body["reason"]
    assert not upstream.requests("DELETE")
    # final: nobody can change it any more
    again = cli("approve", name, "--config-dir", str(conf), "--as", "bob")
    assert again.returncode == 1 and "is final: Denied by alice" in again.stderr


def test_two_approvals_are_needed_and_each_approver_counts_once(proxy):
    conf, session, upstream = proxy
    held = Held(session, "POST", f"https://localhost:{upstream.port}/refunds/77")
    name = wait_pending(conf, "refunds-need-two")
    first = cli("approve", name, "--config-dir", str(conf), "--as", "alice")
    assert first.returncode == 0 and "approval by alice recorded (1/2); more approvals are needed" in first.stdout
    time.sleep(0.5)
    assert held.thread.is_alive() and not upstream.requests("POST", "/refunds/77")
    twice = cli("approve", name, "--config-dir", str(conf), "--as", "alice")
    assert twice.returncode == 1 and "alice already reviewed" in twice.stderr
    # the default decider is $USER
    second = cli("approve", name, "--config-dir", str(conf), env_extra={"USER": "bob"})
    assert second.returncode == 0 and f"approvalrequest {name} approved by bob (2/2)" in second.stdout
    resp = held.result()
    assert resp.status_code == 200 and resp.json()["path"] == "/refunds/77"
    assert len(upstream.requests("POST", "/refunds/77")) == 1
    pending = cli("approvals", "--config-dir", str(conf))
    assert pending.returncode == 0 and "no pending approval requests" in pending.stdout
    everything = cli("approvals", "--config-dir", str(conf), "--all")
    row = next(line for line in everything.stdout.splitlines() if line.startswith(name))
    assert "Approved by bob" in row and "2/2" in row and "alice, bob" in row


def test_errors_and_the_config_dir_default(proxy, tmp_path):
    conf, _, _ = proxy
    out = cli("approve", "no-such-request", "--config-dir", str(conf))
    assert out.returncode == 1 and "no ApprovalRequest named 'no-such-request'" in out.stderr
    out = cli("deny", "../../etc/passwd", "--config-dir", str(conf))
    assert out.returncode == 1 and "invalid ApprovalRequest name" in out.stderr
    empty = tmp_path / "empty"
    out = cli("approve", "x", "--config-dir", str(empty))
    assert out.returncode == 1 and "no approval requests in" in out.stderr
    assert not empty.exists()  # looking does not create the config dir
    out = cli("approvals", "--config-dir", str(empty))
    assert out.returncode == 0 and "no pending approval requests" in out.stdout
    # CHAPERONE_CONFIG_DIR is the default, as for `chaperone proxy`
    out = cli("approvals", "--all", env_extra={"CHAPERONE_CONFIG_DIR": str(conf)})
    assert out.returncode == 0 and "NAME" in out.stdout and "Denied by alice" in out.stdout
    out = cli("approve", "--help")
    assert out.returncode == 0 and "--reason" in out.stdout and "--config-dir" in out.stdout
