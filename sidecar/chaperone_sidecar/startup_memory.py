"""What start-up leaves behind, dealt with once the proxy is ready (issue 16: idle RSS and
throughput).

Start-up allocates far more than an idle sidecar keeps: modules' code read and unmarshalled,
the CRD schemas parsed, policies validated and compiled, certificates loaded. Python frees
most of it, but glibc keeps freed heap pages mapped (resident) until the heap is trimmed,
and one cache holds text nobody will read: pyparsing (imported by mitmproxy's command
module) calls ``traceback.extract_stack`` while it builds its grammar, which reads its own
230 KB ``core.py`` into :mod:`linecache`. What stays alive - ~71,000 objects tracked by the
cyclic garbage collector: modules, policies, the masking engine, the kubernetes and
OpenTelemetry machinery - was walked by every full collection for 35-60 ms, and under load
those come often: every flow leaves reference cycles only the collector frees (mitmproxy's
flow and its layers refer to each other, and its type check of each request and response,
``MessageData.__post_init__``, raises and catches a ``TypeError`` per ``None`` optional
field, whose traceback and frame refer to each other), and the flows alive at a young
collection (concurrency 32) are promoted. ``perf`` put the collector at 96 us of a 1 KiB
request's ~1,000 us of CPU (bare mitmproxy, with less start-up state: 37).

:func:`release` clears that cache (it refills on demand when a traceback is printed),
collects garbage, then freezes what is left (``gc.freeze()``: moved to the permanent
generation, which no later collection walks; after the collection, so only live objects
are frozen) and calls glibc's ``malloc_trim(0)``, which returns the free pages of every heap
to the kernel. The proxy runtime calls it once, when every listener runs; under traffic the
heap grows again as it needs to. Frozen objects are still freed by reference counting; one
that becomes cyclic garbage later (a configuration snapshot of start-up, replaced) is never
collected - bounded, once per process.

Measured: idle full-profile sidecar (bench/idle_rss.py, docs/benchmarks.md "Idle RSS,
session 5") ~2.3 MB less resident; HTTPS 1 KiB at concurrency 32 (a gc callback timing every
collection, 2 s warm-up + 5 s; bench/analysis.md "Session 15") 706 ms of collections ->
408 ms, full collections 459 -> 147 ms. CPython's thresholds (700, 10, 10) stay: a young
generation of 10,000 cut the collections further (293 ms, ~1.5 % of the CPU) but made every
pause longer - young collections up to 7-18 ms, the middle generation's up to 26-45 ms, p99
at concurrency 1 ~4 -> 6-7 ms - which every flow in flight waits out. Not glibc (musl):
``malloc_trim`` does not exist and only the cache is cleared.
"""

from __future__ import annotations

import ctypes
import gc
import linecache

__all__ = ["release"]


def release() -> None:
    """Clear :mod:`linecache`, collect garbage, freeze the live objects out of later
    collections and trim the C heap (see the module docstring)."""
    linecache.clearcache()
    gc.collect()
    gc.freeze()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
