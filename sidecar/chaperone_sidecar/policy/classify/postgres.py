"""Classify SQL sent through a postgres connection: one ``Action`` per statement.

The parser is PostgreSQL's own (libpg_query, through ``pglast``), so what is classified is what
the server will parse: comments, case, quoting (``"Users"`` is the table ``Users``, ``USERS`` is
``users``), dollar quoting and multi-statement strings are the grammar's business, not ours.

Per statement (:class:`~chaperone_sidecar.policy.model.PostgresAction`):

* ``statement`` - the top-level command (``SELECT``, ``DELETE``, ``DROP``, ``DO``, ``BEGIN``);
  ``statements`` - every command inside it too, so ``WITH d AS (DELETE FROM t RETURNING *)
  SELECT * FROM d`` is ``SELECT`` with ``statements`` ``(SELECT, DELETE)``, and ``EXPLAIN
  ANALYZE DELETE ...`` (which runs the DELETE) carries ``DELETE``.
* ``kind`` - the strictest kind of every command in it: ``read`` < ``write`` < ``ddl`` <
  ``other``. Commands this module does not know are ``other`` and opaque.
* ``tables`` - every relation named (``RangeVar``), schema-qualified as written; a bare name that
  only refers to a CTE of the statement is left out (a DML target never is: ``WITH users AS
  (...) DELETE FROM users`` deletes from the real table).
* ``functions`` - every function called, lower case, qualified as written
  (``pg_catalog.pg_read_file``); ``COPY ... PROGRAM`` adds ``PROGRAM`` and a server-side
  ``COPY ... 'file'`` adds ``FILE``.
* ``where_missing`` - an ``UPDATE``/``DELETE`` anywhere in it with no ``WHERE``, or with a
  ``WHERE`` that references no column (``WHERE true``, ``WHERE 1=1``, ``WHERE $1``): it touches
  every row. ``TRUNCATE`` is ``where_missing`` too. **Decision**: a constant condition counts
  as missing - it is how one would dodge the rule.
* ``opaque`` - what runs cannot be read from the text: ``DO`` blocks, ``CALL``, ``EXECUTE`` of a
  SQL-level ``PREPARE``, ``LOAD``, unknown commands. Block and requireApproval rules on
  postgres fields match an opaque statement whatever they name (policy/matching.py), allow
  rules never do unless they name ``other``.

Unparseable SQL is not classified at all: :func:`parse_statements` raises
:class:`SQLParseError` with the parser's message and the sidecar refuses the query (fail
closed; the server never sees what the policy could not judge).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pglast import ast, parse_sql
from pglast.parser import ParseError

from ..model import Action, PostgresAction
from .http import shorten
from .postgres_names import KINDS, NODES, OPAQUE, PREFIX, TRANSACTION, Kind

__all__ = ["SQLParseError", "Statement", "parse_statements", "classify_sql", "statement_action",
           "ROW_REF"]

_RANK = {k: i for i, k in enumerate(KINDS)}
MAX_TEXT = 4096  # characters of a statement kept on the action (recordings keep their own bound)
_DML = ("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt")
_CAMEL = re.compile(r"[A-Z][a-z]*")


class SQLParseError(ValueError):
    """The SQL does not parse; ``str()`` is the parser's message with the position."""


@dataclass(frozen=True)
class Statement:
    """One parsed statement of a query string: its text and its classification."""

    text: str
    action: PostgresAction


def _command(node: Any) -> tuple[str, Kind, bool]:
    """(command, kind, opaque) of one statement node."""
    cls = type(node).__name__
    known = NODES.get(cls)
    if cls == "TransactionStmt":
        kind = getattr(node.kind, "name", str(node.kind))
        return TRANSACTION.get(kind, "BEGIN"), "other", False
    if cls == "VariableSetStmt" and getattr(node.kind, "name", "").startswith("VAR_RESET"):
        return "RESET", "other", False
    if cls in ("GrantStmt", "GrantRoleStmt") and not node.is_grant:
        return "REVOKE", "ddl", False
    if cls == "VacuumStmt" and not node.is_vacuumcmd:
        return "ANALYZE", "other", False
    if cls == "SelectStmt" and node.intoClause is not None:
        return "SELECT INTO", "ddl", False  # creates a table
    if cls == "CopyStmt":
        if node.is_program or node.filename is not None:
            return "COPY", "other", False  # runs a program / touches a file on the server
        return "COPY", "write" if node.is_from else "read", False
    if known is not None:
        return known[0], known[1], cls in OPAQUE
    words = _CAMEL.findall(cls.removesuffix("Stmt"))
    first = words[0] if words else cls
    if first in PREFIX:
        return first.upper(), PREFIX[first], False
    return first.upper(), "other", True  # unknown: the strictest


def _name(*parts: Any) -> str:
    return ".".join(str(p) for p in parts if p)


def _func_name(node: ast.FuncCall) -> str:
    return ".".join(getattr(p, "sval", "") or "" for p in (node.funcname or ())).lower()


def _references_columns(node: Any) -> bool:
    """Whether a WHERE clause looks at the row (a column, or WHERE CURRENT OF a cursor)."""
    return any(isinstance(n, (ast.ColumnRef, ast.CurrentOfExpr)) for n in _nodes(node))


def _nodes(root: Any) -> list[Any]:
    """Every AST node under ``root`` (itself included), parents before children.

    A plain walk over the nodes' slots: pglast's ``Visitor`` inspects each node's members on
    every call, which made a 25 KB SELECT cost half a second."""
    out: list[Any] = []
    stack: list[Any] = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, (list, tuple)):
            stack.extend(reversed(node))
        elif isinstance(node, ast.Node):
            out.append(node)
            slots = getattr(type(node), "__slots__", ())
            children = [v for v in (getattr(node, name, None) for name in slots)
                        if isinstance(v, (ast.Node, list, tuple))]
            stack.extend(reversed(children))
    return out


def _statement(stmt: Any, text: str, database: str) -> PostgresAction:
    top, kind, opaque = _command(stmt)
    commands: list[str] = [top]
    tables: list[str] = []
    functions: list[str] = []
    where_missing = False
    nodes = _nodes(stmt)
    ctes = {n.ctename for n in nodes if isinstance(n, ast.CommonTableExpr) and n.ctename}
    targets = {id(n.relation) for n in nodes if type(n).__name__ in _DML and n.relation is not None}
    for node in nodes:
        cls = type(node).__name__
        if cls.endswith("Stmt") and node is not stmt and cls != "RawStmt":
            command, k, o = _command(node)
            commands.append(command)
            opaque = opaque or o
            if _RANK[k] > _RANK[kind]:
                kind = k
        if isinstance(node, ast.RangeVar):
            if node.schemaname is None and node.relname in ctes and id(node) not in targets:
                continue
            tables.append(_name(node.catalogname, node.schemaname, node.relname))
        elif isinstance(node, ast.FuncCall):
            functions.append(_func_name(node))
        elif isinstance(node, (ast.DeleteStmt, ast.UpdateStmt)):
            if node.whereClause is None or not _references_columns(node.whereClause):
                where_missing = True
        elif isinstance(node, ast.TruncateStmt):
            where_missing = True
        elif isinstance(node, ast.DropStmt):
            for obj in node.objects or ():  # DROP TABLE a, s.b: name lists, not RangeVars
                if isinstance(obj, (list, tuple)) and all(isinstance(p, ast.String) for p in obj):
                    tables.append(_name(*(p.sval for p in obj)))
        elif isinstance(node, ast.CopyStmt):
            if node.is_program:
                functions.append("PROGRAM")
            elif node.filename is not None:
                functions.append("FILE")
    return PostgresAction(
        output_refs=_output_refs(stmt, nodes),
        statement=top, kind=kind, statements=tuple(dict.fromkeys(commands)),
        tables=tuple(dict.fromkeys(tables)), functions=tuple(dict.fromkeys(functions)),
        where_missing=where_missing, opaque=opaque, database=database, text=text[:MAX_TEXT])


ROW_REF = "(row)"


def _output_refs(stmt: Any, nodes: list[Any]) -> tuple[str, ...]:
    """Columns result values are computed from, except plain top-level columns (whose label is
    their name); ``(row)`` for whole-row references. See ``PostgresAction.output_refs``."""
    top = list(getattr(stmt, "targetList", None) or ()) if isinstance(stmt, ast.SelectStmt) else []
    returning = getattr(stmt, "returningClause", None)
    if returning is not None:
        top += list(returning.exprs or ())
    plain = {id(t) for t in top if isinstance(t.val, ast.ColumnRef) and not t.name}  # label = name
    relations = {n.relname for n in nodes if isinstance(n, ast.RangeVar) and n.relname}
    relations |= {n.alias.aliasname for n in nodes if getattr(n, "alias", None) is not None
                  and isinstance(n.alias, ast.Alias) and n.alias.aliasname}
    relations |= {n.ctename for n in nodes if isinstance(n, ast.CommonTableExpr) and n.ctename}
    refs: list[str] = []
    for target in nodes:
        if not isinstance(target, ast.ResTarget) or target.val is None or id(target) in plain:
            continue
        for ref in _nodes(target.val):
            if not isinstance(ref, ast.ColumnRef):
                continue
            names = [f.sval for f in ref.fields or () if isinstance(f, ast.String) and f.sval]
            if any(isinstance(f, ast.A_Star) for f in ref.fields or ()) or (
                    len(names) == 1 and names[0] in relations):
                refs.append(ROW_REF)
            elif names:
                refs.append(names[-1])
    return tuple(dict.fromkeys(refs))


def _slice(sql: str, location: int, length: int) -> str:
    """A statement's text from the parser's offsets (pglast gives them in characters)."""
    end = location + length if length else len(sql)
    return sql[location:end].strip()


def parse_statements(sql: str, database: str = "") -> list[Statement]:
    """Every statement of ``sql``, classified. Raises :class:`SQLParseError` when it does not
    parse; an empty list for an empty query (``""``, ``";"``, only comments).

    Pure, so the results of short texts are cached (agents repeat their statements; a parse
    and walk costs ~100-200 µs, a hit ~1 µs); errors are not cached."""
    if len(sql) <= _CACHED_TEXT:
        return list(_parse_cached(sql, database))
    return _parse(sql, database)


_CACHED_TEXT = 8192


@lru_cache(maxsize=2048)
def _parse_cached(sql: str, database: str) -> tuple[Statement, ...]:
    return tuple(_parse(sql, database))


def _parse(sql: str, database: str) -> list[Statement]:
    try:
        raws = parse_sql(sql)
    except ParseError as exc:
        position = exc.args[1] if len(exc.args) > 1 else None
        where = f" (at character {position + 1})" if isinstance(position, int) else ""
        raise SQLParseError(f"{exc.args[0] if exc.args else exc}{where}") from None
    except Exception as exc:  # noqa: BLE001 - anything the parser chokes on is unparseable
        raise SQLParseError(f"{type(exc).__name__}: {exc}") from None
    out = []
    for raw in raws:
        text = _slice(sql, raw.stmt_location or 0, raw.stmt_len or 0)
        out.append(Statement(text, _statement(raw.stmt, text, database)))
    return out


def statement_action(pg: PostgresAction, *, host: str, port: int, database: str) -> Action:
    """The policy ``Action`` of one classified statement on a postgres connection.

    The generic fields say where it goes: ``host``/``port`` of the server and ``path``
    ``/<database>`` (an ``action``-scope grant is then bound to the command, the server and the
    database, docs/postgres.md); ``method`` is ``SQL``.
    """
    name = f"postgres:{pg.statement.replace(' ', '_')}"
    parts = [pg.statement]
    if pg.tables:
        parts.append(", ".join(pg.tables[:8]))
    if pg.where_missing:
        parts.append("(every row: no WHERE)")
    if len(pg.statements) > 1:
        parts.append("[" + " ".join(pg.statements[1:]) + "]")
    host = host.lower()
    summary = shorten(f"{' '.join(parts)} on {database}@{host}:{port}: {pg.text}")
    return Action(connection_type="postgres", method="SQL", scheme="postgres", host=host,
                  port=port, path=f"/{database}", name=name, summary=summary, postgres=pg)


def classify_sql(sql: str, *, host: str, port: int, database: str) -> list[Action]:
    """:func:`parse_statements` then :func:`statement_action` for each statement."""
    return [statement_action(s.action, host=host, port=port, database=database)
            for s in parse_statements(sql, database)]
