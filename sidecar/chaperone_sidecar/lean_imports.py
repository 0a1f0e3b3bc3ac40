"""Keep mitmproxy's unused addon modules out of the sidecar process (~16 MB of idle RSS).

``mitmproxy/addons/__init__.py`` imports every default addon, and with them flask (the
onboarding app), passlib and ldap3 (proxy auth), pyperclip (export), urwid... And
``mitmproxy.master`` imports ``mitmproxy.addons.termlog``, so any master pulls all of them in,
although the sidecar loads five core addons (:func:`chaperone_sidecar.proxy.lean_core_addons`).

:func:`install` registers ``mitmproxy.addons`` as a bare package - its real directory as
``__path__``, its ``__init__`` not executed - before anything imports it. ``from
mitmproxy.addons import core`` then loads ``core`` alone; every submodule still imports the
way it always does. What no longer exists is the package-level ``default_addons()``, which
only mitmproxy's own tools (mitmdump, mitmweb) call.

Called at the start of the sidecar and proxy processes (:func:`chaperone_sidecar.proxy.run`),
never on import: a process that already imported the full package (tests using
``mitmproxy.test``) keeps it, and ``install`` then does nothing.
"""

from __future__ import annotations

import importlib.util
import sys

__all__ = ["install"]


def install() -> bool:
    """Register the bare ``mitmproxy.addons`` package; False if it was already imported."""
    if "mitmproxy.addons" in sys.modules:
        return False
    import mitmproxy

    spec = importlib.util.find_spec("mitmproxy.addons")
    if spec is None or not spec.submodule_search_locations:
        return False
    package = importlib.util.module_from_spec(spec)  # __path__ and __spec__ set; not executed
    sys.modules["mitmproxy.addons"] = package
    mitmproxy.addons = package  # type: ignore[attr-defined]
    return True
