#!/usr/bin/env python3
"""Compile the OCSF schema sources of one event class into a JSON Schema (draft 2020-12).

Why: OCSF publishes its schema as its own metaschema-described JSON (``dictionary.json``,
``events/``, ``objects/``, ``profiles/``), and the JSON Schema export lives only on
schema.ocsf.io (not reachable from CI). This script reads the sources of a tagged release
from a checkout of https://github.com/ocsf/ocsf-schema and writes what the OCSF server's
``/schema/classes/<name>`` export says: every attribute of the class (with the base event's,
the category's and every profile's attributes), ``required`` as the sources mark it, the
``*_id`` enums (the class's values merged with the dictionary's), and the object types
(``$defs``, ``extends`` followed, ``at_least_one``/``just_one`` constraints). Unknown
attributes are refused (``additionalProperties: false``) except inside ``unmapped`` and
other ``object``-typed values, so a misspelt attribute fails validation.

Usage: hack/gen-ocsf-schema.py <ocsf-schema checkout> <tag> <class name> <output.json>
(the test schema: ``... 1.8.0 api_activity tests/sidecar/recording/ocsf/api_activity-1.8.0.schema.json``)
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

PRIMITIVE = {"string_t": "string", "integer_t": "integer", "long_t": "integer",
             "float_t": "number", "boolean_t": "boolean", "json_t": None}


class Sources:
    def __init__(self, repo: str, tag: str) -> None:
        self.repo, self.tag = repo, tag
        self.dictionary = self.load("dictionary.json")
        self.types = self.dictionary["types"]["attributes"]
        self.objects: dict[str, dict[str, Any]] = {}
        files = subprocess.run(["git", "-C", repo, "ls-tree", "-r", "--name-only", tag, "objects/"],
                               check=True, capture_output=True, text=True).stdout.split()
        for path in files:
            if path.endswith(".json"):
                obj = self.load(path)
                self.objects[obj["name"]] = obj

    def load(self, path: str) -> Any:
        text = subprocess.run(["git", "-C", self.repo, "show", f"{self.tag}:{path}"], check=True,
                              capture_output=True, text=True).stdout
        return json.loads(text)

    def attributes(self, doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """A document's own attributes with its ``$include`` files merged in."""
        out: dict[str, dict[str, Any]] = {}
        attrs = dict(doc.get("attributes") or {})
        for include in attrs.pop("$include", []):
            profile = include.removeprefix("profiles/").removesuffix(".json") \
                if include.startswith("profiles/") else None
            for name, entry in self.attributes(self.load(include)).items():
                if profile and "profile" not in entry:
                    entry = {**entry, "profile": profile}  # required only with the profile
                out[name] = merge(out.get(name, {}), entry)
        for name, entry in attrs.items():
            out[name] = merge(out.get(name, {}), entry)
        return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if key == "enum" and isinstance(out.get("enum"), dict):
            out["enum"] = {**out["enum"], **value}
        else:
            out[key] = value
    return out


def chain(sources: Sources, doc: dict[str, Any], finder: Any) -> dict[str, dict[str, Any]]:
    """Attributes along ``extends`` (parent first)."""
    parent = doc.get("extends")
    attrs = chain(sources, finder(parent), finder) if parent else {}
    for name, entry in sources.attributes(doc).items():
        attrs[name] = merge(attrs.get(name, {}), entry)
    return attrs


def build(sources: Sources, class_name: str) -> dict[str, Any]:
    events = {}
    files = subprocess.run(["git", "-C", sources.repo, "ls-tree", "-r", "--name-only", sources.tag,
                            "events/"], check=True, capture_output=True, text=True).stdout.split()
    for path in files:
        if path.endswith(".json"):
            doc = sources.load(path)
            events[doc["name"]] = doc
    cls = events[class_name]
    attrs = chain(sources, cls, events.__getitem__)
    categories = sources.load("categories.json")["attributes"]
    category = categories[events["application" if cls.get("extends") == "application"
                                 else cls.get("extends")]["category"]]
    class_uid = category["uid"] * 1000 + cls["uid"]
    defs: dict[str, Any] = {}
    schema = object_schema(sources, attrs, defs)
    props = schema["properties"]
    props["class_uid"] = {"const": class_uid}
    props["category_uid"] = {"const": category["uid"]}
    activities = sorted(int(k) for k in attrs["activity_id"]["enum"])
    props["type_uid"] = {"enum": [class_uid * 100 + a for a in activities]}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://schema.ocsf.io/{sources.tag}/schema/classes/{class_name}",
        "title": f"OCSF {sources.tag} {cls['caption']} ({class_uid})",
        "description": (f"Generated by hack/gen-ocsf-schema.py from https://github.com/ocsf/"
                        f"ocsf-schema/tree/{sources.tag} (events/, objects/, profiles/, "
                        "dictionary.json)."),
        **schema,
        "$defs": defs,
    }


def value_schema(sources: Sources, name: str, entry: dict[str, Any], defs: dict[str, Any]) -> dict:
    dict_entry = sources.dictionary["attributes"].get(name, {})
    full = merge(dict_entry, entry)
    type_name = full.get("type") or "string_t"
    one: dict[str, Any]
    if type_name in sources.types or type_name in PRIMITIVE:
        base = type_name
        while base not in PRIMITIVE and base in sources.types:
            base = sources.types[base].get("type", "string_t")
        json_type = PRIMITIVE.get(base, "string")
        one = {"type": json_type} if json_type else {}
        rng = sources.types.get(type_name, {}).get("range")
        if rng:
            one.update({"minimum": rng[0], "maximum": rng[1]})
        if full.get("enum") and json_type == "integer":
            one["enum"] = sorted(int(k) for k in full["enum"])
    elif type_name == "object":
        one = {"type": "object"}
    else:
        if type_name not in defs:
            defs[type_name] = {}  # placeholder: cycles
            obj = sources.objects[type_name]
            attrs = chain(sources, obj, lambda n: sources.objects[n])
            defs[type_name] = object_schema(sources, attrs, defs, obj.get("constraints"))
        one = {"$ref": f"#/$defs/{type_name}"}
    if full.get("is_array"):
        return {"type": "array", "items": one}
    return one


def object_schema(sources: Sources, attrs: dict[str, dict[str, Any]], defs: dict[str, Any],
                  constraints: dict[str, Any] | None = None) -> dict[str, Any]:
    props = {name: value_schema(sources, name, entry, defs) for name, entry in sorted(attrs.items())}
    # A profile's attributes are required only in events that name the profile in
    # metadata.profiles; Chaperone's events name none, so they are optional here.
    required = sorted(n for n, e in attrs.items()
                      if e.get("requirement") == "required" and not e.get("profile"))
    out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        out["required"] = required
    constraints = constraints or {}
    if constraints.get("at_least_one"):
        out["anyOf"] = [{"required": [n]} for n in constraints["at_least_one"]]
    if constraints.get("just_one"):
        out["oneOf"] = [{"required": [n]} for n in constraints["just_one"]]
    return out


def main() -> None:
    repo, tag, class_name, output = sys.argv[1:5]
    schema = build(Sources(repo, tag), class_name)
    with open(output, "w") as fh:
        json.dump(schema, fh, indent=1, sort_keys=True)
        fh.write("\n")


if __name__ == "__main__":
    main()
