"""Benchmark AccessPolicy admission: what the operator's validating webhook runs per request.

A plain script (not a test): ``python bench/bench_admission.py``. Times
``chaperone_operator.handlers.accesspolicies.policy_errors`` - schema validation against the
CRD, the semantic checks and compilation, i.e. the whole admission decision minus kopf's HTTP
handling - on the example policy (4 rules), the 100-rule policy of ``bench_policy.py``, the
largest policy the CRD allows (500 rules) and an invalid 100-rule policy (every error reported).
Prints CPU milliseconds per call (the thread's CPU time, which other processes on a shared
machine barely move): best of the repeats (the cost itself) and the median.
"""

from __future__ import annotations

import copy
import functools
import statistics
import sys
import time
import timeit
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "sidecar"), str(ROOT / "operator"), str(ROOT / "bench")]

from bench_policy import hundred_rule_policy  # noqa: E402

from chaperone_operator.handlers.accesspolicies import policy_errors  # noqa: E402

REPEAT = 15


def largest_policy() -> dict:
    """500 rules (the CRD's maxItems), the 100-rule shapes five times over with unique names."""
    base = hundred_rule_policy()
    rules = []
    for k in range(5):
        for rule in base["spec"]["rules"]:
            rules.append({**copy.deepcopy(rule), "name": f"{rule['name']}-{k}"})
    return {**base, "spec": {**base["spec"], "rules": rules}}


def invalid_policy() -> dict:
    """The 100-rule policy with ten broken rules: bad regexes, unknown fields, out-of-range values."""
    obj = hundred_rule_policy()
    rules = obj["spec"]["rules"]
    for i in range(10, 100, 9):
        rules[i] = {"name": f"Bad_{i}", "match": {"pathRegex": "[", "methods": ["get"], "path": "/x"},
                    "requireApproval": {"minApprovals": 11, "holdSeconds": 5000}}
    return obj


def main() -> None:
    example = yaml.safe_load((ROOT / "examples" / "policy-tests" / "policy.yaml").read_text())
    cases = {"example (4 rules)": example, "100 rules": hundred_rule_policy(),
             "500 rules": largest_policy(), "100 rules, 10 invalid": invalid_policy()}
    for name, obj in cases.items():
        count, errors = policy_errors(obj)
        timer = timeit.Timer(functools.partial(policy_errors, obj), timer=time.thread_time)
        number = max(1, int(0.2 / max(timer.timeit(number=1), 1e-6)))
        runs = [t / number * 1000 for t in timer.repeat(number=number, repeat=REPEAT)]
        print(f"{name:24s} best {min(runs):8.3f} ms   median {statistics.median(runs):8.3f} ms   "
              f"({count} rules compiled, {len(errors)} errors)")


if __name__ == "__main__":
    main()
