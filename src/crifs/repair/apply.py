"""The repair executor: runs the actions of planned findings on a store, safely.

Flow of :func:`apply`:

1. Take the runtime's locks as a writer (``crifs.repair.locks``): containers/storage's lock
   files all or none (``StoreLocked`` naming the holder after ``lock_timeout``; refused while
   CRI-O serves the store); containerd's bbolt flocks. While containerd holds those, no file
   is touched: when the daemon answers on its socket the findings' API calls are made instead
   (``crifs.repair.live``), else the repair is refused (``StoreLocked``).
2. Finish the store's unfinished journal (``crifs.repair.journal``) and empty its trash.
3. Re-read the store (``reopen``, which must not take c/storage's read locks: releasing them
   would release our write locks) and re-run ``check``: only planned findings whose identity
   is still found are repaired; the rest are ``gone``.
4. Expand each finding's actions into primitive steps, ordered by ``repair.order`` then plan
   order, write the plan to the journal, and run the steps one by one, each journaled (begin,
   done). A step re-checks its own preconditions when it runs, so a step resumed after a kill
   or run after an earlier failure never acts on a stale view. A failing step stops its
   finding (``failed``) and the run goes on with the next finding.

A step may be batched over several findings (``Executor.batch``; c/storage's layer record
saves, see ``crifs.repair.cstorage_exec``): it runs for those of its findings not stopped yet
and may stop some of them while going on for the others. Steps run in plan order either way.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from crifs.containerd.store import ContainerdStore
from crifs.cstorage.store import CStorageStore
from crifs.errors import CrifsError, Internal
from crifs.fsck.findings import Finding
from crifs.model import Store
from crifs.repair import fsops
from crifs.repair.cstorage_exec import CStorageExecutor
from crifs.repair.executor import Executor, Gone, label, still_found
from crifs.repair.journal import Journal, Step, step_groups
from crifs.repair.locks import ContainerdWriteLocks

__all__ = ["ApplyResult", "CStorageExecutor", "ContainerdExecutor", "Executor", "Gone", "apply",
           "executor_for"]

Log = Callable[[str], None]


@dataclass
class ApplyResult:
    """What a run did. ``gone``: planned but no longer found under the lock (or changed by
    someone else meanwhile). ``resumed``: steps of an interrupted earlier run finished now.
    ``freed``: space actually released by removals (inodes whose last link went)."""

    applied: list[Finding] = field(default_factory=list)
    failed: list[tuple[Finding, str]] = field(default_factory=list)
    gone: list[Finding] = field(default_factory=list)
    resumed: int = 0
    freed: fsops.Freed = fsops.NOTHING


def apply(store: Store, planned: Sequence[Finding], *, reopen: Callable[[], Store],
          check: Callable[[Store], list[Finding]], log: Log,
          lock_timeout: float = 10.0, address: str | None = None) -> ApplyResult:
    """Repair ``planned`` findings of ``store`` (see module doc). Raises ``StoreLocked`` (one
    line naming the holder) when the runtime holds the store and (containerd) does not answer
    on its API socket ``address`` (default: the config's, else containerd's default),
    ``UnsafePath`` when crifs' state directory is unsafe; every per-finding problem is
    reported in the result instead."""
    executor = executor_for(store)
    result = ApplyResult()
    if isinstance(executor, ContainerdExecutor):
        from crifs.repair import live

        assert isinstance(store, ContainerdStore)
        client = live.connect(executor.db_paths, live.address_of(store, address))
        if client is not None:
            with client:
                live.apply_live(client, planned, reopen=reopen, check=check, log=log,
                                result=result)
            return result
        if planned and not any(f.repair is not None and f.repair.actions for f in planned):
            return result  # only API calls, and no daemon to make them: nothing to do
    with executor.locked(lock_timeout):
        journal = executor.journal
        try:
            _resume(journal, executor, log, result)
            found = {f.identity for f in check(reopen())}
            executor.verify_locks()
            chosen = still_found(planned, found, lambda f: bool(f.repair and f.repair.actions),
                                 log, result.gone)
            _execute(journal, executor, chosen, log, result)
            journal.clear()
        finally:
            journal.close()
    return result


def _execute(journal: Journal, executor: Executor, findings: Sequence[Finding], log: Log,
             result: ApplyResult) -> None:
    executor.reload()
    groups: list[Finding] = []
    plan: list[Step] = []
    for finding in findings:
        assert finding.repair is not None
        try:
            steps = executor.expand(finding.repair.actions)
        except (CrifsError, OSError) as err:
            result.failed.append((finding, _message(err)))
            log(f"{label(finding)}: not repaired: {_message(err)}")
            continue
        for step in steps:
            step["group"] = len(groups)
        plan.extend(steps)
        groups.append(finding)
    plan = executor.batch(plan)
    for number, step in enumerate(plan, start=1):
        step["n"] = number
    if plan:
        journal.prepare()
        journal.start(plan, [_identity(f) for f in groups])
    stopped: dict[int, tuple[bool, str]] = {}
    _run_steps(journal, executor, plan, lambda g: label(groups[g]), log, result, stopped)
    for group, finding in enumerate(groups):
        if group not in stopped:
            result.applied.append(finding)
        elif stopped[group][0]:
            result.gone.append(finding)
        else:
            result.failed.append((finding, stopped[group][1]))
    if plan:
        journal.end()


def _resume(journal: Journal, executor: Executor, log: Log, result: ApplyResult) -> None:
    unfinished = journal.unfinished()  # first: it refuses a symlinked state directory
    result.freed = result.freed + journal.empty_trash()
    if unfinished is None:
        return
    journal.prepare()
    journal.adopt(unfinished.run)
    executor.reload()
    touched = {os.path.dirname(str(s["path"])) for s in unfinished.steps
               if s.get("op") in ("write", "symlink")}
    for directory in sorted(touched | set(executor.record_dirs())):
        fsops.remove_scratch(executor.record_scope, directory)
    remaining = unfinished.remaining()
    if remaining:
        log(f"finishing an interrupted repair: {len(remaining)} step(s)")
    # Groups never started, or abandoned, are not the resumed steps' business.
    live = unfinished.started() - unfinished.abandoned
    stopped = {g: (False, "not resumed") for s in unfinished.steps for g in step_groups(s)
               if g not in live}
    result.resumed += _run_steps(journal, executor, remaining,
                                 lambda g: _group_label(unfinished.groups, g), log, result,
                                 stopped)
    journal.end()
    result.freed = result.freed + journal.empty_trash()


def _run_steps(journal: Journal, executor: Executor, steps: Sequence[Step],
               label_of: Callable[[int], str], log: Log, result: ApplyResult,
               stopped: dict[int, tuple[bool, str]]) -> int:
    """Run ``steps`` in order, skipping those whose groups are all in ``stopped``; a failing
    step stops (abandons) its live groups, entered in ``stopped`` as ``(gone?, why)``.
    Returns the number of steps finished."""

    def stop(group: int, err: CrifsError | OSError) -> None:
        why = _message(err)
        gone = isinstance(err, Gone)
        stopped[group] = (gone, why)
        journal.abandon(group, why)
        log(f"{label_of(group)}: {why}" if gone else f"{label_of(group)}: failed: {why}")

    finished = 0
    for step in steps:
        live = [g for g in step_groups(step) if g not in stopped]
        if not live:
            continue
        named = label_of(live[0]) + (f" and {len(live) - 1} more" if len(live) > 1 else "")
        journal.begin(step)
        try:
            if "groups" in step:
                line, freed, partly = executor.run_batch(step, stopped)
            else:
                (line, freed), partly = executor.run(step), {}
        except (CrifsError, OSError) as err:
            for group in live:
                stop(group, err)
            continue
        except Exception as err:
            # A bug: abandon the groups so a re-run does not hit it again and again.
            for group in live:
                journal.abandon(group, repr(err))
            raise Internal(f"step {step.get('n')} ({step.get('op')}) of {named}: "
                           f"{err!r}") from err
        for group, why in partly.items():
            stop(group, why)
        journal.done(step)
        finished += 1
        result.freed = result.freed + freed
        log(f"{line} ({named}{_size(freed)})")
    return finished


# -- executors ---------------------------------------------------------------------------


class ContainerdExecutor(Executor):
    """File-level repairs of a stopped containerd's root (orphan dirs, blobs, ingests); a
    running one is repaired through its API (``crifs.repair.live``)."""

    def __init__(self, store: ContainerdStore) -> None:
        self.state_root = str(store.root)
        super().__init__(self.state_root)
        dbs = [db for name in store.snapshotter_names
               if (db := store.snapshotter_db(name)) is not None]
        self.scope = fsops.Scope([self.state_root, *(db.root for db in dbs)],
                                 relative_bases=[os.path.join(db.root, "snapshots")
                                                 for db in dbs])
        self.db_paths = [store.meta_db_path, *(db.db_path for db in dbs)]

    def locked(self, timeout: float) -> contextlib.AbstractContextManager[object]:
        return ContainerdWriteLocks(self.db_paths)


# -- helpers -----------------------------------------------------------------------------


def executor_for(store: Store) -> Executor:
    """The executor of ``store``'s runtime."""
    if isinstance(store, CStorageStore):
        return CStorageExecutor(store)
    if isinstance(store, ContainerdStore):
        return ContainerdExecutor(store)
    raise fsops.Refused(f"crifs cannot repair a {type(store).__name__}")


def _identity(finding: Finding) -> dict[str, Any]:
    return {"code": finding.code, "runtime": finding.runtime, "namespace": finding.namespace,
            "object": finding.object}



def _group_label(groups: Sequence[Mapping[str, Any]], group: int) -> str:
    if 0 <= group < len(groups):
        return f"{groups[group].get('code')} {groups[group].get('object')}"
    return f"group {group}"


def _message(err: BaseException) -> str:
    if isinstance(err, CrifsError):
        return str(err)
    if isinstance(err, OSError):
        where = f"{err.filename}: " if err.filename else ""
        return f"{where}{err.strerror or err}"
    return str(err)


def _size(freed: fsops.Freed) -> str:
    if not freed.inodes:
        return ""
    value, unit = float(freed.disk_bytes), "B"
    for next_unit in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, next_unit
    shown = f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
    return f", {shown}, {freed.inodes} inode{'s' if freed.inodes != 1 else ''}"
