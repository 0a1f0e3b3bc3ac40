"""Container images for the test bed's node, built here without Docker or a registry.

Why: the node story (issue 14) must run the image users build - the repository's Dockerfile -
and nothing can be pulled on this machine class. So:

1. a **base image** is made with debootstrap from Debian's packages: bookworm (minbase) with
   python3, python3-venv, python-is-python3 and python3-dev, i.e. what the Dockerfile needs from
   its `PYTHON_IMAGE` build argument (`python:3.11-slim` by default: Debian bookworm's Python
   3.11 with `python`, venv and its C headers, which the package's C extension compiles
   against). It also carries this machine's extra CA certificates and pip configuration, if any:
   package downloads here go through a TLS-inspecting egress whose CA only the machine trusts.
   That is what an organisation's own base image behind such a proxy does; the Dockerfile itself
   stays untouched and the one recipe.
2. **the chaperone image** is `buildah bud` of the Dockerfile with
   `--build-arg PYTHON_IMAGE=<base>` (chroot isolation, host network for pip and apt), exported
   as a Docker archive named like the chart's default image (`IMAGE_NAME`);
3. **the agent image** (the pod the developer creates; not a product image) is the same base
   plus curl, Debian's AWS CLI and the machine's kubectl: the real clients the agent runs.

Everything is cached in `$CHAPERONE_CACHE/image`, keyed by content: the base by its recipe and
the machine's CA/pip files, the chaperone image by the Dockerfile, .dockerignore and every file
the build context admits, plus the base. A rerun with nothing changed costs a few hashes.

Usage: `python -m chaperone_testbed.image chaperone|agent` prints the archive's path.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .services import ComponentUnavailable, StartupError, require_binary

__all__ = ["IMAGE_NAME", "AGENT_IMAGE", "ImageBuilder"]

IMAGE_NAME = "ghcr.io/chaperone-dev/chaperone:0.1.0"
AGENT_IMAGE = "chaperone.local/agent:e2e"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "python3-dev", "ca-certificates")
AGENT_PACKAGES = ("curl", "awscli")
# The build context the Dockerfile sees (.dockerignore is an allowlist of exactly these).
CONTEXT = ("pyproject.toml", "README.md", "constraints.txt", "operator", "sidecar")
CONTEXT_EXCLUDED = ("__pycache__", ".pytest_cache")
CONTEXT_EXCLUDED_SUFFIXES = (".pyc", ".egg-info")
MACHINE_CA_DIR = Path("/usr/local/share/ca-certificates")
MACHINE_PIP_CONF = Path("/etc/pip.conf")
ENV_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _sha(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "big"))
        h.update(p)
    return h.hexdigest()[:16]


def _log(msg: str) -> None:
    print(f"image: {msg}", file=sys.stderr, flush=True)


class ImageBuilder:
    """Builds and caches the node's images; `chaperone()` and `agent()` return archive paths."""

    def __init__(self, repo_root: Path | str, cache: Path | str | None = None) -> None:
        self.repo = Path(repo_root)
        self.cache = Path(cache or os.environ.get("CHAPERONE_CACHE")
                          or Path.home() / ".cache" / "chaperone") / "image"
        self.storage = self.cache / "storage"

    # ------------------------------------------------------------------ plumbing
    def _buildah(self, *args: str | Path, timeout: float = 1800) -> subprocess.CompletedProcess:
        argv = ["buildah", "--root", str(self.storage / "root"),
                "--runroot", str(self.storage / "run"), "--storage-driver", "overlay",
                *map(str, args)]
        res = subprocess.run(argv, text=True, timeout=timeout, capture_output=True)
        if res.returncode != 0:
            raise StartupError(f"{' '.join(argv)} failed (exit {res.returncode}):\n"
                               f"{(res.stdout or '')[-3000:]}\n{(res.stderr or '')[-3000:]}")
        return res

    def _has_image(self, name: str) -> bool:
        try:
            self._buildah("inspect", "--type", "image", name)
            return True
        except StartupError:
            return False

    def _check_tools(self) -> None:
        require_binary("buildah", "the Debian package `buildah`")
        require_binary("debootstrap", "the Debian package `debootstrap`")
        if os.geteuid() != 0:
            raise ComponentUnavailable("building images with debootstrap and buildah needs root")

    # ------------------------------------------------------------------ base
    def _machine_trust(self) -> list[tuple[Path, bytes]]:
        files = sorted(MACHINE_CA_DIR.glob("**/*.crt")) if MACHINE_CA_DIR.is_dir() else []
        out = [(f, f.read_bytes()) for f in files]
        if MACHINE_PIP_CONF.is_file():
            out.append((MACHINE_PIP_CONF, MACHINE_PIP_CONF.read_bytes()))
        return out

    def base_key(self) -> str:
        recipe = f"{SUITE} {MIRROR} minbase {' '.join(BASE_PACKAGES)} v1".encode()
        return _sha(recipe, *(str(p).encode() + b"\0" + data for p, data in self._machine_trust()))

    def base(self) -> str:
        """The base image's name in buildah's storage, made with debootstrap if missing."""
        key = self.base_key()
        name = f"localhost/chaperone-base:{key}"
        if self._has_image(name):
            return name
        self._check_tools()
        self.cache.mkdir(parents=True, exist_ok=True)
        tar = self.cache / f"base-{key}.tar"
        if not tar.is_file():
            self._debootstrap(tar)
        ctr = self._buildah("from", "scratch").stdout.strip()
        try:
            self._buildah("add", ctr, tar, "/")
            self._buildah("config", "--env", f"PATH={ENV_PATH}", "--env", "LANG=C.UTF-8",
                          "--cmd", "python3", ctr)
            self._buildah("commit", "-q", ctr, name)
        finally:
            self._buildah("rm", ctr)
        return name

    def _debootstrap(self, tar: Path) -> None:
        _log(f"debootstrap {SUITE} ({', '.join(BASE_PACKAGES)})")
        with tempfile.TemporaryDirectory(prefix="chaperone-rootfs-", dir=self.cache) as tmp:
            rootfs = Path(tmp) / "rootfs"
            res = subprocess.run(
                ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                 SUITE, str(rootfs), MIRROR], capture_output=True, text=True, timeout=1800)
            if res.returncode != 0:
                raise StartupError(f"debootstrap failed:\n{res.stdout[-3000:]}{res.stderr[-2000:]}")
            for path, data in self._machine_trust():
                if path == MACHINE_PIP_CONF:
                    (rootfs / "etc" / "pip.conf").write_bytes(data)
                else:
                    dest = rootfs / "usr/local/share/ca-certificates" / path.name
                    dest.write_bytes(data)
            subprocess.run(["chroot", str(rootfs), "update-ca-certificates"], check=True,
                           capture_output=True)
            res = subprocess.run(
                ["tar", "-C", str(rootfs), "--exclude=./dev/*", "--exclude=./proc/*",
                 "--exclude=./sys/*", "--exclude=./var/cache/apt/archives/*.deb",
                 "--exclude=./var/lib/apt/lists/*", "-cf", str(tar) + ".tmp", "."],
                capture_output=True, text=True)
            if res.returncode != 0:
                raise StartupError(f"packing the base rootfs failed: {res.stderr}")
            os.replace(str(tar) + ".tmp", tar)

    # ------------------------------------------------------------------ chaperone image
    def context_files(self) -> list[Path]:
        """Every file of the build context (what .dockerignore admits), sorted."""
        out = []
        for entry in CONTEXT:
            top = self.repo / entry
            if top.is_file():
                out.append(top)
                continue
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames[:] = sorted(d for d in dirnames if d not in CONTEXT_EXCLUDED
                                     and not d.endswith(CONTEXT_EXCLUDED_SUFFIXES))
                out += [Path(dirpath) / f for f in sorted(filenames)
                        if not f.endswith(CONTEXT_EXCLUDED_SUFFIXES)]
        return out

    def _snapshot(self, dest: Path) -> str:
        """Copy the Dockerfile and its build context to `dest`; return their content key.

        The build reads the copy, so the key names exactly what was built even when the
        working tree changes during the build (several people edit it at once).
        """
        parts = [self.base_key().encode()]
        for f in [self.repo / "Dockerfile", self.repo / ".dockerignore", *self.context_files()]:
            rel = f.relative_to(self.repo)
            data = f.read_bytes()
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            parts.append(str(rel).encode() + b"\0" + data)
        return _sha(*parts)

    def chaperone(self) -> Path:
        """A Docker archive of the Dockerfile's image, named IMAGE_NAME."""
        self.cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="chaperone-context-", dir=self.cache) as tmp:
            context = Path(tmp)
            key = self._snapshot(context)
            out = self.cache / f"chaperone-{key}.tar"
            if out.is_file():
                return out
            self._check_tools()
            base = self.base()
            tag = f"localhost/chaperone:{key}"
            _log(f"buildah bud Dockerfile (PYTHON_IMAGE={base})")
            self._buildah("bud", "--isolation", "chroot", "--network", "host", "--pull-never",
                          "--layers", "--force-rm", "--build-arg", f"PYTHON_IMAGE={base}",
                          "-t", tag,
                          "-f", context / "Dockerfile", context)
            self._export(tag, IMAGE_NAME, out)
        return out

    # ------------------------------------------------------------------ agent image
    def agent_key(self) -> str:
        kubectl = Path(shutil.which("kubectl") or "kubectl").resolve()
        return _sha(self.base_key().encode(), " ".join(AGENT_PACKAGES).encode(),
                    kubectl.read_bytes() if kubectl.is_file() else b"")

    def agent(self) -> Path:
        """A Docker archive of the agent's image: the base + curl + AWS CLI + this machine's
        kubectl."""
        key = self.agent_key()
        out = self.cache / f"agent-{key}.tar"
        if out.is_file():
            return out
        self._check_tools()
        kubectl = Path(require_binary("kubectl", "kubectl")).resolve()
        base = self.base()
        ctr = self._buildah("from", "--pull-never", base).stdout.strip()
        try:
            self._buildah("run", "--isolation", "chroot", "--network", "host", ctr, "--",
                          "sh", "-c", "apt-get update -qq && DEBIAN_FRONTEND=noninteractive "
                          "apt-get install -y -qq --no-install-recommends "
                          f"{' '.join(AGENT_PACKAGES)} >/dev/null && rm -rf /var/lib/apt/lists/*")
            self._buildah("copy", "--chmod", "0755", ctr, kubectl, "/usr/local/bin/kubectl")
            self._buildah("config", "--env", "HOME=/tmp", "--cmd", "sleep infinity",
                          "--user", "1000:1000", ctr)
            tag = f"localhost/chaperone-agent:{key}"
            self._buildah("commit", "-q", ctr, tag)
        finally:
            self._buildah("rm", ctr)
        self._export(tag, AGENT_IMAGE, out)
        return out

    def _export(self, tag: str, name: str, out: Path) -> None:
        tmp = out.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        self._buildah("push", "-q", tag, f"docker-archive:{tmp}:{name}")
        os.replace(tmp, out)
        # Older builds in buildah's storage too: other tags of this repository, then whatever
        # no tag holds any more (the base stays: it is tagged). Best effort: the archive is
        # what counts, and a leftover only costs disk.
        repo = tag.rsplit(":", 1)[0]
        try:
            listing = self._buildah("images", "--format", "{{.Name}}:{{.Tag}}").stdout.split()
            for other in listing:
                if other.rsplit(":", 1)[0] == repo and other != tag:
                    self._buildah("rmi", "--force", other)
            self._buildah("rmi", "--prune", "--force")
        except StartupError as exc:
            _log(f"pruning old builds failed (ignored): {str(exc)[-500:]}")
        # Older archives of the same image are dead weight (hundreds of MB each).
        prefix = out.name.split("-", 1)[0] + "-"
        for old in self.cache.glob(f"{prefix}*.tar"):
            if old != out and not old.name.startswith("base-"):
                old.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m chaperone_testbed.image")
    parser.add_argument("which", choices=("chaperone", "agent"))
    parser.add_argument("--repo", type=Path, default=Path.cwd())
    args = parser.parse_args(argv)
    builder = ImageBuilder(args.repo)
    print(builder.chaperone() if args.which == "chaperone" else builder.agent())


if __name__ == "__main__":
    main()
