"""The AWS action names a policy may use, so a misspelled rule is refused instead of never matching.

Why: ``match.aws.actions`` is a list of globs over ``service:Operation``. A typo
(``s3:DeleteBuckett``, ``s4:GetObject``) is a syntactically fine glob that matches nothing, so a
block rule written with it silently fails open. Every name is therefore checked against the same
vocabulary the sidecar's AWS classifier (:mod:`.classify.aws`) produces, because a rule only ever
matches what classification yields:

* **service** = the SigV4 *signing name* of the request (``s3``, ``iam``, ``monitoring``,
  ``states``): the classifier takes it from the credential scope, which is what AWS itself checks.
  For almost every service it equals the IAM prefix. Where it does not (CloudWatch's IAM prefix
  is ``cloudwatch`` but its requests are signed ``monitoring``), the error names the spelling that
  matches. The set is :func:`.classify.aws_models.index` (the classifier's own index of botocore's
  models) plus the classifier's signing-name aliases (``s3express``, ``s3-object-lambda``).
* **operation** = a botocore operation name of any botocore service signed with that name
  (``s3`` covers s3 and s3control; ``rds`` covers rds, docdb and neptune), compared
  case-insensitively as IAM does, plus the two invocations the classifier names itself
  (``execute-api:Invoke``, ``lambda:InvokeFunctionUrl``).
* **globs**: a pattern with ``*``/``?`` must match at least one known action; ``s3:Get*`` is
  fine, ``s3:Gte*`` is refused.

IAM-only permission names. A few IAM actions are not API operation names (``s3:ListBucket`` is
the permission for the ListObjects/ListObjectsV2 operations, ``lambda:InvokeFunction`` for
Invoke) and some have no operation at all (``iam:PassRole`` is checked by AWS inside another
service's call; no request names it). Chaperone matches requests, i.e. operations, so such a rule
would never match: :data:`IAM_ONLY` lists the well-known ones (from the AWS Service Authorization
Reference) with the operations to write instead, and the refusal says so.

Cost: the service index reads only the head of each model file (tens of milliseconds, shared
with the classifier); the operation names of a service are read from its ``service-2.json`` on
first use and cached for the life of the process (~20 ms for s3). Only a wildcard *service*
(``*:Delete*``) reads every model, once (about a second). The operator's admission handlers are
synchronous kopf handlers (run in kopf's thread pool), so this never blocks its event loop.
"""

from __future__ import annotations

import difflib
import gzip
import json
import threading
from collections.abc import Iterable
from functools import lru_cache

from .classify import aws_models

# The classifier's own table of signing names no botocore model declares: the same names here.
from .classify.aws import SIGNING_ALIASES
from .globs import GlobSet, is_literal
from .globs import quote as _q

__all__ = ["IAM_ONLY", "action_error", "services", "operations", "warm_up"]

# Operations the classifier names without a botocore model (classify.aws._special).
_SPECIAL_OPERATIONS = {"execute-api": ("Invoke",), "lambda": ("InvokeFunctionUrl",)}

# IAM permission names that are not API operations -> the operations a rule must name instead
# (empty: no request carries that action at all). Source: the AWS Service Authorization
# Reference ("Actions defined by ..." tables), the commonly written ones only.
IAM_ONLY: dict[str, tuple[str, ...]] = {
    "s3:listbucket": ("s3:ListObjects", "s3:ListObjectsV2"),
    "s3:listbucketversions": ("s3:ListObjectVersions",),
    "s3:listallmybuckets": ("s3:ListBuckets",),
    "s3:listbucketmultipartuploads": ("s3:ListMultipartUploads",),
    "s3:listmultipartuploadparts": ("s3:ListParts",),
    "s3:getobjectversion": ("s3:GetObject",),
    "s3:deleteobjectversion": ("s3:DeleteObject",),
    "s3:getobjectversionacl": ("s3:GetObjectAcl",),
    "s3:putobjectversionacl": ("s3:PutObjectAcl",),
    "s3:getobjectversiontagging": ("s3:GetObjectTagging",),
    "s3:putbucketobjectlockconfiguration": ("s3:PutObjectLockConfiguration",),
    "lambda:invokefunction": ("lambda:Invoke", "lambda:InvokeAsync",
                              "lambda:InvokeWithResponseStream"),
    "iam:passrole": (),
    "execute-api:manageconnections": ("execute-api:PostToConnection",
                                      "execute-api:GetConnection", "execute-api:DeleteConnection"),
}

_lock = threading.Lock()
_operations: dict[str, tuple[str, ...]] = {}  # signing name -> operation names (canonical case)


@lru_cache(maxsize=1)
def _by_signing_name() -> dict[str, tuple[str, ...]]:
    """Lower-cased signing name -> botocore service names signed with it (aliases included)."""
    out: dict[str, list[str]] = {}
    for meta in aws_models.index().values():
        out.setdefault(meta.signing_name.lower(), []).append(meta.name)
    for alias, target in SIGNING_ALIASES.items():
        out.setdefault(alias, []).extend(out.get(target, ()))
    for service in _SPECIAL_OPERATIONS:
        out.setdefault(service, [])
    return {key: tuple(names) for key, names in out.items()}


@lru_cache(maxsize=1)
def _signing_of_other_names() -> dict[str, str]:
    """Botocore service names and endpoint prefixes -> their signing name, where they differ
    (``cloudwatch`` -> ``monitoring``, ``emr`` -> ``elasticmapreduce``): the hint for authors who
    wrote the service's everyday or IAM name."""
    out: dict[str, str] = {}
    for meta in aws_models.index().values():
        for other in (meta.name, meta.endpoint_prefix):
            if other.lower() != meta.signing_name.lower():
                out.setdefault(other.lower(), meta.signing_name.lower())
    return out


def services() -> tuple[str, ...]:
    """Every service name a rule may use (lower case, sorted)."""
    return tuple(sorted(_by_signing_name()))


def _model_operations(botocore_name: str) -> list[str]:
    # Only the operation names: json-decode the model file, not botocore's full shape
    # resolution (and not botocore's Loader: aws_models reads the files itself, issue 16). The
    # file is the one the classifier's index read its head from; sdk extras add no operations.
    path = aws_models.model_file(botocore_name)
    if path is None:
        return []
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        return list(json.loads(handle.read()).get("operations", {}))


def operations(service: str) -> tuple[str, ...]:
    """The operation names of a signing name (canonical spelling), read once; () if unknown."""
    key = service.lower()
    cached = _operations.get(key)
    if cached is not None:
        return cached
    names = _by_signing_name().get(key)
    if names is None:
        return ()
    with _lock:  # two admissions at once read each model once
        cached = _operations.get(key)
        if cached is None:
            found: dict[str, None] = {}
            for name in names:
                for op in _model_operations(name):
                    found.setdefault(op)
            for op in _SPECIAL_OPERATIONS.get(key, ()):
                found.setdefault(op)
            cached = _operations[key] = tuple(found)
    return cached


def _suggest(word: str, choices: Iterable[str]) -> str | None:
    by_lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return by_lower[close[0]] if close else None


def _iam_only_error(pattern: str) -> str | None:
    instead = IAM_ONLY.get(pattern.lower())
    if instead is None:
        return None
    if not instead:
        return (f"{_q(pattern)} is an IAM permission that no request names (AWS checks it inside "
                "another service's call), so this rule would never match; name the call that "
                "uses it instead (e.g. iam:CreateRole, lambda:CreateFunction, ec2:RunInstances)")
    names = ", ".join(instead)
    return (f"{_q(pattern)} is an IAM permission name, not an API operation, so this rule would "
            f"never match; Chaperone matches the operations it covers: {names}")


@lru_cache(maxsize=4096)  # pure for a given botocore; policies repeat the same names
def action_error(pattern: str) -> str | None:
    """Why ``pattern`` (a ``service:Operation`` glob, already schema-checked) can never match a
    classified AWS call, with the nearest valid name; ``None`` when it can match."""
    if ":" not in pattern:
        return None  # the schema check reports the shape
    service, _, operation = pattern.partition(":")
    if (why := _iam_only_error(pattern)) is not None:
        return why
    known = _by_signing_name()
    if is_literal(service):
        if service.lower() not in known:
            return _unknown_service(pattern, service, operation)
        matching_services = [service.lower()]
    else:
        globs = GlobSet([service], ignore_case=True)
        matching_services = [s for s in known if globs.match(s)]
        if not matching_services:
            return f"unknown AWS action {_q(pattern)}: no AWS service matches {_q(service)}"
    op_glob = GlobSet([operation], ignore_case=True)
    for name in matching_services:
        if any(op_glob.match(op) for op in operations(name)):
            return None
    if not is_literal(service):
        return f"unknown AWS action {_q(pattern)}: no operation of a matching service matches"
    if not is_literal(operation):
        return f"unknown AWS action {_q(pattern)}: no {service} operation matches {_q(operation)}"
    reason = f"unknown AWS action {_q(pattern)}: {service} has no operation {_q(operation)}"
    if near := _suggest(operation, operations(service)):
        reason += f"; did you mean {service}:{near}?"
    return reason


def _unknown_service(pattern: str, service: str, operation: str) -> str:
    reason = f"unknown AWS action {_q(pattern)}: no AWS service is signed as {_q(service)}"
    signed_as = _signing_of_other_names().get(service.lower())
    if signed_as is not None:
        return (f"{reason}; {service} requests are signed as {_q(signed_as)} and Chaperone names "
                f"services that way: write {signed_as}:{operation}")
    # Short names are one keystroke apart at ratio 0.5 ("s4" vs "s3"); among the close ones,
    # prefer a service that has the operation as written.
    close = difflib.get_close_matches(service.lower(), services(), n=5, cutoff=0.5)
    if is_literal(operation):
        for near in close:
            op = next((o for o in operations(near) if o.lower() == operation.lower()), None)
            if op is not None:
                return f"{reason}; did you mean {near}:{op}?"
    if close:
        return f"{reason}; did you mean {close[0]}?"
    return reason


def warm_up(common: tuple[str, ...] = ("s3", "iam", "sts", "ec2", "lambda")) -> None:
    """Build the service index and the most-named services' operation lists ahead of the first
    admission (the operator starts it in a thread at startup; never on the event loop)."""
    _by_signing_name()
    _signing_of_other_names()
    for service in common:
        operations(service)
