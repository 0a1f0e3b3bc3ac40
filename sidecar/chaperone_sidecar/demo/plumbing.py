"""The demo's plumbing: output, ``chaperone`` subprocesses, the proxy process and the agent.

Nothing here knows the scenario: :func:`run_cli` and :class:`Proxy` run the real ``chaperone``
commands as a user would (the installed entry points when complete, else the modules, so the
demo works from a source checkout), and :class:`Agent` is a plain ``urllib`` client that goes
through the proxy trusting only its CA. A check that fails raises :class:`DemoFailure`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

# The demo lives in chaperone_sidecar/demo/: two levels up is the directory holding the package.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]

COMMANDS = {  # subcommand -> module whose main() has it (when entry points are not installed)
    "proxy": "chaperone_sidecar.sidecar_cli",
    "approve": "chaperone_sidecar.standalone_cli",
    "deny": "chaperone_sidecar.standalone_cli",
    "approvals": "chaperone_sidecar.standalone_cli",
    "sessions": "chaperone_sidecar.recording.sessions_cli",
}


class DemoFailure(Exception):
    """A step did not do what it should; the message says what happened instead."""


# ============================================================================ output

def header(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(3, 74 - len(text)), flush=True)


def say(text: str = "") -> None:
    print(text, flush=True)


def indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.rstrip("\n").splitlines())


# ============================================================================ processes

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    paths = [str(PACKAGE_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _entry_points_installed() -> bool:
    try:
        from importlib.metadata import entry_points

        names = {e.name for e in entry_points(group="chaperone.commands")}
        registered = set()
        for entry in entry_points(group="chaperone.commands"):
            registered.add(entry.value.split(":")[0])
        return {"proxy", "sessions"} <= names and "chaperone_sidecar.standalone_cli" in registered
    except Exception:
        return False


def chaperone(*args: str) -> list[str]:
    """argv of ``chaperone ARGS``: the installed CLI when it has every command, else the module."""
    if _entry_points_installed():
        return [sys.executable, "-m", "chaperone_sidecar.cli", *args]
    return [sys.executable, "-m", COMMANDS[args[0]], *args]


def run_cli(*args: str, show: bool = True, check: bool = True, timeout: float = 30) -> str:
    if show:
        say(f"$ chaperone {' '.join(args)}")
    out = subprocess.run(chaperone(*args), env=child_env(), capture_output=True, text=True,
                         timeout=timeout)
    text = out.stdout + (out.stderr if out.returncode else "")
    if show and text.strip():
        say(indent(text))
    if check and out.returncode != 0:
        raise DemoFailure(f"`chaperone {' '.join(args)}` exited with {out.returncode}: {out.stderr.strip()}")
    return out.stdout


class Proxy:
    """``chaperone proxy`` as a child process."""

    def __init__(self, conf: Path):
        self.conf = conf
        self.port, self.health_port = _free_port(), _free_port()
        self.log = conf / "proxy.log"
        self.args = ["proxy", "--config-dir", str(conf), "--port", str(self.port),
                     "--health-port", str(self.health_port)]
        say(f"$ chaperone {' '.join(self.args)}")
        self.proc = subprocess.Popen(chaperone(*self.args), env=child_env(),
                                     stdout=subprocess.DEVNULL, stderr=self.log.open("wb"))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ca_cert(self) -> Path:
        return self.conf / "ca" / "mitmproxy-ca-cert.pem"

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DemoFailure(f"chaperone proxy exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise DemoFailure("chaperone proxy did not become ready in time")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# ============================================================================ the agent

class Agent:
    """A real HTTP client going through the proxy and trusting only the proxy's CA."""

    def __init__(self, proxy: Proxy):
        context = ssl.create_default_context(cafile=str(proxy.ca_cert))
        self.opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({"https": proxy.url, "http": proxy.url}),
            urllib.request.HTTPSHandler(context=context))

    def call(self, method: str, url: str, body: Any = None, timeout: float = 50) -> tuple[int, Any, dict]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method,
                                         headers={"Content-Type": "application/json",
                                                  "User-Agent": "demo-agent/1.0"})
        try:
            with self.opener.open(request, timeout=timeout) as resp:
                status, raw, headers = resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            status, raw, headers = exc.code, exc.read(), dict(exc.headers)
        try:
            parsed: Any = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode(errors="replace")
        return status, parsed, headers


def show_response(status: int, body: Any) -> None:
    text = json.dumps(body, indent=2) if not isinstance(body, str) else body
    say(f"  <- HTTP {status}")
    say(indent(text, "     "))


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise DemoFailure(message)
