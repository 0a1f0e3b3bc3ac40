"""Sidecar injection: the pure function behind the pod-mutating webhook.

`inject(pod, settings, connections, user_info)` returns the RFC 6902 patch (and the mutated pod)
that puts a labelled pod behind the Chaperone sidecar, or a refusal reason. Everything it writes
is named in `chaperone_sidecar.contract` (one module both sides import) and documented in
docs/injection.md.

Modules: `settings` (operator-wide knobs from CHAPERONE_* variables), `connections` (which
ClaudeConnections apply, NO_PROXY safety), `agent` (agent containers), `sidecar` (added
containers and volumes), `iptables` (transparent-mode rules), `patch` (JSONPatch diff),
`inject` (the orchestration and refusals). Import each name from its module; the package
re-exports nothing.
"""
