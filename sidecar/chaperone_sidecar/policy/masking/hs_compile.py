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

**Engine** (issue 16, session 9): the system's ``libhs.so.5`` through :mod:`.libhs` when it
loads (Debian's ``libvectorscan5``: a fat-runtime build, 1.3-2.1x faster scans than the wheel's
generic one), else the ``hyperscan`` wheel. ``CHAPERONE_HYPERSCAN=wheel`` forces the wheel
(A/B runs, and the test that compares the two). The child compiles with the same engine: it
loads ``libhs.py`` by path, or imports the wheel. :data:`ENGINE_ERRORS` are what either raises.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
from typing import Any

import hyperscan

from . import libhs

__all__ = ["ENGINE_ERRORS", "compile_database", "compile_in_process", "engine_name",
           "system_library"]

log = logging.getLogger("chaperone.masking")

CHILD_TIMEOUT = 30.0  # seconds; the compile of every detector's triggers takes ~0.1 s

# Runs in the child: expressions (hex), flags and the engine (the path of libhs.py, or "" for
# the wheel) as JSON on stdin, the serialized database on stdout. Only that engine is loaded
# there (``-I``: no user site, no PYTHON* variables).
_CHILD = """
import importlib.util, json, sys
spec = json.load(sys.stdin)
expressions = [bytes.fromhex(e) for e in spec["expressions"]]
if spec["libhs"]:
    found = importlib.util.spec_from_file_location("chaperone_libhs", spec["libhs"])
    libhs = importlib.util.module_from_spec(found)
    found.loader.exec_module(libhs)
    sys.stdout.buffer.write(libhs.load().compile(expressions, spec["flags"]).serialize())
else:
    import hyperscan
    db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    n = len(expressions)
    db.compile(expressions=expressions, ids=list(range(n)), elements=n, flags=spec["flags"])
    sys.stdout.buffer.write(hyperscan.dumpb(db))
"""

ENGINE_ERRORS = (hyperscan.error, libhs.HyperscanError)  # what a compile or scan of either raises


@functools.cache
def system_library() -> libhs.Library | None:
    """The system's libhs.so.5, unless ``CHAPERONE_HYPERSCAN=wheel`` or it does not load."""
    if os.environ.get("CHAPERONE_HYPERSCAN", "").strip().lower() == "wheel":
        return None
    return libhs.load()


def engine_name() -> str:
    """Which Hyperscan masking scans with (for logs and benchmark reports)."""
    lib = system_library()
    return f"system {libhs.LIBRARY_NAME} {lib.version}" if lib is not None else \
        f"hyperscan wheel {getattr(hyperscan, '__version__', '?')}"


def compile_in_process(expressions: list[bytes], flags: list[int]) -> Any:
    """A block-mode database of ``expressions`` (ids = their indexes), compiled here."""
    lib = system_library()
    if lib is not None:
        return lib.compile(expressions, flags)
    db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    db.compile(expressions=expressions, ids=list(range(len(expressions))), elements=len(expressions), flags=flags)
    return db


def compile_database(expressions: list[bytes], flags: list[int]) -> Any:
    """The same database as :func:`compile_in_process`, compiled in a child process (see the
    module docstring), with its scratch space allocated like a compiled one's."""
    lib = system_library()
    try:
        blob = _compile_in_child(expressions, flags, lib is not None)
        if lib is not None:
            return lib.deserialize(blob)
        db = hyperscan.loadb(blob, hyperscan.HS_MODE_BLOCK)
        db.scratch = hyperscan.Scratch(db)
        return db
    except (OSError, ValueError, subprocess.SubprocessError, *ENGINE_ERRORS) as exc:
        log.warning("compiling the masking database in a child process failed (%s); compiling it here", exc)
    return compile_in_process(expressions, flags)


def _compile_in_child(expressions: list[bytes], flags: list[int], system: bool) -> bytes:
    if not sys.executable:
        raise OSError("no Python interpreter to run the compile in")
    spec = json.dumps({"expressions": [e.hex() for e in expressions], "flags": flags,
                       "libhs": libhs.__file__ if system else ""})
    done = subprocess.run([sys.executable, "-I", "-c", _CHILD], input=spec.encode(), capture_output=True,
                          timeout=CHILD_TIMEOUT, check=False)
    if done.returncode != 0 or not done.stdout:
        raise ValueError(f"exit status {done.returncode}: {done.stderr.decode(errors='replace')[-500:]}")
    return done.stdout
