"""OperatorSettings from the environment: defaults, parsing, every bad value reported at once."""

from __future__ import annotations

import pytest

from chaperone_operator.settings import ENV, OperatorSettings, SettingsError


def test_defaults_and_overrides():
    assert OperatorSettings.from_env({}) == OperatorSettings()
    got = OperatorSettings.from_env({
        "CHAPERONE_OPERATOR_NAMESPACE": "ops", "CHAPERONE_WEBHOOK_PORT": "8443",
        "CHAPERONE_PEERING_PRIORITY": "7", "CHAPERONE_STANDALONE": "yes",
        "CHAPERONE_APPROVALS_REQUIRE_POD_BOUND_TOKEN": "false", "CHAPERONE_WEBHOOK_HOST": "",
    })
    assert (got.namespace, got.webhook_port, got.peering_priority, got.standalone) == ("ops", 8443, 7, True)
    assert got.webhook_host is None
    rule = got.sidecar_rule()
    assert not rule.require_pod_bound_token and rule.require_injected_pod


def test_every_bad_value_is_reported():
    with pytest.raises(SettingsError) as err:
        OperatorSettings.from_env({"CHAPERONE_WEBHOOK_PORT": "70000", "CHAPERONE_STANDALONE": "maybe",
                                   "CHAPERONE_PEERING_PRIORITY": "high"})
    text = str(err.value)
    for var in ("CHAPERONE_WEBHOOK_PORT=70000", "CHAPERONE_STANDALONE='maybe'", "CHAPERONE_PEERING_PRIORITY='high'"):
        assert var in text


def test_every_field_has_one_variable():
    from dataclasses import fields
    assert sorted(ENV) == sorted(f.name for f in fields(OperatorSettings))
    assert len(set(ENV.values())) == len(ENV)
