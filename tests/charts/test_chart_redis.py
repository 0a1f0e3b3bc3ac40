"""The chart's Redis: AUTH by default, the password kept across upgrades, TLS, who may connect,
and the optional agent egress policy. Rendered by the real helm; the chart's own redis-server
command line is run with the real redis-server binary; the objects are accepted by the real
apiserver; the password is looked up from a real Secret (`helm template --dry-run=server`)."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import time
import uuid

import pytest
import redis
import yaml
from test_chart_operator import helm, one, render, run_helm  # noqa: F401 - helm is a fixture

from chaperone_testbed.services import free_port


def redis_container(docs) -> dict:
    return one(docs, "Deployment", "chaperone-redis")["spec"]["template"]["spec"]["containers"][0]


def operator_env(docs) -> dict:
    container = one(docs, "Deployment", "chaperone-operator")["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_default_redis_requires_a_generated_password(helm, repo_root):
    docs = render(helm, repo_root)
    secret = one(docs, "Secret", "chaperone-redis")
    password = base64.b64decode(secret["data"]["password"]).decode()
    assert len(password) == 40 and password.isalnum()
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    container = redis_container(docs)
    assert '--requirepass "$REDIS_PASSWORD"' in container["args"][0]
    assert container["env"] == [{"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {
        "name": "chaperone-redis", "key": "password"}}}]
    env = operator_env(docs)
    assert env["CHAPERONE_REDIS_URL"] == "redis://chaperone-redis.chaperone-system.svc:6379/0"
    assert env["CHAPERONE_REDIS_PASSWORD"] == {"secretKeyRef": {"name": "chaperone-redis", "key": "password"}}
    assert env["CHAPERONE_REDIS_SECRET"] == "chaperone-redis"
    pod = one(docs, "Deployment", "chaperone-redis")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False and pod["securityContext"]["runAsNonRoot"]
    assert one(docs, "Service", "chaperone-redis")["spec"]["ports"][0]["port"] == 6379


def test_only_injected_pods_and_the_operator_may_connect(helm, repo_root):
    policy = one(render(helm, repo_root), "NetworkPolicy", "chaperone-redis")["spec"]
    assert policy["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "redis"
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    assert rule["from"] == [
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {"chaperone.dev/inject": "true"}}},
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "chaperone",
                                         "app.kubernetes.io/instance": "chaperone",
                                         "app.kubernetes.io/component": "operator"}}}]
    assert rule["ports"] == [{"port": 6379, "protocol": "TCP"}]
    off = render(helm, repo_root, "--set", "redis.networkPolicy=false")
    assert not [d for d in off if d["kind"] == "NetworkPolicy"]


def test_existing_secret_tls_and_external_redis(helm, repo_root):
    docs = render(helm, repo_root, "--set", "redis.auth.existingSecret=mine",
                  "--set", "redis.auth.existingSecretKey=pw", "--set", "redis.tls.enabled=true",
                  "--set", "redis.tls.certSecret=redis-tls")
    assert not [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "chaperone-redis"]
    container = redis_container(docs)
    assert container["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "mine", "key": "pw"}
    assert "--port 0 --tls-port 6379" in container["args"][0] and "--tls-ca-cert-file" in container["args"][0]
    env = operator_env(docs)
    assert env["CHAPERONE_REDIS_URL"] == "rediss://chaperone-redis.chaperone-system.svc:6379/0"
    assert env["CHAPERONE_REDIS_PASSWORD"] == {"secretKeyRef": {"name": "mine", "key": "pw"}}
    assert env["CHAPERONE_REDIS_TLS_CA"] == "true"
    assert env["CHAPERONE_REDIS_CA_CERT"] == {"secretKeyRef": {"name": "redis-tls", "key": "ca.crt"}}
    res = run_helm(helm, repo_root, "--set", "redis.tls.enabled=true")
    assert res.returncode != 0 and "redis.tls.enabled needs redis.tls.certSecret" in res.stderr

    external = render(helm, repo_root, "--set", "redis.enabled=false", "--set",
                      "redis.url=rediss://redis.example:6380/0", "--set", "redis.auth.existingSecret=ext")
    assert not [d for d in external if d["metadata"]["name"] == "chaperone-redis"]
    env = operator_env(external)
    assert env["CHAPERONE_REDIS_URL"] == "rediss://redis.example:6380/0"
    assert env["CHAPERONE_REDIS_PASSWORD"] == {"secretKeyRef": {"name": "ext", "key": "password"}}
    none = operator_env(render(helm, repo_root, "--set", "redis.enabled=false"))
    assert none["CHAPERONE_REDIS_URL"] in ("", None) and "CHAPERONE_REDIS_PASSWORD" not in none
    bad = run_helm(helm, repo_root, "--set", "redis.enabled=false", "--set", "redis.url=redis://:pw@r:6379/0")
    assert bad.returncode != 0 and "redis" in bad.stderr  # the schema: no password in the URL


def test_agent_egress_policy(helm, repo_root):
    assert not [d for d in render(helm, repo_root) if d["metadata"]["name"] == "chaperone-agent-egress"]
    docs = render(helm, repo_root, "--set", "agentEgress.namespaces={agents,ci}",
                  "--set", "agentEgress.apiServerCIDRs={192.0.2.10/32}",
                  "--set-json", 'agentEgress.extraRules=[{"to":[{"ipBlock":{"cidr":"203.0.113.0/24"}}],'
                                '"ports":[{"port":443}]}]')
    policies = [d for d in docs if d["metadata"]["name"] == "chaperone-agent-egress"]
    assert [p["metadata"]["namespace"] for p in policies] == ["agents", "ci"]
    spec = policies[0]["spec"]
    assert spec["podSelector"] == {"matchLabels": {"chaperone.dev/inject": "true"}}
    assert spec["policyTypes"] == ["Egress"]
    dns, api, redis_rule, extra = spec["egress"]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert api == {"to": [{"ipBlock": {"cidr": "192.0.2.10/32"}}],
                   "ports": [{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}]}
    assert redis_rule["ports"] == [{"port": 6379, "protocol": "TCP"}]
    assert extra == {"to": [{"ipBlock": {"cidr": "203.0.113.0/24"}}], "ports": [{"port": 443}]}


def test_redis_objects_are_accepted_by_the_apiserver(helm, repo_root, control_plane):
    ns = f"chart-redis-{uuid.uuid4().hex[:6]}"
    control_plane.create_namespace(ns)
    control_plane.create_namespace("agents-egress")
    docs = render(helm, repo_root, "--set", "agentEgress.namespaces={agents-egress}",
                  "--set", "agentEgress.apiServerCIDRs={192.0.2.10/32}", "--set", "redis.tls.enabled=true",
                  "--set", "redis.tls.certSecret=redis-tls", namespace=ns)
    wanted = [d for d in docs if d["kind"] in ("NetworkPolicy", "Deployment", "Service", "Secret")]
    res = control_plane.kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(wanted),
                                check=False)
    assert res.returncode == 0, res.stderr
    assert "networkpolicy.networking.k8s.io/chaperone-agent-egress created (server dry run)" in res.stdout


def test_the_password_survives_upgrades(helm, repo_root, control_plane, tmp_path):
    """helm's lookup (here through --dry-run=server, as install/upgrade do) reuses the Secret."""
    ns = f"chart-redis-{uuid.uuid4().hex[:6]}"
    control_plane.create_namespace(ns)
    control_plane.kubectl("create", "secret", "generic", "chaperone-redis", "-n", ns,
                          "--from-literal=password=kept-across-upgrades")
    env = {**os.environ, "KUBECONFIG": str(control_plane.kubeconfig_path),
           "HELM_CACHE_HOME": str(tmp_path / "c"), "HELM_CONFIG_HOME": str(tmp_path / "g")}
    res = subprocess.run([helm, "template", "chaperone", str(repo_root / "charts" / "chaperone"),
                          "--namespace", ns, "--dry-run=server"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    secret = one([d for d in yaml.safe_load_all(res.stdout) if d], "Secret", "chaperone-redis")
    assert base64.b64decode(secret["data"]["password"]) == b"kept-across-upgrades"


@pytest.mark.parametrize("password", ["generated", 'p@ss w"rd $HOME `x` \\ ;'])
def test_the_charts_redis_command_line_enforces_auth(helm, repo_root, tmp_path, password):
    """The container's exact shell command, run with the real redis-server: unauthenticated
    clients get NOAUTH, the password (even one full of shell metacharacters) works."""
    docs = render(helm, repo_root)
    if password == "generated":
        password = base64.b64decode(one(docs, "Secret", "chaperone-redis")["data"]["password"]).decode()
    container = redis_container(docs)
    port = free_port()
    binary = shutil.which("redis-server")
    assert binary, "redis-server (Debian package) is required"
    # Only the binary's path and the data directory are remapped; the port and bind address
    # are appended (later options win).
    script = container["args"][0].replace("exec redis-server", f"exec {binary}") \
        .replace("--dir /data", f"--dir {tmp_path}") + f" --port {port} --bind 127.0.0.1"
    assert script != container["args"][0]
    proc = subprocess.Popen([*container["command"], script], env={"REDIS_PASSWORD": password, "PATH": "/usr/bin:/bin"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url, protocol=2, socket_timeout=2, retry_on_timeout=False)
        for _ in range(100):
            try:
                client.ping()
            except redis.AuthenticationError:
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        else:
            raise AssertionError(proc.stdout.read1().decode() if proc.poll() is not None else "no answer")
        with pytest.raises(redis.AuthenticationError):
            client.set("chaperone:grant:x", "1")
        authed = redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=2)
        assert authed.ping() and authed.exists("chaperone:grant:x") == 0
        assert authed.config_get("save")["save"] == "" and authed.config_get("appendonly")["appendonly"] == "no"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_kubernetes_version_is_checked_only_against_a_real_cluster(helm, repo_root):
    """Offline renders pass whatever helm's default version; with discovery (here simulated by
    --api-versions v1/Pod, as install/upgrade/--validate see it) < 1.30 is refused."""
    chart = str(repo_root / "charts" / "chaperone")
    assert subprocess.run([helm, "template", chart], capture_output=True).returncode == 0
    old = subprocess.run([helm, "template", chart, "--api-versions", "v1/Pod", "--kube-version", "1.29.4"],
                         capture_output=True, text=True)
    assert old.returncode != 0 and "chaperone needs Kubernetes >=1.30.0-0; this cluster runs v1.29.4" in old.stderr
    new = subprocess.run([helm, "template", chart, "--api-versions", "v1/Pod", "--kube-version", "1.30.0"],
                         capture_output=True, text=True)
    assert new.returncode == 0, new.stderr
