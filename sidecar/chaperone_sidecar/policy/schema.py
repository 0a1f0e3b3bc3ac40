"""Check chaperone.dev objects against the CRDs' own OpenAPI schemas, without an apiserver.

Why: ``chaperone policy test`` and the standalone sidecar read local YAML that no apiserver has
checked, and the operator's admission words schema problems like the compiler's semantic ones,
each with its field path (``spec.rules[2].match.methods[0]: ...``). The CRDs are the single
source (``crds/*.yaml``). The package carries a byte copy of them (``chaperone_sidecar/crds/``,
made by ``make sync-crds``; ``make check-crds`` and ``tests/crds/test_crd_schema.py`` fail on
drift), because neither the wheel nor the image build can read files outside the package - the
same reason the chart has its copy.

How: each CRD's structural schema is translated once per kind (cached) into a JSON Schema and
checked with :mod:`jsonschema` (Draft 2020-12; a structural schema's keywords mean the same
there, apart from the differences below). The translation and the code around it reproduce
the apiserver where users would notice:

* ``x-kubernetes-int-or-string`` becomes ``anyOf: [integer, string]``; ``nullable`` adds
  ``null`` to the type; ``x-kubernetes-list-type: set`` becomes ``uniqueItems``; OpenAPI v3.0's
  boolean ``exclusiveMinimum``/``exclusiveMaximum`` become the numeric 2020-12 keywords.
* An object with ``properties`` gets ``additionalProperties: false`` unless it has
  ``x-kubernetes-preserve-unknown-fields``. The apiserver drops unknown fields silently; here they
  are errors ("unknown field"), because a misspelt field is a rule that does not do what its
  author thinks.
* ``null`` counts as absent unless the field is nullable (the apiserver prunes it), and defaults
  are filled only inside objects that are present (jsonschema does not default).
* Integers are Python ints (JSON Schema's integer also admits ``2.0``, which Python code after
  the check would then carry as a float); a pattern's ``$`` ends the text as in RE2/ECMA
  (Python's ``$`` also matches before a final newline, which would let ``"name\\n"`` through).
* ``status`` is free-form: the status subresource makes the apiserver ignore it on writes of the
  object itself, and a ``kubectl get -o yaml`` copy carries one.

Not checked here: CEL rules (``x-kubernetes-validations``; jsonschema has no CEL). The
AccessPolicy's only rule, exactly one effect per rule, is repeated by the compiler in its own
words (a test keeps the two in step); ClaudeConnection's and ApprovalRequest's rules (immutable
type, hosts required for http/kubernetes, transition rules needing ``oldSelf``...) only the
apiserver enforces. Nor are: unique keys of ``x-kubernetes-list-type: map`` lists (the compiler
reports duplicate rule names itself), formats (``date-time``, ``int64``), and ObjectMeta beyond
``metadata.name``/``namespace`` being strings.

jsonschema is imported only for an object that does not conform (issue 16, idle RSS: with
referencing, rpds, attrs and idna it was 2.2 MB of an idle sidecar's RSS, measured as the
marginal import in the sidecar's import order; docs/benchmarks.md "Idle RSS, session 5"). The
usual object, which conforms, is recognised by :func:`_conforms`, a walk over the translated
schema that answers "valid" only where it implements the keyword exactly as jsonschema does
(the ones the CRDs use: types, properties, required, enum of strings, lengths, item and
property counts, bounds, patterns) and "not known valid" for anything else; that answer sends
the object to jsonschema, which words the errors as before (or finds none).
``tests/sidecar/policy/test_schema.py`` checks the walk against jsonschema on the example
policies and on mutated ones.

A value that fails a check is left out of the result (an object key is dropped, a list item
becomes ``None``), so the compiler's semantic checks only see well-formed values and never
report a second error for the same problem.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from jsonschema import ValidationError

from ..api import GROUP, VERSION
from .errors import PolicyError
from .globs import quote as _q

__all__ = ["Crd", "json_schema_validator", "crd", "type_name", "validate_object"]

# libyaml's loader when PyYAML was built with it: a tenth of the pure-Python loader's time.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# Keywords kept as they are, and keywords that document or steer the apiserver but constrain
# no value the way jsonschema could check (see the module docstring for format and CEL).
_KEPT = frozenset({"type", "enum", "maxLength", "minLength", "pattern", "minimum", "maximum", "multipleOf",
                   "maxItems", "minItems", "uniqueItems", "maxProperties", "minProperties", "required",
                   "default"})
_IGNORED = frozenset({"description", "title", "example", "externalDocs", "format",
                      "x-kubernetes-validations", "x-kubernetes-list-map-keys", "x-kubernetes-map-type",
                      "x-kubernetes-embedded-resource"})
# Handled by _translate itself.
_TRANSLATED = frozenset({"properties", "items", "additionalProperties", "allOf", "anyOf", "oneOf", "not",
                         "nullable", "exclusiveMinimum", "exclusiveMaximum", "x-kubernetes-int-or-string",
                         "x-kubernetes-preserve-unknown-fields", "x-kubernetes-list-type"})

# Errors about a value itself, most telling first: one is reported per value, and the value is
# left out of the result.
_VALUE_KEYWORDS = ("type", "anyOf", "oneOf", "enum", "maxLength", "minLength", "pattern", "minimum",
                   "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "not")


def _translate(node: dict, where: str, structural: bool = True) -> dict:
    """The JSON Schema for one structural-schema node.

    ``structural`` is False inside allOf/anyOf/oneOf/not, whose branches only add value checks
    to fields the enclosing node declares; closing them with additionalProperties would refuse
    those fields.
    """
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _KEPT:
            out[key] = value
        elif key == "properties":
            out[key] = {name: _translate(sub, f"{where}.{name}", structural) for name, sub in value.items()}
        elif key == "items":
            out[key] = _translate(value, f"{where}[]", structural)
        elif key == "additionalProperties":
            out[key] = value if isinstance(value, bool) else _translate(value, f"{where}[*]", structural)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [_translate(sub, where, False) for sub in value]
        elif key == "not":
            out[key] = _translate(value, where, False)
        elif key not in _IGNORED and key not in _TRANSLATED:
            raise ValueError(f"{where or '<root>'}: CRD schema keyword {key!r} "
                             "has no JSON Schema translation")
    for key, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if node.get(key) is True and bound in out:
            out[key] = out.pop(bound)
    if node.get("x-kubernetes-int-or-string"):
        # Beside a node's own anyOf (controller-gen writes the same two branches; others hold
        # value checks), so that one cannot widen the other.
        either = {"anyOf": [{"type": "integer"}, {"type": "string"}]}
        if "anyOf" in out:
            out.setdefault("allOf", []).append(either)
        else:
            out.update(either)
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if (structural and "properties" in out and "additionalProperties" not in out
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _ecma_pattern(validator: Any, pattern: str, instance: Any, schema: dict) -> Iterator[ValidationError]:
    from jsonschema import ValidationError

    if validator.is_type(instance, "string") and not _regex(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


@functools.cache
def _regex(source: str) -> re.Pattern[str]:
    # OpenAPI patterns are RE2/ECMA: "$" ends the text. Python's "$" also matches before a final
    # newline; "\Z" is the faithful translation.
    if source.endswith("$") and not source.endswith("\\$"):
        source = source[:-1] + "\\Z"
    return re.compile(source)


@functools.cache
def json_schema_validator() -> Any:
    """The jsonschema validator class: Draft 2020-12 with the apiserver's integers and patterns
    (see the module docstring). Imported on first use: only objects that do not conform need it."""
    from jsonschema import Draft202012Validator, validators

    return validators.extend(
        Draft202012Validator,
        validators={"pattern": _ecma_pattern},
        type_checker=Draft202012Validator.TYPE_CHECKER.redefine_many({
            "integer": lambda _, value: isinstance(value, int) and not isinstance(value, bool),
            "array": lambda _, value: isinstance(value, (list, tuple)),
        }),
    )


# ---------------------------------------------------------------------------- the walk

_TYPES: dict[str, Any] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, (list, tuple)),
    "null": lambda v: v is None,
}
# Keywords the walk implements (and "default", which constrains nothing).
_WALKED = frozenset({"type", "properties", "additionalProperties", "required", "items", "enum", "maxLength",
                     "minLength", "pattern", "minimum", "maximum", "maxItems", "minItems", "maxProperties",
                     "minProperties", "default"})


def _conforms(value: Any, schema: Any) -> bool:
    """True only if jsonschema (:func:`json_schema_validator`) reports no error for ``value``;
    False also where the walk does not know (a keyword it does not implement, an enum of
    non-strings, a number of a type JSON does not have): jsonschema then decides."""
    if schema is True:
        return True
    if not isinstance(schema, dict) or not _WALKED.issuperset(schema):
        return False
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not any(k in _TYPES and _TYPES[k](value) for k in kinds):
            return False
    if isinstance(value, str):
        if "enum" in schema and not (all(isinstance(e, str) for e in schema["enum"]) and value in schema["enum"]):
            return False
        if len(value) > schema.get("maxLength", len(value)) or len(value) < schema.get("minLength", 0):
            return False
        return "pattern" not in schema or _regex(schema["pattern"]).search(value) is not None
    if "enum" in schema:
        return False  # an enum of this value's type: left to jsonschema (its equality: 1 == 1.0 != True)
    if isinstance(value, dict):
        props, extra = schema.get("properties") or {}, schema.get("additionalProperties", True)
        if not all(key in value for key in schema.get("required", ())):
            return False
        if not schema.get("minProperties", 0) <= len(value) <= schema.get("maxProperties", len(value)):
            return False
        return all(_conforms(item, props[key] if key in props else extra) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)):
            return False
        items = schema.get("items", True)
        return all(_conforms(item, items) for item in value)
    if isinstance(value, bool) or value is None:
        return True
    if isinstance(value, (int, float)):
        return schema.get("minimum", value) <= value <= schema.get("maximum", value)
    return False  # not a JSON value (a YAML timestamp...): jsonschema words it


@dataclass(frozen=True)
class Crd:
    """One kind's CRD as this module uses it: names and the translated, compiled schema."""

    kind: str
    api_version: str
    schema: dict

    @classmethod
    def from_definition(cls, definition: dict, version: str = VERSION) -> Crd:
        """From a CustomResourceDefinition object (the parsed YAML of ``crds/*.yaml``)."""
        spec = definition["spec"]
        served = next(v for v in spec["versions"] if v["name"] == version)
        schema = _translate(served["schema"]["openAPIV3Schema"], "")
        if "status" in schema.get("properties", {}):
            schema["properties"]["status"] = {"type": "object"}
        return cls(spec["names"]["kind"], f"{spec['group']}/{version}", schema)

    @functools.cached_property
    def validator(self) -> Any:
        """A jsonschema validator for ``schema``, built on first use (once)."""
        return json_schema_validator()(self.schema)


@functools.cache
def crd(plural: str) -> Crd:
    """The packaged CRD of ``plural`` (``accesspolicies``...), read, translated and compiled once."""
    text = (resources.files("chaperone_sidecar") / "crds" / f"{plural}.{GROUP}.yaml").read_text()
    return Crd.from_definition(yaml.load(text, Loader=_YAML_LOADER))


# ---------------------------------------------------------------------------- checking

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
    if isinstance(value, (list, tuple)):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


def _nullable(schema: dict) -> bool:
    kind = schema.get("type")
    return isinstance(kind, list) and "null" in kind


def _prune_nulls(value: Any, schema: dict) -> Any:
    """A copy of ``value`` without the nulls the apiserver would prune (declared, non-nullable fields).

    A null under an unknown key stays, so that the key is reported.
    """
    if isinstance(value, dict):
        props, extra = schema.get("properties") or {}, schema.get("additionalProperties")
        out = {}
        for key, item in value.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if item is None and sub is not None and not _nullable(sub):
                continue
            out[key] = _prune_nulls(item, sub or {})
        return out
    if isinstance(value, (list, tuple)):
        return [_prune_nulls(item, schema.get("items") or {}) for item in value]
    return value


def _fill_defaults(value: Any, schema: dict) -> None:
    """Fill declared defaults into the objects present, depth first, as the apiserver does."""
    if isinstance(value, dict):
        props, extra = schema.get("properties") or {}, schema.get("additionalProperties")
        for key, sub in props.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                _fill_defaults(value[key], sub)
        if isinstance(extra, dict):
            for key, item in value.items():
                if key not in props:
                    _fill_defaults(item, extra)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _fill_defaults(item, schema["items"])


def _field_path(root: Any, elements: list) -> str:
    """Kubernetes notation for a path into ``root``: ``spec.rules[2].match.methods[0]``."""
    text, node = "", root
    for element in elements:
        if isinstance(node, list):
            text += f"[{element}]"
        else:
            text = f"{text}.{element}" if text else str(element)
        try:
            node = node[element]
        except (KeyError, IndexError, TypeError):
            node = None
    return text


def _drop(root: Any, elements: list) -> None:
    """Leave the value at ``elements`` out: an object key is removed, a list item becomes None."""
    node = root
    for element in elements[:-1]:
        try:
            node = node[element]
        except (KeyError, IndexError, TypeError):
            return
    if isinstance(node, dict):
        node.pop(elements[-1], None)
    elif isinstance(node, list) and isinstance(elements[-1], int) and elements[-1] < len(node):
        node[elements[-1]] = None


def _types(want: Any) -> str:
    return " or ".join(want) if isinstance(want, list) else str(want)


def _fields(error: ValidationError) -> tuple[Any, Any, Any, Any]:
    """(keyword, its value in the schema, the instance, the schema) of an error the validator
    reported: all set (the stubs type them "or Unset" for errors built by hand)."""
    return error.validator, error.validator_value, error.instance, error.schema


def _value_reason(error: ValidationError) -> str:
    kw, want, value, _ = _fields(error)
    if kw == "type":
        return f"must be of type {_types(want)}, got {type_name(value)}"
    if kw == "enum":
        return f"unsupported value {_q(value)}: supported values: {', '.join(map(_q, want))}"
    if kw == "maxLength":
        return f"may not be longer than {want} characters"
    if kw == "minLength":
        return "must not be empty" if want == 1 else f"must be at least {want} characters long"
    if kw == "pattern":
        return f"invalid value {_q(value)}: must match the regular expression {want}"
    if kw == "minimum":
        return f"must be greater than or equal to {want}, got {value}"
    if kw == "maximum":
        return f"must be less than or equal to {want}, got {value}"
    if kw == "exclusiveMinimum":
        return f"must be greater than {want}, got {value}"
    if kw == "exclusiveMaximum":
        return f"must be less than {want}, got {value}"
    if kw == "multipleOf":
        return f"must be a multiple of {want}, got {value}"
    if kw == "anyOf" and {"integer", "string"} <= {b.get("type") for b in want}:
        return f"must be an integer or a string, got {type_name(value)}"
    return f"invalid value {_q(value)}: {error.message}"


def _object_errors(error: ValidationError, path: str) -> list[tuple[str, str]]:
    """(path, reason) for the errors jsonschema reports on an object about its fields."""
    kw, want, value, schema = _fields(error)

    def join(key: Any) -> str:
        return f"{path}.{key}" if path else str(key)

    if kw == "additionalProperties":
        props = schema.get("properties") or {}
        return [(join(key), "unknown field" if isinstance(key, str) else "field names must be strings")
                for key in value if key not in props]
    if kw == "required":
        return [(join(key), "required field is missing") for key in want if key not in value]
    present = list(value)
    lo, hi = schema.get("minProperties"), schema.get("maxProperties")
    if lo == hi == 1:
        names = ", ".join(schema.get("properties") or ())
        got = f", got {', '.join(map(str, present))}" if present else ""
        return [(path, f"must set exactly one of {names}{got}")]
    if kw == "minProperties":
        if want == 1:
            return [(path, "must not be empty")]
        return [(path, f"must set at least {want} fields, got {len(present)}")]
    if kw == "maxProperties":
        return [(path, f"must set at most {want} fields, got {len(present)}")]
    if kw == "maxItems":
        return [(path, f"must have at most {want} items, got {len(value)}")]
    if kw == "minItems":
        return [(path, f"must have at least {want} item{'s' if want > 1 else ''}")]
    if kw == "uniqueItems":
        return [(path, "must not contain duplicates")]
    return [(path, error.message)]


def validate_object(obj: Any, kind: Crd) -> tuple[dict | None, list[PolicyError]]:
    """Check ``obj`` against ``kind``'s CRD.

    Returns (a copy of ``obj`` with nulls pruned, values that failed left out and defaults
    filled; the errors, unsorted). ``None`` when ``obj`` is not a mapping at all.
    """
    if not isinstance(obj, dict):
        article = "an" if kind.kind[:1] in "AEIOU" else "a"
        return None, [PolicyError("", f"{article} {kind.kind} must be a mapping, got {type(obj).__name__}")]
    value = _prune_nulls(obj, kind.schema)
    errors: list[PolicyError] = []
    drops: list[list] = []
    worst: dict[tuple, ValidationError] = {}  # per value: the most telling of its errors
    for error in () if _conforms(value, kind.schema) else kind.validator.iter_errors(value):
        where = list(error.absolute_path)
        if error.validator in _VALUE_KEYWORDS:
            at = tuple(where)
            rank = _VALUE_KEYWORDS.index(error.validator)
            if at not in worst or rank < _VALUE_KEYWORDS.index(worst[at].validator):
                worst[at] = error
            continue
        path = _field_path(value, where)
        errors += [PolicyError(p, reason) for p, reason in _object_errors(error, path)]
        if error.validator == "additionalProperties":
            known = error.schema.get("properties") or {}
            drops += [where + [key] for key in error.instance if key not in known]
    for at, error in worst.items():
        errors.append(PolicyError(_field_path(value, list(at)), _value_reason(error)))
        drops.append(list(at))
    for where in sorted(drops, key=len, reverse=True):
        _drop(value, where)
    for key, want in (("apiVersion", kind.api_version), ("kind", kind.kind)):
        got = obj.get(key)
        if got is None:
            errors.append(PolicyError(key, "required field is missing"))
        elif isinstance(got, str) and got != want:
            errors.append(PolicyError(key, f'must be "{want}", got {_q(got)}'))
    meta = value.get("metadata") if isinstance(value.get("metadata"), dict) else {}
    for key in ("name", "namespace"):
        if key in meta and not isinstance(meta[key], str):
            errors.append(PolicyError(f"metadata.{key}",
                                      f"must be of type string, got {type_name(meta[key])}"))
    if not meta.get("name") and "metadata" not in {e.path for e in errors}:
        errors.append(PolicyError("metadata.name", "required field is missing"))
    _fill_defaults(value, kind.schema)
    return value, errors
