"""AccessPolicy admission errors and status, straight from the policy engine's compiler."""

from __future__ import annotations

import datetime as dt

import kopf
import pytest

from chaperone_operator.handlers.accesspolicies import on_accesspolicy_validate, policy_errors, policy_status

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)


def policy(*rules, name="p", **meta) -> dict:
    return {"apiVersion": "chaperone.dev/v1alpha1", "kind": "AccessPolicy",
            "metadata": {"name": name, "namespace": "team", **meta}, "spec": {"rules": list(rules)}}


GOOD = {"name": "gh", "allow": {}, "match": {"hosts": ["api.github.com"]}}
BAD = {"name": "re", "block": {}, "match": {"pathRegex": "("}}


def test_errors_carry_field_paths_and_generate_name_is_accepted():
    assert policy_errors(policy(GOOD)) == (1, [])
    count, errors = policy_errors(policy(GOOD, BAD))
    assert count == 0 and errors[0].startswith("spec.rules[1].match.pathRegex: invalid regular expression")
    unnamed = policy(GOOD, name="")
    unnamed["metadata"]["generateName"] = "p-"
    assert policy_errors(unnamed) == (1, [])


def test_validate_raises_every_error():
    with pytest.raises(kopf.AdmissionError) as err:
        on_accesspolicy_validate(body=policy(GOOD, BAD, {**BAD, "name": "re2"}))
    text = str(err.value)
    assert text.startswith("AccessPolicy team/p is invalid:\n")
    assert "spec.rules[1].match.pathRegex" in text and "spec.rules[2].match.pathRegex" in text
    assert err.value.code == 422
    on_accesspolicy_validate(body=policy(GOOD))


def test_status_valid_and_invalid():
    ok = policy_status({**policy(GOOD), "metadata": {"name": "p", "namespace": "t", "generation": 4}}, None, NOW)
    assert ok["ruleCount"] == 1 and ok["observedGeneration"] == 4
    assert ok["conditions"][0] | {"lastTransitionTime": "x"} == {
        "type": "Valid", "status": "True", "reason": "Compiled", "message": "1 rule(s) compiled",
        "observedGeneration": 4, "lastTransitionTime": "x"}
    bad = policy_status(policy(BAD), ok, NOW)
    assert bad["conditions"][0]["status"] == "False" and "pathRegex" in bad["conditions"][0]["message"]
