"""``chaperone approve|deny|approvals``: deciding standalone-mode approvals on a laptop.

``chaperone proxy`` (standalone) has no apiserver: a ``requireApproval`` rule opens an
ApprovalRequest as a JSON file in ``<config-dir>/approvals/`` (:class:`~.approvals.local.
LocalApprovalStore`, same object shape as the CRD) and holds the agent's request until it is
decided there. These commands are the approver's side::

    chaperone approvals                      # pending requests (--all: decided ones too)
    chaperone approve NAME [--reason TEXT]   # the held request is released
    chaperone deny NAME [--reason TEXT]      # the agent gets a 403 naming you and the reason

``--config-dir`` is the proxy's (default ``$CHAPERONE_CONFIG_DIR``, else ``~/.chaperone``).
The deciding user is ``--as`` (default ``$USER``). The decision rules are admission's, applied
by ``LocalApprovalStore.decide`` under a file lock: one review per user, N-of-M approvals, a
single denial is final, a final decision never changes, nothing is decided after
``expiresAt``. There is no self-approval check (one local user is requester and approver).

Exit codes: 0 done, 1 refused (unknown name, already final, expired, already reviewed),
2 usage.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .cli import command_parser, dispatch
from .config import standalone_layout
from .timefmt import parse_rfc3339

__all__ = ["register", "main", "pending", "phase_of"]

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2
DEFAULT_CONFIG_DIR = "~/.chaperone"  # the same default as `chaperone proxy --config-dir`


def _config_dir_default() -> str:
    return os.environ.get("CHAPERONE_CONFIG_DIR") or DEFAULT_CONFIG_DIR


def _user_default() -> str:
    return os.environ.get("USER") or os.environ.get("LOGNAME") or "local"


def _common() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--config-dir", default=_config_dir_default(), metavar="DIR",
                        help="the standalone proxy's config directory (default "
                             "$CHAPERONE_CONFIG_DIR, else ~/.chaperone)")
    return parent


def register(subparsers: Any) -> None:
    """Add ``approve``, ``deny`` and ``approvals`` (entry point group ``chaperone.commands``)."""
    common = _common()
    for verb, decision, helptext in (
            ("approve", "Approved", "approve a standalone-mode ApprovalRequest (releases the held call)"),
            ("deny", "Denied", "deny a standalone-mode ApprovalRequest (the agent gets a 403)")):
        p = subparsers.add_parser(verb, parents=[common], help=helptext, description=helptext)
        p.add_argument("name", metavar="NAME", help="the ApprovalRequest (see `chaperone approvals`)")
        p.add_argument("--reason", default="", help="why; recorded and shown to the agent")
        p.add_argument("--as", dest="user", default=_user_default(), metavar="USER",
                       help="who decides (default $USER)")
        p.set_defaults(func=_cmd_decide, decision=decision)
    p = subparsers.add_parser("approvals", parents=[common],
                              help="list standalone-mode ApprovalRequests (pending ones by default)",
                              description="List the ApprovalRequests of the standalone proxy.")
    p.add_argument("--all", action="store_true", help="also decided and expired requests")
    p.add_argument("--json", action="store_true", help="the stored objects as JSON")
    p.set_defaults(func=_cmd_list)


# ---------------------------------------------------------------------------- helpers

def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def phase_of(obj: Mapping[str, Any], now: dt.datetime) -> str:
    """Pending, Approved, Denied or Expired, judged at ``now`` (expiry by the clock too)."""
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    decision = spec.get("decision")
    if decision in ("Approved", "Denied"):
        return decision
    if status.get("phase") in ("Approved", "Denied", "Expired"):
        return status["phase"]
    expires = parse_rfc3339(spec.get("expiresAt"))
    if expires is not None and now >= expires:
        return "Expired"
    return "Pending"


def pending(items: Iterable[Mapping[str, Any]], now: dt.datetime | None = None) -> list[Mapping[str, Any]]:
    now = now or _now()
    return [o for o in items if phase_of(o, now) == "Pending"]


def _human(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 0:
        return "-" + _human(-seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def _requester(spec: Mapping[str, Any]) -> str:
    req = spec.get("requester") or {}
    who = req.get("onBehalfOf") or req.get("creator") or req.get("serviceAccount") or ""
    pod = req.get("pod") or {}
    where = "/".join(x for x in (pod.get("namespace"), pod.get("name")) if x)
    return f"{who} ({where})" if who and where else (who or where or "?")


def _approvers(spec: Mapping[str, Any]) -> str:
    a = spec.get("approvers") or {}
    parts = [*a.get("users", []), *(f"group:{g}" for g in a.get("groups", []))]
    return ", ".join(parts) or "-"


def _cut(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 3] + "..."


def _store(config_dir: str, *, create: bool) -> tuple[Any, Path]:
    """(LocalApprovalStore or None when the directory does not exist, its directory)."""
    from .approvals.local import LocalApprovalStore

    directory = standalone_layout(Path(config_dir).expanduser().resolve())["approvals"]
    if not create and not directory.is_dir():
        return None, directory
    return LocalApprovalStore(directory), directory


# ---------------------------------------------------------------------------- commands

def _cmd_list(args: argparse.Namespace) -> int:
    from .approvals import ApprovalError

    store, directory = _store(args.config_dir, create=False)
    try:
        items = store.list() if store is not None else []
    except ApprovalError as exc:
        print(f"chaperone approvals: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    now = _now()
    shown = items if args.all else pending(items, now)
    if args.json:
        print(json.dumps(shown, indent=2, sort_keys=True))
        return EXIT_OK
    if not shown:
        print(f"no {'' if args.all else 'pending '}approval requests in {directory}")
        return EXIT_OK
    rows = []
    for obj in shown:
        spec = obj.get("spec") or {}
        action = spec.get("action") or {}
        rule = spec.get("rule") or {}
        expires = parse_rfc3339(spec.get("expiresAt"))
        phase = phase_of(obj, now)
        if phase == "Pending" and expires is not None:
            phase = f"Pending ({_human((expires - now).total_seconds())} left)"
        elif phase in ("Approved", "Denied") and spec.get("decidedBy"):
            phase = f"{phase} by {spec['decidedBy']}"
        rows.append([(obj.get("metadata") or {}).get("name", "?"), phase,
                     (obj.get("status") or {}).get("approvals") or f"0/{spec.get('minApprovals', 1)}",
                     spec.get("connection", ""),
                     _cut(action.get("summary") or action.get("name") or "?", 60),
                     _requester(spec), f"{rule.get('policy', '')}#{rule.get('name', '')}",
                     _approvers(spec)])
    header = ["NAME", "PHASE", "APPROVALS", "CONNECTION", "ACTION", "REQUESTER", "RULE", "APPROVERS"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK


def _cmd_decide(args: argparse.Namespace) -> int:
    from .approvals import ApprovalError

    verb = "approve" if args.decision == "Approved" else "deny"
    store, directory = _store(args.config_dir, create=False)
    if store is None:
        print(f"chaperone {verb}: no approval requests in {directory} (is --config-dir the "
              "proxy's?)", file=sys.stderr)
        return EXIT_REFUSED
    try:
        obj = store.decide(args.name, args.decision, args.user, args.reason)
    except ApprovalError as exc:
        print(f"chaperone {verb}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    action = (spec.get("action") or {}).get("summary") or (spec.get("action") or {}).get("name") or "?"
    if spec.get("decision"):
        done = "approved" if spec["decision"] == "Approved" else "denied"
        print(f"approvalrequest {args.name} {done} by {spec.get('decidedBy')} "
              f"({status.get('approvals', '')}): {action}")
    else:
        print(f"approvalrequest {args.name}: approval by {args.user} recorded "
              f"({status.get('approvals', '')}); more approvals are needed: {action}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """``chaperone`` with only these commands (tests, and use without installed entry points)."""
    return dispatch(command_parser(register), argv)


if __name__ == "__main__":
    sys.exit(main())
