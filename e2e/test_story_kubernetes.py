"""The story, part 2: the real kubectl as the agent, through the sidecar, against the apiserver.

Step 5 of issue 6. The pod's ``cluster-api`` ClaudeConnection (type kubernetes) covers the test
apiserver's loopback address; its token belongs to the ServiceAccount ``agent-reader``, which
may read pods in the story namespace and - on purpose - delete the ``victim`` namespace, so
that "the namespace still exists" is Chaperone's doing and not RBAC's.

**Reaching a loopback apiserver through the proxy.** kubectl (Go's net/http) never sends a
request for a loopback address (127.0.0.0/8, ::1) or ``localhost`` to the proxy of
HTTPS_PROXY, whatever NO_PROXY says - and the injected NO_PROXY lists ``127.0.0.1``,
``localhost`` and ``::1`` anyway. In a cluster the agent addresses ``kubernetes.default.svc``
and the environment suffices; on this loopback-only test bed the agent's kubeconfig names the
same proxy explicitly with ``proxy-url`` (the value of the injected HTTPS_PROXY), which Go
applies to every address. The kubeconfig carries no CA (kubectl trusts what the injected
SSL_CERT_FILE, the trust bundle, holds) and only a placeholder token, like the AWS
placeholders the webhook injects: the sidecar puts the connection's token in its place. ``test_the_loopback_bypass_fails_closed``
shows what happens without ``proxy-url``.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import story as st

from chaperone_testbed.controlplane import KubeconfigRef


def _kubeconfig(story, name: str, *, proxy: bool = True, token: str | None = None) -> Path:
    cluster: dict = {"server": story.cp.url}
    if proxy:
        cluster["proxy-url"] = story.agent.env["HTTPS_PROXY"]
    if token is not None:
        cluster["certificate-authority"] = str(story.cp.ca_path)
    path = story.home / ".kube" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": "cluster", "cluster": cluster}],
        # No credentials for the agent: a placeholder (kubectl would otherwise prompt for a
        # user name), replaced by the sidecar with the connection's token.
        "users": [{"name": "user", "user": {"token": token or "chaperone-placeholder"}}],
        "contexts": [{"name": "ctx", "context": {"cluster": "cluster", "user": "user",
                                                 "namespace": story.ns}}],
        "current-context": "ctx"}))
    return path


def agent_kubectl(story, *args: str, proxy: bool = True):
    """kubectl as the agent: the agent container's env, an agent kubeconfig, no credentials."""
    config = _kubeconfig(story, "config" if proxy else "config-env-only", proxy=proxy)
    argv = [story.cp.kubectl_binary, "--kubeconfig", str(config),
            "--cache-dir", str(story.home / ".kube" / "cache"), "--request-timeout", "30s", *args]
    return st.run(argv, story.agent_env())


def test_kubectl_reads_go_through_the_sidecar(story):
    res = agent_kubectl(story, "get", "pods", "-o", "json")
    assert res.returncode == 0, st.describe(res) + "\n" + story.sidecar_log(20)
    names = [p["metadata"]["name"] for p in json.loads(res.stdout)["items"]]
    assert names == ["claude-1"]
    # The agent sent a placeholder: only the token the sidecar injected made this a list.
    table = agent_kubectl(story, "get", "pods")
    assert table.returncode == 0 and "claude-1" in table.stdout, st.describe(table)


def test_kubectl_delete_namespace_is_blocked(story):
    # The refusal is also a metav1.Status, so kubectl's normal output carries its message:
    # what was refused, by which rule, and how to get access.
    plain = agent_kubectl(story, "delete", "namespace", story.victim_ns, "--wait=false")
    assert plain.returncode != 0, st.describe(plain)
    assert "Error from server (Forbidden): Agents may not delete namespaces." in plain.stderr, \
        st.describe(plain)
    assert "never-delete-namespaces" in plain.stderr and "How to get access:" in plain.stderr, \
        st.describe(plain)
    assert "unknown (delete namespaces" not in plain.stderr, st.describe(plain)
    # -v=9 logs response bodies: the full JSON refusal.
    res = agent_kubectl(story, "delete", "namespace", story.victim_ns, "--wait=false", "-v=9")
    assert res.returncode != 0, st.describe(res)
    assert "Error from server (Forbidden)" in res.stderr, st.describe(res)
    refusal = st.refusal_in(res.stderr)
    assert refusal is not None, st.describe(res)
    assert refusal["error"] == "chaperone_blocked"
    assert refusal["rule"] == {"policy": f"{story.ns}/cluster-readonly", "name": "never-delete-namespaces"}
    assert "Agents may not delete namespaces." in refusal["message"]
    assert story.cp.kubectl("get", "namespace", story.victim_ns, "-o", "json").returncode == 0
    ns = json.loads(story.cp.kubectl("get", "namespace", story.victim_ns, "-o", "json").stdout)
    assert "deletionTimestamp" not in ns["metadata"]  # still there, not even terminating

    # Control: the connection's own token WOULD be allowed to delete it (server-side dry run,
    # straight to the apiserver) - so what stopped the agent was the policy, not RBAC.
    token = story.cp.kubectl("get", "secret", "agent-kube-token", "-n", story.ns,
                             "-o", "jsonpath={.data.token}").stdout
    direct = _kubeconfig(story, "connection-token", proxy=False, token=base64.b64decode(token).decode())
    dry = story.cp.kubectl("delete", "namespace", story.victim_ns, "--dry-run=server",
                           user=KubeconfigRef(direct, "ctx"), check=False)
    assert dry.returncode == 0, dry.stderr


def test_the_loopback_bypass_fails_closed(story):
    """Without ``proxy-url`` kubectl goes straight to 127.0.0.1 (Go never proxies loopback,
    and NO_PROXY lists it): the agent trusts only the interception CA, so the apiserver's own
    certificate is refused - bypassing the sidecar gets the agent nothing."""
    assert "127.0.0.1" in story.agent.env["NO_PROXY"].split(",")
    res = agent_kubectl(story, "get", "pods", proxy=False)
    assert res.returncode != 0, st.describe(res)
    assert "certificate signed by unknown authority" in res.stderr, st.describe(res)
