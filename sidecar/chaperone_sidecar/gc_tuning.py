"""The cyclic garbage collector's settings for a proxy under load (issue 16, throughput).

Every flow leaves reference cycles that only the collector frees: mitmproxy's flow and its
layers refer to each other, and mitmproxy type-checks each request and response it builds
(``MessageData.__post_init__``), where every ``None`` in an optional field raises and
catches a ``TypeError`` whose traceback and frame refer to each other - with Chaperone's
per-flow state (``FlowContext``, its captures, the decision) hanging off the flow, ~175
container objects a flow for the collector to find. With CPython's default thresholds (a
young collection per 700 net allocations) a full-profile sidecar serving HTTPS 1 KiB at
~1,000 requests a second ran ~260 young collections a second, and the flows alive at each
one (concurrency 32) were promoted, so full collections came too: each walked everything
start-up had left in memory (~71,000 objects: modules, policies, the masking engine, the
kubernetes and OpenTelemetry machinery) for 35-60 ms. ``perf`` put the collector at 96 us
of a request's ~1,000 us of CPU (bare mitmproxy: 37).

:func:`settle`, once the proxy is ready (after :func:`.startup_memory.release`, whose full
collection leaves only live objects):

* ``gc.freeze()`` moves everything start-up left into the permanent generation: no later
  collection walks it. Objects in it are still freed by reference counting; one that
  becomes cyclic garbage later (a configuration snapshot of start-up, replaced) is never
  collected - bounded, once per process.
* the young generation's threshold goes from 700 to :data:`YOUNG_THRESHOLD`: a young
  collection costs about the same per object either way, but ~14x fewer of them catch
  fewer in-flight flows and so promote less, which keeps the older generations (and full
  collections) small.

Measured (the bench's full profile, a gc callback timing every collection over the same
load, 2 s warm-up + 5 s): HTTPS 1 KiB 706 ms of collections -> 293 ms (freeze alone 408,
the threshold alone 405; a threshold of 50,000 was slower again, 341: bigger young
generations fall out of cache); 1 MiB text 324 -> 109 ms. What it costs: garbage waits for
up to 10,000 allocations instead of 700 before it is freed - resident memory under 1 KiB
load +4 MB (97 -> 101 MB); under 1 MiB bodies at concurrency 32 the cycles hold their
bodies a little longer (high-water mark 546 -> 634 MB; bare mitmproxy 596 MB).
"""

from __future__ import annotations

import gc

__all__ = ["YOUNG_THRESHOLD", "settle"]

YOUNG_THRESHOLD = 10_000  # net container allocations between young collections (CPython: 700)


def settle(young_threshold: int = YOUNG_THRESHOLD) -> None:
    """Freeze what is alive now out of every later collection and raise the young
    generation's threshold, keeping the older generations' (see the module docstring).
    Call it once, right after a full collection."""
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(young_threshold, older, oldest)
