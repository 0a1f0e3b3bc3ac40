"""The AccessPolicy CRD's structural schema, mirrored in Python, and a checker for it.

Why a mirror: ``crds/accesspolicies.chaperone.dev.yaml`` is the single source, but it is not
shipped inside the sidecar package, and the standalone ``chaperone policy test`` has no apiserver
to enforce it. So the compiler checks local YAML against this copy (types, enums, bounds,
patterns, required and unknown fields) and fills the CRD's defaults. A test compares this mirror
with the CRD file (descriptions and ``x-kubernetes-*`` stripped) and fails on any drift, so the
two cannot silently disagree.

The checker follows apiserver semantics where they matter to users: ``null`` counts as absent
(the apiserver prunes it), defaults are filled only inside objects that are present, unknown
fields are errors (the apiserver would drop them silently; locally we say so).
"""

from __future__ import annotations

import re
from typing import Any

from .globs import quote as _q

API_VERSION = "chaperone.dev/v1alpha1"
KIND = "AccessPolicy"
DETECTORS = ("aws-access-key-id", "aws-secret-key", "private-key", "jwt", "bearer-token",
             "secret-json-key", "email", "credit-card", "us-ssn", "all")
# RequestInfo verbs; exec/attach/portforward/log are subresources, not verbs.
KUBERNETES_VERBS = frozenset("get list watch create update patch delete deletecollection proxy *".split())
# Not in the CRD (no maximum there): beyond a million per window a limit limits nothing.
MAX_RATE_REQUESTS = 1_000_000


def _str(max_length: int | None = None, **kw: Any) -> dict:
    return {"type": "string", **({"maxLength": max_length} if max_length else {}), **kw}


def _int(**kw: Any) -> dict:
    return {"type": "integer", **kw}


def _arr(items: dict, max_items: int, **kw: Any) -> dict:
    return {"type": "array", "maxItems": max_items, "items": items, **kw}


def _obj(properties: dict, **kw: Any) -> dict:
    return {"type": "object", "properties": properties, **kw}


_TARGET = _str(enum=["response", "request", "both"], default="response")
_SUBJECTS = _arr(_obj({"serviceAccount": _str(317), "user": _str(253), "group": _str(253)},
                      maxProperties=1, minProperties=1), 64)
_APPROVERS = _obj({"users": _arr(_str(253), 64), "groups": _arr(_str(253), 64)})
_GRANT = _obj({"ttlSeconds": _int(minimum=0, maximum=86400, default=900),
               "scope": _str(enum=["exact", "action"], default="exact")})
_JSON_PATHS = _arr(_str(512, pattern=r"^\$"), 64)
_MASKING = _obj({"detectors": _arr(_str(enum=list(DETECTORS)), 32), "fields": _JSON_PATHS,
                 "target": _TARGET, "maxBodyBytes": _int(minimum=1024, default=67108864)})
_MATCH = _obj({
    "subjects": _SUBJECTS,
    "methods": _arr(_str(16, pattern="^[A-Z]+$"), 16),
    "hosts": _arr(_str(253), 64),
    "paths": _arr(_str(1024), 64),
    "pathRegex": _str(1024),
    "bodyRegex": _str(1024),
    "aws": _obj({"actions": _arr(_str(128, pattern="^[a-z0-9*?-]+:[A-Za-z0-9*?]+$"), 128),
                 "regions": _arr(_str(64), 32), "resources": _arr(_str(2048), 64)}),
    "kubernetes": _obj({"verbs": _arr(_str(32), 16), "apiGroups": _arr(_str(253), 32),
                        "resources": _arr(_str(253), 64), "namespaces": _arr(_str(63), 64),
                        "names": _arr(_str(253), 64)}),
    "anthropic": _obj({"models": _arr(_str(128), 32), "tools": _arr(_str(128), 64)}),
})
_RULE = _obj({
    "name": _str(63, pattern="^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
    "description": _str(1024),
    "match": _MATCH,
    "allow": _obj({}),
    "block": _obj({"message": _str(1024)}),
    "requireApproval": _obj({
        "approvers": _APPROVERS,
        "minApprovals": _int(minimum=1, maximum=10, default=1),
        "timeoutSeconds": _int(minimum=10, maximum=86400, default=300),
        "mode": _str(enum=["hold", "defer"], default="hold"),
        "holdSeconds": _int(minimum=1, maximum=900, default=120),
        "grant": _GRANT,
        "rememberOutcomeSeconds": _int(minimum=0, maximum=86400, default=3600),
    }),
    "mask": _obj({"detectors": _arr(_str(64), 32), "fields": _JSON_PATHS, "target": _TARGET,
                  "kubernetesSecrets": _str(enum=["mask", "reveal"])},
                 minProperties=1),
    "rateLimit": _obj({"requests": _int(minimum=1),
                       "periodSeconds": _int(minimum=1, maximum=86400),
                       "per": _str(enum=["identity", "pod", "connection"], default="identity")},
                      required=["requests", "periodSeconds"]),
}, required=["name"])
SPEC = _obj({
    "connections": _arr(_str(253, minLength=1), 64),
    "subjects": _SUBJECTS,
    "defaultEffect": _str(enum=["allow", "block"], default="block"),
    "approvers": _APPROVERS,
    "grant": _GRANT,
    "masking": _MASKING,
    "rules": _arr(_RULE, 500, minItems=1),
}, required=["rules"])
# metadata is free-form here as in the CRD (ObjectMeta is validated by the apiserver itself);
# status is written by the operator, so a `kubectl get -o yaml` copy is accepted as is.
SCHEMA = _obj({"apiVersion": _str(), "kind": _str(), "metadata": {"type": "object"},
               "spec": SPEC, "status": {"type": "object"}}, required=["spec"])

_PY_TYPES = {"string": (str,), "integer": (int,), "array": (list, tuple), "object": (dict,)}


def type_name(value: Any) -> str:
    """The JSON type name of a Python value, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, (list, tuple)) else "object" if isinstance(value, dict) else type(value).__name__


def _pattern(source: str) -> re.Pattern[str]:
    # OpenAPI patterns are RE2/ECMA: "$" ends the text. Python's "$" also matches before a final
    # newline, which would let "name\n" through; "\Z" is the faithful translation.
    if source.endswith("$") and not source.endswith("\\$"):
        source = source[:-1] + "\\Z"
    return re.compile(source)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def check_schema(value: Any, schema: dict, path: str, errors: list) -> Any:
    """Check ``value`` against ``schema``; append errors; return it with defaults filled.

    A value of the wrong type (or violating an enum/pattern) is left out of the result (an
    object key is dropped, a list item becomes ``None``) so later semantic checks only ever see
    well-formed values and never report a second error for the same problem.
    """
    from .compiler import PolicyError  # one error type for schema and semantic problems

    def bad(reason: str) -> None:
        errors.append(PolicyError(path, reason))

    kind = schema["type"]
    if isinstance(value, bool) or not isinstance(value, _PY_TYPES[kind]):
        bad(f"must be of type {kind}, got {type_name(value)}")
        return None
    if kind == "object":
        props = schema.get("properties")
        if props is None:
            return value
        out: dict = {}
        for key, item in value.items():
            if not isinstance(key, str):
                errors.append(PolicyError(_join(path, str(key)), "field names must be strings"))
            elif key not in props:
                errors.append(PolicyError(_join(path, key), "unknown field"))
            elif item is not None:  # null means absent, as the apiserver prunes it
                checked = check_schema(item, props[key], _join(path, key), errors)
                if checked is not None:
                    out[key] = checked
        for key in schema.get("required", ()):
            if value.get(key) is None:
                errors.append(PolicyError(_join(path, key), "required field is missing"))
        present = [k for k, v in value.items() if v is not None]
        lo, hi = schema.get("minProperties"), schema.get("maxProperties")
        if lo == hi == 1 and len(present) != 1:
            bad(f"must set exactly one of {', '.join(props)}" + (f", got {', '.join(present)}" if present else ""))
        elif lo and len(present) < lo:
            bad("must not be empty")
        for key, sub in props.items():
            if key not in out and "default" in sub:
                out[key] = sub["default"]
        return out
    if kind == "array":
        if len(value) > schema.get("maxItems", len(value)):
            bad(f"must have at most {schema['maxItems']} items, got {len(value)}")
        if len(value) < schema.get("minItems", 0):
            bad(f"must have at least {schema['minItems']} item{'s' if schema['minItems'] > 1 else ''}")
        return [check_schema(v, schema["items"], f"{path}[{i}]", errors) for i, v in enumerate(value)]
    if kind == "string":
        if "enum" in schema and value not in schema["enum"]:
            bad(f"unsupported value {_q(value)}: supported values: {', '.join(map(_q, schema['enum']))}")
            return None
        if len(value) > schema.get("maxLength", len(value)):
            bad(f"may not be longer than {schema['maxLength']} characters")
            return None
        if len(value) < schema.get("minLength", 0):
            bad("must not be empty")
            return None
        if "pattern" in schema and not _pattern(schema["pattern"]).search(value):
            bad(f"invalid value {_q(value)}: must match the regular expression {schema['pattern']}")
            return None
        return value
    if "minimum" in schema and value < schema["minimum"]:
        bad(f"must be greater than or equal to {schema['minimum']}, got {value}")
        return None
    if "maximum" in schema and value > schema["maximum"]:
        bad(f"must be less than or equal to {schema['maximum']}, got {value}")
        return None
    return value
