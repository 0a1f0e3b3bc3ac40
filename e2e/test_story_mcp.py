"""The MCP story: an agent pod uses an MCP server through its injected sidecar, with the real SDK.

The installation is the e2e one (chart, operator and its webhooks; conftest.py). The platform
team puts a FastMCP server (the ``mcp`` SDK's own, streamable HTTP on uvicorn) behind a
ClaudeConnection ``type: mcp`` and an AccessPolicy: deleting files is blocked, reading under
/etc is blocked, ``deploy`` waits for an approver, AWS keys in tool results are masked. dave
creates the agent pod, the webhook injects the sidecar, and the sidecar runs with exactly what
was injected. The agent is the SDK's client (``chaperone_testbed.mcp_agent``) with nothing but
the agent container's injected environment (HTTP_PROXY): its ``list_tools`` does not show
``delete_file``; calling it anyway raises ``McpError`` naming the rule, and the server never
runs it; ``get_secret`` comes back masked; ``deploy`` waits while alice reads the call in the
ApprovalRequest and approves it with ``kubectl patch``. The server listens on 127.0.0.2 so the
agent's NO_PROXY (localhost, 127.0.0.1) does not let the client around the sidecar.

Runs after the main story (conftest.py's STORY_ORDER), with the chart's ports to itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
import story as st
import yaml

from chaperone_testbed.services import ManagedProcess, free_port

API = "chaperone.dev/v1alpha1"
POD, AGENT_SA, AGENT, SIDECAR = "claude-mcp", "claude-agent", "claude", "chaperone-sidecar"
HOST = "127.0.0.2"
SECRET = "AKIAIOSFODNN7EXAMPLE"
REPO_ROOT = Path(__file__).resolve().parents[1]
PYTHONPATH = os.pathsep.join(str(REPO_ROOT / p) for p in ("testbed", "sidecar"))


def _platform(ns: str) -> list[dict]:
    rbac = "rbac.authorization.k8s.io/v1"
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": AGENT_SA, "namespace": ns}},
        {"apiVersion": rbac, "kind": "Role", "metadata": {"name": "developer", "namespace": ns},
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["create", "get", "list", "delete"]}]},
        {"apiVersion": rbac, "kind": "RoleBinding", "metadata": {"name": "developer-dave", "namespace": ns},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "developer"},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "dave"}]},
        {"apiVersion": API, "kind": "ClaudeConnection", "metadata": {"name": "files-mcp", "namespace": ns},
         "spec": {"type": "mcp", "hosts": [HOST], "credentials": {"source": "none"}}},
        {"apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "mcp-guardrails", "namespace": ns},
         "spec": {"connections": ["files-mcp"], "defaultEffect": "block",
                  "approvers": {"groups": ["platform-approvers"]},
                  "rules": [
                      {"name": "session", "match": {"mcp": {"methods": ["initialize", "notifications/*",
                                                                         "tools/list", "ping"]}}, "allow": {}},
                      {"name": "stream", "match": {"methods": ["GET", "DELETE"]}, "allow": {}},
                      {"name": "tools", "match": {"mcp": {"tools": ["read_file", "get_secret"]}}, "allow": {}},
                      {"name": "no-etc", "match": {"mcp": {"tools": ["read_file"], "arguments": [
                          {"path": "$.path", "values": ["/etc/*"]}]}},
                       "block": {"message": "the agent has no business under /etc"}},
                      {"name": "deploy-needs-a-human", "match": {"mcp": {"tools": ["deploy"]}},
                       "requireApproval": {"mode": "hold", "holdSeconds": 90, "timeoutSeconds": 300}},
                      {"name": "keys", "match": {"mcp": {"tools": ["get_secret"]}},
                       "mask": {"detectors": ["aws-access-key-id"], "target": "both"}}]}},
    ]


class MCPStory:
    def __init__(self, cp, ns: str, url: str, env: dict[str, str], calls: Path):
        self.cp, self.ns, self.url, self.env, self.calls = cp, ns, url, env, calls
        self.sidecar: ManagedProcess | None = None

    def agent(self, *ops: list) -> list:
        out = subprocess.run([sys.executable, "-m", "chaperone_testbed.mcp_agent", self.url, json.dumps(ops)],
                             env=self.env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr[-3000:] + self.log()
        return json.loads(out.stdout)

    def reached(self) -> list[dict]:
        return [json.loads(line) for line in self.calls.read_text().splitlines()]

    def approval_requests(self) -> list[dict]:
        return json.loads(self.cp.kubectl("get", "approvalrequests", "-n", self.ns, "-o", "json").stdout)["items"]

    def log(self) -> str:
        return self.sidecar.log_tail(40) if self.sidecar else ""


def _serving(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://{HOST}:{port}/mcp", timeout=1)
    except urllib.error.HTTPError:
        return True  # FastMCP answers a bare GET with an error: it is up
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def mcpstory(installation, tmp_path_factory):
    cp = installation.cp
    workdir = tmp_path_factory.mktemp("mcp-story")
    calls = workdir / "calls.jsonl"
    calls.touch()
    port = free_port()
    argv = [sys.executable, "-m", "chaperone_testbed.mcp_server", str(port), "sse", HOST]
    server = ManagedProcess("mcp-server", argv, workdir / "server.log",
                            env=st.clean_env({"MCP_CALLS": str(calls), "PYTHONPATH": PYTHONPATH}))
    server.start()
    server.wait_ready(lambda: _serving(port), 30, "the MCP server")

    ns = installation.namespace("mcp")
    cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(_platform(ns)))
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": POD, "namespace": ns, "labels": {"app": "claude", "chaperone.dev/inject": "true"}},
           "spec": {"serviceAccountName": AGENT_SA,
                    "containers": [{"name": AGENT, "image": "claude-code:e2e", "command": ["sleep", "infinity"]}]}}
    cp.kubectl("create", "-f", "-", input=json.dumps(pod), user="developer")
    pod = json.loads(cp.kubectl("get", "pod", POD, "-n", ns, "-o", "json").stdout)
    assert json.loads(pod["metadata"]["annotations"]["chaperone.dev/status"])["connections"] == ["files-mcp"]

    st.wait_for_pod_plumbing(cp, ns, AGENT_SA, detail=installation.log)
    assert not st.health_ready(installation.health_port), "another sidecar still holds the chart's ports"

    sidecar, agent = st.materialize_pod(cp, pod, workdir, SIDECAR, AGENT)
    env = st.sidecar_env(cp, sidecar)
    process = ManagedProcess(SIDECAR, st.chaperone_argv(*sidecar.argv[1:]), workdir / "sidecar.log", env=env,
                             cwd=sidecar.path("/tmp"))
    story = MCPStory(cp, ns, f"http://{HOST}:{port}/mcp",
                     st.clean_env({**agent.env, "PYTHONPATH": PYTHONPATH}), calls)
    story.sidecar = process
    process.start()
    try:
        process.wait_ready(lambda: st.health_ready(installation.health_port), 90, "ready (/ready 200)")
        yield story
    finally:
        process.stop(timeout=60)
        server.stop(timeout=10)


def test_1_the_model_never_sees_the_forbidden_tool(mcpstory):
    assert mcpstory.env["HTTP_PROXY"].startswith("http://127.0.0.1:")
    [names] = mcpstory.agent(["list"])
    assert sorted(names) == ["deploy", "get_secret", "read_file"]  # default block hides delete_file


def test_2_calling_it_anyway_is_refused_with_the_rule(mcpstory):
    denied, etc, ok = mcpstory.agent(["call", "delete_file", {"path": "/srv/app"}],
                                     ["call", "read_file", {"path": "/tmp/../etc/shadow"}],
                                     ["call", "read_file", {"path": "/srv/app/README"}])
    assert denied["error"]["code"] == -32030 and denied["error"]["data"]["error"] == "chaperone_blocked"
    assert 'no rule of the AccessPolicies for connection "files-mcp" allows' in denied["error"]["message"]
    assert etc["error"]["data"]["rule"] == {"policy": f"{mcpstory.ns}/mcp-guardrails", "name": "no-etc"}
    assert "the agent has no business under /etc" in etc["error"]["message"]
    assert ok == {"text": "contents of /srv/app/README", "isError": False}
    assert [c["tool"] for c in mcpstory.reached()] == ["read_file"]


def test_3_secrets_in_tool_results_are_masked(mcpstory):
    [result] = mcpstory.agent(["call", "get_secret", {"name": "prod"}])
    assert SECRET not in result["text"] and "[MASKED:aws-access-key-id]" in result["text"]


def test_4_deploy_waits_for_alice_who_sees_the_call(mcpstory):
    result: dict = {}
    caller = threading.Thread(target=lambda: result.update(out=mcpstory.agent(["call", "deploy", {"env": "prod"}])),
                              daemon=True)
    caller.start()

    def pending():
        return [ar for ar in mcpstory.approval_requests() if ar["spec"]["action"]["name"] == "mcp:tools/call"]
    (ar,) = st.wait_for(pending, 60, "the deploy call's ApprovalRequest", detail=mcpstory.log)
    assert ar["spec"]["action"]["summary"] == 'mcp tools/call deploy {"env": "prod"}'
    assert not [c for c in mcpstory.reached() if c["tool"] == "deploy"]  # held, not forwarded
    mcpstory.cp.kubectl("-n", mcpstory.ns, "patch", "approvalrequest", ar["metadata"]["name"], "--type=merge",
                        "-p", json.dumps({"spec": {"decision": "Approved"}}), user="approver")
    caller.join(120)
    assert result["out"] == [{"text": "deployed to prod", "isError": False}], mcpstory.log()
    assert {"tool": "deploy", "env": "prod"} in mcpstory.reached()
