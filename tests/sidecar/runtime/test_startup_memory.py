"""startup_memory.release: the heap start-up freed goes back to the kernel, linecache is
emptied and what is still alive is frozen out of later collections (issue 16, idle RSS and
throughput; through a real sidecar: tests/sidecar/integration/test_idle_modules.py). In child
processes: freezing the test runner's own heap would change every later test's collections."""

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


FREEZE_PROGRAM = r"""
import gc, json, weakref
gc.disable()  # only release's own collection (and the explicit one below) runs
class Node:
    pass
def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return a
garbage = cycle()
garbage_ref = weakref.ref(garbage)
del garbage                                    # cyclic garbage at release: collected, not frozen
kept = [cycle() for _ in range(5000)]          # alive at release: frozen
old = cycle()                                  # alive at release, garbage later
old_ref = weakref.ref(old)
before = gc.get_threshold()
from chaperone_sidecar import startup_memory
startup_memory.release()
frozen = gc.get_freeze_count()
del old
new = cycle()                                  # born after release
new_ref = weakref.ref(new)
del new
collected = gc.collect()
print(json.dumps({"before": before, "after": gc.get_threshold(), "frozen": frozen,
                  "garbage_alive": garbage_ref() is not None, "old_alive": old_ref() is not None,
                  "new_alive": new_ref() is not None, "collected": collected}))
"""


def test_release_freezes_the_live_heap_out_of_later_collections():
    out = subprocess.run([sys.executable, "-c", FREEZE_PROGRAM], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(REPO / "sidecar"), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert not result["garbage_alive"]  # collected before the freeze, not frozen with the rest
    assert result["frozen"] >= 2 * 5000 + 2  # both nodes of every cycle alive at release
    assert result["after"] == result["before"]  # CPython's thresholds stay (module docstring)
    # A cycle born after release is collected; one frozen at release is not, even once dropped
    # (the documented, once-per-process price of freezing).
    assert not result["new_alive"] and result["collected"] >= 2
    assert result["old_alive"]
