"""Read recordings back from S3 or a local directory: list sessions, load them, verify them.

``verify`` trusts nothing it reads: it recomputes every event hash and the chain across all
chunks, compares each chunk's SHA-256, event count and boundary hashes with the manifest, and
checks the manifest's signature. Every problem names the exact spot (object key, line, seq,
expected vs found), in chain order, so the first one is the first broken link.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from .events import ChainChecker, ChainProblem, genesis_hash, iter_events, sha256_hex, split_lines
from .manifest import ManifestKey, check_signature
from .shipper import DirStore, ObjectStore, S3Store, session_prefix


class SessionNotFound(LookupError):
    pass


def open_store(*, bucket: str | None = None, endpoint: str | None = None, prefix: str = "",
               directory: str | None = None, **client_kwargs: Any) -> ObjectStore:
    """A store for ``--s3-bucket B [--s3-endpoint URL]`` or ``--dir PATH``."""
    if (bucket is None) == (directory is None):
        raise ValueError("give exactly one source: an S3 bucket or a directory")
    if directory is not None:
        return DirStore(directory)
    assert bucket is not None  # exactly one of them, checked above
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    return S3Store(bucket, prefix=prefix, **client_kwargs)


@dataclass(frozen=True)
class SessionRef:
    namespace: str
    pod: str
    session: str

    @property
    def prefix(self) -> str:
        return session_prefix(self.namespace, self.pod, self.session)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.pod}/{self.session}"


@dataclass
class SessionSummary:
    ref: SessionRef
    chunk_keys: list[str]
    manifest: dict[str, Any] | None = None

    @property
    def status(self) -> str:
        """``closed`` (manifest present) or ``open`` (still recording, or not yet shipped)."""
        return "closed" if self.manifest is not None else "open"

    def to_dict(self) -> dict[str, Any]:
        m = self.manifest or {}
        return {"namespace": self.ref.namespace, "pod": self.ref.pod, "session": self.ref.session,
                "status": self.status, "chunks": len(self.chunk_keys), "events": m.get("events"),
                "startTime": m.get("startTime"), "endTime": m.get("endTime"),
                "endReason": m.get("endReason"), "identity": m.get("identity")}


def _chunk_order(key: str) -> int:
    try:
        return int(key.rsplit("chunk-", 1)[1].split(".", 1)[0])
    except (IndexError, ValueError):
        return -1


def _get(store: ObjectStore, key: str) -> bytes | None:
    """The object's bytes, or None if it does not exist."""
    try:
        return store.get(key)
    except KeyError:
        return None
    except Exception as exc:  # boto3's NoSuchKey is a ClientError subclass
        if "NoSuchKey" in type(exc).__name__ or "NoSuchKey" in str(exc):
            return None
        raise


def _read_manifest(store: ObjectStore, ref: SessionRef) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None), (None, None) when absent, or (None, why it is unreadable)."""
    raw = _get(store, ref.prefix + "manifest.json")
    if raw is None:
        return None, None
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        return None, f"manifest is not JSON: {exc}"
    if not isinstance(manifest, dict):
        return None, "manifest is not a JSON object"
    return manifest, None


def list_sessions(store: ObjectStore, *, namespace: str | None = None, pod: str | None = None,
                  with_manifests: bool = True) -> list[SessionSummary]:
    """Every session under ``sessions/`` (narrowed by namespace/pod), sorted by session id."""
    prefix = "sessions/" + (f"{namespace}/" if namespace else "") + (
        f"{pod}/" if namespace and pod else "")
    groups: dict[SessionRef, list[str]] = defaultdict(list)
    for key in store.list(prefix):
        parts = key.split("/")
        if len(parts) != 5 or (pod and parts[2] != pod):
            continue
        groups[SessionRef(parts[1], parts[2], parts[3])].append(key)
    out = []
    for ref, keys in sorted(groups.items(), key=lambda item: (item[0].session, str(item[0]))):
        chunks = sorted((k for k in keys if k.rsplit("/", 1)[1].startswith("chunk-")), key=_chunk_order)
        has_manifest = ref.prefix + "manifest.json" in keys
        manifest = _read_manifest(store, ref)[0] if has_manifest and with_manifests else None
        out.append(SessionSummary(ref, chunks, manifest))
    return out


def find_session(store: ObjectStore, name: str) -> SessionRef:
    """Resolve ``namespace/pod/session`` or a bare session id (searched in every namespace)."""
    parts = name.strip("/").split("/")
    if len(parts) == 3:
        return SessionRef(*parts)
    if len(parts) != 1:
        raise SessionNotFound(f"{name!r}: give a session id or namespace/pod/session")
    matches = [s.ref for s in list_sessions(store, with_manifests=False) if s.ref.session == name]
    if not matches:
        raise SessionNotFound(f"no session {name!r} in {store.description}")
    if len(matches) > 1:
        raise SessionNotFound(f"session id {name!r} is ambiguous: {', '.join(map(str, matches))}")
    return matches[0]


@dataclass
class LoadedSession:
    ref: SessionRef
    manifest: dict[str, Any] | None
    chunks: list[tuple[str, bytes]]
    manifest_error: str | None = None

    @property
    def events(self) -> list[dict[str, Any]]:
        return [e for _, data in self.chunks for e in iter_events(data)]


def load_session(store: ObjectStore, ref: SessionRef) -> LoadedSession:
    keys = sorted((k for k in store.list(ref.prefix) if k.rsplit("/", 1)[1].startswith("chunk-")),
                  key=_chunk_order)
    manifest, error = _read_manifest(store, ref)
    if not keys and manifest is None and error is None:
        raise SessionNotFound(f"no session {ref} in {store.description}")
    return LoadedSession(ref, manifest, [(k, store.get(k)) for k in keys], error)


@dataclass
class VerifyReport:
    ref: SessionRef
    events: int = 0
    chunks: int = 0
    signature: str = "not checked"  # valid | invalid | missing | not checked
    problems: list[ChainProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"session": str(self.ref), "ok": self.ok, "events": self.events,
                "chunks": self.chunks, "signature": self.signature,
                "problems": [p.to_dict() for p in self.problems]}


def verify_session(store: ObjectStore, ref: SessionRef, key: ManifestKey | None) -> VerifyReport:
    """Check chain, chunk digests, manifest and signature (``key`` None: signature skipped)."""
    report = VerifyReport(ref)
    problems = report.problems
    manifest_key = ref.prefix + "manifest.json"
    session = load_session(store, ref)
    manifest = session.manifest

    def manifest_problem(kind: str, expected: Any = "", found: Any = "") -> None:
        problems.append(ChainProblem(manifest_key, 0, None, kind, str(expected), str(found)))

    listed = {k: data for k, data in session.chunks}
    by_key: dict[Any, dict[str, Any]] = {}  # the manifest's keys as written: checked, not trusted
    if manifest is None:
        manifest_problem(session.manifest_error or
                         "manifest missing (session not closed, or the manifest was removed)")
        order = list(listed)
    else:
        by_key = {c.get("key"): c for c in manifest.get("chunks", []) if isinstance(c, dict)}
        order = list(by_key)
        for extra in sorted(set(listed) - set(by_key), key=_chunk_order):
            problems.append(ChainProblem(extra, 0, _chunk_order(extra), "chunk not in the manifest"))
    checker = ChainChecker(ref.session)
    first_hash = ""
    for chunk in order:
        data = listed.get(chunk)
        expected = by_key.get(chunk, {})
        if data is None:
            problems.append(ChainProblem(chunk, 0, expected.get("firstSeq"), "chunk missing from the store",
                                         expected.get("sha256", ""), "nothing"))
            continue
        report.chunks += 1
        lines, tail = split_lines(data)
        for number, line in enumerate([*lines, *([tail] if tail else [])], 1):
            seq = checker.seq
            event, line_problems = checker.check_line(chunk, number, line)
            if number > len(lines):
                line_problems.insert(0, ChainProblem(chunk, number, seq,
                                                     "line not terminated by a newline"))
            problems.extend(line_problems)
            if event is not None and not first_hash:
                first_hash = str(event.get("hash", ""))
        if expected:
            digest = sha256_hex(data)
            if digest != expected.get("sha256"):
                problems.append(ChainProblem(chunk, 0, expected.get("firstSeq"),
                                             "chunk digest differs from the manifest",
                                             str(expected.get("sha256")), digest))
            if len(lines) != expected.get("events"):
                problems.append(ChainProblem(chunk, 0, expected.get("firstSeq"),
                                             "event count differs from the manifest",
                                             str(expected.get("events")), str(len(lines))))
    report.events = checker.events
    if manifest is not None:
        for name, want, have in (
            ("session", ref.session, manifest.get("session")),
            ("namespace", ref.namespace, manifest.get("namespace")),
            ("pod", ref.pod, manifest.get("pod")),
            ("genesis", genesis_hash(ref.session), manifest.get("genesis")),
            ("events", checker.events, manifest.get("events")),
            ("firstHash", first_hash, manifest.get("firstHash")),
            ("lastHash", checker.last_hash, manifest.get("lastHash")),
        ):
            if want != have:
                manifest_problem(f"manifest {name} does not match the chunks", want, have)
        if key is not None:
            error = check_signature(manifest, key)
            report.signature = "valid" if error is None else (
                "missing" if manifest.get("signature") is None else "invalid")
            if error is not None:
                manifest_problem(error)
    return report
