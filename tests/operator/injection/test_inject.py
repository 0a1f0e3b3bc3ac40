"""Sidecar injection: golden files, JSONPatch correctness, refusals, and the real apiserver.

Golden files: testdata/inject/NAME.yaml holds `pod` (or `podFrom: OTHER`, the injected output of
case OTHER), `settings` (CHAPERONE_* variables, as the operator reads them), `connections` and
`userInfo`; NAME.injected.yaml is the mutated pod. Regenerate with REFRESH_GOLDEN=1.

Every patch is checked by applying it with the strict RFC 6902 applier below and comparing with
the mutated pod; on the control plane, every golden pod is accepted by `kubectl create
--dry-run=server`, and a real webhook serving `inject()` mutates pods exactly as the function says.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from chaperone_operator.injection.agent import merge_no_proxy, redact
from chaperone_operator.injection.connections import (
    applicable_connections,
    no_proxy_entry_reaches,
    split_host,
)
from chaperone_operator.injection.inject import inject
from chaperone_operator.injection.iptables import iptables_rules, iptables_script
from chaperone_operator.injection.patch import escape, make_patch, pointer
from chaperone_operator.injection.settings import ENV_VARS, InjectionSettings, quantity_bytes
from chaperone_sidecar import contract
from chaperone_sidecar.api import LABEL_INJECT
from chaperone_sidecar.selectors import selector_matches

TESTDATA = Path(__file__).parent / "testdata" / "inject"
REPO = Path(__file__).resolve().parents[3]
CASES = sorted(p.name[: -len(".yaml")] for p in TESTDATA.glob("*.yaml")
               if not p.name.endswith(".injected.yaml"))
REFRESH = os.environ.get("REFRESH_GOLDEN", "") not in ("", "0")


# --------------------------------------------------------------------------- helpers
class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str_representer(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    # Multi-line strings (the iptables script) as literal blocks: readable golden diffs.
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_NoAliasDumper.add_representer(str, _str_representer)


def dump_yaml(obj: Any) -> str:
    return yaml.dump(obj, Dumper=_NoAliasDumper, sort_keys=False, default_flow_style=False,
                     width=100)


def load_case(name: str) -> dict[str, Any]:
    case = yaml.safe_load((TESTDATA / f"{name}.yaml").read_text())
    if "podFrom" in case:
        case["pod"] = run_case(case["podFrom"]).pod
    return case


def case_settings(case: dict[str, Any]) -> InjectionSettings:
    return InjectionSettings.from_env({k: str(v) for k, v in (case.get("settings") or {}).items()})


def run_case(name: str):
    case = load_case(name)
    return inject(case["pod"], case_settings(case), case.get("connections") or [],
                  case.get("userInfo"))


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def apply_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """A strict RFC 6902 applier: fails on any operation the API server would reject."""
    doc = copy.deepcopy(doc)
    for op in ops:
        assert set(op) <= {"op", "path", "value", "from"}, op
        kind, path = op["op"], op["path"]
        assert path.startswith("/"), f"path must be a JSON pointer: {op}"
        tokens = [_unescape(t) for t in path.split("/")[1:]]
        parent = doc
        for token in tokens[:-1]:
            parent = parent[_index(parent, token)] if isinstance(parent, list) else parent[token]
        last = tokens[-1]
        if isinstance(parent, list):
            if kind == "add":
                idx = len(parent) if last == "-" else _index(parent, last, allow_end=True)
                parent.insert(idx, copy.deepcopy(op["value"]))
            elif kind == "remove":
                del parent[_index(parent, last)]
            elif kind == "replace":
                parent[_index(parent, last)] = copy.deepcopy(op["value"])
            else:
                raise AssertionError(f"unexpected op {op}")
        else:
            assert isinstance(parent, dict), f"{path}: parent is not a container"
            if kind == "add":
                parent[last] = copy.deepcopy(op["value"])
            elif kind == "remove":
                assert last in parent, f"remove of a missing member: {op}"
                del parent[last]
            elif kind == "replace":
                assert last in parent, f"replace of a missing member: {op}"
                parent[last] = copy.deepcopy(op["value"])
            else:
                raise AssertionError(f"unexpected op {op}")
    return doc


def _index(lst: list, token: str, allow_end: bool = False) -> int:
    assert re.fullmatch(r"0|[1-9][0-9]*", token), f"bad array index {token!r}"
    idx = int(token)
    assert idx < len(lst) or (allow_end and idx == len(lst)), f"index {idx} out of range"
    return idx


def container(pod: dict, name: str) -> dict:
    spec = pod["spec"]
    for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
        if c["name"] == name:
            return c
    raise KeyError(name)


def env_of(c: dict) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env") or []}


def status_of(pod: dict) -> dict:
    return json.loads(pod["metadata"]["annotations"][contract.STATUS_ANNOTATION])


# --------------------------------------------------------------------------- golden files
@pytest.mark.parametrize("name", CASES)
def test_golden(name):
    result = run_case(name)
    assert result.allowed, result.refused
    golden = TESTDATA / f"{name}.injected.yaml"
    if REFRESH:
        golden.write_text(f"# Generated from {name}.yaml by test_inject.py (REFRESH_GOLDEN=1).\n"
                          + dump_yaml(result.pod))
    assert golden.exists(), f"{golden.name} missing: run with REFRESH_GOLDEN=1"
    assert yaml.safe_load(golden.read_text()) == result.pod, (
        f"{name}: injection differs from {golden.name} (REFRESH_GOLDEN=1 to accept)")


@pytest.mark.parametrize("name", CASES)
def test_patch_applies_to_the_mutated_pod(name):
    case = load_case(name)
    result = run_case(name)
    assert apply_patch(case["pod"], result.patch) == result.pod
    # The webhook sends the patch as JSON: it must round-trip unchanged.
    assert json.loads(json.dumps(result.patch)) == result.patch


@pytest.mark.parametrize("name", CASES)
def test_idempotent_and_deterministic(name):
    case = load_case(name)
    before = copy.deepcopy(case["pod"])
    first, second = run_case(name), run_case(name)
    assert case["pod"] == before, "inject() must not modify its input"
    assert first.patch == second.patch and first.pod == second.pod
    again = inject(first.pod, case_settings(case), case.get("connections") or [],
                   case.get("userInfo"))
    assert again.patch == [] and again.pod == first.pod


def test_golden_cases_cover_the_brief():
    required = {"basic-explicit", "transparent", "several-containers", "existing-env",
                "existing-initcontainers", "generatename", "already-injected", "no-connection",
                "aws-anthropic", "spoofed-creator"}
    assert required <= set(CASES)


def test_already_injected_is_a_no_op():
    assert run_case("already-injected").patch == []


# --------------------------------------------------------------------------- case specifics
def test_basic_explicit():
    pod = run_case("basic-explicit").pod
    agent = env_of(container(pod, "claude"))
    for var in contract.PROXY_VARS:
        assert agent[var] == "http://127.0.0.1:15001"
    for var in contract.CA_VARS:
        assert agent[var] == "/etc/chaperone/trust/ca.crt"
    assert agent["NO_PROXY"] == agent["no_proxy"] == "localhost,127.0.0.1,::1"
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["chaperone-sidecar"]
    sidecar = container(pod, "chaperone-sidecar")
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["args"] == ["sidecar", "--mode", "explicit", "--port", "15001",
                               "--health-port", "15021"]
    sc = sidecar["securityContext"]
    assert (sc["runAsUser"], sc["runAsGroup"], sc["runAsNonRoot"]) == (1337, 1337, True)
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    senv = env_of(sidecar)
    assert json.loads(senv["CHAPERONE_CONNECTIONS"]) == [{
        "name": "tickets-api", "type": "http",
        "credentialsDir": "/var/run/secrets/chaperone/connections/tickets-api"}]
    assert json.loads(senv["CHAPERONE_CREATOR"]) == {
        "username": "dave", "uid": "5f0c1c4e-0000-4000-8000-000000000001",
        "groups": ["developers", "system:authenticated"]}
    assert senv["CHAPERONE_POD_NAME"] == {"fieldRef": {"apiVersion": "v1",
                                                       "fieldPath": "metadata.name"}}
    # Credentials and the API token: sidecar only.
    agent_mounts = {m["name"] for m in container(pod, "claude")["volumeMounts"]}
    assert agent_mounts == {"chaperone-trust"}
    sidecar_mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    assert sidecar_mounts["/var/run/secrets/kubernetes.io/serviceaccount"] == "chaperone-token"
    assert sidecar_mounts["/var/run/secrets/chaperone/connections/tickets-api"].startswith(
        "chaperone-conn-")
    status = status_of(pod)
    assert status["connections"] == ["tickets-api"] and status["denyAll"] is False
    assert status["mode"] == "explicit" and status["agentContainers"] == ["claude"]


def test_transparent():
    pod = run_case("transparent").pod
    init, sidecar = pod["spec"]["initContainers"][:2]
    assert (init["name"], sidecar["name"]) == ("chaperone-init", "chaperone-sidecar")
    assert init["command"] == ["/bin/sh", "-c"]
    settings = InjectionSettings()
    assert init["args"] == [iptables_script(settings)]
    # Every port is redirected (issue 11 item 9): no per-port rule, 6443 included.
    assert "--dport 6443" not in init["args"][0] and "--dport 443" not in init["args"][0]
    sc = init["securityContext"]
    assert sc["runAsUser"] == 0 and sc["runAsNonRoot"] is False
    assert sc["capabilities"] == {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
    agent = env_of(container(pod, "claude"))
    # The user's proxy is neutralised (the redirect does the routing), and recorded.
    assert all(agent[v] is None for v in contract.PROXY_VARS)  # defined, empty
    assert {"name": "HTTPS_PROXY"} in container(pod, "claude")["env"]
    assert "NO_PROXY" not in agent
    assert status_of(pod)["overridden"] == {"claude": {"HTTPS_PROXY": "http://corp-proxy:3128"}}
    # The agent can neither become the sidecar UID (the one UID the rules exempt) nor send
    # frames below netfilter.
    assert container(pod, "claude")["securityContext"] == {
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["NET_RAW", "SETUID"]}}
    upca = json.loads(env_of(sidecar)["CHAPERONE_CONNECTIONS"])[0]["upstreamCAFile"]
    assert upca == "/etc/chaperone/upstream-ca/cluster-api/ca.crt"


def test_several_containers_lose_the_service_account_token():
    case = load_case("several-containers")
    pod = run_case("several-containers").pod
    assert not any(v["name"].startswith("kube-api-access-") for v in pod["spec"]["volumes"])
    for name in ("claude", "tools"):
        mounts = container(pod, name)["volumeMounts"]
        assert all(m["mountPath"] != contract.SA_TOKEN_MOUNT_PATH for m in mounts)
        assert mounts[-1] == {"name": "chaperone-trust", "mountPath": "/etc/chaperone/trust",
                              "readOnly": True}
    assert status_of(pod)["removedVolumes"] == ["kube-api-access-x7mtt"]
    assert status_of(pod)["agentContainers"] == ["claude", "tools"]
    assert case["pod"]["spec"]["volumes"][0] == pod["spec"]["volumes"][0]  # user volume kept


def test_existing_env_is_merged():
    pod = run_case("existing-env").pod
    agent = container(pod, "claude")
    env = env_of(agent)
    # NO_PROXY: entries reaching .amazonaws.com, kubernetes.default.svc, 10.0.0.1 are dropped.
    assert env["NO_PROXY"] == "internal.example.com,localhost,127.0.0.1,::1"
    assert env["HTTPS_PROXY"] == "http://127.0.0.1:15001"
    assert env["SSL_CERT_FILE"] == env["GIT_SSL_CAINFO"] == "/etc/chaperone/trust/ca.crt"
    assert env["EDITOR"] == "vim"
    assert env["TOKEN_FROM_SECRET"] == {"secretKeyRef": {"name": "other", "key": "token"}}
    assert agent["envFrom"] == [{"configMapRef": {"name": "agent-settings"}}]
    # The user's own AWS settings are kept: no placeholders, no region change.
    assert env["AWS_ACCESS_KEY_ID"] == "AKIAUSERSOWNKEY00001"
    assert env["AWS_REGION"] == "eu-central-1" and "AWS_DEFAULT_REGION" not in env
    assert [e["name"] for e in agent["env"]].index("EDITOR") == 0  # order preserved
    overridden = status_of(pod)["overridden"]["claude"]
    assert overridden["HTTPS_PROXY"] == "http://user:REDACTED@corp-proxy:3128"
    assert overridden["SSL_CERT_FILE"] == "/etc/ssl/certs/corp.pem"
    assert overridden["GIT_SSL_CAINFO"] == {"valueFrom": {"configMapKeyRef": {
        "name": "corp-ca", "key": "ca.crt"}}}
    assert overridden["NO_PROXY"].startswith("internal.example.com,.amazonaws.com")
    assert "s3cret" not in json.dumps(pod)


def test_existing_init_containers_run_behind_the_sidecar():
    pod = run_case("existing-initcontainers").pod
    assert [c["name"] for c in pod["spec"]["initContainers"]] == [
        "chaperone-sidecar", "clone", "deps"]
    for name in ("clone", "deps"):
        assert env_of(container(pod, name))["HTTPS_PROXY"] == "http://127.0.0.1:15001"
    assert [v["name"] for v in pod["spec"]["volumes"][:2]] == ["workspace", "settings"]
    # source: none -> no credentials volume at all.
    assert not any(v["name"].startswith("chaperone-conn-") for v in pod["spec"]["volumes"])


def test_generate_name():
    pod = run_case("generatename").pod
    assert "name" not in pod["metadata"] and pod["metadata"]["generateName"] == "claude-run-"


def test_copied_injected_pod_gets_the_new_creator():
    result = run_case("copied-injected-pod")
    changed = {op["path"] for op in result.patch}
    assert changed == {pointer("metadata", "annotations", contract.CREATOR_ANNOTATION),
                       "/spec/initContainers/0/env/5/value"}
    assert json.loads(env_of(container(result.pod, "chaperone-sidecar"))["CHAPERONE_CREATOR"])[
        "username"] == "mallory"


def test_no_connection_means_deny_all():
    pod = run_case("no-connection").pod
    status = status_of(pod)
    assert status["connections"] == [] and status["denyAll"] is True
    assert env_of(container(pod, "chaperone-sidecar"))["CHAPERONE_CONNECTIONS"] == "[]"
    assert env_of(container(pod, "claude"))["HTTPS_PROXY"] == "http://127.0.0.1:15001"


def test_aws_and_anthropic():
    pod = run_case("aws-anthropic").pod
    claude, terraform = env_of(container(pod, "claude")), env_of(container(pod, "terraform"))
    assert claude["AWS_ACCESS_KEY_ID"] == claude["AWS_SECRET_ACCESS_KEY"] == "chaperone-placeholder"
    # The first aws connection by name with a region: aws-audit sorts before aws-prod.
    assert claude["AWS_REGION"] == claude["AWS_DEFAULT_REGION"] == "us-west-2"
    assert claude["ANTHROPIC_API_KEY"] == "chaperone-placeholder"
    reverse = "http://127.0.0.1:15100"
    assert claude["ANTHROPIC_BASE_URL"] == terraform["ANTHROPIC_BASE_URL"] == reverse
    assert "AWS_ACCESS_KEY_ID" not in terraform and terraform["AWS_PROFILE"] == "ops"
    assert terraform["ANTHROPIC_API_KEY"] == "sk-ant-users-own"
    conns = json.loads(env_of(container(pod, "chaperone-sidecar"))["CHAPERONE_CONNECTIONS"])
    assert conns == [
        {"name": "aws-audit", "type": "aws",
         "webIdentityTokenFile": "/var/run/secrets/chaperone/webidentity/aws-audit/token"},
        {"name": "aws-prod", "type": "aws",
         "credentialsDir": "/var/run/secrets/chaperone/connections/aws-prod"},
        {"name": "claude", "type": "anthropic", "reversePort": 15100,
         "credentialsDir": "/var/run/secrets/chaperone/connections/claude"},
    ]
    web = next(v for v in pod["spec"]["volumes"] if v["name"] == "chaperone-webidentity")
    assert web["projected"]["sources"] == [{"serviceAccountToken": {
        "audience": "sts.amazonaws.com", "expirationSeconds": 3607, "path": "aws-audit/token"}}]
    assert status_of(pod)["overridden"] == {
        "terraform": {"ANTHROPIC_BASE_URL": "https://llm-gateway.example.com"}}


def test_spoofed_creator_and_fake_sidecar_are_replaced():
    pod = run_case("spoofed-creator").pod
    creator = json.loads(pod["metadata"]["annotations"][contract.CREATOR_ANNOTATION])
    assert creator["username"] == "mallory"
    assert creator["extra"] == {"authentication.kubernetes.io/credential-id": ["X509SHA256=abcd"]}
    sidecar = container(pod, "chaperone-sidecar")
    assert sidecar["image"] == InjectionSettings().sidecar_image
    ca = next(v for v in pod["spec"]["volumes"] if v["name"] == "chaperone-ca")
    assert ca == {"name": "chaperone-ca", "secret": {"secretName": "chaperone-ca"}}
    assert [m["name"] for m in container(pod, "claude")["volumeMounts"]] == ["chaperone-trust"]
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert status_of(pod)["connections"] == ["tickets-api"]


def test_settings_overrides_reach_the_pod():
    pod = run_case("settings-overrides").pod
    init, sidecar = pod["spec"]["initContainers"]
    script = init["args"][0]
    assert "iptables -w -t nat -A OUTPUT -p tcp '!' -o lo -m owner '!' --uid-owner 2000 " \
        "-j REDIRECT --to-ports 16001\n" in script
    assert "iptables -w -t filter -A OUTPUT -p tcp -d 127.0.0.1 --dport 16001 -j ACCEPT\n" in script
    # CHAPERONE_REDIRECT_IPV6=false: no ip6tables, and no start with IPv6 in the pod.
    assert "ip6tables -w" not in script and "/proc/net/if_inet6" in script
    assert sidecar["image"] == "registry.example.com/chaperone:9.9.9"
    assert sidecar["resources"] == {"requests": {"cpu": "250m", "memory": "256Mi"},
                                    "limits": {"cpu": "1", "memory": "1Gi"}}
    env = env_of(sidecar)
    assert env["CHAPERONE_APPROVAL_MODE"] == "hold"  # the pod annotation beats the default
    assert env["CHAPERONE_SPOOL_LIMIT_BYTES"] == str(2 * 2**30)
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability.svc:4317"
    assert env["CHAPERONE_SIDECAR_SECRET_DIR"] == "/var/run/secrets/chaperone/sidecar"
    assert {k: v for k, v in env.items() if k.startswith("CHAPERONE_OIDC_")} == {
        "CHAPERONE_OIDC_ISSUER": "https://dex.example.com",
        "CHAPERONE_OIDC_AUDIENCE": "chaperone",
        "CHAPERONE_OIDC_USERNAME_CLAIM": "email",
        "CHAPERONE_OIDC_GROUPS_CLAIM": "groups",
        "CHAPERONE_OIDC_CA_FILE": "/var/run/secrets/chaperone/sidecar/oidc-ca.crt"}
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/ready", "port": 16021}
    assert status_of(pod)["version"] == "9.9.9"


# --------------------------------------------------------------------------- refusals
BASE_POD = {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "labels": {"chaperone.dev/inject": "true"}},
            "spec": {"containers": [{"name": "claude", "image": "x"}]}}


def _pod(**spec_changes: Any) -> dict:
    pod = copy.deepcopy(BASE_POD)
    pod["spec"].update(spec_changes)
    return pod


REFUSALS = {
    "host-network": (_pod(hostNetwork=True), "spec.hostNetwork"),
    "share-pid": (_pod(shareProcessNamespace=True), "spec.shareProcessNamespace"),
    "host-pid": (_pod(hostPID=True), "spec.hostPID"),
    "pod-uid": (_pod(securityContext={"runAsUser": 1337}), "sidecar UID"),
    "container-uid": (_pod(containers=[{"name": "a", "image": "x",
                                        "securityContext": {"runAsUser": 1337}}]),
                      "reserved for the sidecar"),
    "reserved-container": (_pod(containers=[{"name": "chaperone-helper", "image": "x"}]),
                           "reserved for Chaperone"),
    "reserved-init": (_pod(initContainers=[{"name": "chaperone-x", "image": "x"}]),
                      "reserved for Chaperone"),
    "port": (_pod(containers=[{"name": "a", "image": "x",
                               "ports": [{"containerPort": 15001}]}]), "port 15001"),
    "trust-dir": (_pod(containers=[{"name": "a", "image": "x", "volumeMounts": [
        {"name": "v", "mountPath": "/etc/chaperone/trust"}]}],
        volumes=[{"name": "v", "emptyDir": {}}]), "CA bundle"),
    "token-path": (_pod(containers=[{"name": "a", "image": "x", "volumeMounts": [
        {"name": "tok", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}]}],
        volumes=[{"name": "tok", "secret": {"secretName": "sa-token"}}]),
        "no service-account token"),
    "api-token-volume": (_pod(containers=[{"name": "a", "image": "x", "volumeMounts": [
        {"name": "tok", "mountPath": "/tok"}]}], volumes=[{"name": "tok", "projected": {
            "sources": [{"serviceAccountToken": {"path": "t"}}]}}]), "Kubernetes API token"),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_refused(name):
    pod, fragment = REFUSALS[name]
    result = inject(pod, InjectionSettings(), [], {"username": "dave"})
    assert not result.allowed and fragment in result.refused
    assert result.patch == [] and result.pod is None


def test_refused_annotations_and_transparent_capabilities():
    bad_mode = copy.deepcopy(BASE_POD)
    bad_mode["metadata"]["annotations"] = {"chaperone.dev/mode": "off"}
    assert "chaperone.dev/mode" in inject(bad_mode, InjectionSettings(), []).refused
    bad_approval = copy.deepcopy(BASE_POD)
    bad_approval["metadata"]["annotations"] = {"chaperone.dev/approval-mode": "never"}
    assert "approval-mode" in inject(bad_approval, InjectionSettings(), []).refused
    net_admin = _pod(containers=[{"name": "a", "image": "x", "securityContext": {
        "capabilities": {"add": ["NET_ADMIN"]}}}])
    assert inject(net_admin, InjectionSettings(), []).allowed  # explicit: no rules to remove
    transparent = InjectionSettings(default_mode="transparent")
    assert "NET_ADMIN" in inject(net_admin, transparent, []).refused
    assert not inject(_pod(containers=[{"name": "a", "image": "x", "securityContext": {
        "privileged": True}}]), transparent, []).allowed
    # A projected token for another audience (e.g. Vault) is not an API credential.
    vault = _pod(containers=[{"name": "a", "image": "x", "volumeMounts": [
        {"name": "tok", "mountPath": "/vault"}]}], volumes=[{"name": "tok", "projected": {
            "sources": [{"serviceAccountToken": {"path": "t", "audience": "vault"}}]}}])
    assert inject(vault, InjectionSettings(), []).allowed


# --------------------------------------------------------------------------- pure helpers
def test_iptables_rules_exact():
    rules = iptables_rules(InjectionSettings(), ["10.96.0.10", "fd00::10"])
    expected = []
    for binary, loopback, resolver in (("iptables", "127.0.0.1", "10.96.0.10"),
                                       ("ip6tables", "::1", "fd00::10")):
        nat = [binary, "-w", "-t", "nat", "-A", "OUTPUT"]
        flt = [binary, "-w", "-t", "filter", "-A", "OUTPUT"]
        expected += [
            nat + ["-p", "tcp", "-d", resolver, "--dport", "53", "-j", "RETURN"],
            # every TCP port, every address: no --dport on the redirect
            nat + ["-p", "tcp", "!", "-o", "lo", "-m", "owner", "!", "--uid-owner", "1337",
                   "-j", "REDIRECT", "--to-ports", "15001"],
            flt + ["-o", "lo", "-j", "ACCEPT"],
            flt + ["-m", "owner", "--uid-owner", "1337", "-j", "ACCEPT"],
            flt + ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
            flt + ["-p", "tcp", "-d", loopback, "--dport", "15001", "-j", "ACCEPT"],
            flt + ["-p", "udp", "-d", resolver, "--dport", "53", "-j", "ACCEPT"],
            flt + ["-p", "tcp", "-d", resolver, "--dport", "53", "-j", "ACCEPT"],
            flt + ["-m", "owner", "--socket-exists", "-j", "REJECT"],
        ]
    assert rules == expected
    # No resolver: no DNS exception at all (UDP refused everywhere).
    assert not any("53" in rule for rule in iptables_rules(InjectionSettings()))
    script = iptables_script(InjectionSettings())
    assert script.startswith("set -eu\n") and "/etc/resolv.conf" in script
    assert 'for ns in $ns6; do ip6tables -w -t nat -A OUTPUT -p tcp -d "$ns" --dport 53' in script
    assert "if_inet6" not in script  # IPv6 has rules; no need to insist it is off


def test_transparent_agents_cannot_go_around_the_rules_by_privilege():
    """Root agents hold CAP_SETUID and CAP_NET_RAW by default: `setpriv --reuid=1337` would
    take them past the netfilter rules (the sidecar UID is exempt), and a packet socket sends
    frames below netfilter. The webhook drops both and sets no_new_privs (no setuid binaries);
    an agent asking for them (or for rule-editing capabilities) is refused."""
    transparent = InjectionSettings(default_mode="transparent")
    pod = _pod(containers=[
        {"name": "root", "image": "x"},
        {"name": "partial", "image": "x", "securityContext": {
            "allowPrivilegeEscalation": True, "runAsUser": 0,
            "capabilities": {"add": ["NET_BIND_SERVICE"], "drop": ["MKNOD", "net_raw"]}}},
        {"name": "hardened", "image": "x", "securityContext": {
            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}])
    result = inject(pod, transparent, [])
    assert result.allowed, result.refused
    sc = {ct["name"]: ct["securityContext"] for ct in result.pod["spec"]["containers"]}
    assert sc["root"] == {"allowPrivilegeEscalation": False,
                          "capabilities": {"drop": ["NET_RAW", "SETUID"]}}
    assert sc["partial"] == {"allowPrivilegeEscalation": False, "runAsUser": 0, "capabilities": {
        "add": ["NET_BIND_SERVICE"], "drop": ["MKNOD", "net_raw", "SETUID"]}}
    assert sc["hardened"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    assert result.status["overridden"]["partial"] == {
        "securityContext.allowPrivilegeEscalation": True}
    assert inject(result.pod, transparent, []).patch == []  # idempotent
    # Explicit mode leaves the security context alone (no UID is exempt there).
    explicit = inject(pod, InjectionSettings(), []).pod
    assert "securityContext" not in explicit["spec"]["containers"][0]
    # Capabilities that defeat the rules, however spelled, are refused.
    for cap in ("NET_ADMIN", "net_admin", "CAP_NET_ADMIN", "cap_sys_admin", " all ", "NET_RAW",
                "cap_net_raw", "SETUID", "CAP_SETUID"):
        bad = _pod(containers=[{"name": "a", "image": "x", "securityContext": {
            "capabilities": {"add": [cap]}}}])
        refused = inject(bad, transparent, []).refused
        assert refused and "NET_ADMIN" in refused and "NET_RAW" in refused, cap
        assert inject(bad, InjectionSettings(), []).allowed  # explicit: nothing to go around


def test_no_proxy_reach():
    hosts = ["*.amazonaws.com", "amazonaws.com", "api.anthropic.com", "k8s.example.com:6443",
             "10.0.0.1"]
    for entry in ["*", ".amazonaws.com", "amazonaws.com", "s3.amazonaws.com", "com",
                  "anthropic.com", ".anthropic.com", "api.anthropic.com", "k8s.example.com",
                  "10.0.0.0/8", "10.0.0.1", "k8s.example.com:443"]:
        assert no_proxy_entry_reaches(entry, hosts), entry
    for entry in ["", "internal.example.com", "example.org", "192.168.0.0/16",
                  "foo.api.anthropic.com", "amazonaws.com.evil"]:
        assert not no_proxy_entry_reaches(entry, hosts), entry
    assert merge_no_proxy(["a.example, *,localhost", "b.example,a.example"],
                          ["x.com"]) == "a.example,localhost,b.example,127.0.0.1,::1"
    assert split_host("[::1]:8443") == ("::1", 8443) and split_host("::1") == ("::1", None)


def test_selectors():
    labels = {"app": "claude", "env": "prod"}
    assert selector_matches(None, labels) and selector_matches({}, labels)
    assert selector_matches({"matchLabels": {"app": "claude"}}, labels)
    assert not selector_matches({"matchLabels": {"app": "other"}}, labels)
    exprs = [({"key": "env", "operator": "In", "values": ["prod"]}, True),
             ({"key": "env", "operator": "NotIn", "values": ["prod"]}, False),
             ({"key": "team", "operator": "NotIn", "values": ["x"]}, True),
             ({"key": "app", "operator": "Exists"}, True),
             ({"key": "app", "operator": "DoesNotExist"}, False),
             ({"key": "app", "operator": "Bogus"}, False)]
    for expr, expected in exprs:
        assert selector_matches({"matchExpressions": [expr]}, labels) is expected, expr
    conns = [{"metadata": {"name": "b"}, "spec": {}},
             {"metadata": {"name": "a"},
              "spec": {"podSelector": {"matchLabels": {"app": "claude"}}}},
             {"metadata": {"name": "c"}, "spec": {"podSelector": {"matchLabels": {"x": "y"}}}}]
    assert [c["metadata"]["name"] for c in applicable_connections(conns, labels)] == ["a", "b"]


def test_patch_pointers_and_diff():
    assert escape("chaperone.dev/status") == "chaperone.dev~1status"
    assert escape("a~b/c") == "a~0b~1c"
    assert pointer("metadata", "annotations", "x/y") == "/metadata/annotations/x~1y"
    old = {"metadata": {"annotations": {"k/1": "a", "gone": "x"}}, "l": [1, 2, 3],
           "m": [{"name": "a", "v": 1}], "t": 1}
    new = {"metadata": {"annotations": {"k/1": "b", "new~": "y"}}, "l": [1],
           "m": [{"name": "a", "v": 2}, {"name": "b"}], "t": True}
    ops = make_patch(old, new)
    assert apply_patch(old, ops) == new
    assert {"op": "replace", "path": "/metadata/annotations/k~11", "value": "b"} in ops
    assert {"op": "add", "path": "/metadata/annotations/new~0", "value": "y"} in ops
    assert {"op": "replace", "path": "/l", "value": [1]} in ops  # shrinking list: replaced
    assert {"op": "replace", "path": "/t", "value": True} in ops  # 1 -> true is a change
    assert make_patch(new, new) == []


def test_settings_from_env():
    s = InjectionSettings.from_env({"CHAPERONE_API_AUDIENCES": "a, b,",
                                    "CHAPERONE_REDIRECT_IPV6": "no", "CHAPERONE_S3_BUCKET": ""})
    assert s.api_audiences == ("a", "b") and s.redirect_ipv6 is False and s.s3_bucket == ""
    assert InjectionSettings.from_env({}) == InjectionSettings()
    for env in ({"CHAPERONE_DEFAULT_MODE": "sometimes"}, {"CHAPERONE_SIDECAR_UID": "0"},
                {"CHAPERONE_PROXY_PORT": "abc"}, {"CHAPERONE_HEALTH_PORT": "15001"},
                {"CHAPERONE_REVERSE_PORT_BASE": "15000"}, {"CHAPERONE_APPROVAL_MODE": "x"},
                {"CHAPERONE_SPOOL_SIZE_LIMIT": "lots"}, {"CHAPERONE_REDIRECT_IPV6": "maybe"},
                {"CHAPERONE_TOKEN_EXPIRATION_SECONDS": "60"},
                {"CHAPERONE_OIDC_ISSUER": "http://dex.example.com", "CHAPERONE_OIDC_AUDIENCE": "c"},
                {"CHAPERONE_OIDC_AUDIENCE": "chaperone"},
                {"CHAPERONE_OIDC_ISSUER": "https://dex.example.com"},
                {"CHAPERONE_OIDC_CA_FILE": "ca.crt", "CHAPERONE_OIDC_ISSUER": "https://dex",
                 "CHAPERONE_OIDC_AUDIENCE": "c"}):
        with pytest.raises(ValueError, match=next(iter(env))):
            InjectionSettings.from_env(env)
    oidc = InjectionSettings.from_env({"CHAPERONE_OIDC_ISSUER": "http://127.0.0.1:5556/dex",
                                       "CHAPERONE_OIDC_AUDIENCE": "chaperone"})
    assert (oidc.oidc_issuer, oidc.oidc_audience, oidc.oidc_username_claim,
            oidc.oidc_groups_claim, oidc.oidc_ca_file) == (
        "http://127.0.0.1:5556/dex", "chaperone", "sub", "groups", "")
    assert quantity_bytes("1Gi") == 2**30 and quantity_bytes("500M") == 500 * 10**6
    assert redact("http://u:p@h:3128/x") == "http://u:REDACTED@h:3128/x"
    assert redact("http://h:3128") == "http://h:3128"


def test_contract_document_names_everything():
    """docs/injection.md is the sidecar's only source: every name written must be in it."""
    doc = (REPO / "docs" / "injection.md").read_text()
    missing = []
    for name, value in vars(contract).items():
        if name.startswith("_") or not name.isupper():
            continue
        values = value if isinstance(value, tuple) else (value,)
        missing += [f"{name}={v!r}" for v in values if isinstance(v, str) and v not in doc]
    missing += [var for var in ENV_VARS if var not in doc]
    assert not missing, f"not documented in docs/injection.md: {missing}"


# --------------------------------------------------------------------------- real apiserver
def _subset(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Differences where `actual` lacks or changes something of `expected` (the API server may
    add defaults, nothing else). Lists must have the same length."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        return [d for k, v in expected.items()
                for d in (_subset(v, actual[k], f"{path}.{k}") if k in actual
                          else [f"{path}.{k}: missing"])]
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return [f"{path}: {len(expected)} items expected, {len(actual)} found"]
        return [d for i, (e, a) in enumerate(zip(expected, actual))
                for d in _subset(e, a, f"{path}[{i}]")]
    return [] if expected == actual else [f"{path}: {expected!r} != {actual!r}"]


@pytest.mark.controlplane
def test_golden_pods_are_valid_for_the_apiserver(control_plane):
    control_plane.create_namespace("inject-golden")
    for name in CASES:
        pod = copy.deepcopy(run_case(name).pod)
        # Validity of the pod itself: without the opt-in label, so the chart's injection
        # webhook (registered while tests/operator/conftest.py's operator runs) stays out.
        del pod["metadata"]["labels"][LABEL_INJECT]
        res = control_plane.kubectl("create", "--dry-run=server", "-n", "inject-golden",
                                    "-o", "json", "-f", "-", input=json.dumps(pod), check=False)
        assert res.returncode == 0, f"{name}: {res.stderr}"
        stored = json.loads(res.stdout)
        diff = _subset(pod["spec"], stored["spec"])
        assert not diff, (name, diff)


TEST_LABEL = "inject-test.chaperone.dev/webhook"


class _WebhookHandler(BaseHTTPRequestHandler):
    server: "_WebhookServer"

    def do_POST(self) -> None:  # noqa: N802 (http.server API)
        review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        request = review["request"]
        self.server.seen.append(request)
        result = inject(request["object"], self.server.settings, self.server.connections,
                        request.get("userInfo"))
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

    def log_message(self, *args: Any) -> None:
        pass


class _WebhookServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, settings: InjectionSettings, connections: list[dict]):
        super().__init__(("127.0.0.1", 0), _WebhookHandler)
        self.settings, self.connections = settings, connections
        self.seen: list[dict[str, Any]] = []


@pytest.fixture
def inject_webhook(control_plane, tmp_path):
    """inject() served as a real mutating webhook for one namespace (HTTPS, generated CA)."""
    from chaperone_testbed.pki import CertAuthority

    ns = "inject-webhook"
    control_plane.create_namespace(ns)
    ca = CertAuthority("inject-webhook-test-ca")
    pair = ca.write_server_cert(tmp_path, "webhook", dns_names=("localhost",),
                                ip_addresses=("127.0.0.1",))
    connections = load_case("basic-explicit")["connections"]
    server = _WebhookServer(InjectionSettings(), connections)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(pair.cert_path, pair.key_path)
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    name = "chaperone-inject-test"
    config = {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{
            "name": "inject.chaperone.dev", "admissionReviewVersions": ["v1"],
            "sideEffects": "None", "failurePolicy": "Fail", "timeoutSeconds": 5,
            "reinvocationPolicy": "IfNeeded",
            "clientConfig": {"url": f"https://127.0.0.1:{server.server_address[1]}/mutate",
                             "caBundle": base64.b64encode(ca.cert_pem).decode()},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                       "resources": ["pods"], "scope": "Namespaced"}],
            # Only this test's namespace and its own opt-in label: the control plane is shared
            # by the session, and the chart's webhook (tests/operator/conftest.py) selects
            # chaperone.dev/inject, so neither webhook sees the other's pods.
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
            "objectSelector": {"matchLabels": {TEST_LABEL: "true"}},
        }],
    }
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(config))
    try:
        yield control_plane, ns, server
    finally:
        control_plane.kubectl("delete", "mutatingwebhookconfiguration", name,
                              "--ignore-not-found")
        server.shutdown()
        server.server_close()


def _dry_run(cp, ns: str, pod: dict) -> dict:
    res = cp.kubectl("create", "--dry-run=server", "-n", ns, "-o", "json", "-f", "-",
                     input=json.dumps(pod))
    return json.loads(res.stdout)


@pytest.mark.controlplane
def test_webhook_on_the_real_apiserver(inject_webhook):
    cp, ns, server = inject_webhook
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "generateName": "claude-", "labels": {TEST_LABEL: "true"}},
        "spec": {"initContainers": [{"name": "clone", "image": "alpine/git"}],
                 "containers": [{"name": "claude", "image": "claude-code"},
                                {"name": "tools", "image": "tools"}]}}
    # The configuration takes a moment to reach the apiserver's webhook cache.
    deadline = time.monotonic() + 30
    while True:
        out = _dry_run(cp, ns, pod)
        if contract.STATUS_ANNOTATION in (out["metadata"].get("annotations") or {}):
            break
        assert time.monotonic() < deadline, "webhook never called"
        time.sleep(0.5)
    seen = server.seen[-1]
    assert seen["dryRun"] is True and seen["operation"] == "CREATE"
    # What the webhook receives: the ServiceAccount plugin has already run (token volume
    # mounted everywhere) and generateName pods have no name yet.
    assert "name" not in seen["object"]["metadata"] or not seen["object"]["metadata"]["name"]
    assert seen["object"]["metadata"]["namespace"] == ns == seen["namespace"]  # filled in
    assert any(v["name"].startswith("kube-api-access-") for v in seen["object"]["spec"]["volumes"])
    # The stored pod is exactly inject()'s result plus API defaults: nothing re-added by the
    # ServiceAccount plugin when it re-runs after the webhook's mutation.
    expected = inject(seen["object"], InjectionSettings(), server.connections,
                      seen["userInfo"]).pod
    assert not _subset(expected["spec"], out["spec"]), _subset(expected["spec"], out["spec"])
    assert out["metadata"]["annotations"] == expected["metadata"]["annotations"]
    assert not any(v["name"].startswith("kube-api-access-") for v in out["spec"]["volumes"])
    assert [c["name"] for c in out["spec"]["initContainers"]] == ["chaperone-sidecar", "clone"]
    creator = json.loads(out["metadata"]["annotations"][contract.CREATOR_ANNOTATION])
    assert creator["username"] == "admin" and "system:masters" in creator["groups"]

    # An unlabelled pod is never sent to the webhook and keeps its token.
    plain = copy.deepcopy(pod)
    plain["metadata"]["labels"] = {}
    calls = len(server.seen)
    out = _dry_run(cp, ns, plain)
    assert len(server.seen) == calls
    assert "annotations" not in out["metadata"]
    assert any(v["name"].startswith("kube-api-access-") for v in out["spec"]["volumes"])

    # A refusal reaches the user with its reason.
    refused = copy.deepcopy(pod)
    refused["spec"]["hostNetwork"] = True
    res = cp.kubectl("create", "--dry-run=server", "-n", ns, "-f", "-",
                     input=json.dumps(refused), check=False)
    assert res.returncode != 0 and "spec.hostNetwork is not allowed" in res.stderr

    # For real (not dry-run), as another user: stored mutated, creator from that user.
    # (No controller manager: the aggregated "edit" role is empty, so a minimal Role.)
    cp.kubectl("create", "role", "pod-creator", "--verb=create,get", "--resource=pods", "-n", ns)
    cp.kubectl("create", "rolebinding", "dave-pods", "--role=pod-creator", "--user=dave",
               "-n", ns)
    created = json.loads(cp.kubectl("create", "-n", ns, "-o", "json", "-f", "-",
                                    input=json.dumps(pod), user="developer").stdout)
    stored = json.loads(cp.kubectl("get", "pod", created["metadata"]["name"], "-n", ns,
                                   "-o", "json").stdout)
    creator = json.loads(stored["metadata"]["annotations"][contract.CREATOR_ANNOTATION])
    assert creator["username"] == "dave" and "developers" in creator["groups"]
    assert stored["spec"]["automountServiceAccountToken"] is False
    assert status_of(stored)["connections"] == ["tickets-api"]
