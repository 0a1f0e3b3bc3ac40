"""``match.postgres`` conditions: statements, kinds, tables, functions, whereMissing.

Built by :func:`postgres_conditions` for :mod:`.matching` (which wraps them in its
``Condition``); the values come from ``Action.postgres`` (:mod:`.classify.postgres`), one
action per SQL statement. Semantics:

* ``statements`` (``SELECT``, ``DELETE``, ``DROP``, ``SELECT INTO`` ...; upper case) are tested
  on every command in the statement, nested ones included: a restricting rule (block,
  requireApproval, mask, rateLimit) matches when ANY of them matches - ``statements: [DELETE]``
  catches ``WITH d AS (DELETE ...) SELECT`` -, an ``allow`` rule only when EVERY one does.
* ``kinds`` (read, write, ddl, other) is tested on the statement's kind, the strictest of its
  commands.
* ``tables`` are globs over each relation, matched against the name as written and its last
  part (``public.users`` is matched by ``users`` and ``public.*``), ignoring case (**Decision**:
  ``"Users"`` and ``users`` are different tables to PostgreSQL, but a rule on ``users`` must
  not be dodged by quoting; the cost is that an allow rule on ``users`` also allows ``"Users"``).
  Any/every as for statements; a statement without tables never matches ``tables``.
* ``functions``: globs over called functions (lower case, last part too), ``PROGRAM`` and
  ``FILE`` for ``COPY ... PROGRAM`` / ``COPY ... 'file'``; any/every as above.
* ``whereMissing: true`` holds for an UPDATE/DELETE that touches every row (no WHERE, or one on
  no column) and TRUNCATE; ``false`` for the others.
* Fail closed: an **opaque** statement (``DO``, ``CALL``, ``EXECUTE``, unknown commands) could
  do anything, so every field of a restricting rule holds for it; an allow rule's fields hold
  only as they read (``kinds: [other]``, ``statements: [DO]``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .globs import GlobSet
from .model import PostgresAction

__all__ = ["postgres_conditions", "POSTGRES_FIELDS"]

POSTGRES_FIELDS = ("statements", "kinds", "tables", "functions", "whereMissing")

# (field, patterns as written, test, value for explanations)
PostgresCondition = tuple[str, tuple[str, ...], Callable[[Any], bool], Callable[[Any], object]]


def _pg(ctx: Any) -> PostgresAction | None:
    return ctx.action.postgres


def _names(values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """(as written, last part) of each qualified name."""
    return tuple((v, v.rsplit(".", 1)[-1]) for v in values)


def _test(values: Callable[[PostgresAction], tuple[str, ...]], globs: GlobSet, every: bool,
          qualified: bool) -> Callable[[Any], bool]:
    match = globs.match
    strict = not every

    def one(value: str) -> bool:
        if match(value):
            return True
        return qualified and "." in value and bool(match(value.rsplit(".", 1)[-1]))

    def test(ctx: Any) -> bool:
        pg = _pg(ctx)
        if pg is None:
            return False
        if strict and pg.opaque:
            return True
        found = values(pg)
        if not found:
            return False
        return all(map(one, found)) if every else any(map(one, found))
    return test


def postgres_conditions(section: dict, effect: str) -> list[PostgresCondition]:
    """The conditions of one rule's ``match.postgres`` (empty when it has none)."""
    every = effect == "allow"
    out: list[PostgresCondition] = []
    if section.get("statements"):
        globs = GlobSet([s.upper() for s in section["statements"]])
        out.append(("match.postgres.statements", globs.patterns,
                    _test(lambda p: p.statements, globs, every, False),
                    lambda c: p.statements if (p := _pg(c)) else None))
    if section.get("kinds"):
        globs = GlobSet(section["kinds"])
        out.append(("match.postgres.kinds", globs.patterns,
                    _test(lambda p: (p.kind,), globs, every, False),
                    lambda c: p.kind if (p := _pg(c)) else None))
    if section.get("tables"):
        globs = GlobSet(section["tables"], ignore_case=True)
        out.append(("match.postgres.tables", globs.patterns,
                    _test(lambda p: p.tables, globs, every, True),
                    lambda c: p.tables if (p := _pg(c)) else None))
    if section.get("functions"):
        globs = GlobSet(section["functions"], ignore_case=True)
        out.append(("match.postgres.functions", globs.patterns,
                    _test(lambda p: p.functions, globs, every, True),
                    lambda c: p.functions if (p := _pg(c)) else None))
    if section.get("whereMissing") is not None:
        wanted = bool(section["whereMissing"])

        def where(ctx: Any) -> bool:
            pg = _pg(ctx)
            if pg is None:
                return False
            return pg.where_missing == wanted or (not every and pg.opaque)
        out.append(("match.postgres.whereMissing", (str(wanted).lower(),), where,
                    lambda c: p.where_missing if (p := _pg(c)) else None))
    return out
