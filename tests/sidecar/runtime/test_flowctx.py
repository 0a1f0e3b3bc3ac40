"""FlowContext construction (issue 16: once per flow, on the hot path)."""

from __future__ import annotations

import dataclasses

from chaperone_sidecar.flowctx import FlowContext, RecordingSettings
from chaperone_sidecar.policy.model import Identity


def test_defaults_are_the_empty_identity_and_the_crd_recording_settings():
    ctx = FlowContext()
    assert ctx.identity == Identity() and ctx.recording == RecordingSettings()


def test_frozen_defaults_are_shared_and_mutable_state_is_per_flow():
    a, b = FlowContext(), FlowContext()
    # frozen: one instance serves every context (cannot be changed through one of them)
    assert a.identity is b.identity and a.recording is b.recording
    assert dataclasses.fields(Identity) and Identity.__dataclass_params__.frozen  # type: ignore[attr-defined]
    assert RecordingSettings.__dataclass_params__.frozen  # type: ignore[attr-defined]
    for name in ("masked", "bodies", "record", "telemetry"):
        assert getattr(a, name) is not getattr(b, name), name
    a.record.request = True
    a.masked["aws"] = 1
    assert not b.record.request and b.masked == {}


def test_request_body_is_the_body_of_request_of():
    import gzip

    from mitmproxy import http
    from mitmproxy.test import tflow, tutils

    from chaperone_sidecar.flowctx import request_body, request_of

    cases = [(b"", {}), (b"plain body", {}), (gzip.compress(b"zipped body"), {"content-encoding": "gzip"}),
             (b"not gzip at all", {"content-encoding": "gzip"}), (b"x", {"content-encoding": "br, unknown"})]
    for content, headers in cases:
        for stream in (False, True):
            f = tflow.tflow(req=tutils.treq(headers=http.Headers(**headers), content=content))
            f.request.stream = stream
            assert request_body(f) == request_of(f).body, (content, headers, stream)
    f = tflow.tflow(req=tutils.treq(content=gzip.compress(b"zipped body"),
                                    headers=http.Headers(content_encoding="gzip")))
    assert request_body(f) == b"zipped body"
