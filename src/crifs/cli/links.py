"""``crifs links TARGET...``: every symlink and hard link, resolved as the kernel would in the
container, with the layer that added it, the layer that broke it and a fix.

Policy that is not the engine's lives here: ``--ignore`` globs and the allow-list drop findings
before anything is rendered, and ``--fail-on`` turns what is left into the exit status:
0 nothing at or above the threshold, 1 findings at or above it, 2 bad input (a target that
does not exist counts as bad input here, so 1 always means findings; with several targets,
one that cannot be read is reported, the others are audited, and the exit status is 2).
"""

from __future__ import annotations

import fnmatch
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from crifs.cli.common import Globals, globals_of
from crifs.errors import BadInput, CrifsError, NotFound
from crifs.report.output import Format
from crifs.report.values import escape_text

if TYPE_CHECKING:
    # The engine and the report modules are imported when `links` runs, not when the CLI
    # starts: other verbs should not pay for libarchive and the resolver.
    from crifs.check.links import HardlinkFinding, LinkAudit
    from crifs.check.targets import AuditTarget
    from crifs.report.links import TargetReport


class FailOn(StrEnum):
    ERROR = "error"
    WARNING = "warning"
    NEVER = "never"


@dataclass(frozen=True, slots=True)
class AllowRule:
    """One allow-list line: a glob on the rootfs path, optionally only for one verdict/code."""

    glob: str
    verdict: str | None
    line: int


def _rooted(glob: str) -> str:
    # Users write "usr/share/doc/*" as often as "/usr/share/doc/*"; both mean the rootfs path.
    return glob if glob.startswith(("/", "*", "?", "[")) else "/" + glob


def _finding_names() -> set[str]:
    from crifs.check.links import Verdict
    from crifs.report.sarif import HARDLINK_CODES

    return {v.value for v in Verdict} | set(HARDLINK_CODES)


# A comment starts at a "#" that begins the line or follows white space, so a glob may
# still hold a "#" (paths do).
_COMMENT = re.compile(rb"(?:^|\s)#.*$")
_REDRAW_EVERY = 0.1  # seconds between two redraws of the bar while a target is read


def read_allow_list(path: Path) -> list[AllowRule]:
    """Parse an allow-list: one ``GLOB [VERDICT]`` per line, ``#`` comments, blank lines.

    ``VERDICT`` is a link verdict (``runtime_provided``) or a hard-link code
    (``cross_layer``); without it every finding on a matching path is allowed. A glob holding
    a space is written with ``?`` or ``[ ]``. The file is read as bytes, so a glob may hold
    the exact undecodable bytes of a path.
    """
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise BadInput(f"cannot read allow-list: {err.strerror}", path=path) from None
    known = _finding_names()
    rules: list[AllowRule] = []
    for number, line_bytes in enumerate(raw.splitlines(), start=1):
        text = os.fsdecode(_COMMENT.sub(b"", line_bytes)).strip()
        if not text:
            continue
        words = text.split()
        if len(words) > 2:
            raise BadInput(
                f"line {number}: expected 'GLOB [VERDICT]', got {len(words)} words "
                "(write a space in a glob as '?')",
                path=path,
            )
        verdict = words[1] if len(words) == 2 else None
        if verdict is not None and verdict not in known:
            raise BadInput(
                f"line {number}: unknown verdict {verdict!r} (known: {', '.join(sorted(known))})",
                path=path,
            )
        rules.append(AllowRule(_rooted(words[0]), verdict, number))
    return rules


@dataclass(slots=True)
class FindingFilter:
    """``--ignore`` globs and allow-list rules, matched with fnmatch on the rootfs path.

    fnmatch's ``*`` also matches ``/``, so ``/usr/share/doc/*`` covers the whole subtree.
    """

    ignore: Sequence[str] = ()
    allow: Sequence[AllowRule] = ()

    def __bool__(self) -> bool:
        return bool(self.ignore or self.allow)

    def drops(self, path: bytes, code: str) -> bool:
        text = "/" + os.fsdecode(path.lstrip(b"/"))
        if any(fnmatch.fnmatchcase(text, glob) for glob in self.ignore):
            return True
        return any(
            (rule.verdict is None or rule.verdict == code) and fnmatch.fnmatchcase(text, rule.glob)
            for rule in self.allow
        )


def build_report(
    target: AuditTarget,
    result: LinkAudit,
    keep: FindingFilter,
    *,
    show_ok: bool,
) -> TargetReport:
    """Filter one audit into the report every output format renders.

    Ok links are never filtered (they are not findings) and are kept only with ``show_ok``;
    the summary counts them either way.
    """
    from crifs.report.links import LayerInfo, TargetReport

    report = TargetReport(
        label=target.label,
        kind=target.kind,
        layers=[LayerInfo.of(layer) for layer in result.layers],
        symlinks=result.symlinks,
        details=dict(target.details),
    )
    summary = report.summary
    if result.ok_left_out:
        summary["ok"] = result.ok_left_out
    for verdict in result.verdicts:
        name = verdict.verdict.value
        is_ok = name == "ok"
        if keep and not is_ok and keep.drops(verdict.path, name):
            report.suppressed += 1
            continue
        summary[name] = summary.get(name, 0) + 1
        if show_ok or not is_ok:
            report.links.append(verdict)
    hardlinks: list[HardlinkFinding] = []
    for finding in result.hardlinks:
        if keep and keep.drops(finding.path, finding.code):
            report.suppressed += 1
        else:
            hardlinks.append(finding)
    report.hardlinks = hardlinks
    return report


def exit_status(reports: Sequence[TargetReport], fail_on: FailOn) -> int:
    """0 when no finding reaches ``fail_on``, else 1."""
    from crifs.report.links import SEVERITY_RANK, worst_severity

    if fail_on is FailOn.NEVER:
        return 0
    worst = worst_severity(reports)
    if worst is None:
        return 0
    return 1 if SEVERITY_RANK.get(worst, 0) >= SEVERITY_RANK[fail_on.value] else 0


class _Progress:
    """Progress on stderr while targets are read and resolved; silent unless stderr is a
    terminal, so scripts and CI logs see nothing. One bar counts targets, one the symlinks
    of the target being resolved.

    Redrawn on each update, never by rich's refresh thread: with a second thread running,
    the walk and the judge do not fork their helper (``crifs.fs.forked``: a forked child
    gets only the calling thread), which made an audit in a terminal a third slower."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._targets_task: Any = None
        self._links_task: Any = None
        self._label = ""
        self._drawn = 0.0  # time.monotonic() of the last redraw of a running count

    def __enter__(self) -> _Progress:
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                console=Console(file=sys.stderr),
                transient=True,
                auto_refresh=False,
            )
            self._bar.start()
            self._targets_task = self._bar.add_task("targets", total=None)
            self._bar.refresh()
        return self

    def targets(self, count: int) -> None:
        """How many targets there are, once they are resolved."""
        if self._bar is not None:
            self._bar.update(self._targets_task, total=count)
            self._bar.refresh()

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def reading(self, label: str) -> None:
        self._label = escape_text(label)
        if self._bar is not None:
            self._bar.update(self._targets_task, description=f"reading {self._label}")
            self._bar.refresh()

    def reading_layer(self, position: int, layers: int, read: int) -> None:
        """A ``LayerProgress``: how far the reading of the current target is."""
        if self._bar is None or self._too_soon():
            return
        layer = f"layer {position + 1}/{layers}, " if layers > 1 else ""
        self._bar.update(
            self._targets_task, description=f"reading {self._label}: {layer}{read:,} entries"
        )
        self._bar.refresh()

    def resolving(self, done: int, total: int) -> None:
        if self._bar is None:
            return
        if self._links_task is None:
            self._links_task = self._bar.add_task("symlinks", total=total)
        self._bar.update(self._links_task, completed=done, total=total)
        if done >= total or not self._too_soon():
            self._bar.refresh()

    def _too_soon(self) -> bool:
        """Whether the last redraw of a running count was less than ``_REDRAW_EVERY`` ago
        (else the time of this one is noted)."""
        now = time.monotonic()
        if now - self._drawn < _REDRAW_EVERY:
            return True
        self._drawn = now
        return False

    def target_done(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._targets_task)
            if self._links_task is not None:
                self._bar.remove_task(self._links_task)
                self._links_task = None
            self._bar.refresh()


def _resolve_all(
    specs: Sequence[str | None], g: Globals, all_images: bool, progress: _Progress
) -> list[AuditTarget]:
    from crifs.check.targets import resolve_targets

    targets: list[AuditTarget] = []
    try:
        for spec in specs:
            if spec:  # a tar is read while it is resolved (image archive or rootfs?)
                progress.reading(spec)
            targets += resolve_targets(
                spec,
                g.selection,
                all_images=all_images,
                namespace=g.namespace,
                progress=progress.reading_layer,
            )
    except NotFound as err:
        # For links, exit 1 means findings: a target that is not there is bad input.
        raise BadInput(err.message, path=err.path) from None
    progress.targets(len(targets))
    return targets


def _audit_one(target: AuditTarget, progress: _Progress, show_ok: bool) -> LinkAudit:
    from crifs.check.links import audit

    progress.reading(target.label)
    try:
        layers = target.load(progress.reading_layer)
    except NotFound as err:
        raise BadInput(err.message, path=err.path) from None
    result = audit(layers, progress=progress.resolving, keep_ok=show_ok)
    progress.target_done()
    return result


def _audit_all(
    targets: Sequence[AuditTarget], keep: FindingFilter, show_ok: bool, progress: _Progress
) -> list[TargetReport]:
    """A report per target. With one target its error propagates (exit 2, one line); with
    several, a target that cannot be read is reported as such and the others are audited,
    so one broken image of ``--all-images`` does not hide the rest."""
    from crifs.report.links import TargetReport

    reports: list[TargetReport] = []
    for target in targets:
        # One target at a time: only its filtered report outlives the listings (and
        # the bounded layer cache of --all-images).
        try:
            result = _audit_one(target, progress, show_ok)
        except CrifsError as err:
            if len(targets) == 1:
                raise
            print(f"crifs: {target.label}: {err}", file=sys.stderr)
            reports.append(
                TargetReport(
                    target.label, target.kind, [], error=str(err), details=dict(target.details)
                )
            )
            continue
        report = build_report(target, result, keep, show_ok=show_ok)
        del result
        reports.append(report)
    return reports


def links(
    ctx: typer.Context,
    targets: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="TARGET",
            help="A rootfs dir, an OCI layout dir, an OCI/docker-save tar, or image:REF, "
            "snapshot:KEY, layer:ID, container:ID in a store.",
            show_default=False,
        ),
    ] = None,
    all_images: Annotated[
        bool, typer.Option("--all-images", help="Audit every image of the selected stores.")
    ] = False,
    fail_on: Annotated[
        FailOn,
        typer.Option(
            "--fail-on",
            case_sensitive=False,
            help="Exit 1 when a finding has at least this severity.",
        ),
    ] = FailOn.ERROR,
    ignore: Annotated[
        list[str] | None,
        typer.Option("--ignore", metavar="GLOB", help="Skip findings on matching paths."),
    ] = None,
    allow_list: Annotated[
        Path | None,
        typer.Option(
            "--allow-list",
            metavar="FILE",
            help="File of 'GLOB [VERDICT]' lines whose findings are accepted.",
        ),
    ] = None,
    show_ok: Annotated[
        bool, typer.Option("--show-ok", help="Also list links that resolve.")
    ] = False,
) -> int:
    """Resolve every symlink and hard link as the kernel would inside the container."""
    g = globals_of(ctx)
    specs = list(targets or [])
    if not specs and not all_images:
        raise BadInput(
            "no TARGET given (a rootfs dir, OCI layout, tar, image:REF, ...; or --all-images)"
        )
    keep = FindingFilter(
        ignore=[_rooted(glob) for glob in ignore or []],
        allow=read_allow_list(allow_list) if allow_list is not None else [],
    )
    with _Progress() as progress:
        targets_found = _resolve_all(specs or [None], g, all_images, progress)
        reports = _audit_all(targets_found, keep, show_ok, progress)
    from crifs.report import links as links_report

    if g.output is Format.SARIF:
        from crifs.report.sarif import write_sarif

        write_sarif(reports)
    elif g.output in (Format.JSON, Format.YAML):
        links_report.write_links_document(reports, g.output)
    else:
        links_report.write_links_table(reports)
    if any(r.error is not None for r in reports):
        return BadInput.exit_code
    return exit_status(reports, fail_on)
