"""SidecarConfig: built from exactly what the webhook writes, and from a standalone directory."""

from __future__ import annotations

import dataclasses
import json

import pytest

from chaperone_operator.injection.connections import plan_connections
from chaperone_operator.injection.settings import InjectionSettings
from chaperone_operator.injection.sidecar import sidecar_container
from chaperone_sidecar import contract
from chaperone_sidecar import config as cfg
from chaperone_sidecar.config import ConfigError, ConnectionMount, SidecarConfig

FIELD_VALUES = {"metadata.name": "agent-1", "metadata.namespace": "team-a", "metadata.uid": "uid-1",
                "spec.serviceAccountName": "claude", "spec.nodeName": "node-1"}


def webhook_container(**settings):
    conns = [
        {"metadata": {"name": "claude"}, "spec": {
            "type": "anthropic", "baseURL": "https://api.anthropic.com",
            "credentials": {"source": "secret", "secretRef": {"name": "anthropic-key"}}}},
        {"metadata": {"name": "aws-audit"}, "spec": {
            "type": "aws", "credentials": {"source": "webIdentity"},
            "aws": {"roleArn": "arn:aws:iam::123456789012:role/x"}}},
        {"metadata": {"name": "internal"}, "spec": {
            "type": "http", "hosts": ["api.internal"],
            "upstreamCA": {"name": "internal-ca", "key": "ca.crt"}}},
    ]
    s = InjectionSettings(**settings)
    plans = plan_connections(conns, s.reverse_port_base)
    creator = json.dumps({"username": "alice", "groups": ["dev", "system:authenticated"]})
    return sidecar_container(s, "explicit", "defer", plans, creator)


def env_of(container, extra=None):
    env = {}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            env[item["name"]] = FIELD_VALUES[item["valueFrom"]["fieldRef"]["fieldPath"]]
    env.update({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"})
    env.update(extra or {})
    return env


class _ReadLog(dict):
    """An environment that remembers which variables were looked up."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read: set[str] = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def test_every_variable_the_webhook_writes_is_a_contract_name_the_sidecar_reads():
    """Both sides import chaperone_sidecar.contract; this pins what flows through it: each
    variable in the injected sidecar container (every option on) is one of the contract's
    ENV_* names, and SidecarConfig.from_env looks every one of them up."""
    container = webhook_container(
        s3_bucket="rec", s3_endpoint="http://s3", s3_region="eu", s3_prefix="p",
        redis_url="rediss://r:6379/0", redis_secret="redis", redis_tls_ca=True,
        sidecar_secret="sc", otel_endpoint="http://otel:4317", oidc_issuer="https://idp",
        oidc_audience="chaperone", oidc_ca_file="/ca.crt")
    written = {item["name"] for item in container["env"]}
    names = {v for k, v in vars(contract).items() if k.startswith("ENV_")}
    assert written - names == set()
    from_secrets = {item["name"]: "from-a-secret" for item in container["env"]
                    if "secretKeyRef" in item.get("valueFrom", {})}
    assert from_secrets  # the Redis password and CA are secretKeyRefs
    plain = {**container, "env": [e for e in container["env"] if e["name"] not in from_secrets]}
    env = _ReadLog(env_of(plain, from_secrets))
    SidecarConfig.from_env(env, container["args"][1:])
    assert written - env.read == set()
    assert config_defaults_are_the_contracts()


def config_defaults_are_the_contracts() -> bool:
    defaults = SidecarConfig(standalone=True)
    settings = InjectionSettings()
    assert (defaults.proxy_port, defaults.health_port) == (settings.proxy_port, settings.health_port) \
        == (contract.DEFAULT_PROXY_PORT, contract.DEFAULT_HEALTH_PORT)
    assert (defaults.approval_mode, defaults.approval_timeout_seconds, defaults.operator_namespace) \
        == (settings.approval_mode, settings.approval_timeout_seconds, settings.operator_namespace)
    assert (str(defaults.ca_dir), str(defaults.token_dir), str(defaults.podinfo_dir),
            str(defaults.spool_dir)) == (contract.CA_DIR, contract.TOKEN_DIR, contract.PODINFO_DIR,
                                         contract.SPOOL_DIR)
    return True


def test_from_env_reads_the_injected_container():
    container = webhook_container(s3_bucket="rec", redis_url="redis://r:6379/0", sidecar_secret="sc")
    assert container["command"] == ["chaperone"] and container["args"][0] == "sidecar"
    config = SidecarConfig.from_env(env_of(container), container["args"][1:])
    assert (config.mode, config.proxy_port, config.health_port) == ("explicit", 15001, 15021)
    assert config.listen_host == "127.0.0.1" and config.health_host == ""
    assert (config.pod_name, config.pod_namespace, config.pod_uid) == ("agent-1", "team-a", "uid-1")
    assert config.service_account_ref == "team-a/claude"
    assert config.creator == "alice" and config.creator_groups == ("dev", "system:authenticated")
    assert config.approval_mode == "defer" and config.approval_timeout_seconds == 300
    assert config.api_server == "https://10.0.0.1:443"
    assert str(config.ca_dir) == contract.CA_DIR and str(config.token_file) == contract.TOKEN_DIR + "/token"
    assert str(config.spool_dir) == contract.SPOOL_DIR and config.spool_limit_bytes == 1024 ** 3
    assert str(config.work_dir) == "/tmp"
    assert config.s3_bucket == "rec" and config.redis_url == "redis://r:6379/0"
    assert str(config.sidecar_secret_dir) == contract.SIDECAR_SECRET_DIR
    assert config.oidc is None
    mounts = {m.name: m for m in config.connection_mounts}
    assert mounts["claude"] == ConnectionMount(
        "claude", "anthropic", credentials_dir="/var/run/secrets/chaperone/connections/claude",
        reverse_port=15100)
    assert mounts["aws-audit"].web_identity_token_file == "/var/run/secrets/chaperone/webidentity/aws-audit/token"
    assert mounts["internal"].upstream_ca_file == "/etc/chaperone/upstream-ca/internal/ca.crt"
    assert config.mount("internal") is mounts["internal"] and config.mount("nope") is None


def test_from_env_paths_can_be_remapped_and_oidc_is_optional(tmp_path):
    container = webhook_container()
    env = env_of(container, {
        "CHAPERONE_CA_DIR": str(tmp_path / "ca"), "CHAPERONE_TOKEN_DIR": str(tmp_path / "tok"),
        "HOME": str(tmp_path), "CHAPERONE_OIDC_ISSUER": "https://idp.example.com",
        "CHAPERONE_OIDC_AUDIENCE": "chaperone", "CHAPERONE_OIDC_GROUPS_CLAIM": "roles"})
    config = SidecarConfig.from_env(env, ["--mode", "transparent", "--port", "9000", "--health-port", "9001"])
    assert config.ca_dir == tmp_path / "ca" and config.api_ca_file == tmp_path / "tok" / "ca.crt"
    assert config.mode == "transparent" and config.work_dir == tmp_path
    assert config.oidc.issuer == "https://idp.example.com" and config.oidc.groups_claim == "roles"
    assert config.oidc.username_claim == "sub"


def test_oidc_settings_of_the_operator_reach_the_sidecar():
    """The operator's CHAPERONE_OIDC_* settings are written into the sidecar container, where
    SidecarConfig.from_env turns them into the issuer on-behalf-of tokens are verified against."""
    settings = InjectionSettings.from_env({
        "CHAPERONE_OIDC_ISSUER": "https://dex.example.com", "CHAPERONE_OIDC_AUDIENCE": "chaperone",
        "CHAPERONE_OIDC_GROUPS_CLAIM": "roles",
        "CHAPERONE_OIDC_CA_FILE": contract.SIDECAR_SECRET_DIR + "/oidc-ca.crt"})
    container = webhook_container(**{f.name: getattr(settings, f.name)
                                     for f in dataclasses.fields(settings)})
    config = SidecarConfig.from_env(env_of(container), container["args"][1:])
    assert config.oidc == cfg.OIDCConfig(
        issuer="https://dex.example.com", audience="chaperone", username_claim="sub",
        groups_claim="roles", ca_file="/var/run/secrets/chaperone/sidecar/oidc-ca.crt")
    names = [e["name"] for e in webhook_container()["env"]]
    assert not [n for n in names if n.startswith("CHAPERONE_OIDC_")]  # not configured: absent


@pytest.mark.parametrize("change, message", [
    ({"CHAPERONE_CONNECTIONS": "{not json"}, "CHAPERONE_CONNECTIONS is not JSON"),
    ({"CHAPERONE_CONNECTIONS": '[{"type": "aws"}]'}, "must be an object with a name"),
    ({"CHAPERONE_CONNECTIONS": '[{"name": "a", "reversePort": 15001}]'}, "same port 15001"),
    ({"CHAPERONE_CREATOR": "[]"}, "CHAPERONE_CREATOR must be a JSON object"),
    ({"CHAPERONE_APPROVAL_MODE": "later"}, "CHAPERONE_APPROVAL_MODE must be one of"),
    ({"CHAPERONE_SPOOL_LIMIT_BYTES": "1Gi"}, "CHAPERONE_SPOOL_LIMIT_BYTES must be an integer"),
    ({"KUBERNETES_SERVICE_HOST": ""}, "KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT are not set"),
    ({"CHAPERONE_OIDC_ISSUER": "https://idp"}, "CHAPERONE_OIDC_AUDIENCE is required"),
    ({"CHAPERONE_EVENT_LOOP": "trio"}, "CHAPERONE_EVENT_LOOP must be one of auto, uvloop, asyncio"),
])
def test_from_env_refuses_bad_input_naming_the_variable(change, message):
    container = webhook_container()
    with pytest.raises(ConfigError, match=message):
        SidecarConfig.from_env(env_of(container, change), container["args"][1:])


def test_from_env_refuses_bad_arguments():
    container = webhook_container()
    with pytest.raises(ConfigError, match="--mode"):
        SidecarConfig.from_env(env_of(container), ["--mode", "sideways"])
    with pytest.raises(ConfigError, match="--port must be a TCP port"):
        SidecarConfig.from_env(env_of(container), ["--port", "70000"])
    with pytest.raises(ConfigError, match="same port"):
        SidecarConfig.from_env(env_of(container), ["--port", "9000", "--health-port", "9000"])


def test_ipv6_api_server_and_namespace_fallback(tmp_path):
    (tmp_path / "namespace").write_text("from-token\n")
    env = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "6443",
           "CHAPERONE_TOKEN_DIR": str(tmp_path)}
    config = SidecarConfig.from_env(env, [])
    assert config.api_server == "https://[fd00::1]:6443"
    assert config.pod_namespace == "from-token"


def test_from_files_standalone(tmp_path):
    root = tmp_path / "conf"
    root.mkdir()
    (root / "chaperone.yaml").write_text(
        "namespace: dev\nuser: bob\ngroups: [team]\napprovalMode: defer\nreversePortBase: 16000\n"
        "oidc: {issuer: 'http://127.0.0.1:1', audience: me}\n")
    config = SidecarConfig.from_files(root, port=18080, health_port=18081, env={})
    assert config.standalone and config.mode == "explicit" and config.api_server == ""
    assert (config.pod_namespace, config.creator, config.creator_groups) == ("dev", "bob", ("team",))
    assert config.approval_mode == "defer" and config.reverse_port_base == 16000
    assert config.ca_dir == root / "ca" and config.recordings_dir == root / "recordings"
    assert config.approvals_dir == root / "approvals" and config.spool_dir == root / "spool"
    assert config.health_host == "127.0.0.1" and config.token_dir is None
    assert config.oidc.audience == "me"
    # Arguments beat the file; a missing directory is created.
    other = SidecarConfig.from_files(tmp_path / "new", namespace="x", user="carol", env={})
    assert (tmp_path / "new").is_dir() and other.pod_namespace == "x" and other.creator == "carol"


def test_from_files_reports_a_broken_settings_file(tmp_path):
    (tmp_path / "chaperone.yaml").write_text("groups: notalist\n")
    with pytest.raises(ConfigError, match="groups must be a list"):
        SidecarConfig.from_files(tmp_path, env={})
    (tmp_path / "chaperone.yaml").write_text("[1, 2\n")
    with pytest.raises(ConfigError, match="chaperone.yaml"):
        SidecarConfig.from_files(tmp_path, env={})


def test_config_is_frozen():
    config = SidecarConfig(standalone=True)
    with pytest.raises(AttributeError):
        config.proxy_port = 1  # type: ignore[misc]


def test_event_loop_is_uvloop_by_default_and_can_be_chosen(tmp_path):
    import asyncio

    import uvloop

    from chaperone_sidecar.proxy import event_loop_factory

    container = webhook_container()
    config = SidecarConfig.from_env(env_of(container), container["args"][1:])
    assert config.event_loop == "auto"
    factory, name = event_loop_factory(config.event_loop)
    loop = factory()
    try:
        assert name == "uvloop" and isinstance(loop, uvloop.Loop)  # uvloop is a dependency
    finally:
        loop.close()
    config = SidecarConfig.from_env(env_of(container, {"CHAPERONE_EVENT_LOOP": "asyncio"}), container["args"][1:])
    factory, name = event_loop_factory(config.event_loop)
    loop = factory()
    try:
        assert name == "asyncio" and not isinstance(loop, uvloop.Loop)
        assert isinstance(loop, asyncio.AbstractEventLoop)
    finally:
        loop.close()
    files = SidecarConfig.from_files(tmp_path / "c", env={"CHAPERONE_EVENT_LOOP": "uvloop"})
    assert files.event_loop == "uvloop"
