"""What a link verdict is, and runs of verdicts passed between processes.

``LinkVerdict`` is the record ``crifs.check.links`` gives for each symlink (see there for
each verdict's meaning); ``SEVERITY`` the severity of each verdict: ``ok`` has none,
``runtime_provided`` is ``info``, every other verdict ``error``, ``host_only`` included,
since inside the container it is just as broken.

The audit of a big view is shared between two processes in runs of consecutive links
(``run_bounds``); ``export_runs`` / ``import_runs`` carry a process's runs of verdicts to the
other one.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from enum import StrEnum

from crifs.fs.listing import fast_constructor
from crifs.fs.resolve import ENOENT


class Verdict(StrEnum):
    OK = "ok"
    BROKEN = "broken"
    HIDDEN_BY_WHITEOUT = "hidden_by_whiteout"
    HIDDEN_BY_OPAQUE = "hidden_by_opaque"
    LOOP = "loop"
    NOT_A_DIRECTORY = "not_a_directory"
    HOST_ONLY = "host_only"
    RUNTIME_PROVIDED = "runtime_provided"


SEVERITY: dict[Verdict, str | None] = {
    Verdict.OK: None,
    Verdict.RUNTIME_PROVIDED: "info",
    Verdict.BROKEN: "error",
    Verdict.HIDDEN_BY_WHITEOUT: "error",
    Verdict.HIDDEN_BY_OPAQUE: "error",
    Verdict.LOOP: "error",
    Verdict.NOT_A_DIRECTORY: "error",
    Verdict.HOST_ONLY: "error",
}

# Directories a runtime mounts at start (moby's init layer, runc's default mounts), and files
# it creates or bind-mounts; a path equal to one of these or below it counts.
RUNTIME_PATHS: tuple[bytes, ...] = (
    b"/proc",
    b"/sys",
    b"/dev",
    b"/run",
    b"/etc/resolv.conf",
    b"/etc/hosts",
    b"/etc/hostname",
    b"/etc/mtab",
    b"/.dockerenv",
    b"/run/.containerenv",
)

@dataclass(frozen=True, slots=True)
class LinkVerdict:
    """The verdict on one symlink; see the module doc for each field's meaning."""

    path: bytes
    target: bytes
    verdict: Verdict
    errno: str | None
    resolved: bytes
    layer_added: int
    layer_broken: int | None
    fix: str | None
    message: str

    @property
    def severity(self) -> str | None:
        return SEVERITY[self.verdict]


# positional, every field: for the million-link hot loops (see ``fast_constructor``)
make_verdict = fast_constructor(LinkVerdict)


def run_bounds(total: int, runs: int) -> list[tuple[int, int]]:
    """``runs`` consecutive slices of ``total`` links, as ``(start, end)``."""
    cuts = [total * number // runs for number in range(runs + 1)]
    return list(zip(cuts, cuts[1:], strict=False))


def near_candidates(verdicts: list[LinkVerdict]) -> list[int]:
    """Positions of the verdicts a near-name fix is looked for, in order (see ``fixes``)."""
    broken = Verdict.BROKEN
    return [
        number
        for number, item in enumerate(verdicts)
        if item.verdict is broken and item.fix is None and item.errno == ENOENT
    ]


_VERDICT_OF = {verdict.value: verdict for verdict in Verdict}


def export_runs(runs: dict[int, list[LinkVerdict]]) -> bytes:
    """Runs of verdicts by number as bytes for ``import_runs`` (a helper's answer): plain
    tuples pickle and load several times faster than the dataclasses."""
    rows = {
        number: [
            (v.path, v.target, v.verdict.value, v.errno, v.resolved, v.layer_added,
             v.layer_broken, v.fix, v.message)
            for v in verdicts
        ]
        for number, verdicts in runs.items()
    }
    return pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL)


def import_runs(data: bytes) -> dict[int, list[LinkVerdict]] | None:
    """What ``export_runs`` wrote, or ``None`` if ``data`` is not that."""
    try:
        verdict_of = _VERDICT_OF
        return {
            number: [
                make_verdict(path, target, verdict_of[value], errno, resolved, added, broken,
                             fix, message)
                for path, target, value, errno, resolved, added, broken, fix, message in rows
            ]
            for number, rows in pickle.loads(data).items()
        }
    except (ValueError, TypeError, KeyError, EOFError, pickle.UnpicklingError):
        return None
