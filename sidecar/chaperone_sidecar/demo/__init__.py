"""The README demo: ``chaperone proxy`` (standalone) and a scripted agent session.

Run ``python -m chaperone_sidecar.demo`` (``make demo``). Everything happens on this machine,
in a temporary config directory (``--keep`` leaves it, ``--config-dir`` picks it):

0. A small HTTPS "tickets API" starts on loopback with a certificate from its own CA (the
   connection trusts it as ``upstreamCA``). It wants ``Authorization: Bearer <token>``, a token
   only the proxy holds (``credentials/tickets-api/token``). ``chaperone proxy`` starts with one
   ClaudeConnection and one AccessPolicy from YAML, generates its interception CA on first run,
   records to ``recordings/`` and keeps approvals in ``approvals/``.
1. **allowed** - ``GET /tickets/42``: forwarded with the injected token, 200.
2. **blocked** - ``DELETE /tickets/42``: the policy's JSON refusal (403); never forwarded.
3. **masked** - ``GET /deployments/billing/config``: the upstream returns an AWS key pair and a
   database password; the agent (and the recording) get them masked.
4. **approval** - ``POST /tickets/42/refund`` is held; ``chaperone approvals`` lists it,
   ``chaperone approve NAME`` (a subprocess, as a human would run it) releases it: 200.
5. The proxy stops (the session is closed and signed); ``chaperone sessions replay`` prints the
   recorded session and ``chaperone sessions verify`` checks chain and signature.

The agent is a real HTTP client (``urllib`` through ``HTTPS_PROXY``-style proxying, trusting
only the proxy's CA). Every step checks its outcome; any failure prints why and exits 1.
The whole run is bounded (``--timeout``, default 55 s).
"""

# Split by concern: scenario.py (the secrets, the tickets API, the config dir), plumbing.py
# (output, subprocesses, the agent), steps.py (the steps and run_demo). main() stays here so
# --help prints the text above; import the other names from their modules.

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from .plumbing import DemoFailure, header, say
from .steps import run_demo

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaperone_sidecar.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-dir", help="use this (empty or new) directory instead of a temporary one")
    parser.add_argument("--keep", action="store_true", help="keep the temporary config directory")
    parser.add_argument("--timeout", type=float, default=55.0, help="bound for the whole run (s)")
    args = parser.parse_args(argv)
    if args.config_dir:
        conf = Path(args.config_dir).expanduser().resolve()
        if conf.exists() and any(conf.iterdir()):
            parser.error(f"{conf} is not empty")
        conf.mkdir(parents=True, exist_ok=True)
    else:
        conf = Path(tempfile.mkdtemp(prefix="chaperone-demo-"))
    started = time.monotonic()
    say("Chaperone demo: an agent session through the standalone proxy")
    try:
        run_demo(conf, args.timeout)
    except DemoFailure as exc:
        say(f"\nDEMO FAILED: {exc}")
        return 1
    except Exception as exc:  # noqa: BLE001 - report, never a traceback-only exit
        say(f"\nDEMO FAILED: {type(exc).__name__}: {exc}")
        return 1
    finally:
        if not args.keep and not args.config_dir:
            shutil.rmtree(conf, ignore_errors=True)
        elif conf.exists():
            say(f"\n(config dir kept: {conf})")
    header(f"Demo complete in {time.monotonic() - started:.1f}s: allowed, blocked, masked, "
           "approved, recorded and verified")
    return 0
