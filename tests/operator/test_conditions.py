"""Conditions keep their transition time while unchanged; status diffs ignore it."""

from __future__ import annotations

import datetime as dt

from chaperone_operator.conditions import condition, merge_conditions, status_differs

T1 = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
T2 = T1 + dt.timedelta(hours=1)


def test_transition_time_moves_only_on_status_change():
    first = merge_conditions(None, [condition("Ready", True, "Ok", "fine", 1)], T1)
    assert first[0]["lastTransitionTime"] == "2030-01-01T00:00:00Z"
    same = merge_conditions(first, [condition("Ready", True, "Ok", "still fine", 2)], T2)
    assert same[0]["lastTransitionTime"] == "2030-01-01T00:00:00Z" and same[0]["message"] == "still fine"
    flipped = merge_conditions(same, [condition("Ready", False, "Broken", "no", 2)], T2)
    assert flipped[0]["lastTransitionTime"] == "2030-01-01T01:00:00Z"
    assert condition("X", None, "R", "m")["status"] == "Unknown"


def test_status_differs():
    a = {"ruleCount": 1, "conditions": merge_conditions(None, [condition("Valid", True, "C", "m")], T1)}
    b = {"ruleCount": 1, "conditions": merge_conditions(None, [condition("Valid", True, "C", "m")], T2)}
    assert not status_differs(a, b)
    assert status_differs(a, {"ruleCount": 2})
    assert status_differs(None, {"ruleCount": 0})
