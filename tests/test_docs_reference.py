"""docs/reference.md is generated from crds/*.yaml by hack/gen-policy-reference.py; it must not
go stale, and the generator must not silently drop a field or a validation rule."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "hack" / "gen-policy-reference.py"
REFERENCE = ROOT / "docs" / "reference.md"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_policy_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _generator()


def _schemas():
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            yield crd["spec"]["names"]["kind"], version["schema"]["openAPIV3Schema"]


def _walk(schema: dict, path: str):
    """(path, schema) of every property, with `[]` for list items and `{}` for map values."""
    for name, child in (schema.get("properties") or {}).items():
        if not path and name in ("apiVersion", "kind", "metadata"):
            continue
        sub = f"{path}.{name}" if path else name
        yield sub, child
        yield from _walk(child, sub)
    items = schema.get("items")
    if isinstance(items, dict):
        yield from _walk(items, f"{path}[]")
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        yield from _walk(extra, f"{path}{{}}")


def test_reference_is_up_to_date():
    assert REFERENCE.read_text() == gen.render(), (
        "docs/reference.md is stale: run `python hack/gen-policy-reference.py` and commit the result")


def test_every_field_and_rule_is_documented():
    text = REFERENCE.read_text()
    rows = {line.split(" | ")[0].strip("| `") for line in text.splitlines() if line.startswith("| `")}
    count = 0
    for kind, root in _schemas():
        assert f"## {kind}" in text
        for path, schema in _walk(root, ""):
            count += 1
            assert path in rows, f"{kind} field {path} missing from docs/reference.md"
            if "default" in schema:
                assert f"`{gen.literal(schema['default'])}`" in text
        for rule in gen.rules(root, ""):
            assert gen.cell(rule["message"]) in text, rule
    assert count > 150  # the three kinds have a couple of hundred fields


def test_check_mode_detects_a_stale_file(tmp_path):
    stale = tmp_path / "reference.md"
    stale.write_text(gen.render().replace("AccessPolicy", "AccessPolicies", 1))
    res = subprocess.run([sys.executable, str(SCRIPT), "--check", "--output", str(stale)],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "is stale" in res.stderr
    fresh = tmp_path / "fresh.md"
    assert subprocess.run([sys.executable, str(SCRIPT), "--output", str(fresh)]).returncode == 0
    assert subprocess.run([sys.executable, str(SCRIPT), "--check", "--output", str(fresh)]).returncode == 0
    assert fresh.read_text() == REFERENCE.read_text()


def test_table_cells_escape_pipes_and_keep_one_line():
    assert gen.cell("a || b\n c") == "a \\|\\| b c"
    assert gen.code("x`y") == "`` x`y ``"
