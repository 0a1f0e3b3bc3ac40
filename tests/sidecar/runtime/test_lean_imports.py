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


DEFERRED = r"""
import sys
from chaperone_sidecar import lean_imports
lean_imports.install()
from chaperone_sidecar import proxy, services, addons  # everything the sidecar imports
from mitmproxy import master, options, optmanager
from mitmproxy.proxy.layers import http  # imports aioquic.tls, which imports service_identity
import aioquic.tls
opts = options.Options()
from mitmproxy.net import encoding
loaded = [n for n in ("ruamel.yaml.main", "service_identity.cryptography", "pyasn1", "zstandard.backend_c")
          if n in sys.modules]
assert loaded == [] and all(lean_imports.is_deferred(n) for n in lean_imports.DEFERRED), loaded
import ruamel.yaml, service_identity, zstandard  # an import statement does not run them either
assert all(lean_imports.is_deferred(n) for n in lean_imports.DEFERRED)
# used, they load and work: mitmproxy's option file round trip, aioquic's certificate check
import tempfile, os
opts.update(listen_port=9999)
with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "config.yaml")
    optmanager.save(opts, path)
    fresh = options.Options()
    optmanager.load_paths(fresh, path)
    assert fresh.listen_port == 9999
import datetime
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
key = ec.generate_private_key(ec.SECP256R1())
name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "example.com")])
now = datetime.datetime.now(datetime.timezone.utc)
cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("example.com")]), critical=False)
        .sign(key, hashes.SHA256()))
aioquic.tls.service_identity.cryptography.verify_certificate_hostname(cert, "example.com")
try:
    aioquic.tls.service_identity.cryptography.verify_certificate_hostname(cert, "other.com")
    raise SystemExit("a wrong host name passed")
except service_identity.VerificationError:
    pass
assert encoding.decode(encoding.encode(b"x" * 1000, "zstd"), "zstd") == b"x" * 1000
assert not any(lean_imports.is_deferred(n) for n in lean_imports.DEFERRED)
assert "ruamel.yaml.main" in sys.modules and "pyasn1" in sys.modules
print("OK")
"""


def test_deferred_modules_load_only_when_used_and_then_work():
    """Issue 16 (idle RSS): mitmproxy's option-file YAML, aioquic's certificate-name check and
    the zstd codec stay unloaded in a sidecar; used, they load and work as always."""
    env_path = ":".join(str(REPO / p) for p in ("sidecar", "operator", "testbed"))
    out = subprocess.run([sys.executable, "-c", DEFERRED], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "OK"


SLOW_MODULE = """
import time, builtins
builtins.chaperone_runs = getattr(builtins, "chaperone_runs", 0) + 1
time.sleep(0.3)
VALUE = 42
"""


def test_a_deferred_module_runs_once_when_two_threads_use_it(tmp_path, monkeypatch):
    import builtins
    import threading

    from chaperone_sidecar import lean_imports

    (tmp_path / "chaperone_slow_module.py").write_text(SLOW_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "chaperone_slow_module", raising=False)
    lean_imports._defer("chaperone_slow_module")
    try:
        module = sys.modules["chaperone_slow_module"]
        assert lean_imports.is_deferred("chaperone_slow_module")
        assert not hasattr(builtins, "chaperone_runs")
        seen: list[int] = []
        threads = [threading.Thread(target=lambda: seen.append(module.VALUE)) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert seen == [42, 42] and builtins.chaperone_runs == 1  # type: ignore[attr-defined]
        assert not lean_imports.is_deferred("chaperone_slow_module")
    finally:
        sys.modules.pop("chaperone_slow_module", None)
        if hasattr(builtins, "chaperone_runs"):
            del builtins.chaperone_runs  # type: ignore[attr-defined]
