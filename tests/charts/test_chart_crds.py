"""The chart's CRDs upgrade with the chart (crds.enabled, crds.keep) and the operator's
PodDisruptionBudget exists exactly when it runs more than one replica.

Rendering is checked with the real helm (`helm template`); the lifecycle - adopting CRDs that
kubectl applied, an upgrade that adds a CRD field, uninstall with and without crds.keep - runs
real `helm install/upgrade/uninstall` against the test bed's real kube-apiserver.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml

CHART_NS = "chaperone-system"
KEEP = "helm.sh/resource-policy"


@pytest.fixture(scope="module")
def helm(repo_root) -> str:
    if os.environ.get("HELM_BIN") and os.access(os.environ["HELM_BIN"], os.X_OK):
        return os.environ["HELM_BIN"]
    res = subprocess.run([str(repo_root / "hack" / "build-helm.sh")], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.fail(f"helm could not be built: {res.stderr[-2000:]}", pytrace=False)
    return res.stdout.strip().splitlines()[-1]


def run_template(helm, chart: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm, "template", "chaperone", str(chart), "--namespace", CHART_NS,
                           "--kube-version", "1.33.0", *args], capture_output=True, text=True)


def render(helm, repo_root, *args: str) -> list[dict]:
    res = run_template(helm, repo_root / "charts" / "chaperone", *args)
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def crds(docs) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "CustomResourceDefinition"}


def source_crds(repo_root) -> dict[str, dict]:
    loaded = [yaml.safe_load(p.read_text()) for p in sorted((repo_root / "crds").glob("*.yaml"))]
    return {c["metadata"]["name"]: c for c in loaded}


# ------------------------------------------------------------------------------ rendering

def test_crds_render_from_crds_dir_with_the_keep_annotation_by_default(helm, repo_root):
    rendered, source = crds(render(helm, repo_root)), source_crds(repo_root)
    assert set(rendered) == set(source) and len(source) == 3
    for name, crd in rendered.items():
        meta = crd["metadata"]
        assert meta["annotations"] == {KEEP: "keep"}, name
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        assert meta["labels"]["app.kubernetes.io/instance"] == "chaperone"
        # Exactly crds/ (the single source) apart from the release's labels and annotation.
        assert {k: v for k, v in crd.items() if k != "metadata"} == \
            {k: v for k, v in source[name].items() if k != "metadata"}, name
        assert {k: v for k, v in meta.items() if k not in ("labels", "annotations")} == \
            source[name]["metadata"]


def test_crds_keep_false_renders_them_without_the_annotation(helm, repo_root):
    rendered = crds(render(helm, repo_root, "--set", "crds.keep=false"))
    assert len(rendered) == 3
    assert all(KEEP not in (c["metadata"].get("annotations") or {}) for c in rendered.values())


def test_crds_disabled_renders_no_crd_at_all(helm, repo_root):
    docs = render(helm, repo_root, "--set", "crds.enabled=false", "--set", "operator.replicas=2",
                  "--set", "operator.peering.enabled=true")
    assert crds(docs) == {}
    assert [d for d in docs if d["kind"] == "Deployment"]  # the rest of the chart still renders


def test_peering_crd_follows_crds_keep(helm, repo_root):
    peering = ("--set", "operator.replicas=2", "--set", "operator.peering.enabled=true")
    kept = crds(render(helm, repo_root, *peering))["clusterkopfpeerings.kopf.dev"]
    assert kept["metadata"]["annotations"] == {KEEP: "keep"}
    dropped = crds(render(helm, repo_root, *peering, "--set", "crds.keep=false"))
    assert KEEP not in (dropped["clusterkopfpeerings.kopf.dev"]["metadata"].get("annotations") or {})


def test_the_chart_has_no_crds_directory(repo_root):
    """helm installs a chart's crds/ once and never upgrades it: the CRDs must come only from
    templates (a crds/ directory would also install them twice)."""
    assert not (repo_root / "charts" / "chaperone" / "crds").exists()


def pdbs(docs) -> list[dict]:
    return [d for d in docs if d["kind"] == "PodDisruptionBudget"]


TWO = ("--set", "operator.replicas=2", "--set", "operator.peering.enabled=true")


def test_pdb_only_when_the_operator_runs_more_than_one_replica(helm, repo_root):
    assert pdbs(render(helm, repo_root)) == []
    docs = render(helm, repo_root, *TWO)
    [pdb] = pdbs(docs)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert pdb["metadata"]["name"] == "chaperone-operator"
    assert pdb["metadata"]["namespace"] == CHART_NS
    assert pdb["spec"] == {"minAvailable": 1, "unhealthyPodEvictionPolicy": "AlwaysAllow",
                           "selector": deployment["spec"]["selector"]}
    assert pdbs(render(helm, repo_root, *TWO, "--set", "operator.podDisruptionBudget.enabled=false")) == []


def test_pdb_min_available_is_value_controlled(helm, repo_root):
    three = ("--set", "operator.replicas=3", "--set", "operator.peering.enabled=true")
    [pdb] = pdbs(render(helm, repo_root, *three, "--set", "operator.podDisruptionBudget.minAvailable=2"))
    assert pdb["spec"]["minAvailable"] == 2
    [pdb] = pdbs(render(helm, repo_root, *three,
                        "--set-string", "operator.podDisruptionBudget.minAvailable=50%"))
    assert pdb["spec"]["minAvailable"] == "50%"
    # A budget no eviction can satisfy would hang every node drain: refused at render.
    res = run_template(helm, repo_root / "charts" / "chaperone", *TWO,
                       "--set", "operator.podDisruptionBudget.minAvailable=2")
    assert res.returncode != 0
    assert "operator.podDisruptionBudget.minAvailable (2) must be below operator.replicas (2)" in res.stderr


@pytest.mark.parametrize("setting, complaint", [
    ("crds.enabled=maybe", "/crds/enabled"),
    ("crds.keep=1", "/crds/keep"),
    ("crds.upgrade=true", "upgrade"),
    ("operator.podDisruptionBudget.minAvailable=0", "minAvailable"),
    ("operator.podDisruptionBudget.minAvailable=150%", "minAvailable"),
])
def test_values_schema_checks_the_new_values(helm, repo_root, setting, complaint):
    flag = "--set-string" if setting.endswith(("maybe", "%")) else "--set"
    res = run_template(helm, repo_root / "charts" / "chaperone", *TWO, flag, setting)
    assert res.returncode != 0 and "values don't meet the specifications of the schema" in res.stderr
    assert complaint in res.stderr


def test_pdb_and_crds_are_accepted_by_the_apiserver(helm, repo_root, control_plane):
    res = run_template(helm, repo_root / "charts" / "chaperone", *TWO)
    assert res.returncode == 0, res.stderr
    control_plane.create_namespace(CHART_NS)
    applied = control_plane.kubectl("apply", "--dry-run=server", "-f", "-", input=res.stdout, check=False)
    assert applied.returncode == 0, applied.stderr
    assert "poddisruptionbudget.policy/chaperone-operator created (server dry run)" in applied.stdout


# --------------------------------------------------------------- lifecycle on the apiserver

# The lifecycle runs on a copy of the chart whose CRDs are moved to a group of their own and
# which keeps only the CRD template: the test bed's chaperone.dev CRDs serve every other test
# (deleting them would delete their objects), and the chart's fail-closed webhooks and cluster
# roles would act on the whole test bed. What is exercised is the chart's templates/crds.yaml
# and values, through the real helm and apiserver.
GROUP = "crd-upgrade.test.chaperone.dev"
PROBE = "upgradeProbe"  # the field the "next chart version" adds to ClaudeConnection's spec


def chart_copy(repo_root: Path, dest: Path, *, with_probe_field: bool) -> Path:
    shutil.copytree(repo_root / "charts" / "chaperone", dest)
    for template in (dest / "templates").iterdir():
        if template.name not in ("crds.yaml", "_helpers.tpl"):
            template.unlink()
    for path in (dest / "files" / "crds").glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        crd["spec"]["group"] = GROUP
        crd["metadata"]["name"] = f"{crd['spec']['names']['plural']}.{GROUP}"
        if with_probe_field and crd["spec"]["names"]["kind"] == "ClaudeConnection":
            for version in crd["spec"]["versions"]:
                spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
                spec["properties"][PROBE] = {"type": "string", "description": "Added by an upgrade."}
        path.write_text(yaml.safe_dump(crd, sort_keys=False))
    return dest


def test_crds_adopt_upgrade_and_keep_through_the_release_lifecycle(helm, repo_root, control_plane,
                                                                  tmp_path):
    cp = control_plane
    v1 = chart_copy(repo_root, tmp_path / "v1", with_probe_field=False)
    v2 = chart_copy(repo_root, tmp_path / "v2", with_probe_field=True)
    names = sorted(yaml.safe_load(p.read_text())["metadata"]["name"]
                   for p in (v1 / "files" / "crds").glob("*.yaml"))
    ns, release = f"crd-upgrade-{uuid.uuid4().hex[:6]}", "crd-upgrade"
    env = {**os.environ, "KUBECONFIG": str(cp.kubeconfig_path),
           "HELM_CACHE_HOME": str(tmp_path / "helm-cache"),
           "HELM_CONFIG_HOME": str(tmp_path / "helm-config"),
           "HELM_DATA_HOME": str(tmp_path / "helm-data")}

    def helm_run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run([helm, *args, "-n", ns], capture_output=True, text=True, env=env,
                             timeout=180)
        if ok:
            assert res.returncode == 0, (args, res.stdout, res.stderr)
        return res

    def crd(name: str) -> dict | None:
        res = cp.kubectl("get", "crd", name, "-o", "json", check=False)
        return json.loads(res.stdout) if res.returncode == 0 else None

    connection = {"apiVersion": f"{GROUP}/v1alpha1", "kind": "ClaudeConnection",
                  "metadata": {"name": "probe", "namespace": ns},
                  "spec": {"type": "anthropic", PROBE: "kept"}}
    connections = f"claudeconnections.{GROUP}"

    def create_connection() -> subprocess.CompletedProcess:
        return cp.kubectl("create", "--validate=strict", "-f", "-", input=json.dumps(connection),
                          check=False)

    cp.create_namespace(ns)
    try:
        # CRDs applied by kubectl - as the chart's former crds/ directory or `kubectl apply -f
        # crds/` left them - belong to no release: helm refuses to take them silently...
        for path in sorted((v1 / "files" / "crds").glob("*.yaml")):
            cp.kubectl("apply", "-f", str(path))
        refused = helm_run("install", release, str(v1), ok=False)
        assert refused.returncode != 0 and "invalid ownership metadata" in refused.stderr, refused.stderr
        # ...and takes them with --take-ownership (docs/architecture.md, upgrading).
        helm_run("install", release, str(v1), "--take-ownership")
        for name in names:
            meta = crd(name)["metadata"]
            assert meta["annotations"][KEEP] == "keep"
            assert meta["annotations"]["meta.helm.sh/release-name"] == release
        cp.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                   *[f"crd/{n}" for n in names])

        # v1 does not know the field: strict validation refuses it.
        before = create_connection()
        assert before.returncode != 0 and f'unknown field "spec.{PROBE}"' in before.stderr, before.stderr

        # The upgrade applies the CRD change (a crds/ directory would have been skipped).
        helm_run("upgrade", release, str(v2))
        schema = crd(connections)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        assert PROBE in schema["properties"]["spec"]["properties"]
        deadline = time.monotonic() + 30
        while (created := create_connection()).returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.3)  # the apiserver serves the new schema a moment after the update
        assert created.returncode == 0, created.stderr
        stored = json.loads(cp.kubectl("get", connections, "probe", "-n", ns, "-o", "json").stdout)
        assert stored["spec"][PROBE] == "kept"  # stored, not pruned

        # crds.keep (default): uninstalling leaves the CRDs, and with them the objects.
        helm_run("uninstall", release)
        assert all(crd(n) for n in names)
        assert cp.kubectl("get", connections, "probe", "-n", ns, check=False).returncode == 0

        # Reinstalling the same release adopts its kept CRDs, and an upgrade to
        # crds.enabled=false leaves them (helm skips deleting what carries the keep annotation).
        helm_run("install", release, str(v2))
        helm_run("upgrade", release, str(v2), "--set", "crds.enabled=false")
        assert all(crd(n) for n in names)
        assert stored["metadata"]["uid"] == json.loads(cp.kubectl(
            "get", connections, "probe", "-n", ns, "-o", "json").stdout)["metadata"]["uid"]
        # Back in the release, then an upgrade to crds.keep=false drops the annotation and the
        # uninstall deletes them (and every object of their kinds).
        helm_run("upgrade", release, str(v2), "--set", "crds.enabled=true")
        helm_run("upgrade", release, str(v2), "--set", "crds.keep=false")
        assert all(KEEP not in (crd(n)["metadata"].get("annotations") or {}) for n in names)
        helm_run("uninstall", release)
        deadline = time.monotonic() + 60
        while any(crd(n) for n in names) and time.monotonic() < deadline:
            time.sleep(0.3)
        assert not [n for n in names if crd(n)]
        assert cp.kubectl("get", "crd", connections, check=False).returncode != 0
    finally:
        subprocess.run([helm, "uninstall", release, "-n", ns], env=env, capture_output=True)
        cp.kubectl("delete", "crd", *names, "--ignore-not-found", "--wait=false", check=False)
        cp.kubectl("delete", "namespace", ns, "--ignore-not-found", "--wait=false", check=False)


@pytest.mark.parametrize("setting, says", [
    ("crds.keep=true", "upgraded with the release, kept when it is uninstalled"),
    ("crds.keep=false", "DELETED with it (crds.keep=false)"),
    ("crds.enabled=false", "not managed by this release (crds.enabled=false)"),
])
def test_notes_say_what_happens_to_the_crds(helm, repo_root, control_plane, tmp_path, setting, says):
    env = {**os.environ, "KUBECONFIG": str(control_plane.kubeconfig_path),
           "HELM_CACHE_HOME": str(tmp_path / "c"), "HELM_CONFIG_HOME": str(tmp_path / "f"),
           "HELM_DATA_HOME": str(tmp_path / "d")}
    res = subprocess.run([helm, "install", "chaperone", str(repo_root / "charts" / "chaperone"),
                          "-n", CHART_NS, "--dry-run=client", "--set", setting,
                          # The test bed's CRDs (kubectl-applied by other tests) are not the
                          # release's; a dry run must not depend on whether they exist yet.
                          "--take-ownership"],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    notes = " ".join(res.stdout.split("NOTES:", 1)[1].split())
    assert says in notes, notes
