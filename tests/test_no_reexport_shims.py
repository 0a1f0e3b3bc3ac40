"""No re-export shims (issue 13): every name is imported from the module that defines it.

A shim is a module that imports a name only so that others can keep importing it from an old
path after a split (``from .cases import X  # noqa: F401 - re-exported``, a package
``__init__`` listing its submodules' names in ``__all__``, a PEP 562 ``__getattr__`` that
imports them lazily). Static checks over the source, no imports:

* ``__all__`` of a product module lists only names that module defines;
* no product module has a module-level ``__getattr__`` (lazy re-exports);
* no ``noqa: F401`` comment in operator/, sidecar/, testbed/ says it re-exports;
* every ``from chaperone_x.m import name`` in the repo (product code, tests, bench, e2e, hack)
  names a module that defines ``name`` (or has it as a submodule) - importing a name through a
  module that merely imported it is what keeps a shim alive.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PRODUCT = {"operator": "chaperone_operator", "sidecar": "chaperone_sidecar", "testbed": "chaperone_testbed"}
IMPORTERS = ("operator", "sidecar", "testbed", "tests", "bench", "e2e", "hack")


def _product_modules() -> dict[str, Path]:
    mods = {}
    for top, pkg in PRODUCT.items():
        for path in (REPO / top / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(REPO / top).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
        # A C extension is a module too; its stub (.pyi) says what it defines.
        for path in (REPO / top / pkg).rglob("*.pyi"):
            if not path.with_suffix(".py").exists():
                mods[".".join(path.relative_to(REPO / top).with_suffix("").parts)] = path
    return mods


MODULES = _product_modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"
            or isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _defined(tree: ast.Module) -> set[str]:
    """Names a module binds itself at top level (not by importing them)."""
    names: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
            elif isinstance(node, ast.If) and not _is_type_checking(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                visit(node.orelse)
                visit(node.finalbody)
                for handler in node.handlers:
                    visit(handler.body)
    visit(tree.body)
    return names


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


DEFINED = {name: _defined(_parse(path)) for name, path in MODULES.items()}


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str | None:
    if node.level == 0:
        return node.module
    parts = module.split(".")
    if not is_package:
        parts = parts[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _module_name(path: Path) -> str:
    for name, p in MODULES.items():
        if p == path:
            return name
    return ""


def _all_names(tree: ast.Module) -> list[str]:
    """The names in ``__all__``; an element that is not a string literal (``*_LAZY``) is
    reported as ``<computed>``, which no module defines."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__"
                                                for t in node.targets):
            elements = node.value.elts if isinstance(node.value, (ast.List, ast.Tuple)) else [node.value]
            return [e.value if isinstance(e, ast.Constant) and isinstance(e.value, str) else "<computed>"
                    for e in elements]
    return []


def reexports_in_all(path: Path) -> list[str]:
    """Names in ``__all__`` that the module does not define."""
    tree = _parse(path)
    defined = _defined(tree)
    return [name for name in _all_names(tree) if name not in defined]


def indirect_imports(path: Path) -> list[str]:
    """``from M import name`` where M is a product module that neither defines ``name`` nor has
    it as a submodule."""
    tree = _parse(path)
    module = _module_name(path)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or (node.level and not module):
            continue
        target = _absolute(module, path.name == "__init__.py", node)
        if target not in DEFINED:
            continue
        for alias in node.names:
            if alias.name == "*" or alias.name in DEFINED[target] or f"{target}.{alias.name}" in MODULES:
                continue
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: {alias.name} from {target}")
    return found


def _importer_files() -> list[Path]:
    return sorted(p for top in IMPORTERS for p in (REPO / top).rglob("*.py") if ".venv" not in p.parts)


def test_all_lists_only_names_the_module_defines():
    offenders = {f"{MODULES[m].relative_to(REPO)}": bad for m in MODULES
                 if (bad := reexports_in_all(MODULES[m]))}
    assert not offenders, f"__all__ re-exports names defined elsewhere: {offenders}"


def test_no_lazy_module_getattr():
    offenders = [str(p.relative_to(REPO)) for p in MODULES.values()
                 if any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in _parse(p).body)]
    assert not offenders, f"module-level __getattr__ (lazy re-exports): {offenders}"


def test_no_reexport_noqa_comments():
    pattern = re.compile(r"noqa:\s*F401.*export", re.IGNORECASE)
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in MODULES.values()
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, f"re-export comments: {offenders}"


def test_every_import_names_the_defining_module():
    offenders = [hit for p in _importer_files() for hit in indirect_imports(p)]
    assert not offenders, "import these from the module that defines them:\n" + "\n".join(offenders)


# The checks themselves, on the shapes they must catch (the shims this replaced).

SHIM_PACKAGE = '''
from .cases import CaseResult, run_case  # noqa: F401 - re-exported
from .cli import main

__all__ = ["main", "run_case", "helper"]


def helper():
    return main
'''


def test_the_checks_catch_a_shim(tmp_path, monkeypatch):
    pkg = tmp_path / "chaperone_sidecar" / "shimmed"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(SHIM_PACKAGE)
    (pkg / "cases.py").write_text("def run_case(): ...\nclass CaseResult: ...\n")
    (pkg / "cli.py").write_text("def main(): ...\n")
    user = tmp_path / "user.py"
    user.write_text("from chaperone_sidecar.shimmed import run_case, helper, cases\n")
    monkeypatch.setitem(MODULES, "chaperone_sidecar.shimmed", pkg / "__init__.py")
    monkeypatch.setitem(MODULES, "chaperone_sidecar.shimmed.cases", pkg / "cases.py")
    monkeypatch.setitem(DEFINED, "chaperone_sidecar.shimmed", _defined(_parse(pkg / "__init__.py")))
    monkeypatch.setitem(globals(), "REPO", tmp_path)

    assert reexports_in_all(pkg / "__init__.py") == ["main", "run_case"]
    assert indirect_imports(user) == ["user.py:1: run_case from chaperone_sidecar.shimmed"]


@pytest.mark.parametrize("path", ["sidecar/chaperone_sidecar/policy/cli.py",
                                  "sidecar/chaperone_sidecar/approvals/__init__.py"])
def test_modules_that_were_shims_are_parsed(path):
    """The walk sees the modules that used to be shims (a rename would make the checks vacuous)."""
    assert REPO / path in MODULES.values()
