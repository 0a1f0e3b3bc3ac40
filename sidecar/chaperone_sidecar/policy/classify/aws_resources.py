"""Which resources an AWS request acts on, as far as the request itself says.

Policies match resources (``bucket/key`` globs, role names, secret ids), so the classifier
lists what it can derive without calling AWS:

* **S3** (rest-xml, shapes are irregular): ``bucket`` and ``bucket/key`` from the URI labels
  (the bucket of a virtual-hosted request was already moved into the path), the source of a
  copy (``x-amz-copy-source``: reading it is part of the request) and every key of a
  multi-object delete (``POST /bucket?delete``, keys in the XML body).
* **Everything else**: the operation's identifier members, chosen from botocore's input shape
  (URI labels, and members named ``...Name``, ``...Id``, ``...Arn``, ``...Url``; see
  ``aws_models``), read from where that protocol puts them: URI, query string, headers, the
  query/ec2 form body or the JSON body. Required identifiers are preferred (CreateRole ->
  RoleName); when none is present the optional ones are used (DescribeInstances InstanceIds,
  KMS Decrypt KeyId).

Bodies are only parsed up to a bound, never for rest-xml or CBOR; a body that cannot be read
is noted in errors and the resources are simply fewer.
"""

from __future__ import annotations

import json
import re
from urllib.parse import unquote
from xml.sax.saxutils import unescape

from ..model import HTTPRequest
from .aws_models import Member, ServiceModel

MAX_JSON_BODY = 1024 * 1024  # a JSON body parsed for resources; Enforce reads no more when a rule tests them
MAX_XML_BODY = 8 * 1024 * 1024
_MAX_RESOURCES = 1000
# [^<]* not .*?: a body of unclosed "<Key>"s must not make the scan quadratic.
_XML_KEY_RE = re.compile(r"<Key>([^<]*)</Key>")
_XML_ENTITIES = {"&quot;": '"', "&apos;": "'"}  # unescape() knows &amp; &lt; &gt; only


def resources_for(
    request: HTTPRequest,
    headers: dict[str, str],
    model: ServiceModel,
    operation: str,
    protocol: str,
    labels: dict[str, str],
    query: dict[str, list[str]],
    form: dict[str, list[str]],
    errors: list[str],
) -> list[tuple[str, str]]:
    """(label, resource) pairs, in the order a human would read them."""
    if model.meta.name == "s3":
        pairs = _s3(request, headers, operation, labels, errors)
    else:
        info = model.operations.get(operation)
        pairs = []
        if info is not None:
            pairs = _generic(request, headers, info.identifiers, protocol, labels, query, form,
                             errors)
    if len(pairs) > _MAX_RESOURCES:
        errors.append(f"{len(pairs)} resources, only the first {_MAX_RESOURCES} kept")
        pairs = pairs[:_MAX_RESOURCES]
    return pairs


def _s3(request, headers, operation, labels, errors) -> list[tuple[str, str]]:
    pairs = []
    bucket = labels.get("Bucket", "")
    if bucket:
        pairs.append(("bucket", bucket))
        if labels.get("Key"):
            pairs.append(("key", f"{bucket}/{labels['Key']}"))
    source = headers.get("x-amz-copy-source")
    if source and operation in ("CopyObject", "UploadPartCopy"):
        # "/srcbucket/src/key?versionId=..." percent-encoded; the version is not a resource.
        path = unquote(source.split("?", 1)[0]).lstrip("/")
        if path:
            pairs.append(("copy_source", path))
    if operation == "DeleteObjects" and bucket:
        if len(request.body) > MAX_XML_BODY:
            errors.append("DeleteObjects body too large to list its keys")
        else:
            text = request.body.decode("utf-8", "replace")
            for key in _XML_KEY_RE.findall(text):
                pairs.append(("key", f"{bucket}/{unescape(key, _XML_ENTITIES)}"))
    return pairs


def _generic(request, headers, members: tuple[Member, ...], protocol, labels, query, form, errors):
    body_json = None
    needs_json = protocol in ("json", "rest-json") and any(m.location == "body" for m in members)
    if needs_json and request.body:
        body_json = _json_body(request.body, errors)
    found: list[tuple[Member, list[str]]] = []
    for member in members:
        values = _values(request, headers, member, protocol, labels, query, form, body_json)
        if values:
            found.append((member, values))
    if any(member.required for member, _ in found):
        found = [(member, values) for member, values in found if member.required]
    return [(member.name, value) for member, values in found for value in values]


def _json_body(body: bytes, errors: list[str]):
    if len(body) > MAX_JSON_BODY:
        errors.append(f"JSON body of {len(body)} bytes not parsed for resources")
        return None
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError) as exc:
        errors.append(f"body is not JSON: {type(exc).__name__}")
        return None
    return parsed if isinstance(parsed, dict) else None


def _values(request, headers, member: Member, protocol, labels, query, form,
            body_json) -> list[str]:
    wire = member.wire_name
    if member.location == "uri":
        value = labels.get(wire)
        return [value] if value else []
    if member.location == "querystring":
        return [v for v in query.get(wire, []) if v]
    if member.location == "header":
        value = headers.get(wire.lower())
        return [value] if value else []
    if protocol in ("query", "ec2"):
        # Scalars are "Name=v"; lists are "Name.member.1=v" (query) or "Name.1=v" (ec2).
        prefix = wire + "."
        return [
            value
            for params in (query, form)
            for key, values in params.items()
            if key == wire or key.startswith(prefix)
            for value in values
            if value and key != "Action"
        ]
    if body_json is not None:
        value = body_json.get(wire)
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return [str(value)] if value != "" else []
        if isinstance(value, list):
            return [str(v) for v in value if isinstance(v, (str, int)) and not isinstance(v, bool)]
    return []


def describe(pairs: list[tuple[str, str]], limit: int = 200) -> str:
    """"bucket=b key=b/k" or "RoleName=r PolicyArn=arn:..." for the one-line summary."""
    grouped: dict[str, list[str]] = {}
    for label, value in pairs:
        grouped.setdefault(label, []).append(value)
    parts = []
    for label, values in grouped.items():
        if label == "key" and len(values) > 3:
            parts.append(f"keys={len(values)}")
            continue
        if label == "key":
            bucket_prefix = next((v for lbl, v in pairs if lbl == "bucket"), "") + "/"
            values = [v[len(bucket_prefix):] if v.startswith(bucket_prefix) else v for v in values]
        parts.append(f"{label}={','.join(values)}")
    text = " ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"
