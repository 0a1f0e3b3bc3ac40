"""Fixtures for the approvals tests: a namespace with a sidecar identity and approvers (RBAC).

``kube_env`` gives each test its own namespace on the real apiserver with

* ServiceAccount ``agent`` whose bearer token (from the TokenRequest API) is written to a
  token file, as the kubelet would project it, bound to a Role allowing exactly
  ``create, get, list, watch`` on approvalrequests — what the chart grants the sidecar;
* users alice and bob (client-certificate personas ``approver``/``approver2``) bound to a Role
  allowing them to read and patch approvalrequests.

The operator's admission webhook is not registered here, so decisions carry ``decidedBy``
themselves (the CRD's CEL requires it) and ``status.phase`` is only what a test writes.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from chaperone_sidecar.approvals.kube import KubeApprovalBackend
from chaperone_sidecar.kubeclient import KubeClient
from chaperone_sidecar.policy.model import (
    Action, ApprovalRequirement, Approvers, HTTPRequest, Identity, RuleRef,
)

RESOURCE = {"apiGroups": ["chaperone.dev"], "resources": ["approvalrequests"]}
PERSONA = {"alice": "approver", "bob": "approver2"}


@dataclass
class KubeEnv:
    cp: object
    ns: str
    token_file: Path

    def backend(self, *, watch_timeout_seconds: int = 240, retry_delay: float = 0.5,
                **client_options) -> KubeApprovalBackend:
        client = KubeClient(self.cp.url, self.token_file, self.cp.ca_path, retry_delay=retry_delay,
                            **client_options)
        return KubeApprovalBackend(client, self.ns, watch_timeout_seconds=watch_timeout_seconds,
                                   retry_delay=retry_delay)

    def names(self) -> list[str]:
        out = self.cp.kubectl("get", "approvalrequests", "-n", self.ns, "-o", "name").stdout
        return [line.split("/", 1)[1] for line in out.split()]

    def get(self, name: str) -> dict:
        return json.loads(self.cp.kubectl("get", "ar", name, "-n", self.ns, "-o", "json").stdout)

    def decide(self, name: str, decision: str = "Approved", user: str = "alice",
               reason: str = "") -> None:
        spec = {"decision": decision, "decidedBy": user}
        if reason:
            spec["reason"] = reason
        self.cp.kubectl("patch", "ar", name, "-n", self.ns, "--type=merge",
                        "-p", json.dumps({"spec": spec}), user=PERSONA[user])

    def set_phase(self, name: str, phase: str) -> None:
        """What the operator writes (status subresource), as admin."""
        self.cp.kubectl("patch", "ar", name, "-n", self.ns, "--subresource=status",
                        "--type=merge", "-p", json.dumps({"status": {"phase": phase}}))

    async def wait_for_request(self, count: int = 1, timeout: float = 20.0) -> list[str]:
        """Names once at least ``count`` ApprovalRequests exist (polled off the loop)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            names = await asyncio.to_thread(self.names)
            if len(names) >= count or loop.time() > end:
                return names
            await asyncio.sleep(0.05)

    async def decide_later(self, decision: str = "Approved", *, delay: float = 0.3,
                           user: str = "alice", reason: str = "", count: int = 1) -> str:
        """Decide the newest request once it exists (what a human does while a flow is held)."""
        await asyncio.sleep(delay)
        names = await self.wait_for_request(count)
        newest = max(names, key=lambda n: self.get(n)["metadata"]["creationTimestamp"] + n) \
            if len(names) > 1 else names[0]
        await asyncio.to_thread(self.decide, newest, decision, user, reason)
        return newest


@pytest.fixture
def kube_env(control_plane, crds_installed, tmp_path) -> KubeEnv:
    cp = control_plane
    ns = f"appr-{uuid.uuid4().hex[:8]}"
    ref = cp.serviceaccount_kubeconfig(ns, "agent")  # creates the namespace and the SA
    token = json.loads(ref.path.read_text())["users"][0]["user"]["token"]
    token_file = tmp_path / "token"
    token_file.write_text(token)
    manifests = [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "chaperone-sidecar", "namespace": ns},
         "rules": [{**RESOURCE, "verbs": ["create", "get", "list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "chaperone-sidecar", "namespace": ns},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                     "name": "chaperone-sidecar"},
         "subjects": [{"kind": "ServiceAccount", "name": "agent", "namespace": ns}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "approver", "namespace": ns},
         "rules": [{**RESOURCE, "verbs": ["get", "list", "watch", "patch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "approver", "namespace": ns},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "approver"},
         "subjects": [{"kind": "User", "name": "alice", "apiGroup": "rbac.authorization.k8s.io"},
                      {"kind": "User", "name": "bob", "apiGroup": "rbac.authorization.k8s.io"}]},
    ]
    cp.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                      "items": manifests}))
    # RBAC is cached by the authorizer for a moment: wait until the sidecar may list.
    for _ in range(100):
        res = cp.kubectl("auth", "can-i", "watch", "approvalrequests.chaperone.dev", "-n", ns,
                         f"--as=system:serviceaccount:{ns}:agent", check=False)
        if res.stdout.strip() == "yes":
            break
        time.sleep(0.1)
    yield KubeEnv(cp, ns, token_file)
    cp.kubectl("delete", "namespace", ns, "--wait=false", check=False)


# ---------------------------------------------------------------------------- flow data

def http_request(body: bytes = b'{"force":true}', path: str = "/v1/things/42",
                 method: str = "DELETE") -> HTTPRequest:
    return HTTPRequest(method, "https", "api.example.com", 443, path, "",
                       (("content-type", "application/json"),
                        ("authorization", f"Bearer {uuid.uuid4().hex}")), body)


def http_action(path: str = "/v1/things/42", method: str = "DELETE") -> Action:
    return Action("http", method, "https", "api.example.com", 443, path,
                  name=f"http:{method}", summary=f"{method} api.example.com{path}")


def identity(ns: str, pod: str = "agent-pod") -> Identity:
    return Identity(service_account=f"{ns}/agent", pod_namespace=ns, pod_name=pod,
                    pod_uid=str(uuid.uuid4()), creator="dave")


RULE = RuleRef("team/agent-policy", "deletes-need-approval")


def requirement(**kwargs) -> ApprovalRequirement:
    kwargs.setdefault("approvers", Approvers(users=("alice",), groups=("platform-approvers",)))
    return ApprovalRequirement(**kwargs)


class Ticker:
    """Counts ticks of a coroutine that sleeps ``interval``: proof the loop stays free."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval, self.ticks = interval, 0
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.ticks += 1

    def __enter__(self) -> "Ticker":
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc) -> None:
        assert self._task is not None
        self._task.cancel()
