"""The repair journal: what a run is about to do, so a kill -9 at any point can be finished.

Layout, under the store root::

    .crifs/journal.jsonl   one JSON record a line, each written with one write() and fsync'ed
    .crifs/trash/          directories being deleted (renamed here first, then emptied)
    .crifs/tmp/            scratch names for atomic replacements

Records of one run, in order::

    {"rec": "plan", "run": ID, "steps": [{"n": 1, "group": 0, "op": "remove", ...}, ...],
     "groups": [{"finding": {identity}, "summary": "..."}, ...]}
    (a batched step serves several findings: "groups": [0, 3, ...] beside "group": 0)
    {"rec": "begin", "run": ID, "n": 1}      before step 1 touches anything
    {"rec": "done",  "run": ID, "n": 1}      after step 1 is durable
    {"rec": "abandon", "run": ID, "group": 0, "why": "..."}   a group stopped on an error
    {"rec": "end", "run": ID}

Contract: a run with a plan but no ``end`` is unfinished. Its groups with at least one begun
step (beginning a batched step starts all its groups) are completed by the next run before
anything else (every step is idempotent, and each re-checks its own preconditions); groups
that had not started are dropped, since the next run re-checks the store and plans afresh. A
torn last line (power loss) is ignored.

Fault injection for tests: with ``CRIFS_KILL_AT_STEP=N`` in the environment the process
SIGKILLs itself right after the N-th step it begins (counted per process) is durable in the
journal, before the step is carried out.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from crifs.errors import UnsafePath
from crifs.repair import fsops

STATE_DIR = ".crifs"
JOURNAL = "journal.jsonl"
KILL_ENV = "CRIFS_KILL_AT_STEP"

Step = dict[str, Any]
"""One primitive step: ``n`` (1-based, within its run), ``group`` (index of the finding it
belongs to; a batched step also has ``groups``, every finding it serves), ``op`` and the op's
arguments."""


def step_groups(step: Mapping[str, Any]) -> list[int]:
    """The groups (findings) a step serves: ``groups`` of a batched step, else ``[group]``."""
    groups = step.get("groups")
    if isinstance(groups, list) and groups:
        return [int(g) for g in groups]
    return [int(step["group"])]


_begun = [0, 0]  # [pid, steps begun by it]: a forked child counts from zero


def _fault_point() -> None:
    pid = os.getpid()
    if _begun[0] != pid:
        _begun[:] = [pid, 0]
    _begun[1] += 1
    wanted = os.environ.get(KILL_ENV)
    if wanted is not None and wanted.strip() == str(_begun[1]):
        os.kill(pid, signal.SIGKILL)


@dataclass
class Unfinished:
    """An interrupted run read back from the journal."""

    run: str
    steps: list[Step]
    groups: list[Mapping[str, Any]]
    begun: set[int] = field(default_factory=set)
    done: set[int] = field(default_factory=set)
    abandoned: set[int] = field(default_factory=set)

    def started(self) -> set[int]:
        """Groups with at least one begun step."""
        return {g for s in self.steps if s["n"] in self.begun for g in step_groups(s)}

    def remaining(self) -> list[Step]:
        """Steps still to run, in plan order: those not yet done that serve at least one
        started, not abandoned group."""
        live = self.started() - self.abandoned
        return [s for s in self.steps
                if s["n"] not in self.done and any(g in live for g in step_groups(s))]


class Journal:
    """The journal and scratch directories of one store root (see module doc)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.dir = os.path.join(self.root, STATE_DIR)
        self.path = os.path.join(self.dir, JOURNAL)
        self.trash = os.path.join(self.dir, "trash")
        self.scratch = os.path.join(self.dir, "tmp")
        self._fd: int | None = None
        self._run: str | None = None

    # -- setup / teardown ------------------------------------------------------------------

    def prepare(self) -> None:
        """Create ``.crifs``, ``trash`` and ``tmp`` (0700); refuse symlinks in their place."""
        for path in (self.dir, self.trash, self.scratch):
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                pass
            except OSError as err:
                raise fsops.Refused("cannot create crifs' repair journal directory: "
                                    f"{os.strerror(err.errno or 0)}", path=path) from None
            if os.path.islink(path) or not os.path.isdir(path):
                raise UnsafePath("crifs state directory is a symlink or not a directory",
                                 path=path)

    def empty_trash(self) -> fsops.Freed:
        """Delete what an interrupted run left in ``trash`` and ``tmp``."""
        return fsops.empty_dir(self.trash) + fsops.empty_dir(self.scratch)

    def clear(self) -> None:
        """After a finished run: remove the journal and the (empty) state directories."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.empty_trash()
        for path in (self.trash, self.scratch, self.dir):
            with contextlib.suppress(OSError):
                os.rmdir(path)
        with contextlib.suppress(OSError):
            parent = fsops.open_dir(self.root)
            fsops.fsync_dir(parent)
            os.close(parent)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- reading ---------------------------------------------------------------------------

    def unfinished(self) -> Unfinished | None:
        """The last run if it has a plan and no end record, else ``None``."""
        if os.path.islink(self.dir):
            raise UnsafePath("crifs state directory is a symlink; crifs does not follow it",
                             path=self.dir)
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise UnsafePath(f"cannot read the repair journal: {os.strerror(err.errno or 0)}",
                             path=self.path) from None
        with os.fdopen(fd, "rb") as f:
            lines = f.read().splitlines()
        current: Unfinished | None = None
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a torn last line
            if not isinstance(rec, dict):
                continue
            kind = rec.get("rec")
            if kind == "plan":
                current = Unfinished(str(rec.get("run")), list(rec.get("steps") or []),
                                     list(rec.get("groups") or []))
            elif current is None or rec.get("run") != current.run:
                continue
            elif kind == "begin":
                current.begun.add(int(rec["n"]))
            elif kind == "done":
                current.done.add(int(rec["n"]))
            elif kind == "abandon":
                current.abandoned.add(int(rec["group"]))
            elif kind == "end":
                current = None
        return current

    # -- writing ---------------------------------------------------------------------------

    def start(self, steps: Sequence[Step], groups: Sequence[Mapping[str, Any]]) -> str:
        """Write (and fsync) the plan of a new run; returns its id."""
        self._run = secrets.token_hex(8)
        self._append({"rec": "plan", "run": self._run, "steps": list(steps),
                      "groups": list(groups)})
        return self._run

    def adopt(self, run: str) -> None:
        """Continue writing records for the interrupted run ``run``."""
        self._run = run

    def begin(self, step: Step) -> None:
        self._append({"rec": "begin", "run": self._run, "n": step["n"]})
        _fault_point()

    def done(self, step: Step) -> None:
        self._append({"rec": "done", "run": self._run, "n": step["n"]})

    def abandon(self, group: int, why: str) -> None:
        self._append({"rec": "abandon", "run": self._run, "group": group, "why": why})

    def end(self) -> None:
        self._append({"rec": "end", "run": self._run})

    def _append(self, record: Mapping[str, Any]) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                               | os.O_CLOEXEC, 0o600)
            state_fd = fsops.open_dir(self.dir)
            fsops.fsync_dir(state_fd)  # the journal's own directory entry is durable too
            os.close(state_fd)
        # ASCII with \u escapes: a path that is not UTF-8 (surrogate-escaped) round-trips.
        data = (json.dumps(record, separators=(",", ":")) + "\n").encode("ascii")
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        os.fsync(self._fd)
