"""Classify an AWS API request: service, region, operation, protocol and resources.

How a request is read, in the order the evidence is trusted:

1. **Service and region** come from the SigV4 credential scope, because that is what AWS
   itself checks: the ``Authorization`` header (``Credential=AKID/date/region/service/
   aws4_request``; SigV4a has no region and sends ``X-Amz-Region-Set``) or, for presigned URLs,
   the ``X-Amz-Credential`` query parameter. Unsigned requests fall back to the host name
   (``iam.amazonaws.com``, ``secretsmanager.us-east-1.amazonaws.com``) and say so in errors.
2. **Botocore service**: a signing name can belong to several botocore services (``s3`` is s3
   and s3control, ``rds`` is rds, docdb and neptune). The host's endpoint prefix narrows them;
   the request then picks the one that can explain it.
3. **Operation**, by protocol: ``X-Amz-Target: Prefix.Operation`` (json; the prefix is the
   model's ``metadata.targetPrefix``), ``/service/X/operation/Y`` (smithy-rpc-v2-cbor),
   ``Action=`` in the query string or form body (query, ec2, and json services that stay
   query-compatible such as SQS), else the REST URI templates (``aws_rest``).
4. **Resources** (``aws_resources``): bucket and ``bucket/key`` for S3 (virtual-hosted or path
   style, also against non-AWS endpoints such as a local S3 server), and generic identifier
   members (RoleName, PolicyArn, FunctionName, SecretId, InstanceIds...) for everything else.

Nothing here raises on purpose; anything unexpected is recorded in ``errors`` by the caller.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl

from ..model import AWSAction, HTTPRequest
from . import aws_models
from .aws_resources import describe, resources_for

_REGION_RE = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]*)?-[a-z]+-\d+$")
# bucket + S3 endpoint suffix; the bucket part is greedy so dotted bucket names stay whole.
_S3_VHOST_RE = re.compile(
    r"^(?P<bucket>.+)\.(?P<suffix>s3(?!-control)[a-z0-9-]*"
    r"(?:\.(?:dualstack|fips|[a-z]{2}(?:-[a-z]+)+-\d+))*\.amazonaws\.com(?:\.cn)?)$"
)
_AWS_SUFFIXES = (".amazonaws.com.cn", ".amazonaws.com", ".api.aws")
# Signing names used by AWS that no botocore model declares.
SIGNING_ALIASES = {"s3express": "s3", "s3-object-lambda": "s3"}
MAX_FORM_BODY = 8 * 1024 * 1024  # a form (query-protocol) body parsed for its Action=; Enforce reads up to it


@dataclass(frozen=True)
class Scope:
    service: str = ""
    region: str = ""
    presigned: bool = False


def first_headers(request: HTTPRequest) -> dict[str, str]:
    """Lower-cased header name -> first value (what ``HTTPRequest.header`` returns), built once."""
    headers: dict[str, str] = {}
    for key, value in request.headers:
        headers.setdefault(key.lower(), value)
    return headers


def parse_scope(headers: dict[str, str], query: dict[str, list[str]]) -> Scope:
    """SigV4 scope from the Authorization header, or from a presigned URL's query."""
    auth = headers.get("authorization", "")
    presigned = False
    credential = ""
    if "Credential=" in auth:
        credential = auth.split("Credential=", 1)[1].split(",", 1)[0].strip()
    elif "X-Amz-Credential" in query:
        credential = query["X-Amz-Credential"][0]
        presigned = True
    elif "X-Amz-Signature" in query or ("Signature" in query and "AWSAccessKeyId" in query):
        presigned = True  # SigV2 presigned (old S3 URLs): no scope, host decides
    parts = credential.split("/")
    if len(parts) < 4 or parts[-1] != "aws4_request":
        return Scope(presigned=presigned)
    if len(parts) >= 5:  # AKID/date/region/service/aws4_request
        return Scope(service=parts[-2], region=parts[-3], presigned=presigned)
    # SigV4a: AKID/date/service/aws4_request, regions in X-Amz-Region-Set
    region_set = headers.get("x-amz-region-set") or (query.get("X-Amz-Region-Set") or [""])[0]
    return Scope(service=parts[-2], region=region_set, presigned=presigned)


@dataclass(frozen=True)
class HostInfo:
    endpoint_prefix: str = ""  # "s3", "iam", "s3-control", "execute-api"
    region: str = ""
    bucket: str = ""  # S3 virtual-hosted bucket
    is_aws: bool = False


_MAX_DNS_NAME = 253


def parse_host(host: str) -> HostInfo:
    host = host.lower().rstrip(".")
    if len(host) > _MAX_DNS_NAME:  # not a DNS name, so not an AWS endpoint; keeps regexes cheap
        return HostInfo()
    bucket = ""
    vhost = _S3_VHOST_RE.match(host)
    if vhost:
        bucket = vhost.group("bucket")
        host = vhost.group("suffix")
    suffix = next((s for s in _AWS_SUFFIXES if host.endswith(s)), "")
    if not suffix:
        return HostInfo()
    labels = host[: -len(suffix)].split(".")
    region = ""
    while labels and (labels[-1] in ("dualstack", "fips") or _REGION_RE.match(labels[-1])):
        label = labels.pop()
        region = region or (label if _REGION_RE.match(label) else "")
    prefix = _known_prefix(labels)
    if prefix.startswith("s3-") and _REGION_RE.match(prefix[3:]):  # legacy s3-us-west-2
        prefix, region = "s3", region or prefix[3:]
    elif prefix.startswith("s3-") and prefix != "s3-control":  # s3-accelerate, s3-fips...
        prefix = "s3"
    elif prefix.endswith("-fips"):
        prefix = prefix[: -len("-fips")]
    return HostInfo(endpoint_prefix=prefix, region=region, bucket=bucket, is_aws=True)


def _known_prefix(labels: list[str]) -> str:
    """The endpoint prefix at the end of ``labels``: some span labels ("api.ecr",
    "runtime.sagemaker", "data.jobs.iot"), so the longest one botocore knows wins."""
    for size in (3, 2):
        if len(labels) >= size:
            joined = ".".join(labels[-size:])
            if aws_models.by_endpoint_prefix(joined):
                return joined
    return labels[-1] if labels else ""


def parse_query(query: str) -> dict[str, list[str]]:
    result: dict[str, list[str]] = {}
    for key, value in parse_qsl(query, keep_blank_values=True, errors="replace"):
        result.setdefault(key, []).append(value)
    return result


def _form_params(request: HTTPRequest, headers, errors: list[str]) -> dict[str, list[str]]:
    content_type = headers.get("content-type", "").lower()
    body = request.body
    if "x-www-form-urlencoded" not in content_type and not body.startswith(b"Action="):
        return {}
    if len(body) > MAX_FORM_BODY:
        errors.append(f"form body of {len(body)} bytes not parsed (limit {MAX_FORM_BODY})")
        return {}
    return parse_query(body.decode("utf-8", "replace"))


def _candidates(scope: Scope, host: HostInfo, errors: list[str]):
    """Botocore services that may have served this request, best first."""
    metas: tuple = ()
    if scope.service:
        signing = SIGNING_ALIASES.get(scope.service, scope.service)
        metas = aws_models.by_signing_name(signing) or aws_models.by_endpoint_prefix(signing)
        if not metas:
            errors.append(f"no botocore model is signed as {scope.service!r}")
    elif host.endpoint_prefix:
        metas = aws_models.by_endpoint_prefix(host.endpoint_prefix)
        errors.append("request is not SigV4-signed; service guessed from host")
    else:
        errors.append("request is not SigV4-signed and the host is not an AWS endpoint")
    if host.endpoint_prefix and len(metas) > 1:
        narrowed = tuple(m for m in metas if m.endpoint_prefix == host.endpoint_prefix)
        metas = narrowed or metas
    if scope.service and host.is_aws and host.endpoint_prefix and metas:
        signing_names = {m.signing_name for m in aws_models.by_endpoint_prefix(host.endpoint_prefix)}
        if signing_names and scope.service not in signing_names:
            errors.append(f"signed for {scope.service!r} but sent to {host.endpoint_prefix!r}")
    return metas


@dataclass
class _Resolved:
    model: aws_models.ServiceModel | None = None
    operation: str = ""
    protocol: str = ""
    labels: dict | None = None  # REST URI labels


def _resolve(request, headers, metas, query, form, host, errors) -> _Resolved:
    models = [m for m in (aws_models.service(meta.name) for meta in metas) if m is not None]
    if not models:
        return _Resolved()
    target = headers.get("x-amz-target")
    targets = {v for k, v in request.headers if k.lower() == "x-amz-target"} if target else ()
    if len(targets) > 1:
        # Which one would the service act on? Unknown, so the operation stays unknown ("svc:*"),
        # which the evaluator treats as possibly any operation of the service (fail closed).
        errors.append(f"conflicting X-Amz-Target headers {sorted(targets)}")
        return _Resolved(model=models[0], protocol="json")
    if target and "." in target:
        prefix, _, name = target.rpartition(".")
        for model in models:
            if model.meta.target_prefix == prefix and (
                "json" in model.meta.protocols or "smithy-rpc-v2-cbor" in model.meta.protocols
            ):
                return _named(model, name, "json", errors)
        errors.append(f"X-Amz-Target prefix {prefix!r} matches no candidate service")
    path = request.path
    if path.startswith("/service/") and "/operation/" in path:
        service_part, _, name = path[len("/service/") :].partition("/operation/")
        for model in models:
            if model.meta.target_prefix == service_part:
                return _named(model, name.strip("/"), "smithy-rpc-v2-cbor", errors)
    action = (query.get("Action") or form.get("Action") or [""])
    if action[0]:
        all_actions = set((query.get("Action") or []) + (form.get("Action") or []))
        query_models = [
            m for m in models
            if {"query", "ec2"} & set(m.meta.protocols) or m.meta.query_compatible
        ]
        if len(all_actions) > 1 and query_models:
            # As for X-Amz-Target: no guessing which Action the service would honour.
            errors.append(f"conflicting Action parameters {sorted(all_actions)}")
            protocol = "ec2" if "ec2" in query_models[0].meta.protocols else "query"
            return _Resolved(model=query_models[0], protocol=protocol)
        for model in query_models:
            if model.canonical_operation(action[0]):
                protocol = "ec2" if "ec2" in model.meta.protocols else "query"
                return _named(model, action[0], protocol, errors)
        if query_models:
            model = query_models[0]
            protocol = "ec2" if "ec2" in model.meta.protocols else "query"
            return _named(model, action[0], protocol, errors)
    return _resolve_rest(request, headers, models, query, host, errors)


def _named(model, name: str, protocol: str, errors: list[str]) -> _Resolved:
    canonical = model.canonical_operation(name)
    if canonical is None:
        errors.append(f"operation {name!r} is not in the {model.meta.name} model")
        canonical = name
    return _Resolved(model=model, operation=canonical, protocol=protocol)


def _resolve_rest(request, headers, models, query, host, errors) -> _Resolved:
    best = None
    for model in models:
        if model.rest is None:
            continue
        path = request.path or "/"
        if model.meta.name == "s3" and host.bucket:  # virtual-hosted: bucket from the host
            path = "/" + host.bucket + (path if path.startswith("/") else "/" + path)
        match = model.rest.match(request.method, path, query, headers)
        if match is not None and (best is None or match.rank > best[1].rank):
            best = (model, match)
    if best is not None:
        model, match = best
        protocol = next(p for p in model.meta.protocols if p.startswith("rest-"))
        return _Resolved(model=model, operation=match.operation, protocol=protocol,
                         labels=match.labels)
    model = models[0]
    errors.append(f"no {model.meta.name} operation matches {request.method} {request.path}")
    return _Resolved(model=model, protocol=model.meta.protocols[0] if model.meta.protocols else "")


def _special(request, scope: Scope, host: HostInfo) -> tuple[str, tuple[str, ...]] | None:
    """Invocations that no botocore model describes: API Gateway and Lambda function URLs."""
    if scope.service == "execute-api" and host.endpoint_prefix == "execute-api":
        if "/@connections" not in request.path:
            api_id = request.host.split(".", 1)[0]
            stage, _, rest = request.path.lstrip("/").partition("/")
            return "Invoke", (f"{api_id}/{stage}/{request.method.upper()}/{rest}",)
    if scope.service == "lambda" and ".lambda-url." in request.host:
        return "InvokeFunctionUrl", (request.host.split(".", 1)[0],)
    return None


def classify_aws(request: HTTPRequest, errors: list[str]) -> tuple[AWSAction, str]:
    """The typed part of an AWS request plus a short resource description for the summary."""
    query = parse_query(request.query)
    headers = first_headers(request)
    scope = parse_scope(headers, query)
    host = parse_host(request.host)
    form = _form_params(request, headers, errors) if request.method.upper() == "POST" else {}
    metas = _candidates(scope, host, errors)
    service = scope.service or (metas[0].signing_name if metas else "")
    region = scope.region or host.region
    special = _special(request, scope, host)
    if special is not None:
        operation, resources = special
        return AWSAction(service, region, operation, "rest-json", resources,
                         scope.presigned), describe([("resource", r) for r in resources])
    resolved = _Resolved()
    if metas:
        resolved = _resolve(request, headers, metas, query, form, host, errors)
    pairs: list[tuple[str, str]] = []
    if resolved.model is not None and resolved.operation:
        pairs = resources_for(request, headers, resolved.model, resolved.operation,
                              resolved.protocol, resolved.labels or {}, query, form, errors)
    action = AWSAction(
        service=service,
        region=region,
        operation=resolved.operation,
        protocol=resolved.protocol,
        resources=tuple(value for _, value in pairs),
        presigned=scope.presigned,
    )
    return action, describe(pairs)
