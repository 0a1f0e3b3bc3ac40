"""Static checks on the hand-written CRDs (no apiserver): one source, complete documentation.

`kubectl explain` is how a platform team learns the product, so every field must say what it
means; and two copies of crds/ must never drift from it: the chart's (charts/chaperone/files/
crds/, rendered by templates/crds.yaml) and the sidecar package's (chaperone_sidecar/crds/, what
the policy compiler validates against outside the apiserver, shipped in the wheel and image).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from importlib import resources
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CRD_FILES = sorted((REPO / "crds").glob("*.yaml"))
CHART_COPY = REPO / "charts" / "chaperone" / "files" / "crds"
PACKAGE_COPY = REPO / "sidecar" / "chaperone_sidecar" / "crds"
KINDS = {"ClaudeConnection": "cc", "AccessPolicy": "ap", "ApprovalRequest": "ar"}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def undocumented(schema: dict, path: str) -> list[str]:
    """Paths of properties (recursively, through items) that carry no description."""
    missing = []
    for name, prop in (schema.get("properties") or {}).items():
        here = f"{path}.{name}"
        if name != "metadata" and not (prop.get("description") or "").strip():
            missing.append(here)
        missing += undocumented(prop, here)
    if isinstance(schema.get("items"), dict):
        missing += undocumented(schema["items"], f"{path}[]")
    return missing


def test_three_crds_with_names_from_the_design():
    crds = {load(p)["spec"]["names"]["kind"]: load(p) for p in CRD_FILES}
    assert set(crds) == set(KINDS)
    for kind, short in KINDS.items():
        spec = crds[kind]["spec"]
        assert spec["group"] == "chaperone.dev"
        assert spec["names"]["shortNames"] == [short]
        assert [v["name"] for v in spec["versions"]] == ["v1alpha1"]
        assert spec["versions"][0]["subresources"] == {"status": {}}
        assert crds[kind]["metadata"]["name"] == f"{spec['names']['plural']}.chaperone.dev"


@pytest.mark.parametrize("path", CRD_FILES, ids=lambda p: p.name)
def test_every_field_has_a_description(path):
    schema = load(path)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert schema.get("description")
    assert undocumented(schema, "") == []


@pytest.mark.parametrize("path", CRD_FILES, ids=lambda p: p.name)
def test_chart_copy_matches_the_single_source(path):
    copy = CHART_COPY / path.name
    assert copy.exists(), f"{copy} missing: run `make sync-crds`"
    assert copy.read_bytes() == path.read_bytes(), f"{copy} drifted from crds/: run `make sync-crds`"


def test_chart_has_no_crd_that_crds_lacks():
    copies = {p.name for p in CHART_COPY.iterdir()}
    assert copies == {p.name for p in CRD_FILES}


@pytest.mark.parametrize("path", CRD_FILES, ids=lambda p: p.name)
def test_package_copy_matches_the_single_source(path):
    """What the installed package reads (importlib.resources, as policy/schema.py does) is crds/."""
    packaged = resources.files("chaperone_sidecar") / "crds" / path.name
    assert packaged.is_file(), f"{PACKAGE_COPY / path.name} missing: run `make sync-crds`"
    assert packaged.read_bytes() == path.read_bytes(), \
        f"{PACKAGE_COPY} drifted from crds/: run `make sync-crds`"


def test_package_has_no_crd_that_crds_lacks():
    assert {p.name for p in PACKAGE_COPY.iterdir()} == {p.name for p in CRD_FILES}


def test_the_wheel_carries_the_crds_and_declares_jsonschema(tmp_path):
    """The wheel (what the image installs: `pip install .`) holds the CRDs byte for byte, so
    the compiler in the operator and the sidecar can read them; built from a copy of the
    sources, as the image's build context is."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("operator", "sidecar", "testbed"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir",
                    str(tmp_path / "dist"), str(src)], check=True, timeout=300)
    [wheel] = (tmp_path / "dist").glob("chaperone-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = {Path(n).name: archive.read(n) for n in archive.namelist()
                   if n.startswith("chaperone_sidecar/crds/")}
        metadata = Parser().parsestr(archive.read(next(n for n in archive.namelist()
                                                       if n.endswith(".dist-info/METADATA"))).decode())
    assert shipped == {p.name: p.read_bytes() for p in CRD_FILES}
    assert any(r.split(">")[0].strip() == "jsonschema" for r in metadata.get_all("Requires-Dist"))


def test_masking_max_body_bytes_describes_what_the_sidecar_does():
    """Mask refuses only what it must hold whole (buffered, or decompressed) above the limit; an
    uncompressed stream is masked as it passes whatever its size (tests/sidecar/addons/
    test_mask.py) - `kubectl explain` must not promise that larger bodies are refused."""
    spec = load(REPO / "crds" / "accesspolicies.chaperone.dev.yaml")["spec"]["versions"][0]
    masking = spec["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["masking"]
    text = " ".join(masking["properties"]["maxBodyBytes"]["description"].split())
    assert "a larger one is refused" not in text
    for said in ("buffered or decompressed body above it", "refused with 502",
                 "uncompressed stream", "masked as it passes, whatever its size"):
        assert said in text, said
