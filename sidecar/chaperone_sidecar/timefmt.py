"""RFC 3339 timestamps as the Kubernetes API stores them: one parser, one formatter.

Why one module: an ApprovalRequest's ``requestedAt``, ``expiresAt``, ``decidedAt`` and review
times are written by the sidecar, the standalone approval store and the operator, and read by
all of them and by the kubectl plugin; they must agree on what a timestamp is. Four hand-written
copies of the parser existed before, one of them accepting a lowercase ``z`` and the others not.

Parsing is the standard library's :meth:`datetime.datetime.fromisoformat` (Python 3.11 reads
RFC 3339, including ``Z``); RFC 3339 letters are case-insensitive, so a lowercase ``z`` is read
as UTC too. An absent, non-string or unreadable value is ``None``, never an exception: callers
treat it as "no such time" (an object without ``expiresAt`` never expires by the clock). A time
without an offset is taken as UTC.

Formatting is UTC to the second with ``Z`` (``2030-01-02T03:04:05Z``), the form the apiserver
writes for ``metav1.Time``. Session recordings use their own finer format
(:func:`chaperone_sidecar.recording.events.format_time`, microseconds: events need ordering
within a second).
"""

from __future__ import annotations

import datetime as dt

__all__ = ["epoch_to_rfc3339", "format_rfc3339", "parse_rfc3339", "rfc3339_to_epoch"]


def parse_rfc3339(value: object) -> dt.datetime | None:
    """``"2030-01-02T03:04:05Z"`` -> an aware datetime; None when absent or unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def format_rfc3339(when: dt.datetime) -> str:
    """An aware datetime as the apiserver writes it: UTC, to the second, ``Z``."""
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339_to_epoch(value: object) -> float | None:
    """:func:`parse_rfc3339` as epoch seconds (the sidecar's approval code counts in seconds)."""
    parsed = parse_rfc3339(value)
    return None if parsed is None else parsed.timestamp()


def epoch_to_rfc3339(epoch: float) -> str:
    """Epoch seconds as :func:`format_rfc3339` writes them."""
    return format_rfc3339(dt.datetime.fromtimestamp(epoch, dt.UTC))
