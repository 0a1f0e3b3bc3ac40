"""kubectl exec / port-forward sessions through the sidecar, on the real node (issue 15,
docs/exec-sessions.md).

The agent is the real kubectl in an injected Claude pod (its own pod, ``claude-exec``, so this
file does not depend on what the main story did to ``claude-1``); the target is a pod ``web``
the kubelet runs (Python's http.server on 8080, a file holding an AWS access key id). The
apiserver streams to the kubelet; the sidecar sits between kubectl and the apiserver. What is
proven, each against the real components:

* ``kubectl exec web -- ls`` is allowed and its output reaches kubectl;
* ``kubectl exec web -- cat`` of the secret file: kubectl prints ``[MASKED:...]``, never the key;
* ``kubectl exec web -- rm -rf /tmp/x`` is refused by the ``match.kubernetes.commands`` rule,
  with the rule's message in kubectl's error; ``/tmp/x`` still exists;
* ``kubectl port-forward`` through the SPDY tunnel: port 8080 serves, port 22 is refused by
  the sidecar itself (kubectl prints the refusal JSON);
* after the pod is deleted (its sidecar ships the session), ``chaperone sessions replay``
  shows the commands, the stdout (masked) and the exit status as a transcript.

Runs after test_node_story.py (conftest.ORDER ranks unknown files last), in the story's
namespace, with its connection ``cluster-api``.
"""

from __future__ import annotations

import json

import pytest
import yaml
from nodebed import API, KUBERNETES_SERVICE, claude_pod, wait_for

AGENT = "claude-exec"
KEY_ID = "AKIAIOSFODNN7EXAMPLE"  # AWS's documented example key id: the aws-access-key-id detector


def _objects(ns: str, image: str) -> list[dict]:
    rbac = "rbac.authorization.k8s.io/v1"
    serve = ("mkdir -p /tmp/srv /tmp/x && echo hello > /tmp/srv/index.html && "
             f"echo 'aws_access_key_id = {KEY_ID}' > /tmp/creds && cd /tmp/srv && "
             "exec python3 -m http.server 8080")
    return [
        # The connection's identity may exec and port-forward (RBAC): the policy decides.
        {"apiVersion": rbac, "kind": "Role", "metadata": {"name": "sessions", "namespace": ns},
         "rules": [{"apiGroups": [""], "resources": ["pods/exec", "pods/portforward"],
                    "verbs": ["get", "create"]}]},
        {"apiVersion": rbac, "kind": "RoleBinding", "metadata": {"name": "sessions", "namespace": ns},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "sessions"},
         "subjects": [{"kind": "ServiceAccount", "name": "agent-reader", "namespace": ns}]},
        {"apiVersion": API, "kind": "AccessPolicy", "metadata": {"name": "exec-sessions", "namespace": ns},
         "spec": {"connections": ["cluster-api"], "defaultEffect": "block", "rules": [
             {"name": "no-rm", "match": {"kubernetes": {"commands": ["rm", "rm *"]}},
              "block": {"message": "Agents may not delete files in pods."}},
             {"name": "no-ssh", "match": {"kubernetes": {"ports": ["22"]}},
              "block": {"message": "No tunnels to port 22."}},
             {"name": "web-exec", "match": {"kubernetes": {
                 "resources": ["pods/exec"], "names": ["web"], "containers": ["web"]}},
              "allow": {}},
             {"name": "web-tunnels", "match": {"kubernetes": {
                 "resources": ["pods/portforward"], "names": ["web"]}}, "allow": {}},
             {"name": "mask-keys", "match": {"kubernetes": {"resources": ["pods/exec"]}},
              "mask": {"detectors": ["aws-access-key-id"]}}]}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": ns},
         "spec": {"automountServiceAccountToken": False, "terminationGracePeriodSeconds": 1,
                  "containers": [{"name": "web", "image": image,
                                  "imagePullPolicy": "IfNotPresent",
                                  "command": ["sh", "-c", serve],
                                  "ports": [{"containerPort": 8080}]}]}},
    ]


def _ready(s, name: str) -> bool:
    conds = {c["type"]: c["status"] for c in s.pod(name)["status"].get("conditions", [])}
    return conds.get("Ready") == "True"


@pytest.fixture(scope="module")
def sessions(node_story, images):
    s = node_story
    s.cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(_objects(s.ns, images["agent"])))
    s.cp.kubectl("create", "-f", "-", user="developer",
                 input=json.dumps(claude_pod(s.ns, images["agent"], AGENT)))
    for name in ("web", AGENT):
        wait_for(lambda n=name: _ready(s, n), 120, f"pod {name} Ready",
                 detail=lambda n=name: json.dumps(s.pod(n)["status"], indent=1)[-2000:])

    def agent_kubectl(*args: str, timeout: float = 120):
        return s.exec("kubectl", "--server", f"https://{KUBERNETES_SERVICE}:443",
                      "--token", "placeholder", "-n", s.ns, *args, timeout=timeout, pod=AGENT)

    # The policy reaches the sidecar through its watch: wait until exec is allowed.
    wait_for(lambda: agent_kubectl("exec", "web", "-c", "web", "--", "true").returncode == 0,
             60, "the exec-sessions policy in force",
             detail=lambda: agent_kubectl("exec", "web", "-c", "web", "--", "true").stderr)
    yield s, agent_kubectl


def test_kubectl_exec_ls_is_allowed(sessions):
    _, kubectl = sessions
    res = kubectl("exec", "web", "-c", "web", "--", "ls", "/tmp/srv")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["index.html"]


def test_a_secret_printed_by_exec_is_masked_for_kubectl(sessions):
    s, kubectl = sessions
    res = kubectl("exec", "web", "-c", "web", "--", "cat", "/tmp/creds")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "aws_access_key_id = [MASKED:aws-access-key-id]", res.stdout
    assert KEY_ID not in res.stdout + res.stderr
    # The key is really there (read without the sidecar, as admin).
    direct = s.cp.kubectl("exec", "-n", s.ns, "web", "-c", "web", "--", "cat", "/tmp/creds")
    assert KEY_ID in direct.stdout


@pytest.mark.parametrize("argv", [["rm", "-rf", "/tmp/x"],
                                  ["sh", "-c", "cd /tmp && rm -rf /tmp/x"]])
def test_rm_is_refused_by_the_command_rule(sessions, argv):
    s, kubectl = sessions
    res = kubectl("exec", "web", "-c", "web", "--", *argv)
    assert res.returncode != 0
    assert "Agents may not delete files in pods." in res.stderr, res.stderr
    assert s.cp.kubectl("exec", "-n", s.ns, "web", "-c", "web", "--", "test", "-d",
                        "/tmp/x", check=False).returncode == 0  # still there


def test_port_forward_to_a_blocked_port_is_refused(sessions):
    s, _ = sessions
    script = (
        f"kubectl --server https://{KUBERNETES_SERVICE}:443 --token placeholder -n {s.ns} "
        "port-forward pod/web 18080:8080 18022:22 --address 127.0.0.1 >/tmp/pf.out 2>/tmp/pf.err &"
        " PF=$!; for i in $(seq 100); do grep -q 18022 /tmp/pf.out && break; sleep 0.1; done;"
        " curl -s --noproxy '*' --max-time 20 http://127.0.0.1:18080/index.html;"
        " echo \"[web $?]\";"
        " curl -s --noproxy '*' --max-time 20 http://127.0.0.1:18022/; echo \"[ssh $?]\";"
        " sleep 1; kill $PF 2>/dev/null; wait $PF 2>/dev/null; cat /tmp/pf.err")
    res = s.exec("sh", "-c", script, pod=AGENT, timeout=90)
    assert "hello\n[web 0]" in res.stdout, res.stdout + res.stderr
    assert "[ssh 0]" not in res.stdout, res.stdout
    assert "an error occurred forwarding 18022 -> 22" in res.stdout, res.stdout
    assert "No tunnels to port 22." in res.stdout and "no-ssh" in res.stdout, res.stdout


def test_sessions_replay_shows_the_transcripts(sessions):
    s, _ = sessions
    s.cp.kubectl("delete", "pod", AGENT, "-n", s.ns, "--wait=true", "--timeout=120s", timeout=150)

    def listed():
        res = s.sessions("list", "--json", "--namespace", s.ns, "--pod", AGENT)
        found = res.returncode == 0 and json.loads(res.stdout or "[]")
        return found and all(x.get("status") == "closed" for x in found) and found
    found = wait_for(listed, 60, "the exec pod's closed sessions in the bucket")
    replay = ""
    for session in found:
        res = s.sessions("replay", session.get("session") or session.get("id"))
        assert res.returncode == 0, res.stderr
        replay += res.stdout
    assert f"$ kubectl exec {s.ns}/web -c web -- ls /tmp/srv" in replay, replay[-4000:]
    lines = [line.split("| ", 1) for line in replay.splitlines() if "| " in line]
    shown = [(head.split()[-1], text) for head, text in lines]
    assert ("stdout", "index.html") in shown, replay[-4000:]
    assert ("stdout", "aws_access_key_id = [MASKED:aws-access-key-id]  "
                      "[masked aws-access-key-id x1]") in shown, replay[-4000:]
    assert ("exit", "exit status 0") in shown
    assert KEY_ID not in replay
    assert "REFUSED" in replay and "port 22" in replay  # the refused tunnel stream
    assert "no-rm" in replay  # the refused rm, as a decision on its flow
