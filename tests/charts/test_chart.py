"""The Helm chart renders with a real helm (built from Go modules) and what it renders is
accepted by the real apiserver (`kubectl apply --dry-run=server`), CRDs included (they are
templates: tests/charts/test_chart_crds.py)."""

from __future__ import annotations

import os
import subprocess

import pytest
import yaml


@pytest.fixture(scope="session")
def helm(repo_root):
    res = subprocess.run([str(repo_root / "hack" / "build-helm.sh")], capture_output=True,
                         text=True, env={**os.environ})
    if res.returncode != 0:
        pytest.fail(f"helm could not be built: {res.stderr[-2000:]}", pytrace=False)
    return res.stdout.strip()


def render(helm, repo_root, *args: str) -> str:
    res = subprocess.run([helm, "template", "chaperone", str(repo_root / "charts" / "chaperone"),
                          "--namespace", "chaperone-system",
                          "--kube-version", "1.33.0", *args],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_chart_lints(helm, repo_root):
    res = subprocess.run([helm, "lint", "--strict", str(repo_root / "charts" / "chaperone")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_rendered_chart_is_accepted_by_the_apiserver(helm, repo_root, control_plane):
    rendered = render(helm, repo_root)
    kinds = [d["kind"] for d in yaml.safe_load_all(rendered) if d]
    assert kinds.count("CustomResourceDefinition") == 3
    assert "ClusterRoleBinding" in kinds
    control_plane.create_namespace("chaperone-system")
    res = control_plane.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered,
                                check=False)
    assert res.returncode == 0, res.stderr
    assert "clusterrole.rbac.authorization.k8s.io/chaperone-approver created (server dry run)" \
        in res.stdout


def test_approver_groups_value_binds_the_approver_role(helm, repo_root):
    docs = list(yaml.safe_load_all(render(helm, repo_root, "--set", "approverGroups={sre,leads}")))
    binding = next(d for d in docs if d and d["kind"] == "ClusterRoleBinding"
                   and d["metadata"]["name"] == "chaperone-approvers")
    assert [s["name"] for s in binding["subjects"]] == ["sre", "leads"]
    assert binding["roleRef"]["name"] == "chaperone-approver"
