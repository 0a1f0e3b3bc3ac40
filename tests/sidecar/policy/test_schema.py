"""policy/schema.py: chaperone.dev objects checked against the packaged CRDs with jsonschema.

The compiler's own tests (test_compiler.py) pin the AccessPolicy messages; these pin what the
schema layer adds: the CRD file is what is enforced (no copy of it in Python), the structural
schema's Kubernetes extensions are translated as the apiserver reads them, JSON Schema's
looser defaults (``2.0`` is an integer, Python's ``$``) are not let through, other kinds work
too, and the module imports nothing from the compiler.
"""

from __future__ import annotations

import ast
import copy
import json
from pathlib import Path

import pytest
import yaml

from chaperone_sidecar.api import ACCESS_POLICIES, CLAUDE_CONNECTIONS
from chaperone_sidecar.policy import schema as schema_module
from chaperone_sidecar.policy.compiler import PolicyErrors, compile_policy
from chaperone_sidecar.policy.errors import PolicyError
from chaperone_sidecar.policy.schema import Crd, _conforms, crd, json_schema_validator, validate_object

REPO = Path(__file__).resolve().parents[3]
POLICY_CRD = REPO / "crds" / "accesspolicies.chaperone.dev.yaml"


def policy(**rule):
    return {"apiVersion": "chaperone.dev/v1alpha1", "kind": "AccessPolicy",
            "metadata": {"name": "p", "namespace": "team-a"},
            "spec": {"rules": [{"name": "r", **(rule or {"allow": {}})}]}}


def errors_of(obj, kind=None) -> list[str]:
    _, errors = validate_object(obj, kind or crd(ACCESS_POLICIES))
    return sorted(str(e) for e in errors)


@pytest.mark.parametrize("path", sorted((REPO / "crds").glob("*.yaml")), ids=lambda p: p.name)
def test_every_crd_translates_to_a_valid_json_schema(path):
    """Every keyword of every CRD has a translation (an unknown one raises) and the result is a
    valid Draft 2020-12 schema."""
    kind = Crd.from_definition(yaml.safe_load(path.read_text()))
    json_schema_validator().check_schema(kind.schema)
    assert kind.api_version == "chaperone.dev/v1alpha1"


def test_the_crd_file_is_what_is_enforced():
    """Change the CRD and the check changes: there is no second copy of the schema to update."""
    definition = yaml.safe_load(POLICY_CRD.read_text())
    root = definition["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    rules = root["properties"]["spec"]["properties"]["rules"]
    rules["items"]["properties"]["name"]["maxLength"] = 5
    rules["items"]["properties"]["owner"] = {"type": "string", "description": "a new field"}
    edited = Crd.from_definition(definition)
    obj = policy(allow={}, owner="team-a")
    obj["spec"]["rules"][0]["name"] = "longer-than-five"
    assert errors_of(obj, edited) == ["spec.rules[0].name: may not be longer than 5 characters"]
    assert errors_of(obj) == ["spec.rules[0].owner: unknown field"]  # the packaged CRD has no owner


def test_the_packaged_crd_is_loaded_once():
    assert crd(ACCESS_POLICIES) is crd(ACCESS_POLICIES)
    assert crd(ACCESS_POLICIES).validator is crd(ACCESS_POLICIES).validator


# ---------------------------------------------------------------------------- apiserver semantics

@pytest.mark.parametrize("name", ["ok\n", "ok\n\n", "\nok"])
def test_a_pattern_ends_at_the_end_of_the_text(name):
    """RE2/ECMA "$" ends the text; with Python's (jsonschema's default) "ok\\n" would pass."""
    obj = policy(allow={})
    obj["spec"]["rules"][0]["name"] = name
    assert errors_of(obj) == [f"spec.rules[0].name: invalid value {json.dumps(name)}: "
                              "must match the regular expression ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"]


@pytest.mark.parametrize("value,got", [(2.0, "number"), (True, "boolean"), ("2", "string")])
def test_an_integer_is_an_int(value, got):
    """JSON Schema's integer admits 2.0; the compiled policy would then carry a float."""
    obj = policy(rateLimit={"requests": value, "periodSeconds": 60})
    assert errors_of(obj) == [f"spec.rules[0].rateLimit.requests: must be of type integer, got {got}"]


def test_null_is_absent_and_defaults_fill_only_present_objects():
    obj = policy(requireApproval={"approvers": {"groups": ["ops"]}, "mode": None, "grant": None})
    obj["spec"]["masking"] = None
    out, errors = validate_object(obj, crd(ACCESS_POLICIES))
    assert errors == []
    approval = out["spec"]["rules"][0]["requireApproval"]
    assert approval["mode"] == "hold" and "grant" not in approval  # null mode defaulted, null grant absent
    assert "masking" not in out["spec"] and out["spec"]["defaultEffect"] == "block"
    # the input is untouched
    assert obj["spec"]["masking"] is None and obj["spec"]["rules"][0]["requireApproval"]["mode"] is None


def test_one_error_per_value_and_the_bad_value_is_left_out():
    """A value failing several keywords is reported once, by the most telling one."""
    obj = policy(match={"methods": ["get" * 10, 7, "GET"]}, allow={})
    out, errors = validate_object(obj, crd(ACCESS_POLICIES))
    assert sorted(map(str, errors)) == [
        "spec.rules[0].match.methods[0]: may not be longer than 16 characters",
        "spec.rules[0].match.methods[1]: must be of type string, got integer",
    ]
    assert out["spec"]["rules"][0]["match"]["methods"] == [None, None, "GET"]


def test_yaml_oddities_get_errors_not_exceptions():
    obj = policy(allow={})
    obj["spec"]["rules"][0][1] = "x"  # YAML allows non-string keys
    obj["spec"]["rules"].append("not-a-rule")
    obj["metadata"]["name"] = 5
    assert errors_of(obj) == [
        "metadata.name: must be of type string, got integer",
        "spec.rules[0].1: field names must be strings",
        "spec.rules[1]: must be of type object, got string",
    ]


def test_status_is_free_form():
    obj = policy(allow={})
    obj["status"] = {"anything": ["the operator wrote"], "ruleCount": "stale"}
    assert errors_of(obj) == []


# ---------------------------------------------------------------------------- Kubernetes extensions

def _crd(properties: dict) -> Crd:
    return Crd.from_definition({"spec": {
        "group": "chaperone.dev", "names": {"kind": "Thing"},
        "versions": [{"name": "v1alpha1", "schema": {"openAPIV3Schema": {
            "type": "object", "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                             "metadata": {"type": "object"},
                                             "spec": {"type": "object", "properties": properties}}}}}]}})


def thing(**spec):
    return {"apiVersion": "chaperone.dev/v1alpha1", "kind": "Thing", "metadata": {"name": "t"}, "spec": spec}


def test_int_or_string():
    kind = _crd({"port": {"x-kubernetes-int-or-string": True, "description": "a port"}})
    assert errors_of(thing(port=8080), kind) == errors_of(thing(port="http"), kind) == []
    assert errors_of(thing(port=[1]), kind) == ["spec.port: must be an integer or a string, got array"]
    # controller-gen's shape (the two branches written out too), and value checks in an anyOf
    generated = _crd({"port": {"x-kubernetes-int-or-string": True,
                               "anyOf": [{"type": "integer"}, {"type": "string"}]},
                      "size": {"x-kubernetes-int-or-string": True,
                               "anyOf": [{"maximum": 10}, {"pattern": "^[0-9]+Mi$"}]}})
    assert errors_of(thing(port="http", size="5Mi"), generated) == errors_of(thing(size=3), generated) == []
    assert errors_of(thing(port=1.5), generated) == ["spec.port: must be an integer or a string, got number"]
    assert errors_of(thing(size=[1]), generated) == ["spec.size: must be an integer or a string, got array"]


def test_preserve_unknown_fields_and_maps():
    kind = _crd({"free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                          "properties": {"known": {"type": "integer"}}},
                 "labels": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 3}},
                 "closed": {"type": "object", "properties": {"known": {"type": "integer"}}}})
    assert errors_of(thing(free={"known": 1, "other": {"x": 1}}, labels={"a": "b"}), kind) == []
    assert errors_of(thing(free={"known": "1"}, labels={"a": "long"}, closed={"other": 1}), kind) == [
        "spec.closed.other: unknown field",
        "spec.free.known: must be of type integer, got string",
        "spec.labels.a: may not be longer than 3 characters",
    ]


def test_nullable_keeps_null():
    kind = _crd({"maybe": {"type": "string", "nullable": True}, "never": {"type": "string", "default": "d"}})
    out, errors = validate_object(thing(maybe=None, never=None), kind)
    assert errors == [] and out["spec"] == {"maybe": None, "never": "d"}


def test_list_type_set_and_exclusive_bounds():
    kind = _crd({"tags": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}},
                 "ratio": {"type": "integer", "minimum": 0, "exclusiveMinimum": True}})
    assert errors_of(thing(tags=["a", "b"], ratio=1), kind) == []
    assert errors_of(thing(tags=["a", "a"], ratio=0), kind) == [
        "spec.ratio: must be greater than 0, got 0", "spec.tags: must not contain duplicates"]


def test_a_keyword_without_translation_is_refused():
    with pytest.raises(ValueError, match=r"spec.x: CRD schema keyword 'x-kubernetes-new' has no JSON Schema"):
        _crd({"x": {"type": "string", "x-kubernetes-new": True}})


def test_cel_rules_are_not_run():
    """jsonschema has no CEL: a rule's x-kubernetes-validations are dropped (the compiler repeats
    the AccessPolicy's; the module docstring lists what only the apiserver checks)."""
    kind = _crd({"n": {"type": "integer", "x-kubernetes-validations": [{"rule": "self > 10"}]}})
    assert errors_of(thing(n=1), kind) == []


# ---------------------------------------------------------------------------- other kinds

def test_a_claudeconnection_is_checked_against_its_crd():
    connection = {"apiVersion": "chaperone.dev/v1alpha1", "kind": "ClaudeConnection",
                  "metadata": {"name": "gh", "namespace": "team-a"},
                  "spec": {"type": "http", "hosts": ["api.github.com"],
                           "credentials": {"source": "secret", "secretRef": {"name": "gh"}}}}
    kind = crd(CLAUDE_CONNECTIONS)
    out, errors = validate_object(connection, kind)
    assert errors == [], errors
    bad = copy.deepcopy(connection)
    bad["spec"].update(type="ftp", hostz=["x"])
    bad["spec"]["hosts"] = "api.github.com"
    assert errors_of(bad, kind) == [
        "spec.hosts: must be of type array, got string",
        "spec.hostz: unknown field",
        'spec.type: unsupported value "ftp": supported values: '
        '"aws", "http", "kubernetes", "anthropic", "postgres", "mcp"',
    ]
    assert errors_of({**connection, "kind": "AccessPolicy"}, kind) == [
        'kind: must be "ClaudeConnection", got "AccessPolicy"']


def test_schema_errors_reach_the_compiler_with_their_paths():
    with pytest.raises(PolicyErrors) as info:
        compile_policy(policy(match={"methods": ["GET", "GET", "get"]}, allow={}))
    assert list(info.value) == [PolicyError(
        "spec.rules[0].match.methods[2]", 'invalid value "get": must match the regular expression ^[A-Z]+$')]


# ---------------------------------------------------------------------------- structure

@pytest.mark.parametrize("module", ["schema", "compiler", "errors"])
def test_no_function_level_imports(module):
    """No import cycle dodged by a lazy import: schema and compiler share errors.py instead.
    (jsonschema, a third-party library, is imported where an object needs it: issue 16.)"""
    path = Path(schema_module.__file__).with_name(f"{module}.py")
    tree = ast.parse(path.read_text())
    functions = [fn for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))]
    lazy = [f"{path.name}:{node.lineno}" for fn in functions
            for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))
            and not (isinstance(node, ast.ImportFrom) and node.module == "jsonschema" and not node.level)]
    assert lazy == []


def test_schema_does_not_import_the_compiler():
    imported = {node.module for node in ast.walk(ast.parse(Path(schema_module.__file__).read_text()))
                if isinstance(node, ast.ImportFrom)}
    assert ".compiler" not in {f".{m}" for m in imported if m} and "compiler" not in imported


# ---------------------------------------------------------------------------- jsonschema only when needed

def _examples() -> list[dict]:
    """The example objects, and the benchmark's 50-rule policy (every rule shape it has)."""
    docs = [d for path in sorted((REPO / "examples").rglob("*.yaml"))
            for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
    docs += [_bench_policy()]
    return [d for d in docs if d.get("apiVersion") == "chaperone.dev/v1alpha1"
            and d.get("kind") in ("AccessPolicy", "ClaudeConnection")]


def _bench_policy() -> dict:
    import sys

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from bench import chaperone_config

    return chaperone_config.policy("full")


def _mutations(value, rng, depth=0):
    """Copies of ``value`` with one thing changed: a value of another type or size, a key
    added or removed, an item added."""
    odd = [None, True, 0, -1, 2.5, 10**12, "", "x" * 300, "UPPER case", "ok", [], ["a"], {}, {"k": "v"}]
    if isinstance(value, dict) and value:
        for key in value:
            yield {k: v for k, v in value.items() if k != key}
            for other in rng.sample(odd, 4):
                yield {**value, key: other}
            if depth < 6:
                for changed in _mutations(value[key], rng, depth + 1):
                    yield {**value, key: changed}
        yield {**value, "unknownField": 1}
    elif isinstance(value, list) and value:
        yield value + [value[0]]
        yield value + rng.sample(odd, 1)
        if depth < 6:
            for i in range(min(len(value), 3)):
                for changed in _mutations(value[i], rng, depth + 1):
                    yield value[:i] + [changed] + value[i + 1:]


@pytest.mark.parametrize("plural", [ACCESS_POLICIES, CLAUDE_CONNECTIONS])
def test_the_walk_agrees_with_jsonschema(plural):
    """``_conforms`` says "valid" exactly when jsonschema finds no error, on the example objects
    (valid: so the common case never needs jsonschema) and on thousands of mutations of them."""
    import random

    kind = crd(plural)
    objs = [o for o in _examples() if o["kind"] == kind.kind]
    assert objs
    rng, checked = random.Random(16), 0
    for obj in objs:
        assert _conforms(obj, kind.schema), obj["metadata"]
        for mutated in _mutations(obj, rng):
            valid = not any(True for _ in kind.validator.iter_errors(mutated))
            assert _conforms(mutated, kind.schema) == valid, mutated
            checked += 1
    assert checked > 300


def test_values_the_walk_does_not_know_go_to_jsonschema():
    """Anything outside what the walk implements is "not known valid", never "valid"."""
    kind = _crd({"tags": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}},
                 "n": {"type": "integer", "enum": [1, 2]}, "size": {"type": "integer", "multipleOf": 4}})
    assert not _conforms(thing(tags=["a"]), kind.schema)  # uniqueItems: jsonschema's
    assert not _conforms(thing(n=1), kind.schema)  # an enum of integers: jsonschema's equality
    assert not _conforms(thing(size=8), kind.schema)  # a keyword the walk does not implement
    assert _conforms(thing(), kind.schema)
    assert errors_of(thing(tags=["a"], n=1, size=8), kind) == []
    assert errors_of(thing(tags=["a", "a"], n=True), kind) == [
        "spec.n: must be of type integer, got boolean", "spec.tags: must not contain duplicates"]


CHECK = r"""
import json, sys
from chaperone_sidecar.policy.compiler import compile_policy, PolicyErrors
obj = json.loads(sys.argv[1])
try:
    compile_policy(obj)
    result = "ok"
except PolicyErrors as exc:
    result = str(list(exc)[0])
print(json.dumps([result, sorted(m for m in sys.modules if m.split(".")[0] in ("jsonschema", "referencing", "rpds"))]))
"""


def _compile_in_fresh_process(obj) -> tuple[str, list[str]]:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", CHECK, json.dumps(obj)], capture_output=True, text=True,
                         timeout=120, env={"PYTHONPATH": str(REPO / "sidecar"), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    result, modules = json.loads(out.stdout)
    return result, modules


def test_a_valid_policy_compiles_without_jsonschema_and_an_invalid_one_loads_it():
    """Issue 16 (idle RSS): jsonschema and its dependencies are not imported for objects that
    conform; a schema error still gets jsonschema's detail."""
    result, modules = _compile_in_fresh_process(policy(match={"methods": ["GET"]}, allow={}))
    assert (result, modules) == ("ok", [])
    result, modules = _compile_in_fresh_process(policy(match={"methods": ["get"]}, allow={}))
    assert result == ('spec.rules[0].match.methods[0]: invalid value "get": '
                      "must match the regular expression ^[A-Z]+$")
    assert "jsonschema" in modules
