"""The story on a real node (docs/e2e.md, issue 14): `helm install`, the image built here from
the Dockerfile, the operator as the chart's Deployment and its webhooks reached through the
Service, a Claude pod created by dave and started by the kubelet with the native sidecar, the
agent's real clients run in its container through `kubectl exec`, an approval with
`kubectl patch`, the sidecar killed and restarted by the kubelet, and the recording read back
with `chaperone sessions`.

One story, in order (pytest runs a file's tests top to bottom; conftest.ORDER puts this file
last in e2e/node).
"""

from __future__ import annotations

import json

from story import refusal_in  # e2e/story.py: finds the refusal JSON in kubectl's -v=9 log

from chaperone_testbed.image import IMAGE_NAME
from nodebed import (
    AGENT_CONTAINER, KUBERNETES_SERVICE, POD, RELEASE_NS, SIDECAR, claude_pod, wait_for,
)


def test_the_operator_runs_as_the_charts_deployment_from_the_image(release, node_cp, node):
    pods = json.loads(node_cp.kubectl("get", "pods", "-n", RELEASE_NS, "-l",
                                      "app.kubernetes.io/name=chaperone", "-o", "json").stdout)
    running = [p for p in pods["items"] if p["status"].get("phase") == "Running"]
    assert running, pods
    pod = running[0]
    assert pod["spec"]["nodeName"] == node.name
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "ReplicaSet"
    status = pod["status"]["containerStatuses"][0]
    assert status["image"] == IMAGE_NAME and status["ready"], status
    assert status["containerID"].startswith("containerd://")
    # The webhooks are called through the chart's Service, not a URL.
    hooks = json.loads(node_cp.kubectl("get", "mutatingwebhookconfiguration", "chaperone",
                                       "-o", "json").stdout)["webhooks"]
    assert all(h["clientConfig"].get("service", {}).get("namespace") == RELEASE_NS for h in hooks)


def test_daves_pod_is_injected_and_started_with_the_native_sidecar(node_story):
    s = node_story
    pod = s.pod()
    creator = json.loads(pod["metadata"]["annotations"]["chaperone.dev/creator"])
    assert creator["username"] == "dave", creator
    sidecar = next(c for c in pod["spec"]["initContainers"] if c["name"] == SIDECAR)
    assert sidecar["restartPolicy"] == "Always"          # a native sidecar
    assert sidecar["image"] == IMAGE_NAME
    status = s.sidecar_status()
    assert status["started"] and status["ready"] and "running" in status["state"], status
    agent = next(c for c in pod["status"]["containerStatuses"] if c["name"] == AGENT_CONTAINER)
    assert agent["ready"] and "running" in agent["state"], agent
    # The kubelet started the sidecar before the agent (native sidecar start order).
    assert status["state"]["running"]["startedAt"] <= agent["state"]["running"]["startedAt"]
    env = {e["name"]: e.get("value") for e in
           next(c for c in pod["spec"]["containers"] if c["name"] == AGENT_CONTAINER)["env"]}
    assert env["HTTPS_PROXY"].startswith("http://127.0.0.1:"), env


def test_kubectl_exec_reaches_the_agent_container_through_the_kubelet(node_story):
    res = node_story.exec("sh", "-c", "id -u; echo $HTTPS_PROXY; cat $SSL_CERT_FILE | head -1")
    assert res.returncode == 0, res.stderr
    uid, proxy, pem = res.stdout.splitlines()[:3]
    assert uid == "1000"
    assert proxy.startswith("http://127.0.0.1:")
    assert pem.startswith("-----BEGIN CERTIFICATE-----")


def test_curl_reads_pods_through_the_sidecar_with_the_connections_token(node_story):
    s = node_story
    url = f"https://{KUBERNETES_SERVICE}/api/v1/namespaces/{s.ns}/pods"
    res = s.exec("curl", "-sS", "--fail-with-body", "-H", "Authorization: Bearer placeholder", url)
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}\n{s.sidecar_log()}"
    names = [p["metadata"]["name"] for p in json.loads(res.stdout)["items"]]
    assert POD in names
    s.steps["curl-list"] = True
    # Without the proxy the agent trusts nothing but the interception CA: the API's own
    # certificate fails verification, so the bypass gets nothing.
    direct = s.exec("curl", "-sS", "--noproxy", "*", "-H", "Authorization: Bearer placeholder", url)
    assert direct.returncode != 0 and "certificate" in direct.stderr.lower(), direct


def test_the_agents_aws_cli_is_resigned_by_the_sidecar(node_story):
    """Debian's AWS CLI in the agent container, with only the injected env (proxy, CA bundle,
    placeholder credentials): `aws s3 ls` works against a server that checks signatures; the
    same CLI straight to the server is refused; deleting the bucket is blocked."""
    s = node_story
    res = s.exec("aws", "s3", "ls")
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}\n{s.sidecar_log()}"
    assert s.aws.bucket in res.stdout
    # Control: no proxy at all (HTTP_PROXY too: the endpoint is plain http), so the CLI's own
    # placeholder credentials reach the server - which checks signatures and refuses them.
    direct = s.exec("sh", "-c", "unset HTTPS_PROXY https_proxy HTTP_PROXY http_proxy ALL_PROXY "
                                f"all_proxy; aws --endpoint-url {s.aws.url} s3 ls")
    assert direct.returncode != 0 and "InvalidAccessKeyId" in direct.stderr, direct
    blocked = s.exec("aws", "--debug", "s3api", "delete-bucket", "--bucket", s.aws.bucket)
    assert blocked.returncode != 0
    refusal = refusal_in(blocked.stderr)
    assert refusal is not None, blocked.stderr[-3000:]
    assert refusal["rule"]["name"] == "no-bucket-deletion", refusal
    s.aws.client("s3").head_bucket(Bucket=s.aws.bucket)  # still there


def test_the_agents_kubectl_goes_through_the_sidecar(node_story):
    s = node_story
    res = s.agent_kubectl("get", "pods", "-o", "name")
    assert res.returncode == 0, f"{res.stderr}\n{s.sidecar_log()}"
    assert f"pod/{POD}" in res.stdout.split()


def test_deleting_a_namespace_is_blocked_by_the_policy(node_story):
    s = node_story
    res = s.agent_kubectl("delete", "namespace", s.victim_ns, "-v=9")
    assert res.returncode != 0
    refusal = refusal_in(res.stderr)
    assert refusal is not None, res.stderr[-3000:]
    assert refusal["rule"]["name"] == "never-delete-namespaces", refusal
    assert s.cp.kubectl("get", "namespace", s.victim_ns, check=False).returncode == 0


def test_a_held_create_is_released_by_an_approvers_kubectl_patch(node_story):
    s = node_story
    proc = s.exec_background("kubectl", "--server", f"https://{KUBERNETES_SERVICE}:443",
                             "--token", "placeholder", "-n", s.ns, "--request-timeout", "150s",
                             "create", "configmap", "approved-by-alice", "--from-literal=k=v")
    try:
        ar = wait_for(lambda: next(iter(s.approval_requests()), None), 60,
                      "an ApprovalRequest for the held create", detail=s.sidecar_log)
        name = ar["metadata"]["name"]
        assert s.cp.kubectl("get", "configmap", "approved-by-alice", "-n", s.ns,
                            check=False).returncode != 0, "released before approval"
        patch = ["patch", "approvalrequest", name, "-n", s.ns, "--type=merge",
                 "-p", '{"spec":{"decision":"Approved"}}']
        own = s.cp.kubectl(*patch, user="developer", check=False)
        assert own.returncode != 0 and "self-approval" in own.stderr.lower(), own.stderr
        s.cp.kubectl(*patch, user="approver")
        out, err = proc.communicate(timeout=150)
        assert proc.returncode == 0, f"{out}\n{err}\n{s.sidecar_log()}"
    finally:
        if proc.poll() is None:
            proc.kill()
    assert s.cp.kubectl("get", "configmap", "approved-by-alice", "-n", s.ns).returncode == 0
    decided = json.loads(s.cp.kubectl("get", "approvalrequest", name, "-n", s.ns, "-o",
                                      "json").stdout)
    assert "alice" in json.dumps(decided["status"]), decided["status"]
    s.steps["approved"] = name


def test_transparent_mode_the_init_containers_rules_send_the_agent_through_the_sidecar(
        node_story, images):
    """A second pod, annotated transparent: the kubelet runs `chaperone-init` (iptables, root,
    NET_ADMIN) before the sidecar; the agent has no proxy settings at all, and its plain curl
    to the API is still redirected to the sidecar, which injects the connection's token."""
    s, name = node_story, "claude-transparent"
    s.cp.kubectl("create", "-f", "-", user="developer",
                 input=json.dumps(claude_pod(s.ns, images["agent"], name, "transparent")))
    try:
        wait_for(lambda: {c["type"]: c["status"] for c in
                          s.pod(name)["status"].get("conditions", [])}.get("Ready") == "True",
                 120, "the transparent pod Ready",
                 detail=lambda: json.dumps(s.pod(name)["status"], indent=1)[-3000:])
        pod = s.pod(name)
        init = next(st for st in pod["status"]["initContainerStatuses"]
                    if st["name"] == "chaperone-init")
        assert init["state"]["terminated"]["exitCode"] == 0, init
        env = s.exec("sh", "-c", "echo \"[$HTTPS_PROXY][$https_proxy]\"", pod=name)
        assert env.stdout.strip() == "[][]", env.stdout
        url = f"https://{KUBERNETES_SERVICE}/api/v1/namespaces/{s.ns}/pods"
        res = s.exec("curl", "-sS", "--fail-with-body", "-H", "Authorization: Bearer placeholder",
                     url, pod=name)
        assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
        assert name in [p["metadata"]["name"] for p in json.loads(res.stdout)["items"]]
        # The rules cannot be undone from the agent container (no NET_ADMIN).
        flush = s.exec("sh", "-c", "iptables -t nat -F OUTPUT 2>&1 || echo refused", pod=name)
        assert "refused" in flush.stdout or flush.returncode != 0, flush
    finally:
        s.cp.kubectl("delete", "pod", name, "-n", s.ns, "--wait=true", "--timeout=120s",
                     check=False, timeout=150)


def test_the_sidecar_killed_is_restarted_by_the_kubelet_and_serves_again(node_story):
    s = node_story
    before = s.sidecar_status()
    cid = before["containerID"].removeprefix("containerd://")
    s.node.ctr("tasks", "kill", "--signal", "SIGKILL", cid)

    def restarted():
        st = s.sidecar_status()
        return st["restartCount"] > before["restartCount"] and st.get("ready") and st
    after = wait_for(restarted, 120, "the sidecar restarted and ready", detail=s.sidecar_log)
    assert after["lastState"]["terminated"]["exitCode"] == 137
    res = s.agent_kubectl("get", "pods", "-o", "name")
    assert res.returncode == 0, f"{res.stderr}\n{s.sidecar_log()}"
    assert f"pod/{POD}" in res.stdout.split()


def test_the_recording_is_read_back_with_chaperone_sessions(node_story):
    s = node_story
    s.cp.kubectl("delete", "pod", POD, "-n", s.ns, "--wait=true", "--timeout=120s", timeout=150)

    def listed():
        res = s.sessions("list", "--json", "--namespace", s.ns)
        return res.returncode == 0 and json.loads(res.stdout or "[]") or None
    sessions = wait_for(listed, 60, "the pod's sessions in the bucket",
                        detail=lambda: s.sessions("list", "--json").stderr)
    text = json.dumps(sessions)
    assert POD in text and "dave" in text, text
    replays = []
    for session in sessions:
        sid = session.get("session") or session.get("id") or session.get("sessionId")
        res = s.sessions("replay", sid)
        assert res.returncode == 0, res.stderr
        replays.append(res.stdout)
    replay = "\n".join(replays)
    # Before the kill (curl's list, the approval) and after (the last kubectl): nothing lost.
    assert "never-delete-namespaces" in replay, replay[-3000:]
    assert "alice" in replay, replay[-3000:]
    assert replay.count(f"/api/v1/namespaces/{s.ns}/pods") >= 3, replay[-3000:]
