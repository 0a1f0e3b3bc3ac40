"""The postgres ClaudeConnection and match.postgres on the real apiserver (CEL rules, enums)."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from chaperone_sidecar.policy.compiler import compile_policy


@pytest.fixture(scope="module")
def ns(control_plane, crds_installed):
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "agents"}}))
    return "agents"


def docs(repo_root, name):
    return list(yaml.safe_load_all((repo_root / "examples" / "postgres" / name).read_text()))


def dry_run(control_plane, obj):
    return control_plane.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(obj), check=False)


def test_the_examples_apply_and_the_policy_compiles(control_plane, ns, repo_root):
    for name in ("connection.yaml", "policy.yaml"):
        res = control_plane.kubectl("apply", "--dry-run=server", "-f",
                                    str(repo_root / "examples" / "postgres" / name), check=False)
        assert res.returncode == 0, res.stderr
    (policy,) = docs(repo_root, "policy.yaml")
    assert compile_policy(policy).rules


def test_postgres_settings_are_required_and_only_for_postgres(control_plane, ns, repo_root):
    conn = next(d for d in docs(repo_root, "connection.yaml") if d["kind"] == "ClaudeConnection")
    missing = copy.deepcopy(conn)
    del missing["spec"]["postgres"]
    res = dry_run(control_plane, missing)
    assert res.returncode != 0 and "a postgres connection needs postgres settings" in res.stderr
    wrong = copy.deepcopy(conn)
    wrong["spec"]["type"] = "http"
    wrong["spec"]["hosts"] = ["db.example.com"]
    res = dry_run(control_plane, wrong)
    assert res.returncode != 0 and "postgres settings are only allowed on connections of type postgres" in res.stderr
    bad = copy.deepcopy(conn)
    bad["spec"]["postgres"]["sslmode"] = "prefer"
    res = dry_run(control_plane, bad)
    assert res.returncode != 0 and "sslmode" in res.stderr


def test_match_postgres_kinds_are_an_enum(control_plane, ns, repo_root):
    (policy,) = docs(repo_root, "policy.yaml")
    policy["spec"]["rules"][0]["match"]["postgres"]["kinds"] = ["reads"]
    res = dry_run(control_plane, policy)
    assert res.returncode != 0 and "kinds[0]" in res.stderr
