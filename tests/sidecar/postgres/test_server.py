"""Listener ports: the rule the webhook's PGPORT follows too."""

from __future__ import annotations

from chaperone_sidecar.postgres.server import listen_ports
from chaperone_sidecar.routing import Connection


def pg(name: str, **postgres) -> Connection:
    return Connection(name, "postgres", spec={"type": "postgres", "postgres": postgres})


def test_ports_by_name_order_explicit_ones_and_clashes():
    conns = [pg("b"), pg("a"), Connection("web", "http"), pg("c", listenPort=7000), pg("d", listenPort=5433)]
    assert listen_ports(conns) == {"a": 5432, "b": 5433, "c": 7000}  # d clashes with b: not served
