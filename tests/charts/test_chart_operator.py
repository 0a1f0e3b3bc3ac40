"""The chart's operator parts: Deployment, Service, webhooks, RBAC, values and their schema.

Rendered with the real helm; what renders is checked against the operator's code (handler ids,
environment variables) so the two cannot drift, and accepted by the real apiserver.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import padding

from chaperone_operator.handlers import WEBHOOKS
from chaperone_operator.injection.settings import ENV_VARS as INJECTION_ENV
from chaperone_operator.injection.settings import InjectionSettings
from chaperone_operator.settings import ENV as OPERATOR_ENV
from chaperone_operator.settings import OperatorSettings

CHART_NS = "chaperone-system"


@pytest.fixture(scope="module")
def helm(repo_root):
    if os.environ.get("HELM_BIN") and os.access(os.environ["HELM_BIN"], os.X_OK):
        return os.environ["HELM_BIN"]
    res = subprocess.run([str(repo_root / "hack" / "build-helm.sh")], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.fail(f"helm could not be built: {res.stderr[-2000:]}", pytrace=False)
    return res.stdout.strip().splitlines()[-1]


def run_helm(helm, repo_root, *args: str, namespace: str = CHART_NS) -> subprocess.CompletedProcess:
    return subprocess.run([helm, "template", "chaperone", str(repo_root / "charts" / "chaperone"),
                           "--namespace", namespace, "--kube-version", "1.33.0", *args],
                          capture_output=True, text=True)


def render(helm, repo_root, *args: str, namespace: str = CHART_NS) -> list[dict]:
    res = run_helm(helm, repo_root, *args, namespace=namespace)
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def one(docs, kind, name=None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in found])
    return found[0]


def webhooks(docs) -> dict[str, tuple[str, dict]]:
    out = {}
    for kind, short in (("MutatingWebhookConfiguration", "mutating"),
                        ("ValidatingWebhookConfiguration", "validating")):
        for hook in one(docs, kind, "chaperone")["webhooks"]:
            out[hook["name"]] = (short, hook)
    return out


def test_defaults_render_every_operator_object(helm, repo_root):
    docs = render(helm, repo_root)
    for kind, name in (("ServiceAccount", "chaperone-operator"), ("Deployment", "chaperone-operator"),
                       ("Service", "chaperone-operator"), ("Secret", "chaperone-webhook-tls"),
                       ("ClusterRole", "chaperone-operator"), ("ClusterRole", "chaperone-sidecar"),
                       ("ClusterRoleBinding", "chaperone-operator")):
        assert one(docs, kind, name)["metadata"]["labels"]["app.kubernetes.io/name"] == "chaperone"
    assert "clusterkopfpeerings.kopf.dev" not in [  # no peering by default
        d["metadata"]["name"] for d in docs if d["kind"] == "CustomResourceDefinition"]
    service = one(docs, "Service", "chaperone-operator")
    assert service["spec"]["ports"] == [{"name": "webhook", "port": 443, "targetPort": "webhook",
                                         "protocol": "TCP"}]


def test_webhooks_are_fail_closed_and_scoped(helm, repo_root):
    hooks = webhooks(render(helm, repo_root))
    assert {name.removesuffix(".chaperone.dev") for name in hooks} == set(WEBHOOKS)
    for name, (kind, hook) in hooks.items():
        path = name.removesuffix(".chaperone.dev")
        assert (kind, hook["rules"][0]["resources"][0]) == WEBHOOKS[path]
        assert hook["clientConfig"]["service"] == {"name": "chaperone-operator", "namespace": CHART_NS,
                                                   "path": f"/{path}", "port": 443}
        if path == "approvalrequest-delete":  # audit only: an outage must never block deletes
            assert hook["failurePolicy"] == "Ignore"
        else:
            assert hook["failurePolicy"] == "Fail"
        assert hook["sideEffects"] == "None"
        assert 1 <= hook["timeoutSeconds"] <= 10
        assert hook["admissionReviewVersions"] == ["v1"]
    _, pods = hooks["pod-mutate.chaperone.dev"]
    assert pods["rules"][0]["operations"] == ["CREATE"]
    assert pods["objectSelector"] == {"matchLabels": {"chaperone.dev/inject": "true"}}
    assert pods["namespaceSelector"]["matchExpressions"] == [{
        "key": "kubernetes.io/metadata.name", "operator": "NotIn",
        "values": ["kube-system", "kube-public", "kube-node-lease", CHART_NS]}]
    for name, (_, hook) in hooks.items():
        if name != "pod-mutate.chaperone.dev":  # chaperone kinds: guarded everywhere
            assert "namespaceSelector" not in hook and "objectSelector" not in hook
            want = ["DELETE"] if name == "approvalrequest-delete.chaperone.dev" else ["CREATE", "UPDATE"]
            assert hook["rules"][0]["operations"] == want


def test_generated_serving_certificate_matches_the_ca_bundle(helm, repo_root):
    docs = render(helm, repo_root)
    secret = one(docs, "Secret", "chaperone-webhook-tls")
    assert secret["type"] == "kubernetes.io/tls"
    ca = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["ca.crt"]))
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(),
                           cert.signature_hash_algorithm)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "chaperone-operator.chaperone-system.svc" in sans.get_values_for_type(x509.DNSName)
    for _, hook in webhooks(docs).values():
        assert hook["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]


def test_provided_certificate_and_out_of_cluster_url(helm, repo_root):
    bundle = base64.b64encode(b"-----BEGIN CERTIFICATE-----\n").decode()
    docs = render(helm, repo_root, "--set", f"webhook.caBundle={bundle}", "--set", "webhook.certSecret=mine",
                  "--set", "webhook.url=https://127.0.0.1:9443/")
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"] == ["chaperone-redis"]
    volumes = one(docs, "Deployment", "chaperone-operator")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "webhook-tls", "secret": {"secretName": "mine"}} in volumes
    for name, (_, hook) in webhooks(docs).items():
        assert hook["clientConfig"] == {"url": f"https://127.0.0.1:9443/{name.removesuffix('.chaperone.dev')}",
                                        "caBundle": bundle}
    res = run_helm(helm, repo_root, "--set", "webhook.certSecret=mine")
    assert res.returncode != 0 and "webhook.caBundle is required" in res.stderr


def test_excluded_namespaces(helm, repo_root):
    docs = render(helm, repo_root, "--set", "webhook.excludeNamespaces={ci,kube-system}", namespace="ops")
    _, pods = webhooks(docs)["pod-mutate.chaperone.dev"]
    assert pods["namespaceSelector"]["matchExpressions"][0]["values"] == [
        "kube-system", "kube-public", "kube-node-lease", "ops", "ci"]


def deployment_env(docs) -> dict[str, str]:
    container = one(docs, "Deployment", "chaperone-operator")["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in container["env"]}


def test_deployment_env_is_exactly_what_the_operator_reads(helm, repo_root):
    docs = render(helm, repo_root, "--set", "sidecar.mode=transparent", "--set", "redis.enabled=false",
                  "--set", "redis.url=redis://r:6379/0",
                  "--set", "recording.s3.bucket=recs", "--set", "otel.endpoint=http://otel:4317",
                  "--set", "oidc.issuer=https://dex.example.com", "--set", "oidc.audience=chaperone",
                  "--set", "oidc.caFile=/var/run/secrets/chaperone/sidecar/oidc-ca.crt")
    env = deployment_env(docs)
    known = set(OPERATOR_ENV.values()) | set(INJECTION_ENV) | {"POD_ID"}
    assert set(env) <= known, set(env) - known
    literal = {k: v for k, v in env.items() if v is not None}
    injection = InjectionSettings.from_env(literal)
    assert (injection.default_mode, injection.redis_url, injection.s3_bucket, injection.otel_endpoint) == (
        "transparent", "redis://r:6379/0", "recs", "http://otel:4317")
    assert injection.sidecar_image == "ghcr.io/chaperone-dev/chaperone:0.1.0"
    assert (injection.oidc_issuer, injection.oidc_audience, injection.oidc_username_claim,
            injection.oidc_groups_claim, injection.oidc_ca_file) == (
        "https://dex.example.com", "chaperone", "sub", "groups",
        "/var/run/secrets/chaperone/sidecar/oidc-ca.crt")
    assert InjectionSettings.from_env(
        {k: v for k, v in deployment_env(render(helm, repo_root)).items() if v is not None}
    ).oidc_issuer == ""  # the defaults configure no issuer (and are valid settings)
    op = OperatorSettings.from_env(literal)
    assert op.standalone and op.webhook_cert_file == "/etc/chaperone/webhook/tls.crt"
    container = one(docs, "Deployment", "chaperone-operator")["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["chaperone"] and container["args"][0] == "operator"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_sidecar_role_is_minimal_and_operator_may_bind_only_it(helm, repo_root):
    docs = render(helm, repo_root)
    sidecar = one(docs, "ClusterRole", "chaperone-sidecar")["rules"]
    assert sidecar == [
        {"apiGroups": ["chaperone.dev"], "resources": ["approvalrequests"],
         "verbs": ["create", "get", "list", "watch"]},
        {"apiGroups": ["chaperone.dev"], "resources": ["claudeconnections", "accesspolicies"],
         "verbs": ["get", "list", "watch"]}]
    operator = one(docs, "ClusterRole", "chaperone-operator")["rules"]
    assert {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterroles"], "verbs": ["bind"],
            "resourceNames": ["chaperone-sidecar"]} in operator
    binding = one(docs, "ClusterRoleBinding", "chaperone-operator")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "chaperone-operator",
                                    "namespace": CHART_NS}]


def test_oidc_issuer_needs_an_audience(helm, repo_root):
    res = run_helm(helm, repo_root, "--set", "oidc.issuer=https://dex.example.com")
    assert res.returncode != 0 and "oidc.audience is required with oidc.issuer" in res.stderr
    res = run_helm(helm, repo_root, "--set", "oidc.audience=chaperone")
    assert res.returncode != 0 and "need oidc.issuer" in res.stderr


def test_replicas_need_peering(helm, repo_root):
    res = run_helm(helm, repo_root, "--set", "operator.replicas=2")
    assert res.returncode != 0 and "operator.replicas > 1 needs operator.peering.enabled" in res.stderr
    docs = render(helm, repo_root, "--set", "operator.replicas=2", "--set", "operator.peering.enabled=true")
    assert one(docs, "CustomResourceDefinition", "clusterkopfpeerings.kopf.dev")
    assert deployment_env(docs)["CHAPERONE_STANDALONE"] == "false"
    assert one(docs, "Deployment", "chaperone-operator")["spec"]["replicas"] == 2


@pytest.mark.parametrize("setting, complaint", [
    ("webhook.timeoutSeconds=60", "timeoutSeconds"),
    ("sidecar.mode=sideways", "mode"),
    ("operator.replicas=0", "replicas"),
    ("surprise=1", "surprise"),
    ("redis.url=http://not-redis", "url"),
    ("oidc.issuer=http://dex.example.com", "issuer"),
    ("oidc.caFile=relative/ca.crt", "caFile"),
])
def test_values_schema_rejects_bad_values(helm, repo_root, setting, complaint):
    res = run_helm(helm, repo_root, "--set", setting)
    assert res.returncode != 0 and "values don't meet the specifications of the schema" in res.stderr
    assert complaint in res.stderr


def test_every_value_is_commented(repo_root):
    """Each key with a value is directly preceded by a comment (free-form blocks excepted)."""
    lines = (repo_root / "charts" / "chaperone" / "values.yaml").read_text().splitlines()
    undocumented, free_form_indent = [], None
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z][\w.-]*):(.*)$", line)
        if not m:
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3).strip()
        if free_form_indent is not None and indent > free_form_indent:
            continue  # inside e.g. resources: documented as a whole
        free_form_indent = indent if key == "resources" else None
        if not rest:
            continue  # a group of documented keys
        if not lines[i - 1].strip().startswith("#"):
            undocumented.append(key)
    assert not undocumented


def test_peering_and_replicas_are_accepted_by_the_apiserver(helm, repo_root, control_plane):
    res = subprocess.run([helm, "template", "chaperone", str(repo_root / "charts" / "chaperone"),
                          "--namespace", CHART_NS, "--kube-version", "1.33.0",
                          "--set", "operator.replicas=2", "--set", "operator.peering.enabled=true"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    control_plane.create_namespace(CHART_NS)
    applied = control_plane.kubectl("apply", "--dry-run=server", "-f", "-", input=res.stdout, check=False)
    assert applied.returncode == 0, applied.stderr
    for obj in ("deployment.apps/chaperone-operator",
                "mutatingwebhookconfiguration.admissionregistration.k8s.io/chaperone",
                "validatingwebhookconfiguration.admissionregistration.k8s.io/chaperone",
                "customresourcedefinition.apiextensions.k8s.io/clusterkopfpeerings.kopf.dev"):
        assert re.search(re.escape(obj) + r" (created|configured|unchanged) \(server dry run\)",
                         applied.stdout), applied.stdout
