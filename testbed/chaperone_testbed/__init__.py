"""Chaperone's test bed: a real control plane, Redis and S3 on loopback, with no Docker.

What: `ControlPlane` (etcd + kube-apiserver built from Go modules, real RBAC and client-cert
personas), `RedisServer` and `S3Server` (restartable on the same port for fault tests), and the
PKI helpers they use. `python -m chaperone_testbed up` runs everything for manual work.

Why a package rather than test fixtures: the same bed serves pytest (tests/conftest.py), the
e2e suite, benchmarks and humans at a shell, so it lives in one importable place. Import each
name from its module (`controlplane`, `services`, `pki`, ...); the package re-exports nothing.
"""
