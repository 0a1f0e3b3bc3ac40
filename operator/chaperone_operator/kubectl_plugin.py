"""``kubectl chaperone list|show|approve|deny``: the approver's side of ApprovalRequests.

Installed as the console script ``kubectl-chaperone``; kubectl runs any ``kubectl-*`` executable
on ``PATH`` as a plugin, passing every argument after the plugin name (kubectl refuses global
flags placed *before* it, so ``kubectl chaperone list --context X``, not ``kubectl --context X
chaperone list``). The plugin talks to the API itself with the ``kubernetes`` client and the
user's own kubeconfig: ``--kubeconfig`` or ``KUBECONFIG`` (a ``:``-separated list is merged),
``--context``, ``-n/--namespace`` (default: the context's namespace, else ``default``), ``-A``,
and ``--as``/``--as-group`` impersonation like kubectl's.

Why approving is a bare merge patch: ``approve NAME --reason R`` sends exactly
``{"spec":{"decision":"Approved","reason":R}}``, the same request as the documented manual
``kubectl patch ar NAME --type=merge -p ...``. The plugin never sends ``decidedBy`` or reviews
and never pre-checks anything: admission stamps the authenticated identity and is the only
judge of self-approval, non-approvers, expiry and final decisions. Its refusals are printed
verbatim (``Error from server (REASON): MESSAGE``) with exit code 1. Output formats live in
:mod:`.kubectl_format`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

from chaperone_sidecar.api import APPROVAL_REQUESTS, GROUP, VERSION

from .approvals import APPROVED, DENIED, PENDING
from .kubectl_format import TABLE_COLUMNS, decision_result, describe, phase_of, sort_requests, table, table_rows

__all__ = ["ApprovalRequests", "Connection", "build_parser", "connect", "decision_patch", "main",
           "run"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class ApprovalAPI(Protocol):
    """What the commands need from the API (a fake implements it in unit tests)."""

    def list(self, namespace: str | None) -> list[dict]: ...
    def get(self, namespace: str, name: str) -> dict: ...
    def patch(self, namespace: str, name: str, body: dict) -> dict: ...


class ApprovalRequests:
    """``chaperone.dev/v1alpha1`` approvalrequests through ``CustomObjectsApi``."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self._api = client.CustomObjectsApi(api_client)

    def list(self, namespace: str | None) -> list[dict]:
        if namespace is None:
            result = self._api.list_cluster_custom_object(GROUP, VERSION, APPROVAL_REQUESTS)
        else:
            result = self._api.list_namespaced_custom_object(GROUP, VERSION, namespace, APPROVAL_REQUESTS)
        return list(result.get("items") or [])

    def get(self, namespace: str, name: str) -> dict:
        return self._api.get_namespaced_custom_object(GROUP, VERSION, namespace, APPROVAL_REQUESTS, name)

    def patch(self, namespace: str, name: str, body: dict) -> dict:
        # The client sends custom-object patches as application/merge-patch+json: exactly
        # `kubectl patch --type=merge` (a test against the apiserver holds it to that).
        return self._api.patch_namespaced_custom_object(GROUP, VERSION, namespace, APPROVAL_REQUESTS, name, body)


@dataclass
class Connection:
    """An API handle and the namespace the context (or ``-n``) selects."""

    api: ApprovalAPI
    namespace: str


class PluginError(Exception):
    """A failure reported as ``error: ...`` with exit code 1 (bad kubeconfig, no such context)."""


def connect(args: argparse.Namespace) -> Connection:
    """Load the user's kubeconfig as kubectl would and return the API handle."""
    from kubernetes import client
    from kubernetes import config as k8s_config
    from kubernetes.config.config_exception import ConfigException

    config_file = args.kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    try:
        contexts, current = k8s_config.list_kube_config_contexts(config_file=config_file)
        name = args.context or (current or {}).get("name")
        chosen = next((c for c in contexts if c.get("name") == name), None)
        if chosen is None:
            raise PluginError(f"context {name!r} not found in {config_file}")
        configuration = client.Configuration()
        k8s_config.load_kube_config(config_file=config_file, context=name,
                                    client_configuration=configuration, persist_config=False)
    except ConfigException as exc:
        raise PluginError(f"cannot load kubeconfig {config_file}: {exc}") from None
    configuration.retries = 0  # an unreachable apiserver fails now, not after 3 retries
    api_client = client.ApiClient(configuration)
    if args.as_user:
        api_client.set_default_header("Impersonate-User", args.as_user)
    if args.as_group:
        api_client.set_default_header("Impersonate-Group", args.as_group)
    namespace = args.namespace or (chosen.get("context") or {}).get("namespace") or "default"
    return Connection(ApprovalRequests(api_client), namespace)


def decision_patch(decision: str, reason: str | None) -> dict:
    """The merge patch an approver sends: decision and, when given, reason. Nothing else."""
    spec: dict[str, str] = {"decision": decision}
    if reason is not None:
        spec["reason"] = reason
    return {"spec": spec}


# ---------------------------------------------------------------------------- commands

def _dump(obj: Any, fmt: str) -> str:
    if fmt == "yaml":
        import yaml

        return yaml.safe_dump(obj, sort_keys=False)
    return json.dumps(obj, indent=2) + "\n"


def cmd_list(args, conn: Connection, now: dt.datetime, out: TextIO, err: TextIO) -> int:
    namespace = None if args.all_namespaces else conn.namespace
    items: list[Mapping] = list(conn.api.list(namespace))
    if not args.all:
        items = [o for o in items if phase_of(o, now)[0] == PENDING]
    items = sort_requests(items, now)
    if args.output in ("json", "yaml"):
        out.write(_dump({"apiVersion": "v1", "kind": "List", "items": items}, args.output))
        return EXIT_OK
    if not items:
        where = "any namespace" if namespace is None else f"namespace {namespace}"
        what = "approval requests" if args.all else "pending approval requests"
        err.write(f"No {what} in {where}.\n")
        return EXIT_OK
    headers = (["NAMESPACE"] if namespace is None else []) + list(TABLE_COLUMNS)
    out.write(table(headers, table_rows(items, now, with_namespace=namespace is None)))
    return EXIT_OK


def cmd_show(args, conn: Connection, now: dt.datetime, out: TextIO, err: TextIO) -> int:
    obj = conn.api.get(conn.namespace, args.name)
    out.write(_dump(obj, args.output) if args.output in ("json", "yaml") else describe(obj, now))
    return EXIT_OK


def cmd_decide(args, conn: Connection, now: dt.datetime, out: TextIO, err: TextIO) -> int:
    decision = APPROVED if args.command == "approve" else DENIED
    stored = conn.api.patch(conn.namespace, args.name, decision_patch(decision, args.reason))
    out.write(decision_result(stored, decision) + "\n")
    return EXIT_OK


COMMANDS: dict[str, Callable[..., int]] = {
    "list": cmd_list, "show": cmd_show, "approve": cmd_decide, "deny": cmd_decide,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubectl chaperone",
        description="List, inspect and decide Chaperone ApprovalRequests (chaperone.dev/v1alpha1).",
        epilog="Approving sends the same merge patch as: kubectl patch ar NAME --type=merge "
               "-p '{\"spec\":{\"decision\":\"Approved\"}}'. Admission records who you are.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--kubeconfig", help="path to the kubeconfig (default: $KUBECONFIG, ~/.kube/config)")
    common.add_argument("--context", help="kubeconfig context (default: the current context)")
    common.add_argument("-n", "--namespace", help="namespace (default: the context's)")
    common.add_argument("--as", dest="as_user", metavar="USER", help="impersonate USER")
    common.add_argument("--as-group", dest="as_group", metavar="GROUP",
                        help="impersonate GROUP (with --as)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    lister = sub.add_parser("list", parents=[common], help="list approval requests (pending first)",
                            description="Pending requests, soonest deadline first.")
    lister.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")
    lister.add_argument("--all", action="store_true", help="include decided and expired requests")
    lister.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")

    show = sub.add_parser("show", parents=[common], help="everything an approver needs to decide")
    show.add_argument("name", metavar="NAME")
    show.add_argument("-o", "--output", choices=("text", "json", "yaml"), default="text")

    for verb, helptext in (("approve", "approve a request"), ("deny", "deny a request (final)")):
        decide = sub.add_parser(verb, parents=[common], help=helptext)
        decide.add_argument("name", metavar="NAME")
        decide.add_argument("--reason", help="reason recorded with your review")
    return parser


def _api_error(exc: Any) -> str:
    """kubectl's ``Error from server (Reason): message`` with the apiserver's message verbatim."""
    body = getattr(exc, "body", None)
    try:
        status = json.loads(body) if body else None
    except (TypeError, ValueError):
        status = None
    if isinstance(status, dict) and status.get("message"):
        return f"Error from server ({status.get('reason') or exc.reason}): {status['message']}"
    return f"Error from server ({exc.status} {exc.reason}): {body or ''}".rstrip()


def run(argv: list[str] | None = None, *,
        connector: Callable[[argparse.Namespace], Connection] = connect,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Parse ``argv``, run the command, return the exit code (0 ok, 1 refused/error, 2 usage)."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    out, err = out or sys.stdout, err or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.as_group and not args.as_user:
        err.write("error: --as-group requires --as\n")
        return EXIT_USAGE
    try:
        conn = connector(args)
        return COMMANDS[args.command](args, conn, now(), out, err)
    except ApiException as exc:
        err.write(_api_error(exc) + "\n")
    except PluginError as exc:
        err.write(f"error: {exc}\n")
    except HTTPError as exc:
        err.write(f"error: cannot reach the API server: {exc}\n")
    return EXIT_ERROR


def main() -> int:
    """Console-script entry point ``kubectl-chaperone``."""
    return run(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
