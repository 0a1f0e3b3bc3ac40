"""startup_memory.release: the heap start-up freed goes back to the kernel and linecache is
emptied (issue 16, idle RSS; through a real sidecar: tests/sidecar/integration/test_idle_modules.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

PROGRAM = r"""
import json, linecache
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
import pyparsing  # reads its own source into linecache while it builds its grammar
cached = sorted(linecache.cache)
blocks = [bytearray(2048) for _ in range(30000)]  # ~60 MB from malloc
pin = bytearray(4096)  # allocated last: the freed blocks below it are not at the heap's top
del blocks
before = rss()
from chaperone_sidecar import startup_memory
startup_memory.release()
print(json.dumps({"cached": cached, "before": before, "after": rss(), "left": sorted(linecache.cache)}))
"""


def test_release_returns_freed_heap_and_empties_linecache():
    out = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(REPO / "sidecar"), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert any(name.endswith("pyparsing/core.py") for name in result["cached"])
    assert result["left"] == []
    assert result["before"] - result["after"] > 40 << 20, result
