"""RouteTable: host[:port] -> ClaudeConnection, most specific pattern first."""

from __future__ import annotations

from chaperone_sidecar.routing import (
    Connection, RouteTable, base_url_parts, effective_hosts, normalize_host, split_host,
)


def conn(name, type_="http", **spec):
    spec = {"type": type_, **spec}
    return Connection(name=name, type=type_, hosts=effective_hosts(spec), spec=spec,
                      base_url=spec.get("baseURL"), reverse_port=spec.pop("_port", None))


def test_effective_hosts_defaults_and_extra_urls():
    assert effective_hosts({"type": "aws"}) == ("*.amazonaws.com", "amazonaws.com")
    assert effective_hosts({"type": "anthropic"}) == ("api.anthropic.com",)
    assert effective_hosts({"type": "http"}) == ()
    spec = {"type": "aws", "aws": {"endpointURL": "https://s3.local:9000"}}
    assert effective_hosts(spec) == ("*.amazonaws.com", "amazonaws.com", "s3.local:9000")
    spec = {"type": "anthropic", "hosts": ["A.example.com"], "baseURL": "https://user@gw.example.com/v1"}
    assert effective_hosts(spec) == ("a.example.com", "gw.example.com")


def test_defaults_route_aws_and_anthropic():
    table = RouteTable([conn("aws", "aws"), conn("claude", "anthropic")])
    assert table.match("s3.us-east-1.amazonaws.com", 443).name == "aws"
    assert table.match("AMAZONAWS.COM.", 443).name == "aws"  # case, trailing dot
    assert table.match("api.anthropic.com", 443).name == "claude"
    assert table.match("anthropic.com", 443) is None
    assert table.match("evilamazonaws.com", 443) is None  # "*." needs the dot


def test_endpoint_url_host_routes_to_its_connection():
    table = RouteTable([conn("minio", "aws", aws={"endpointURL": "http://127.0.0.1:9000"})])
    assert table.match("127.0.0.1", 9000).name == "minio"
    assert table.match("127.0.0.1", 9001) is None  # the port is part of that host


def test_most_specific_pattern_wins_regardless_of_order():
    wide = conn("a-wide", hosts=["*.example.com"])
    narrow = conn("z-narrow", hosts=["*.api.example.com"])
    exact = conn("m-exact", hosts=["v1.api.example.com"])
    for order in ([wide, narrow, exact], [exact, narrow, wide]):
        table = RouteTable(order)
        assert table.match("v1.api.example.com", 443).name == "m-exact"
        assert table.match("v2.api.example.com", 443).name == "z-narrow"
        assert table.match("www.example.com", 443).name == "a-wide"
        assert table.match("example.com", 443) is None


def test_ports():
    k8s = conn("k8s", "kubernetes", hosts=["k8s.example.com:6443"])
    web = conn("web", hosts=["k8s.example.com"])
    table = RouteTable([k8s, web])
    assert table.match("k8s.example.com", 6443).name == "k8s"
    assert table.match("k8s.example.com", 443).name == "web"
    only_port = RouteTable([k8s])
    assert only_port.match("k8s.example.com", 443) is None


def test_ip_hosts_and_globs():
    table = RouteTable([conn("ip", hosts=["10.1.2.3", "[fd00::1]:8443"]), conn("all", hosts=["*"])])
    assert table.match("10.1.2.3", 80).name == "ip"
    assert table.match("fd00::1", 8443).name == "ip"
    assert table.match("[FD00::1]", 8443).name == "ip"
    assert table.match("10.9.9.9", 80) is None  # globs never match IP addresses
    assert table.match("anything.example", 80).name == "all"


def test_overlaps_and_bad_hosts_are_reported():
    table = RouteTable([conn("b", hosts=["x.example.com"]), conn("a", hosts=["x.example.com"]),
                        conn("c", hosts=["https://bad.example.com/"])])
    assert table.match("x.example.com", 443).name == "a"
    assert any("claimed by ClaudeConnections a and b" in o for o in table.overlaps)
    assert any("ClaudeConnection c" in p and "ignored" in p for p in table.problems)


def test_reverse_ports():
    claude = conn("claude", "anthropic", baseURL="https://api.anthropic.com", _port=15100)
    other = conn("other", "anthropic", baseURL="https://gw.example.com", _port=15100)
    table = RouteTable([claude, other])
    assert table.for_reverse_port(15100).name == "claude"
    assert table.reverse == {15100: claude}
    assert any("reverse port 15100 already used by claude" in p for p in table.problems)
    assert claude.describe()["baseURL"] == "http://127.0.0.1:15100"


def test_helpers():
    assert split_host("h:443") == ("h", 443)
    assert split_host("[::1]:8443") == ("::1", 8443)
    assert split_host("::1") == ("::1", None)
    assert normalize_host(" [::1] ") == "::1"
    assert base_url_parts("https://h.example.com:8443/v1/") == ("https", "h.example.com", 8443, "/v1")
    assert base_url_parts("http://h") == ("http", "h", 80, "")


def test_lookups_are_cached_and_consistent():
    table = RouteTable([conn("w", hosts=["*.example.com"])])
    for _ in range(3):
        assert table.match("a.example.com", 443).name == "w"
        assert table.match("a.example.org", 443) is None
    assert len(table) == 1 and table.describe() == [{"name": "w", "type": "http", "hosts": ["*.example.com"]}]
