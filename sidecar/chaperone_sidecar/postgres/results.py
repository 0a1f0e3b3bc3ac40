"""Masking result rows (DataRow values) and keeping a bounded, masked sample for the recording.

Two kinds of rules, both from the statement's decision (``Decision.masks``, every target but
``request``):

* **By column name** - the existing ``mask.fields`` JSON paths, applied to each row as the JSON
  object ``{column: value}``: ``$.password``, ``$['api_key']``, ``$..token``, ``$.*`` (every
  column). **Decision**: no new ``columns`` list; one field language for JSON bodies and rows,
  and the compiler already validates it. A name is matched as the server labels the column (an
  alias is what the server labels, so the classifier also lists what each result value is
  computed from (``PostgresAction.output_refs``): when a masked column is read under another
  label - ``SELECT password AS pw``, ``upper(password)``, a subquery's or CTE's alias,
  ``RETURNING password AS p``, ``UPDATE ... SET name = password RETURNING name`` - or a whole
  row is (``row_to_json(u)``, ``(users).password``), **every column** of that result is masked:
  the labels no longer say which one carries the secret. A WHERE clause does not count (what
  a condition reveals is an oracle, not a value).
* **By detector** - the masker's detectors over each text value (``Masker.mask_str``: base64
  runs included), so a token in a free-text column is masked whatever the column is called.

A masked column's value keeps its type where a text can stand in for it (text, varchar, char,
name, json, jsonb: ``[MASKED:field]``, a JSON string for json types); any other type (an
integer, a date, bytea) is sent as NULL - a client decoding an ``int4`` must not receive
letters. The RowDescription is relayed unchanged, so psql, psycopg and node-postgres see the
columns they asked for. Detectors apply to text-format values and to binary values of the text
types (whose binary form is the text); other binary values are left as they are.

The sample kept for the recording is the first ``limit`` rows, after masking, each value cut to
256 characters; the row count is always complete.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..policy.classify.postgres import ROW_REF
from ..policy.masking.fields import apply_paths
from ..policy.masking.masker import Masker
from ..policy.model import MaskSpec
from .protocol import Column

__all__ = ["RowMasker", "TEXT_TYPES", "MASKED"]

MASKED = "[MASKED:field]"
# OIDs whose text and binary forms are the UTF-8 text: text, varchar, bpchar, name, unknown,
# char, json (jsonb's binary form is a version byte, then the text).
TEXT_TYPES = frozenset({25, 1043, 1042, 19, 705, 18, 114})
_JSON = 114
_JSONB = 3802
_VALUE_CAP = 256
SCAN_GROUP = 256  # text values per joined detector scan


class RowMasker:
    """The masks of one statement, applied row by row under the current RowDescription."""

    def __init__(self, specs: Sequence[MaskSpec] = (), output_refs: Sequence[str] = ()) -> None:
        self.masker = Masker(specs, direction="response")
        self.active = self.masker.active
        self._plan_for: list[Column] | None = None
        self._masked_columns: tuple[bool, ...] = ()
        # A masked column read under another label (an alias, an expression, a subquery, a
        # whole row): its label says nothing, so every column of the result is masked.
        self.every_column = bool(self.masker.paths) and _reads_masked(self.masker, output_refs)

    def _plan(self, columns: list[Column]) -> tuple[bool, ...]:
        if self._plan_for is columns:
            return self._masked_columns
        masked = [self.every_column] * len(columns)
        if self.masker.paths and not self.every_column:
            names = list(dict.fromkeys(c.name for c in columns))
            document: Any = dict.fromkeys(names, "")
            document, n = apply_paths(document, self.masker.paths)
            if n:  # "$" itself replaces the document: every column
                hit = {k for k, v in document.items() if v != ""} if isinstance(document, dict) else set(names)
                masked = [c.name in hit for c in columns]
        self._plan_for, self._masked_columns = columns, tuple(masked)
        return self._masked_columns

    @staticmethod
    def _placeholder(column: Column) -> bytes | None:
        if column.type_oid in (_JSON, _JSONB):
            text = f'"{MASKED}"'.encode()
            return b"\x01" + text if column.type_oid == _JSONB and column.format == 1 else text
        if column.type_oid in TEXT_TYPES:
            return MASKED.encode()
        return None

    @staticmethod
    def _detectable(value: bytes, column: Column | None) -> tuple[bytes, bytes] | None:
        """(prefix, text bytes) the detectors read, or None for a binary non-text value."""
        if column is not None and column.format == 1:
            if column.type_oid == _JSONB and value[:1] == b"\x01":
                return b"\x01", value[1:]
            if column.type_oid not in TEXT_TYPES:
                return None
        return b"", value

    def row(self, columns: list[Column] | None, values: list[bytes | None]) -> tuple[list[bytes | None], bool]:
        """One row as the agent gets it, and whether anything was masked."""
        out, changed = self.rows(columns, [values])
        return out[0], changed[0]

    def rows(self, columns: list[Column] | None,
             rows: list[list[bytes | None]]) -> tuple[list[list[bytes | None]], list[bool]]:
        """Consecutive rows (what one read from the server brought) as the agent gets them.

        The detectors scan the rows' text values in joined passes of up to
        :data:`SCAN_GROUP` values (``Masker.mask_values``: values seen clean before skipped,
        a group with a finding masked value by value), not one scan per value or per row."""
        if not self.active:
            return rows, [False] * len(rows)
        out = [list(r) for r in rows]
        changed = [False] * len(rows)
        scan: list[tuple[int, int, bytes, str]] = []  # (row, column, prefix, text)
        for r, values in enumerate(rows):
            plan = self._plan(columns) if columns and len(columns) == len(values) else ()
            for i, value in enumerate(values):
                if value is None:
                    continue
                column = columns[i] if plan and columns else None
                if plan and plan[i]:
                    assert column is not None
                    out[r][i] = self._placeholder(column)
                    changed[r] = True
                    continue
                if self.masker.rules and (part := self._detectable(value, column)) is not None:
                    scan.append((r, i, part[0], part[1].decode("utf-8", "surrogateescape")))
        for start in range(0, len(scan), SCAN_GROUP):
            group = scan[start:start + SCAN_GROUP]
            masked = self.masker.mask_values([t for _, _, _, t in group])
            for (r, i, prefix, text), new in zip(group, masked, strict=True):
                if new != text:
                    out[r][i] = prefix + new.encode("utf-8", "surrogateescape")
                    changed[r] = True
        return out, changed

    def text(self, text: str) -> str:
        """Detectors over a free text (a server error's detail, a COPY line)."""
        if not self.masker.rules:
            return text
        return self.masker.mask_str(text)[0]


def _reads_masked(masker: Masker, refs: Sequence[str]) -> bool:
    if not refs:
        return False
    if ROW_REF in refs:
        return True
    document, n = apply_paths(dict.fromkeys(refs, ""), masker.paths)
    return bool(n)


def sample_row(columns: list[Column] | None, values: list[bytes | None]) -> dict[str, Any] | list[Any]:
    """One (already masked) row for the recording: {column: value}, values cut short."""
    def show(value: bytes | None, column: Column | None) -> Any:
        if value is None:
            return None
        if column is not None and column.format == 1 and column.type_oid not in TEXT_TYPES:
            return f"<{len(value)} binary bytes>"
        text = value.decode("utf-8", "replace")
        return text if len(text) <= _VALUE_CAP else text[:_VALUE_CAP] + f"... <{len(value)} bytes>"

    if columns and len(columns) == len(values):
        return {c.name: show(v, c) for c, v in zip(columns, values, strict=True)}
    return [show(v, None) for v in values]
