"""Hyperscan databases compiled in a short-lived child process and loaded serialized.

Why (issue 16, idle RSS): Hyperscan's compiler is most of the ``hyperscan`` extension (6.5 MB,
statically linked). Compiling the trigger database of every detector in the sidecar made
**5.0 MB of that file resident** (0.10 s; 4.8 MB file-backed code pages, 0.2 MB heap left after
``malloc_trim``) - pages the kernel counts in the process's RSS and in the pod's memory
cgroup, and that the scans never touch again. The compiled database is 15 KB: deserializing
it makes 1.1 MB resident (the scanner's pages) in 0.1 ms. So :func:`compile_database` runs
the compile in a child interpreter (``sys.executable -I -c``, importing only ``hyperscan``),
which writes ``hs_serialize``'s bytes to its stdout, and deserializes them here: the child
exits with the compiler's pages. Measured in the idle full-profile sidecar: see
docs/benchmarks.md "Idle RSS, session 5".

The child is the same interpreter with the same ``hyperscan`` build on the same machine, so
the database is the one an in-process compile produces (``hs_deserialize`` itself refuses a
database of another Hyperscan version or of CPU features this machine lacks). Anything that
goes wrong - no interpreter, a child that fails or times out, bytes that do not deserialize -
falls back to compiling in this process, with a warning: masking never runs without its
database, it only costs the memory it did before. A compile error in the expressions is not
hidden by that fallback: the in-process compile raises it as before.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import hyperscan

__all__ = ["compile_database", "compile_in_process"]

log = logging.getLogger("chaperone.masking")

CHILD_TIMEOUT = 30.0  # seconds; the compile of every detector's triggers takes ~0.1 s

# Runs in the child: expressions (hex) and flags as JSON on stdin, the serialized database on
# stdout. Only ``hyperscan`` is imported there (``-I``: no user site, no PYTHON* variables).
_CHILD = """
import json, sys, hyperscan
spec = json.load(sys.stdin)
db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
n = len(spec["expressions"])
db.compile(expressions=[bytes.fromhex(e) for e in spec["expressions"]], ids=list(range(n)), elements=n,
           flags=spec["flags"])
sys.stdout.buffer.write(hyperscan.dumpb(db))
"""


def compile_in_process(expressions: list[bytes], flags: list[int]) -> hyperscan.Database:
    """A block-mode database of ``expressions`` (ids = their indexes), compiled here."""
    db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    db.compile(expressions=expressions, ids=list(range(len(expressions))), elements=len(expressions), flags=flags)
    return db


def compile_database(expressions: list[bytes], flags: list[int]) -> hyperscan.Database:
    """The same database as :func:`compile_in_process`, compiled in a child process (see the
    module docstring), with its scratch space allocated like a compiled one's."""
    try:
        blob = _compile_in_child(expressions, flags)
        db = hyperscan.loadb(blob, hyperscan.HS_MODE_BLOCK)
        db.scratch = hyperscan.Scratch(db)
        return db
    except (OSError, ValueError, subprocess.SubprocessError, hyperscan.error) as exc:
        log.warning("compiling the masking database in a child process failed (%s); compiling it here", exc)
    return compile_in_process(expressions, flags)


def _compile_in_child(expressions: list[bytes], flags: list[int]) -> bytes:
    if not sys.executable:
        raise OSError("no Python interpreter to run the compile in")
    spec = json.dumps({"expressions": [e.hex() for e in expressions], "flags": flags})
    done = subprocess.run([sys.executable, "-I", "-c", _CHILD], input=spec.encode(), capture_output=True,
                          timeout=CHILD_TIMEOUT, check=False)
    if done.returncode != 0 or not done.stdout:
        raise ValueError(f"exit status {done.returncode}: {done.stderr.decode(errors='replace')[-500:]}")
    return done.stdout
