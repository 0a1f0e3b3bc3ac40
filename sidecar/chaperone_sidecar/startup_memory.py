"""Give back what start-up allocated and freed, once the proxy is ready (issue 16, idle RSS).

Start-up allocates far more than an idle sidecar keeps: modules' code read and unmarshalled,
the CRD schemas parsed, policies validated and compiled, certificates loaded. Python frees
most of it, but glibc keeps freed heap pages mapped (resident) until the heap is trimmed,
and one cache holds text nobody will read: pyparsing (imported by mitmproxy's command
module) calls ``traceback.extract_stack`` while it builds its grammar, which reads its own
230 KB ``core.py`` into :mod:`linecache`. :func:`release` clears that cache (it refills on
demand when a traceback is printed), collects garbage and calls glibc's ``malloc_trim(0)``,
which returns the free pages of every heap to the kernel. The proxy runtime calls it once,
when every listener runs; under traffic the heap grows again as it needs to.

Measured (idle full-profile sidecar, bench/idle_rss.py, docs/benchmarks.md "Idle RSS,
session 5"): ~2.3 MB less resident. Not glibc (musl): ``malloc_trim`` does not exist and only
the cache is cleared.
"""

from __future__ import annotations

import ctypes
import gc
import linecache

__all__ = ["release"]


def release() -> None:
    """Clear :mod:`linecache`, collect garbage and trim the C heap (see the module docstring)."""
    linecache.clearcache()
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
