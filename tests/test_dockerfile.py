"""Static checks of the image (Dockerfile, .dockerignore) and the kind packaging (kind-config.yaml,
hack/e2e-kind.sh, `make e2e-kind`).

There is no Docker engine where CI runs, so the image is never built here. What can be checked
without building it is checked against the code that depends on it: the sidecar UID equals the
injection default (transparent mode exempts exactly that UID from the iptables redirect), the
entrypoint is the command the chart and the webhook run, dependencies are pinned by
constraints.txt, iptables is there for the init container, every directory the chart and the
injection contract mount exists in the layout, and the build context (after .dockerignore)
holds every module the console scripts and `chaperone` subcommands need and nothing else.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from chaperone_operator.injection.iptables import iptables_rules
from chaperone_operator.injection.settings import InjectionSettings
from chaperone_sidecar import contract

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "chaperone"


# ---------------------------------------------------------------------------- Dockerfile parsing

@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def args(self, global_args: dict[str, str]) -> dict[str, str]:
        values = dict(global_args)
        for arg in self.all("ARG"):
            name, _, default = arg.partition("=")
            values[name.strip()] = default.strip()
        return values


def expand(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m[1] or m[2], m[0]), text)


def parse_dockerfile(path: Path = ROOT / "Dockerfile") -> tuple[dict[str, str], list[Stage]]:
    """(ARGs before the first FROM, stages) with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(expand(parts[0], global_args), name))
        elif not stages:
            if keyword == "ARG":
                name, _, default = rest.partition("=")
                global_args[name.strip()] = default.strip()
        else:
            stages[-1].instructions.append((keyword, rest))
    return global_args, stages


GLOBAL_ARGS, STAGES = parse_dockerfile()
FINAL = STAGES[-1]
FINAL_ARGS = FINAL.args(GLOBAL_ARGS)
BUILD = next(s for s in STAGES if s.name == "build")


def final_run_text() -> str:
    return " ; ".join(expand(r, FINAL_ARGS) for r in FINAL.all("RUN"))


# ---------------------------------------------------------------------------- .dockerignore

def _pattern_regex(pattern: str) -> re.Pattern:
    """Docker's pattern syntax (Go filepath.Match plus `**`) as a regex on slash paths."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def build_context() -> set[str]:
    """Files of the working tree the Docker build context holds: the last matching pattern of
    .dockerignore wins and a pattern matching a parent directory matches the file."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        rules.append((negate, pattern, _pattern_regex(pattern)))

    def excluded(rel: str) -> bool:
        parts = rel.split("/")
        candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        result = False
        for negate, _, regex in rules:
            if any(regex.match(c) for c in candidates):
                result = not negate
        return result

    def may_reinclude(rel: str) -> bool:  # an exception pattern could match below `rel`
        return any(negate and (p.startswith(rel + "/") or "**" in p) for negate, p, _ in rules)

    included = set()
    for dirpath, dirnames, filenames in os.walk(ROOT):
        base = Path(dirpath).relative_to(ROOT).as_posix()
        prefix = "" if base == "." else base + "/"
        # Prune excluded directories nothing can re-include (.git, .venv, caches): fast in CI.
        dirnames[:] = [d for d in dirnames
                       if not (excluded(prefix + d) and not may_reinclude(prefix + d))]
        included.update(prefix + f for f in filenames if not excluded(prefix + f))
    return included


CONTEXT = build_context()


# ---------------------------------------------------------------------------- the image

def test_base_image_is_python_311_slim_in_every_stage():
    assert GLOBAL_ARGS["PYTHON_IMAGE"] == "python:3.11-slim"
    assert [s.base for s in STAGES] == ["python:3.11-slim"] * len(STAGES)
    assert [s.name for s in STAGES] == ["build", None]


def test_runs_as_the_injection_sidecar_uid_never_root():
    settings = InjectionSettings()
    users = FINAL.all("USER")
    assert len(users) == 1
    uid, _, gid = expand(users[0], FINAL_ARGS).partition(":")
    assert uid.isdigit() and gid.isdigit(), "USER must be numeric (kubelet runAsNonRoot checks)"
    assert (int(uid), int(gid)) == (settings.sidecar_uid, settings.sidecar_gid) != (0, 0)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert (values["sidecar"]["uid"], values["sidecar"]["gid"]) == (int(uid), int(gid))
    runs = final_run_text()
    assert f"useradd --system --uid {uid} --gid {gid}" in runs
    assert f"groupadd --system --gid {gid}" in runs


def test_entrypoint_is_the_command_the_chart_and_webhook_run():
    assert FINAL.all("ENTRYPOINT") == ['["chaperone"]']
    assert list(contract.SIDECAR_COMMAND) == ["chaperone"]
    operator = (CHART / "templates" / "operator.yaml").read_text()
    assert re.search(r'^\s+command: \["chaperone"\]$', operator, re.M)
    assert re.search(r"^\s+- operator$", operator, re.M)
    env = dict(line.split("=", 1) for line in shlex.split(expand(FINAL.all("ENV")[0], FINAL_ARGS)))
    assert env["PATH"].startswith("/opt/chaperone/bin:")
    assert env["HOME"] == contract.TMP_DIR  # the writable emptyDir; the root fs is read-only


def test_dependencies_are_installed_with_the_constraints():
    runs = " ; ".join(BUILD.all("RUN"))
    assert "python -m venv /opt/chaperone" in runs
    # The package (its own OTLP/HTTP exporters: no exporter extra), never the test extra, never
    # editable.
    assert re.search(r"/opt/chaperone/bin/pip install -c constraints\.txt \.(\s|$)", runs)
    assert "-e " not in runs and "test]" not in runs
    copied = [src for c in BUILD.all("COPY") for src in c.split()[:-1]]
    assert "constraints.txt" in copied and "pyproject.toml" in copied
    assert FINAL.all("COPY") == ["--from=build /opt/chaperone /opt/chaperone"]


def test_iptables_is_installed_for_the_transparent_mode_init_container():
    runs = final_run_text()
    assert re.search(r"apt-get install -y --no-install-recommends [^;&]*\biptables\b", runs)
    assert "rm -rf /var/lib/apt/lists/*" in runs
    # Debian's iptables package ships both binaries the init script calls.
    assert {rule[0] for rule in iptables_rules(InjectionSettings())} <= {"iptables", "ip6tables"}


def test_every_mounted_directory_exists_in_the_layout():
    runs = final_run_text()
    mkdir = re.search(r"mkdir -p ([^;&]+)", runs)
    assert mkdir, "the final stage must create the mount points"
    created = set(mkdir[1].split())
    sidecar_dirs = {value for name, value in vars(contract).items()
                    if name.endswith("_DIR") and isinstance(value, str) and "/chaperone" in value
                    and value != contract.TRUST_DIR}  # the trust bundle goes into agent images
    chart_dirs = set(re.findall(r"mountPath: (\S+)", (CHART / "templates" / "operator.yaml").read_text()))
    missing = (sidecar_dirs | chart_dirs) - created - {contract.TMP_DIR}
    assert not missing, f"not created in the image: {sorted(missing)}"
    assert re.search(rf"chown \S+ {re.escape(contract.SPOOL_DIR)}", runs)


# ---------------------------------------------------------------------------- the build context

def _module_file(module: str) -> list[str]:
    rel = module.replace(".", "/")
    return [f"{where}/{rel}{suffix}" for where in ("operator", "sidecar")
            for suffix in (".py", "/__init__.py")]


def test_build_context_holds_the_packages_and_nothing_else():
    for src in [s for c in BUILD.all("COPY") for s in c.split()[:-1]]:
        src = src.rstrip("/")
        assert src in CONTEXT or any(f.startswith(src + "/") for f in CONTEXT), f"{src} not in context"
    for package in ("operator/chaperone_operator", "sidecar/chaperone_sidecar"):
        sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / package).rglob("*.py")
                   if "__pycache__" not in p.parts}
        assert sources and sources <= CONTEXT
    leaked = {f.split("/")[0] for f in CONTEXT} - {"operator", "sidecar", "pyproject.toml",
                                                   "README.md", "constraints.txt"}
    assert not leaked, f"in the build context but not needed: {sorted(leaked)}"
    assert not [f for f in CONTEXT if "__pycache__" in f or f.endswith(".pyc")]
    # The C extension is built in the image from its source, never copied from a host's build.
    assert "sidecar/chaperone_sidecar/policy/masking/_stretches.c" in CONTEXT
    assert not [f for f in CONTEXT if f.endswith(".so")]


def test_the_build_stage_has_a_compiler_for_the_c_extension():
    runs = " ; ".join(BUILD.all("RUN"))
    assert re.search(r"apt-get install -y --no-install-recommends [^;&]*\bgcc\b", runs)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (ext,) = project["tool"]["setuptools"]["ext-modules"]
    assert ext["sources"] == ["sidecar/chaperone_sidecar/policy/masking/_stretches.c"]


def test_every_entry_point_resolves_inside_the_image():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    entries = {**project["scripts"], **project["entry-points"]["chaperone.commands"]}
    assert {"chaperone", "kubectl-chaperone", "operator", "sidecar"} <= set(entries)
    for name, target in entries.items():
        module = target.split(":")[0]
        assert any(f in CONTEXT for f in _module_file(module)), f"{name}: {module} not in the image"


def test_shipped_code_never_imports_the_test_bed():
    # The image leaves testbed/ out (see .dockerignore); nothing it ships may need it.
    offenders = [f for f in CONTEXT if f.endswith(".py")
                 and re.search(r"^\s*(from|import) chaperone_testbed", (ROOT / f).read_text(), re.M)]
    assert not offenders


# ---------------------------------------------------------------------------- kind packaging

def test_kind_config_is_a_cluster_new_enough_for_native_sidecars():
    config = yaml.safe_load((ROOT / "kind-config.yaml").read_text())
    assert (config["kind"], config["apiVersion"]) == ("Cluster", "kind.x-k8s.io/v1alpha4")
    assert [n["role"] for n in config["nodes"]][0] == "control-plane"
    for node in config["nodes"]:
        version = re.fullmatch(r"kindest/node:v1\.(\d+)\.\d+(@sha256:[0-9a-f]{64})?", node["image"])
        assert version and int(version[1]) >= 30, node["image"]  # chart kubeVersion >=1.30


def test_make_e2e_kind_runs_the_script():
    makefile = (ROOT / "Makefile").read_text()
    block = re.search(r"^e2e-kind:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert block and "hack/e2e-kind.sh" in block[1]
    script = ROOT / "hack" / "e2e-kind.sh"
    assert script.stat().st_mode & 0o111, "hack/e2e-kind.sh must be executable"
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    text = script.read_text()
    for step in ("docker build", "kind create cluster", "kind load docker-image",
                 "upgrade --install chaperone charts/chaperone",
                 "kubectl get ar", "kubectl chaperone approve"):
        assert step in text, step


def test_e2e_kind_refuses_clearly_without_docker(tmp_path):
    """On a machine without a Docker engine the script stops at once and says why."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool in ("docker", "kind", "kubectl", "helm"):
        (fake / tool).write_text("#!/bin/sh\nexit 1\n")
        (fake / tool).chmod(0o755)
    res = subprocess.run(["bash", str(ROOT / "hack" / "e2e-kind.sh")], capture_output=True,
                         text=True, timeout=60, env={"PATH": f"{fake}:/usr/bin:/bin", "HOME": str(tmp_path)})
    assert res.returncode == 2
    assert "needs a running Docker engine" in res.stderr
