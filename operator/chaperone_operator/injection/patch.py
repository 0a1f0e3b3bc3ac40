"""RFC 6902 JSONPatch generation: the difference between the pod as admitted and as injected.

Why derive the patch from a diff instead of emitting operations while mutating: the mutated pod
is the single source of truth (it is what golden files record), and a diff cannot disagree with
it. The diff is deterministic (dict keys in sorted order) and conservative about lists:

* dict: `remove` for keys that disappeared, `add` for new keys, recursion or `replace` for
  changed values (RFC 6902 `add` on an existing member replaces it, but `replace` is clearer);
* list: when the new list is at least as long, element-wise changes and `add` for appended
  elements (recursing into an element only when both are objects with the same "name", so a
  prepended container never turns into a rename of the one that used to be first); when it is
  shorter, the whole list is replaced, because index-based `remove`s are easy to get wrong
  and the list as a whole is what the webhook decided.

Pointers escape "~" as "~0" and "/" as "~1" (annotation keys such as "chaperone.dev/status").
"""

from __future__ import annotations

from typing import Any


def escape(token: str) -> str:
    """One JSON pointer reference token (RFC 6901)."""
    return token.replace("~", "~0").replace("/", "~1")


def pointer(*tokens: str | int) -> str:
    return "".join("/" + escape(str(t)) for t in tokens)


def make_patch(old: Any, new: Any) -> list[dict[str, Any]]:
    """The JSONPatch turning `old` into `new` (both JSON-compatible values)."""
    ops: list[dict[str, Any]] = []
    _diff(old, new, "", ops)
    return ops


def _diff(old: Any, new: Any, path: str, ops: list[dict[str, Any]]) -> None:
    if _same(old, new):
        return
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(old):
            if key not in new:
                ops.append({"op": "remove", "path": f"{path}/{escape(key)}"})
        for key in sorted(new):
            sub = f"{path}/{escape(key)}"
            if key not in old:
                ops.append({"op": "add", "path": sub, "value": new[key]})
            else:
                _diff(old[key], new[key], sub, ops)
        return
    if isinstance(old, list) and isinstance(new, list) and len(new) >= len(old):
        for i, (a, b) in enumerate(zip(old, new, strict=False)):
            if _same(a, b):
                continue
            if isinstance(a, dict) and isinstance(b, dict) and a.get("name") == b.get("name"):
                _diff(a, b, f"{path}/{i}", ops)
            else:
                ops.append({"op": "replace", "path": f"{path}/{i}", "value": b})
        for i in range(len(old), len(new)):
            ops.append({"op": "add", "path": f"{path}/{i}", "value": new[i]})
        return
    if path == "":
        # The document root itself changed type: a patch cannot express that sensibly.
        raise ValueError("cannot patch the document root")
    ops.append({"op": "replace", "path": path, "value": new})


def _same(a: Any, b: Any) -> bool:
    # bool is an int in Python; JSON distinguishes true from 1.
    return type(a) is type(b) and a == b
