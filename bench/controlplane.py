"""Control-plane latencies on the real kube-apiserver: approval round trip and webhook cost.

**Approval round trip** (patch -> released response). The sidecar's own approvals library holds
a flow exactly as the Approve addon does: :class:`ApprovalService` with a
:class:`KubeApprovalBackend` authenticated as the pod's ServiceAccount (a TokenRequest token,
the chart's RBAC), ``hold`` mode. Once the ApprovalRequest exists and the hold's watch is
established (0.3 s later - a human is never faster), the clock starts and approver alice
patches ``spec.decision``; the clock stops when ``request()`` returns ``approved`` (the
moment the Approve addon would release the flow). Two ways to patch: a raw merge-PATCH over a
kept-alive HTTPS connection (what the system costs) and the real ``kubectl patch`` (what an
approver waits for, process start-up included). The operator's admission webhook is not in
this loop, so the patch carries ``decidedBy`` itself, as the approvals tests do.

**Injection webhook** (added pod-admission latency). ``inject()`` served as a real HTTPS
mutating webhook, as ``tests/operator/injection/test_inject.py`` does, and doing what the
operator's handler does per admission: list the namespace's ClaudeConnections from the
apiserver's watch cache (``chaperone_operator.kube.list_objects(..., from_cache=True)``:
``resourceVersion=0``, exactly as ``handlers/pods.py``), then ``inject``. ``webhook_consistent_list``
measures the handler as it was before that fix (a consistent list without ``resourceVersion``,
which waits for the cache to catch up with etcd - ~84 ms here). Registered fail-closed for one
namespace and the ``chaperone.dev/inject: "true"`` label. Pods are created alternately with
and without the label (POST over a kept-alive connection; plus a few real ``kubectl create``);
the webhook's cost is the difference of the two distributions.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import socket
import ssl
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from chaperone_sidecar.api import API_VERSION, APPROVAL_REQUESTS, GROUP, LABEL_INJECT, collection_path

from .load import percentile

__all__ = ["run_controlplane", "approval_round_trip", "webhook_latency"]

REPO = Path(__file__).resolve().parent.parent
AR_RESOURCE = {"apiGroups": [GROUP], "resources": [APPROVAL_REQUESTS]}


def _stats(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99), "max": max(values) if values else float("nan")}


def _rbac(ns: str) -> list[dict]:
    def role(name: str, verbs: list[str]) -> dict:
        return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                "metadata": {"name": name, "namespace": ns}, "rules": [{**AR_RESOURCE, "verbs": verbs}]}

    def binding(name: str, subjects: list[dict]) -> dict:
        return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": {"name": name, "namespace": ns},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                "subjects": subjects}

    return [role("chaperone-sidecar", ["create", "get", "list", "watch"]),
            binding("chaperone-sidecar", [{"kind": "ServiceAccount", "name": "agent", "namespace": ns}]),
            role("approver", ["get", "list", "watch", "patch"]),
            binding("approver", [{"kind": "User", "name": "alice", "apiGroup": "rbac.authorization.k8s.io"}])]


def _tls(cp: Any, persona: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cp.ca_path))
    ctx.load_cert_chain(cp.pki_dir / f"user-{persona}.crt", cp.pki_dir / f"user-{persona}.key")
    return ctx


# ---------------------------------------------------------------------------- approvals

def approval_round_trip(cp: Any, workdir: Path, *, n: int, kubectl_n: int) -> dict[str, Any]:
    """p50/p99 of patch -> released over ``n`` API patches and ``kubectl_n`` kubectl patches."""
    import aiohttp

    from chaperone_sidecar.api import LABEL_DIGEST
    from chaperone_sidecar.approvals.digest import request_digest
    from chaperone_sidecar.approvals.grants import MemoryGrants
    from chaperone_sidecar.approvals.kube import KubeApprovalBackend
    from chaperone_sidecar.approvals.service import ApprovalService
    from chaperone_sidecar.kubeclient import KubeClient
    from chaperone_sidecar.policy.model import (
        Action,
        ApprovalRequirement,
        Approvers,
        HTTPRequest,
        Identity,
        RuleRef,
    )

    ns = f"bench-approvals-{uuid.uuid4().hex[:6]}"
    ref = cp.serviceaccount_kubeconfig(ns, "agent")
    token_file = workdir / "agent-token"
    token_file.write_text(json.loads(ref.path.read_text())["users"][0]["user"]["token"])
    cp.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": _rbac(ns)}))
    for _ in range(100):  # the authorizer caches RBAC for a moment
        res = cp.kubectl("auth", "can-i", "watch", "approvalrequests.chaperone.dev", "-n", ns,
                         f"--as=system:serviceaccount:{ns}:agent", check=False)
        if res.stdout.strip() == "yes":
            break
        time.sleep(0.1)
    who = Identity(service_account=f"{ns}/agent", pod_namespace=ns, pod_name="agent-0",
                   pod_uid=str(uuid.uuid4()), creator="dave")
    requirement = ApprovalRequirement(approvers=Approvers(users=("alice",)), hold_seconds=60)
    rule = RuleRef(f"{ns}/bench", "deletes-need-approval")
    decision = {"spec": {"decision": "Approved", "decidedBy": "alice"}}
    api_times: list[float] = []
    kubectl_times: list[float] = []
    failures: list[str] = []

    async def scenario() -> None:
        backend = KubeApprovalBackend(KubeClient(cp.url, token_file, cp.ca_path), ns)
        svc = ApprovalService(backend, MemoryGrants())
        connector = aiohttp.TCPConnector(ssl=_tls(cp, "approver"), limit=1)
        async with aiohttp.ClientSession(connector=connector) as approver:
            try:
                for i in range(-1, n + kubectl_n):  # -1: a warm-up (session, TLS, RBAC cache)
                    path = f"/v1/things/{i}-{uuid.uuid4().hex[:6]}"
                    digest = request_digest(HTTPRequest("DELETE", "https", "api.example.com", 443, path))
                    action = Action("http", "DELETE", "https", "api.example.com", 443, path,
                                    name="http:DELETE", summary=f"DELETE api.example.com{path}")
                    released: list[float] = []

                    async def hold() -> Any:
                        outcome = await svc.request(identity=who, connection="bench", action=action,
                                                    digest=digest, rule=rule, requirement=requirement)
                        released.append(time.perf_counter())
                        return outcome

                    task = asyncio.create_task(hold())
                    deadline = time.monotonic() + 20
                    while svc.held == 0 and not task.done() and time.monotonic() < deadline:
                        await asyncio.sleep(0.01)
                    await asyncio.sleep(0.3)  # the hold's list + watch are in place
                    found = await backend.find({LABEL_DIGEST: digest.split(":", 1)[-1][:63]})
                    if not found or task.done():
                        why = repr(task.exception() or task.result()) if task.done() else "not found"
                        task.cancel()
                        failures.append(f"round {i}: no ApprovalRequest held: {why}"[:300])
                        continue
                    name = found[0]["metadata"]["name"]
                    start = time.perf_counter()
                    if i < n:
                        url = f"{cp.url}{collection_path(APPROVAL_REQUESTS, ns)}/{name}"
                        async with approver.patch(url, data=json.dumps(decision),
                                                  headers={"Content-Type": "application/merge-patch+json"}) as resp:
                            if resp.status != 200:
                                failures.append(f"PATCH {name}: HTTP {resp.status} {await resp.text()}")
                    else:
                        await asyncio.to_thread(cp.kubectl, "patch", "ar", name, "-n", ns, "--type=merge",
                                                "-p", json.dumps(decision), user="approver")
                    outcome = await asyncio.wait_for(task, 30)
                    if outcome.state != "approved":
                        failures.append(f"{name}: {outcome.state} {outcome.reason}")
                        continue
                    if i >= 0:
                        (api_times if i < n else kubectl_times).append(released[0] - start)
            finally:
                await svc.close()

    asyncio.run(scenario())
    cp.kubectl("delete", "namespace", ns, "--wait=false", check=False)
    return {"api_patch": _stats(api_times), "kubectl_patch": _stats(kubectl_times), "failures": failures[:5]}


# ---------------------------------------------------------------------------- injection webhook

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the operator's aiohttp server does
    server: "_WebhookServer"

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        from chaperone_operator import kube
        from chaperone_operator.injection.inject import inject
        from chaperone_operator.injection.settings import InjectionSettings

        start = time.perf_counter()
        review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        request = review["request"]
        namespace = request.get("namespace") or request["object"]["metadata"].get("namespace")
        listed = time.perf_counter()
        connections = kube.list_objects(self.server.api, "claudeconnections", namespace,
                                        from_cache=self.server.cached_list)
        listed = time.perf_counter() - listed
        result = inject(request["object"], InjectionSettings(), connections, request.get("userInfo"))
        response: dict[str, Any] = {"uid": request["uid"], "allowed": result.allowed}
        if result.refused:
            response["status"] = {"code": 403, "message": result.refused}
        elif result.patch:
            response["patchType"] = "JSONPatch"
            response["patch"] = base64.b64encode(json.dumps(result.patch).encode()).decode()
        body = json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                           "response": response}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.server.handled.append(time.perf_counter() - start)
        self.server.listing.append(listed)

    def log_message(self, *args: Any) -> None:
        pass


class _WebhookServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, api: Any, cached_list: bool = False):
        from kubernetes import client

        super().__init__(("127.0.0.1", 0), _Handler)
        self.api, self.cached_list = api, cached_list
        self.custom = client.CustomObjectsApi(api)
        self.handled: list[float] = []  # the whole handler, body read to response written
        self.listing: list[float] = []  # of which: listing the ClaudeConnections

    def get_request(self) -> tuple[socket.socket, Any]:
        # No Nagle: the response's headers and body are two writes, and the second would wait
        # for the apiserver's delayed ACK (40 ms). aiohttp (the operator's server) sets it too.
        sock, addr = super().get_request()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, addr


def webhook_latency(cp: Any, workdir: Path, *, n: int, kubectl_n: int, cached_list: bool = True) -> dict[str, Any]:
    """Pod-create latency with and without the injection label, the webhook registered."""
    from chaperone_testbed.pki import CertAuthority

    ns = f"bench-inject-{uuid.uuid4().hex[:6]}"
    cp.create_namespace(ns)
    cp.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps({
        "apiVersion": API_VERSION, "kind": "ClaudeConnection", "metadata": {"name": "tickets-api"},
        "spec": {"type": "http", "hosts": ["tickets.internal.example.com"]}}))
    ca = CertAuthority("chaperone-bench-webhook-ca")
    pair = ca.write_server_cert(workdir, "webhook", dns_names=("localhost",), ip_addresses=("127.0.0.1",))
    server = _WebhookServer(cp.admin_client(), cached_list)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(pair.cert_path, pair.key_path)
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    name = f"chaperone-bench-inject-{ns}"
    cp.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{
            "name": "inject.chaperone.dev", "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "failurePolicy": "Fail", "timeoutSeconds": 5, "reinvocationPolicy": "IfNeeded",
            "clientConfig": {"url": f"https://127.0.0.1:{server.server_address[1]}/mutate",
                             "caBundle": base64.b64encode(ca.cert_pem).decode()},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                       "resources": ["pods"], "scope": "Namespaced"}],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
            "objectSelector": {"matchLabels": {LABEL_INJECT: "true"}}}]}))
    host, port = cp.url.removeprefix("https://").rsplit(":", 1)
    conn = http.client.HTTPSConnection(host, int(port), context=_tls(cp, "admin"), timeout=30)
    times: dict[str, list[float]] = {"labelled": [], "unlabelled": []}
    kubectl_times: dict[str, list[float]] = {"labelled": [], "unlabelled": []}
    failures: list[str] = []

    def pod(labelled: bool) -> dict:
        labels = {LABEL_INJECT: "true", "app": "claude"} if labelled else {"app": "claude"}
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "claude-", "labels": labels},
                "spec": {"containers": [{"name": "claude", "image": "claude-code"}]}}

    def create(labelled: bool) -> tuple[float, dict]:
        body = json.dumps(pod(labelled))
        start = time.perf_counter()
        conn.request("POST", f"/api/v1/namespaces/{ns}/pods", body=body,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        elapsed = time.perf_counter() - start
        if resp.status != 201:
            raise RuntimeError(f"pod create: HTTP {resp.status}: {data[:300]!r}")
        return elapsed, json.loads(data)

    try:
        deadline = time.monotonic() + 30  # the configuration reaches the apiserver's cache
        while True:
            _, out = create(True)
            if "chaperone.dev/status" in (out["metadata"].get("annotations") or {}):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the injection webhook was never called")
            time.sleep(0.3)
        for _ in range(3):  # warm both paths
            create(True), create(False)
        server.handled.clear()
        server.listing.clear()
        for i in range(2 * n):
            labelled = i % 2 == 0
            elapsed, out = create(labelled)
            injected = "chaperone.dev/status" in (out["metadata"].get("annotations") or {})
            if injected != labelled:
                failures.append(f"pod {out['metadata']['name']}: injected={injected}, labelled={labelled}")
                continue
            times["labelled" if labelled else "unlabelled"].append(elapsed)
        for i in range(2 * kubectl_n):
            labelled = i % 2 == 0
            start = time.perf_counter()
            cp.kubectl("create", "-n", ns, "-f", "-", input=json.dumps(pod(labelled)))
            kubectl_times["labelled" if labelled else "unlabelled"].append(time.perf_counter() - start)
    finally:
        conn.close()
        cp.kubectl("delete", "mutatingwebhookconfiguration", name, "--ignore-not-found", check=False)
        server.shutdown()
        server.server_close()
        cp.kubectl("delete", "namespace", ns, "--wait=false", check=False)
    return {"api": {k: _stats(v) for k, v in times.items()},
            "kubectl": {k: _stats(v) for k, v in kubectl_times.items()},
            "handler": _stats(list(server.handled)), "handler_list": _stats(list(server.listing)),
            "failures": failures[:5]}


def run_controlplane(workdir: Path, *, approvals_n: int, webhook_n: int, kubectl_n: int) -> dict[str, Any]:
    """Start the test bed's control plane, apply the CRDs, measure both, stop it.

    The webhook is measured twice: listing connections as the operator does (a consistent
    list) and with ``resourceVersion=0`` (served from the apiserver's watch cache): on
    Kubernetes >= 1.31 (ConsistentListFromCache) a consistent list waits for the watch cache
    to catch up with etcd, up to the 100 ms progress-notify period, whenever other objects
    were written meanwhile - which pod creation always does.
    """
    from chaperone_testbed.controlplane import ControlPlane

    workdir.mkdir(parents=True, exist_ok=True)
    cp = ControlPlane(build_script=REPO / "hack" / "build-control-plane.sh").start()
    try:
        cp.kubectl("apply", "-f", str(REPO / "crds"))
        cp.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/approvalrequests.chaperone.dev",
                   "crd/claudeconnections.chaperone.dev", "crd/accesspolicies.chaperone.dev")
        return {"approval": approval_round_trip(cp, workdir, n=approvals_n, kubectl_n=kubectl_n),
                "webhook": webhook_latency(cp, workdir, n=webhook_n, kubectl_n=kubectl_n),
                "webhook_consistent_list": webhook_latency(cp, workdir, n=webhook_n, kubectl_n=0,
                                                           cached_list=False)}
    finally:
        cp.stop()
