"""What a store check reports: findings, their severity, the space they hold and their repair.

A finding is a plain value (no I/O). Its JSON shape is ``crifs/findings/v1`` (README):
``code``, ``severity``, ``runtime``, ``namespace``, ``object``, ``path``, ``message``,
``reclaimable``, ``repair``, ``evidence``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from crifs.model import Usage
from crifs.repair.actions import Action, ApiCall


class Severity(StrEnum):
    """``error``: the runtime fails or leaks because of it. ``warning``: space or hygiene, the
    runtime works. ``info``: worth knowing, not a problem (does not change the exit code)."""

    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


@dataclass(frozen=True, slots=True)
class Reclaimable:
    """What removing the object frees: exact, hard links counted once across one check."""

    apparent_bytes: int
    disk_bytes: int
    inodes: int

    def __add__(self, other: Reclaimable) -> Reclaimable:
        return Reclaimable(
            self.apparent_bytes + other.apparent_bytes,
            self.disk_bytes + other.disk_bytes,
            self.inodes + other.inodes,
        )


ZERO = Reclaimable(0, 0, 0)


@dataclass(frozen=True, slots=True)
class Repair:
    """What ``--repair`` / ``--apply`` does about a finding.

    ``actions`` are what crifs itself executes (journaled, under the runtime's locks); when
    empty, crifs does not change the store for this finding and ``commands`` are what a user
    runs instead (``ctr -n k8s.io snapshots rm KEY``, ``podman rm -f ID``). ``gc`` is True
    when the repair only removes garbage, so ``crifs gc --apply`` runs it too (``check
    --repair`` runs every repair). ``order`` sorts actions across findings: lower runs first
    (children before parents: a snapshot's depth from its base, negated). ``calls`` are the
    containerd API requests that do what ``commands`` do, made by crifs when the daemon runs.
    """

    summary: str
    actions: tuple[Action, ...] = ()
    commands: tuple[str, ...] = ()
    gc: bool = False
    order: int = 0
    calls: tuple[ApiCall, ...] = ()

    @property
    def automatic(self) -> bool:
        return bool(self.actions)


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem found in a store. ``code`` is a class id from ``crifs.fsck.catalogue``;
    ``object`` is what a user types next (a snapshot key, a layer id, a link name, a path)."""

    code: str
    severity: Severity
    runtime: str
    object: str
    message: str
    path: str | None = None
    namespace: str | None = None
    reclaimable: Reclaimable | None = None
    repair: Repair | None = None
    evidence: Mapping[str, Any] = field(default_factory=dict)

    @property
    def identity(self) -> tuple[str, str, str | None, str, str | None]:
        """Stable across runs: used to match a planned finding with a re-check under lock."""
        return (self.code, self.runtime, self.namespace, self.object, self.path)


@dataclass(frozen=True, slots=True)
class CheckOptions:
    """How far a check looks.

    ``max_age``: an unreferenced c/storage layer (S11) younger than this is left alone (a pull
    or build may be about to use it), like c/storage's ``LayerUnreferencedMaximumAge``.
    ``measure``: measure reclaimable bytes (walks only unreferenced/orphan dirs, never the
    contents of referenced layers). ``now`` is injected for tests; ``None`` means the clock.
    """

    max_age: dt.timedelta = dt.timedelta(hours=24)
    measure: bool = True
    now: dt.datetime | None = None

    def clock(self) -> dt.datetime:
        return self.now or dt.datetime.now(dt.UTC)


def reclaimable_of(usage: Usage | None) -> Reclaimable | None:
    """A measured ``Usage`` (``fs.usage.Meter.measure``) as a finding's reclaimable space."""
    if usage is None:
        return None
    return Reclaimable(usage.apparent_bytes or 0, usage.disk_bytes, usage.inodes)
