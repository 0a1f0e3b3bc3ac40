"""The Redis password reaches the sidecar container and nothing else (issue 12).

The agent shares its pod's network namespace with the sidecar, so it can always open a TCP
connection to Redis; AUTH keeps it out only if the agent can never read the password. These
tests pin the injection side: the sidecar gets it as a secretKeyRef variable, the agent
containers get no reference to that Secret, and a pod spec that tries to hand it (or the CA key,
or the sidecar's credentials) to an agent is refused.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from chaperone_operator.injection.inject import inject
from chaperone_operator.injection.settings import InjectionSettings
from chaperone_sidecar import contract

CASE = Path(__file__).parent / "testdata" / "inject" / "redis-auth.yaml"
SETTINGS = InjectionSettings(redis_url="redis://chaperone-redis.chaperone-system.svc:6379/0",
                             redis_secret="chaperone-redis")
POD = {"apiVersion": "v1", "kind": "Pod",
       "metadata": {"name": "p", "labels": {"chaperone.dev/inject": "true"}},
       "spec": {"containers": [{"name": "claude", "image": "x"}]}}


def _case():
    case = yaml.safe_load(CASE.read_text())
    settings = InjectionSettings.from_env({k: str(v) for k, v in case["settings"].items()})
    return inject(case["pod"], settings, [], case["userInfo"])


def _mentions(obj, name: str) -> bool:
    return name in yaml.safe_dump(obj)


def test_only_the_sidecar_gets_the_password_and_ca():
    result = _case()
    assert result.allowed, result.refused
    spec = result.pod["spec"]
    sidecar = next(c for c in spec["initContainers"] if c["name"] == contract.SIDECAR_NAME)
    env = {e["name"]: e for e in sidecar["env"]}
    assert env[contract.ENV_REDIS_URL]["value"] == "rediss://chaperone-redis.chaperone-system.svc:6379/0"
    assert env[contract.ENV_REDIS_PASSWORD]["valueFrom"] == {
        "secretKeyRef": {"name": "chaperone-redis", "key": "password"}}
    assert env[contract.ENV_REDIS_CA_CERT]["valueFrom"] == {
        "secretKeyRef": {"name": "chaperone-redis", "key": "ca.crt"}}
    for agent in spec["containers"]:
        assert not _mentions(agent, "chaperone-redis") and not _mentions(agent, "REDIS"), agent
    # No volume carries it either (a volume could be mounted by anyone later).
    assert not _mentions(spec.get("volumes", []), "chaperone-redis")


def test_without_a_secret_no_password_variable():
    result = inject(POD, InjectionSettings(redis_url="redis://r:6379/0"), [], {"username": "d"})
    sidecar = result.pod["spec"]["initContainers"][0]
    assert contract.ENV_REDIS_PASSWORD not in {e["name"] for e in sidecar["env"]}


def _with_agent(**agent_changes) -> dict:
    pod = copy.deepcopy(POD)
    pod["spec"]["containers"][0].update(agent_changes.pop("container", {}))
    pod["spec"].update(agent_changes)
    return pod


SECRET_REF = {"secretKeyRef": {"name": "chaperone-redis", "key": "password"}}
REFUSED = {
    "env-secretKeyRef": _with_agent(container={"env": [{"name": "P", "valueFrom": SECRET_REF}]}),
    "envFrom": _with_agent(container={"envFrom": [{"secretRef": {"name": "chaperone-redis"}}]}),
    "secret-volume": _with_agent(container={"volumeMounts": [{"name": "r", "mountPath": "/r"}]},
                                 volumes=[{"name": "r", "secret": {"secretName": "chaperone-redis"}}]),
    "projected-volume": _with_agent(
        container={"volumeMounts": [{"name": "r", "mountPath": "/r"}]},
        volumes=[{"name": "r", "projected": {"sources": [{"secret": {"name": "chaperone-redis"}}]}}]),
    "ca-key": _with_agent(container={"envFrom": [{"secretRef": {"name": "chaperone-ca"}}]}),
    "user-init-container": _with_agent(initContainers=[{"name": "setup", "image": "x", "env": [
        {"name": "P", "valueFrom": SECRET_REF}]}]),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_agent_containers_may_not_read_sidecar_secrets(name):
    result = inject(REFUSED[name], SETTINGS, [], {"username": "dave"})
    assert not result.allowed, name
    assert "belongs to the Chaperone sidecar" in result.refused


def test_other_secrets_and_unmounted_volumes_are_fine():
    pod = _with_agent(container={"env": [{"name": "T", "valueFrom": {
        "secretKeyRef": {"name": "my-token", "key": "t"}}}]},
        volumes=[{"name": "r", "secret": {"secretName": "chaperone-redis"}}])  # not mounted
    assert inject(pod, SETTINGS, [], {"username": "dave"}).allowed


@pytest.mark.parametrize("env, fragment", [
    ({"CHAPERONE_REDIS_SECRET": "chaperone-redis"}, "needs CHAPERONE_REDIS_URL"),
    ({"CHAPERONE_REDIS_URL": "redis://r:6379/0", "CHAPERONE_REDIS_SECRET": "s",
      "CHAPERONE_REDIS_TLS_CA": "true"}, "needs a rediss://"),
])
def test_settings_refuse_passwords_in_the_open(env, fragment):
    with pytest.raises(ValueError, match=fragment):
        InjectionSettings.from_env(env)
