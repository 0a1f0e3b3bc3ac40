"""``chaperone sessions list|show|replay|verify``: recorded sessions for people and scripts.

Source: ``--s3-bucket B [--s3-endpoint URL] [--s3-prefix P]`` or ``--dir PATH`` (the layout
standalone mode writes). Defaults come from ``CHAPERONE_RECORDING_BUCKET`` /
``CHAPERONE_RECORDING_DIR``; S3 credentials and region are boto3's usual ones.

Exit codes: 0 fine, 1 verification failed, 2 usage (bad arguments, no source, no key),
3 session or source not found / unreachable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Iterable
from typing import Any

from ..cli import command_parser, dispatch
from .events import who
from .manifest import KeyFileError, load_key
from .reader import SessionNotFound, find_session, list_sessions, load_session, open_store, verify_session
from .transcript import format_line, transcript_line

EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND = 1, 2, 3


def _source_args() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    source = parent.add_argument_group("source (one of)")
    source.add_argument("--s3-bucket", default=os.environ.get("CHAPERONE_RECORDING_BUCKET"),
                        metavar="BUCKET", help="S3 bucket holding sessions/ (env CHAPERONE_RECORDING_BUCKET)")
    source.add_argument("--s3-endpoint", metavar="URL", help="S3-compatible endpoint URL")
    source.add_argument("--s3-prefix", default="", metavar="PREFIX", help="key prefix before sessions/")
    source.add_argument("--dir", default=os.environ.get("CHAPERONE_RECORDING_DIR"), metavar="PATH",
                        help="local directory with the same layout (env CHAPERONE_RECORDING_DIR)")
    parent.add_argument("--json", action="store_true", help="machine-readable output")
    return parent


def register(subparsers: Any) -> None:
    """Add ``sessions`` to the ``chaperone`` command (entry point ``chaperone.commands``)."""
    parent = _source_args()
    sessions = subparsers.add_parser("sessions", help="list, show, replay and verify recorded sessions",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = sessions.add_subparsers(dest="sessions_action", metavar="ACTION")
    actions.required = True

    p = actions.add_parser("list", parents=[parent], help="sessions in the store")
    p.add_argument("--namespace", help="only this namespace")
    p.add_argument("--pod", help="only this pod (with --namespace)")
    p.set_defaults(func=_run(cmd_list))

    p = actions.add_parser("show", parents=[parent], help="a session's manifest and chunks")
    p.add_argument("session", help="session id, or namespace/pod/session")
    p.set_defaults(func=_run(cmd_show))

    p = actions.add_parser("replay", parents=[parent], help="a session as a readable timeline")
    p.add_argument("session", help="session id, or namespace/pod/session")
    p.add_argument("--body-limit", type=int, default=200, metavar="N",
                   help="show at most N characters of each (masked) body; 0 hides bodies")
    p.add_argument("--events", action="store_true", help="one row per event instead of per flow")
    p.set_defaults(func=_run(cmd_replay))

    p = actions.add_parser("verify", parents=[parent], help="check chain, chunk digests and signature")
    p.add_argument("session", nargs="?", help="session id, or namespace/pod/session")
    p.add_argument("--all", action="store_true", help="verify every session in the store")
    p.add_argument("--key", default=os.environ.get("CHAPERONE_RECORDING_KEY_FILE"), metavar="FILE",
                   help="HMAC secret or Ed25519 public key (env CHAPERONE_RECORDING_KEY_FILE)")
    p.add_argument("--skip-signature", action="store_true",
                   help="check chain and digests only (a rewritten session can then pass)")
    p.set_defaults(func=_run(cmd_verify))


class UsageError(Exception):
    pass


def _run(command: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            if bool(args.s3_bucket) == bool(args.dir):
                raise UsageError("give exactly one source: --s3-bucket BUCKET or --dir PATH")
            store = open_store(bucket=args.s3_bucket or None, endpoint=args.s3_endpoint,
                               prefix=args.s3_prefix, directory=args.dir or None)
            return command(store, args)
        except UsageError as exc:
            print(f"chaperone sessions: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except SessionNotFound as exc:
            print(f"chaperone sessions: {exc}", file=sys.stderr)
            return EXIT_NOT_FOUND
        except Exception as exc:  # the store is unreachable, credentials are wrong, ...
            if not isinstance(exc, OSError) and not type(exc).__module__.startswith("botocore"):
                raise
            print(f"chaperone sessions: cannot read the store: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
            return EXIT_NOT_FOUND
    return run


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str))


def _table(rows: Iterable[list[str]], header: list[str]) -> None:
    rows = [header, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def cmd_list(store: Any, args: argparse.Namespace) -> int:
    summaries = list_sessions(store, namespace=args.namespace, pod=args.pod)
    if args.json:
        _print_json([s.to_dict() for s in summaries])
        return 0
    if not summaries:
        print(f"no sessions in {store.description}")
        return 0
    _table(([s.ref.session, s.ref.namespace, s.ref.pod, s.status,
             str(s.to_dict()["events"] if s.manifest else "?"),
             (s.manifest or {}).get("startTime", ""), who((s.manifest or {}).get("identity"))]
            for s in summaries),
           ["SESSION", "NAMESPACE", "POD", "STATUS", "EVENTS", "START", "WHO"])
    return 0


def cmd_show(store: Any, args: argparse.Namespace) -> int:
    session = load_session(store, find_session(store, args.session))
    events = session.events
    by_type = dict(Counter(e.get("type") for e in events))
    info = {"session": str(session.ref), "status": "closed" if session.manifest else "open",
            "manifest": session.manifest, "chunks": [k for k, _ in session.chunks],
            "eventsStored": len(events), "byType": by_type}
    if args.json:
        _print_json(info)
        return 0
    m = session.manifest or {}
    print(f"session   {session.ref}  ({info['status']})")
    print(f"identity  {who(m.get('identity') or (events[0].get('identity') if events else {}))}"
          f"  {json.dumps(m.get('identity', {}), sort_keys=True)}")
    print(f"time      {m.get('startTime', '?')} .. {m.get('endTime', '(open)')}"
          f"  end: {m.get('endReason', '-')}")
    print(f"events    {len(events)}  " + ", ".join(f"{k} {v}" for k, v in sorted(by_type.items())))
    signature = m.get("signature") or {}
    print(f"signature {signature.get('alg', 'none')} {signature.get('keyId', '')}")
    for key, data in session.chunks:
        print(f"  {key}  {len(data)} bytes")
    return 0


def _body(stored: Any, limit: int) -> str | None:
    if not isinstance(stored, dict) or limit <= 0:
        return None
    if "base64" in stored:
        return f"<binary, {stored.get('size', '?')} bytes>"
    text = str(stored.get("text", ""))
    if not text:
        return None
    if len(text) > limit:
        text = text[:limit] + f"... (+{len(text) - limit} chars)"
    return text.replace("\n", "\\n")


def _what(event: dict[str, Any]) -> str:
    data = event.get("data") or {}
    kind = event.get("type")
    if kind == "request":
        action = data.get("action")
        if isinstance(action, dict):
            action = action.get("summary") or action.get("action") or action.get("name")
        target = " ".join(str(x) for x in (data.get("method"), data.get("url")) if x)
        return " ".join(str(x) for x in (action, target) if x) or "request"
    if kind == "response":
        return f"-> {data.get('status', '?')}"
    if kind == "error":
        return f"error {data.get('kind', '')}: {data.get('message', '')}".strip()
    if kind in ("session-start", "session-end"):
        return " ".join([kind, *(f"{k}={v}" for k, v in sorted(data.items()) if not isinstance(v, dict))])
    return kind or "?"


def timeline(events: list[dict[str, Any]], *, per_event: bool = False,
             body_limit: int = 200) -> list[dict[str, Any]]:
    """Rows of the replay: one per flow (request, decision, approval, response merged) or
    one per event; events without a flow always get their own row."""
    rows: list[dict[str, Any]] = []
    by_flow: dict[str, dict[str, Any]] = {}
    for event in events:
        data, flow = event.get("data") or {}, event.get("flow")
        row = None if per_event or not flow else by_flow.get(flow)
        if row is None:
            row = {"seq": event.get("seq"), "time": event.get("time"), "flow": flow,
                   "who": who(event.get("identity")), "what": _what(event), "decision": None,
                   "rule": None, "approver": None, "status": None, "events": []}
            rows.append(row)
            if flow and not per_event:
                by_flow[flow] = row
        row["events"].append(event.get("seq"))
        kind = event.get("type")
        if kind == "request":
            row["what"], row["requestBody"] = _what(event), _body(data.get("body"), body_limit)
            decided = data.get("decision")  # merged into the request event since issue 16
            if isinstance(decided, dict):
                row["decision"] = decided.get("effect")
                row["rule"] = _rule(decided.get("rule")) or row["rule"]
        elif kind == "decision":  # its own event: older recordings, or a decision changed later
            row["decision"] = data.get("effect") or data.get("decision")
            row["rule"] = _rule(data.get("rule")) or row["rule"]
        elif kind == "approval":
            state = data.get("state") or data.get("phase")
            row["approval"] = " ".join(str(x) for x in (data.get("name"), state) if x)
            row["approver"] = data.get("approver") or data.get("decidedBy") or row["approver"]
            row["rule"] = row["rule"] or _rule(data.get("rule"))
        elif kind == "response":
            row["status"], row["responseBody"] = data.get("status"), _body(data.get("body"), body_limit)
            if per_event:
                row["what"] = _what(event)
        elif kind == "stream":  # an exec/attach/port-forward session's content (transcript.py)
            line = transcript_line(event)
            if line is not None:
                row.setdefault("transcript", []).append(line)
    return rows


def _rule(rule: Any) -> str | None:
    """``policy#name`` for the rule object the sidecar records (a string passes through)."""
    if isinstance(rule, dict):
        return "#".join(str(rule[k]) for k in ("policy", "name") if rule.get(k)) or None
    return rule or None


def tool_use_links(events: list[dict[str, Any]], body_limit: int = 200) -> list[dict[str, Any]]:
    """"The model asked X -> the agent did Y": each recorded ``tool-use`` (addons/tool_use.py)
    with the request events whose ``causedBy`` names it (evidence of a content match within a
    time window, not proof: docs/tool-use.md)."""
    asked: dict[str, dict[str, Any]] = {}
    for event in events:
        data = event.get("data") or {}
        if event.get("type") == "tool-use" and data.get("id"):
            blocked = data.get("blocked") or None
            asked.setdefault(str(data["id"]), {
                "toolUseId": data["id"], "name": data.get("name"), "seq": event.get("seq"),
                "time": event.get("time"), "model": data.get("model"), "llmFlow": data.get("llmFlow"),
                "input": _body(data.get("input"), body_limit),
                "blocked": _rule((blocked or {}).get("rule")) if blocked else None,
                "replaced": bool(data.get("replaced")), "actions": []})
    # a decision of its own event (postgres units; a re-judged flow): the latest per flow
    decisions = {e.get("flow"): (e.get("data") or {}).get("effect") for e in events
                 if e.get("type") == "decision" and e.get("flow")}
    for event in events:
        data = event.get("data") or {}
        cause = data.get("causedBy")
        if event.get("type") != "request" or not isinstance(cause, dict):
            continue
        entry = asked.setdefault(str(cause.get("toolUseId")), {
            "toolUseId": cause.get("toolUseId"), "name": cause.get("name"), "seq": None,
            "time": None, "model": None, "llmFlow": cause.get("flow"), "input": None,
            "blocked": None, "replaced": bool(cause.get("blocked")), "actions": []})
        decided: dict[str, Any] = data["decision"] if isinstance(data.get("decision"), dict) else {}
        entry["actions"].append({"seq": event.get("seq"), "flow": event.get("flow"),
                                 "what": _what(event), "score": cause.get("score"),
                                 "reason": cause.get("reason"),
                                 "decision": decisions.get(event.get("flow")) or decided.get("effect")})
    return sorted(asked.values(), key=lambda e: (e["seq"] is None, e["seq"] or 0))


def _print_tool_use_links(links: list[dict[str, Any]]) -> None:
    if not links:
        return
    print("\nthe model asked -> the agent did:")
    for link in links:
        seq = f"#{link['seq']}" if link["seq"] is not None else "(not in this session)"
        state = f"  BLOCKED by {link['blocked']}, the agent got a refusal text" if link["blocked"] else (
            "  (withheld: incomplete)" if link["replaced"] else "")
        print(f"  {seq:6} tool_use {link['toolUseId']} {link['name']}: {link['input'] or ''}{state}")
        for action in link["actions"]:
            decided = f" [{action['decision']}]" if action.get("decision") else ""
            print(f"    -> #{action['seq']} {action['what']}{decided}  "
                  f"(score {action['score']}: {action['reason']})")
        if not link["actions"]:
            print("    -> no later action of the pod matched it")


def cmd_replay(store: Any, args: argparse.Namespace) -> int:
    session = load_session(store, find_session(store, args.session))
    rows = timeline(session.events, per_event=args.events, body_limit=args.body_limit)
    links = tool_use_links(session.events, args.body_limit)
    if args.json:
        _print_json({"session": str(session.ref), "manifest": session.manifest, "timeline": rows,
                     "toolUses": links})
        return 0
    m = session.manifest or {}
    print(f"session {session.ref}  {m.get('startTime', '?')} .. {m.get('endTime', '(open)')}")
    for row in rows:
        time = str(row["time"] or "")[11:23]
        extra = [f"{k}={row[k]}" for k in ("decision", "rule", "approval", "approver", "status")
                 if row.get(k) not in (None, "")]
        print(f"{time:12}  #{row['seq']!s:<5} {row['who'][:28]:28}  {row['what']}"
              + (f"  [{' '.join(extra)}]" if extra else ""))
        for label in ("requestBody", "responseBody"):
            if row.get(label):
                print(f"{'':21}{label[:-4]:8} {row[label]}")
        for line in row.get("transcript", ()):
            print("\n".join(format_line(line)))
    _print_tool_use_links(links)
    return 0


def cmd_verify(store: Any, args: argparse.Namespace) -> int:
    if bool(args.session) == bool(args.all):
        raise UsageError("give a session or --all")
    if args.key is None and not args.skip_signature:
        raise UsageError("--key FILE is needed to check the manifest signature "
                         "(or --skip-signature to check only the chain and digests)")
    try:
        key = None if args.skip_signature else load_key(args.key)
    except KeyFileError as exc:
        raise UsageError(str(exc)) from None
    refs = [s.ref for s in list_sessions(store, with_manifests=False)] if args.all \
        else [find_session(store, args.session)]
    reports = [verify_session(store, ref, key) for ref in refs]
    if args.json:
        _print_json([r.to_dict() for r in reports] if args.all else reports[0].to_dict())
    else:
        for r in reports:
            if r.ok:
                print(f"OK      {r.ref}: {r.events} events in {r.chunks} chunks, chain intact, "
                      f"signature {r.signature}")
                continue
            print(f"FAILED  {r.ref}: {len(r.problems)} problem(s); first broken link:")
            for problem in r.problems[:20]:
                print(f"  - {problem}")
    return 0 if all(r.ok for r in reports) else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    """``chaperone`` with only the ``sessions`` command (for tests and direct use)."""
    return dispatch(command_parser(register), argv)


if __name__ == "__main__":
    sys.exit(main())
