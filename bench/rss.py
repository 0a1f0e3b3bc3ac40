"""Resident memory of a proxy (and its helper processes) from /proc: idle and peak.

Also the CPU time a proxy used (:func:`cpu_seconds`), for CPU per request.

Why /proc and not psutil: no extra dependency, and the kernel's own numbers. A proxy is a
process *tree* (Squid forks its ``security_file_certgen`` helpers), so sizes are summed over
the tree - each process's ``VmRSS``. Shared pages are then counted once per process, which
slightly over-states Squid (its helpers share libraries); the single-process mitmproxy paths
are exact.

:class:`PeakSampler` polls the tree every ``interval`` seconds in a thread while something
runs (the 1 GiB download), so the growth it reports is "highest RSS seen during the download
minus the RSS just before it".
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

__all__ = ["children", "process_tree", "rss_bytes", "tree_rss", "cpu_seconds", "PeakSampler", "settle",
           "import_footprint", "FOOTPRINT"]

PROC = Path("/proc")


def _status(pid: int) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        text = (PROC / str(pid) / "status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _kib(value: str) -> int:
    return int(value.split()[0]) * 1024 if value else 0


def rss_bytes(pid: int) -> int:
    """VmRSS of one process (0 when it is gone)."""
    return _kib(_status(pid).get("VmRSS", ""))


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from every thread's ``children`` file)."""
    out: list[int] = []
    try:
        tasks = list((PROC / str(pid) / "task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    seen, todo = [], [pid]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.append(current)
        todo += children(current)
    return seen


def tree_rss(pid: int) -> int:
    """Sum of VmRSS over the process tree rooted at ``pid``."""
    return sum(rss_bytes(p) for p in process_tree(pid))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process tree (threads included), in seconds.

    Divided by the requests served it gives the proxy's CPU per request, which - unlike
    requests per second - barely depends on what else the machine is running.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in process_tree(pid):
        try:
            fields = (PROC / str(p) / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return total / ticks


class PeakSampler:
    """Samples :func:`tree_rss` in a thread; ``peak`` is the highest value seen."""

    def __init__(self, pid: int, interval: float = 0.02):
        self.pid, self.interval = pid, interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self.peak = tree_rss(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, tree_rss(self.pid))


# What a Chaperone process imports, in groups, cumulatively (see import_footprint). Since issue 16
# the sidecar has no aiohttp (its own HTTP/1.1 client and health server on h11, which mitmproxy
# loads anyway), no boto3 (recording shipped by the S3 store on that client) and no
# requests/protobuf (its own OTLP/HTTP exporters); jsonschema only for a policy that does not
# conform, redis only with a Redis URL, per-protocol libraries with their first connection.
FOOTPRINT: list[tuple[str, list[str]]] = [
    ("Python, asyncio, ssl, cryptography", ["asyncio", "ssl", "cryptography.x509"]),
    ("mitmproxy.master, without the default addons' modules and with ruamel.yaml, service_identity and "
     "zstandard deferred (chaperone_sidecar.lean_imports)", ["=lean-imports", "mitmproxy.master"]),
    ("mitmproxy's HTTP/TLS layers and the lean master's core addons",
     ["mitmproxy.proxy.layers.http", "mitmproxy.addons.proxyserver", "mitmproxy.addons.tlsconfig"]),
    ("PyYAML, OpenTelemetry API + SDK with the Prometheus reader, uvloop",
     ["yaml", "opentelemetry.sdk.trace", "opentelemetry.sdk.metrics", "opentelemetry.exporter.prometheus",
      "uvloop"]),
    ("chaperone_sidecar: runtime, addons, policy, masking (database loaded serialized), recording with the "
     "S3 store, OTLP exporters",
     ["chaperone_sidecar.proxy", "chaperone_sidecar.services"] + [f"chaperone_sidecar.addons.{m}" for m in (
         "identify", "route", "enforce", "approve", "credentials", "mask", "record", "telemetry")]
     + ["chaperone_sidecar.recording", "chaperone_sidecar.recording.s3http", "chaperone_sidecar.otlp_spans",
        "chaperone_sidecar.otlp_metrics"]),
]

_FOOTPRINT_CHILD = """
import importlib, json, sys
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) * 1024
out = [rss()]
for mods in json.loads(sys.argv[1]):
    for mod in mods:
        if mod == '=lean-imports':
            from chaperone_sidecar import lean_imports
            lean_imports.install()
        else:
            importlib.import_module(mod)
    out.append(rss())
print(json.dumps(out))
"""


def import_footprint(python: str, pythonpath: str) -> list[tuple[str, int]]:
    """RSS each :data:`FOOTPRINT` group adds when imported in that order by a fresh ``python``
    (bytes); the first row is the bare interpreter. Explains an idle RSS by its imports."""
    import json
    import subprocess

    res = subprocess.run([python, "-c", _FOOTPRINT_CHILD, json.dumps([m for _, m in FOOTPRINT])],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": pythonpath})
    if res.returncode != 0:
        raise RuntimeError(f"import footprint failed: {res.stderr[-1000:]}")
    sizes = json.loads(res.stdout)
    labels = ["the interpreter"] + [label for label, _ in FOOTPRINT]
    return [(labels[0], sizes[0])] + [(labels[i], sizes[i] - sizes[i - 1]) for i in range(1, len(sizes))]


def settle(pid: int, seconds: float = 1.0) -> int:
    """RSS after ``seconds`` of idleness (start-up allocations done, nothing in flight)."""
    time.sleep(seconds)
    return tree_rss(pid)


if __name__ == "__main__":  # manual check: python bench/rss.py PID
    import sys

    target = int(sys.argv[1]) if len(sys.argv) > 1 else os.getpid()
    print({"tree": process_tree(target), "rss_mb": tree_rss(target) / 1e6})
