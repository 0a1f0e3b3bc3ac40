"""exec/attach/portforward: what the request asks for (container, command, ports) and the
``match.kubernetes.commands|containers|ports`` rules on it (issue 15), seen as an agent trying
to get out would send it: shell wrappers, percent-encoding, repeated and malformed parameters."""

from __future__ import annotations

import pytest

from chaperone_sidecar.policy.classify import classify
from chaperone_sidecar.policy.classify.kubernetes import command_units, go_query
from chaperone_sidecar.policy.compiler import PolicyErrors, compile_policy
from chaperone_sidecar.policy.evaluator import evaluate
from chaperone_sidecar.policy.matching import CompiledPolicySet
from chaperone_sidecar.policy.model import HTTPRequest, Identity

AGENT = Identity(service_account="team-a/claude", pod_namespace="team-a")
EXEC = "/api/v1/namespaces/team-a/pods/web/exec"
PF = "/api/v1/namespaces/team-a/pods/web/portforward"


def request(path: str, query: str, method: str = "GET") -> HTTPRequest:
    return HTTPRequest(method, "https", "10.0.0.1", 6443, path, query,
                       (("Upgrade", "websocket"), ("Connection", "Upgrade")))


def decide(rules: list[dict], path: str, query: str, default: str = "block"):
    pol = compile_policy({"apiVersion": "chaperone.dev/v1alpha1", "kind": "AccessPolicy",
                          "metadata": {"name": "p", "namespace": "team-a"},
                          "spec": {"defaultEffect": default, "rules": rules}})
    action = classify(request(path, query), "kubernetes")
    return evaluate(CompiledPolicySet([pol]), action, AGENT, "cluster")


def test_the_query_is_read_as_the_apiserver_reads_it():
    kube = classify(request(EXEC, "command=ls&command=-la&container=app&stdout=true"),
                    "kubernetes").kubernetes
    assert kube is not None
    assert (kube.verb, kube.container, kube.command) == ("create", "app", ("ls", "-la"))
    # "+" is a space, %XX decoded; a pair with an invalid escape is dropped (Go's URL.Query),
    # so the policy sees the argv the kubelet runs, not "%zz".
    assert go_query("command=rm+-rf&command=%2Ftmp&command=%zz&x%3B=1&a;b=2") == {
        "command": ["rm -rf", "/tmp"], "x;": ["1"]}
    pf = classify(request(PF, "ports=8080&ports=22,5432&ports=8080"), "kubernetes").kubernetes
    assert pf is not None and pf.ports == ("8080", "22", "5432")


def test_the_summary_names_pod_container_and_command():
    action = classify(request(EXEC, "command=sh&command=-c&command=rm+-rf+/&container=app"),
                      "kubernetes")
    assert action.summary == ("create pods/web/exec in team-a "
                              "(container: app; command: sh -c 'rm -rf /')")
    bare = classify(request("/api/v1/namespaces/team-a/pods/web/attach", "stdin=true"), "kubernetes")
    assert "container: (default)" in bare.summary


@pytest.mark.parametrize("argv,unit", [
    (("/bin/rm", "-rf", "/tmp/x"), "rm -rf /tmp/x"),
    (("sh", "-c", "cd /; rm -rf /"), "rm -rf /"),
    (("bash", "-ec", "true && rm -rf /"), "rm -rf /"),
    (("busybox", "sh", "-c", "rm -rf /"), "rm -rf /"),
    (("env", "A=1", "timeout", "5", "rm", "-rf", "/"), "rm -rf /"),
    (("sh", "-c", "echo $(rm -rf /x)"), "rm -rf /x"),
    (("sh", "-c", "X=1 rm\t-rf /"), "rm -rf /"),
    (("sh", "-c", "sh -c 'rm -rf /'"), "rm -rf /"),
])
def test_wrapped_commands_are_seen_through(argv, unit):
    assert any(unit in forms for forms in command_units(argv)), command_units(argv)


BLOCK_RM = {"name": "no-rm", "match": {"kubernetes": {"commands": ["rm", "rm *"]}},
            "block": {"message": "no rm"}}
ALLOW_LS = {"name": "ls", "match": {"kubernetes": {"resources": ["pods/exec"],
                                                   "commands": ["ls", "ls *"]}}, "allow": {}}
ALLOW_EXEC = {"name": "exec", "match": {"kubernetes": {"resources": ["pods/exec"]}}, "allow": {}}


@pytest.mark.parametrize("query,effect", [
    ("command=ls&command=-la", "allow"),
    ("command=rm&command=-rf&command=/tmp/x", "block"),
    ("command=/usr/bin/rm&command=-rf&command=/tmp/x", "block"),
    ("command=sh&command=-c&command=rm%20-rf%20/", "block"),  # percent-encoded sh -c wrapper
    ("command=sh&command=-c&command=ls%3B+rm+-rf+/", "block"),
    ("command=ls&command=%zz&command=rm", "allow"),  # the kubelet runs "ls rm": a listing
    ("command=r%6D&command=-rf&command=/", "block"),
])
def test_command_rules(query, effect):
    assert decide([BLOCK_RM, ALLOW_EXEC], EXEC, query).effect == effect


@pytest.mark.parametrize("query,effect", [
    ("command=ls", "allow"),
    ("command=ls&command=/etc", "allow"),
    ("command=sh&command=-c&command=ls;+cat+/etc/shadow", "block"),  # every unit must be allowed
    ("command=sh", "block"),
])
def test_an_allowed_command_list_allows_nothing_else(query, effect):
    assert decide([ALLOW_LS], EXEC, query).effect == effect


def test_containers_fail_closed_when_none_is_named():
    rules = [{"name": "no-db", "match": {"kubernetes": {"containers": ["db"]}}, "block": {}},
             ALLOW_EXEC]
    assert decide(rules, EXEC, "command=ls&container=app").effect == "allow"
    assert decide(rules, EXEC, "command=ls&container=db").effect == "block"
    # No container=: the kubelet picks the default, which may be db.
    assert decide(rules, EXEC, "command=ls").effect == "block"
    only_app = [{"name": "app", "match": {"kubernetes": {"containers": ["app"]}}, "allow": {}}]
    assert decide(only_app, EXEC, "command=ls").effect == "block"
    # A port-forward reaches the pod's ports, shared by every container: never a container's.
    assert decide(rules, PF, "ports=8080&container=db").effect == "block"  # no allow for PF
    assert decide(only_app, PF, "ports=8080&container=app").effect == "block"
    assert decide([rules[0], {"name": "pf", "match": {"kubernetes": {
        "resources": ["pods/portforward"]}}, "allow": {}}], PF, "ports=8080").effect == "allow"
    summary = classify(request(PF, "ports=8080"), "kubernetes").summary
    assert summary == "create pods/web/portforward in team-a (ports: 8080)"


def test_ports():
    rules = [{"name": "no-ssh", "match": {"kubernetes": {"ports": ["22"]}}, "block": {}},
             {"name": "web", "match": {"kubernetes": {"ports": ["80*"]}}, "allow": {}}]
    assert decide(rules, PF, "ports=8080").effect == "allow"
    assert decide(rules, PF, "ports=8080&ports=22").effect == "block"  # repeated parameter
    assert decide(rules, PF, "ports=8080,22").effect == "block"
    assert decide(rules, PF, "ports=8080&ports=9090").effect == "block"  # allow needs every port
    # A SPDY tunnel names no port in the URL: opened, each stream is judged when it opens.
    assert decide(rules, PF, "").effect == "allow"


def test_connect_fields_never_match_other_requests():
    rules = [{"name": "r", "match": {"kubernetes": {"commands": ["*"]}}, "block": {}}]
    assert decide(rules, "/api/v1/namespaces/team-a/pods/web", "", default="allow").effect == "allow"


@pytest.mark.parametrize("kube,needle", [
    ({"commands": ["   "]}, "invalid command glob"),
    ({"ports": ["http"]}, "invalid port"),
    ({"ports": ["70000"]}, "not in 1-65535"),
    ({"verbs": ["get"], "commands": ["rm *"]}, "can never match"),
])
def test_the_compiler_refuses_rules_that_never_match(kube, needle):
    with pytest.raises(PolicyErrors) as exc:
        decide([{"name": "r", "match": {"kubernetes": kube}, "block": {}}], EXEC, "")
    assert needle in str(exc.value)
