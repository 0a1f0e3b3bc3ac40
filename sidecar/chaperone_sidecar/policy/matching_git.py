"""``match.git`` conditions: services, repositories, and per ref update refs/operations/forcePush.

Built by :func:`git_conditions` for :mod:`.matching` (which wraps them in its ``Condition``);
the values come from ``Action.git`` (:mod:`.classify.git`). Semantics:

* ``services`` (push, fetch) and ``repositories`` (name globs: ``org/*``) hold for every git
  request of that service/repository - the ref advertisement (``info/refs``) included, so
  ``services: [push]`` + block refuses a push before git sends anything - except in
  requireApproval rules, which hold the push or fetch itself (its POST), not what changes
  nothing around it: the advertisement, or git's ``0000`` probe (a push without updates).
* ``refs`` (name globs: ``refs/heads/*`` also matches ``refs/heads/a/b``), ``operations``
  (create, update, delete) and ``forcePush`` are tested **together on each ref update** of a
  push: ``refs: [refs/heads/main], operations: [delete]`` matches a push that deletes main, not
  one that deletes a feature branch and updates main. A restricting rule (block,
  requireApproval, mask, rateLimit) matches when ANY update matches, an ``allow`` rule only when
  EVERY update does - so one forbidden ref refuses the whole push (git applies a push's
  updates together, ``atomic`` or not, once the request is through). They never hold for a
  fetch or an advertisement (which carry no updates); an allow rule holds for a push without
  updates (git's ``0000`` probe before a large push changes nothing).
* Fail closed on what the request cannot tell: when the updates were not read (a streamed
  body, ``commands: None``), a restricting rule with refs/operations/forcePush matches and an
  allow rule does not; a ref name git would refuse (``refs/heads//main``, ``HEAD``) matches
  every restricting ``refs`` pattern and no allow pattern; an update whose fast-forward could
  not be proven (``force: None``) matches ``forcePush: true`` and ``forcePush: false`` of
  restricting rules and neither of allow rules. Creates and deletes are never force pushes.
* A streamed push judged on its headers (``GitAction.pending``) has no update yet: refs,
  operations and forcePush hold as for a push without updates, and the gate that holds its
  body back judges the updates before any of it leaves (:mod:`chaperone_sidecar.gitgate`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .classify.git import describe_command
from .globs import GlobSet
from .model import GitAction, GitCommand

__all__ = ["git_conditions", "GIT_FIELDS"]

GIT_FIELDS = ("services", "repositories", "refs", "operations", "forcePush")

# (field, patterns as written, test, value for explanations)
GitCondition = tuple[str, tuple[str, ...], Callable[[Any], bool], Callable[[Any], object]]


def _git(ctx: Any) -> GitAction | None:
    return ctx.action.git


def git_conditions(spec: dict, effect: str) -> list[GitCondition]:
    """The conditions of one rule's ``match.git`` (empty lists and absent fields: not tested)."""
    out: list[GitCondition] = []
    restricting = effect != "allow"
    # An approval holds the push or fetch itself, not what changes nothing around it: git's
    # advertisement before it, or the "0000" probe (a push without updates) before a large
    # push - each would need an approval of its own.
    idle_too = effect != "require_approval"

    def git_of(c: Any) -> GitAction | None:
        g = _git(c)
        if g is None or idle_too:
            return g
        idle = g.phase != "rpc" or (g.service == "push" and g.commands == () and not g.pending)
        return None if idle else g

    if spec.get("services"):
        services = frozenset(spec["services"])
        out.append(("match.git.services", tuple(spec["services"]),
                    lambda c: (g := git_of(c)) is not None and g.service in services,
                    lambda c: g.service if (g := _git(c)) else None))
    if spec.get("repositories"):
        repos = GlobSet(spec["repositories"])
        out.append(("match.git.repositories", repos.patterns,
                    lambda c: (g := git_of(c)) is not None and repos.match(g.repository),
                    lambda c: g.repository if (g := _git(c)) else None))
    refs = GlobSet(spec["refs"]) if spec.get("refs") else None
    operations = frozenset(spec.get("operations") or ())
    force = spec.get("forcePush")
    if refs is None and not operations and force is None:
        return out

    def update_matches(cmd: GitCommand) -> bool:
        if refs is not None and not (refs.match(cmd.ref) if cmd.valid else restricting):
            return False
        if operations and cmd.operation not in operations:
            return False
        if force is not None:
            if cmd.force is None:
                return restricting
            if cmd.force != force:
                return False
        return True

    def test(ctx: Any) -> bool:
        git = _git(ctx)
        if git is None or git.service != "push" or git.phase != "rpc":
            return False
        if git.pending:  # judged on the headers; the gate judges the updates (gitgate.py)
            return not restricting
        if git.commands is None:
            return restricting
        if restricting:
            return any(map(update_matches, git.commands))
        return all(map(update_matches, git.commands))

    def value(ctx: Any) -> object:
        git = _git(ctx)
        if git is None or git.service != "push" or git.phase != "rpc":
            return None
        if git.pending:
            return "ref updates pending (judged as the body arrives)"
        if git.commands is None:
            return "ref updates unknown"
        return [describe_command(c) for c in git.commands]

    patterns = tuple(f"refs={p}" for p in (refs.patterns if refs else ())) + \
        tuple(f"operation={o}" for o in sorted(operations)) + \
        ((f"forcePush={str(force).lower()}",) if force is not None else ())
    out.append(("match.git.refs/operations/forcePush", patterns, test, value))
    return out
