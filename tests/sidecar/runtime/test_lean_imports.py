"""lean_imports: the sidecar process never imports mitmproxy's unused default addons, and a
master built from the lean core addons still proxies (the runtime tests run real processes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

PROGRAM = r"""
import asyncio, sys
from chaperone_sidecar import lean_imports
assert lean_imports.install(), "mitmproxy.addons was imported before install()"
assert not lean_imports.install(), "install() twice must be a no-op"
from chaperone_sidecar import proxy, services, addons  # everything the sidecar imports
from chaperone_sidecar.addons import build_addons  # noqa: F401

async def main():
    from mitmproxy import master, options
    m = master.Master(options.Options(), event_loop=asyncio.get_running_loop())
    m.addons.add(*proxy.lean_core_addons())
    assert m.addons.get("proxyserver") is not None and m.addons.get("tlsconfig") is not None
    m.options.update(mode=["regular@127.0.0.1:0"], connection_strategy="lazy")

asyncio.run(main())
heavy = sorted(m for m in ("flask", "passlib", "ldap3", "pyperclip", "urwid", "mitmproxy.addons.onboarding",
                           "mitmproxy.addons.proxyauth", "mitmproxy.addons.export") if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
"""


def test_the_sidecar_imports_no_unused_mitmproxy_addon_and_its_master_still_builds():
    env_path = ":".join(str(REPO / p) for p in ("sidecar", "operator", "testbed"))
    out = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "HEAVY=\n" in out.stdout, out.stdout


def test_install_is_a_no_op_once_the_full_package_is_imported():
    import mitmproxy.addons

    from chaperone_sidecar import lean_imports

    assert hasattr(mitmproxy.addons, "default_addons")
    assert lean_imports.install() is False
    assert hasattr(sys.modules["mitmproxy.addons"], "default_addons")
