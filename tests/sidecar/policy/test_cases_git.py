"""``chaperone policy test`` with git pushes: a suite can state a push's body as pkt-lines, and
the real classifier judges its ref updates as the sidecar does."""

from __future__ import annotations

import argparse
import io
import json

import yaml

from chaperone_sidecar.policy import cli

ZERO, OLD, NEW = "0" * 40, "1" * 40, "2" * 40
POLICY = {"apiVersion": "chaperone.dev/v1alpha1", "kind": "AccessPolicy", "metadata": {"name": "git"},
          "spec": {"defaultEffect": "block", "rules": [
              {"name": "org", "match": {"git": {"repositories": ["org/*"]}}, "allow": {}},
              {"name": "main", "match": {"git": {"refs": ["refs/heads/main"]}}, "block": {}}]}}


def pkt(line: str) -> str:
    return "%04x" % (len(line.encode()) + 4) + line


def push(*lines: str) -> str:
    return "".join(pkt(line + ("\0report-status" if i == 0 else "") + "\n") for i, line in enumerate(lines)) + "0000"


def test_a_suite_judges_a_pushs_refs(tmp_path):
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(POLICY))
    url = "https://git.example/org/app.git/git-receive-pack"
    cases = [
        {"name": "feature", "request": {"method": "POST", "url": url, "body": push(f"{OLD} {NEW} refs/heads/x")},
         "expect": {"decision": "allow", "action": "git:push"}},
        {"name": "main among others", "request": {"method": "POST", "url": url,
                                                  "body": push(f"{ZERO} {NEW} refs/heads/y", f"{OLD} {NEW} refs/heads/main")},
         "expect": {"decision": "block", "rule": "default/git#main"}},
        {"name": "no body: updates unknown", "request": {"method": "POST", "url": url},
         "expect": {"decision": "block", "rule": "default/git#main"}},
    ]
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(
        {"policies": ["policy.yaml"], "defaults": {"connection": "git", "type": "http"}, "cases": cases}))
    parser = argparse.ArgumentParser()
    cli.add_commands(parser)
    out, err = io.StringIO(), io.StringIO()
    code = cli.run_test(parser.parse_args(["test", "--suite", str(tmp_path / "suite.yaml"), "--json"]),
                        out=out, err=err)
    data = json.loads(out.getvalue())
    assert code == 0, out.getvalue() + err.getvalue()
    assert (data["passed"], data["failed"]) == (3, 0)
