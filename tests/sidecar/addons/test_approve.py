"""Approve: require-approval flows held, deferred, released, refused - local store and apiserver.

FlowContexts are set up by hand (as Identify, Route and Enforce would leave them). The
approvals façade is real: ``ApprovalService`` over ``LocalApprovalStore`` (files) with
``MemoryGrants``, and once over ``KubeApprovalBackend`` against the test bed's apiserver.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import time
import uuid

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from chaperone_sidecar import flowctx
from chaperone_sidecar.addons.approve import Approve, approve_command, body_preview
from chaperone_sidecar.approvals.digest import request_digest
from chaperone_sidecar.approvals.grants import MemoryGrants
from chaperone_sidecar.approvals.kube import KubeApprovalBackend
from chaperone_sidecar.approvals.local import LocalApprovalStore
from chaperone_sidecar.approvals.service import ApprovalService
from chaperone_sidecar.config import SidecarConfig
from chaperone_sidecar.kubeclient import KubeClient
from chaperone_sidecar.policy.model import (
    Action, ApprovalRequirement, Approvers, Decision, HTTPRequest, Identity, RuleRef,
)
from chaperone_sidecar.services import SidecarServices
from chaperone_sidecar.sources import Sources

NS = "team-a"
RULE = RuleRef("team-a/github", "deletes-need-approval")
APPROVERS = Approvers(users=("alice",), groups=("platform-approvers",))
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def identity(ns: str = NS) -> Identity:
    return Identity(service_account=f"{ns}/claude", pod_namespace=ns, pod_name="agent-0",
                    pod_uid="uid-1", creator="dave")


def requirement(**kwargs) -> ApprovalRequirement:
    kwargs.setdefault("approvers", APPROVERS)
    kwargs.setdefault("hold_seconds", 5)
    return ApprovalRequirement(**kwargs)


def make_flow(req: ApprovalRequirement, *, ns: str = NS, body: bytes = b'{"force": true}',
              path: str = "/repos/o/r") -> http.HTTPFlow:
    f = tflow.tflow(req=tutils.treq(
        host="api.github.com", port=443, scheme=b"https", method=b"DELETE", path=path.encode(),
        headers=http.Headers(host="api.github.com", content_type="application/json",
                             authorization=f"Bearer agent-{uuid.uuid4().hex}"),
        content=body))
    ctx = flowctx.ensure(f)
    ctx.identity, ctx.connection, ctx.connection_type = identity(ns), "github", "http"
    ctx.action = Action("http", "DELETE", "https", "api.github.com", 443, path, name="http:DELETE",
                        summary=f"DELETE api.github.com{path}")
    ctx.decision = Decision("require_approval", rule=RULE, message="Deleting repositories needs a human",
                            approval=req)
    return f


def services(backend, *, standalone: bool = False, approvals=True, **config) -> SidecarServices:
    cfg = SidecarConfig(standalone=standalone, api_server="" if standalone else "https://k8s:6443",
                        pod_namespace=NS, **config)
    svc = SidecarServices(config=cfg, sources=Sources(NS))
    svc.approval_backend = backend
    svc.grants = MemoryGrants()
    svc.approvals = ApprovalService(backend, svc.grants) if approvals else None
    return svc


async def approve(addon: Approve, flow: http.HTTPFlow, **options) -> flowctx.FlowContext:
    """requestheaders then request, as mitmproxy calls them (inside a taddons context)."""
    with taddons.context(addon) as tctx:
        if options:
            tctx.options.update(**options)
        await addon.requestheaders(flow)
        if flow.response is None:
            await addon.request(flow)
    return flowctx.get(flow)


def body_of(flow) -> dict:
    assert flow.response.headers["Content-Type"] == "application/json"
    return json.loads(flow.response.content)


@pytest.fixture
def store(tmp_path) -> LocalApprovalStore:
    return LocalApprovalStore(tmp_path / "approvals", namespace=NS, poll_interval=0.02)


# ---------------------------------------------------------------------------- defer

def test_defer_answers_403_naming_the_request_approvers_and_the_command(store):
    svc = services(store)
    f = make_flow(requirement(mode="defer"))
    ctx = asyncio.run(approve(Approve(svc), f))
    assert f.response.status_code == 403
    assert f.response.headers["X-Chaperone-Refused"] == "approval_pending"
    body = body_of(f)
    name = ctx.approval_request
    assert [o["metadata"]["name"] for o in store.list()] == [name]
    stored = store.load(name)
    assert body["error"] == "chaperone_approval_pending"
    assert body["rule"] == {"policy": "team-a/github", "name": "deletes-need-approval"}
    assert body["action"] == {"name": "http:DELETE", "summary": "DELETE api.github.com/repos/o/r",
                              "connection": "github"}
    assert body["approval_request"] == {"name": name, "namespace": NS,
                                        "expires_at": stored["spec"]["expiresAt"]}
    assert body["approvers"] == {"users": ["alice"], "groups": ["platform-approvers"],
                                 "min_approvals": 1}
    command = (f"kubectl patch ar {name} -n {NS} --type=merge "
               """-p '{"spec":{"decision":"Approved"}}'""")
    assert body["approve_command"] == command and command in body["how_to_get_access"]
    assert shlex.split(command)[-1] == '{"spec":{"decision":"Approved"}}'  # valid shell quoting
    assert "Retry the same request" in body["retry"]
    assert "Deleting repositories needs a human" in body["message"] and name in body["message"]
    assert ctx.request_digest == stored["spec"]["requestDigest"]
    assert ctx.refused == body and ctx.approved_by == ()


def test_retry_after_approval_passes_and_records_the_approver(store):
    svc = services(store)
    addon = Approve(svc)

    async def scenario():
        first = make_flow(requirement(mode="defer"))
        await approve(addon, first)
        name = flowctx.get(first).approval_request
        await asyncio.to_thread(store.decide, name, "Approved", "alice")
        retry = make_flow(requirement(mode="defer"))  # new signature/token: same request
        ctx = await approve(addon, retry)
        again = make_flow(requirement(mode="defer"))
        ctx2 = await approve(addon, again)
        return name, retry, ctx, again, ctx2

    name, retry, ctx, again, ctx2 = asyncio.run(scenario())
    assert retry.response is None and ctx.approval_request == name
    assert ctx.approved_by == ("alice",)
    assert again.response is None and ctx2.grant == "exact" and ctx2.approved_by == ("alice",)
    assert len(store.list()) == 1  # retries reused the request, no flood of new ones


def test_retry_before_a_decision_reports_the_same_request(store):
    svc = services(store)
    addon = Approve(svc)

    async def scenario():
        names = []
        for _ in range(3):
            f = make_flow(requirement(mode="defer"))
            names.append((await approve(addon, f)).approval_request)
        return names

    names = asyncio.run(scenario())
    assert len(set(names)) == 1 and len(store.list()) == 1


def test_a_different_request_needs_its_own_approval(store):
    svc = services(store)
    addon = Approve(svc)

    async def scenario():
        first = make_flow(requirement(mode="defer"))
        await approve(addon, first)
        await asyncio.to_thread(store.decide, flowctx.get(first).approval_request, "Approved", "alice")
        other = make_flow(requirement(mode="defer"), body=b'{"force": false}')
        await approve(addon, other)
        return other

    other = asyncio.run(scenario())
    assert other.response.status_code == 403 and len(store.list()) == 2


# ---------------------------------------------------------------------------- hold

class Ticker:
    """Counts ticks of a task sleeping ``interval``: proof that the event loop stays free."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval, self.ticks, self.task = interval, 0, None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.ticks += 1

    def __enter__(self):
        self.task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc):
        self.task.cancel()


def test_hold_releases_the_flow_when_approved_without_blocking_the_loop(store):
    svc = services(store)
    addon = Approve(svc)

    async def scenario():
        f = make_flow(requirement(hold_seconds=10))
        other = make_flow(requirement(mode="defer"), path="/repos/o/other")

        async def human():
            while not store.list():
                await asyncio.sleep(0.02)
            first = store.list()[0]["metadata"]["name"]
            # another flow is served while the first one is held
            await addon.request(other)
            await asyncio.sleep(0.3)
            await asyncio.to_thread(store.decide, first, "Approved", "alice")

        with Ticker() as ticker:
            start = time.monotonic()
            _, ctx = await asyncio.gather(human(), approve(addon, f))
            held = time.monotonic() - start
        return f, ctx, other, held, ticker.ticks

    f, ctx, other, held, ticks = asyncio.run(scenario())
    assert f.response is None and ctx.approved_by == ("alice",)
    assert 0.3 <= held < 10 and ticks >= 10
    assert other.response.status_code == 403  # answered while the first flow was held
    assert svc.approvals.held == 0


def test_hold_that_runs_out_answers_pending(store):
    f = make_flow(requirement(hold_seconds=1))
    start = time.monotonic()
    ctx = asyncio.run(approve(Approve(services(store)), f))
    assert 0.9 <= time.monotonic() - start < 5
    body = body_of(f)
    assert body["error"] == "chaperone_approval_pending" and "held 1s" in body["message"]
    assert body["approval_request"]["name"] == ctx.approval_request


def test_pod_setting_can_only_make_it_stricter(store):
    # The policy says hold (stricter): a pod annotation saying defer does not weaken it.
    svc = services(store, approval_mode="defer")
    f = make_flow(requirement(hold_seconds=1))  # the rule says hold
    start = time.monotonic()
    asyncio.run(approve(Approve(svc), f))
    assert time.monotonic() - start >= 0.9, "the pod's defer weakened the policy's hold"
    assert "held 1s" in body_of(f)["message"]
    # The policy says defer, the pod says hold: the stricter (hold) wins too.
    held = make_flow(requirement(mode="defer", hold_seconds=1), path="/repos/o/held")
    start = time.monotonic()
    asyncio.run(approve(Approve(services(store, approval_mode="hold")), held))
    assert time.monotonic() - start >= 0.9 and "held 1s" in body_of(held)["message"]
    # Both defer: answered at once.
    deferred = make_flow(requirement(mode="defer", hold_seconds=30), path="/repos/o/deferred")
    start = time.monotonic()
    asyncio.run(approve(Approve(services(store, approval_mode="defer")), deferred))
    assert time.monotonic() - start < 2 and body_of(deferred)["error"] == "chaperone_approval_pending"
    capped = make_flow(requirement(hold_seconds=30), path="/repos/o/capped")
    start = time.monotonic()
    asyncio.run(approve(Approve(services(store)), capped, chaperone_approval_hold_max=1))
    assert 0.9 <= time.monotonic() - start < 5


def test_denied_is_a_403_with_reason_and_approver(store):
    svc = services(store)

    async def scenario():
        f = make_flow(requirement(hold_seconds=10))

        async def human():
            while not store.list():
                await asyncio.sleep(0.02)
            await asyncio.to_thread(store.decide, store.list()[0]["metadata"]["name"], "Denied",
                                    "alice", "not on a Friday")
        await asyncio.gather(human(), approve(Approve(svc), f))
        return f

    f = asyncio.run(scenario())
    assert f.response.status_code == 403
    body = body_of(f)
    assert body["error"] == "chaperone_approval_denied" and body["decided_by"] == "alice"
    assert body["reason"] == "denied by alice: not on a Friday"
    assert "not on a Friday" in body["message"] and "do not retry" in body["how_to_get_access"]
    assert body["approval_request"]["name"] == flowctx.get(f).approval_request
    # The agent's retry of the same request gets the same answer - approver, reason, name -
    # and no second ApprovalRequest pages the approvers again.
    retry = make_flow(requirement(hold_seconds=10))
    start = time.monotonic()
    asyncio.run(approve(Approve(svc), retry))
    again = body_of(retry)
    assert time.monotonic() - start < 2  # answered at once, not held
    assert again["error"] == "chaperone_approval_denied" and again["decided_by"] == "alice"
    assert again["reason"] == "denied by alice: not on a Friday"
    assert again["approval_request"]["name"] == body["approval_request"]["name"]
    assert again["remembered_until"] and again["remembered_until"] in again["message"]
    assert len(store.list()) == 1


def test_only_the_pods_own_annotation_counts_as_its_word(store, tmp_path):
    """The operator's default mode (written into every pod) does not turn a policy's deliberate
    defer into a hold; the pod's own annotation saying hold does; a pod saying defer never
    weakens a policy's hold."""
    podinfo = tmp_path / "podinfo"
    podinfo.mkdir()
    (podinfo / "annotations").write_text('chaperone.dev/mode="explicit"\n')
    f = make_flow(requirement(mode="defer", hold_seconds=30))
    start = time.monotonic()
    asyncio.run(approve(Approve(services(store, approval_mode="hold", podinfo_dir=podinfo)), f))
    assert time.monotonic() - start < 2 and body_of(f)["error"] == "chaperone_approval_pending"

    (podinfo / "annotations").write_text('chaperone.dev/approval-mode="hold"\n')
    held = make_flow(requirement(mode="defer", hold_seconds=1), path="/repos/o/held")
    start = time.monotonic()
    asyncio.run(approve(Approve(services(store, approval_mode="hold", podinfo_dir=podinfo)), held))
    assert time.monotonic() - start >= 0.9 and "held 1s" in body_of(held)["message"]

    (podinfo / "annotations").write_text('chaperone.dev/approval-mode="defer"\n')
    policy_hold = make_flow(requirement(hold_seconds=1), path="/repos/o/policy-hold")
    start = time.monotonic()
    asyncio.run(approve(Approve(services(store, approval_mode="defer", podinfo_dir=podinfo)),
                        policy_hold))
    assert time.monotonic() - start >= 0.9 and "held 1s" in body_of(policy_hold)["message"]


def test_expired_is_a_403_saying_to_ask_again(store):
    f = make_flow(requirement(timeout_seconds=1, hold_seconds=10))
    start = time.monotonic()
    asyncio.run(approve(Approve(services(store)), f))
    assert time.monotonic() - start < 5
    body = body_of(f)
    assert body["error"] == "chaperone_approval_expired" and "ask again" in body["reason"]
    # retries get this answer for rememberOutcomeSeconds (1 h by default), then ask again
    assert body["remembered_until"] and "expired undecided at" in body["reason"]
    assert f"after {body['remembered_until']} a retry opens a new ApprovalRequest" in \
        body["how_to_get_access"]


# ---------------------------------------------------------------------------- fail closed

def test_no_approvals_service_is_a_503(store):
    f = make_flow(requirement())
    asyncio.run(approve(Approve(services(store, approvals=False)), f))
    assert f.response.status_code == 503
    assert body_of(f)["error"] == "chaperone_approval_unavailable"


def test_a_rule_without_approvers_is_a_503(store):
    f = make_flow(requirement(approvers=Approvers()))
    asyncio.run(approve(Approve(services(store)), f))
    assert f.response.status_code == 503 and "names no approvers" in body_of(f)["message"]
    assert store.list() == []


class Flaky:
    """An approvals service whose backend answers 429 twice, then works."""

    def __init__(self, real) -> None:
        self.real, self.calls = real, 0

    async def request(self, **kwargs):
        from chaperone_sidecar.approvals import ApprovalUnavailable, BackendError

        self.calls += 1
        if self.calls <= 2:
            raise ApprovalUnavailable("cannot look up") from BackendError("overloaded", 429)
        return await self.real.request(**kwargs)


def test_transient_backend_failures_are_retried_briefly(store):
    svc = services(store)
    svc.approvals = flaky = Flaky(svc.approvals)
    f = make_flow(requirement(mode="defer"))
    asyncio.run(approve(Approve(svc), f))
    assert flaky.calls == 3 and body_of(f)["error"] == "chaperone_approval_pending"


def test_permanent_backend_failures_are_not_retried(store):
    from chaperone_sidecar.approvals import ApprovalUnavailable, BackendError

    class Forbidden:
        calls = 0

        async def request(self, **kwargs):
            Forbidden.calls += 1
            raise ApprovalUnavailable("cannot create: forbidden") from BackendError("forbidden", 403)

    svc = services(store)
    svc.approvals = Forbidden()
    f = make_flow(requirement())
    asyncio.run(approve(Approve(svc), f))
    assert Forbidden.calls == 1 and f.response.status_code == 503


class Exploding:
    namespace = NS

    async def find(self, labels):
        raise RuntimeError("boom")


def test_an_unexpected_failure_is_never_forwarded():
    svc = services(Exploding())
    f = make_flow(requirement())
    asyncio.run(approve(Approve(svc), f))
    assert f.response.status_code == 503 and "RuntimeError: boom" in body_of(f)["message"]


def test_other_decisions_and_refused_flows_are_left_alone(store):
    addon = Approve(services(store))
    allowed = make_flow(requirement())
    flowctx.get(allowed).decision = Decision("allow")
    refused = make_flow(requirement())
    refused.response = tutils.tresp(status_code=403)
    for f in (allowed, refused):
        ctx = asyncio.run(approve(addon, f))
        assert ctx.request_digest == "" and ctx.approval_request == ""
    assert allowed.response is None and store.list() == []


# ---------------------------------------------------------------------------- streaming, preview

def test_a_streamed_request_is_deferred_at_requestheaders_without_its_body(store):
    svc = services(store)
    f = make_flow(requirement(hold_seconds=30))
    f.request.stream = True
    addon = Approve(svc)

    async def run():
        with taddons.context(addon):
            start = time.monotonic()
            await addon.requestheaders(f)
            return time.monotonic() - start
    assert asyncio.run(run()) < 2  # not held: the upload would pile up in memory
    assert body_of(f)["error"] == "chaperone_approval_pending"
    req = f.request
    headers_only = HTTPRequest(req.method, req.scheme, req.host, req.port, req.path, "",
                               tuple(req.headers.items(multi=True)), b"")
    assert flowctx.get(f).request_digest == request_digest(headers_only)


def test_a_body_of_unknown_length_is_approved_in_requestheaders_and_may_be_held(store):
    """A chunked body may start streaming before `request`: the approval happens first."""
    svc = services(store)
    f = make_flow(requirement(hold_seconds=10))
    f.request.headers["transfer-encoding"] = "chunked"
    addon = Approve(svc)

    async def scenario():
        async def human():
            while not store.list():
                await asyncio.sleep(0.02)
            await asyncio.to_thread(store.decide, store.list()[0]["metadata"]["name"],
                                    "Approved", "alice")
        with taddons.context(addon):
            await asyncio.gather(human(), addon.requestheaders(f))
            assert flowctx.get(f).approved_by == ("alice",)  # held and released, not deferred
            await addon.request(f)  # nothing more to do
    asyncio.run(scenario())
    assert f.response is None and len(store.list()) == 1


def test_the_approval_request_shows_a_masked_body_preview(store):
    f = make_flow(requirement(mode="defer"), body=json.dumps({"aws_secret_access_key": SECRET}).encode())
    ctx = asyncio.run(approve(Approve(services(store)), f))
    preview = store.load(ctx.approval_request)["spec"]["action"]["bodyPreview"]
    assert SECRET not in preview and "[MASKED:" in preview


def test_body_preview_of_binary_and_long_bodies():
    binary = HTTPRequest("PUT", "https", "h", 443, "/", "", (("content-type", "image/png"),), b"\x89PNG" * 10)
    assert body_preview(binary) == "<40 bytes of image/png>"
    long = HTTPRequest("PUT", "https", "h", 443, "/", "", (), b"a" * 10000)
    assert body_preview(long, 100) == "a" * 100 + "... <10000 bytes>"
    assert body_preview(HTTPRequest("GET", "https", "h", 443, "/")) == ""


def test_standalone_mode_shows_the_chaperone_approve_command(store):
    f = make_flow(requirement(mode="defer"))
    ctx = asyncio.run(approve(Approve(services(store, standalone=True, approvals_dir=store.directory)), f))
    assert body_of(f)["approve_command"] == f"chaperone approve {ctx.approval_request}"
    assert approve_command("x", "ns") == \
        """kubectl patch ar x -n ns --type=merge -p '{"spec":{"decision":"Approved"}}'"""


# ---------------------------------------------------------------------------- the real apiserver

@pytest.fixture
def kube_ns(control_plane, crds_installed, tmp_path):
    """A namespace whose ServiceAccount ``claude`` (the sidecar's token) may create, get, list
    and watch ApprovalRequests - what the chart grants the sidecar."""
    cp = control_plane
    ns = f"approve-{uuid.uuid4().hex[:8]}"
    ref = cp.serviceaccount_kubeconfig(ns, "claude")
    token_file = tmp_path / "token"
    token_file.write_text(json.loads(ref.path.read_text())["users"][0]["user"]["token"])
    rules = [{"apiGroups": ["chaperone.dev"], "resources": ["approvalrequests"],
              "verbs": ["create", "get", "list", "watch"]}]
    cp.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "chaperone-sidecar", "namespace": ns}, "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "chaperone-sidecar", "namespace": ns},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "chaperone-sidecar"},
         "subjects": [{"kind": "ServiceAccount", "name": "claude", "namespace": ns}]}]}))
    for _ in range(100):  # the authorizer caches RBAC for a moment
        if cp.kubectl("auth", "can-i", "watch", "approvalrequests.chaperone.dev", "-n", ns,
                      f"--as=system:serviceaccount:{ns}:claude", check=False).stdout.strip() == "yes":
            break
        time.sleep(0.1)
    for _ in range(300):  # a freshly created CRD answers 429 "storage is (re)initializing"
        if cp.kubectl("get", "ar", "-n", ns, check=False).returncode == 0:
            break
        time.sleep(0.1)
    yield cp, ns, token_file
    cp.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_held_flow_is_released_after_an_admin_patches_the_approval_request(kube_ns):
    cp, ns, token_file = kube_ns

    def names() -> list[str]:
        out = cp.kubectl("get", "ar", "-n", ns, "-o", "name").stdout.split()
        return [line.split("/", 1)[1] for line in out]

    def admin_approves(name: str) -> None:
        # The command the refusal shows, run as the cluster admin. The operator's admission
        # webhook (which stamps decidedBy) is not running here, so decidedBy is sent along.
        cp.kubectl("patch", "ar", name, "-n", ns, "--type=merge",
                   "-p", json.dumps({"spec": {"decision": "Approved", "decidedBy": "admin"}}))

    async def scenario():
        backend = KubeApprovalBackend(KubeClient(cp.url, token_file, cp.ca_path), ns)
        svc = services(backend)
        addon = Approve(svc)
        try:
            f = make_flow(requirement(hold_seconds=30), ns=ns)

            async def admin():
                deadline = time.monotonic() + 30
                while not (found := await asyncio.to_thread(names)):
                    assert time.monotonic() < deadline, f"no ApprovalRequest: {f.response}"
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.3)
                await asyncio.to_thread(admin_approves, found[0])
                return found[0]

            with Ticker() as ticker:
                start = time.monotonic()
                name, ctx = await asyncio.gather(admin(), approve(addon, f))
                held = time.monotonic() - start
            retry = make_flow(requirement(hold_seconds=30), ns=ns)
            retry_ctx = await approve(addon, retry)
            return f, ctx, name, held, ticker.ticks, retry, retry_ctx
        finally:
            await svc.approvals.close()

    f, ctx, name, held, ticks, retry, retry_ctx = asyncio.run(scenario())
    assert f.response is None and ctx.approval_request == name and ctx.approved_by == ("admin",)
    assert held < 30 and ticks > 5
    obj = json.loads(cp.kubectl("get", "ar", name, "-n", ns, "-o", "json").stdout)
    assert obj["spec"]["requester"]["serviceAccount"] == f"system:serviceaccount:{ns}:claude"
    assert obj["spec"]["requestDigest"] == ctx.request_digest
    assert obj["spec"]["rule"] == {"policy": "team-a/github", "name": "deletes-need-approval"}
    assert retry.response is None and retry_ctx.grant == "exact"  # the retry rides the grant
    assert names() == [name]


def test_a_forged_grant_is_refused_counted_logged_and_recorded(store, caplog):
    from chaperone_sidecar.addons.record import Record
    from chaperone_sidecar.approvals.digest import action_key
    from chaperone_sidecar.approvals.grants import Grant, grant_key
    from chaperone_sidecar.approvals.objects import subject_key

    svc = services(store)
    f = make_flow(requirement(mode="defer", grant_scope="action"))
    ctx = flowctx.get(f)
    key = grant_key("action", subject_key(ctx.identity, ctx.connection),
                    action_key(ctx.connection, ctx.action))
    asyncio.run(svc.grants.put(key, Grant("action", "no-such-request", ("alice",), time.time() + 900)))
    with caplog.at_level("WARNING", logger="chaperone.approve"):
        asyncio.run(approve(Approve(svc), f))
    body = body_of(f)
    assert body["error"] == "chaperone_approval_pending"  # the normal path: a real request
    assert len(store.list()) == 1 and ctx.grant == "" and not ctx.approved_by
    assert ctx.refused_grants == ("action grant: it names ApprovalRequest 'no-such-request', "
                                  "which does not exist",)
    assert svc.approvals.refused_grants == 1
    assert any("forged or invalid grant" in r.getMessage() for r in caplog.records)
    event = Record(svc)._approval_event(f, ctx)
    assert event["data"]["refusedGrants"] == list(ctx.refused_grants)
    assert asyncio.run(svc.grants.get(key)) is None  # dropped: not tried again and again
