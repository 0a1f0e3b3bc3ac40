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
