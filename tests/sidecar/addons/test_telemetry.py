"""Telemetry: a span per flow and the sidecar's metrics, read back with the SDK's in-memory
exporter and reader; ``telemetry_setup`` configured from ``OTEL_*`` variables."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from chaperone_sidecar import flowctx
from chaperone_sidecar.addons.refusal import refuse
from chaperone_sidecar.addons.telemetry import Telemetry
from chaperone_sidecar.config import SidecarConfig
from chaperone_sidecar.metric_histograms import FlowHistograms, HistogramsReader
from chaperone_sidecar.policy.model import Action, Decision, Identity, RuleRef
from chaperone_sidecar.recording.spool import RecorderMetrics
from chaperone_sidecar.services import SidecarServices
from chaperone_sidecar.sources import Sources
from chaperone_sidecar.telemetry_setup import DEFAULT_SERVICE_NAME, SECONDS_BUCKETS, setup_telemetry

AGENT = Identity(service_account="team-a/claude", pod_namespace="team-a", pod_name="agent-0",
                 creator="alice", on_behalf_of="bob")


class HistogramsInMemoryReader(HistogramsReader, InMemoryMetricReader):
    pass


@pytest.fixture
def otel():
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    # the per-flow histograms as setup_telemetry wires them: aggregated by the sidecar,
    # carried by the reader (metric_histograms)
    resource = Resource.create({})
    histograms = FlowHistograms(resource, "test", SECONDS_BUCKETS)
    reader = HistogramsInMemoryReader()
    reader.attach(histograms)
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    recorder = SimpleNamespace(metrics=RecorderMetrics(backlog_bytes=4096, backlog_segments=2,
                                                       events_dropped=1))
    services = SidecarServices(config=SidecarConfig(standalone=True), sources=Sources("team-a"),
                               tracer=tracer_provider.get_tracer("test"),
                               meter=meter_provider.get_meter("test"), histograms=histograms,
                               approvals=SimpleNamespace(held=3), recorder=recorder)
    addon = Telemetry(services)
    with taddons.context(addon):
        yield SimpleNamespace(addon=addon, spans=spans, reader=reader, services=services)
    tracer_provider.shutdown()
    meter_provider.shutdown()


def make_flow(method=b"GET", content=b"", decision=None) -> http.HTTPFlow:
    f = tflow.tflow(req=tutils.treq(host="api.github.com", port=443, scheme=b"https", method=method,
                                    path=b"/repos/o/r?access_token=secret123",
                                    headers=http.Headers(host="api.github.com"), content=content))
    f.request.timestamp_start = time.time() - 0.25
    ctx = flowctx.ensure(f)
    ctx.identity, ctx.connection, ctx.connection_type = AGENT, "github", "http"
    ctx.action = Action("http", method.decode(), "https", "api.github.com", 443, "/repos/o/r",
                        name=f"http:{method.decode()}")
    ctx.decision = decision or Decision("allow", rule=RuleRef("team-a/github", "reads"))
    return f


def metric_points(reader) -> dict[str, list]:
    data = reader.get_metrics_data()
    out: dict[str, list] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                out.setdefault(metric.name, []).extend(metric.data.data_points)
    return out


def test_span_per_flow_with_identity_decision_bytes_and_latency(otel):
    t = otel.addon
    f = make_flow(method=b"POST", content=b"x" * 123,
                  decision=Decision("require_approval", rule=RuleRef("team-a/github", "ask")))
    ctx = flowctx.get(f)
    ctx.approval_request, ctx.approved_by, ctx.masked = "ar-1", ("carol",), {"jwt": 2}
    t.request(f)  # forwarded now
    time.sleep(0.02)
    f.response = http.Response.make(201, b"y" * 456, {"content-type": "application/json"})
    t.responseheaders(f)
    t.response(f)
    [span] = otel.spans.get_finished_spans()
    assert span.name == "http:POST" and span.kind == SpanKind.SERVER
    a = dict(span.attributes)
    assert a["chaperone.identity.service_account"] == "team-a/claude"
    assert a["chaperone.identity.creator"] == "alice" and a["chaperone.identity.on_behalf_of"] == "bob"
    assert a["chaperone.connection"] == "github" and a["chaperone.action"] == "http:POST"
    assert a["chaperone.decision"] == "require_approval" and a["chaperone.rule"] == "team-a/github#ask"
    assert a["chaperone.approval.name"] == "ar-1" and a["chaperone.approval.approved_by"] == ("carol",)
    assert a["chaperone.masked"] == 2 and a["chaperone.outcome"] == "forwarded"
    assert a["http.request.body.size"] == 123 and a["http.response.body.size"] == 456
    assert a["http.response.status_code"] == 201 and a["url.path"] == "/repos/o/r"
    assert not any("secret123" in str(v) for v in a.values())  # the query never lands in a span
    assert a["chaperone.upstream.latency_ms"] >= 20
    assert ctx.upstream_latency >= 0.02
    assert span.end_time - span.start_time >= 0.25e9  # the flow's own start time
    assert span.status.status_code == StatusCode.UNSET


def test_refused_and_failed_flows(otel):
    t = otel.addon
    blocked = make_flow(method=b"DELETE", decision=Decision("block", rule=RuleRef("team-a/github", "no")))
    refuse(blocked, "blocked", "no")
    t.request(blocked)
    t.responseheaders(blocked)
    t.response(blocked)
    failed = make_flow()
    t.request(failed)
    failed.error = tflow.terr("upstream reset")
    t.error(failed)
    t.error(failed)  # once per flow
    spans = {s.name: s for s in otel.spans.get_finished_spans()}
    assert len(otel.spans.get_finished_spans()) == 2
    assert spans["http:DELETE"].attributes["chaperone.refused"] == "chaperone_blocked"
    assert spans["http:DELETE"].attributes["chaperone.outcome"] == "blocked"
    assert "chaperone.upstream.latency_ms" not in spans["http:DELETE"].attributes  # never sent
    assert spans["http:GET"].status.status_code == StatusCode.ERROR
    assert spans["http:GET"].status.description == "upstream reset"


def test_streamed_bodies_are_counted_as_they_pass(otel):
    t = otel.addon
    f = make_flow(method=b"PUT")
    f.request.stream = True
    t.requestheaders(f)
    assert [c for part in (b"a" * 1000, b"b" * 24, b"") for c in f.request.stream(part)] == [b"a" * 1000, b"b" * 24]
    f.response = http.Response.make(200, b"", {"content-type": "text/event-stream"})
    f.response.stream = lambda data: [data.upper()] if data else []  # e.g. Mask's callable
    t.responseheaders(f)
    assert f.response.stream(b"data: x\n\n") == [b"DATA: X\n\n"]
    assert f.response.stream(b"") == []
    t.response(f)
    [span] = otel.spans.get_finished_spans()
    assert span.attributes["http.request.body.size"] == 1024
    assert span.attributes["http.response.body.size"] == 9


def test_metrics_requests_latency_pending_approvals_and_recording_backlog(otel):
    t = otel.addon
    for decision in ("allow", "allow", "require_approval"):
        f = make_flow(decision=Decision(decision))
        t.request(f)
        f.response = http.Response.make(200, b"ok")
        t.responseheaders(f)
        t.response(f)
    points = metric_points(otel.reader)
    by_decision = {p.attributes["chaperone.decision"]: p.value for p in points["chaperone.requests"]}
    assert by_decision == {"allow": 2, "require_approval": 1}
    assert sum(p.count for p in points["chaperone.request.duration"]) == 3
    assert min(p.min for p in points["chaperone.request.duration"]) >= 0.25
    assert sum(p.count for p in points["chaperone.upstream.duration"]) == 3
    assert [p.value for p in points["chaperone.approvals.pending"]] == [3]
    assert [p.value for p in points["chaperone.recording.backlog"]] == [4096]
    assert [p.value for p in points["chaperone.recording.backlog.segments"]] == [2]
    assert [p.value for p in points["chaperone.recording.dropped"]] == [1]
    otel.services.approvals.held = 0
    assert [p.value for p in metric_points(otel.reader)["chaperone.approvals.pending"]] == [0]


def test_without_services_telemetry_uses_the_api_no_ops():
    addon = Telemetry(SidecarServices(config=SidecarConfig(standalone=True), sources=Sources("ns")))
    with taddons.context(addon):
        f = make_flow()
        addon.request(f)
        f.response = http.Response.make(200, b"ok")
        addon.responseheaders(f)
        addon.response(f)  # no provider installed: nothing exported, nothing raised


# ---------------------------------------------------------------------------- setup from OTEL_*

class FakeExporter:
    made: list[str] = []
    endpoints: list[str] = []

    def __init__(self, endpoint=None, env=None):
        FakeExporter.made.append(type(self).__name__)
        FakeExporter.endpoints.append(endpoint)

    def export(self, batch, *args, **kwargs):
        from opentelemetry.sdk.metrics.export import MetricExportResult
        from opentelemetry.sdk.trace.export import SpanExportResult
        return SpanExportResult.SUCCESS if isinstance(batch, (list, tuple)) else MetricExportResult.SUCCESS

    def shutdown(self, *args, **kwargs):
        pass

    def force_flush(self, *args, **kwargs):
        return True


class FakeMetricExporter(FakeExporter):
    _preferred_temporality: dict = {}
    _preferred_aggregation: dict = {}


def fake_loader(installed):
    def load(module, cls):
        if not any(module.startswith(p) for p in installed):
            return None
        return FakeExporter if cls == "OTLPSpanExporter" else FakeMetricExporter
    return load


def test_no_endpoint_means_no_provider():
    setup = setup_telemetry({}, install_global=False, loader=fake_loader(["opentelemetry"]))
    assert not setup.tracing and not setup.metrics
    assert "traces: no OTEL_EXPORTER_OTLP_ENDPOINT" in setup.notes


def test_endpoint_without_an_exporter_package_means_no_provider():
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    setup = setup_telemetry(env, install_global=False)  # the real loader: no gRPC exporter here
    assert not setup.tracing and not setup.metrics
    assert "traces: opentelemetry-exporter-otlp-proto-grpc is not installed" in setup.notes


def test_spans_and_metrics_reach_a_real_otlp_http_endpoint():
    """The sidecar's own OTLP/HTTP exporters (no exporter package needed), against an OTLP/HTTP
    receiver that decodes what arrives."""
    import http.server
    import threading

    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    received: dict[str, list] = {"/v1/traces": [], "/v1/metrics": []}

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers["Content-Length"]))
            kind = {"/v1/traces": ExportTraceServiceRequest, "/v1/metrics": ExportMetricsServiceRequest}
            received[self.path].append(kind[self.path].FromString(body))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}"}
    setup = setup_telemetry(env, install_global=False, attributes={"k8s.pod.name": "agent-0"})
    try:
        assert setup.tracing and setup.metrics, setup.notes
        with setup.tracer().start_as_current_span("s3:ListBuckets") as span:
            span.set_attribute("chaperone.decision", "allow")
        setup.meter_provider.get_meter("t").create_counter("chaperone.requests").add(1, {"decision": "allow"})
    finally:
        setup.shutdown()  # flushes both signals
        server.shutdown()
    spans = [(sp.name, {a.key: a.value.string_value for a in sp.attributes})
             for req in received["/v1/traces"] for rs in req.resource_spans for ss in rs.scope_spans
             for sp in ss.spans]
    assert ("s3:ListBuckets", {"chaperone.decision": "allow"}) in spans
    resource = received["/v1/traces"][0].resource_spans[0].resource.attributes
    assert {a.key: a.value.string_value for a in resource}["k8s.pod.name"] == "agent-0"
    metrics = [m.name for req in received["/v1/metrics"] for rm in req.resource_metrics
               for sm in rm.scope_metrics for m in sm.metrics]
    assert "chaperone.requests" in metrics


def test_endpoint_and_exporter_give_batch_export_and_a_periodic_reader():
    FakeExporter.made = []
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    setup = setup_telemetry(env, install_global=False,
                            loader=fake_loader(["opentelemetry.exporter.otlp.proto.grpc"]),
                            attributes={"k8s.pod.name": "agent-0"})
    try:
        assert setup.tracing and setup.metrics
        processors = setup.tracer_provider._active_span_processor._span_processors
        assert [type(p) for p in processors] == [BatchSpanProcessor]
        assert FakeExporter.made == ["FakeExporter", "FakeMetricExporter"]
        assert FakeExporter.endpoints[-2:] == ["http://collector:4317"] * 2  # gRPC: as given
        resource = setup.tracer_provider.resource.attributes
        assert resource["service.name"] == DEFAULT_SERVICE_NAME and resource["k8s.pod.name"] == "agent-0"
        with setup.tracer().start_as_current_span("x"):
            pass
    finally:
        setup.shutdown()


@pytest.mark.parametrize("env, tracing, metrics", [
    ({"OTEL_SDK_DISABLED": "true"}, False, False),
    ({"OTEL_TRACES_EXPORTER": "none"}, False, True),
    ({"OTEL_METRICS_EXPORTER": "none"}, True, False),
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, False, False),
])
def test_standard_switches(env, tracing, metrics):
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", **env}
    setup = setup_telemetry(env, install_global=False, loader=fake_loader(["chaperone_sidecar.otlp_"]))
    try:
        assert (setup.tracing, setup.metrics) == (tracing, metrics)
    finally:
        setup.shutdown()


def test_mcp_calls_carry_the_mcp_and_gen_ai_attributes(otel):
    from chaperone_sidecar.policy.model import MCPAction, MCPCall

    f = make_flow(method=b"POST", content=b"{}")
    ctx = flowctx.get(f)
    ctx.connection_type = "mcp"
    call = MCPCall("tools/call", id="7", tool="delete_file", arguments='{"path":"/x"}')
    ctx.action = Action("mcp", "POST", "https", "api.github.com", 443, "/mcp", name="mcp:tools/call",
                        mcp=MCPAction(calls=(call,), session_id="s3cr3t", protocol_version="2025-06-18"))
    otel.addon.request(f)
    f.response = http.Response.make(200, b"{}", {"content-type": "application/json"})
    otel.addon.response(f)
    [span] = otel.spans.get_finished_spans()
    a = dict(span.attributes)
    assert a["mcp.method.name"] == "tools/call" and a["gen_ai.tool.name"] == "delete_file"
    assert a["gen_ai.operation.name"] == "execute_tool" and a["jsonrpc.request.id"] == "7"
    assert a["mcp.protocol.version"] == "2025-06-18"
    assert not any("s3cr3t" in str(v) for v in a.values())


# ============================================================================ semantic conventions

def _chat_flow(stream: bool) -> http.HTTPFlow:
    from chaperone_sidecar.policy.model import AnthropicAction

    f = tflow.tflow(req=tutils.treq(host="api.anthropic.com", port=443, scheme=b"https",
                                    method=b"POST", path=b"/v1/messages",
                                    headers=http.Headers(host="api.anthropic.com"),
                                    content=b'{"model":"claude-x","messages":[{"role":"user","content":"PROMPT-SECRET"}]}'))
    ctx = flowctx.ensure(f)
    ctx.identity, ctx.connection, ctx.connection_type = AGENT, "claude", "anthropic"
    ctx.action = Action("anthropic", "POST", "https", "api.anthropic.com", 443, "/v1/messages",
                        name="anthropic:messages", anthropic=AnthropicAction(model="claude-x", stream=stream))
    ctx.decision = Decision("allow")
    return f


SSE_ANSWER = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_01","type":"message",'
    b'"role":"assistant","model":"claude-x-20261001","content":[],"stop_reason":null,'
    b'"usage":{"input_tokens":25,"output_tokens":1}}}\n\n'
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
    b'"content_block":{"type":"text","text":""}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"COMPLETION-SECRET"}}\n\n'
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},'
    b'"usage":{"output_tokens":15}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n')


@pytest.mark.parametrize("chunk", [1, 7, 64, len(SSE_ANSWER)])
def test_streamed_anthropic_answer_gives_genai_span_without_content(otel, chunk):
    t = otel.addon
    f = _chat_flow(stream=True)
    t.request(f)
    f.response = http.Response.make(200, b"", {"content-type": "text/event-stream; charset=utf-8"})
    f.response.stream = True
    t.responseheaders(f)
    out = b"".join(c for i in range(0, len(SSE_ANSWER), chunk)
                   for c in f.response.stream(SSE_ANSWER[i:i + chunk]))
    assert out == SSE_ANSWER  # the tap only reads
    t.response(f)
    [span] = otel.spans.get_finished_spans()
    a = dict(span.attributes)
    assert span.name == "chat claude-x"
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "anthropic"
    assert a["gen_ai.system"] == "anthropic" and a["gen_ai.request.model"] == "claude-x"
    assert a["gen_ai.response.model"] == "claude-x-20261001" and a["gen_ai.response.id"] == "msg_01"
    assert a["gen_ai.usage.input_tokens"] == 25 and a["gen_ai.usage.output_tokens"] == 15
    assert a["gen_ai.response.finish_reasons"] == ("end_turn",)
    assert not any("SECRET" in str(v) for v in a.values())


def test_buffered_anthropic_answer_gives_genai_span(otel):
    t = otel.addon
    f = _chat_flow(stream=False)
    t.request(f)
    f.response = http.Response.make(200, (
        b'{"id":"msg_02","type":"message","model":"claude-x-20261001","role":"assistant",'
        b'"content":[{"type":"text","text":"COMPLETION-SECRET"}],"stop_reason":"tool_use",'
        b'"usage":{"input_tokens":10,"output_tokens":3}}'), {"content-type": "application/json"})
    t.responseheaders(f)
    t.response(f)
    [span] = otel.spans.get_finished_spans()
    a = dict(span.attributes)
    assert a["gen_ai.response.id"] == "msg_02" and a["gen_ai.response.finish_reasons"] == ("tool_use",)
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (10, 3)
    assert not any("SECRET" in str(v) for v in a.values())


def test_aws_and_kubernetes_conventions_and_url_full_without_secrets(otel):
    from chaperone_sidecar.policy.model import AWSAction, KubernetesAction

    t = otel.addon
    f = make_flow()
    f.request.path = "/b/key?X-Amz-Signature=abc123&x=1"
    ctx = flowctx.get(f)
    ctx.connection_type = "aws"
    ctx.action = Action("aws", "GET", "https", "s3.amazonaws.com", 443, "/b/key", name="s3:GetObject",
                        aws=AWSAction("s3", "us-east-1", "GetObject", "rest-xml", ("b/key",)))
    t.request(f)
    f.response = http.Response.make(200, b"ok")
    t.response(f)
    k = make_flow()
    flowctx.get(k).action = Action(
        "kubernetes", "DELETE", "https", "k8s", 443, "/api/v1/namespaces/prod/pods/web-0",
        name="kubernetes:delete/pods",
        kubernetes=KubernetesAction(verb="delete", resource="pods", namespace="prod", name="web-0"))
    t.request(k)
    k.response = http.Response.make(200, b"{}")
    t.response(k)
    spans = {s.name: dict(s.attributes) for s in otel.spans.get_finished_spans()}
    aws = spans["s3:GetObject"]
    assert (aws["rpc.system"], aws["rpc.service"], aws["rpc.method"], aws["aws.s3.bucket"]) == \
        ("aws-api", "s3", "GetObject", "b")
    assert aws["url.full"] == "https://api.github.com/b/key?X-Amz-Signature=[REDACTED]&x=1"
    kube = spans["kubernetes:delete/pods"]
    assert kube["k8s.namespace.name"] == "prod" and kube["k8s.pod.name"] == "web-0"


def test_url_full_gets_the_decisions_detectors_like_the_recording(otel):
    """A secret in the path (where no query redaction reaches) is masked on the span when the
    decision masks it - the span never holds more than the recording."""
    from chaperone_sidecar.policy.model import MaskSpec

    t = otel.addon
    f = make_flow(decision=Decision("allow", masks=(MaskSpec(detectors=("aws-access-key-id",)),)))
    f.request.path = "/repos/AKIAIOSFODNN7EXAMPLE/r"
    t.request(f)
    f.response = http.Response.make(200, b"ok")
    t.response(f)
    [span] = otel.spans.get_finished_spans()
    assert "AKIAIOSFODNN7EXAMPLE" not in span.attributes["url.full"]
    assert "[MASKED:aws-access-key-id]" in span.attributes["url.full"]


def test_url_full_and_host_reuse_what_the_recording_worked_out(otel, monkeypatch):
    """When Record worked the URL out for the request event (flow_events.recorded_url), the
    span takes it from the flow's context - the Host parse and the URL's masking are not done
    a second time (issue 16) - and worked out again when the flow changed since (here: the
    decision's masks), so the span still has what the recording of this request has."""
    from chaperone_sidecar.policy.masking.masker import Masker
    from chaperone_sidecar.policy.model import MaskSpec
    from chaperone_sidecar.recording import flow_events

    t = otel.addon
    masks = (MaskSpec(detectors=("aws-access-key-id",)),)
    f = make_flow(decision=Decision("allow", masks=masks))
    f.request.path = "/repos/AKIAIOSFODNN7EXAMPLE/r?access_token=secret123"
    ctx = flowctx.get(f)
    recorded = flow_events.recorded_url(f.request, ctx)  # what Record does for the request event
    scans = []
    original = Masker.mask_str
    monkeypatch.setattr(Masker, "mask_str", lambda self, text: scans.append(text) or original(self, text))
    t.request(f)
    f.response = http.Response.make(200, b"ok")
    t.response(f)
    [span] = otel.spans.get_finished_spans()
    assert scans == []  # the URL was not masked again
    assert span.attributes["url.full"] == recorded.url == \
        "https://api.github.com/repos/[MASKED:aws-access-key-id]/r?access_token=[REDACTED]"
    assert span.attributes["server.address"] == recorded.host == "api.github.com"

    f2 = make_flow(decision=Decision("allow", masks=masks))
    flow_events.recorded_url(f2.request, flowctx.get(f2))
    flowctx.get(f2).decision = Decision("allow")  # judged again since: no masks now
    f2.request.path = "/repos/AKIAIOSFODNN7EXAMPLE/r"
    t.request(f2)
    f2.response = http.Response.make(200, b"ok")
    t.response(f2)
    assert otel.spans.get_finished_spans()[-1].attributes["url.full"] == \
        "https://api.github.com/repos/AKIAIOSFODNN7EXAMPLE/r"


def test_recorded_url_is_worked_out_again_when_its_source_changed():
    from chaperone_sidecar.policy.model import MaskSpec
    from chaperone_sidecar.recording.flow_events import recorded_url

    f = make_flow(decision=Decision("allow", masks=(MaskSpec(detectors=("aws-access-key-id",)),)))
    ctx = flowctx.get(f)
    first = recorded_url(f.request, ctx)
    assert recorded_url(f.request, ctx) is first
    f.request.headers["host"] = "other.example:8443"
    second = recorded_url(f.request, ctx)
    assert (second.host, second.url) == (f.request.pretty_host, "https://other.example:8443/repos/o/r?access_token=[REDACTED]")
    f.request.path = "/AKIAIOSFODNN7EXAMPLE"
    assert recorded_url(f.request, ctx).url == "https://other.example:8443/[MASKED:aws-access-key-id]"


def test_genai_content_is_opt_in_and_only_the_masked_capture(otel):
    """Off by default; on, the attributes come from Mask's captures (what the recording
    stores), never from the wire body - here the wire says PROMPT-SECRET, the capture masked it."""
    from chaperone_sidecar.flowctx import BodyCapture

    def run(capture: bool):
        otel.addon.capture_content = capture
        f = _chat_flow(stream=False)
        ctx = flowctx.get(f)
        masked = BodyCapture(1 << 20)
        masked.set(b'{"model":"claude-x","messages":[{"role":"user","content":"[MASKED:jwt]"}]}')
        ctx.bodies["request"] = masked
        otel.addon.request(f)
        f.response = http.Response.make(200, b'{"type":"message","role":"assistant","content":[]}',
                                        {"content-type": "application/json"})
        otel.addon.response(f)
        return dict(otel.spans.get_finished_spans()[-1].attributes)

    off = run(False)
    assert not any(k.startswith("gen_ai.input") or k.startswith("gen_ai.output") for k in off)
    on = run(True)
    assert json.loads(on["gen_ai.input.messages"]) == [
        {"role": "user", "parts": [{"type": "text", "content": "[MASKED:jwt]"}]}]
    assert "PROMPT-SECRET" not in json.dumps(on)
    assert "gen_ai.output.messages" not in on  # no response capture: nothing recorded, nothing here


def test_anthropic_cache_tokens_count_as_input_as_the_conventions_say():
    from chaperone_sidecar.addons.telemetry import genai_response

    out = genai_response({"id": "m", "usage": {"input_tokens": 10, "cache_read_input_tokens": 50,
                                               "cache_creation_input_tokens": 25, "output_tokens": 3}})
    assert out["gen_ai.usage.input_tokens"] == 85
    assert out["gen_ai.usage.cache_read.input_tokens"] == 50
    assert out["gen_ai.usage.cache_creation.input_tokens"] == 25
    assert genai_response({"usage": {"input_tokens": True}}) == {}  # a bool is no count


def test_mcp_span_name_and_aws_request_ids(otel):
    from chaperone_sidecar.policy.model import AWSAction, MCPAction, MCPCall

    t = otel.addon
    f = make_flow(method=b"POST")
    flowctx.get(f).action = Action("mcp", "POST", "https", "mcp.example", 443, "/mcp",
                                   name="mcp:tools/call", mcp=MCPAction(calls=(
                                       MCPCall("tools/call", id="7", tool="get_weather"),)))
    t.request(f)
    f.response = http.Response.make(200, b"{}")
    t.response(f)
    a = make_flow()
    flowctx.get(a).action = Action("aws", "GET", "https", "s3.amazonaws.com", 443, "/",
                                   name="s3:ListBuckets",
                                   aws=AWSAction("s3", "us-east-1", "ListBuckets", "rest-xml"))
    t.request(a)
    a.response = http.Response.make(200, b"<x/>", {"x-amz-request-id": "RID1", "x-amz-id-2": "EXT2"})
    t.response(a)
    spans = {s.name: dict(s.attributes) for s in otel.spans.get_finished_spans()}
    assert spans["tools/call get_weather"]["jsonrpc.request.id"] == "7"
    aws = spans["s3:ListBuckets"]
    assert (aws["rpc.system.name"], aws["aws.request_id"], aws["aws.extended_request_id"]) == \
        ("aws-api", "RID1", "EXT2")


# ---------------------------------------------------------------- issue 16: the cheaper hot path

def test_span_attributes_of_a_plain_flow_in_full(otel):
    """Every attribute of an ordinary flow, exactly (the per-request shortcuts of issue 16 - one
    Host parse, the counter kept by the addon - change no attribute)."""
    t = otel.addon
    f = make_flow()
    t.request(f)
    f.response = http.Response.make(200, b"z" * 10)
    t.responseheaders(f)
    t.response(f)
    [span] = otel.spans.get_finished_spans()
    a = dict(span.attributes)
    latency = a.pop("chaperone.upstream.latency_ms")
    assert isinstance(latency, float) and latency >= 0
    assert a == {
        "chaperone.decision": "allow", "chaperone.outcome": "forwarded", "chaperone.connection": "github",
        "chaperone.identity.service_account": "team-a/claude", "chaperone.identity.pod": "team-a/agent-0",
        "chaperone.identity.creator": "alice", "chaperone.identity.on_behalf_of": "bob",
        "chaperone.connection.type": "http", "chaperone.action": "http:GET",
        "chaperone.rule": "team-a/github#reads", "http.request.method": "GET", "url.scheme": "https",
        "server.address": "api.github.com", "server.port": 443, "url.path": "/repos/o/r",
        "url.full": "https://api.github.com/repos/o/r?access_token=[REDACTED]",
        "network.protocol.version": "1.1", "http.request.body.size": 0,
        "http.response.status_code": 200, "http.response.body.size": 10}


@pytest.mark.parametrize("build", [
    lambda: tutils.treq(host="10.0.0.1", port=8443, scheme=b"https", path=b"/a?b=c",
                        headers=http.Headers(host="api.example.com:8443")),
    lambda: tutils.treq(host="10.0.0.1", port=443, scheme=b"https", headers=http.Headers(host="api.example.com")),
    lambda: tutils.treq(host="10.0.0.1", port=80, scheme=b"http", headers=http.Headers(host="[::1]:8080")),
    lambda: tutils.treq(host="example.org", port=80, scheme=b"http", headers=http.Headers()),
    lambda: tutils.treq(host="example.org", port=443, scheme=b"https", headers=http.Headers(host="")),
    lambda: tutils.treq(host="10.0.0.1", port=443, scheme=b"https", headers=http.Headers(host="bad host:x")),
    lambda: tutils.treq(host="10.0.0.1", port=443, scheme=b"https", headers=http.Headers(host="h" * 300)),
    lambda: tutils.treq(method=b"CONNECT", host="example.org", port=443, scheme=b"", path=b"",
                        authority=b"example.org:443", headers=http.Headers(host="example.org:443")),
    lambda: tutils.treq(host="10.0.0.1", port=443, scheme=b"https", http_version=b"HTTP/2.0",
                        authority=b"h2.example.com", headers=http.Headers()),
])
def test_pretty_host_and_url_as_mitmproxy(build):
    from chaperone_sidecar.recording.flow_events import pretty_host_url as _pretty_host_url

    for _ in range(2):  # cold and cached
        req = build()
        assert _pretty_host_url(req) == (req.pretty_host, req.pretty_url)


def test_requests_counter_has_the_counter_type_and_an_overflow_series(otel, monkeypatch):
    from chaperone_sidecar.addons import telemetry as module

    monkeypatch.setattr(module, "_MAX_SERIES", 2)
    t = otel.addon
    for conn in ("a", "b", "c", "d", "a"):
        f = make_flow()
        flowctx.get(f).connection = conn
        f.response = http.Response.make(200, b"")
        t.response(f)
    data = otel.reader.get_metrics_data()
    [metric] = [m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
                if m.name == "chaperone.requests"]
    assert metric.data.is_monotonic and metric.unit == "{request}"
    got = {p.attributes.get("chaperone.connection", "overflow"): p.value for p in metric.data.data_points}
    assert got == {"a": 2, "b": 1, "overflow": 2}
    assert [p.attributes for p in metric.data.data_points
            if "chaperone.connection" not in p.attributes] == [{"otel.metric.overflow": True}]
    f = make_flow()
    flowctx.get(f).connection = "b"
    t.response(f)
    got = {p.attributes.get("chaperone.connection", "overflow"): p.value
           for p in metric_points(otel.reader)["chaperone.requests"]}
    assert got == {"a": 2, "b": 2, "overflow": 2}  # cumulative
