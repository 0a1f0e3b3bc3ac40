"""``chaperone policy test``: try AccessPolicies on requests locally, no cluster needed.

One request::

    chaperone policy test -f policy.yaml --connection aws-prod --type aws \\
        --method DELETE --url https://reports.s3.us-east-1.amazonaws.com/ \\
        --service-account team-a/claude --explain

or ``--request FILE`` with a raw HTTP/1.1 request, or SQL on a postgres connection (``--connection
shop-db --sql "DELETE FROM users" [--server db:5432] [--database shop]``). It prints the classified action, the deciding
rule and the decision (``--json`` for machines). A suite of cases (``--suite cases.yaml``, see
``examples/policy-tests/``) lets teams test their policies in their own CI.

The same compiler, classifier and evaluator as the sidecar are used, so a passing suite means
the sidecar decides the same way. Exit codes: 0 ok, 1 an expectation did not hold (suite case
or ``--expect``), 2 invalid input (policy errors are printed with their field paths).

This module is the command line: arguments, the single request, printing its result. Reading
inputs, running a case and suites are in :mod:`.cases` (import them from there).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from ..cli import dispatch
from .cases import (
    CONNECTION_TYPES,
    DECISIONS,
    EXIT_INVALID,
    EXIT_MISMATCH,
    EXIT_OK,
    Case,
    CaseResult,
    Classifier,
    InputError,
    load_policies,
    make_identity,
    parse_raw_request,
    request_from_url,
    run_case,
    run_suite,
    sql_request,
)
from .evaluator import describe_action
from .model import HTTPRequest

_EPILOG = "exit codes: 0 ok, 1 an expectation did not hold, 2 invalid input"


def register(subparsers: Any) -> None:
    """Add ``policy`` to the ``chaperone`` command (entry point ``chaperone.commands``)."""
    add_commands(subparsers.add_parser("policy", help="test AccessPolicies locally",
                                       description="Test AccessPolicies locally."))


def main(argv: list[str] | None = None) -> int:
    """Run the ``policy`` subcommand tree on its own: ``main(["test", ...])``."""
    parser = argparse.ArgumentParser(prog="chaperone policy", description="Test AccessPolicies locally.")
    add_commands(parser)
    return dispatch(parser, argv)


def add_commands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="policy_command", metavar="COMMAND")
    sub.required = True
    test = sub.add_parser("test", help="evaluate requests against policy files", epilog=_EPILOG,
                          description="Classify a request and evaluate it against AccessPolicies.")
    test.add_argument("-f", "--policy", action="append", default=[], metavar="FILE",
                      help="YAML file with AccessPolicies (repeatable)")
    test.add_argument("--namespace", default="default",
                      help="namespace of policies without metadata.namespace (default: default)")
    test.add_argument("--suite", metavar="FILE", help="run a YAML suite of cases instead of one request")
    test.add_argument("--connection", help="ClaudeConnection name the request goes through")
    test.add_argument("--type", choices=CONNECTION_TYPES, help="connection type")
    test.add_argument("--method", help="HTTP method (default GET, or POST with --data)")
    test.add_argument("--url", help="request URL")
    test.add_argument("--header", action="append", default=[], metavar="K:V", help="request header (repeatable)")
    test.add_argument("--data", help="request body; @FILE reads it from a file")
    test.add_argument("--request", metavar="FILE", help="raw HTTP/1.1 request file instead of --method/--url")
    test.add_argument("--sql", help="SQL sent through a postgres connection, instead of a request")
    test.add_argument("--server", default="", metavar="HOST[:PORT]",
                      help="the postgres connection's server, for --sql (default localhost:5432)")
    test.add_argument("--database", default="", help="the postgres connection's database, for --sql (default postgres)")
    test.add_argument("--service-account", default="", metavar="NS/NAME", help="the pod's service account")
    test.add_argument("--user", default="", help="the pod's creator")
    test.add_argument("--group", action="append", default=[], help="a group of the creator (repeatable)")
    test.add_argument("--on-behalf-of", default="", metavar="USER", help="verified on-behalf-of user")
    test.add_argument("--expect", metavar="DECISION", type=_decision,
                      help="exit 1 unless the decision is this (allow, block, requireApproval)")
    test.add_argument("--expect-rule", metavar="RULE", help="exit 1 unless this rule decides")
    test.add_argument("--explain", action="store_true", help="print each evaluation step")
    test.add_argument("--json", action="store_true", help="machine-readable output")
    test.set_defaults(func=run_test)


def _decision(value: str) -> str:
    if value.lower() not in DECISIONS:
        raise argparse.ArgumentTypeError(f"{value!r} is not allow, block or requireApproval")
    return DECISIONS[value.lower()]


def run_test(args: argparse.Namespace, classifier: Classifier | None = None,
             out: TextIO | None = None, err: TextIO | None = None) -> int:
    """The ``policy test`` command; ``classifier`` is injectable for tests."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        classify = classifier or _default_classifier()
        if args.suite:
            return run_suite(Path(args.suite), args.policy, args.namespace, classify, out, args.json, args.explain)
        if not args.policy:
            raise InputError("no policies: give -f/--policy FILE (or --suite)")
        if args.sql is not None:
            if args.type not in (None, "postgres"):
                raise InputError(f"--sql runs on a postgres connection, not --type {args.type}")
            if args.url or args.method or args.data or args.header or args.request:
                raise InputError("--sql cannot be combined with --method/--url/--header/--data/--request")
            args.type = "postgres"
        if not args.connection or not args.type:
            raise InputError("--connection and --type are required without --suite")
        policies = load_policies([Path(p) for p in args.policy], args.namespace)
        request = sql_request(args.server, args.database) if args.sql is not None else _request_from_args(args)
        identity = make_identity(args.service_account, args.user, args.group, args.on_behalf_of,
                                 namespace=args.namespace)
        expect = {"decision": args.expect} if args.expect else {}
        if args.expect_rule:
            expect["rule"] = args.expect_rule
        result = run_case(Case("request", request, identity, args.connection, args.type, expect, sql=args.sql),
                          policies, classify, args.explain)
    except InputError as exc:
        print(f"error: {exc}", file=err)
        return EXIT_INVALID
    if args.json:
        json.dump(result.to_json(), out, indent=2)
        out.write("\n")
    else:
        _print_result(result, out, args.explain)
    return EXIT_MISMATCH if result.mismatches else EXIT_OK


def _default_classifier() -> Classifier:
    from .classify import classify  # imported late: loads botocore models, unneeded for --help

    return classify


def _request_from_args(args: argparse.Namespace) -> HTTPRequest:
    if args.request:
        if args.url or args.method or args.data or args.header:
            raise InputError("--request FILE cannot be combined with --method/--url/--header/--data")
        try:
            return parse_raw_request(Path(args.request).read_bytes())
        except OSError as exc:
            raise InputError(f"{args.request}: cannot read: {exc.strerror or exc}") from exc
    if not args.url:
        raise InputError("give the request as --url (with --method, --header, --data) or --request FILE")
    headers = []
    for header in args.header:
        key, sep, value = header.partition(":")
        if not sep or not key.strip():
            raise InputError(f"invalid --header {header!r}: want 'Name: value'")
        headers.append((key.strip(), value.strip()))
    body = b""
    if args.data is not None:
        if args.data.startswith("@"):
            try:
                body = Path(args.data[1:]).read_bytes()
            except OSError as exc:
                raise InputError(f"{args.data[1:]}: cannot read: {exc.strerror or exc}") from exc
        else:
            body = args.data.encode()
    return request_from_url(args.method or ("POST" if args.data is not None else "GET"), args.url, headers, body)


def _print_result(result: CaseResult, out: TextIO, explain: bool) -> None:
    action, decision = result.action, result.decision
    lines = [f"action:    {describe_action(action)}"]
    lines += [f"summary:   {action.summary}"] if action.summary else []
    lines += [f"warning:   {problem}" for problem in action.errors]
    lines.append(f"rule:      {decision.rule or 'none (a default decided)'}")
    lines.append(f"decision:  {decision.effect}" + (f" - {decision.message}" if decision.message else ""))
    if decision.approval:
        a = decision.approval
        lines.append(f"approval:  {a.min_approvals} of users {list(a.approvers.users)} groups "
                     f"{list(a.approvers.groups)}; mode {a.mode}; grant {a.grant_scope} for {a.grant_ttl_seconds}s")
    lines += [f"mask:      detectors {list(m.detectors)} fields {list(m.fields)} target {m.target} "
              f"({m.source or 'policy-wide'})" for m in decision.masks]
    lines += [f"ratelimit: {r.requests} per {r.period_seconds}s per {r.per} ({r.source})" for r in decision.rate_limits]
    if explain:
        lines += ["explanation:"] + [f"  {line}" for line in decision.explanation]
    lines += [f"MISMATCH   {m}" for m in result.mismatches]
    print("\n".join(lines), file=out)


if __name__ == "__main__":
    sys.exit(main())
