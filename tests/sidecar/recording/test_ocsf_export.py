"""OCSF export: the bounded queue and thread, and each sink against the real thing - a file, the
test bed's S3 server (moto) through the recording's AioS3Store, and an OTLP/HTTP receiver that
decodes ExportLogsServiceRequest with opentelemetry-proto."""

from __future__ import annotations

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import jsonschema
import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

from chaperone_sidecar.recording.ocsf_export import FileSink, OcsfExporter, OtlpLogSink, S3Sink, exporter_from_env
from chaperone_sidecar.recording.s3http import AioS3Store

SCHEMA = json.loads((Path(__file__).parent / "ocsf" / "api_activity-1.8.0.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def flow_events(flow: str, status: int = 200) -> list[dict]:
    ident = {"namespace": "ns", "pod": "agent-0", "serviceAccount": "sa"}
    return [{"type": "request", "flow": flow, "identity": ident, "time": "2026-12-04T18:00:00.000000Z",
             "session": "sess-1", "seq": 1,
             "data": {"method": "GET", "url": "https://api.example.com/x", "connectionType": "http",
                      "action": {"name": "http:GET", "summary": "GET /x"}, "headers": []}},
            {"type": "response", "flow": flow, "identity": ident, "time": "2026-12-04T18:00:00.100000Z",
             "session": "sess-1", "seq": 2, "data": {"status": status}}]


def test_file_sink_gets_valid_events(tmp_path):
    exporter = OcsfExporter([FileSink(tmp_path / "sub" / "ocsf.jsonl")], tick_seconds=0.05)
    exporter.start()
    for i in range(5):
        exporter.submit(flow_events(f"f{i}"))
    exporter.close()
    lines = (tmp_path / "sub" / "ocsf.jsonl").read_text().splitlines()
    assert [json.loads(x)["metadata"]["uid"] for x in lines] == [f"f{i}" for i in range(5)]
    for line in lines:
        assert not list(VALIDATOR.iter_errors(json.loads(line)))
    assert (tmp_path / "sub" / "ocsf.jsonl").stat().st_mode & 0o777 == 0o600
    assert exporter.metrics()["exported"] == 5


def test_a_stuck_sink_never_blocks_submit_and_drops_are_counted(tmp_path):
    release = threading.Event()

    class Stuck:
        name = "stuck"

        def write(self, events, lines):
            release.wait(10)

        def tick(self, now):
            pass

        def close(self):
            pass

    exporter = OcsfExporter([Stuck()], queue_size=2, tick_seconds=0.05)
    exporter.start()
    started = time.monotonic()
    for i in range(50):
        exporter.submit(flow_events(f"f{i}"))
    assert time.monotonic() - started < 0.5  # no wait on the stuck sink
    assert exporter.metrics()["dropped"] >= 2 * 45
    release.set()
    exporter.close()


def test_the_export_thread_yields_to_the_event_loop():
    # SCHED_BATCH (helper_threads): a submitted batch wakes it without preempting the loop.
    policies: list[int] = []

    class Probe:
        name = "probe"

        def write(self, events, lines):
            policies.append(os.sched_getscheduler(0))

        def tick(self, now):
            pass

        def close(self):
            pass

    exporter = OcsfExporter([Probe()], tick_seconds=0.05)
    exporter.start()
    exporter.submit(flow_events("f0"))
    exporter.close()
    assert policies == [os.SCHED_BATCH]
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


def test_unsealed_events_are_stamped_with_a_time(tmp_path):
    exporter = OcsfExporter([FileSink(tmp_path / "o.jsonl")])
    events = flow_events("f1")
    for e in events:
        del e["time"]
    exporter.submit(events)
    exporter.start()
    exporter.close()
    [line] = (tmp_path / "o.jsonl").read_text().splitlines()
    assert json.loads(line)["time"] > 1_700_000_000_000


def test_s3_sink_ships_batches_to_the_bucket(s3_server):
    kwargs = s3_server.client_kwargs()
    boto = boto3.client("s3", **kwargs)
    boto.create_bucket(Bucket="ocsf-export")
    store = AioS3Store("ocsf-export", prefix="rec", endpoint_url=kwargs["endpoint_url"],
                       region_name="us-east-1", aws_access_key_id=kwargs["aws_access_key_id"],
                       aws_secret_access_key=kwargs["aws_secret_access_key"])
    sink = S3Sink(store, "siem/ocsf", namespace="ns", pod="agent-0", session="sess-1",
                  batch_bytes=1500, interval=3600)
    exporter = OcsfExporter([sink], tick_seconds=0.05)
    exporter.start()
    for i in range(6):
        exporter.submit(flow_events(f"f{i}"))
    exporter.close()
    keys = sorted(o["Key"] for o in boto.list_objects_v2(Bucket="ocsf-export")["Contents"])
    assert len(keys) >= 2 and all(k.startswith("rec/siem/ocsf/ns/agent-0/sess-1/ocsf-") for k in keys)
    uids = []
    for key in keys:
        for line in boto.get_object(Bucket="ocsf-export", Key=key)["Body"].read().splitlines():
            event = json.loads(line)
            assert not list(VALIDATOR.iter_errors(event))
            uids.append(event["metadata"]["uid"])
    assert uids == [f"f{i}" for i in range(6)]


def test_s3_sink_keeps_a_failed_batch_for_the_next_try():
    class Flaky:
        def __init__(self):
            self.fail, self.puts = True, []

        async def put(self, key, data, *, sha256, content_type):
            if self.fail:
                raise OSError("S3 down")
            self.puts.append((key, data))

    store = Flaky()
    sink = S3Sink(store, "p", namespace="ns", pod="p", session="s", batch_bytes=10)
    sink.write([], [b"line-1\n"])
    assert sink.buffer == [b"line-1\n"] and not store.puts
    store.fail = False
    sink.write([], [b"line-2\n"])
    assert store.puts == [("p/ns/p/s/ocsf-000000.jsonl", b"line-1\nline-2\n")]
    sink.close()


class _Receiver(BaseHTTPRequestHandler):
    received: list[ExportLogsServiceRequest] = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        msg = ExportLogsServiceRequest()
        msg.ParseFromString(body)
        type(self).received.append((self.path, self.headers.get("Content-Type"), msg))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def _value(any_value):
    kind = any_value.WhichOneof("value")
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in any_value.kvlist_value.values}
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind)


@pytest.fixture
def otlp_receiver():
    _Receiver.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/logs", _Receiver.received
    server.shutdown()


def test_otlp_sink_sends_ocsf_log_records(otlp_receiver):
    endpoint, received = otlp_receiver
    exporter = OcsfExporter([OtlpLogSink(endpoint, resource={"k8s.pod.name": "agent-0"})],
                            tick_seconds=0.05)
    exporter.start()
    exporter.submit(flow_events("f1"))
    exporter.submit(flow_events("f2", status=500))
    exporter.close()
    assert received and all(path == "/v1/logs" and ctype == "application/x-protobuf"
                            for path, ctype, _ in received)
    records, resources = [], []
    for _, _, msg in received:
        for rl in msg.resource_logs:
            resources.append({a.key: _value(a.value) for a in rl.resource.attributes})
            for sl in rl.scope_logs:
                records.extend(sl.log_records)
    assert resources[0]["k8s.pod.name"] == "agent-0"
    assert [r.event_name for r in records] == ["ocsf.api_activity"] * 2
    bodies = [_value(r.body) for r in records]
    assert [b["metadata"]["uid"] for b in bodies] == ["f1", "f2"]
    for body in bodies:
        assert not list(VALIDATOR.iter_errors(body))
    assert bodies[1]["status_id"] == 2
    attrs = {a.key: _value(a.value) for a in records[0].attributes}
    assert attrs == {"ocsf.class_uid": 6003, "ocsf.activity_id": 2}


def test_exporter_from_env(tmp_path):
    assert exporter_from_env({}) is None
    exporter = exporter_from_env({"CHAPERONE_OCSF_FILE": str(tmp_path / "o.jsonl"),
                                  "CHAPERONE_OCSF_S3_PREFIX": "siem", "CHAPERONE_OCSF_QUEUE": "7"})
    assert exporter is not None
    assert [s.name for s in exporter.sinks] == ["file"]  # no bucket: the S3 sink is refused
    assert exporter.queue.maxsize == 7
    exporter.close()


def test_file_sink_rotates_and_bounds_the_disk(tmp_path):
    """The file shares the spool volume: it must not grow without bound."""
    path = tmp_path / "o.jsonl"
    sink = FileSink(path, max_bytes=5000)
    exporter = OcsfExporter([sink], tick_seconds=0.05)
    exporter.start()
    for i in range(40):
        exporter.submit(flow_events(f"f{i}"))
    exporter.close()
    rotated = tmp_path / "o.jsonl.1"
    assert rotated.exists() and path.stat().st_size <= 5000 + 2500
    assert path.stat().st_size + rotated.stat().st_size <= 2 * (5000 + 2500)
    last = [json.loads(x)["metadata"]["uid"] for x in path.read_text().splitlines()]
    assert last[-1] == "f39"  # the newest events are kept
    reopened = FileSink(path, max_bytes=5000)  # a restart appends, counting what is there
    assert reopened.size == path.stat().st_size
    reopened.close()
