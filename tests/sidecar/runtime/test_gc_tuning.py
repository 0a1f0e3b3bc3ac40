"""gc_tuning.settle: what is alive when it runs leaves every later collection, later cycles
are still collected, and the young threshold is raised (issue 16, throughput). In a child
process: freezing the test runner's own heap would change every later test's collections."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

PROGRAM = r"""
import gc, json, weakref
class Node:
    pass
def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return a
gc.collect()
kept_before = [cycle() for _ in range(5000)]   # alive at settle: frozen
old = cycle()                                  # alive at settle, garbage later
old_ref = weakref.ref(old)
from chaperone_sidecar import gc_tuning
before = gc.get_threshold()
gc_tuning.settle()
frozen = gc.get_freeze_count()
del old
new = cycle()                                  # born after settle
new_ref = weakref.ref(new)
del new
collected = gc.collect()
print(json.dumps({"before": before, "after": gc.get_threshold(), "frozen": frozen,
                  "old_alive": old_ref() is not None, "new_alive": new_ref() is not None,
                  "collected": collected, "young": gc_tuning.YOUNG_THRESHOLD}))
"""


def test_settle_freezes_the_live_heap_and_raises_the_young_threshold():
    out = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(REPO / "sidecar"), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["frozen"] >= 2 * 5000 + 2  # both nodes of every cycle alive at settle
    assert result["after"] == [result["young"], *result["before"][1:]]
    assert result["young"] > result["before"][0]
    # A cycle born after settle is collected; one frozen at settle is not, even once dropped
    # (the documented, once-per-process price of freezing).
    assert not result["new_alive"] and result["collected"] >= 2
    assert result["old_alive"]
