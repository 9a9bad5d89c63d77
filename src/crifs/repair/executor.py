"""The executor base: runs primitive journal steps (``crifs.repair.journal.Step``) on one store.

A runtime's executor (``crifs.repair.apply.ContainerdExecutor``,
``crifs.repair.cstorage_exec.CStorageExecutor``) adds its locks and its own ops. Every step is
idempotent and re-checks its preconditions when it runs; a step whose object was changed by
someone else meanwhile raises :class:`Gone`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Collection, Sequence

from crifs.errors import CrifsError
from crifs.fsck.findings import Finding
from crifs.repair import fsops
from crifs.repair.actions import Action, CreateSymlink, MakeDir, RemovePath, WriteFile
from crifs.repair.journal import Journal, Step


def label(finding: Finding) -> str:
    """How a log line names a finding."""
    return f"{finding.code} {finding.object}"


def still_found(planned: Sequence[Finding], found: Collection[tuple[object, ...]],
                has_work: Callable[[Finding], bool], log: Callable[[str], None],
                gone: list[Finding]) -> list[Finding]:
    """The planned findings with work to do that a re-check (``found``: identities) still
    finds, by ``repair.order`` then plan order; the others with work are logged and added to
    ``gone``."""
    chosen: list[tuple[int, int, Finding]] = []
    for index, finding in enumerate(planned):
        if finding.repair is None or not has_work(finding):
            continue
        if finding.identity not in found:
            gone.append(finding)
            log(f"{label(finding)}: no longer found; nothing to do")
            continue
        chosen.append((finding.repair.order, index, finding))
    chosen.sort(key=lambda c: (c[0], c[1]))
    return [f for _, _, f in chosen]


class Gone(CrifsError):
    """The object a step acts on was changed by someone else meanwhile: leave it alone."""


Outcome = tuple[str, fsops.Freed]
"""A step's log line and the space it freed."""

BatchOutcome = tuple[str, fsops.Freed, dict[int, CrifsError]]
"""A batched step's log line, freed space, and the groups it could not serve, with why
(:class:`Gone` or a refusal); the step went on for its other groups."""


class Executor:
    """Runs primitive steps on one store. Subclasses add their runtime's locks and ops."""

    state_root: str
    scope: fsops.Scope

    def __init__(self, journal_root: str) -> None:
        self.journal = Journal(journal_root)

    def locked(self, timeout: float) -> contextlib.AbstractContextManager[object]:
        raise NotImplementedError

    def reload(self) -> None:
        """Re-read whatever the steps' preconditions consult (under the locks)."""

    def verify_locks(self) -> None:
        """``Internal`` when a lock taken by :meth:`locked` is no longer held."""

    def record_dirs(self) -> list[str]:
        """Directories of the record files the executor rewrites."""
        return []

    @property
    def record_scope(self) -> fsops.Scope:
        return self.scope

    def expand(self, actions: Sequence[Action]) -> list[Step]:
        steps: list[Step] = []
        for action in actions:
            steps.extend(self.expand_one(action))
        return steps

    def batch(self, steps: list[Step]) -> list[Step]:
        """The whole plan's steps (``group`` set, not yet numbered) with steps of several
        findings merged into batched ones where the runtime allows; plan order is kept."""
        return steps

    def expand_one(self, action: Action) -> list[Step]:
        if isinstance(action, RemovePath):
            self.scope.locate(action.path)
            return [{"op": "remove", "path": action.path}]
        if isinstance(action, CreateSymlink):
            self.scope.locate(action.path)
            return [{"op": "symlink", "path": action.path, "target": action.target}]
        if isinstance(action, WriteFile):
            self.scope.locate(action.path)
            return [{"op": "write", "path": action.path, "content": action.content,
                     "mode": action.mode}]
        if isinstance(action, MakeDir):
            self.scope.locate(action.path)
            return [{"op": "mkdir", "path": action.path, "mode": action.mode}]
        raise fsops.Refused(f"{action.action} is not an action for this kind of store")

    def run_batch(self, step: Step, skip: Collection[int]) -> BatchOutcome:
        """Run a batched step for its groups not in ``skip`` (stopped ones)."""
        raise fsops.Refused(f"unknown journal step {step['op']!r} (journal from a newer crifs?)")

    def run(self, step: Step) -> Outcome:
        op = step["op"]
        path = str(step.get("path", ""))
        if op == "remove":
            freed = fsops.remove_path(self.scope, path, trash=self.journal.trash)
            return (f"removed {path}" if freed.inodes else f"{path} already gone"), freed
        if op == "symlink":
            target = str(step["target"])
            if not os.path.isdir(os.path.join(os.path.dirname(path), target)):
                raise fsops.Refused(f"not linked: target {target} is not a directory, the "
                                    "link would dangle", path=path)
            changed = fsops.replace_symlink(self.scope, path, target,
                                            scratch=self.journal.scratch)
            return (f"linked {path} -> {target}" if changed else f"{path} already links "
                    f"to {target}"), fsops.NOTHING
        if op == "write":
            data = str(step["content"]).encode("utf-8", "surrogateescape")
            changed = fsops.write_file(self.scope, path, data, int(step.get("mode", 0o644)),
                                       scratch=self.journal.scratch)
            return (f"wrote {path}" if changed else f"{path} already up to date"), fsops.NOTHING
        if op == "mkdir":
            changed = fsops.make_dir(self.scope, path, int(step.get("mode", 0o700)))
            return (f"created {path}/" if changed else f"{path}/ exists"), fsops.NOTHING
        raise fsops.Refused(f"unknown journal step {op!r} (journal from a newer crifs?)")
