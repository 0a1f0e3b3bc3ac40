"""One canonical request path: what the policy judges is what the upstream is sent.

Servers disagree about paths. CPython's ``http.server`` and nginx serve ``//admin`` as
``/admin``; Tomcat drops ``;jsessionid=...`` path parameters (``/admin;x=1`` is ``/admin``);
IIS treats ``\\`` as ``/`` and strips trailing dots and spaces; some frameworks decode ``%2F``
into a separator, or decode twice (``%252F`` -> ``%2F`` -> ``/``). A rule about ``/admin`` that
compares the raw path would pass every one of these. So every connection type's classifier
(``http``, ``kubernetes``, ``aws`` REST, ``anthropic``) and the rule matcher use this one
function, and the sidecar **forwards the canonical path upstream** (addons/route.py): the
upstream and the policy then see the same path, whatever the upstream would have made of the
original.

:func:`canonical_path` (the default rules; the ``http``, ``kubernetes`` and ``anthropic`` types):

1. percent-encoded *unreserved* characters (RFC 3986 ``A-Za-z0-9-._~``) are decoded, once;
   other escapes are kept, upper-cased (``%2f`` -> ``%2F``);
2. runs of ``/`` collapse to one; ``.`` and ``..`` segments are resolved (also when they were
   written ``%2e``), never above the root;
3. what stays ambiguous is **refused** (the caller answers 400 ``invalid_request``), because no
   single reading is right for every upstream:

   * an encoded slash ``%2F`` (a separator to some servers, data to others),
   * a backslash ``\\`` or ``%5C`` (a separator on Windows servers),
   * a double encoding ``%25`` followed by two hex digits (``%252F``: decoded twice, a slash),
   * ``;`` (path parameters, dropped by servlet containers: ``/admin;x=1``, ``/..;/admin``),
   * a segment ending in ``.`` or a space (``/admin.``, ``/admin%20``: stripped by Windows),
   * a control character or NUL, raw or encoded, a raw ``#`` (a fragment is never sent:
     ``/admin#/../public`` is ``/admin`` to some servers), a ``%`` without two hex digits, and
     escapes that are not UTF-8 (the overlong ``%C0%AE`` is ``.`` to some old decoders).

A connection whose upstream needs one of those declares it in ``spec.pathNormalization``
(:class:`PathRules`, ``allowEncodedSlash`` ...); the character is then passed through as data
(kept encoded) and the policy sees it as the upstream should.

**aws** is different by design: S3 object keys are literal (``a//b`` and ``a/./b`` are other
objects than ``a/b``, and S3 decodes each escape exactly once), and the AWS classifier
resolves labels segment by segment the way AWS does (an encoded ``%2F`` inside a label such as
an ARN is one value). So for aws the segments are kept as they are (no collapsing, no dot
resolution, no trailing-dot rule), encoded slashes and ``%25`` are allowed by default, and only
control characters, raw backslashes and ``;`` (which no AWS SDK sends unencoded) are refused.

Case: paths are case-sensitive (RFC 3986). ``pathNormalization.caseInsensitive`` declares an
upstream that is not; rules then match the path ignoring case (policy/matching.py) while the
path is forwarded with its case unchanged (identifiers in paths keep their case).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

__all__ = ["PathRules", "path_rules", "canonical_path", "AMBIGUOUS_FIELDS"]

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_HEX = frozenset("0123456789abcdefABCDEF")
_SLASHES = re.compile(r"/{2,}")
_DOUBLE = re.compile(r"%25[0-9A-Fa-f]{2}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Anything that could make the canonical form differ from the path, or make it ambiguous; a
# path without any of these (nearly every request) is canonical as it is.
# Lone surrogates are the bytes that were not UTF-8 on the wire (mitmproxy decodes the path
# with surrogateescape): an overlong "\xc0\xae" is "." to some servers, so they are refused.
_NOT_UTF8 = re.compile(r"[\udc80-\udcff]")
_SUSPECT = re.compile(r"[\x00-\x1f\x7f\\;%#\udc80-\udcff]|//|/\.|\.(?:/|$)")

# pathNormalization field -> PathRules attribute (the refusal message names the field).
AMBIGUOUS_FIELDS = {
    "allowEncodedSlash": "allow_encoded_slash",
    "allowBackslash": "allow_backslash",
    "allowDoubleEncoding": "allow_double_encoding",
    "allowSemicolon": "allow_semicolon",
    "allowTrailingDotOrSpace": "allow_trailing_dot_or_space",
}


@dataclass(frozen=True, slots=True)
class PathRules:
    """How one connection's paths are canonicalised (``spec.pathNormalization``)."""

    allow_encoded_slash: bool = False
    allow_backslash: bool = False
    allow_double_encoding: bool = False
    allow_semicolon: bool = False
    allow_trailing_dot_or_space: bool = False
    case_insensitive: bool = False
    literal_segments: bool = False  # aws: keep "//" and dot segments (S3 keys are literal)


DEFAULT_RULES = PathRules()
_AWS_RULES = PathRules(allow_encoded_slash=True, allow_double_encoding=True,
                       allow_trailing_dot_or_space=True, literal_segments=True)


def path_rules(connection_type: str, spec: Mapping[str, Any] | None = None) -> PathRules:
    """The rules of a connection: its type's defaults, overridden by ``spec.pathNormalization``."""
    base = _AWS_RULES if connection_type == "aws" else DEFAULT_RULES
    section = (spec or {}).get("pathNormalization") if isinstance(spec, Mapping) else None
    if not isinstance(section, Mapping) or not section:
        return base
    values = {attr: bool(section[field]) for field, attr in AMBIGUOUS_FIELDS.items()
              if isinstance(section.get(field), bool)}
    if isinstance(section.get("caseInsensitive"), bool):
        values["case_insensitive"] = section["caseInsensitive"]
    return PathRules(**{**_as_dict(base), **values})


def _as_dict(rules: PathRules) -> dict[str, bool]:
    return {name: getattr(rules, name) for name in PathRules.__slots__}


def _refusal(path: str, what: str, field: str | None) -> str:
    shown = path if len(path) <= 200 else path[:199] + "…"
    text = f"the request path {shown!r} is ambiguous: {what}"
    if field:
        text += (f"; servers disagree on what it means, so it is refused. Send the path without "
                 f"it, or ask the connection's owner to set spec.pathNormalization.{field}: true "
                 f"if the upstream needs it")
    else:
        text += "; it is never forwarded"
    return text


def _decode(path: str, rules: PathRules) -> tuple[str, str]:
    """Step 1 and the checks on escapes: (decoded path, refusal or "")."""
    out: list[str] = []
    i, n = 0, len(path)
    while i < n:
        ch = path[i]
        if ch != "%":
            out.append(ch)
            i += 1
            continue
        pair = path[i + 1:i + 3]
        if len(pair) < 2 or pair[0] not in _HEX or pair[1] not in _HEX:
            return "", _refusal(path, "a '%' not followed by two hex digits", None)
        value = int(pair, 16)
        if value < 0x20 or value == 0x7F:
            return "", _refusal(path, f"an encoded control character %{pair.upper()}", None)
        if value == 0x2F and not rules.allow_encoded_slash:
            return "", _refusal(path, "an encoded slash %2F", "allowEncodedSlash")
        if value == 0x5C and not rules.allow_backslash:
            return "", _refusal(path, "an encoded backslash %5C", "allowBackslash")
        char = chr(value)
        out.append(char if char in _UNRESERVED else "%" + pair.upper())
        i += 3
    decoded = "".join(out)
    try:
        unquote_to_bytes(decoded).decode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError):
        return "", _refusal(path, "percent-encoded bytes that are not UTF-8 (an overlong %C0%AE "
                                  "is '.' to some servers)", None)
    if not rules.allow_double_encoding:
        # Checked after decoding: "%25%36%31" is "%2561" once the hex digits are decoded.
        double = _DOUBLE.search(decoded)
        if double:
            return "", _refusal(path, f"a double encoding {double.group()}", "allowDoubleEncoding")
    return decoded, ""


def _raw_problem(path: str, rules: PathRules) -> str:
    control = _CONTROL.search(path)
    if control:
        return _refusal(path, f"a control character {control.group()!r}", None)
    if _NOT_UTF8.search(path):
        return _refusal(path, "raw bytes that are not UTF-8 (an overlong \\xc0\\xae is '.' to some "
                              "servers)", None)
    if "#" in path:  # a fragment is never sent; servers cut the path there, or do not
        return _refusal(path, "a '#' (fragment)", None)
    if "\\" in path and not rules.allow_backslash:
        return _refusal(path, "a backslash", "allowBackslash")
    if ";" in path and not rules.allow_semicolon:
        return _refusal(path, "';' path parameters", "allowSemicolon")
    return ""


def _resolve(path: str) -> str:
    """Step 2: collapse slashes, remove dot segments (RFC 3986 5.2.4), never above the root."""
    path = _SLASHES.sub("/", path)
    if "/." not in path:
        return path
    segments = path.split("/")
    out: list[str] = []
    for seg in segments[1:]:
        if seg == "..":
            if out:
                out.pop()
        elif seg != ".":
            out.append(seg)
    result = "/" + "/".join(out)
    if segments[-1] in (".", "..") and not result.endswith("/"):
        result += "/"
    return result


def _trailing_problem(original: str, path: str) -> str:
    for seg in path.split("/"):
        if seg in ("", ".", ".."):
            continue
        if seg.endswith(".") or seg.endswith("%20"):
            return _refusal(original, f"the segment {seg!r} ends in a dot or a space",
                            "allowTrailingDotOrSpace")
    return ""


def canonical_path(path: str, rules: PathRules = DEFAULT_RULES) -> tuple[str, str]:
    """``(canonical path, "")``, or ``(path, refusal message)`` when it stays ambiguous.

    ``path`` is the path without the query, as sent (percent-encoding preserved). Idempotent:
    the canonical form of a canonical path is itself.
    """
    if _SUSPECT.search(path) is None:
        return path, ""
    problem = _raw_problem(path, rules)
    if problem:
        return path, problem
    decoded, problem = _decode(path, rules) if "%" in path else (path, "")
    if problem:
        return path, problem
    if rules.literal_segments or not decoded.startswith("/"):
        return decoded, ""  # "*" (OPTIONS *), absolute forms: nothing to resolve
    canonical = _resolve(decoded)
    if not rules.allow_trailing_dot_or_space:
        problem = _trailing_problem(path, canonical)
        if problem:
            return path, problem
    return canonical, ""
