"""Keep mitmproxy's unused addon modules, and libraries its core imports but the sidecar never
calls, out of the sidecar process (idle RSS, issue 16).

``mitmproxy/addons/__init__.py`` imports every default addon, and with them flask (the
onboarding app), passlib and ldap3 (proxy auth), pyperclip (export), urwid... And
``mitmproxy.master`` imports ``mitmproxy.addons.termlog``, so any master pulls all of them in,
although the sidecar loads five core addons (:func:`chaperone_sidecar.proxy.lean_core_addons`)
(~16 MB of idle RSS).

:func:`install` registers ``mitmproxy.addons`` as a bare package - its real directory as
``__path__``, its ``__init__`` not executed - before anything imports it. ``from
mitmproxy.addons import core`` then loads ``core`` alone; every submodule still imports the
way it always does. What no longer exists is the package-level ``default_addons()``, which
only mitmproxy's own tools (mitmdump, mitmweb) call.

It also registers :data:`DEFERRED`, libraries mitmproxy's core imports but the sidecar never
calls, as deferred modules:

* ``ruamel.yaml`` - ``mitmproxy.optmanager`` loads and saves option files with it;
* ``service_identity`` (with pyasn1) - ``aioquic.tls`` checks a QUIC server's certificate
  name with it; the sidecar's HTTP/1 and HTTP/2 traffic never asks;
* ``zstandard`` - ``mitmproxy.net.encoding`` decodes ``Content-Encoding: zstd`` bodies with it.

A deferred module is found and created the normal way (``importlib.util.module_from_spec``:
``__spec__``, ``__file__``, ``__loader__`` set); its code is run by its own loader, in that same
module object, on the first access to any other attribute (a module ``__getattr__``, PEP 562).
Each importer only imports the module at its top and uses it inside functions, so nothing
runs it at start; when something does use it, it runs then (once; another thread asking
meanwhile waits for it) and works as always - no mitmproxy internals touched. The standard
library's ``importlib.util.LazyLoader`` does the same but, on Python 3.11, loads the module at
the next ``import`` statement naming it (the import system reads ``__spec__``). Measured: see
docs/benchmarks.md "Idle RSS, session 5". ``tests/sidecar/integration/test_idle_modules.py``
fails if an upgrade starts using one of them at import (it would then be loaded at idle), and
``tests/sidecar/runtime/test_lean_imports.py`` checks that each works when used.

Called at the start of the sidecar and proxy processes (:func:`chaperone_sidecar.proxy.run`),
never on import: a process that already imported the full package (tests using
``mitmproxy.test``) keeps it, and ``install`` then does nothing; a deferred module already
imported stays as it is.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from typing import Any

__all__ = ["install", "DEFERRED", "is_deferred"]

DEFERRED = ("ruamel.yaml", "service_identity", "zstandard")
_pending: set[str] = set()  # deferred modules not run yet


def install() -> bool:
    """Register the bare ``mitmproxy.addons`` package and the :data:`DEFERRED` modules; False
    if ``mitmproxy.addons`` was already imported (nothing is done then)."""
    if "mitmproxy.addons" in sys.modules:
        return False
    import mitmproxy

    spec = importlib.util.find_spec("mitmproxy.addons")
    if spec is None or not spec.submodule_search_locations:
        return False
    for name in DEFERRED:
        _defer(name)
    package = importlib.util.module_from_spec(spec)  # __path__ and __spec__ set; not executed
    sys.modules["mitmproxy.addons"] = package
    mitmproxy.addons = package  # type: ignore[attr-defined]
    return True


def is_deferred(name: str) -> bool:
    """True while the module ``name`` registered by :func:`install` has not run yet."""
    return name in _pending


def _defer(name: str) -> None:
    """Register ``name`` as a deferred module (see the module docstring)."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)  # imports the parent package (``ruamel``: a namespace)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)  # not executed
    loader = spec.loader
    # A submodule import reads the package's __path__: the package runs first, as it would.
    path = module.__dict__.pop("__path__", None)
    lock = threading.RLock()  # another thread waits for the module to finish running

    def run_module(attr: str) -> Any:
        with lock:
            if name in _pending:
                _pending.discard(name)
                if path is not None:
                    module.__path__ = path
                try:
                    loader.exec_module(module)
                finally:
                    if module.__dict__.get("__getattr__") is run_module:
                        del module.__dict__["__getattr__"]
            if module.__dict__.get("__getattr__") is run_module:  # asked while it runs (same thread)
                raise AttributeError(f"partially initialized module {name!r} has no attribute {attr!r}")
        return getattr(module, attr)

    module.__getattr__ = run_module  # type: ignore[method-assign]
    sys.modules[name] = module
    _pending.add(name)
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
