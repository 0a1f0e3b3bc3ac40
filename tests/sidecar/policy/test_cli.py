"""``chaperone policy test``: single requests, suites, exit codes, raw requests, registration."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest

from chaperone_sidecar.policy import cli
from chaperone_sidecar.policy.cases import InputError, parse_raw_request
from chaperone_sidecar.policy.model import Action, AWSAction, HTTPRequest

REPO = Path(__file__).resolve().parents[3]
EXAMPLE_SUITE = REPO / "examples" / "policy-tests" / "aws-basics.yaml"
EXAMPLE_POLICY = REPO / "examples" / "policy-tests" / "policy.yaml"

POLICY = """\
apiVersion: chaperone.dev/v1alpha1
kind: AccessPolicy
metadata: {name: web, namespace: team-a}
spec:
  connections: [github]
  rules:
    - name: no-admin
      description: The admin API is off limits.
      match: {paths: ["/admin/**"]}
      block: {}
    - name: reads
      match: {methods: [GET]}
      allow: {}
    - name: writes-need-approval
      match: {methods: [POST, PUT]}
      requireApproval:
        approvers: {users: [bob]}
---
apiVersion: chaperone.dev/v1alpha1
kind: AccessPolicy
metadata: {name: masking, namespace: team-a}
spec:
  defaultEffect: allow
  masking: {detectors: [jwt]}
  rules:
    - name: slow-down
      rateLimit: {requests: 5, periodSeconds: 60}
"""


def fake_classify(request: HTTPRequest, connection_type: str) -> Action:
    """A stand-in classifier: the CLI's own logic is tested without the real one."""
    aws = AWSAction("s3", "us-east-1", "DeleteBucket") if connection_type == "aws" else None
    return Action(connection_type, request.method, request.scheme, request.host, request.port, request.path,
                  request.query, name=aws.action if aws else f"http:{request.method}", summary="fake", aws=aws)


@pytest.fixture
def policy_file(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


def run(argv, classifier=fake_classify):
    parser = argparse.ArgumentParser()
    cli.add_commands(parser)
    args = parser.parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    code = cli.run_test(args, classifier=classifier, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


# ---------------------------------------------------------------------------- one request

def test_single_request_prints_action_rule_and_decision(policy_file):
    code, out, err = run(["test", "-f", str(policy_file), "--connection", "github", "--type", "http",
                          "--url", "https://api.github.com/admin/users", "--service-account", "team-a/claude"])
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "action:    http:GET (GET https://api.github.com/admin/users)",
        "summary:   fake",
        "rule:      team-a/web#no-admin",
        "decision:  block - The admin API is off limits.",
        "mask:      detectors ['jwt'] fields [] target response (policy-wide)",
        "ratelimit: 5 per 60s per identity (team-a/masking#slow-down)",
    ]


def test_explain_and_approval_output(policy_file):
    code, out, _ = run(["test", "-f", str(policy_file), "--connection", "github", "--type", "http",
                        "--method", "post", "--url", "api.github.com/repos", "--data", "{}", "--user", "alice",
                        "--explain"])
    assert code == 0
    assert "decision:  require_approval - approval required by rule \"writes-need-approval\" of AccessPolicy team-a/web" in out
    assert "approval:  1 of users ['bob'] groups []; mode hold; grant exact for 900s" in out
    assert "explanation:\n  caller: creator alice\n" in out
    assert '  policy team-a/web: applies (connection "github" matches "github"; subjects: everyone)' in out
    assert "  rule team-a/web#writes-need-approval (require_approval) matches: match.methods: \"POST\" matches [\"POST\", \"PUT\"]" in out


def test_json_output(policy_file):
    code, out, _ = run(["test", "-f", str(policy_file), "--connection", "github", "--type", "aws",
                        "--method", "DELETE", "--url", "https://reports.s3.amazonaws.com/", "--json"])
    data = json.loads(out)
    assert code == 0 and data["passed"] is True
    assert data["action"]["name"] == "s3:DeleteBucket" and data["action"]["aws"]["operation"] == "DeleteBucket"
    assert data["decision"]["effect"] == "block" and data["decision"]["rule"] is None  # default: no rule matched
    assert data["decision"]["rate_limits"][0]["source"] == "team-a/masking#slow-down"
    assert data["decision"]["masks"][0]["source"] is None


def test_expect_flags_set_the_exit_code(policy_file):
    base = ["test", "-f", str(policy_file), "--connection", "github", "--type", "http", "--url", "https://h/x"]
    assert run(base + ["--expect", "allow", "--expect-rule", "reads"])[0] == 0
    assert run(base + ["--expect", "allow", "--expect-rule", "team-a/web#reads"])[0] == 0
    code, out, _ = run(base + ["--expect", "block", "--expect-rule", "no-admin"])
    assert code == 1
    assert "MISMATCH   decision: expected block, got allow (rule team-a/web#reads)" in out
    assert "MISMATCH   rule: expected no-admin, got team-a/web#reads" in out
    with pytest.raises(SystemExit) as exc:  # argparse: usage errors are exit 2 too
        run(base + ["--expect", "maybe"])
    assert exc.value.code == 2


def test_raw_request_file(policy_file, tmp_path):
    raw = tmp_path / "req.http"
    raw.write_bytes(b"PUT /repos/x?draft=1 HTTP/1.1\r\nHost: api.github.com:8443\r\nContent-Length: 2\r\n\r\n{}trailing")
    code, out, _ = run(["test", "-f", str(policy_file), "--connection", "github", "--type", "http",
                        "--request", str(raw), "--json"])
    data = json.loads(out)
    assert code == 0
    assert (data["action"]["method"], data["action"]["host"], data["action"]["port"], data["action"]["query"]) == \
        ("PUT", "api.github.com", 8443, "draft=1")
    assert data["decision"]["effect"] == "require_approval"


@pytest.mark.parametrize("argv,message", [
    (["--connection", "github", "--type", "http", "--url", "https://h/"], "error: no policies: give -f/--policy FILE (or --suite)"),
    (["-f", "{policy}", "--type", "http", "--url", "https://h/"], "error: --connection and --type are required without --suite"),
    (["-f", "{policy}", "--connection", "c", "--type", "http"],
     "error: give the request as --url (with --method, --header, --data) or --request FILE"),
    (["-f", "{policy}", "--connection", "c", "--type", "http", "--url", "ftp://h/"], "error: invalid URL 'ftp://h/': need http(s)://host/path"),
    (["-f", "{policy}", "--connection", "c", "--type", "http", "--url", "https://h/", "--header", "nocolon"],
     "error: invalid --header 'nocolon': want 'Name: value'"),
    (["-f", "{policy}", "--connection", "c", "--type", "http", "--request", "r.http", "--url", "https://h/"],
     "error: --request FILE cannot be combined with --method/--url/--header/--data"),
    (["-f", "/nonexistent.yaml", "--connection", "c", "--type", "http", "--url", "https://h/"],
     "error: /nonexistent.yaml: cannot read: No such file or directory"),
])
def test_invalid_input_exits_2(policy_file, argv, message):
    code, out, err = run(["test"] + [a.replace("{policy}", str(policy_file)) for a in argv])
    assert (code, out, err.strip()) == (2, "", message)


def test_policy_errors_are_printed_with_field_paths(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(POLICY.replace("paths: [\"/admin/**\"]", "paths: [\"admin/**\"], pathRegex: \"[\"")
                   .replace("name: reads", "name: Reads")
                   .replace("methods: [POST, PUT]}", "methods: [POST, put], hostz: [h]}"))
    code, out, err = run(["test", "-f", str(bad), "--connection", "github", "--type", "http", "--url", "https://h/"])
    assert code == 2 and out == ""
    assert err.splitlines() == [
        "error: invalid AccessPolicies:",
        f'  {bad}: AccessPolicy team-a/web: spec.rules[0].match.pathRegex: invalid regular expression: '
        "unterminated character set at position 0",
        f'  {bad}: AccessPolicy team-a/web: spec.rules[0].match.paths[0]: invalid path glob "admin/**": must start with "/"',
        f'  {bad}: AccessPolicy team-a/web: spec.rules[1].name: invalid value "Reads": must match the regular '
        "expression ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        f"  {bad}: AccessPolicy team-a/web: spec.rules[2].match.hostz: unknown field",
        f'  {bad}: AccessPolicy team-a/web: spec.rules[2].match.methods[1]: invalid value "put": must match the '
        "regular expression ^[A-Z]+$",
    ]


def test_invalid_yaml_and_duplicates(tmp_path, policy_file):
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    code, _, err = run(["test", "-f", str(broken), "--connection", "c", "--type", "http", "--url", "https://h/"])
    assert code == 2 and err.startswith(f"error: {broken}: invalid YAML:")
    code, _, err = run(["test", "-f", str(policy_file), "-f", str(policy_file), "--connection", "c", "--type", "http",
                        "--url", "https://h/"])
    assert code == 2 and f"AccessPolicy team-a/web: duplicate (also in {policy_file})" in err


def test_kubectl_list_output_is_read(tmp_path, policy_file):
    import yaml

    items = list(yaml.safe_load_all(POLICY))
    listed = tmp_path / "list.yaml"
    listed.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": items}))
    code, out, _ = run(["test", "-f", str(listed), "--connection", "github", "--type", "http", "--url", "https://h/",
                        "--expect", "allow"])
    assert code == 0, out


# ---------------------------------------------------------------------------- raw requests

@pytest.mark.parametrize("raw,expected", [
    (b"GET /a?b=1 HTTP/1.1\r\nHost: example.com\r\n\r\n", ("GET", "https", "example.com", 443, "/a", "b=1", b"")),
    (b"POST http://example.com:8080/x HTTP/1.1\nContent-Length: 3\n\nabcdef",
     ("POST", "http", "example.com", 8080, "/x", "", b"abc")),
    (b"\nDELETE / HTTP/1.1\nHost: b.s3.amazonaws.com\nX-Folded: a\n  b\n\n", ("DELETE", "https", "b.s3.amazonaws.com", 443, "/", "", b"")),
    (b"GET /only-head HTTP/1.1\r\nHost: h", ("GET", "https", "h", 443, "/only-head", "", b"")),
])
def test_parse_raw_request(raw, expected):
    r = parse_raw_request(raw)
    assert (r.method, r.scheme, r.host, r.port, r.path, r.query, r.body) == expected
    assert r.header("host")


def test_parse_raw_request_keeps_header_order_and_folding():
    r = parse_raw_request(b"GET / HTTP/1.1\nHost: h\nX-A: 1\nX-A: 2\nX-F: a\n\tb\n\n")
    assert r.headers == (("Host", "h"), ("X-A", "1"), ("X-A", "2"), ("X-F", "a b"))


@pytest.mark.parametrize("raw,message", [
    (b"", "empty request"),
    (b"GET\r\n\r\n", "invalid request line 'GET': want 'METHOD TARGET HTTP/1.1'"),
    (b"GET / HTTP/1.1\r\nX: y\r\n\r\n", "the request has no Host header and no absolute URL"),
    (b"GET / HTTP/1.1\r\nHost: h\r\nbroken header\r\n\r\n", "invalid header line 'broken header'"),
])
def test_parse_raw_request_errors(raw, message):
    with pytest.raises(InputError, match="^" + message.replace("(", r"\(").replace(")", r"\)") + "$"):
        parse_raw_request(raw)


# ---------------------------------------------------------------------------- suites

SUITE = """\
policies: [policy.yaml]
defaults:
  connection: github
  type: http
  identity: {serviceAccount: claude}
cases:
  - name: reads pass
    request: {url: "https://api.github.com/repos"}
    expect: {decision: allow, rule: reads}
  - name: admin is blocked
    request: {method: GET, url: "https://api.github.com/admin", headers: ["X-Trace: 1"]}
    expect: {decision: block, rule: team-a/web#no-admin}
  - name: wrong on purpose
    request: {method: POST, url: "https://api.github.com/repos", body: {a: 1}}
    expect: {decision: allow, rule: reads, action: "http:PUT", masks: [x]}
  - name: only the catch-all policy applies
    connection: gitlab
    request: {raw: "DELETE / HTTP/1.1\\nHost: gitlab.com\\n\\n"}
    expect: {decision: allow, rule: null}
  - name: rule expected but default decided
    connection: other
    request: {url: "https://h/"}
    expect: {decision: allow, rule: reads}
"""


def test_suite_reports_every_mismatch_and_exits_1(tmp_path, policy_file):
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE)
    code, out, err = run(["test", "--suite", str(suite)])
    assert code == 1 and err == ""
    lines = [line for line in out.splitlines() if not line.startswith("        ")]  # explanations of failures
    assert lines == [
        "PASS  reads pass",
        "PASS  admin is blocked",
        "FAIL  wrong on purpose",
        "      decision: expected allow, got require_approval (rule team-a/web#writes-need-approval)",
        "      rule: expected reads, got team-a/web#writes-need-approval",
        "      masks: expected rules ['x'], got []",
        "      action: expected http:PUT, got http:POST",
        "PASS  only the catch-all policy applies",
        "FAIL  rule expected but default decided",
        "      rule: expected reads, got none (a default decided)",
        "3 passed, 2 failed",
    ]
    assert "        decision: require_approval by rule team-a/web#writes-need-approval" in out  # failing case explained


def test_suite_json_and_all_passing(tmp_path, policy_file):
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE.split("  - name: wrong on purpose")[0])
    code, out, _ = run(["test", "--suite", str(suite), "--json"])
    data = json.loads(out)
    assert code == 0 and (data["passed"], data["failed"]) == (2, 0)
    assert [c["name"] for c in data["cases"]] == ["reads pass", "admin is blocked"]
    assert data["cases"][1]["decision"]["rule"] == "team-a/web#no-admin"


def test_suite_policies_can_come_from_flags(tmp_path, policy_file):
    suite = tmp_path / "elsewhere" / "suite.yaml"
    suite.parent.mkdir()
    suite.write_text(SUITE.split("  - name: wrong on purpose")[0].replace("policies: [policy.yaml]\n", ""))
    assert run(["test", "--suite", str(suite), "-f", str(policy_file)])[0] == 0


def test_invalid_suite_exits_2_listing_every_problem(tmp_path, policy_file):
    suite = tmp_path / "suite.yaml"
    suite.write_text("""\
policies: [policy.yaml]
cases:
  - name: a
    type: ftp
    request: {url: "https://h/", verb: GET}
    expect: {decision: maybe}
    identity: {sa: x}
  - name: b
    connection: c
    type: http
    request: {raw: "GET / HTTP/1.1\\n\\n", url: "https://h/"}
""")
    code, out, err = run(["test", "--suite", str(suite)])
    assert code == 2 and out == ""
    assert err.splitlines() == [
        f"error: {suite}: invalid suite:",
        "  cases[0].identity.sa: unknown field (known: groups, onBehalfOf, onBehalfOfGroups, serviceAccount, user)",
        "  cases[0].request.verb: unknown field (known: body, file, headers, method, raw, url)",
        "  cases[0].connection: required (here or in defaults)",
        "  cases[0].type: must be one of aws, http, kubernetes, anthropic, mcp, postgres (here or in defaults), "
        "got 'ftp'",
        "  cases[0].expect.decision: must be allow, block or requireApproval, got 'maybe'",
        "  cases[1].request: raw/file cannot be combined with method/url/body",
    ]
    suite.write_text("cases: []\n")
    code, _, err = run(["test", "--suite", str(suite)])
    assert code == 2 and "a suite is one YAML document with a non-empty list of cases" in err


# ---------------------------------------------------------------------------- wiring

def test_register_adds_policy_to_a_chaperone_parser(policy_file, capsys):
    parser = argparse.ArgumentParser(prog="chaperone")
    subparsers = parser.add_subparsers(dest="command")
    cli.register(subparsers)
    args = parser.parse_args(["policy", "test", "-f", str(policy_file), "--connection", "github", "--type", "http",
                              "--url", "https://h/admin/x", "--expect", "block"])
    assert args.func is cli.run_test
    assert args.func(args) == 0  # the real classifier, printing to stdout
    assert "rule:      team-a/web#no-admin" in capsys.readouterr().out


def test_chaperone_main_finds_policy_through_the_entry_point(policy_file, capsys, monkeypatch):
    """What `pip install` wires up: the pyproject entry point, loaded by the top-level CLI."""
    import tomllib
    from importlib.metadata import EntryPoint

    import chaperone_sidecar.cli as top

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["chaperone.commands"]
    assert declared["policy"] == "chaperone_sidecar.policy.cli:register"
    entry = EntryPoint("policy", declared["policy"], "chaperone.commands")
    monkeypatch.setattr(top, "entry_points", lambda group: [entry] if group == "chaperone.commands" else [])
    assert top.main(["policy", "test", "-f", str(policy_file), "--connection", "github", "--type", "http",
                     "--url", "https://h/x", "--expect", "allow", "--expect-rule", "reads"]) == 0
    assert "decision:  allow" in capsys.readouterr().out


def test_main_runs_the_subcommand_tree(policy_file, capsys):
    assert cli.main(["test", "-f", str(policy_file), "--connection", "github", "--type", "http",
                     "--url", "https://h/", "--expect", "allow"]) == 0
    with pytest.raises(SystemExit):
        cli.main([])  # a subcommand is required
    capsys.readouterr()


def test_example_suite_passes_with_the_real_classifier(capsys):
    """The documented example: policy.yaml + aws-basics.yaml, classified by the real AWS classifier."""
    assert cli.main(["test", "--suite", str(EXAMPLE_SUITE)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "6 passed, 0 failed"
    assert "FAIL" not in out


def test_example_policy_single_request_with_the_real_classifier(capsys):
    code = cli.main([
        "test", "-f", str(EXAMPLE_POLICY), "--connection", "aws-prod", "--type", "aws", "--method", "POST",
        "--url", "https://iam.amazonaws.com/", "--data", "Action=CreateRole&Version=2010-05-08&RoleName=r",
        "--header", "Authorization: AWS4-HMAC-SHA256 Credential=AKID/20250101/us-east-1/iam/aws4_request, "
                    "SignedHeaders=host, Signature=0",
        "--expect", "requireApproval", "--expect-rule", "role-creation-needs-approval", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["action"]["name"] == "iam:CreateRole"
    assert data["decision"]["approval"]["approvers"] == {"users": [], "groups": ["platform-approvers"]}
    assert (data["decision"]["approval"]["grant_scope"], data["decision"]["approval"]["grant_ttl_seconds"]) == ("action", 3600)
