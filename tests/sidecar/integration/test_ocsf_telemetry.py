"""OCSF export and GenAI spans of a real sidecar process, driven by the official Anthropic SDK.

The sidecar is injected with the operator's settings (``ocsf.file``/``s3Prefix``/``otlpEndpoint``
and the OTLP endpoint become its ``CHAPERONE_OCSF_*`` and ``OTEL_EXPORTER_OTLP_ENDPOINT``), in
front of the streaming Messages upstream of test_sdk_streams. A real OTLP/HTTP receiver in the
test decodes what the sidecar's exporters send (``ExportTraceServiceRequest`` for the spans,
``ExportLogsServiceRequest`` for the OCSF log records, with opentelemetry-proto); the OCSF file
is read back from the sidecar's volume and the S3 objects from the test bed's S3 server, and
every event is validated against the vendored OCSF 1.8.0 API Activity schema.
"""

from __future__ import annotations

import json
import sys
import textwrap
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import jsonschema
import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from chaperone_operator.injection.settings import InjectionSettings
from chaperone_sidecar import contract as c

from .pod import InjectedPod, connection, free_port, policy, setup_namespace, wait_for
from .test_sdk_streams import API_KEY, HALVES, HOST, SSEUpstream, run

SCHEMA = json.loads((Path(__file__).parents[1] / "recording" / "ocsf" /
                     "api_activity-1.8.0.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


class Collector:
    """An OTLP/HTTP receiver: /v1/traces and /v1/logs decoded, /v1/metrics accepted."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.logs: list[dict[str, Any]] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/v1/traces":
                    msg = ExportTraceServiceRequest()
                    msg.ParseFromString(body)
                    for rs in msg.resource_spans:
                        for ss in rs.scope_spans:
                            for span in ss.spans:
                                collector.spans.append({"name": span.name, "attributes": {
                                    a.key: _value(a.value) for a in span.attributes}})
                elif self.path == "/v1/logs":
                    msg = ExportLogsServiceRequest()
                    msg.ParseFromString(body)
                    for rl in msg.resource_logs:
                        for sl in rl.scope_logs:
                            for rec in sl.log_records:
                                collector.logs.append({"event_name": rec.event_name,
                                                       "body": _value(rec.body)})
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


CLIENT = textwrap.dedent("""
    import json, sys, anthropic
    client = anthropic.Anthropic(base_url=sys.argv[1], api_key="agent-placeholder", max_retries=0)
    with client.messages.stream(model="claude-test", max_tokens=64,
                                messages=[{"role": "user", "content": "PROMPT-TEXT-7"}]) as stream:
        message = stream.get_final_message()
    try:
        client.models.list()
        blocked = None
    except anthropic.PermissionDeniedError as exc:
        blocked = exc.body["error"]
    print(json.dumps({"usage": message.usage.output_tokens, "blocked": blocked}))
""")


@pytest.fixture(scope="module")
def stopped_pod(control_plane, crds_installed, s3_server, tmp_path_factory):
    """The sidecar after one streamed chat and one blocked call, stopped (exports flushed)."""
    root = tmp_path_factory.mktemp("ocsf")
    upstream = SSEUpstream(root / "upstream")
    collector = Collector()
    s3 = boto3.client("s3", **s3_server.client_kwargs())
    bucket = f"recordings-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    ns = f"ocsf-{uuid.uuid4().hex[:8]}"
    conns = [connection("claude", {"type": "anthropic", "hosts": [HOST],
                                   "credentials": {"source": "secret", "secretRef": {
                                       "name": "claude-key", "tokenKey": "token"}},
                                   "upstreamCA": {"kind": "ConfigMap", "name": "claude-ca", "key": "ca.crt"}})]
    policies = [policy("claude", {"connections": ["claude"], "defaultEffect": "allow", "rules": [
        {"name": "no-model-listing", "match": {"methods": ["GET"]},
         "block": {"message": "agents do not list models"}}],
        "masking": {"detectors": ["aws-access-key-id", "aws-secret-key"]}})]
    setup_namespace(control_plane, ns, conns + policies)
    settings = InjectionSettings(
        proxy_port=free_port(), health_port=free_port(), s3_bucket=bucket,
        s3_endpoint=s3_server.endpoint_url, s3_region=s3_server.region,
        sidecar_secret="chaperone-sidecar", otel_endpoint=collector.url,
        ocsf_file=f"{c.SPOOL_DIR}/ocsf.jsonl", ocsf_s3_prefix="ocsf",
        ocsf_otlp_endpoint=f"{collector.url}/v1/logs")
    sidecar = InjectedPod(
        control_plane, ns, root / "pod", connections=conns, settings=settings, mode="explicit",
        secrets={"claude-key": {"token": API_KEY},
                 "chaperone-sidecar": {"AWS_ACCESS_KEY_ID": s3_server.access_key,
                                       "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}},
        configmaps={"claude-ca": {"ca.crt": upstream.ca_file.read_bytes()}})
    sidecar.start()
    try:
        sidecar.wait_ready()
        got = run([sys.executable, "-c", CLIENT, upstream.url], sidecar.agent_env())
    finally:
        code = sidecar.stop()
        upstream.close()
    assert code == 0, sidecar.logs()
    yield sidecar, collector, got, s3, bucket
    collector.close()


def _ocsf_file(sidecar: InjectedPod) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (sidecar.spool_dir / "ocsf.jsonl").read_text().splitlines()]


def test_the_ocsf_file_holds_valid_allowed_and_blocked_events(stopped_pod):
    sidecar, _, got, _, _ = stopped_pod
    assert got == {"usage": 42, "blocked": "chaperone_blocked"}, got
    events = _ocsf_file(sidecar)
    for event in events:
        errors = [f"{list(e.path)}: {e.message}" for e in VALIDATOR.iter_errors(event)]
        assert not errors, (errors, event)
    by_op = {e["api"]["operation"]: e for e in events}
    chat = by_op["anthropic:messages"]
    assert (chat["activity_id"], chat["disposition_id"], chat["status_id"]) == (1, 1, 1)
    assert chat["actor"]["user"]["name"] == "alice"
    assert chat["src_endpoint"]["name"] == "agent-0"
    assert chat["dst_endpoint"]["svc_name"] == "claude"
    assert chat["metadata"]["correlation_uid"]  # the recording session
    blocked = [e for e in events if e["disposition_id"] == 2]
    assert len(blocked) == 1 and blocked[0]["activity_id"] == 2  # a GET: read
    assert blocked[0]["policy"]["data"]["rule"] == "no-model-listing"
    assert blocked[0]["status_detail"] == "chaperone_blocked"
    text = (sidecar.spool_dir / "ocsf.jsonl").read_text()
    for secret in (API_KEY, "PROMPT-TEXT-7", *HALVES):  # credential, prompt, masked secrets
        assert secret not in text


def test_the_same_events_reach_otlp_logs_and_s3(stopped_pod):
    sidecar, collector, _, s3, bucket = stopped_pod
    uids = sorted(e["metadata"]["uid"] for e in _ocsf_file(sidecar))
    wait_for(lambda: len(collector.logs) >= len(uids), 10, "the OCSF log records")
    assert {r["event_name"] for r in collector.logs} == {"ocsf.api_activity"}
    assert sorted(r["body"]["metadata"]["uid"] for r in collector.logs) == uids
    for record in collector.logs:
        assert not list(VALIDATOR.iter_errors(record["body"]))
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="ocsf/").get("Contents", [])]
    assert keys and all(k.startswith(f"ocsf/{sidecar.namespace}/agent-0/") for k in keys), keys
    shipped = [json.loads(line) for k in keys
               for line in s3.get_object(Bucket=bucket, Key=k)["Body"].read().splitlines()]
    assert sorted(e["metadata"]["uid"] for e in shipped) == uids


def test_the_chat_span_follows_the_genai_conventions(stopped_pod):
    _, collector, _, _, _ = stopped_pod
    wait_for(lambda: any(s["name"].startswith("chat") for s in collector.spans), 10, "the chat span")
    [chat] = [s for s in collector.spans if s["name"].startswith("chat")]
    a = chat["attributes"]
    assert chat["name"] == "chat claude-test"
    assert (a["gen_ai.operation.name"], a["gen_ai.provider.name"], a["gen_ai.request.model"]) == \
        ("chat", "anthropic", "claude-test")
    assert (a["gen_ai.response.id"], a["gen_ai.response.model"]) == ("msg_01", "claude-test")
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (12, 42)
    assert a["gen_ai.response.finish_reasons"] == ["tool_use"]
    assert a["url.full"].startswith(f"https://{HOST}:") and a["server.address"] == HOST
    blob = json.dumps(collector.spans)
    for secret in (API_KEY, "PROMPT-TEXT-7", *HALVES):
        assert secret not in blob
