"""Kubernetes Secret data: masked in every shape the API serves a Secret in.

On a kubernetes connection every request on the core ``secrets`` resource carries a default
``MaskSpec(kubernetes_secrets="mask")`` (added by the Mask addon; a matching rule with
``mask: {kubernetesSecrets: reveal}`` removes it). This module masks a parsed JSON document
of such a response (or request body):

* a ``Secret`` (get), a ``SecretList`` (list: ``items[*]``), a watch event (``object``), a
  ``Table`` with objects (``rows[*].object``): every ``data`` and ``stringData`` object found
  anywhere in the document has each of its values replaced, its keys kept (they name what the
  Secret holds, which an agent legitimately needs);
* the ``kubectl.kubernetes.io/last-applied-configuration`` annotation, which ``kubectl apply``
  fills with the whole Secret as JSON text: parsed, masked the same way, written back (or
  replaced whole when it does not parse).

**Decision**: a ``data`` value is replaced by the *base64 of* ``[MASKED:kubernetes-secret]``,
so the field stays valid base64 and typed clients (``kubectl describe``, client-go) still
decode the object, showing the token; a ``stringData`` value by the token itself. The
document walk does not look at ``metadata`` (``managedFields`` name ``f:data``, not data).

Only JSON can be masked this way. A Secret asked for as protobuf, CBOR or YAML cannot, and
``mask_secrets`` raises ``MaskingError``: the response is refused, never passed unmasked (the
refusal tells the agent to ask for ``application/json``, which is kubectl's default).
"""

from __future__ import annotations

import base64
import json
from typing import Any

from .encoding import MaskingError

KIND = "kubernetes-secret"
TOKEN = f"[MASKED:{KIND}]"
DATA_TOKEN = base64.b64encode(TOKEN.encode()).decode("ascii")
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
_DATA_KEYS = {"data": DATA_TOKEN, "stringData": TOKEN}


class NotJSON(MaskingError):
    """A body of a Secret request that is not JSON: it cannot be masked, so it is refused."""


def _mask_data(values: dict[str, Any], token: str) -> int:
    n = 0
    for key, value in values.items():
        if value is not None and value != token:
            values[key] = token
            n += 1
    return n


def _mask_annotation(annotations: dict[str, Any]) -> int:
    text = annotations.get(LAST_APPLIED)
    if not isinstance(text, str) or not text:
        return 0
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    if not isinstance(document, (dict, list)):
        if text == TOKEN:
            return 0
        annotations[LAST_APPLIED] = TOKEN
        return 1
    n = mask_document(document)
    if n:
        annotations[LAST_APPLIED] = json.dumps(document, separators=(",", ":"))
    return n


def mask_document(document: Any) -> int:
    """Mask Secret data in a parsed document in place; the number of values replaced."""
    n = 0
    stack = [document]
    while stack:  # iterative: no recursion limit on deep documents
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, (dict, list)))
            continue
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            if key in _DATA_KEYS and isinstance(value, dict):
                n += _mask_data(value, _DATA_KEYS[key])
            elif key == "metadata" and isinstance(value, dict):
                annotations = value.get("annotations")
                if isinstance(annotations, dict):
                    n += _mask_annotation(annotations)
            elif isinstance(value, (dict, list)):
                stack.append(value)
    return n


def mask_secrets(body: bytes) -> tuple[bytes, int]:
    """A whole JSON body - or JSON lines (a buffered watch) - with its Secret data masked,
    and the count. Raises ``NotJSON`` when the body does not parse as JSON (protobuf, CBOR,
    YAML ...). Returns ``body`` itself when nothing was masked.
    """
    if not body.strip():
        return body, 0
    try:
        return _mask_one(body)
    except NotJSON:
        if b"\n" not in body.strip():
            raise
    total, lines = 0, []
    for line in body.splitlines(keepends=True):
        text = line.rstrip(b"\r\n")
        masked, n = _mask_one(text) if text.strip() else (text, 0)
        total += n
        lines.append(masked + line[len(text):])
    return (b"".join(lines), total) if total else (body, 0)


def _mask_one(body: bytes) -> tuple[bytes, int]:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise NotJSON("a Kubernetes Secret can only be masked in JSON and this body is not "
                      "JSON; ask with Accept: application/json (kubectl's default)") from None
    n = mask_document(document)
    if not n:
        return body, 0
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass"), n
