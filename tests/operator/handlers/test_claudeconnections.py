"""ClaudeConnection admission errors and status conditions."""

from __future__ import annotations

import datetime as dt
import json

import kopf
import pytest

from chaperone_operator.handlers.claudeconnections import (
    connection_errors, connection_status, credentials_condition, injected_pod_count,
    on_claudeconnection_validate, pod_connections,
)

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)


def conn(**spec) -> dict:
    return {"metadata": {"name": "c", "namespace": "team", "generation": 2}, "spec": spec}


def test_connection_errors_name_each_field():
    errors = connection_errors(conn(
        type="http", hosts=["api.example.com", "https://x.example.com", "a.example.com:0",
                            "API.example.com", "*.ok.example.com:8443"],
        baseURL="https://u:p@x.example.com",
        aws={"endpointURL": "not a url"},
        podSelector={"matchExpressions": [{"key": "a", "operator": "In"},
                                          {"key": "b", "operator": "Exists", "values": ["x"]}]},
        credentials={"source": "webIdentity", "secretRef": {"name": "s", "tokenKey": " "}}))
    assert errors == [
        'spec.hosts[1]: invalid host glob "https://x.example.com": give the host name only, without a scheme',
        "spec.hosts[2]: invalid port '0' in 'a.example.com:0': must be 1-65535",
        "spec.hosts[3]: duplicate host 'API.example.com' (also spec.hosts[0])",
        "spec.baseURL: must not embed credentials; use spec.credentials",
        "spec.aws.endpointURL: 'not a url' does not name a host",
        "spec.podSelector.matchExpressions[0].values: required for operator In",
        "spec.podSelector.matchExpressions[1].values: must be empty for operator Exists",
        "spec.aws.roleArn: required when spec.credentials.source is webIdentity",
        "spec.credentials.secretRef.tokenKey: must not be empty",
    ]
    assert connection_errors(conn(type="anthropic")) == []


def test_validate_handler():
    with pytest.raises(kopf.AdmissionError, match=r"ClaudeConnection team/c is invalid:\nspec.hosts\[0\]"):
        on_claudeconnection_validate(body=conn(type="http", hosts=["a b"]))


def test_credentials_condition():
    aws = {"type": "aws", "credentials": {"source": "secret", "secretRef": {"name": "k"}}}
    assert credentials_condition(aws, None, 1)["reason"] == "SecretNotFound"
    partial = {"data": {"AWS_ACCESS_KEY_ID": "eA=="}}
    missing = credentials_condition(aws, partial, 1)
    assert (missing["status"], missing["message"]) == ("False", "Secret 'k' lacks key(s) AWS_SECRET_ACCESS_KEY")
    full = {"data": {"AWS_ACCESS_KEY_ID": "eA==", "AWS_SECRET_ACCESS_KEY": "eA=="}}
    assert credentials_condition(aws, full, 1)["status"] == "True"
    custom = {"type": "http", "credentials": {"source": "secret", "secretRef": {"name": "k", "tokenKey": "pat"}}}
    assert credentials_condition(custom, {"data": {"pat": "eA=="}}, 1)["reason"] == "SecretFound"
    assert credentials_condition({"type": "anthropic"}, None, 1)["reason"] == "NoCredentialsNeeded"
    web = {"type": "aws", "credentials": {"source": "webIdentity"}, "aws": {"roleArn": "arn:r"}}
    assert credentials_condition(web, None, 1)["reason"] == "WebIdentity"


def pod(*connections, phase="Pending", deleting=False) -> dict:
    meta = {"annotations": {"chaperone.dev/status": json.dumps({"connections": list(connections)})}}
    if deleting:
        meta["deletionTimestamp"] = "2030-01-01T00:00:00Z"
    return {"metadata": meta, "status": {"phase": phase}}


def test_pod_connections_and_counts():
    assert pod_connections(pod("a", "b")) == {"a", "b"}
    assert pod_connections({"metadata": {"annotations": {"chaperone.dev/status": "{bad"}}}) == set()
    pods = [pod("c"), pod("c", phase="Succeeded"), pod("c", deleting=True), pod("other"), pod("c", "x")]
    assert injected_pod_count("c", pods) == 2


def test_connection_status():
    spec = {"type": "http", "credentials": {"source": "secret", "secretRef": {"name": "k"}},
            "upstreamCA": {"name": "ca", "key": "ca.crt"}}
    obj = {"metadata": {"name": "c", "generation": 2}, "spec": spec}
    status = connection_status(obj, None, {"data": {"token": "eA=="}}, [pod("c")], False, NOW)
    ready, creds = status["conditions"]
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "False", "UpstreamCAMissing")
    assert (creds["type"], creds["status"]) == ("CredentialsFound", "True")
    assert status["injectedPods"] == 1 and status["observedGeneration"] == 2
    ok = connection_status(obj, status, {"data": {"token": "eA=="}}, [], True, NOW)
    assert ok["conditions"][0]["status"] == "True" and ok["injectedPods"] == 0
