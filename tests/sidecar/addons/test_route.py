"""Route: host -> connection in explicit, transparent and reverse mode; 403 for unknown hosts."""

from __future__ import annotations

import json

from mitmproxy import http
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow, tutils

from chaperone_sidecar import flowctx
from chaperone_sidecar.addons.route import Route
from chaperone_sidecar.config import ConnectionMount, SidecarConfig
from chaperone_sidecar.flowctx import request_of
from chaperone_sidecar.services import SidecarServices
from chaperone_sidecar.sources import Sources

CONNECTIONS = [
    {"metadata": {"name": "github"}, "spec": {"type": "http", "hosts": ["api.github.com"]}},
    {"metadata": {"name": "aws"}, "spec": {"type": "aws"}},
    {"metadata": {"name": "claude"}, "spec": {"type": "anthropic", "baseURL": "https://api.anthropic.com/v1"}},
]


def services(connections=CONNECTIONS):
    sources = Sources("team-a")
    sources.publish({"connection_objs": connections, "policy_objs": [],
                     "mounts": [ConnectionMount("claude", "anthropic", reverse_port=15100)]})
    return SidecarServices(config=SidecarConfig(standalone=True), sources=sources)


def make_flow(host, port=443, scheme="https", path="/", headers=None, content=b"", mode="regular",
              sni=None):
    fields = headers if headers is not None else [(b"host", host.encode())]
    f = tflow.tflow(req=tutils.treq(host=host, port=port, scheme=scheme.encode(), path=path.encode(),
                                    headers=http.Headers(fields), content=content))
    f.client_conn.proxy_mode = ProxyMode.parse(mode)
    f.client_conn.sni = sni
    return f


def route(flow, svc=None, *, body=True):
    addon = Route(svc or services())
    with taddons.context(addon):
        addon.requestheaders(flow)
        if body:
            addon.request(flow)
    return flowctx.get(flow)


def test_explicit_mode_routes_by_host_and_classifies():
    f = make_flow("api.github.com", path="/repos/x/y")
    ctx = route(f)
    assert (ctx.connection, ctx.connection_type) == ("github", "http")
    assert ctx.action.name == "http:GET" and ctx.action.host == "api.github.com"
    assert f.response is None and ctx.snapshot.generation == 1


def test_unknown_host_gets_a_403_an_agent_can_act_on():
    f = make_flow("evil.example.com", path="/exfil")
    ctx = route(f)
    assert f.response.status_code == 403
    assert f.response.headers["X-Chaperone-Refused"] == "no_connection"
    assert f.response.headers["Content-Type"] == "application/json"
    body = json.loads(f.response.content)
    assert body["error"] == "chaperone_no_connection"
    assert "evil.example.com" in body["message"] and "github (api.github.com)" in body["message"]
    assert body["host"] == "evil.example.com" and body["port"] == 443
    assert {c["name"] for c in body["connections"]} == {"github", "aws", "claude"}
    assert body["action"]["summary"].startswith("GET https://evil.example.com/exfil")
    assert ctx.refused == body and ctx.connection == ""


def test_no_connections_at_all():
    f = make_flow("api.github.com")
    route(f, services([]))
    assert "no connections at all" in json.loads(f.response.content)["message"]


def test_host_header_must_match_the_destination():
    f = make_flow("api.github.com", headers=[(b"host", b"internal.example.com")])
    route(f)
    assert f.response.status_code == 400
    assert f.response.headers["X-Chaperone-Refused"] == "invalid_request"
    assert "Host header names internal.example.com" in json.loads(f.response.content)["message"]
    ok = make_flow("api.github.com", headers=[(b"Host", b"API.GITHUB.COM:443")])
    route(ok)
    assert ok.response is None


def test_transparent_mode_routes_by_sni_and_connects_to_the_name():
    f = make_flow("93.184.216.34", sni="s3.us-east-1.amazonaws.com", mode="transparent",
                  headers=[(b"host", b"s3.us-east-1.amazonaws.com")])
    ctx = route(f)
    assert ctx.connection == "aws" and ctx.connection_type == "aws"
    assert f.request.host == "s3.us-east-1.amazonaws.com"  # not the IP the client dialled
    assert f.request.headers["host"] == "s3.us-east-1.amazonaws.com"


def test_transparent_mode_plain_http_uses_the_host_header():
    f = make_flow("10.0.0.7", port=80, scheme="http", mode="transparent",
                  headers=[(b"host", b"api.github.com")])
    assert route(f).connection == "github" and f.request.host == "api.github.com"


def test_transparent_mode_sni_and_host_must_agree():
    f = make_flow("10.0.0.7", sni="api.github.com", mode="transparent",
                  headers=[(b"host", b"evil.example.com")])
    route(f)
    assert f.response.status_code == 400


def test_reverse_mode_routes_by_listener_and_prefixes_the_base_path():
    f = make_flow("api.anthropic.com", path="/messages", mode="reverse:https://api.anthropic.com@127.0.0.1:15100",
                  headers=[(b"host", b"api.anthropic.com")], content=b'{"model": "claude-x", "messages": []}')
    f.request.method = "POST"
    ctx = route(f)
    assert ctx.connection == "claude" and f.request.path == "/v1/messages"
    assert ctx.action.anthropic is not None and ctx.action.anthropic.model == "claude-x"
    again = make_flow("api.anthropic.com", path="/v1/messages",
                      mode="reverse:https://api.anthropic.com@127.0.0.1:15100")
    route(again)
    assert again.request.path == "/v1/messages"


def test_reverse_listener_without_a_connection_is_refused():
    f = make_flow("api.anthropic.com", mode="reverse:https://api.anthropic.com@127.0.0.1:15199")
    route(f)
    assert f.response.status_code == 403
    assert "port 15199" in json.loads(f.response.content)["message"]


def test_the_body_refines_the_classification_unless_it_streams(monkeypatch):
    import chaperone_sidecar.addons.route as route_module

    calls = []
    real = route_module.classify
    monkeypatch.setattr(route_module, "classify", lambda req, t, rules=None: calls.append(req) or real(req, t, rules))
    body = b'{"model": "claude-opus", "messages": [{"role": "user", "content": "hi"}]}'
    f = make_flow("api.anthropic.com", path="/v1/messages", content=body)
    f.request.method = "POST"
    addon = Route(services())
    with taddons.context(addon):
        addon.requestheaders(f)
        assert flowctx.get(f).action is None  # a buffered body: classified once, with it
        addon.request(f)
    assert flowctx.get(f).action.anthropic.model == "claude-opus"
    assert len(calls) == 1  # the hot path classifies each flow once
    chunked = make_flow("api.anthropic.com", path="/v1/messages", content=body)
    chunked.request.method = "POST"
    chunked.request.headers.pop("content-length", None)
    chunked.request.headers["transfer-encoding"] = "chunked"
    with taddons.context(addon):
        addon.requestheaders(chunked)
        assert flowctx.get(chunked).action.anthropic.model == ""  # may leave early: headers
        addon.request(chunked)  # read after all: refined with the body
    assert flowctx.get(chunked).action.anthropic.model == "claude-opus"
    streamed = make_flow("api.anthropic.com", path="/v1/messages", content=body)
    streamed.request.method = "POST"
    streamed.request.stream = True
    assert route(streamed).action.anthropic.model == ""


def test_already_refused_flows_are_left_alone():
    f = make_flow("evil.example.com")
    f.response = http.Response.make(401)
    route(f)
    assert f.response.status_code == 401 and flowctx.get(f) is None


def test_alt_svc_is_removed():
    f = make_flow("api.github.com")
    route(f)
    f.response = tutils.tresp(headers=http.Headers([(b"alt-svc", b'h3=":443"'), (b"x", b"1")]))
    Route(services()).responseheaders(f)
    assert "alt-svc" not in f.response.headers and f.response.headers["x"] == "1"


def test_raw_tcp_udp_and_dns_flows_are_closed():
    addon = Route(services())
    with taddons.context(addon):
        for flow, hook in ((tflow.ttcpflow(), addon.tcp_start), (tflow.tudpflow(), addon.udp_start),
                           (tflow.tdnsflow(), addon.dns_request)):
            hook(flow)
            assert flow.error is not None and flow.error.msg == "Connection killed."


def test_request_of_and_the_routed_snapshot():
    svc = services()
    f = make_flow("API.GitHub.com", path="/a%2Fb?x=1&y=2",
                  headers=[(b"host", b"api.github.com"), (b"a", b"1"), (b"a", b"2")],
                  content=b"body")
    req = request_of(f)
    assert (req.host, req.path, req.query, req.body) == ("api.github.com", "/a%2Fb", "x=1&y=2", b"body")
    assert req.headers.count(("a", "1")) == 1 and ("a", "2") in req.headers
    assert request_of(f, body=False).body == b""
    ctx = route(f, svc)
    assert ctx.snapshot is svc.snapshot()


# ---------------------------------------------------------------------------- the canonical request

CANON_CONNECTIONS = [
    {"metadata": {"name": "api"}, "spec": {"type": "http", "hosts": ["api.example.com"]}},
    {"metadata": {"name": "legacy"}, "spec": {"type": "http", "hosts": ["legacy.example.com"],
                                              "methodOverride": "honor",
                                              "pathNormalization": {"allowSemicolon": True}}},
    {"metadata": {"name": "k8s"}, "spec": {"type": "kubernetes", "hosts": ["10.0.0.1"]}},
]


def test_the_canonical_path_is_judged_and_forwarded():
    for path in ("//admin?x=1", "/x/../admin?x=1", "/%2e%2e/%61dmin?x=1"):
        f = make_flow("api.example.com", path=path)
        ctx = route(f, services(CANON_CONNECTIONS))
        assert f.response is None, path
        assert ctx.action.path == "/admin" and f.request.path == "/admin?x=1", path


def test_ambiguous_paths_are_refused_before_anything_is_forwarded():
    for path, field in (("/admin;x=1", "allowSemicolon"), ("/%2Fadmin", "allowEncodedSlash"),
                        ("/%252Fadmin", "allowDoubleEncoding"), ("/admin%5C", "allowBackslash"),
                        ("/admin.", "allowTrailingDotOrSpace"), ("/admin%00", "")):
        f = make_flow("api.example.com", path=path)
        ctx = route(f, services(CANON_CONNECTIONS))
        assert f.response is not None and f.response.status_code == 400, path
        body = json.loads(f.response.content)
        assert body["error"] == "chaperone_invalid_request" and "ambiguous" in body["message"]
        assert field in body["message"], body
        assert ctx.action is None
    opted_in = make_flow("legacy.example.com", path="/admin;x=1")
    assert route(opted_in, services(CANON_CONNECTIONS)).action.path == "/admin;x=1"
    assert opted_in.response is None


def test_method_overrides_are_stripped_by_default():
    f = make_flow("api.example.com", path="/tickets/7?_method=DELETE&a=1&b=2;_method=PUT&%5Fmethod=X",
                  headers=[(b"host", b"api.example.com"), (b"X-HTTP-Method-Override", b"DELETE"),
                           (b"X-HTTP-Method", b"DELETE"), (b"x-method-override", b"DELETE")])
    f.request.method = "POST"
    ctx = route(f, services(CANON_CONNECTIONS))
    assert f.request.path == "/tickets/7?a=1"
    for name in ("X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"):
        assert name not in f.request.headers
    assert ctx.action.method == "POST" and f.request.method == "POST"


def test_honoured_method_overrides_are_judged_as_the_overridden_method():
    f = make_flow("legacy.example.com", path="/tickets/7",
                  headers=[(b"host", b"legacy.example.com"), (b"X-HTTP-Method-Override", b"delete")])
    f.request.method = "POST"
    ctx = route(f, services(CANON_CONNECTIONS))
    assert ctx.action.method == "DELETE" and ctx.action.name == "http:DELETE"
    assert f.request.headers["X-HTTP-Method-Override"] == "delete"  # forwarded: the upstream needs it
    assert request_of(f).method == "DELETE"
    clash = make_flow("legacy.example.com", path="/tickets/7?_method=GET",
                      headers=[(b"host", b"legacy.example.com"), (b"X-HTTP-Method", b"DELETE")])
    clash.request.method = "POST"
    route(clash, services(CANON_CONNECTIONS))
    assert clash.response.status_code == 400
    assert "conflicting" in json.loads(clash.response.content)["message"]


def test_kubectl_websocket_and_spdy_attempts_are_one_action_with_one_digest():
    from chaperone_sidecar.approvals.digest import request_digest

    target = "/api/v1/namespaces/ns/pods/p/portforward"
    ws = make_flow("10.0.0.1", port=6443, path=target,
                   headers=[(b"host", b"10.0.0.1:6443"), (b"Connection", b"Upgrade"),
                            (b"Upgrade", b"websocket"), (b"Sec-WebSocket-Key", b"a2V5"),
                            (b"Sec-WebSocket-Protocol", b"SPDY/3.1+portforward.k8s.io")])
    spdy = make_flow("10.0.0.1", port=6443, path=target,
                     headers=[(b"host", b"10.0.0.1:6443"), (b"Connection", b"Upgrade"),
                              (b"Upgrade", b"SPDY/3.1"),
                              (b"X-Stream-Protocol-Version", b"portforward.k8s.io")])
    spdy.request.method = "POST"
    a, b = route(ws, services(CANON_CONNECTIONS)), route(spdy, services(CANON_CONNECTIONS))
    assert a.action.name == b.action.name == "kubernetes:create/pods/portforward"
    assert request_digest(request_of(ws)) == request_digest(request_of(spdy))
    assert ws.request.method == "GET"  # the request line is untouched: the handshake stays valid
    pod = make_flow("10.0.0.1", port=6443, path="/api/v1/namespaces/ns/pods/p")
    assert route(pod, services(CANON_CONNECTIONS)).action.name == "kubernetes:get/pods"
    assert request_of(pod).method == "GET"


def test_a_method_field_in_a_form_body_is_stripped_or_refused_or_judged():
    form = [(b"host", b"api.example.com"), (b"content-type", b"application/x-www-form-urlencoded")]
    f = make_flow("api.example.com", path="/tickets/7", headers=form, content=b"a=1&_method=DELETE&b=2")
    f.request.method = "POST"
    ctx = route(f, services(CANON_CONNECTIONS))
    assert f.response is None and f.request.content == b"a=1&b=2" and ctx.action.method == "POST"
    multipart = [(b"host", b"api.example.com"), (b"content-type", b"multipart/form-data; boundary=xx")]
    body = b'--xx\r\nContent-Disposition: form-data; name="_method"\r\n\r\nDELETE\r\n--xx--\r\n'
    m = make_flow("api.example.com", path="/tickets/7", headers=multipart, content=body)
    m.request.method = "POST"
    route(m, services(CANON_CONNECTIONS))
    assert m.response.status_code == 400 and "_method" in json.loads(m.response.content)["message"]
    honor = make_flow("legacy.example.com", path="/tickets/7",
                      headers=[(b"host", b"legacy.example.com"), *form[1:]], content=b"_method=delete")
    honor.request.method = "POST"
    ctx = route(honor, services(CANON_CONNECTIONS))
    assert ctx.action.method == "DELETE" and honor.request.content == b"_method=delete"
    bad = make_flow("legacy.example.com", path="/tickets/7",
                    headers=[(b"host", b"legacy.example.com"), *form[1:]], content=b"_method=DEL+ETE")
    bad.request.method = "POST"
    route(bad, services(CANON_CONNECTIONS))
    assert bad.response.status_code == 400


def test_recording_settings_are_built_once_per_configuration_generation(monkeypatch):
    """A connection's spec.recording becomes RecordingSettings once per published spec, not
    per flow (issue 16); a new configuration brings new settings at the next flow."""
    from chaperone_sidecar.flowctx import RecordingSettings

    built = []
    original = RecordingSettings.from_spec.__func__
    monkeypatch.setattr(RecordingSettings, "from_spec",
                        classmethod(lambda cls, spec: built.append(spec) or original(cls, spec)))
    svc = services([{"metadata": {"name": "github"},
                     "spec": {"type": "http", "hosts": ["api.github.com"],
                              "recording": {"bodies": "none", "mode": "best-effort"}}}])
    addon = Route(svc)
    with taddons.context(addon):
        contexts = []
        for _ in range(3):
            f = make_flow("api.github.com", path="/repos/x/y")
            addon.requestheaders(f)
            contexts.append(flowctx.get(f))
        assert len(built) == 1
        assert {(c.recording.bodies, c.recording.mode) for c in contexts} == {("none", "best-effort")}
        svc.sources.publish({"connection_objs": [
            {"metadata": {"name": "github"},
             "spec": {"type": "http", "hosts": ["api.github.com"], "recording": {"maxBodyBytes": 7}}}],
            "policy_objs": [], "mounts": []})
        f = make_flow("api.github.com", path="/repos/x/y")
        addon.requestheaders(f)
    assert len(built) == 2
    assert flowctx.get(f).recording == RecordingSettings(max_body_bytes=7, mode="strict")
