"""One agent connection: startup without a password, then a judged relay in both directions.

Startup. The agent's SSLRequest is answered ``S`` (TLS with a certificate from the sidecar's CA,
:mod:`.tls`) when the connection sets ``spec.postgres.clientTLS``, else ``N``; GSSENCRequest is
always ``N``. The StartupMessage's user and database are not used: the session is the
connection's (``spec.postgres.user``/``database``), logged in by :mod:`.upstream`. The agent
is answered AuthenticationOk (it has nothing to prove on its own loopback: it is the pod), the
server's ParameterStatus values, a BackendKeyData of the sidecar's own (a CancelRequest with it
is forwarded with the server's real key, :mod:`.server`) and ReadyForQuery.

Relay. Two tasks: agent -> server judges, server -> agent masks and records.

* ``Query``: every statement is parsed and judged (:mod:`.decide`) before anything is sent.
* Extended protocol: ``Parse`` is classified and forwarded (parse analysis runs nothing); the
  classification is kept per statement name and **judged at ``Bind``**, with the parameters:
  the server plans the portal there, and planning folds immutable functions - runs them -
  before any ``Execute`` (an ``IMMUTABLE`` wrapper around ``nextval`` or ``dblink_exec`` would
  act even if only the Execute were refused). A refused Bind is sent naming a statement that
  cannot exist, so the server fails it unplanned. ``Execute`` runs what its portal's Bind was
  judged to be; a portal the sidecar never saw bound (a cursor declared in SQL) is judged at
  Execute, as opaque. **Decision**: names are tracked as a union, not overwritten: a second
  ``Parse`` of an existing named statement (which the server refuses, keeping the first) or a
  ``Bind`` of an existing named portal adds its classification to what the name may mean,
  until ``Close``; so an agent cannot make the sidecar believe a name means a harmless query
  while the server still holds a harmful one. The unnamed statement and portal are replaced,
  as the server does - and a Bind the server never completed (BindComplete did not come back
  before the ReadyForQuery) is undone, because the server kept the portal it had. A statement
  the sidecar never saw a Parse for (made by SQL ``PREPARE``) is opaque: the strictest.
* ``FunctionCall`` (the fast-path protocol) is refused: it calls a function by OID, out of any
  policy's reach.

Refusing keeps the server's own semantics: instead of the refused ``Query``/``Bind`` the
sidecar sends the server something that fails at once and changes nothing (``EXECUTE`` of a
prepared statement / a ``Bind`` of a statement with a random name that cannot exist), and when
the server's error for it comes back, puts its own ErrorResponse (SQLSTATE 42501, the rule,
the ApprovalRequest) in its place. The server then does what it does after any error: skips the
rest of the extended batch up to ``Sync``, fails an open transaction (ReadyForQuery ``E``: the
agent's ``ROLLBACK`` recovers, its ``COMMIT`` rolls back, as with any failed statement) and
otherwise stays idle (``I``) - so the connection stays usable and its transaction state is the
server's, never a guess.

Server -> agent: DataRow values are masked per :mod:`.results` with the masks of the unit the
rows belong to; NoticeResponse and ErrorResponse texts go through the detectors; a unit's
result (row count, tags, a masked sample) is recorded when it completes.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..flowctx import RecordingSettings
from ..policy.classify.postgres import SQLParseError, Statement, parse_statements
from ..policy.model import Identity
from ..recording.spool import SpoolUnavailable
from ..services import SidecarServices
from .decide import Verdict, decide, opaque_statement
from .protocol import (
    CANCEL_REQUEST,
    GSSENC_REQUEST,
    PROTOCOL_3,
    SSL_REQUEST,
    Column,
    Message,
    MessageReader,
    ProtocolViolation,
    cstring,
    data_row,
    error_response,
    message,
    parameter_status,
    parse_bind,
    parse_close,
    parse_data_row,
    parse_execute,
    parse_fields,
    parse_parse,
    parse_query,
    parse_row_description,
    read_message,
    read_startup,
    ready_for_query,
)
from .record import link_statements, request_events, response_event
from .results import RowMasker, sample_row
from .upstream import CancelRegistry, Upstream, UpstreamError, UpstreamSettings, connect

__all__ = ["Session", "SessionSettings", "Prepared"]

log = logging.getLogger("chaperone.postgres")

RECORDING_UNAVAILABLE = "58000"
INLINE_PARSE_CHARS = 16384  # longer SQL is parsed in a thread, off the event loop
MAX_AGENT_MESSAGE = 64 << 20  # the agent's messages: a bigger one is a protocol violation
FEATURE_NOT_SUPPORTED = "0A000"


@dataclass(frozen=True)
class SessionSettings:
    """Everything one session needs from its connection, read when the agent connects."""

    connection: str
    upstream: UpstreamSettings
    recording: RecordingSettings
    sample_rows: int = 10
    client_tls: Any = None  # ssl.SSLContext when the agent may ask for TLS


@dataclass
class Prepared:
    """What a statement name may mean: its SQL and classification (None: unparseable)."""

    sql: str
    statements: list[Statement] | None
    error: str | None = None
    param_oids: tuple[int, ...] = ()  # from Parse: how binary parameters are read


@dataclass
class Portal:
    """A Bind as the sidecar judged it: what the portal may run, its verdict (the unit made at
    Bind), and the entry it replaced, restored when the server did not create this one."""

    prepared: list[Prepared]
    params: list[str | None]
    unit: Unit
    previous: Portal | None = None
    confirmed: bool = False  # BindComplete seen: the server holds exactly this portal


@dataclass
class Unit:
    """One Query or Execute on its way through: judged, then its result collected."""

    flow: str
    extended: bool
    verdict: Verdict
    masker: RowMasker
    nonce: str = ""  # the impossible name sent instead, when refused
    started: float = field(default_factory=time.perf_counter)
    rows: int = 0
    masked: int = 0
    tags: list[str] = field(default_factory=list)
    sample: list[Any] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    error: dict[str, str] | None = None
    done: bool = False


class Session:
    def __init__(self, services: SidecarServices, settings: SessionSettings, identity: Identity,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 cancels: CancelRegistry | None = None, session_id: str = "") -> None:
        self.services = services
        self.settings = settings
        self.identity = identity
        self.client_reader, self.client_writer = reader, writer
        self.cancels = cancels
        self.id = session_id or secrets.token_hex(4)
        self.upstream: Upstream | None = None
        self.statements: dict[str, list[Prepared]] = {}
        self.portals: dict[str, Portal] = {}
        self.pending_binds: deque[tuple[str, Portal]] = deque()  # Binds awaiting BindComplete
        self.units: deque[Unit] = deque()
        self.columns: list[Column] | None = None  # the last RowDescription
        self.last_masker: RowMasker = RowMasker()
        self.count = 0
        self.status = b"I"
        self._cancel_key = b""
        self._pending_records: set[asyncio.Task] = set()
        self.server_params: dict[str, str] = {}  # ParameterStatus as the server last reported
        self.outstanding = 0  # Query/Sync/FunctionCall sent, ReadyForQuery not yet back
        self.batch_units = 0  # Executes sent since the last Sync

    # ------------------------------------------------------------------ startup
    async def run(self) -> None:
        try:
            params = await self._startup()
            if params is None:
                return
            try:
                self.upstream = await connect(self.settings.upstream, params)
            except UpstreamError as exc:
                log.warning("postgres %s: upstream login failed: %s", self.settings.connection, exc)
                await self._send(error_response(exc.fields))
                return
            self.server_params = dict(self.upstream.parameters)
            await self._greet()
            await self._relay()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except ProtocolViolation as exc:
            await self._send(error_response({"S": "FATAL", "V": "FATAL", "C": "08P01", "M": str(exc)}))
        except Exception:  # noqa: BLE001 - one broken session must not take the listener down
            log.exception("postgres %s: session failed", self.settings.connection)
        finally:
            if self._pending_records:  # results still on their way to the spool
                await asyncio.gather(*self._pending_records, return_exceptions=True)
            if self.cancels is not None and self._cancel_key:
                self.cancels.forget(self._cancel_key)
            if self.upstream is not None:
                self.upstream.close()
            try:
                self.client_writer.close()
            except Exception:  # noqa: BLE001
                pass

    async def _send(self, data: bytes) -> None:
        self.client_writer.write(data)
        await self.client_writer.drain()

    async def _startup(self) -> dict[str, str] | None:
        for _ in range(3):  # SSLRequest, then GSSENCRequest (or the reverse), then the startup
            startup = await read_startup(self.client_reader)
            if startup.code == SSL_REQUEST:
                if self.settings.client_tls is None:
                    await self._send(b"N")
                    continue
                await self._send(b"S")
                await self.client_writer.start_tls(self.settings.client_tls)
                continue
            if startup.code == GSSENC_REQUEST:
                await self._send(b"N")
                continue
            if startup.code == CANCEL_REQUEST:
                if self.cancels is not None:
                    await self.cancels.cancel(startup.payload[4:12])
                return None
            if startup.code != PROTOCOL_3:
                await self._send(error_response({
                    "S": "FATAL", "V": "FATAL", "C": FEATURE_NOT_SUPPORTED,
                    "M": f"unsupported frontend protocol {startup.code >> 16}.{startup.code & 0xFFFF}"}))
                return None
            if "replication" in startup.params and startup.params["replication"] not in ("false", "0", "off", "no"):
                await self._send(error_response({
                    "S": "FATAL", "V": "FATAL", "C": "42501",
                    "M": "chaperone refuses replication connections: they bypass statement policies"}))
                return None
            return dict(startup.params)
        raise ProtocolViolation("too many negotiation requests")

    async def _greet(self) -> None:
        up = self.upstream
        assert up is not None
        out = [message(b"R", (0).to_bytes(4, "big"))]
        out += [parameter_status(k, v) for k, v in up.parameters.items()]
        key = secrets.token_bytes(8)
        if self.cancels is not None and up.backend_key:
            self.cancels.register(key, up.backend_key, self.settings.upstream)
            self._cancel_key = key
        out.append(message(b"K", key))
        out.append(ready_for_query(up.status))
        self.status = up.status
        self.client_writer.write(b"".join(out))
        await self.client_writer.drain()
        log.info("postgres %s: session %s open (upstream %s, tls %s)", self.settings.connection,
                 self.id, up.auth, up.tls)

    # ------------------------------------------------------------------ relay
    async def _relay(self) -> None:
        up = self.upstream
        assert up is not None
        back = asyncio.create_task(self._server_to_agent(), name=f"pg-{self.id}-server")
        forth = asyncio.create_task(self._agent_to_server(), name=f"pg-{self.id}-agent")
        try:
            done, _ = await asyncio.wait({back, forth}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if exc is not None and not isinstance(exc, (asyncio.IncompleteReadError, ConnectionError)):
                    raise exc
        finally:
            for task in (back, forth):
                task.cancel()
            await asyncio.gather(back, forth, return_exceptions=True)

    async def _forward(self, data: bytes) -> None:
        up = self.upstream
        assert up is not None
        up.writer.write(data)
        await up.writer.drain()

    async def _agent_to_server(self) -> None:
        while True:
            msg = await read_message(self.client_reader, MAX_AGENT_MESSAGE)
            kind = msg.type
            if kind == b"Q":
                await self._query(msg)
            elif kind == b"P":
                name, sql, oids = parse_parse(msg.payload)
                await self._remember_statement(name, sql, oids)
                await self._forward(msg.raw)
            elif kind == b"B":
                await self._bind(msg)
            elif kind == b"E":
                await self._execute(msg)
            elif kind == b"C":
                what, name = parse_close(msg.payload)
                (self.statements if what == "S" else self.portals).pop(name, None)
                await self._forward(msg.raw)
            elif kind == b"F":
                await self._function_call()
            elif kind == b"X":
                await self._forward(msg.raw)
                return
            elif kind == b"S":  # Sync: the batch ends, a ReadyForQuery will answer it
                self.outstanding += 1
                self.batch_units = 0
                await self._forward(msg.raw)
            elif kind in (b"D", b"H", b"d", b"c", b"f"):
                await self._forward(msg.raw)
            else:
                raise ProtocolViolation(f"unexpected message type {kind!r} from the client")

    async def _classify(self, sql: str) -> Prepared:
        """Parse and classify; a long text in a thread (libpg_query and the tree walk are CPU
        work: ~1 ms per 10 KB), a short one inline (cached, microseconds)."""
        database = self.settings.upstream.database
        try:
            sql.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes kept as surrogates by the codec
            return Prepared(sql, None, "the SQL is not valid UTF-8, the only encoding chaperone reads")
        try:
            if len(sql) > INLINE_PARSE_CHARS:
                return Prepared(sql, await asyncio.to_thread(parse_statements, sql, database))
            return Prepared(sql, parse_statements(sql, database))
        except SQLParseError as exc:
            return Prepared(sql, None, str(exc))

    async def _remember_statement(self, name: str, sql: str, oids: tuple[int, ...] = ()) -> None:
        prepared = await self._classify(sql)
        prepared.param_oids = oids
        if name == "":
            self.statements[""] = [prepared]
        else:  # the union (see the module docstring)
            self.statements.setdefault(name, []).append(prepared)

    async def _bind(self, msg: Message) -> None:
        """Judge at Bind: the statement and its parameters are known, and the server plans the
        portal here - constant folding runs immutable functions at Bind, before any Execute -
        so nothing of a refused statement may reach the server's planner."""
        portal, statement, formats, values = parse_bind(msg.payload)
        meaning = self.statements.get(statement)
        if meaning is None:  # made by SQL PREPARE, or never parsed: opaque
            meaning = [Prepared(f"EXECUTE {statement}",
                                [opaque_statement(f"<prepared statement {statement!r}>",
                                                  self.settings.upstream.database)])]
        oids = meaning[-1].param_oids
        params = [None if v is None else
                  (v.decode("utf-8", "replace") if not _binary(formats, i)
                   else binary_parameter(v, oids[i] if i < len(oids) else 0))
                  for i, v in enumerate(values)]
        old = self.portals.get(portal)
        if portal != "" and old is not None:  # the union (see the module docstring)
            meaning = old.prepared + list(meaning)
        sql = ";\n".join(dict.fromkeys(p.sql for p in meaning))
        unit, allowed = await self._judge(sql, list(meaning), params, extended=True)
        entry = Portal(list(meaning), params, unit, previous=old)
        self.portals[portal] = entry
        self.pending_binds.append((portal, entry))
        if allowed:
            await self._forward(msg.raw)
            return
        self.units.append(unit)  # its error (the nonce) comes back in place of BindComplete
        # The same Bind naming a statement that cannot exist: the server fails it unplanned.
        first = msg.payload.index(b"\0")
        second = msg.payload.index(b"\0", first + 1)
        await self._forward(message(b"B", msg.payload[:first + 1] + cstring(unit.nonce)
                                    + msg.payload[second + 1:]))

    async def _judge(self, sql: str, prepared: list[Prepared], params: list[str | None],
                     extended: bool) -> tuple[Unit, bool]:
        """Decide, record the request and decision; (the unit, whether it may run)."""
        statements: list[Statement] | None = []
        error = None
        for p in prepared:
            if p.statements is None:
                statements, error = None, p.error
                break
            assert statements is not None
            statements.extend(p.statements)
        hazard = self._lexing_hazard(sql)
        if hazard is not None:
            statements, error = None, hazard
        up = self.settings.upstream
        verdict = await decide(self.services, connection=self.settings.connection,
                               identity=self.identity, host=up.host, port=up.port,
                               database=up.database, sql=sql, statements=statements,
                               params=params, parse_error=error)
        self.count += 1
        refs = [r for a in verdict.actions if a.postgres is not None for r in a.postgres.output_refs]
        unit = Unit(f"pg-{self.id}-{self.count}", extended, verdict, RowMasker(verdict.masks, refs))
        recorded = await self._record(request_events(
            unit.flow, identity=self.identity, connection=self.settings.connection,
            url=f"postgres://{up.host}:{up.port}/{up.database}", sql=sql, params=params,
            verdict=verdict, settings=self.settings.recording, extended=extended,
            caused_by=link_statements(self.services.tool_uses, self.identity, verdict.actions)))
        if not recorded and verdict.allowed:
            verdict.allowed = False
            verdict.refusal = {"S": "ERROR", "V": "ERROR", "C": RECORDING_UNAVAILABLE,
                               "M": "chaperone refused this statement: the session recording "
                                    "cannot be written and this connection records strictly",
                               "H": "Retry later; nothing was run."}
        if not verdict.allowed:
            unit.nonce = "chaperone_refused_" + secrets.token_hex(12)
            log.info("postgres %s: refused %s: %s", self.settings.connection, unit.flow,
                     (verdict.refusal or {}).get("M", ""))
        return unit, verdict.allowed

    def _lexing_hazard(self, sql: str) -> str | None:
        """Why the server might read ``sql`` differently from the parser, or None.

        The parser lexes as a fresh session does: ``standard_conforming_strings`` on, UTF-8.
        With it off, ``'a\\', '; DELETE FROM t; --'`` is one SELECT to the parser and a SELECT
        then a DELETE to the server; in GBK or BIG5 a multi-byte character can swallow the
        backslash of an ``E''`` string the same way. The server reports both settings
        (ParameterStatus), so: any other client_encoding refuses everything, and a statement
        with a backslash is refused while standard_conforming_strings is not on - or while an
        earlier unit is still in flight (a pipelined SET or set_config() could have changed
        either before the server reads this one). "In flight" is counted in ReadyForQuery
        turns, not results: the server reports changed settings only just before its
        ReadyForQuery, so a statement is judged on current settings only when every Query and
        Sync sent before it has been answered and no Execute precedes it in its batch.
        """
        encoding = self.server_params.get("client_encoding", "UTF8").upper().replace("-", "")
        if encoding not in ("UTF8", "UNICODE"):
            return (f"client_encoding is {encoding}: chaperone reads SQL as UTF-8 only; "
                    "SET client_encoding TO 'UTF8'")
        if "\\" not in sql:
            return None
        if self.server_params.get("standard_conforming_strings", "on") != "on":
            return ("standard_conforming_strings is off, so the server would read the backslashes "
                    "in this SQL differently from chaperone's parser; set it on or avoid backslashes")
        if self.outstanding or self.batch_units:
            return ("a statement with backslashes cannot be judged while earlier statements of "
                    "this connection are still running (pipelined): wait for their results")
        return None

    async def _record(self, events: list[dict[str, Any]]) -> bool:
        """Append events; False when strict recording could not write them."""
        recorder = self.services.recorder
        settings = self.settings.recording
        if recorder is None or not settings.enabled:
            return True
        results = await recorder.append_many(events)
        if self.services.ocsf is not None:  # OCSF export, as Record does: sealed, else as built
            self.services.ocsf.submit([r if isinstance(r, dict) else e
                                       for r, e in zip(results, events, strict=True)])
        lost = sum(1 for r in results if not isinstance(r, dict))
        if lost:
            for r in results:
                if isinstance(r, BaseException) and not isinstance(r, (SpoolUnavailable, RuntimeError)):
                    log.error("recording a postgres event failed: %r", r)
        strict = (settings.mode or recorder.config.mode) == "strict"
        return not (lost and strict)

    async def _query(self, msg: Message) -> None:
        sql = parse_query(msg.payload)
        prepared = await self._classify(sql)
        self.statements.pop("", None)  # a simple Query destroys the unnamed statement
        if prepared.statements == []:  # empty query: the server answers EmptyQueryResponse
            self.outstanding += 1
            await self._forward(msg.raw)
            return
        unit, allowed = await self._judge(sql, [prepared], [], extended=False)
        self.units.append(unit)
        self.outstanding += 1
        if allowed:
            await self._forward(msg.raw)
        else:
            await self._forward(message(b"Q", cstring(f"EXECUTE {unit.nonce}")))

    async def _execute(self, msg: Message) -> None:
        """Run what the portal's Bind judged; a portal the sidecar never saw bound (a cursor
        declared in SQL) is judged here, as opaque."""
        portal, _ = parse_execute(msg.payload)
        bound = self.portals.get(portal)
        if bound is None:
            prepared = [Prepared(f"EXECUTE portal {portal}",
                                 [opaque_statement(f"<portal {portal!r}>", self.settings.upstream.database)])]
            unit, allowed = await self._judge(prepared[0].sql, prepared, [], extended=True)
        else:
            unit, allowed = bound.unit, bound.unit.verdict.allowed
            if unit.done or unit in self.units:  # executed before (a row limit): a new result
                unit = Unit(unit.flow, True, unit.verdict, unit.masker, unit.nonce)
        self.units.append(unit)
        self.batch_units += 1
        if allowed:
            await self._forward(msg.raw)
        else:
            if not unit.nonce:
                unit.nonce = "chaperone_refused_" + secrets.token_hex(12)
            await self._forward(message(b"E", cstring(unit.nonce) + (0).to_bytes(4, "big")))

    async def _function_call(self) -> None:
        verdict = Verdict(False, effect="block", refusal={
            "S": "ERROR", "V": "ERROR", "C": FEATURE_NOT_SUPPORTED,
            "M": "chaperone refuses the fast-path function call protocol: it calls functions "
                 "by OID, out of any policy's reach",
            "H": "Call the function in a SELECT."})
        self.count += 1
        unit = Unit(f"pg-{self.id}-{self.count}", False, verdict, RowMasker(),
                    nonce="chaperone_refused_" + secrets.token_hex(12))
        self.units.append(unit)
        self.outstanding += 1
        await self._forward(message(b"Q", cstring(f"EXECUTE {unit.nonce}")))

    # ------------------------------------------------------------------ server -> agent
    async def _server_to_agent(self) -> None:
        up = self.upstream
        assert up is not None
        writer = self.client_writer
        server = MessageReader(up.reader)
        while True:
            batch = await server.batch()
            out: list[bytes] = []
            drain = False
            i = 0
            while i < len(batch):
                if batch[i].type == b"D":  # a run of rows: masked together
                    j = i
                    while j < len(batch) and batch[j].type == b"D":
                        j += 1
                    out += self._rows(batch[i:j])
                    i = j
                    continue
                msg = batch[i]
                out.append(await self._server_message(msg))
                drain = drain or msg.type in (b"Z", b"G", b"H", b"W", b"s")
                i += 1
            writer.write(b"".join(out))
            # Drain at every turn of the conversation, and whenever a large result piles up.
            if drain or writer.transport.get_write_buffer_size() > 1 << 16:
                await writer.drain()

    def _rows(self, messages: list[Message]) -> list[bytes]:
        unit = self.units[0] if self.units else None
        if unit is not None and not unit.columns and self.columns:
            unit.columns = [c.name for c in self.columns]
        masker = unit.masker if unit is not None else self.last_masker
        rows = [parse_data_row(m.payload) for m in messages]
        masked, changed = masker.rows(self.columns, rows)
        out = [data_row(m) if c else msg.raw for m, c, msg in zip(masked, changed, messages, strict=True)]
        if unit is not None:
            unit.rows += len(rows)
            unit.masked += sum(changed)
            room = self.settings.sample_rows - len(unit.sample)
            unit.sample += [sample_row(self.columns, m) for m in masked[:max(0, room)]]
        return out

    async def _server_message(self, msg: Message) -> bytes:
        """One message other than a DataRow: bookkeeping, and what the agent gets."""
        kind = msg.type
        unit = self.units[0] if self.units else None
        out: bytes = msg.raw
        if kind == b"T":
            self.columns = parse_row_description(msg.payload)
            if unit is not None and not unit.extended:
                unit.columns = [c.name for c in self.columns]
        elif kind == b"d" and unit is not None:  # COPY ... TO STDOUT: one line per message
            if unit.masker.active:
                text = msg.payload.decode("utf-8", "surrogateescape")
                masked_text = unit.masker.text(text)
                if masked_text != text:
                    out = message(b"d", masked_text.encode("utf-8", "surrogateescape"))
                    unit.masked += 1
            unit.rows += 1
        elif kind in (b"C", b"I", b"s"):
            if unit is not None:
                if kind == b"C":
                    unit.tags.append(msg.payload.rstrip(b"\0").decode("utf-8", "replace"))
                if unit.extended:
                    await self._complete(self.units.popleft())
        elif kind == b"2" and self.pending_binds:  # BindComplete: the oldest Bind holds
            entry = self.pending_binds.popleft()[1]
            entry.confirmed, entry.previous = True, None
        elif kind == b"E":
            fields = parse_fields(msg.payload)
            refused = next((u for u in self.units if u.nonce and u.nonce in fields.get("M", "")), None)
            if refused is not None and refused.verdict.refusal is not None:
                out = error_response(refused.verdict.refusal)
                refused.error = refused.verdict.refusal
                self.units.remove(refused)
                await self._complete(refused)
            else:
                out = self._mask_fields(b"E", fields, unit)
                if unit is not None:
                    unit.error = fields
                    if unit.extended:
                        await self._complete(self.units.popleft())
        elif kind == b"S":  # a setting changed (SET, set_config): lexing hazards read these
            name, _, rest = msg.payload.partition(b"\0")
            self.server_params[name.decode("utf-8", "replace")] = rest.rstrip(b"\0").decode("utf-8", "replace")
        elif kind == b"N":
            out = self._mask_fields(b"N", parse_fields(msg.payload), unit)
        elif kind == b"Z":
            self.status = msg.payload[:1]
            self.outstanding = max(0, self.outstanding - 1)
            self._revert_binds()
            while self.units:
                await self._complete(self.units.popleft())
        return out

    def _revert_binds(self) -> None:
        """Binds the server never completed (an error skipped them) created no portal: the
        name means what it meant before (the unnamed portal survives a failed Bind)."""
        while self.pending_binds:
            name, entry = self.pending_binds.pop()  # newest first, so the oldest previous wins
            if self.portals.get(name) is entry:
                if entry.previous is None:
                    del self.portals[name]
                else:
                    self.portals[name] = entry.previous

    def _mask_fields(self, kind: bytes, fields: dict[str, str], unit: Unit | None) -> bytes:
        masker = unit.masker if unit is not None else self.last_masker
        if not masker.active:
            return message(kind, b"".join(c.encode() + cstring(v) for c, v in fields.items()) + b"\0")
        masked = {c: (masker.text(v) if c in ("M", "D", "H", "W") else v) for c, v in fields.items()}
        return message(kind, b"".join(c.encode() + cstring(v) for c, v in masked.items()) + b"\0")

    async def _complete(self, unit: Unit) -> None:
        if unit.done:
            return
        unit.done = True
        self.last_masker = unit.masker
        if unit.error is not None:
            status = f"ERROR {unit.error.get('C', '')}"
        elif unit.tags:
            status = "; ".join(unit.tags)
        else:
            # allowed but no answer of its own: the server skipped it after an earlier error
            status = "not run" if not unit.verdict.allowed else "no result"
        if not unit.verdict.allowed and unit.error is None:
            status = "not run"
        # Queued, not awaited: the result never delays the agent's ReadyForQuery (the
        # recorder keeps queue order, so it still follows its request). Strict recording
        # governs the statement before it runs (_judge); a result that cannot be written is
        # counted lost and the recording says so in its next error event.
        event = response_event(
            unit.flow, identity=self.identity, status=status, rows=unit.rows, columns=unit.columns,
            sample=unit.sample, masked=unit.masked, error=unit.error,
            duration_ms=(time.perf_counter() - unit.started) * 1000,
            sample_limit=self.settings.sample_rows)
        task = asyncio.get_running_loop().create_task(self._record([event]))
        self._pending_records.add(task)
        task.add_done_callback(self._pending_records.discard)


def binary_parameter(value: bytes, oid: int) -> str:
    """A binary parameter as text for the recording (the common types; others by size)."""
    try:
        if oid in (20, 21, 23) and len(value) in (2, 4, 8):
            return str(int.from_bytes(value, "big", signed=True))
        if oid == 16 and len(value) == 1:
            return "true" if value != b"\0" else "false"
        if oid in (700, 701) and len(value) in (4, 8):
            return str(struct.unpack("!f" if len(value) == 4 else "!d", value)[0])
        if oid in (25, 1043, 1042, 19, 114):
            return value.decode("utf-8")
    except (UnicodeDecodeError, struct.error):
        pass
    return f"<{len(value)} binary bytes>"


def _binary(formats: tuple[int, ...], index: int) -> bool:
    if not formats:
        return False
    return (formats[0] if len(formats) == 1 else formats[index] if index < len(formats) else 0) == 1
