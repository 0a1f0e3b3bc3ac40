"""Botocore's own service models, distilled into what the AWS classifier needs.

Why botocore's models: they are the authoritative, machine-readable description of every AWS
API (operation names, HTTP bindings, target prefixes, signing names) and they ship with boto3,
which the sidecar already depends on. Hand-written tables would drift; these update with boto3.

Two levels, both built lazily and cached for the life of the process (the classifier is on the
hot path of every proxied flow):

* ``index()``: one ``ServiceMeta`` per botocore service (signing name, endpoint prefix, target
  prefix, protocols), read from only the *head* of each ``service-2.json(.gz)`` file, where the
  ``metadata`` object sits. Parsing all ~420 models in full takes seconds; reading the heads
  takes tens of milliseconds, so the signing-name -> service mapping is complete from the
  first call instead of guessed.
* ``service(name)``: the full model of one service, read (not cached: the raw model is
  megabytes) and reduced to compact ``OperationInfo`` records plus a REST URI matcher (see
  ``aws_rest``).

**The model files are read here, not through botocore's ``Loader``** (issue 16). Importing
``botocore.loaders`` pulls in ``botocore.compat``/``botocore.utils`` and with them urllib3,
dateutil, ``xml.etree`` and botocore's HTTP session: ~4 MB of idle RSS in every sidecar,
whether or not it has an AWS connection (and the policy compiler checks AWS action names in
every pod: ``policy/aws_catalog.py``). What the loader does for ``service-2`` is small and
written down in botocore: the search path ``~/.aws/models`` then ``botocore/data`` (found with
``importlib.util.find_spec``, which does not execute botocore's ``__init__``); a service is a
directory holding an API-version directory with ``service-2.json`` or ``service-2.json.gz``;
the latest version is the last in sorted order; the first search path holding the file wins;
``service-2.sdk-extras.json`` next to it is deep-merged into the model (``ExtrasProcessor``).
:func:`available_services`, :func:`model_file` and :func:`load_model` do exactly that;
``tests/sidecar/policy/classify/test_aws_models.py`` checks them against botocore's
``Loader`` for every service.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
import threading
from dataclasses import dataclass
from functools import lru_cache

from .aws_rest import RestMatcher, RestTemplate, compile_template

# Members whose values name the thing acted on (RoleName, PolicyArn, SecretId, QueueUrl,
# InstanceIds, TableName, DBInstanceIdentifier...): AWSAction.resources for every service.
_IDENTIFIER_RE = re.compile(
    r"(Name|Names|Id|Ids|ID|IDs|Identifier|Identifiers|Arn|Arns|ARN|ARNs|Url|URL|Bucket)$"
)
# Members that look like identifiers but only add noise to a resource list.
_NOT_IDENTIFIERS = frozenset({"ExpectedBucketOwner", "ClientRequestToken", "RequestId"})

_HEAD_CHARS = 16384  # the metadata object is well inside the first few KB of every model


@dataclass(frozen=True)
class ServiceMeta:
    name: str  # botocore service name ("s3", "cloudwatch", "stepfunctions")
    signing_name: str  # SigV4 scope service ("s3", "monitoring", "states")
    endpoint_prefix: str  # first host label ("s3", "monitoring", "states")
    target_prefix: str  # X-Amz-Target prefix for json/cbor protocols ("secretsmanager")
    protocols: tuple[str, ...]  # "query", "json", "rest-json", "rest-xml", "ec2", ...
    query_compatible: bool  # json service that still accepts the old query protocol (SQS)


@dataclass(frozen=True)
class Member:
    """A top-level input member that identifies a resource, and where it travels on the wire."""

    name: str
    location: str  # "uri" | "querystring" | "header" | "body"
    wire_name: str  # key in the query/form params, JSON body, header or URI label
    required: bool


@dataclass(frozen=True)
class OperationInfo:
    name: str
    method: str
    deprecated: bool
    identifiers: tuple[Member, ...]


@dataclass
class ServiceModel:
    meta: ServiceMeta
    operations: dict[str, OperationInfo]
    by_lower_name: dict[str, str]  # lower-cased operation name -> canonical name
    rest: RestMatcher | None

    def canonical_operation(self, name: str) -> str | None:
        """The model's spelling of an operation name given in any case, or None."""
        if name in self.operations:
            return name
        return self.by_lower_name.get(name.lower())


# --- level 1: the metadata index -----------------------------------------------------------


def _read_head(path: str) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return handle.read(_HEAD_CHARS)


def _metadata_from_head(head: str) -> dict | None:
    """Decode just the ``"metadata": {...}`` object from the start of a model file."""
    at = head.find('"metadata"')
    if at < 0:
        return None
    brace = head.find("{", at)
    try:
        value, _ = json.JSONDecoder().raw_decode(head, brace)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _meta_from_dict(name: str, md: dict) -> ServiceMeta:
    protocols = md.get("protocols") or [md.get("protocol", "")]
    endpoint_prefix = md.get("endpointPrefix", name)
    return ServiceMeta(
        name=name,
        signing_name=md.get("signingName") or endpoint_prefix,
        endpoint_prefix=endpoint_prefix,
        target_prefix=md.get("targetPrefix", ""),
        protocols=tuple(p for p in protocols if p),
        query_compatible="awsQueryCompatible" in md,
    )


_JSON_SUFFIXES = (".json", ".json.gz")  # botocore's JSONFileLoader tries them in this order
_TYPE = "service-2"


@lru_cache(maxsize=1)
def search_paths() -> tuple[str, ...]:
    """Where botocore's default ``Loader()`` looks for models, in its order."""
    spec = importlib.util.find_spec("botocore")  # locates the package without importing it
    builtin = [os.path.join(p, "data") for p in (spec.submodule_search_locations or ())] if spec else []
    return (os.path.join(os.path.expanduser("~"), ".aws", "models"), *builtin)


def _has_type(version_dir: str, type_name: str = _TYPE) -> bool:
    return any(os.path.isfile(os.path.join(version_dir, type_name + s)) for s in _JSON_SUFFIXES)


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def available_services() -> list[str]:
    """Every service with a ``service-2`` model on the search path, sorted (as botocore's
    ``Loader.list_available_services('service-2')``)."""
    found: set[str] = set()
    for base in search_paths():
        for name in _listdir(base):
            service_dir = os.path.join(base, name)
            if os.path.isdir(service_dir) and any(
                    _has_type(os.path.join(service_dir, v)) for v in _listdir(service_dir)):
                found.add(name)
    return sorted(found)


def latest_version(service: str) -> str | None:
    """The service's latest API version holding a ``service-2`` model (sorted, last)."""
    versions = {v for base in search_paths() for v in _listdir(os.path.join(base, service))
                if _has_type(os.path.join(base, service, v))}
    return max(versions) if versions else None


def _find(service: str, version: str, type_name: str) -> str | None:
    for base in search_paths():
        for suffix in _JSON_SUFFIXES:
            candidate = os.path.join(base, service, version, type_name + suffix)
            if os.path.isfile(candidate):
                return candidate
    return None


def model_file(service: str) -> str | None:
    """Path of the latest ``service-2.json(.gz)`` of ``service``; None if there is none."""
    version = latest_version(service)
    return _find(service, version, _TYPE) if version else None


def _read_json(path: str) -> dict:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        return json.loads(handle.read().decode("utf-8"))


def _deep_merge(base: dict, extra: dict) -> None:
    # botocore.utils.deep_merge: dicts on both sides merge, anything else replaces
    for key, value in extra.items():
        if isinstance(base.get(key), dict) and isinstance(value, dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value


def load_model(service: str) -> dict | None:
    """The full ``service-2`` model with its sdk extras merged in (as botocore's
    ``Loader.load_service_model(service, 'service-2')``); None if the service has none."""
    version = latest_version(service)
    path = _find(service, version, _TYPE) if version else None
    if path is None:
        return None
    model = _read_json(path)
    extras = _find(service, version, _TYPE + ".sdk-extras")  # type: ignore[arg-type]
    if extras is not None:
        merge = _read_json(extras).get("merge")
        if isinstance(merge, dict):
            _deep_merge(model, merge)
    return model


@lru_cache(maxsize=1)
def index() -> dict[str, ServiceMeta]:
    """Every botocore service's metadata, keyed by botocore service name (built once)."""
    result: dict[str, ServiceMeta] = {}
    for service in available_services():
        md = None
        try:
            path = model_file(service)
            if path is not None:
                md = _metadata_from_head(_read_head(path))
            if md is None:  # unusual layout: pay for a full load of this one model
                md = (load_model(service) or {}).get("metadata", {})
        except Exception:  # a broken model file must not take the whole index down
            continue
        result[service] = _meta_from_dict(service, md)
    return result


def _ordered(metas: list[ServiceMeta], preferred: str) -> tuple[ServiceMeta, ...]:
    # The service whose botocore name equals the signing name first (s3 before s3control,
    # rds before docdb/neptune, which share operation names and IAM prefix anyway).
    return tuple(sorted(metas, key=lambda m: (m.name != preferred, m.name)))


@lru_cache(maxsize=1)
def _lookups() -> tuple[dict[str, tuple[ServiceMeta, ...]], dict[str, tuple[ServiceMeta, ...]]]:
    # Whole maps built once, not a cache per looked-up key: the keys come from requests (an
    # agent chooses its Host and scope), so per-key caching would grow without bound.
    signing: dict[str, list[ServiceMeta]] = {}
    endpoint: dict[str, list[ServiceMeta]] = {}
    for meta in index().values():
        signing.setdefault(meta.signing_name, []).append(meta)
        endpoint.setdefault(meta.endpoint_prefix, []).append(meta)
    return (
        {key: _ordered(metas, key) for key, metas in signing.items()},
        {key: _ordered(metas, key) for key, metas in endpoint.items()},
    )


def by_signing_name(signing_name: str) -> tuple[ServiceMeta, ...]:
    """Services whose requests are signed with this SigV4 scope service name."""
    return _lookups()[0].get(signing_name, ())


def by_endpoint_prefix(prefix: str) -> tuple[ServiceMeta, ...]:
    """Services served at ``<prefix>.<region>.amazonaws.com``."""
    return _lookups()[1].get(prefix, ())


# --- level 2: one service in full ----------------------------------------------------------


def _wire_name(protocol: str, member_name: str, member: dict) -> str:
    if protocol == "ec2":
        # EC2 serializes queryName, else locationName capitalised, else the member name.
        if "queryName" in member:
            return member["queryName"]
        location_name = member.get("locationName")
        if location_name:
            return location_name[:1].upper() + location_name[1:]
        return member_name
    return member.get("locationName") or member_name


def _identifiers(model: dict, op: dict, protocol: str) -> tuple[Member, ...]:
    shapes = model.get("shapes", {})
    input_name = (op.get("input") or {}).get("shape")
    shape = shapes.get(input_name) if input_name else None
    if not shape:
        return ()
    required = set(shape.get("required", ()))
    payload = shape.get("payload")
    found = []
    for name, member in shape.get("members", {}).items():
        location = member.get("location", "body")
        # Labels are always identifiers (FunctionName, Bucket, HostedZone Id...).
        is_identifier = location == "uri" or (
            _IDENTIFIER_RE.search(name) is not None and name not in _NOT_IDENTIFIERS
        )
        if not is_identifier or name == payload:
            continue
        target = shapes.get(member.get("shape"), {})
        kind = target.get("type")
        if kind == "list":
            kind = shapes.get(target.get("member", {}).get("shape"), {}).get("type")
        if kind not in ("string", "integer", "long"):
            continue
        found.append(
            Member(
                name=name,
                location=location,
                wire_name=_wire_name(protocol, name, member),
                required=name in required or location == "uri",
            )
        )
    return tuple(found)


def _build(meta: ServiceMeta) -> ServiceModel:
    model = load_model(meta.name) or {}  # not cached: the raw model is megabytes
    protocol = meta.protocols[0] if meta.protocols else ""
    rest_protocol = next((p for p in meta.protocols if p.startswith("rest-")), "")
    operations: dict[str, OperationInfo] = {}
    templates: list[RestTemplate] = []
    for order, (name, op) in enumerate(model.get("operations", {}).items()):
        http = op.get("http", {})
        info = OperationInfo(
            name=name,
            method=http.get("method", "POST").upper(),
            deprecated=bool(op.get("deprecated")),
            identifiers=_identifiers(model, op, rest_protocol or protocol),
        )
        operations[name] = info
        if rest_protocol and "requestUri" in http:
            templates.append(compile_template(name, info.method, http["requestUri"], order,
                                              info.deprecated, _required_bindings(model, op)))
    return ServiceModel(
        meta=meta,
        operations=operations,
        by_lower_name={name.lower(): name for name in operations},
        rest=RestMatcher(templates) if templates else None,
    )


def _required_bindings(model: dict, op: dict) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required header names lower-cased, required query-string keys) of an operation.

    They tell apart operations sharing one URI template: S3 PutObject / CopyObject
    (x-amz-copy-source) / UploadPart (?partNumber&uploadId) are all ``PUT /{Bucket}/{Key+}``.
    """
    shapes = model.get("shapes", {})
    input_name = (op.get("input") or {}).get("shape")
    shape = shapes.get(input_name, {}) if input_name else {}
    headers, query = [], []
    for name in shape.get("required", ()):
        member = shape.get("members", {}).get(name, {})
        if member.get("location") == "header":
            headers.append(member.get("locationName", name).lower())
        elif member.get("location") == "querystring":
            query.append(member.get("locationName", name))
    return tuple(headers), tuple(query)


_build_lock = threading.Lock()
_services: dict[str, ServiceModel] = {}


def service(name: str) -> ServiceModel | None:
    """The distilled model of one botocore service, built on first use; None if unknown."""
    cached = _services.get(name)
    if cached is not None:
        return cached
    meta = index().get(name)
    if meta is None:
        return None
    with _build_lock:  # build each service once even if two threads ask at the same moment
        cached = _services.get(name)
        if cached is None:
            cached = _services[name] = _build(meta)
    return cached


def warm_up(services: tuple[str, ...] = ("s3", "iam", "sts")) -> None:
    """Build the index and the given services ahead of the first flow (call off the loop)."""
    _lookups()
    for name in services:
        service(name)
