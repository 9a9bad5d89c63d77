"""``crifs check [--repair]`` and ``crifs gc [--apply]``: fsck for a store's bookkeeping.

Exit codes of ``check`` are fsck(8)'s: 0 clean, 1 problems corrected (none left), 4 problems
left, 8 operational error (a store that cannot be read, a repair refused or failed); bad usage
and a missing root stay 2 as for every verb. ``gc``: 0 done (or nothing to do), 1 garbage left
that ``--apply`` could not remove, 2 bad input.

Policy lives here, not in the engines: which findings a verb acts on (``gc`` only garbage,
``check --repair`` every repair), the plan printed before anything changes, and the re-check
that decides the exit code.
"""

from __future__ import annotations

import datetime as dt
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import typer

from crifs.cli.common import Globals, data_format, globals_of, stores_of
from crifs.errors import BadInput, CrifsError
from crifs.model import CONTAINERD, Store
from crifs.report.output import Format, document, write_document
from crifs.report.values import escape_text, record

if TYPE_CHECKING:
    # The check engines are imported when check/gc runs, not when the CLI starts.
    from crifs.fsck.findings import CheckOptions, Finding

EXIT_CLEAN, EXIT_CORRECTED, EXIT_LEFT, EXIT_OPERATIONAL = 0, 1, 4, 8

MaxAgeOpt = Annotated[
    str,
    typer.Option("--max-age", metavar="DURATION",
                 help="Leave unreferenced layers younger than this (e.g. 24h, 30m, 7d, 0)."),
]
OnlyOpt = Annotated[
    str | None,
    typer.Option("--only", metavar="CODES", help="Only these finding classes, e.g. C1,C7,S2."),
]
NoMeasureOpt = Annotated[
    bool, typer.Option("--no-measure", help="Do not measure reclaimable bytes (faster).")
]

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> dt.timedelta:
    """``24h``, ``1h30m``, ``7d``, ``90s`` or ``0`` (Go's time.ParseDuration plus d and w)."""
    if text.strip() == "0":
        return dt.timedelta(0)
    pos, seconds = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        seconds += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise BadInput(f"--max-age: {text!r} is not a duration (use e.g. 24h, 30m, 7d, 0)")
    return dt.timedelta(seconds=seconds)


def _codes(only: str | None) -> set[str] | None:
    from crifs.fsck.catalogue import BY_CODE

    if not only:
        return None
    codes = {c.strip().upper() for c in only.split(",") if c.strip()}
    unknown = sorted(codes - set(BY_CODE))
    if unknown:
        raise BadInput(f"--only: unknown finding class {', '.join(unknown)} "
                       f"(known: {', '.join(BY_CODE)})")
    return codes


@dataclass
class _Run:
    """What happened to one store."""

    store: Store
    findings: list[Finding]
    applied: list[Finding] = field(default_factory=list)
    failed: list[tuple[Finding, str]] = field(default_factory=list)
    gone: list[Finding] = field(default_factory=list)
    refused: str | None = None
    remaining: list[Finding] | None = None
    live: bool = False  # a running containerd: repairs go through its API


class _Selector:
    def __init__(self, g: Globals, only: str | None, gc_only: bool) -> None:
        self.namespace = g.namespace
        self.codes = _codes(only)
        self.gc_only = gc_only

    def __call__(self, findings: list[Finding]) -> list[Finding]:
        return [
            f for f in findings
            if (self.codes is None or f.code in self.codes)
            and (self.namespace is None or f.namespace in (None, self.namespace))
            and (not self.gc_only or (f.repair is not None and f.repair.gc))
        ]


def _open_again(store: Store, g: Globals, *, take_locks: bool) -> Store:
    """``store`` read afresh from disk. ``take_locks=False`` under our own writer locks: POSIX
    locks belong to the process, so taking and dropping a read lock would drop ours."""
    sel = g.selection
    if store.runtime == CONTAINERD:
        from crifs.containerd.store import ContainerdStore

        return ContainerdStore.open(root=store.root, state=getattr(store, "state", None),
                                    config=sel.config)
    from crifs.cstorage.store import CStorageStore

    return CStorageStore.open(root=store.root, runroot=getattr(store, "runroot", None),
                              config=sel.config, lock_timeout=sel.lock_timeout,
                              take_locks=take_locks)


def _reopen(store: Store, g: Globals) -> Callable[[], Store]:
    return lambda: _open_again(store, g, take_locks=False)


def _apply(run: _Run, opts: CheckOptions, select: _Selector, g: Globals,
           log: Callable[[str], None]) -> None:
    # API calls are work too: made when containerd runs (else a refusal says why not).
    planned = [f for f in run.findings if f.repair is not None
               and (f.repair.automatic or f.repair.calls)]
    if not planned:
        return
    from crifs.fsck.run import check_store
    from crifs.repair.apply import apply

    try:
        result = apply(
            run.store, planned,
            reopen=_reopen(run.store, g),
            check=lambda st: select(check_store(st, opts)),
            log=log,
            lock_timeout=g.selection.lock_timeout,
            address=g.selection.address,
        )
    except CrifsError as err:
        run.refused = str(err)
        log(f"refused: {err}")
        return
    run.applied, run.failed, run.gone = result.applied, result.failed, result.gone


def _run(ctx: typer.Context, *, verb: str, change: bool, max_age: str, only: str | None,
         no_measure: bool) -> int:
    from crifs.fsck.findings import CheckOptions
    from crifs.fsck.run import Summary, check_store
    from crifs.report.findings import summary_line, write_plan, write_table

    g = globals_of(ctx)
    opts = CheckOptions(max_age=parse_duration(max_age), measure=not no_measure)
    gc_only = verb == "gc"
    select = _Selector(g, only, gc_only)
    stores = stores_of(g)
    people = g.output is Format.TABLE
    out = sys.stdout if people else sys.stderr

    def log(line: str) -> None:
        out.write(f"  {escape_text(line)}\n")
        out.flush()

    runs = [_Run(st, select(check_store(st, opts))) for st in stores]
    everything = [f for r in runs for f in r.findings]
    if people:
        if everything:
            write_table(everything)
        print(summary_line(Summary.of(everything), what="garbage item" if gc_only else "finding"))
    if change or (gc_only and people):
        for r in runs:
            r.live = _live(r, g)
            write_plan(r.store, r.findings, gc_only=gc_only, out=out, live=r.live)
    if change:
        for r in runs:
            _apply(r, opts, select, g, log)
            r.remaining = select(check_store(_open_again(r.store, g, take_locks=True), opts))
        remaining = [f for r in runs for f in r.remaining or []]
        if people:
            print("after repair: " + summary_line(Summary.of(remaining),
                                                  what="garbage item" if gc_only else "finding"))
    if not people:
        _write_json(runs, verb=verb, change=change, fmt=data_format(g))
    return _exit_code(runs, verb=verb, change=change)


def _live(run: _Run, g: Globals) -> bool:
    """Whether a repair of this run's store goes through containerd's API: its DBs are held
    by a daemon that answers (asked only when there is something such a repair would do)."""
    if run.store.runtime != CONTAINERD or not any(
            f.repair is not None and f.repair.calls for f in run.findings):
        return False
    from crifs.containerd.store import ContainerdStore
    from crifs.repair.live import daemon_answers

    return isinstance(run.store, ContainerdStore) and daemon_answers(run.store,
                                                                     g.selection.address)


def _exit_code(runs: Sequence[_Run], *, verb: str, change: bool) -> int:
    from crifs.fsck.run import is_problem

    if verb == "gc":
        if change and any(r.failed or r.refused or (r.remaining or []) for r in runs):
            return 1
        return 0
    if change:
        if any(r.refused or r.failed for r in runs):
            left = any(is_problem(f) for r in runs for f in r.remaining or [])
            return EXIT_LEFT | EXIT_OPERATIONAL if left else EXIT_OPERATIONAL
        if any(is_problem(f) for r in runs for f in r.remaining or []):
            return EXIT_LEFT
        return EXIT_CORRECTED if any(r.applied for r in runs) else EXIT_CLEAN
    return EXIT_LEFT if any(is_problem(f) for r in runs for f in r.findings) else EXIT_CLEAN


def _identity(f: Finding) -> dict[str, Any]:
    return {"code": f.code, "runtime": f.runtime, "namespace": f.namespace, "object": f.object}


def _write_json(runs: Sequence[_Run], *, verb: str, change: bool, fmt: Format) -> None:
    from crifs.fsck.run import Summary

    everything = [f for r in runs for f in r.findings]
    extra: dict[str, Any] = {
        "stores": [{"runtime": r.store.runtime, "root": str(r.store.root)} for r in runs],
        "summary": record(Summary.of(everything)),
    }
    if change:
        extra["repair"] = {
            "applied": [_identity(f) for r in runs for f in r.applied],
            "failed": [dict(_identity(f), error=e) for r in runs for f, e in r.failed],
            "gone": [_identity(f) for r in runs for f in r.gone],
            "refused": [{"runtime": r.store.runtime, "root": str(r.store.root),
                         "error": r.refused} for r in runs if r.refused],
        }
        extra["remaining"] = [record(f) for r in runs for f in r.remaining or []]
    doc = document(verb, "findings", [record(f) for f in everything], **extra)
    write_document(doc, fmt)


def check(
    ctx: typer.Context,
    repair: Annotated[bool, typer.Option("--repair", help="Fix what can be fixed safely.")] = False,
    max_age: MaxAgeOpt = "24h",
    only: OnlyOpt = None,
    no_measure: NoMeasureOpt = False,
) -> None:
    """Check stores for leaked, dangling and broken records, dirs and links (fsck).

    Read-only unless --repair: then the plan is printed, the runtime's locks are taken as a
    writer, every finding is re-checked under them, repaired with a journal, and the store
    checked again. Exit: 0 clean, 1 corrected, 4 problems left, 8 operational error.
    """
    try:
        code = _run(ctx, verb="check", change=repair, max_age=max_age, only=only,
                    no_measure=no_measure)
    except BadInput:
        raise
    except CrifsError as err:
        print(f"crifs: {err}", file=sys.stderr)
        raise typer.Exit(EXIT_OPERATIONAL) from None
    raise typer.Exit(code)


def gc(
    ctx: typer.Context,
    apply: Annotated[bool, typer.Option("--apply", help="Remove the garbage (default: dry run).")
                     ] = False,
    max_age: MaxAgeOpt = "24h",
    only: OnlyOpt = None,
    no_measure: NoMeasureOpt = False,
) -> None:
    """Show (or with --apply remove) what no image, container or lease references.

    The dry run prints the same plan --apply executes, with the exact bytes each item frees.
    """
    raise typer.Exit(_run(ctx, verb="gc", change=apply, max_age=max_age, only=only,
                          no_measure=no_measure))
