"""Structured logs: one JSON object per line on stderr.

Every line has ``time`` (RFC 3339, UTC, milliseconds), ``level``, ``logger`` and ``msg``. Lines
about a flow also carry ``flow`` (mitmproxy's flow id), ``identity``, ``connection``, ``action``,
``decision`` and ``rule`` - taken from the flow's :class:`~chaperone_sidecar.flowctx.FlowContext`
by :func:`flow_fields`, so every addon logs the same fields the same way::

    log.info("refused: no connection", extra=flow_fields(flow))

Anything else passed in ``extra`` under the key ``fields`` (a dict) is merged into the object.
Exceptions are rendered into ``error`` (type and message) and ``traceback``.

Why our own formatter and not mitmproxy's termlog: the sidecar runs in a pod whose logs are
collected and searched by machines; one JSON object per line needs no parsing rules. The level
comes from ``CHAPERONE_LOG_LEVEL`` (debug|info|warning|error). mitmproxy's own loggers are held
at WARNING unless the level is debug: at INFO they log every client connect and disconnect.

Named ``log_setup`` rather than ``logging``: a module called ``logging`` inside the package
shadows the standard library's name for every reader of an ``from .. import`` line.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
from collections.abc import Mapping
from typing import Any, TextIO

from . import flowctx

__all__ = ["JSONFormatter", "configure_logging", "flow_fields", "parse_level"]

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "warn": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL}

# LogRecord attributes that are not user-supplied extras.
_RESERVED = frozenset(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message", "asctime"}
_FLOW_KEYS = ("flow", "identity", "connection", "action", "decision", "rule")


def parse_level(value: str | None, default: int = logging.INFO) -> int:
    """``"info"`` -> ``logging.INFO``; unknown or empty -> ``default``."""
    if not value:
        return default
    return LEVELS.get(value.strip().lower(), default)


class JSONFormatter(logging.Formatter):
    """Formats a LogRecord as one JSON object (no newlines inside)."""

    def format(self, record: logging.LogRecord) -> str:
        when = _dt.datetime.fromtimestamp(record.created, _dt.UTC)
        obj: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in _FLOW_KEYS:
            value = getattr(record, key, None)
            if value not in (None, ""):
                obj[key] = value
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            for key, value in fields.items():
                obj.setdefault(str(key), value)
        for key, value in record.__dict__.items():
            if key not in _RESERVED and key not in _FLOW_KEYS and key != "fields" \
                    and not key.startswith("_"):
                obj.setdefault(key, value)
        if record.exc_info and record.exc_info[0] is not None:
            exc = record.exc_info[1]
            obj["error"] = f"{type(exc).__name__}: {exc}"
            obj["traceback"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str, ensure_ascii=False, separators=(",", ":"))


def configure_logging(level: str | int | None = "info", stream: TextIO | None = None) -> logging.Handler:
    """Route the root logger to one JSON handler on ``stream`` (stderr); idempotent.

    Returns the handler (tests attach their own stream).
    """
    numeric = level if isinstance(level, int) else parse_level(level)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_chaperone", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter())
    handler._chaperone = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(numeric)
    quiet = logging.DEBUG if numeric <= logging.DEBUG else logging.WARNING
    for name in ("mitmproxy", "hpack", "h2", "passlib", "asyncio"):
        logging.getLogger(name).setLevel(quiet)
    return handler


def flow_fields(flow: Any, **more: Any) -> dict[str, Any]:
    """``extra=`` for a log call about ``flow``: the standard flow fields from its FlowContext."""
    fields: dict[str, Any] = {"flow": getattr(flow, "id", "")}
    ctx = flowctx.get(flow) if flow is not None else None
    if ctx is not None:
        ident = ctx.identity
        who = {k: v for k, v in (("serviceAccount", ident.service_account),
                                 ("pod", f"{ident.pod_namespace}/{ident.pod_name}"
                                  if ident.pod_name else ""),
                                 ("creator", ident.creator),
                                 ("onBehalfOf", ident.on_behalf_of)) if v}
        fields["identity"] = who or None
        fields["connection"] = ctx.connection or None
        if ctx.action is not None:
            fields["action"] = ctx.action.name or ctx.action.summary
        if ctx.decision is not None:
            fields["decision"] = ctx.decision.effect
            if ctx.decision.rule is not None:
                fields["rule"] = str(ctx.decision.rule)
    if more:
        fields["fields"] = more
    return fields
