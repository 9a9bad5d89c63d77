"""Running every check that applies to a store, in one pass with one meter.

``check_store`` is the one entry point the CLI, the repair executor (re-checking under the
writer lock), the exporter and the demo use, so they all see the same findings.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass

from crifs.fs.usage import Meter
from crifs.fsck.findings import ZERO, CheckOptions, Finding, Reclaimable, Severity
from crifs.model import CONTAINERD, Store

# The detector modules per runtime; each exposes ``findings(store, opts, meter)``.
# crifs.fsck.catalogue says which module emits which class.
_MODULES = {
    CONTAINERD: ("crifs.fsck.roots", "crifs.fsck.containerd_snapshots", "crifs.fsck.containerd_gc"),
    "cstorage": ("crifs.fsck.roots", "crifs.fsck.cstorage_links", "crifs.fsck.cstorage_records"),
}
_SEVERITY_RANK = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.INFO: 2}


def check_store(store: Store, opts: CheckOptions | None = None) -> list[Finding]:
    """Every finding of ``store``, most severe first, then by class and object.

    Read-only. Reclaimable space is measured with one inode set for the whole store, so the
    findings' figures add up to exactly what removing all of them frees.
    """
    opts = opts or CheckOptions()
    meter = Meter()
    found: list[Finding] = []
    for name in _MODULES[store.runtime]:
        module = importlib.import_module(name)
        found.extend(module.findings(store, opts, meter))
    found.sort(key=lambda f: (_SEVERITY_RANK[f.severity], _code_key(f.code),
                              f.namespace or "", f.object))
    return found


def _code_key(code: str) -> tuple[str, int]:
    return (code[:1], int(code[1:]) if code[1:].isdigit() else 0)


def is_problem(finding: Finding) -> bool:
    """Whether a finding counts against a clean store (fsck exit 4); info does not."""
    return finding.severity is not Severity.INFO


@dataclass(frozen=True, slots=True)
class Summary:
    """Counts by severity and the space all findings hold together."""

    findings: int
    errors: int
    warnings: int
    info: int
    reclaimable: Reclaimable
    repairable: int
    manual: int

    @classmethod
    def of(cls, findings: Iterable[Finding]) -> Summary:
        items = list(findings)
        total = ZERO
        for f in items:
            if f.reclaimable is not None:
                total = total + f.reclaimable
        return cls(
            findings=len(items),
            errors=sum(f.severity is Severity.ERROR for f in items),
            warnings=sum(f.severity is Severity.WARNING for f in items),
            info=sum(f.severity is Severity.INFO for f in items),
            reclaimable=total,
            repairable=sum(1 for f in items if f.repair is not None and f.repair.automatic),
            manual=sum(1 for f in items
                       if f.repair is not None and not f.repair.automatic and f.repair.commands),
        )
