"""Kubernetes classifier: URLs as kubectl and client-go send them, read as RequestInfo would."""

from __future__ import annotations

import pytest

from chaperone_sidecar.policy.classify import classify
from chaperone_sidecar.policy.classify.kubernetes import classify_kubernetes
from chaperone_sidecar.policy.model import HTTPRequest, KubernetesAction


def kube(method: str, target: str) -> HTTPRequest:
    path, _, query = target.partition("?")
    return HTTPRequest(method, "https", "10.0.0.1", 6443, path, query,
                       (("Accept", "application/json"), ("User-Agent", "kubectl/v1.31.0")))


K = KubernetesAction

# id, method, URL, expected KubernetesAction
CASES = [
    ("list-pods", "GET", "/api/v1/namespaces/default/pods?limit=500",
     K("list", "", "v1", "pods", "", "default", "")),
    ("get-pod", "GET", "/api/v1/namespaces/default/pods/web-0",
     K("get", "", "v1", "pods", "", "default", "web-0")),
    ("head-pod", "HEAD", "/api/v1/namespaces/default/pods/web-0",
     K("get", "", "v1", "pods", "", "default", "web-0")),
    ("delete-namespace", "DELETE", "/api/v1/namespaces/prod",
     K("delete", "", "v1", "namespaces", "", "prod", "prod")),
    ("list-namespaces", "GET", "/api/v1/namespaces",
     K("list", "", "v1", "namespaces", "", "", "")),
    ("create-namespace", "POST", "/api/v1/namespaces",
     K("create", "", "v1", "namespaces", "", "", "")),
    ("namespace-status", "PUT", "/api/v1/namespaces/prod/status",
     K("update", "", "v1", "namespaces", "status", "prod", "prod")),
    ("namespace-finalize", "PUT", "/api/v1/namespaces/prod/finalize",
     K("update", "", "v1", "namespaces", "finalize", "prod", "prod")),
    ("exec-post", "POST", "/api/v1/namespaces/ns/pods/p/exec?command=sh&command=-c&command=id"
     "&container=c&stdin=true&stdout=true&tty=true",
     K("create", "", "v1", "pods", "exec", "ns", "p", container="c", command=("sh", "-c", "id"))),
    # The WebSocket handshake is a GET; Kubernetes authorizes it as create too (1.35+).
    ("exec-get-websocket", "GET", "/api/v1/namespaces/ns/pods/p/exec?command=sh&stdin=true",
     K("create", "", "v1", "pods", "exec", "ns", "p", command=("sh",))),
    ("attach", "POST", "/api/v1/namespaces/ns/pods/p/attach?stdin=true",
     K("create", "", "v1", "pods", "attach", "ns", "p")),
    ("portforward", "POST", "/api/v1/namespaces/ns/pods/p/portforward",
     K("create", "", "v1", "pods", "portforward", "ns", "p")),
    ("log", "GET", "/api/v1/namespaces/ns/pods/p/log?container=c&follow=true",
     K("get", "", "v1", "pods", "log", "ns", "p")),
    ("eviction", "POST", "/api/v1/namespaces/ns/pods/p/eviction",
     K("create", "", "v1", "pods", "eviction", "ns", "p")),
    ("pod-proxy-subresource", "GET", "/api/v1/namespaces/ns/pods/p/proxy/metrics",
     K("get", "", "v1", "pods", "proxy", "ns", "p")),
    ("node-proxy", "GET", "/api/v1/nodes/n1/proxy/stats/summary",
     K("get", "", "v1", "nodes", "proxy", "", "n1")),
    ("get-deployment", "GET", "/apis/apps/v1/namespaces/ns/deployments/d",
     K("get", "apps", "v1", "deployments", "", "ns", "d")),
    ("scale-deployment", "PATCH", "/apis/apps/v1/namespaces/ns/deployments/d/scale",
     K("patch", "apps", "v1", "deployments", "scale", "ns", "d")),
    ("update-status", "PUT", "/apis/apps/v1/namespaces/ns/deployments/d/status",
     K("update", "apps", "v1", "deployments", "status", "ns", "d")),
    ("apply-patch", "PATCH", "/apis/apps/v1/namespaces/ns/deployments/d?fieldManager=kubectl&force=true",
     K("patch", "apps", "v1", "deployments", "", "ns", "d")),
    ("watch-query", "GET", "/api/v1/pods?watch=true",
     K("watch", "", "v1", "pods", "", "", "")),
    ("watch-one", "GET", "/api/v1/pods?watch=1&resourceVersion=10",
     K("watch", "", "v1", "pods", "", "", "")),
    ("watch-false", "GET", "/api/v1/pods?watch=false",
     K("list", "", "v1", "pods", "", "", "")),
    ("watch-zero", "GET", "/api/v1/pods?watch=0",
     K("list", "", "v1", "pods", "", "", "")),
    ("watch-prefix", "GET", "/api/v1/watch/namespaces/ns/pods",
     K("watch", "", "v1", "pods", "", "ns", "")),
    ("watch-prefix-named", "GET", "/apis/apps/v1/watch/namespaces/ns/deployments/d",
     K("watch", "apps", "v1", "deployments", "", "ns", "d")),
    ("kubectl-get-watch-by-name", "GET",
     "/api/v1/namespaces/ns/pods?fieldSelector=metadata.name%3Dweb-0&watch=true",
     K("watch", "", "v1", "pods", "", "ns", "web-0")),
    ("field-selector-other-field", "GET", "/api/v1/pods?fieldSelector=spec.nodeName%3Dn1",
     K("list", "", "v1", "pods", "", "", "")),
    ("proxy-verb", "GET", "/api/v1/proxy/namespaces/ns/services/svc/some/path",
     K("proxy", "", "v1", "services", "", "ns", "svc")),
    ("deletecollection", "DELETE", "/api/v1/namespaces/ns/pods",
     K("deletecollection", "", "v1", "pods", "", "ns", "")),
    ("deletecollection-cluster", "DELETE", "/apis/rbac.authorization.k8s.io/v1/clusterroles?labelSelector=a%3Db",
     K("deletecollection", "rbac.authorization.k8s.io", "v1", "clusterroles", "", "", "")),
    ("cluster-scoped-get", "GET", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/admin",
     K("get", "rbac.authorization.k8s.io", "v1", "clusterrolebindings", "", "", "admin")),
    ("put-configmap", "PUT", "/api/v1/namespaces/ns/configmaps/cm",
     K("update", "", "v1", "configmaps", "", "ns", "cm")),
    ("secret-get", "GET", "/api/v1/namespaces/kube-system/secrets/token",
     K("get", "", "v1", "secrets", "", "kube-system", "token")),
    ("crd-custom-resource", "PATCH",
     "/apis/chaperone.dev/v1alpha1/namespaces/team/approvalrequests/ar-1",
     K("patch", "chaperone.dev", "v1alpha1", "approvalrequests", "", "team", "ar-1")),
    ("encoded-path", "GET", "/api/v1/namespaces/ns/pods/p%2Fexec",
     K("create", "", "v1", "pods", "exec", "ns", "p")),
    ("trailing-slash", "GET", "/api/v1/namespaces/ns/pods/",
     K("list", "", "v1", "pods", "", "ns", "")),
    ("options-method", "OPTIONS", "/api/v1/namespaces/ns/pods/p",
     K("", "", "v1", "pods", "", "ns", "p")),
]

NON_RESOURCE = [
    ("GET", "/version"), ("GET", "/healthz"), ("GET", "/readyz?verbose"), ("GET", "/livez"),
    ("GET", "/api"), ("GET", "/api/v1"), ("GET", "/apis"), ("GET", "/apis/apps"),
    ("GET", "/apis/apps/v1"), ("GET", "/openapi/v2"), ("GET", "/openapi/v3/apis/apps/v1"),
    ("GET", "/"), ("POST", "/metrics"), ("GET", ""),
]


@pytest.mark.parametrize("method, url, expected", [pytest.param(m, u, e, id=i) for i, m, u, e in CASES])
def test_resource_requests(method, url, expected):
    errors: list[str] = []
    assert classify_kubernetes(kube(method, url), errors) == expected
    # unknown methods have no verb and say so; everything else is clean
    assert bool(errors) == (method == "OPTIONS")


@pytest.mark.parametrize("method, url", NON_RESOURCE)
def test_non_resource_requests(method, url):
    action = classify(kube(method, url), "kubernetes")
    assert action.kubernetes == KubernetesAction(verb=method.lower(), is_resource_request=False)
    assert action.name == f"kubernetes:{method.lower()}:{url.partition('?')[0] or '/'}"
    assert action.errors == ()


def test_special_verb_without_resource_is_an_error():
    # RequestInfo: a special verb needs at least a resource after it, else it is an error
    action = classify(kube("GET", "/api/v1/watch"), "kubernetes")
    assert action.kubernetes.is_resource_request is True
    assert any("unable to determine" in e for e in action.errors)


@pytest.mark.parametrize("method, url, name, summary", [
    ("DELETE", "/api/v1/namespaces/prod", "kubernetes:delete/namespaces", "delete namespaces/prod"),
    ("GET", "/api/v1/namespaces/default/pods?limit=500", "kubernetes:list/pods", "list pods in default"),
    ("POST", "/api/v1/namespaces/ns/pods/p/exec?command=sh&command=-c&command=id&stdin=true",
     "kubernetes:create/pods/exec", "create pods/p/exec in ns (container: (default); command: sh -c id)"),
    ("GET", "/apis/apps/v1/namespaces/ns/deployments/d", "kubernetes:get/deployments",
     "get deployments.apps/d in ns"),
    ("DELETE", "/api/v1/namespaces/ns/pods", "kubernetes:deletecollection/pods",
     "deletecollection pods in ns"),
    ("GET", "/api/v1/namespaces/ns/pods/p/log", "kubernetes:get/pods/log", "get pods/p/log in ns"),
    ("GET", "/version", "kubernetes:get:/version", "get /version"),
    ("OPTIONS", "/api/v1/namespaces/ns/pods/p", "kubernetes:unknown/pods", "unknown pods/p in ns"),
])
def test_names_and_summaries(method, url, name, summary):
    action = classify(kube(method, url), "kubernetes")
    assert (action.name, action.summary) == (name, summary)
    assert action.connection_type == "kubernetes"
    assert action.aws is None and action.anthropic is None


# ---------------------------------------------------------------------------- connect subresources

WEBSOCKET = (("Connection", "Upgrade"), ("Upgrade", "websocket"),
             ("Sec-WebSocket-Protocol", "v5.channel.k8s.io"), ("Sec-WebSocket-Version", "13"))
SPDY = (("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1"),
        ("X-Stream-Protocol-Version", "v5.channel.k8s.io"))


def _with(method: str, target: str, headers=()) -> HTTPRequest:
    path, _, query = target.partition("?")
    return HTTPRequest(method, "https", "10.0.0.1", 6443, path, query, tuple(headers))


@pytest.mark.parametrize("sub", ["exec?command=sh&stdin=true&stdout=true", "attach?stdin=true",
                                 "portforward"])
@pytest.mark.parametrize("method", ["GET", "POST", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS",
                                    "CONNECT"])
@pytest.mark.parametrize("headers", [WEBSOCKET, SPDY, ()], ids=["websocket", "spdy", "no-upgrade"])
def test_connect_subresources_are_create_whatever_the_method(sub, method, headers):
    action = classify(_with(method, f"/api/v1/namespaces/ns/pods/p/{sub}", headers), "kubernetes")
    name = sub.partition("?")[0]
    assert action.kubernetes.verb == "create", action
    assert action.name == f"kubernetes:create/pods/{name}"


@pytest.mark.parametrize("resource", ["pods/p", "services/s:8080", "nodes/n"])
def test_proxy_upgrades_are_create_plain_proxied_reads_stay_get(resource):
    where = "" if resource.startswith("nodes") else "namespaces/ns/"
    url = f"/api/v1/{where}{resource}/proxy/exec/ns/p/c?command=id"
    kind = resource.partition("/")[0]
    for headers in (WEBSOCKET, SPDY, (("Upgrade", "h2c"),), (("Connection", "keep-alive, Upgrade"),)):
        action = classify(_with("GET", url, headers), "kubernetes")
        assert action.name == f"kubernetes:create/{kind}/proxy", (headers, action)
    assert classify(_with("CONNECT", url), "kubernetes").kubernetes.verb == "create"
    assert classify(_with("GET", url), "kubernetes").name == f"kubernetes:get/{kind}/proxy"
    assert classify(_with("POST", url), "kubernetes").name == f"kubernetes:create/{kind}/proxy"


def test_websocket_watch_keeps_its_verb():
    action = classify(_with("GET", "/api/v1/namespaces/ns/pods?watch=1", WEBSOCKET), "kubernetes")
    assert action.kubernetes.verb == "watch"


def test_a_policy_on_create_pods_exec_sees_the_websocket_handshake():
    from chaperone_sidecar.policy.compiler import compile_policy
    from chaperone_sidecar.policy.evaluator import evaluate
    from chaperone_sidecar.policy.matching import CompiledPolicySet
    from chaperone_sidecar.policy.model import Identity

    pols = CompiledPolicySet([compile_policy({
        "apiVersion": "chaperone.dev/v1alpha1", "kind": "AccessPolicy",
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": {"defaultEffect": "allow", "rules": [
            {"name": "no-shells", "match": {"kubernetes": {"verbs": ["create"],
                                                           "resources": ["pods/exec", "pods/attach",
                                                                         "pods/portforward"]}},
             "block": {}}]}}, "ns")])
    for sub in ("exec?command=sh", "attach", "portforward"):
        req = _with("GET", f"/api/v1/namespaces/ns/pods/p/{sub}", WEBSOCKET)
        assert evaluate(pols, classify(req, "kubernetes"), Identity(), "k8s").effect == "block", sub
