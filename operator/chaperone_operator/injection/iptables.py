"""Transparent mode: the netfilter rules that leave an agent no way out but the sidecar.

Why a pure function of the settings: the same rules are written into the `chaperone-init`
container (as a shell script) and applied by the sidecar's network-namespace test, so what is
tested is exactly what pods run.

What the rules do, per address family (iptables, and ip6tables - see below):

* **Every outbound TCP connection** of every UID but the sidecar's is REDIRECTed to the
  sidecar's proxy port (nat OUTPUT), whatever its destination port or address - including
  other ports of a connection's host, the node, and the cloud metadata address
  (169.254.169.254). The sidecar judges each one (TLS SNI / Host header against the
  ClaudeConnections, on the original port) and refuses, and records, what no connection
  declares. Exceptions: loopback (`-o lo`: the sidecar itself, reverse-mode ports, the pod's
  own addresses, local helpers) and TCP port 53 to the pod's resolvers (DNS over TCP, which
  resolvers fall back to for large answers).
* **Everything else is refused** (filter OUTPUT, REJECT so clients fail at once): UDP
  (QUIC/HTTP3 to any host, DNS to any other server), ICMP, SCTP, raw sockets. Allowed:
  loopback, the sidecar UID, the redirected connections (their destination is the proxy on
  loopback after the nat rule), UDP/TCP 53 to the pod's resolvers, and packets of connections
  that already exist (`ESTABLISHED,RELATED`: replies to *inbound* connections - probes,
  services the agent serves - and ICMP errors about them). Packets the kernel sends on its own
  (no socket: IPv6 neighbour discovery, RSTs, ICMP errors) are never refused
  (`-m owner --socket-exists` on the final REJECT).
* **Resolvers** are the `nameserver` lines of the pod's `/etc/resolv.conf`, which the kubelet
  writes from the pod's `dnsPolicy`/`dnsConfig` before any container starts; the script reads
  them when it runs (the webhook cannot know the cluster DNS address). A DNS name can still
  carry data to whoever runs a domain's authoritative server (DNS tunnelling through the
  cluster resolver); that channel is the resolver's to police and is documented.
* **IPv6**: with `CHAPERONE_REDIRECT_IPV6=true` (default) the same rules go into ip6tables
  (the proxy listens on `::1` too); any ip6tables failure fails the init container. With
  `false` (for nodes whose kernel has no ip6tables support) the script instead refuses to
  start if the pod has any IPv6 address besides loopback: without rules IPv6 would be a way
  around the sidecar, so the pod must have IPv6 disabled.
* The sidecar UID (`--uid-owner`) is the only exemption. This is why no agent container may
  run as, or be able to become, the sidecar UID: the webhook refuses `runAsUser` = sidecar
  UID and makes every transparent-mode agent drop `SETUID` with `allowPrivilegeEscalation:
  false` (see inject.py), and refuses agents that could edit these rules (`NET_ADMIN`,
  `SYS_ADMIN`, privileged).
* Appended, not inserted, into the built-in chains, without custom chains: running the script
  twice only duplicates rules, which is harmless, and no chain creation can fail on a retry.
"""

from __future__ import annotations

import shlex

from .settings import InjectionSettings

#: Stands for one resolver address in a rule template (expanded once per nameserver).
NAMESERVER = "<nameserver>"
_FAMILIES = (("iptables", "127.0.0.1", False), ("ip6tables", "::1", True))


def _templates(binary: str, loopback: str, settings: InjectionSettings) -> list[list[str]]:
    """The rules of one address family, in order; NAMESERVER marks per-resolver rules."""
    uid, port = str(settings.sidecar_uid), str(settings.proxy_port)
    nat = [binary, "-w", "-t", "nat", "-A", "OUTPUT"]
    flt = [binary, "-w", "-t", "filter", "-A", "OUTPUT"]
    return [
        # nat: DNS over TCP to the resolvers stays direct; all other TCP goes to the sidecar.
        nat + ["-p", "tcp", "-d", NAMESERVER, "--dport", "53", "-j", "RETURN"],
        nat + ["-p", "tcp", "!", "-o", "lo", "-m", "owner", "!", "--uid-owner", uid,
               "-j", "REDIRECT", "--to-ports", port],
        # filter: what may leave at all.
        flt + ["-o", "lo", "-j", "ACCEPT"],
        flt + ["-m", "owner", "--uid-owner", uid, "-j", "ACCEPT"],
        flt + ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
        flt + ["-p", "tcp", "-d", loopback, "--dport", port, "-j", "ACCEPT"],  # redirected
        flt + ["-p", "udp", "-d", NAMESERVER, "--dport", "53", "-j", "ACCEPT"],
        flt + ["-p", "tcp", "-d", NAMESERVER, "--dport", "53", "-j", "ACCEPT"],
        flt + ["-m", "owner", "--socket-exists", "-j", "REJECT"],
    ]


def _families(settings: InjectionSettings) -> list[tuple[str, str, bool]]:
    return [f for f in _FAMILIES if settings.redirect_ipv6 or not f[2]]


def iptables_rules(settings: InjectionSettings,
                   nameservers: tuple[str, ...] | list[str] = ()) -> list[list[str]]:
    """The argv of every iptables/ip6tables invocation the script runs, in order, for a pod
    whose /etc/resolv.conf names `nameservers` (each applies to its own address family)."""
    rules: list[list[str]] = []
    for binary, loopback, v6 in _families(settings):
        family = [ns for ns in nameservers if (":" in ns) == v6]
        for template in _templates(binary, loopback, settings):
            if NAMESERVER not in template:
                rules.append(template)
                continue
            rules += [[ns if arg == NAMESERVER else arg for arg in template] for ns in family]
    return rules


# Reads the resolvers the kubelet wrote; only plain addresses (no "/": iptables would take a
# CIDR, and a resolver is one address).
_READ_RESOLVERS = """\
ns4=""
ns6=""
if [ -r /etc/resolv.conf ]; then
  while read -r key value rest || [ -n "$key" ]; do
    if [ "$key" = nameserver ]; then
      case "$value" in
        ""|*/*|*[!0-9A-Fa-f.:]*) ;;
        *:*) ns6="$ns6 $value" ;;
        *) ns4="$ns4 $value" ;;
      esac
    fi
  done < /etc/resolv.conf
fi"""

# CHAPERONE_REDIRECT_IPV6=false: fail closed when the pod has IPv6 beyond loopback.
_REQUIRE_NO_IPV6 = """\
if [ -r /proc/net/if_inet6 ]; then
  while read -r addr index plen scope flags dev; do
    if [ "$dev" != lo ]; then
      echo "chaperone-init: IPv6 address on $dev, but CHAPERONE_REDIRECT_IPV6=false installs no ip6tables rules; refusing to start" >&2
      exit 1
    fi
  done < /proc/net/if_inet6
fi"""  # noqa: E501 - the message the pod logs, one line in the golden files


def iptables_script(settings: InjectionSettings) -> str:
    """A POSIX sh script installing `iptables_rules(settings, <the pod's resolvers>)`.

    `set -eu`: any failure fails the init container, and the pod never starts - fail closed
    rather than run agents without the rules."""
    lines = ["set -eu", _READ_RESOLVERS]
    if not settings.redirect_ipv6:
        lines.append(_REQUIRE_NO_IPV6)
    for binary, loopback, v6 in _families(settings):
        var = "$ns6" if v6 else "$ns4"
        for template in _templates(binary, loopback, settings):
            if NAMESERVER not in template:
                lines.append(shlex.join(template))
                continue
            command = " ".join('"$ns"' if arg == NAMESERVER else shlex.quote(arg)
                               for arg in template)
            lines.append(f"for ns in {var}; do {command}; done")
    return "\n".join(lines) + "\n"
