"""Sources: list + watch against the real apiserver, fail-closed invalid policies, local files.

The Kubernetes tests run KubeSources exactly as the sidecar does: a ServiceAccount token from
the TokenRequest API in a token directory, the cluster CA, RBAC like the chart's
``chaperone-sidecar`` role, and a downward-API labels file.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
import yaml

from chaperone_sidecar.config import ConnectionMount, SidecarConfig
from chaperone_sidecar.kubeclient import KubeClient
from chaperone_sidecar.policy.classify import classify
from chaperone_sidecar.policy.evaluator import evaluate
from chaperone_sidecar.policy.model import HTTPRequest, Identity
from chaperone_sidecar.selectors import selector_matches
from chaperone_sidecar.snapshot import INVALID_POLICY_RULE, build_snapshot, parse_downward_api
from chaperone_sidecar.sources import FileSources, KubeSources

API = "chaperone.dev/v1alpha1"
IDENTITY = Identity(service_account="ns/agent", pod_namespace="ns", pod_name="p")


def connection(name, hosts, selector=None, type_="http"):
    spec = {"type": type_, "hosts": hosts}
    if selector is not None:
        spec["podSelector"] = {"matchLabels": selector}
    return {"apiVersion": API, "kind": "ClaudeConnection", "metadata": {"name": name}, "spec": spec}


def policy(name, rules, connections=None, **spec):
    body = {"rules": rules, **spec}
    if connections is not None:
        body["connections"] = connections
    return {"apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": name}, "spec": body}


ALLOW_GET = [{"name": "read", "match": {"methods": ["GET"]}, "allow": {}}]


def decide(snap, conn, host, method="GET", path="/"):
    action = classify(HTTPRequest(method, "https", host, 443, path), snap.connection(conn).type)
    return evaluate(snap.policies, action, IDENTITY, conn)


async def eventually(predicate, timeout=20.0, what="condition"):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------- pure parts

def test_downward_api_format_and_selectors():
    labels = parse_downward_api('app="claude"\nteam="a\\"b"\nchaperone.dev/inject="true"\nemoji="\\u00e9"\n')
    assert labels == {"app": "claude", "team": 'a"b', "chaperone.dev/inject": "true", "emoji": "é"}
    assert selector_matches(None, labels) and selector_matches({}, labels)
    assert selector_matches({"matchLabels": {"app": "claude"}}, labels)
    assert not selector_matches({"matchLabels": {"app": "other"}}, labels)
    assert selector_matches({"matchExpressions": [{"key": "team", "operator": "Exists"}]}, labels)
    assert not selector_matches({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["claude"]}]}, labels)
    assert not selector_matches({"matchExpressions": [{"key": "app", "operator": "Weird"}]}, labels)


def test_snapshot_selects_connections_by_labels_and_mounts():
    conns = [connection("mine", ["a.example.com"], {"app": "claude"}),
             connection("theirs", ["b.example.com"], {"app": "other"}),
             connection("later", ["c.example.com"])]
    mounts = [ConnectionMount("mine", "http", credentials_dir="/creds/mine"), ConnectionMount("theirs", "http")]
    snap = build_snapshot(conns, [], namespace="ns", labels={"app": "claude"}, mounts=mounts, only_mounted=True)
    assert list(snap.connections) == ["mine"]  # "later" was not mounted at admission
    assert snap.connection("mine").credentials_dir == "/creds/mine"
    assert snap.routes.match("a.example.com", 443).name == "mine"
    assert build_snapshot(conns, [], namespace="ns", labels={"app": "claude"}).connections.keys() == {"mine", "later"}


def test_an_invalid_policy_blocks_its_connections_with_its_error():
    conns = [connection("github", ["api.github.com"]), connection("other", ["other.example.com"])]
    good = policy("allow-all", ALLOW_GET)
    bad = policy("broken", [{"name": "r", "match": {"pathRegex": "(["}, "block": {}}], connections=["github"])
    snap = build_snapshot(conns, [good, bad], namespace="ns")
    assert list(snap.policy_errors) == ["ns/broken"]
    assert "pathRegex" in snap.policy_errors["ns/broken"][0]
    decision = decide(snap, "github", "api.github.com")
    assert decision.effect == "block" and str(decision.rule) == f"ns/broken#{INVALID_POLICY_RULE}"
    assert "AccessPolicy ns/broken is invalid" in decision.message and "pathRegex" in decision.message
    # Connections the broken policy does not name are unaffected.
    assert decide(snap, "other", "other.example.com").effect == "allow"
    # A policy too broken to say which connections it governs blocks them all.
    worse = {"apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "worse"},
             "spec": {"connections": "github", "rules": "nope"}}
    snap = build_snapshot(conns, [good, worse], namespace="ns")
    assert decide(snap, "other", "other.example.com").effect == "block"


def test_policies_of_other_namespaces_and_duplicates():
    conns = [connection("github", ["api.github.com"])]
    foreign = policy("x", [{"name": "b", "block": {}}])
    foreign["metadata"]["namespace"] = "elsewhere"
    snap = build_snapshot(conns, [policy("p", ALLOW_GET), foreign, policy("p", ALLOW_GET)], namespace="ns")
    assert [p.key for p in snap.policies] == ["ns/p", "ns/p-x"]
    assert "duplicate AccessPolicy ns/p" in snap.policy_errors["ns/p-x"][0]


# ---------------------------------------------------------------------------- real apiserver

@pytest.fixture
def sidecar_identity(control_plane, crds_installed, tmp_path):
    """A namespace, a ServiceAccount with the chart's sidecar rights, and its token directory."""
    ns = f"src-{uuid.uuid4().hex[:8]}"
    control_plane.create_namespace(ns)
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "sidecar", "namespace": ns},
            "rules": [{"apiGroups": ["chaperone.dev"], "resources": ["claudeconnections", "accesspolicies"],
                       "verbs": ["get", "list", "watch"]}]}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": "sidecar", "namespace": ns},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "sidecar"},
               "subjects": [{"kind": "ServiceAccount", "name": "agent", "namespace": ns}]}
    control_plane.kubectl("create", "serviceaccount", "agent", "-n", ns)
    control_plane.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                "items": [role, binding]}))
    token_dir = tmp_path / "token"
    token_dir.mkdir()
    (token_dir / "token").write_text(control_plane.kubectl("create", "token", "agent", "-n", ns).stdout.strip())
    (token_dir / "ca.crt").write_bytes(control_plane.ca_path.read_bytes())
    (token_dir / "namespace").write_text(ns)
    podinfo = tmp_path / "podinfo"
    podinfo.mkdir()
    (podinfo / "labels").write_text('app="claude"\nchaperone.dev/inject="true"\n')
    return ns, token_dir, podinfo


def apply(cp, ns, *objs):
    for obj in objs:
        obj = json.loads(json.dumps(obj))
        obj["metadata"]["namespace"] = ns
        cp.kubectl("apply", "-f", "-", input=json.dumps(obj))


def test_list_and_watch_follow_the_apiserver(control_plane, sidecar_identity):
    ns, token_dir, podinfo = sidecar_identity
    apply(control_plane, ns,
          connection("github", ["api.github.com"], {"app": "claude"}),
          connection("other-team", ["other.example.com"], {"app": "other"}),
          policy("read-only", ALLOW_GET, connections=["github"]))
    config = SidecarConfig(api_server=control_plane.url, pod_namespace=ns, token_dir=token_dir,
                           podinfo_dir=podinfo,
                           connection_mounts=(ConnectionMount("github", "http"),
                                              ConnectionMount("other-team", "http"),
                                              ConnectionMount("late", "http")))

    async def scenario():
        sources = KubeSources(config, debounce=0.01, labels_interval=0.1)
        seen = []
        sources.subscribe(lambda snap: seen.append(snap.generation))
        await sources.start()
        try:
            assert await sources.wait_ready(30), "no first snapshot"
            snap = sources.current
            assert list(snap.connections) == ["github"]  # other-team's selector does not match
            assert [p.key for p in snap.policies] == [f"{ns}/read-only"]
            assert decide(snap, "github", "api.github.com").effect == "allow"
            assert decide(snap, "github", "api.github.com", "DELETE").effect == "block"
            assert sources.connections.lists == 1 and sources.policies.lists == 1

            # A new policy arrives by watch.
            apply(control_plane, ns, policy("no-admin", [{"name": "admin", "match": {"paths": ["/admin/**"]},
                                                          "block": {"message": "no admin"}}]))
            await eventually(lambda: len(sources.current.policies) == 2, what="the new policy")
            decision = decide(sources.current, "github", "api.github.com", path="/admin/x")
            assert decision.effect == "block" and decision.message == "no admin"

            # A changed connection: new hosts route, old ones stop.
            apply(control_plane, ns, connection("github", ["*.github.com"], {"app": "claude"}))
            await eventually(lambda: sources.current.routes.match("uploads.github.com", 443) is not None,
                             what="the changed connection")
            assert sources.current.routes.match("api.github.com", 443).name == "github"

            # A connection created after admission needs a pod restart (not mounted): ignored,
            # even though its selector matches.
            apply(control_plane, ns, connection("late", ["late.example.com"]),
                  connection("unlisted", ["unlisted.example.com"]))
            await eventually(lambda: "late" in sources.current.connections, what="the mounted late connection")
            assert "unlisted" not in sources.current.connections

            # An invalid policy (valid for the CRD schema, not for the compiler) blocks its
            # connection's traffic with a message naming the policy error.
            apply(control_plane, ns, policy("typo", [{"name": "r", "match": {"pathRegex": "(["}, "allow": {}}],
                                            connections=["github"]))
            await eventually(lambda: f"{ns}/typo" in sources.current.policy_errors, what="the invalid policy")
            decision = decide(sources.current, "github", "api.github.com")
            assert decision.effect == "block"
            assert f"AccessPolicy {ns}/typo is invalid" in decision.message
            assert "spec.rules[0].match.pathRegex" in decision.message
            control_plane.kubectl("delete", "accesspolicy", "typo", "-n", ns)
            await eventually(lambda: not sources.current.policy_errors, what="the invalid policy's removal")
            assert decide(sources.current, "github", "api.github.com").effect == "allow"

            # Pod labels change (downward API file): other-team's selector now matches.
            (podinfo / "labels").write_text('app="other"\n')
            await eventually(lambda: "other-team" in sources.current.connections, what="label re-selection")
            assert "github" not in sources.current.connections

            # Deletion.
            control_plane.kubectl("delete", "claudeconnection", "other-team", "-n", ns)
            await eventually(lambda: "other-team" not in sources.current.connections, what="the deletion")
            assert seen == sorted(seen) and sources.current.generation == seen[-1]
        finally:
            await sources.aclose()

    asyncio.run(scenario())


def test_without_rbac_the_sidecar_keeps_retrying(control_plane, crds_installed, tmp_path):
    ns = f"src-{uuid.uuid4().hex[:8]}"
    control_plane.create_namespace(ns)
    control_plane.kubectl("create", "serviceaccount", "nobody", "-n", ns)
    (tmp_path / "token").write_text(control_plane.kubectl("create", "token", "nobody", "-n", ns).stdout.strip())
    (tmp_path / "ca.crt").write_bytes(control_plane.ca_path.read_bytes())
    config = SidecarConfig(api_server=control_plane.url, pod_namespace=ns, token_dir=tmp_path, podinfo_dir=None)

    async def scenario():
        sources = KubeSources(config)
        await sources.start()
        try:
            assert not await sources.wait_ready(1.0)  # never a snapshot without the objects
            assert "403" in sources.connections.last_error
        finally:
            await sources.aclose()

    asyncio.run(scenario())


# ---------------------------------------------------------------------------- watch edge cases

class FakeAPI:
    """An apiserver stand-in for what a real one will not do on demand: drop a watch, send 410."""

    def __init__(self):
        self.rv = 10
        self.items = {"a": connection("a", ["a.example.com"])}
        self.script: list[str] = []  # per watch call: "drop" (one event, then close) or "gone"
        self.watch_rvs: list[str] = []
        self.lists = 0
        self.tokens: list[str] = []

    def app(self):
        from aiohttp import web

        async def handle(request):
            self.tokens.append(request.headers.get("Authorization", ""))
            if not request.path.endswith("/claudeconnections"):  # policies: empty, quiet watch
                if request.query.get("watch") != "1":
                    return web.json_response({"kind": "List", "metadata": {"resourceVersion": "1"},
                                              "items": []})
                await asyncio.sleep(3600)
            if request.query.get("watch") != "1":
                self.lists += 1
                items = []
                for obj in self.items.values():
                    obj = json.loads(json.dumps(obj))
                    obj["metadata"]["resourceVersion"] = str(self.rv)
                    items.append(obj)
                return web.json_response({"kind": "List", "metadata": {"resourceVersion": str(self.rv)},
                                          "items": items})
            self.watch_rvs.append(request.query.get("resourceVersion", ""))
            step = self.script.pop(0) if self.script else "hang"
            resp = web.StreamResponse()
            await resp.prepare(request)
            if step == "drop":
                self.rv += 1
                obj = connection("b", ["b.example.com"])
                obj["metadata"]["resourceVersion"] = str(self.rv)
                self.items["b"] = obj
                await resp.write(json.dumps({"type": "ADDED", "object": obj}).encode() + b"\n")
                await resp.write(json.dumps({"type": "BOOKMARK", "object": {
                    "metadata": {"resourceVersion": str(self.rv + 5)}}}).encode() + b"\n")
                self.rv += 5
            elif step == "gone":
                await resp.write(json.dumps({"type": "ERROR", "object": {
                    "kind": "Status", "code": 410, "message": "too old resource version"}}).encode() + b"\n")
            else:
                await asyncio.sleep(3600)
            return resp

        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", handle)
        return app


def test_watch_resumes_after_a_disconnect_and_relists_on_410(tmp_path):
    from aiohttp import web

    fake = FakeAPI()
    fake.script = ["drop", "gone"]
    (tmp_path / "token").write_text("token-1")

    async def scenario():
        runner = web.AppRunner(fake.app(), shutdown_timeout=0.2, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        config = SidecarConfig(api_server=f"http://127.0.0.1:{port}", pod_namespace="ns",
                               token_dir=tmp_path, podinfo_dir=None,
                               connection_mounts=(ConnectionMount("a", "http"), ConnectionMount("b", "http")))
        # token_refresh_seconds=0: the token file is re-read before every request
        client = KubeClient(config.api_server, config.token_file, None, token_refresh_seconds=0)
        sources = KubeSources(config, client, debounce=0.01)
        await sources.start()
        try:
            await eventually(lambda: fake.lists >= 2 and len(fake.watch_rvs) >= 3, 10, "re-list after 410")
            # 1st watch from the list's rv; 2nd resumed from the bookmark's rv after the drop;
            # after the 410 a fresh list, and the 3rd watch from its rv.
            assert fake.watch_rvs[:2] == ["10", "16"]
            assert fake.watch_rvs[2] == "16" and sources.connections.lists == 2
            await eventually(lambda: set(sources.current.connections) == {"a", "b"}, 5, "both connections")
            # A rotated token is used next time.
            (tmp_path / "token").write_text("token-2")
            await client.request("GET", sources.connections.stream.path)
            assert fake.tokens[0] == "Bearer token-1" and fake.tokens[-1] == "Bearer token-2"
        finally:
            await sources.aclose()
            await runner.cleanup()

    asyncio.run(scenario())


# ---------------------------------------------------------------------------- local files

def test_file_sources_reload_on_change(tmp_path):
    config = SidecarConfig.from_files(tmp_path / "conf", env={})
    root = config.config_dir
    (root / "connections").mkdir()
    (root / "policies").mkdir()
    (root / "connections" / "github.yaml").write_text(yaml.safe_dump(connection("github", ["api.github.com"])))
    (root / "policies" / "read.yaml").write_text(yaml.safe_dump(policy("read", ALLOW_GET)))
    (root / "credentials" / "github").mkdir(parents=True)

    async def scenario():
        sources = FileSources(config, interval=0.05)
        await sources.start()
        try:
            snap = sources.current
            assert list(snap.connections) == ["github"] and decide(snap, "github", "api.github.com").effect == "allow"
            assert snap.connection("github").credentials_dir == str(root / "credentials" / "github")
            # A second policy in a multi-document file at the top level.
            (root / "more.yaml").write_text(yaml.safe_dump_all([
                policy("no-delete", [{"name": "d", "match": {"methods": ["DELETE"]}, "block": {}}]),
                connection("claude", None, type_="anthropic") | {"spec": {"type": "anthropic",
                                                                          "baseURL": "https://api.anthropic.com"}}]))
            await eventually(lambda: len(sources.current.policies) == 2, 5, "reload")
            snap = sources.current
            assert snap.connection("claude").reverse_port == config.reverse_port_base
            # A policy file that is not YAML blocks everything until fixed.
            (root / "policies" / "read.yaml").write_text("rules: [unclosed\n")
            await eventually(lambda: sources.current.policy_errors, 5, "the broken file")
            decision = decide(sources.current, "github", "api.github.com")
            assert decision.effect == "block" and "policies/read.yaml" in decision.message
        finally:
            await sources.aclose()

    asyncio.run(scenario())
