"""Cases of ``chaperone policy test``: the inputs, one case run, and suite files.

A case is a request, an identity, a connection and what the decision should be. This module
reads the inputs (AccessPolicy files, URLs or raw HTTP/1.1 requests, identities), runs a case
through the same classifier and evaluator as the sidecar (:func:`run_case`) and reads and runs
suite files (:func:`load_suite`, :func:`run_suite`; format in ``examples/policy-tests/``).
Argument parsing and printing a single result stay in :mod:`.cli`.
Every problem with the input raises :class:`InputError` (exit code 2).

**SQL cases** (``sql:``, connection type ``postgres``; docs/postgres.md): the statement is
classified by the sidecar's classifier (``classify/postgres.py``) on ``server`` (host:port,
default ``localhost:5432``) and ``database`` (default ``postgres``) and every statement is
evaluated as ``postgres/decide.py`` does: the strictest decision wins (block >
requireApproval > allow), statements needing approval under different rules are refused
(``block``, as the sidecar refuses them), SQL the parser cannot read is ``block``
(``postgres:unparseable``). What only a running sidecar knows - rate limits left, an
approval's outcome, the lexing settings of a live session, COPY output under column masks -
is not part of a case.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import yaml

from .classify.postgres import SQLParseError, classify_sql
from .compiler import PolicyErrors, compile_policy
from .evaluator import evaluate
from .matching import CompiledPolicy, CompiledPolicySet
from .model import Action, Decision, HTTPRequest, Identity

Classifier = Callable[[HTTPRequest, str], Action]
EXIT_OK, EXIT_MISMATCH, EXIT_INVALID = 0, 1, 2
CONNECTION_TYPES = ("aws", "http", "kubernetes", "anthropic", "mcp", "postgres")
DECISIONS = {"allow": "allow", "block": "block", "require_approval": "require_approval",
              "requireapproval": "require_approval", "require-approval": "require_approval"}


class InputError(Exception):
    """Bad input (policy, request, suite): reported as is, exit code 2."""


# ---------------------------------------------------------------------------- inputs

def load_policies(paths: list[Path], namespace: str = "default") -> CompiledPolicySet:
    """Compile every AccessPolicy in the files; any problem raises InputError listing all."""
    compiled: list[CompiledPolicy] = []
    problems: list[str] = []
    seen: dict[str, Path] = {}
    for path in paths:
        for index, doc in enumerate(_read_yaml_docs(path)):
            is_list = isinstance(doc, dict) and doc.get("kind") in ("List", "AccessPolicyList")
            items = doc.get("items") if is_list else [doc]
            for obj in items or ():
                try:
                    policy = compile_policy(obj, namespace)
                except PolicyErrors as exc:
                    label = f"AccessPolicy {exc.policy}" if exc.policy else f"document {index + 1}"
                    problems += [f"{path}: {label}: {e}" for e in exc.errors]
                    continue
                if policy.key in seen:
                    problems.append(f"{path}: AccessPolicy {policy.key}: duplicate (also in {seen[policy.key]})")
                    continue
                seen[policy.key] = path
                compiled.append(policy)
    if problems:
        raise InputError("invalid AccessPolicies:\n  " + "\n  ".join(problems))
    return CompiledPolicySet(compiled)


def _read_yaml_docs(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: invalid YAML: {exc}") from exc


def make_identity(service_account: str = "", user: str = "", groups=(), on_behalf_of: str = "",
                  on_behalf_of_groups=(), namespace: str = "default") -> Identity:
    if service_account and "/" not in service_account:
        service_account = f"{namespace}/{service_account}"
    return Identity(service_account=service_account, pod_namespace=service_account.partition("/")[0],
                    creator=user, creator_groups=tuple(groups), on_behalf_of=on_behalf_of,
                    on_behalf_of_groups=tuple(on_behalf_of_groups))


def request_from_url(method: str, url: str, headers: Sequence[tuple[str, str]] = (), body: bytes = b"") -> HTTPRequest:
    """An HTTPRequest from a URL (scheme defaults to https); adds Host when missing."""
    parts = urlsplit(url if "://" in url else f"https://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"invalid URL {url!r}: need http(s)://host/path")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise InputError(f"invalid URL {url!r}: {exc}") from exc
    headers = list(headers)
    if not any(k.lower() == "host" for k, _ in headers):
        headers.insert(0, ("Host", parts.netloc.rpartition("@")[2]))
    return HTTPRequest(method=method.upper(), scheme=parts.scheme, host=parts.hostname, port=port,
                       path=parts.path or "/", query=parts.query, headers=tuple(headers), body=body)


def parse_raw_request(raw: bytes, scheme: str = "https") -> HTTPRequest:
    """Parse a raw HTTP/1.1 request (CRLF or LF line ends; origin- or absolute-form target)."""
    cut = [(raw.find(sep), sep) for sep in (b"\r\n\r\n", b"\n\n") if raw.find(sep) >= 0]
    if cut:
        at, sep = min(cut)
        head, body = raw[:at], raw[at + len(sep):]
    else:
        head, body = raw, b""
    lines = head.decode("latin-1").lstrip("\r\n").splitlines()
    if not lines:
        raise InputError("empty request")
    first = lines[0].split()
    if len(first) not in (2, 3) or (len(first) == 3 and not first[2].startswith("HTTP/")):
        raise InputError(f"invalid request line {lines[0]!r}: want 'METHOD TARGET HTTP/1.1'")
    method, target = first[0], first[1]
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and headers:  # obsolete line folding
            headers[-1] = (headers[-1][0], f"{headers[-1][1]} {line.strip()}")
        elif ":" in line:
            key, _, value = line.partition(":")
            headers.append((key.strip(), value.strip()))
        elif line.strip():
            raise InputError(f"invalid header line {line!r}")
    length = next((v for k, v in headers if k.lower() == "content-length"), None)
    if length is not None and length.isdigit():
        body = body[:int(length)]
    if "://" in target:
        return request_from_url(method, target, headers, body)
    host = next((v for k, v in headers if k.lower() == "host"), None)
    if not host:
        raise InputError("the request has no Host header and no absolute URL")
    return request_from_url(method, f"{scheme}://{host}{target}", headers, body)



# ---------------------------------------------------------------------------- cases

@dataclass
class Case:
    """One suite case (or the single request of ``policy test``)."""

    name: str
    request: HTTPRequest
    identity: Identity
    connection: str
    connection_type: str
    expect: dict = field(default_factory=dict)  # decision, rule, action, masks
    sql: str | None = None  # a SQL case: ``request`` then names the server and database


@dataclass
class CaseResult:
    case: Case
    action: Action
    decision: Decision
    mismatches: list[str]

    def to_json(self) -> dict:
        decision = asdict(self.decision)
        decision["rule"] = str(self.decision.rule) if self.decision.rule else None
        for part, src in zip(decision["masks"] + decision["rate_limits"],
                             self.decision.masks + self.decision.rate_limits, strict=True):
            part["source"] = str(src.source) if src.source else None
        return {"name": self.case.name, "passed": not self.mismatches, "mismatches": self.mismatches,
                "connection": self.case.connection, "action": asdict(self.action), "decision": decision}


def run_case(case: Case, policies: CompiledPolicySet, classify: Classifier, explain: bool = False) -> CaseResult:
    """Classify + evaluate one request (or SQL) and compare with the case's expectations."""
    if case.sql is not None:
        action, decision = judge_sql(case, policies, explain)
    else:
        action = classify(case.request, case.connection_type)
        decision = evaluate(policies, action, case.identity, case.connection, case.request.body, explain=explain)
    mismatches, expect = [], case.expect
    if expect.get("decision") is not None and DECISIONS.get(str(expect["decision"]).lower()) != decision.effect:
        mismatches.append(f"decision: expected {expect['decision']}, got {decision.effect}"
                          + (f" (rule {decision.rule})" if decision.rule else " (by default)"))
    if "rule" in expect:
        got, want = decision.rule, expect["rule"]
        if (got is None) != (want is None) or (got is not None and str(want) not in (got.rule, str(got))):
            mismatches.append(f"rule: expected {want or 'none (a default decides)'}, "
                              f"got {got or 'none (a default decided)'}")
    if expect.get("masks") is not None:  # names of the mask rules that must apply, exactly
        got_masks = sorted(m.source.rule for m in decision.masks if m.source is not None)
        if got_masks != sorted(map(str, expect["masks"])):
            mismatches.append(f"masks: expected rules {sorted(map(str, expect['masks']))}, got {got_masks}")
    if expect.get("action") is not None and expect["action"] != action.name:
        mismatches.append(f"action: expected {expect['action']}, got {action.name}")
    return CaseResult(case, action, decision, mismatches)


_RANK = {"block": 3, "require_approval": 2, "allow": 1}  # postgres/decide.py Verdict.deciding


def sql_request(server: str = "", database: str = "") -> HTTPRequest:
    """Where a SQL case runs, as the generic fields of its actions: ``SQL postgres://server/db``."""
    parts = urlsplit(f"postgres://{server or 'localhost:5432'}")
    try:
        port = parts.port or 5432
    except ValueError as exc:
        raise InputError(f"invalid server {server!r}: {exc}") from exc
    if not parts.hostname or parts.path or parts.query or parts.username:
        raise InputError(f"invalid server {server!r}: want host or host:port")
    return HTTPRequest(method="SQL", scheme="postgres", host=parts.hostname, port=port,
                       path=f"/{database or 'postgres'}")


def judge_sql(case: Case, policies: CompiledPolicySet, explain: bool = False) -> tuple[Action, Decision]:
    """A SQL case's action and decision, as the sidecar's postgres listener decides a unit
    (module docstring): the deciding statement's action, the strictest decision."""
    req = case.request
    database = req.path.lstrip("/")
    sql = case.sql or ""
    try:
        actions = classify_sql(sql, host=req.host, port=req.port, database=database)
    except SQLParseError as exc:
        action = Action(connection_type="postgres", method="SQL", scheme="postgres", host=req.host,
                        port=req.port, path=req.path, name="postgres:unparseable",
                        summary=sql[:200], errors=(str(exc),))
        return action, Decision("block", message=f"unparseable SQL is refused (42601): {exc}",
                                explanation=(f"parse error: {exc}",))
    if not actions:  # only comments: the server answers EmptyQueryResponse, nothing is judged
        action = Action(connection_type="postgres", method="SQL", scheme="postgres", host=req.host,
                        port=req.port, path=req.path, name="postgres:empty", summary="(empty query)")
        return action, Decision("allow", message="empty query: nothing to judge")
    decisions = [evaluate(policies, a, case.identity, case.connection, explain=True) for a in actions]
    lines: tuple[str, ...] = ()
    if len(actions) > 1 or explain:
        lines = tuple(f"statement {i + 1} {a.name}: {d.effect}" + (f" (rule {d.rule})" if d.rule else "")
                      for i, (a, d) in enumerate(zip(actions, decisions, strict=True)))
    index = max(range(len(decisions)), key=lambda i: _RANK.get(decisions[i].effect, 0))
    action, decision = actions[index], decisions[index]
    explanation = lines + (decision.explanation if explain or len(actions) == 1 else ())
    approvals = {str(d.rule) for d in decisions if d.effect == "require_approval"}
    if decision.effect == "require_approval" and len(approvals) > 1:
        return action, Decision("block", message="statements need approval under different rules "
                                f"({', '.join(sorted(approvals))}): the sidecar refuses the query",
                                explanation=explanation)
    return action, replace(decision, explanation=explanation)


def run_suite(path: Path, extra_policies: list[str], namespace: str, classify: Classifier,
              out: TextIO, as_json: bool = False, explain: bool = False) -> int:
    """Run every case of a suite file; exit 1 listing each mismatch, 0 when all pass."""
    policy_files, namespace, cases = load_suite(path, namespace)
    policies = load_policies(policy_files + [Path(p) for p in extra_policies], namespace)
    results = [run_case(case, policies, classify, explain=True) for case in cases]
    failed = [r for r in results if r.mismatches]
    if as_json:
        json.dump({"suite": str(path), "passed": len(results) - len(failed), "failed": len(failed),
                   "cases": [r.to_json() for r in results]}, out, indent=2)
        out.write("\n")
        return EXIT_MISMATCH if failed else EXIT_OK
    for r in results:
        print(f"{'FAIL' if r.mismatches else 'PASS'}  {r.case.name}", file=out)
        for line in r.mismatches:
            print(f"      {line}", file=out)
        if explain or r.mismatches:  # a failing case shows how it was decided
            for line in r.decision.explanation:
                print(f"        {line}", file=out)
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed", file=out)
    return EXIT_MISMATCH if failed else EXIT_OK


# ---------------------------------------------------------------------------- suite files

_SUITE_KEYS = {"policies", "namespace", "defaults", "cases"}
_DEFAULT_KEYS = {"connection", "type", "identity", "headers", "server", "database"}
_CASE_KEYS = {"name", "connection", "type", "identity", "request", "expect", "sql", "server", "database"}
_REQUEST_KEYS = {"method", "url", "headers", "body", "raw", "file"}
_IDENTITY_KEYS = {"serviceAccount", "user", "groups", "onBehalfOf", "onBehalfOfGroups"}
_EXPECT_KEYS = {"decision", "rule", "action", "masks"}


def _mapping(value: Any, where: str, keys: set[str], problems: list[str]) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{where}: must be a mapping")
        return {}
    problems += [f"{where}.{k}: unknown field (known: {', '.join(sorted(keys))})" for k in value if k not in keys]
    return value


def _headers(value: Any, where: str, problems: list[str]) -> list[tuple[str, str]]:
    """Headers as a mapping, a list of "Name: value" strings or a list of [name, value]."""
    if isinstance(value, dict):
        return [(str(k), str(v)) for k, v in value.items()]
    pairs = []
    for i, item in enumerate(value or ()):
        if isinstance(item, str) and ":" in item:
            key, _, val = item.partition(":")
            pairs.append((key.strip(), val.strip()))
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            pairs.append((str(item[0]), str(item[1])))
        else:
            problems.append(f"{where}[{i}]: want \"Name: value\"")
    return pairs


def load_suite(path: Path, namespace: str = "default") -> tuple[list[Path], str, list[Case]]:
    """Read a suite file: (policy files relative to it, namespace, cases); InputError on problems."""
    docs = _read_yaml_docs(path)
    problems: list[str] = []
    top = _mapping(docs[0] if len(docs) == 1 else None, "suite", _SUITE_KEYS, problems)
    if len(docs) != 1 or not top.get("cases") or not isinstance(top["cases"], list):
        raise InputError(f"{path}: a suite is one YAML document with a non-empty list of cases")
    namespace = str(top.get("namespace") or namespace)
    policy_files = [path.parent / str(p) for p in top.get("policies") or ()]
    defaults = _mapping(top.get("defaults"), "defaults", _DEFAULT_KEYS, problems)
    cases = []
    for i, raw in enumerate(top["cases"]):
        where = f"cases[{i}]"
        case = _mapping(raw, where, _CASE_KEYS, problems)
        ident = _mapping(case.get("identity", defaults.get("identity")), f"{where}.identity", _IDENTITY_KEYS, problems)
        expect = _mapping(case.get("expect"), f"{where}.expect", _EXPECT_KEYS, problems)
        req = _mapping(case.get("request"), f"{where}.request", _REQUEST_KEYS, problems)
        connection, ctype = case.get("connection", defaults.get("connection")), case.get("type", defaults.get("type"))
        if not connection:
            problems.append(f"{where}.connection: required (here or in defaults)")
        if "sql" in case:
            sql = _sql_case(case, defaults, where, problems, ctype)
            if sql is not None:
                identity = make_identity(str(ident.get("serviceAccount") or ""), str(ident.get("user") or ""),
                                         ident.get("groups") or (), str(ident.get("onBehalfOf") or ""),
                                         ident.get("onBehalfOfGroups") or (), namespace)
                cases.append(Case(str(case.get("name") or where), sql[0], identity, str(connection),
                                  "postgres", expect, sql=sql[1]))
            if "decision" in expect and str(expect["decision"]).lower() not in DECISIONS:
                problems.append(f"{where}.expect.decision: must be allow, block or requireApproval, "
                                f"got {expect['decision']!r}")
            continue
        if ctype not in CONNECTION_TYPES:
            problems.append(f"{where}.type: must be one of {', '.join(CONNECTION_TYPES)} (here or in defaults), "
                            f"got {ctype!r}")
        if "decision" in expect and str(expect["decision"]).lower() not in DECISIONS:
            problems.append(f"{where}.expect.decision: must be allow, block or requireApproval, "
                            f"got {expect['decision']!r}")
        try:
            request = _suite_request(req, path.parent, _headers(defaults.get("headers"), "defaults.headers", problems)
                                     + _headers(req.get("headers"), f"{where}.request.headers", problems))
        except InputError as exc:
            problems.append(f"{where}.request: {exc}")
            continue
        identity = make_identity(str(ident.get("serviceAccount") or ""), str(ident.get("user") or ""),
                                 ident.get("groups") or (), str(ident.get("onBehalfOf") or ""),
                                 ident.get("onBehalfOfGroups") or (), namespace)
        cases.append(Case(str(case.get("name") or where), request, identity, str(connection), str(ctype), expect))
    if problems:
        raise InputError(f"{path}: invalid suite:\n  " + "\n  ".join(problems))
    return policy_files, namespace, cases


def _sql_case(case: dict, defaults: dict, where: str, problems: list[str],
              ctype: Any) -> tuple[HTTPRequest, str] | None:
    """A case stating SQL: (where it runs, the SQL), or None with its problems added."""
    before = len(problems)
    sql = case.get("sql")
    if not isinstance(sql, str) or not sql.strip():
        problems.append(f"{where}.sql: must be a non-empty string of SQL")
    if case.get("request") is not None:
        problems.append(f"{where}: sql and request cannot be combined (a case is SQL or an HTTP request)")
    if ctype not in (None, "postgres") and "type" in case:
        problems.append(f"{where}.type: a sql case runs on a postgres connection, got {ctype!r}")
    try:
        request = sql_request(str(case.get("server", defaults.get("server")) or ""),
                              str(case.get("database", defaults.get("database")) or ""))
    except InputError as exc:
        problems.append(f"{where}.server: {exc}")
    if len(problems) > before:
        return None
    return request, str(sql)


def _suite_request(req: dict, base: Path, headers: list[tuple[str, str]]) -> HTTPRequest:
    if req.get("raw") is not None or req.get("file") is not None:
        if req.get("url") or req.get("method") or req.get("body") is not None:
            raise InputError("raw/file cannot be combined with method/url/body")
        if req.get("raw") is not None:
            return parse_raw_request(str(req["raw"]).encode("utf-8"))
        try:
            return parse_raw_request((base / str(req["file"])).read_bytes())
        except OSError as exc:
            raise InputError(f"{req['file']}: cannot read: {exc.strerror or exc}") from exc
    if not req.get("url"):
        raise InputError("url (or raw, or file) is required")
    body = req.get("body")
    if isinstance(body, (dict, list)):
        data = json.dumps(body).encode()
    else:
        data = str(body).encode() if body is not None else b""
    return request_from_url(str(req.get("method") or ("POST" if data else "GET")), str(req["url"]), headers, data)
