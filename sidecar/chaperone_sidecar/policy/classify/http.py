"""Generic HTTP classification: the fields every Action carries, and the ``http`` type itself.

Every typed classifier starts from ``sanitize`` so it can rely on plain ``str``/``int``/``bytes``
fields, and on a host written one way only: policies compare host names, so ``API.Example.com.``
must not slip past a rule about ``api.example.com`` (DNS names are case-insensitive and the
trailing dot is the same name). Methods are upper-cased for the same reason. Paths are
canonicalised by :mod:`.paths` (``classify`` does it for every type); queries are kept exactly
as sent; the summary is for people, so it is shortened.

**Method override.** ``X-HTTP-Method-Override``, ``X-HTTP-Method``, ``X-Method-Override`` and a
``_method`` query parameter make many frameworks (Rails, Laravel, Express' method-override,
ASP.NET, Google APIs) execute another method than the request line's: a ``POST`` the policy
allows becomes a ``DELETE`` it blocks (Rails, Laravel and Symfony also read ``_method`` from a
form body). **Decision**: by default the sidecar strips them (``spec.methodOverride: strip``;
addons/route.py; a multipart body's field is refused instead), so the upstream executes the
method the policy judged. A connection whose upstream needs them sets ``methodOverride: honor``: they are
forwarded and the request is judged as the overridden method (:func:`override_method`);
conflicting override values are refused (400).
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qsl

from ..model import Action, HTTPRequest

_DEFAULT_PORTS = {"http": 80, "https": 443}
OVERRIDE_HEADERS = ("x-http-method-override", "x-http-method", "x-method-override")
OVERRIDE_PARAMS = ("_method",)
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}$")  # an HTTP method is a token
SUMMARY_LIMIT = 300
_QUERY_IN_SUMMARY = 80


def _text(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "surrogateescape")
    return "" if value is None else str(value)


def sanitize(request: HTTPRequest, errors: list[str]) -> HTTPRequest:
    """A copy with well-typed fields and the host/method normalised (never raises)."""
    fixed: dict[str, Any] = {}  # HTTPRequest fields, each of its own type
    for name in ("method", "scheme", "host", "path", "query"):
        value = getattr(request, name, "")
        if not isinstance(value, str):
            errors.append(f"request.{name} is {type(value).__name__}, not str")
            fixed[name] = _text(value)
    port = getattr(request, "port", 0)
    if not isinstance(port, int) or isinstance(port, bool):
        errors.append(f"request.port is {type(port).__name__}, not int")
        try:
            fixed["port"] = int(port)
        except (TypeError, ValueError):
            fixed["port"] = 0
    body = getattr(request, "body", b"")
    if not isinstance(body, bytes):
        errors.append(f"request.body is {type(body).__name__}, not bytes")
        fixed["body"] = body.encode("utf-8", "surrogateescape") if isinstance(body, str) else (
            bytes(body) if isinstance(body, (bytearray, memoryview)) else b"")
    headers = getattr(request, "headers", ())
    try:
        clean = tuple((_text(k), _text(v)) for k, v in headers)
    except (TypeError, ValueError):
        errors.append("request.headers is not a sequence of pairs")
        clean = ()
    if clean != headers:
        fixed["headers"] = clean
    if fixed:
        request = replace(request, **fixed)
    method = request.method.upper()
    host = request.host.lower().rstrip(".")
    if method != request.method or host != request.host:
        request = replace(request, method=method, host=host)
    return request


def override_values(request: HTTPRequest) -> list[str]:
    """Every method-override value the request carries (headers and ``_method`` parameters)."""
    values = [v for k, v in request.headers if k.lower() in OVERRIDE_HEADERS]
    if request.query:  # "&" and ";" separators (Rack before 3 split on both), encoded names
        for part in request.query.replace(";", "&").split("&"):
            for key, value in parse_qsl(part, keep_blank_values=True, errors="replace"):
                if key.strip() in OVERRIDE_PARAMS:
                    values.append(value)
    return values


def is_method(value: str) -> bool:
    """Whether ``value`` can be an HTTP method (a token of at most 32 characters)."""
    return bool(_TOKEN.match(value))


def override_method(request: HTTPRequest) -> tuple[str, str]:
    """``(method the request asks the upstream to execute, "")`` or ``("", refusal)``.

    The request line's method when there is no override; the override's (upper-cased) when all
    of them agree; a refusal when they disagree or one is not an HTTP method.
    """
    values = {v.strip().upper() for v in override_values(request)}
    if not values:
        return request.method.upper(), ""
    bad = sorted(v for v in values if not is_method(v))
    if bad or len(values) > 1:
        shown = ", ".join(repr(v[:40]) for v in sorted(values))
        return "", (f"the request carries conflicting or invalid method overrides ({shown}); "
                    "send one method, in the request line")
    return values.pop(), ""


def authority(request: HTTPRequest) -> str:
    """host, plus :port when it is not the scheme's default."""
    if request.port and _DEFAULT_PORTS.get(request.scheme.lower()) != request.port:
        return f"{request.host}:{request.port}"
    return request.host


def shorten(text: str, limit: int = SUMMARY_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def http_name(request: HTTPRequest) -> str:
    return f"http:{request.method or '?'}"


def http_summary(request: HTTPRequest) -> str:
    """``GET api.example.com/v1/x?page=2``"""
    path = request.path or "/"
    if not path.startswith("/"):
        path = "/" + path
    query = f"?{shorten(request.query, _QUERY_IN_SUMMARY)}" if request.query else ""
    return shorten(f"{request.method or '?'} {authority(request)}{path}{query}")


def base_action(request: HTTPRequest, connection_type: str, errors: list[str]) -> Action:
    """The generic action: HTTP fields, ``http:METHOD`` name and summary, no typed part."""
    return Action(
        connection_type=connection_type,  # type: ignore[arg-type]
        method=request.method,
        scheme=request.scheme,
        host=request.host,
        port=request.port,
        path=request.path,
        query=request.query,
        name=http_name(request),
        summary=http_summary(request),
        errors=tuple(errors),
    )


def classify_http(request: HTTPRequest, errors: list[str]) -> Action:
    return base_action(request, "http", errors)
