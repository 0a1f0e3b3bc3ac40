"""JSON-path field rules: the path language, its errors, and masking parsed documents."""

from __future__ import annotations

import copy

import pytest

from chaperone_sidecar.policy.masking.fields import (
    Segment,
    apply_paths,
    compile_path,
    field_token,
    path_errors,
)


@pytest.mark.parametrize(("path", "canonical"), [
    ("$", "$"),
    ("$.SecretString", '$["SecretString"]'),
    ("$.items[*].data.*", '$["items"][*]["data"][*]'),
    ("$..password", '$..["password"]'),
    ("$..['api key']", '$..["api key"]'),
    ("$.data['tls.key']", '$["data"]["tls.key"]'),
    ('$["a\\"b"]', '$["a\\"b"]'),
    ("$.items[0].x", '$["items"][0]["x"]'),
    ("$.items[-1]", '$["items"][-1]'),
    ("$[ 2 ]", "$[2]"),
    ("$.a-b.c_d.$e", '$["a-b"]["c_d"]["$e"]'),
])
def test_compile(path, canonical):
    assert str(compile_path(path)) == canonical
    assert compile_path(path).source == path


@pytest.mark.parametrize(("path", "reason"), [
    ("", "empty"),
    ("SecretString", "must start with '$'"),
    ("$.", "expected a member name"),
    ("$..", "expected a member name"),
    ("$..*", "'..' must be followed by a member name"),
    ("$..[*]", "'..' must be followed by a member name"),
    ("$.a[", "unclosed '['"),
    ("$.a['b]", "unterminated quoted name"),
    ("$.a['b'", "expected ']' after quoted name"),
    ("$.a[x]", "expected an index, '*' or a quoted name"),
    ("$.a[1.5]", "expected an index"),
    ("$a", "unexpected 'a' at position 1"),
    ("$.a b", "unexpected ' '"),
    ("$" + ".a" * 65, "more than 64 segments"),
    ("$." + "a" * 600, "longer than 512"),
])
def test_compile_errors(path, reason):
    with pytest.raises(ValueError, match=None) as exc:
        compile_path(path)
    assert reason in str(exc.value)
    assert path_errors([path, "$.ok"]) == [str(exc.value)]


def _mask(doc, *paths, key=None):
    doc = copy.deepcopy(doc)
    return apply_paths(doc, tuple(compile_path(p) for p in paths), key)


M = "[MASKED:field]"


def test_member_and_nested_objects_replaced_whole():
    doc = {"SecretString": {"user": "u", "pass": "p"}, "Name": "db"}
    assert _mask(doc, "$.SecretString") == ({"SecretString": M, "Name": "db"}, 1)


def test_kubernetes_secret_list():
    doc = {"kind": "SecretList", "items": [
        {"metadata": {"name": "a"}, "data": {"tls.key": "S0VZ", "tls.crt": "Q1JU"}},
        {"metadata": {"name": "b"}, "data": {"token": "VE9L"}},
        {"metadata": {"name": "c"}},
    ]}
    out, n = _mask(doc, "$.items[*].data.*")
    assert n == 3
    assert out["items"][0] == {"metadata": {"name": "a"}, "data": {"tls.key": M, "tls.crt": M}}
    assert out["items"][1]["data"] == {"token": M}
    assert out["items"][2] == {"metadata": {"name": "c"}}


def test_recursive_descent():
    doc = {"password": "p0", "a": [{"password": "p1"}, {"b": {"password": {"password": "p3"}}}], "c": "password"}
    out, n = _mask(doc, "$..password")
    assert out == {"password": M, "a": [{"password": M}, {"b": {"password": M}}], "c": "password"}
    assert n == 3  # the inner p3 disappears with its parent: not counted twice


def test_indexes_and_wildcards():
    doc = {"a": [1, [2, 3], {"x": 4}], "o": {"k": 1, "l": [1]}}
    assert _mask(doc, "$.a[0]")[0]["a"] == [M, [2, 3], {"x": 4}]
    assert _mask(doc, "$.a[-1].x")[0]["a"][2] == {"x": M}
    assert _mask(doc, "$.a[5]") == (doc, 0)
    assert _mask(doc, "$.o[*]")[0]["o"] == {"k": M, "l": M}
    assert _mask(doc, "$.a.x") == (doc, 0)  # member of an array: no match
    assert _mask(doc, "$.o[0]") == (doc, 0)  # index of an object: no match


def test_root_and_scalars():
    assert _mask({"a": 1}, "$") == (M, 1)
    assert _mask("text", "$.a") == ("text", 0)
    assert _mask([{"a": None}], "$[0].a") == ([{"a": M}], 1)


def test_multiple_paths_and_idempotence():
    doc = {"password": "x", "nested": {"password": "y"}}
    once, n1 = _mask(doc, "$.password", "$..password")
    assert once == {"password": M, "nested": {"password": M}} and n1 == 2
    assert _mask(once, "$.password", "$..password") == (once, 0)


def test_keyed_field_tokens():
    a, _ = _mask({"s": {"k": [1, 2]}}, "$.s", key=b"key")
    b, _ = _mask({"s": {"k": [1, 2]}}, "$.s", key=b"key")
    c, _ = _mask({"s": {"k": [1, 3]}}, "$.s", key=b"key")
    assert a == b != c
    assert a["s"].startswith("[MASKED:field:") and len(a["s"]) == len("[MASKED:field:]") + 12
    assert field_token("x", None) == M


def test_deep_documents_do_not_recurse():
    doc: dict = {"password": "top"}
    node = doc
    for _ in range(5000):
        node["n"] = {}
        node = node["n"]
    node["password"] = "deep"
    out, n = apply_paths(doc, (compile_path("$..password"),))
    assert n == 2 and out["password"] == M


def test_segment_str():
    assert str(Segment("wildcard")) == "[*]" and str(Segment("index", index=3)) == "[3]"
