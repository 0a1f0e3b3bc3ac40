"""Transparent mode: the iptables rules that send agent TCP traffic to the sidecar.

Why a pure function of the settings: the same rule list is written into the `chaperone-init`
container (as a shell script) and applied by the sidecar's network-namespace test, so what is
tested is exactly what pods run. Rules (per address family, per redirected port):

    iptables -w -t nat -A OUTPUT -p tcp ! -o lo -m owner ! --uid-owner UID \
        -m tcp --dport PORT -j REDIRECT --to-ports PROXY_PORT

* nat OUTPUT only: traffic *originating* in the pod; inbound traffic is not touched.
* `! -o lo`: loopback stays direct (agents reaching the sidecar itself, reverse-mode ports,
  local helpers); packets to the pod's own addresses also leave via lo.
* `! --uid-owner UID`: the sidecar's own upstream connections are not looped back into it.
  This is why no agent container may run as the sidecar UID (the webhook refuses such pods).
* One rule per port, appended: running the script twice only duplicates rules, which is
  harmless, and there is no custom chain whose creation could fail on a retry.
"""

from __future__ import annotations

import shlex
from typing import Iterable

from .settings import InjectionSettings


def redirect_ports(settings: InjectionSettings, extra_ports: Iterable[int] = ()) -> list[int]:
    """Ports to redirect: the settings' ports plus explicit ports of connection hosts."""
    ports = set(settings.redirect_ports) | set(extra_ports)
    # Never redirect the sidecar's own ports (they are on loopback anyway; belt and braces).
    ports -= {settings.proxy_port, settings.health_port}
    return sorted(ports)


def iptables_rules(settings: InjectionSettings,
                   extra_ports: Iterable[int] = ()) -> list[list[str]]:
    """The argv of every iptables/ip6tables invocation, in order."""
    binaries = ["iptables"] + (["ip6tables"] if settings.redirect_ipv6 else [])
    rules: list[list[str]] = []
    for binary in binaries:
        for port in redirect_ports(settings, extra_ports):
            rules.append([
                binary, "-w", "-t", "nat", "-A", "OUTPUT", "-p", "tcp",
                "!", "-o", "lo",
                "-m", "owner", "!", "--uid-owner", str(settings.sidecar_uid),
                "-m", "tcp", "--dport", str(port),
                "-j", "REDIRECT", "--to-ports", str(settings.proxy_port),
            ])
    return rules


def iptables_script(rules: list[list[str]]) -> str:
    """A POSIX sh script running `rules`; `set -eu` so any failure fails the init container
    (the pod then never starts: fail closed rather than run agents without redirection)."""
    lines = ["set -eu"] + [shlex.join(rule) for rule in rules]
    return "\n".join(lines) + "\n"
