"""Fixtures of the recording tests: a real, small tmpfs for the disk-full tests.

A real filesystem that runs out of space is the only honest ENOSPC: page granularity, partial
writes and "a new file needs no block but its first byte does" all matter to the recorder. The
tests run as root in CI, which may mount; when mounting is refused the test FAILS (never skips:
a disk-full test that silently does not run is the bug this suite exists to catch). Where
``mount`` is not permitted for the test's user, ``unshare -rm`` (a user + mount namespace) is the
way to run these by hand.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Callable, Iterator

import pytest


def mount_tmpfs(path: Path, size: str, options: str = "") -> None:
    path.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755{options}", "tmpfs",
                          str(path)], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        pytest.fail(f"cannot mount a {size} tmpfs on {path} (the disk-full tests need root or "
                    f"CAP_SYS_ADMIN; by hand: unshare -rm pytest ...): {out.stderr.strip()}",
                    pytrace=False)


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@pytest.fixture
def small_tmpfs(tmp_path) -> Iterator[Callable[..., Path]]:
    """``small_tmpfs("256k")`` -> a directory on a fresh tmpfs of that size (unmounted after);
    ``inodes=N`` also limits the number of files (``nr_inodes``)."""
    mounted: list[Path] = []

    def make(size: str, inodes: int | None = None) -> Path:
        path = tmp_path / f"tmpfs-{len(mounted)}"
        mount_tmpfs(path, size, f",nr_inodes={inodes}" if inodes else "")
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        umount(path)
