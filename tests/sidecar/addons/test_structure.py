"""Structure of the addon package: addons never import each other, and share per-flow state only
through the FlowContext (addons/__init__.py, "Rules every addon follows").

Read from the source with ``ast`` rather than from ``sys.modules``, so a lazy import inside a
function counts as much as one at the top of the module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import chaperone_sidecar.addons as addons_pkg

PACKAGE = "chaperone_sidecar.addons"
ADDONS_DIR = Path(addons_pkg.__file__).parent
# Modules of the package every addon may import: shared helpers, not addons.
HELPERS = frozenset({"refusal", "streaming"})
# Not addons: the composition root (imports every addon to list them) and the dispatcher.
NOT_ADDONS = frozenset({"__init__", "pipeline"})


def _imported(module: str, tree: ast.AST) -> set[str]:
    """Absolute names of every module ``module`` imports (``from . import x`` -> ``pkg.x``)."""
    package = module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def _addon_modules_imported(source: str, name: str) -> set[str]:
    """The other addon modules a module of the addons package imports."""
    found = set()
    for target in _imported(f"{PACKAGE}.{name}", ast.parse(source)):
        if not target.startswith(PACKAGE + "."):
            continue
        sub = target[len(PACKAGE) + 1:].split(".")[0]
        if sub != name and sub not in HELPERS and (ADDONS_DIR / f"{sub}.py").exists():
            found.add(sub)
    return found


def _metadata_keys(source: str) -> set[str]:
    """Subscripts and get/setdefault/pop calls on ``<x>.metadata`` (flow.metadata) in a module."""
    keys = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr == "metadata":
            keys.add(ast.unparse(node))
    return keys


def test_no_addon_imports_another_addon():
    offenders = {}
    for path in sorted(ADDONS_DIR.glob("*.py")):
        if path.stem in NOT_ADDONS | HELPERS:
            continue
        found = _addon_modules_imported(path.read_text(), path.stem)
        if found:
            offenders[path.stem] = sorted(found)
    assert offenders == {}, f"addons import other addons: {offenders}"


def test_the_helpers_import_no_addon():
    for name in sorted(HELPERS):
        source = (ADDONS_DIR / f"{name}.py").read_text()
        assert _addon_modules_imported(source, name) == set(), name


def test_no_addon_touches_flow_metadata_but_through_flowctx():
    offenders = {path.stem: sorted(_metadata_keys(path.read_text()))
                 for path in sorted(ADDONS_DIR.glob("*.py")) if path.stem != "__init__"}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_checks_catch_what_they_look_for():
    # The detector itself: each form of an addon importing another is seen, a helper is not.
    for source in ("from .route import request_of", "from . import mask",
                   "from chaperone_sidecar.addons.record import Record",
                   "import chaperone_sidecar.addons.enforce",
                   "def f():\n    from ..addons import route\n"):
        assert _addon_modules_imported(source, "approve"), source
    for source in ("from .refusal import refuse", "from . import streaming",
                   "from .. import flowctx", "from ..recording.flow_events import body_of"):
        assert _addon_modules_imported(source, "approve") == set(), source
    assert _metadata_keys("flow.metadata['chaperone.snapshot'] = 1")
