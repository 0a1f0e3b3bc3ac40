"""Status the operator maintains on the REAL apiserver: connections, policies, namespace plumbing."""

from __future__ import annotations

import base64
import json

import pytest

pytestmark = pytest.mark.controlplane


def conditions(obj: dict) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in (obj.get("status") or {}).get("conditions", [])}


def connection(ns: str, name: str = "github") -> dict:
    return {"apiVersion": "chaperone.dev/v1alpha1", "kind": "ClaudeConnection",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"type": "http", "hosts": ["api.github.com"],
                     "credentials": {"source": "secret", "secretRef": {"name": "github-token"}}}}


def test_connection_status_follows_its_secret_and_injected_pods(running_operator):
    op = running_operator
    ns = op.namespace("conn-status")
    op.apply(connection(ns))
    got = op.wait_for(lambda: (c := conditions(op.get("cc", "github", "-n", ns)))
                      .get("CredentialsFound") and c, what="connection conditions")
    assert got == {"CredentialsFound": ("False", "SecretNotFound"), "Ready": ("False", "CredentialsMissing")}
    status = op.get("cc", "github", "-n", ns)["status"]
    assert status["observedGeneration"] == 1 and status["injectedPods"] == 0

    op.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "github-token", "namespace": ns},
              "data": {"other": base64.b64encode(b"x").decode()}})
    op.cp.kubectl("annotate", "cc", "github", "-n", ns, "touch=1")  # any event re-evaluates
    op.wait_for(lambda: conditions(op.get("cc", "github", "-n", ns)).get("CredentialsFound")
                == ("False", "KeysMissing"), what="KeysMissing")
    op.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "github-token", "namespace": ns},
              "data": {"token": base64.b64encode(b"ghp_x").decode()}})
    op.cp.kubectl("annotate", "cc", "github", "-n", ns, "touch=2", "--overwrite")
    op.wait_for(lambda: conditions(op.get("cc", "github", "-n", ns)) == {
        "CredentialsFound": ("True", "SecretFound"), "Ready": ("True", "Ready")}, what="Ready")

    # The namespace got its interception CA (Secret for sidecars, trust bundle for agents).
    secret = op.get("secret", "chaperone-ca", "-n", ns)
    assert secret["type"] == "kubernetes.io/tls"
    assert "ca.crt" in op.get("configmap", "chaperone-ca-bundle", "-n", ns)["data"]

    # An injected pod using the connection is counted, and its service account gets the
    # sidecar role; both go away with the pod.
    op.cp.kubectl("create", "serviceaccount", "claude", "-n", ns)
    op.create({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "agent", "namespace": ns, "labels": {"chaperone.dev/inject": "true"}},
               "spec": {"serviceAccountName": "claude",
                        "containers": [{"name": "claude", "image": "claude-code:test"}]}})
    pod = op.get("pod", "agent", "-n", ns)
    assert json.loads(pod["metadata"]["annotations"]["chaperone.dev/status"])["connections"] == ["github"]
    op.wait_for(lambda: op.get("cc", "github", "-n", ns)["status"]["injectedPods"] == 1,
                what="injectedPods 1")
    binding = op.get("rolebinding", "chaperone-sidecar", "-n", ns)
    assert binding["roleRef"]["name"] == "chaperone-sidecar"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "claude", "namespace": ns}]
    op.cp.kubectl("delete", "pod", "agent", "-n", ns, "--wait=true")
    op.wait_for(lambda: op.get("cc", "github", "-n", ns)["status"]["injectedPods"] == 0,
                what="injectedPods 0")
    op.wait_for(lambda: op.cp.kubectl("get", "rolebinding", "chaperone-sidecar", "-n", ns,
                                      check=False).returncode != 0,
                what="the sidecar RoleBinding to go with the last injected pod")


def test_policy_status_follows_generations(running_operator):
    op = running_operator
    ns = op.namespace("policy-status")
    policy = {"apiVersion": "chaperone.dev/v1alpha1", "kind": "AccessPolicy",
              "metadata": {"name": "p", "namespace": ns},
              "spec": {"rules": [{"name": "gh", "allow": {}, "match": {"hosts": ["api.github.com"]}}]}}
    op.apply(policy)
    op.wait_for(lambda: (op.get("ap", "p", "-n", ns).get("status") or {}).get("ruleCount") == 1,
                what="ruleCount 1")
    first = op.get("ap", "p", "-n", ns)["status"]["conditions"][0]
    policy["spec"]["rules"].append({"name": "rm", "block": {}, "match": {"methods": ["DELETE"]}})
    op.apply(policy)
    status = op.wait_for(lambda: (s := op.get("ap", "p", "-n", ns)["status"])
                         .get("observedGeneration") == 2 and s, what="generation 2")
    assert status["ruleCount"] == 2
    valid = status["conditions"][0]
    assert (valid["type"], valid["status"], valid["observedGeneration"]) == ("Valid", "True", 2)
    assert valid["lastTransitionTime"] == first["lastTransitionTime"]  # still True: no transition
