"""git smart-HTTP requests on ``http`` connections: push or fetch, which repository, which refs.

**Decision (automatic, no setting)**: every ``http`` connection recognises git's smart-HTTP
requests by the same dispatch ``git http-backend`` (and GitHub, GitLab, Gitea) use, so a
connection to a git host needs no extra field and a policy author cannot forget one:

* ``GET .../info/refs?service=git-upload-pack|git-receive-pack``: the ref advertisement
  (``phase: advertisement``) of a fetch or a push;
* ``POST .../git-upload-pack`` (fetch, clone, ls-remote) and ``POST .../git-receive-pack``
  (push): ``phase: rpc``.

The repository is the path before that suffix, without its leading ``/`` and a trailing
``.git`` (``/org/repo.git/info/refs`` -> ``org/repo``), taken from the canonical path
(paths.py), so ``//org/./repo`` is ``org/repo`` too. Action names are ``git:push`` and
``git:fetch``; the generic HTTP fields stay, so ``methods``/``paths`` rules still apply.
Dumb-HTTP (plain ``GET`` of ``objects/...``) and WebDAV pushes are not git requests here:
policies see them as plain HTTP (a deny-by-default policy refuses them).

**A push's commands** are read from the request body exactly as ``git receive-pack`` reads them
(``receive-pack.c``: ``read_head_info``): pkt-lines of ``<old-id> SP <new-id> SP <ref>``, the
capabilities after a NUL (on the first line; on any line the ref ends at the first NUL, as the
server cuts it), optional ``shallow`` lines, a ``push-cert`` block whose commands are the ones
the server executes, a flush, then ``push-option`` lines when that capability was asked for,
and the pack. A ``gzip``/``x-gzip`` Content-Encoding is inflated (``git http-backend`` inflates
it; the sidecar's body arrives already decoded, which the gzip magic bytes tell apart); any
other encoding leaves the commands unknown (http-backend would hand such a body to
receive-pack undecoded). Nothing is normalised: ``refs/heads//main``
is that ref, flagged invalid (``GitCommand.valid``: git's check-ref-format), because servers
refuse such names and a policy must not guess what another server makes of them.

**Decision (force pushes)**: ``+`` in a refspec never reaches the server, so whether an update
is a fast-forward depends on the objects. Creates and deletes are exact. For an update the
pushed pack is read (its header, then each object's zlib stream; commits come first in packs
``git pack-objects`` writes, so reading stops at the first tree or blob): if the new commit's
parents, followed within the pack, reach the old id, the update is a proven fast-forward
(``force: False``); otherwise ``force: None`` (unknown: the path may run through commits the
server already has, or the commit is a delta or not in the pack at all). ``forcePush`` rules
fail closed on unknown (policy/matching_git.py). An ``--amend``-and-force push is thus caught;
pushing a commit the server already has to a protected ref counts as a possible force push.

**Streamed bodies**: a push body over the sidecar's ``stream_large_bodies`` (1 MiB; git sends
``Transfer-Encoding: chunked`` above its ``http.postBuffer``, 1 MiB too) leaves before the body
could be read, so it is classified on the headers: ``commands: None`` (unknown). Restricting
rules on refs, operations or forcePush then match it and allow rules on them do not (fail
closed); ``services``/``repositories`` rules judge it exactly. docs/git.md says how to push
such a change.
"""

from __future__ import annotations

import hashlib
import re
import struct
import zlib
from dataclasses import replace
from typing import Literal
from urllib.parse import parse_qsl

from ...gitwire import PktError, Truncated, read_pkt
from ..model import Action, GitAction, GitCommand, HTTPRequest

__all__ = ["git_service", "classify_git", "git_name", "git_summary", "git_resources",
           "pending_push", "valid_ref", "MAX_INFLATED"]

Service = Literal["push", "fetch"]
Phase = Literal["advertisement", "rpc"]
_SERVICES: dict[str, Service] = {"git-receive-pack": "push", "git-upload-pack": "fetch"}
_HEX = re.compile(rb"^[0-9a-f]+$")
MAX_INFLATED = 64 * 1024 * 1024  # a gzip body is inflated at most this far (bombs)
_MAX_PACK_COMMITS = 2000  # ~14 us each (inflate + SHA-1) on the event loop: ~30 ms at most
_MAX_COMMIT = 1024 * 1024  # a commit object larger than this is not read


def git_service(request: HTTPRequest) -> tuple[Service, str, Phase] | None:
    """(service, repository, phase) when the request is a smart-HTTP git request, else None."""
    path, method = request.path, request.method.upper()
    if path.endswith("/info/refs") and method in ("GET", "HEAD"):
        values = {v for k, v in parse_qsl(request.query, keep_blank_values=True) if k == "service"}
        if not values & set(_SERVICES):
            return None
        # Conflicting service= values: judged as the push (the stricter), whatever the server picks.
        service: Service = "push" if "git-receive-pack" in values else "fetch"
        return service, _repository(path[:-len("/info/refs")]), "advertisement"
    if method == "POST":
        for suffix, service in _SERVICES.items():
            if path.endswith("/" + suffix):
                return service, _repository(path[:-len(suffix) - 1]), "rpc"
    return None


def _repository(prefix: str) -> str:
    repo = prefix.strip("/")
    return repo[:-4] if repo.endswith(".git") else repo


def classify_git(request: HTTPRequest, errors: list[str], *, read_pack: bool = True) -> GitAction | None:
    """The git part of an ``http`` connection's Action; None for requests that are not git.

    ``read_pack=False`` skips the fast-forward proof (updates stay ``force: None``): for
    callers that need only the commands (approval digests), since inflating and hashing a
    pack's commits costs ~14 us a commit."""
    found = git_service(request)
    if found is None:
        return None
    service, repository, phase = found
    protocol = (request.header("git-protocol") or "")[:200]
    if service == "fetch" or phase == "advertisement":
        return GitAction(service, repository, phase, (), protocol=protocol)
    body = _inflated(request, errors)
    if body is None:
        return GitAction("push", repository, phase, None, protocol=protocol)
    parsed = _parse_commands(body, errors)
    if parsed is None:
        return GitAction("push", repository, phase, None, protocol=protocol)
    commands, caps, options, pack_at = parsed
    if read_pack and any(c.operation == "update" for c in commands):
        commands = _with_fast_forwards(commands, body, pack_at, errors)
    return GitAction("push", repository, phase, tuple(commands), tuple(caps), tuple(options), protocol)


def _inflated(request: HTTPRequest, errors: list[str]) -> bytes | None:
    """The body as git http-backend hands it to receive-pack; None when it cannot be known."""
    if not request.body:
        errors.append("git push: the body was not read (streamed), so its ref updates are unknown")
        return None
    encoding = (request.header("content-encoding") or "").strip().lower()
    if encoding in ("", "identity"):
        return request.body
    if encoding not in ("gzip", "x-gzip"):
        errors.append(f"git push: Content-Encoding {encoding[:40]!r} is not one git reads; "
                      "ref updates unknown")
        return None
    if not request.body.startswith(b"\x1f\x8b"):
        # The sidecar hands the body decoded (flowctx.request_of); a pkt-line never starts
        # with gzip's magic bytes. (Not gzip at all: the server fails to inflate it.)
        return request.body
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(request.body, MAX_INFLATED)
    except zlib.error as exc:
        errors.append(f"git push: gzip body does not inflate ({exc}); ref updates unknown")
        return None
    return out


def _parse_commands(body: bytes, errors: list[str]
                    ) -> tuple[list[GitCommand], list[str], list[str], int] | None:
    """(commands, capabilities, push options, offset of the pack) or None when unreadable."""
    commands: list[GitCommand] = []
    caps: list[str] = []
    pos = 0
    try:
        while True:
            p = read_pkt(body, pos)
            pos = p.end
            if p.kind == "flush":
                break
            if p.kind != "data":
                raise PktError(f"unexpected {p.kind} packet among the commands")
            line = p.payload[:-1] if p.payload.endswith(b"\n") else p.payload
            head, nul, rest = line.partition(b"\0")
            if nul and not caps:  # a C string to the server: capabilities end at the next NUL
                caps = rest.split(b"\0", 1)[0].decode("utf-8", "replace").split()
            if head.startswith(b"shallow "):
                continue
            if head == b"push-cert":
                pos = _push_cert(body, pos, commands)
                continue
            commands.append(_command(head))
        options: list[str] = []
        if "push-options" in caps:
            while True:
                p = read_pkt(body, pos)
                pos = p.end
                if p.kind == "flush":
                    break
                options.append(p.payload.rstrip(b"\n").decode("utf-8", "replace")[:1000])
    except Truncated as exc:
        errors.append(f"git push: the commands end early ({exc}); ref updates unknown")
        return None
    except (PktError, ValueError) as exc:
        errors.append(f"git push: unreadable commands ({exc}); ref updates unknown")
        return None
    return commands, caps, options, pos


def _command(line: bytes) -> GitCommand:
    """``<old> SP <new> SP <ref>`` as receive-pack splits it (ids of 40 or 64 hex digits)."""
    for size in (40, 64):
        if len(line) > 2 * size + 2 and line[size:size + 1] == b" " and line[2 * size + 1:2 * size + 2] == b" ":
            old, new, ref = line[:size], line[size + 1:2 * size + 1], line[2 * size + 2:]
            if _HEX.match(old) and _HEX.match(new):
                break
    else:
        raise ValueError(f"not a ref update: {line[:120]!r}")
    zero = b"0" * size
    if old == zero and new == zero:
        raise ValueError(f"a ref update from and to the null id: {line[:120]!r}")
    operation: Literal["create", "update", "delete"] = (
        "create" if old == zero else "delete" if new == zero else "update")
    name = ref.decode("utf-8", "surrogateescape")
    return GitCommand(name, old.decode(), new.decode(), operation,
                      None if operation == "update" else False, valid_ref(name))


def _push_cert(body: bytes, pos: int, commands: list[GitCommand]) -> int:
    """Read a push certificate up to ``push-cert-end``; its commands are what the server runs."""
    lines: list[bytes] = []
    while True:
        p = read_pkt(body, pos)
        pos = p.end
        if p.kind != "data":
            raise PktError("push certificate without push-cert-end")
        if p.payload.rstrip(b"\n") == b"push-cert-end":
            break
        lines.append(p.payload)
    text = b"".join(lines)
    _, sep, rest = text.partition(b"\n\n")  # headers, a blank line, then the commands
    if not sep:
        raise PktError("push certificate without commands")
    for line in rest.split(b"\n"):
        if not line or line.startswith(b"-----BEGIN"):
            break
        commands.append(_command(line))
    return pos


_BAD_REF_CHARS = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


def valid_ref(ref: str) -> bool:
    """git's check-ref-format for a ref a client may push (``refs/...``, no ``//``, ``..``,
    ``@{``, control or glob characters, no component starting with ``.`` or ending ``.lock``)."""
    if not ref.startswith("refs/") or ref.endswith(("/", ".")) or ref == "@":
        return False
    if "//" in ref or ".." in ref or "@{" in ref or _BAD_REF_CHARS.search(ref):
        return False
    return all(part and not part.startswith(".") and not part.endswith(".lock")
               for part in ref.split("/"))


# ---------------------------------------------------------------------------- the pack

def _with_fast_forwards(commands: list[GitCommand], body: bytes, pack_at: int,
                        errors: list[str]) -> list[GitCommand]:
    try:
        parents = pack_commits(body, pack_at, len(commands[0].new))
    except (ValueError, IndexError, struct.error, zlib.error) as exc:
        errors.append(f"git push: pack unreadable ({exc}); fast-forwards unknown")
        parents = {}
    out = []
    for c in commands:
        if c.operation == "update" and _descends(c.new, c.old, parents):
            c = GitCommand(c.ref, c.old, c.new, c.operation, False, c.valid)
        out.append(c)
    return out


def _descends(new: str, old: str, parents: dict[str, tuple[str, ...]]) -> bool:
    """Whether ``old`` is reached from ``new`` through commits of the pack."""
    seen, todo = set(), [new]
    while todo:
        oid = todo.pop()
        if oid == old:
            return True
        if oid in seen or oid not in parents:
            continue
        seen.add(oid)
        todo.extend(parents[oid])
    return False


def pack_commits(data: bytes, start: int, hex_len: int = 40) -> dict[str, tuple[str, ...]]:
    """{commit id: parent ids} for the whole commits at the head of the pack at ``start``.

    Stops at the first object that is not a whole commit or tag (pack-objects writes commits
    first), so trees and blobs are not inflated, and where the bytes end (a pack cut short).
    """
    view = memoryview(data)
    if bytes(view[start:start + 4]) != b"PACK":
        return {}
    _version, count = struct.unpack(">II", view[start + 4:start + 12])
    pos, out = start + 12, {}
    algo = hashlib.sha256 if hex_len == 64 else hashlib.sha1
    for _ in range(min(count, _MAX_PACK_COMMITS)):
        if pos >= len(view):  # a pack cut short (a streamed push's first bytes): what was read
            break
        byte = view[pos]
        pos += 1
        kind, size, shift = (byte >> 4) & 7, byte & 15, 4
        while byte & 0x80:
            byte = view[pos]
            pos += 1
            size |= (byte & 0x7F) << shift
            shift += 7
        if kind not in (1, 4) or size > _MAX_COMMIT:  # not a whole commit or tag: stop
            break
        # zlib never grows data by more than ~0.03% plus a few bytes: an object's stream ends
        # within this slice, or the pack is refused as unreadable (fail closed: unknown).
        stop = min(len(view), pos + size + size // 100 + 1024)
        inflater = zlib.decompressobj()
        content = inflater.decompress(view[pos:stop], size + 1)
        if not inflater.eof and stop == len(view):
            break  # cut short inside this object
        if len(content) != size or not inflater.eof:
            raise ValueError("a pack object does not inflate to the size its header says")
        pos = stop - len(inflater.unused_data)
        if kind == 1:
            oid = algo(b"commit %d\0" % size + content).hexdigest()
            out[oid] = tuple(line[7:].decode() for line in content.split(b"\n\n", 1)[0].split(b"\n")
                             if line.startswith(b"parent "))
    return out


# ---------------------------------------------------------------------------- naming

def git_name(git: GitAction) -> str:
    return f"git:{git.service}"


def _short(oid: str) -> str:
    return oid[:12]


def describe_command(c: GitCommand) -> str:
    """``refs/heads/main a1b2c3d4e5f6..d4e5f6a1b2c3 (update)``."""
    what: str = c.operation
    if c.operation == "update" and c.force is None:
        what += ", fast-forward not proven"
    ref = c.ref if c.valid else f"{c.ref!r} (invalid ref name)"
    return f"{ref} {_short(c.old)}..{_short(c.new)} ({what})"


def git_summary(git: GitAction) -> str:
    """One line for approvers and recordings: service, repository, every ref update."""
    repo = git.repository or "/"
    if git.phase == "advertisement":
        return f"git {git.service} {repo}: ref advertisement"
    if git.service == "fetch":
        return f"git fetch {repo}"
    if git.pending:
        return f"git push {repo}: ref updates judged as the body arrives (streamed)"
    if git.commands is None:
        return f"git push {repo}: ref updates not read (streamed or unreadable body)"
    if not git.commands:
        return f"git push {repo}: no ref updates"
    return f"git push {repo}: " + "; ".join(describe_command(c) for c in git.commands)


def pending_push(action: Action) -> Action:
    """``action`` (a push classified on its headers) as a streamed push whose updates the gate
    will judge (gitgate.py); other actions unchanged."""
    git = action.git
    if git is None or git.service != "push" or git.phase != "rpc":
        return action
    git = replace(git, commands=(), pending=True)
    return replace(action, git=git, summary=git_summary(git),
                   errors=tuple(e for e in action.errors if not e.startswith("git push:")))


def git_resources(git: GitAction) -> tuple[str, ...]:
    """For ApprovalRequests and ``action`` grants: the repository and each full ref update."""
    if git.service != "push" or git.phase != "rpc":
        return (f"{git.service}:{git.repository}",)
    if git.pending:  # never the key of a push whose updates were read (nor of an empty one)
        return (f"push:{git.repository}:streamed",)
    if git.commands is None:
        return (f"push:{git.repository}:unknown",)
    return (f"push:{git.repository}",) + tuple(f"{c.ref} {c.old}..{c.new} {c.operation}"
                                               for c in git.commands)
