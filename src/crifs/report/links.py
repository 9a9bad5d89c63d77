"""Rendering a link audit: the verdict table and the ``crifs/links/v1`` JSON/YAML document.

The input is one ``TargetReport`` per audited target, already filtered by ``--ignore`` and the
allow-list (that policy lives in the CLI). Rendering never re-reads a layer: a report keeps
only each layer's index, name and ident, so auditing many images does not keep their listings.

Document shape (field names as in /work/shared/conventions.md "A link verdict")::

    {"schema": "crifs/links/v1",
     "targets": [{"target": LABEL, "kind": KIND,
                  "layers": [{"index", "name", "ident"}],
                  "symlinks": N, "suppressed": N,
                  "summary": {VERDICT: COUNT, ...},
                  "links": [{"path", "target", "verdict", "severity", "errno", "resolved",
                             "layer_added", "layer_broken", "fix", "message"}],
                  "hardlinks": [{"code", "severity", "path", "target", "layer", "message"}],
                  "problems": [{"layer", "message"}]}]}

``path``/``resolved`` are rootfs paths starting with ``/``; ``target`` is the link text as
stored. A value that is not UTF-8 is written with ``\\xNN`` escapes and its exact bytes in
``<field>_b64``. ``layer_added``/``layer_broken``/``layer`` are indexes into ``layers``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from crifs.check.links import SEVERITY, HardlinkFinding, LinkVerdict, Verdict
from crifs.fs.listing import LayerListing
from crifs.report.output import Format, Table
from crifs.report.values import add_field, escape_text, is_exact_text, to_jsonable

SCHEMA = "crifs/links/v1"

# Ordering of severities for --fail-on and for sorting rows, most serious last.
SEVERITY_RANK = {"info": 0, "warning": 1, "error": 2}

# Severity of a tolerated problem of a layer (a `../` member name, a duplicate entry): the
# audit went on, but the image is not what its builder meant.
PROBLEM_SEVERITY = "warning"


@dataclass(frozen=True, slots=True)
class LayerInfo:
    """What a report keeps of one layer: enough to name it, not its entries."""

    index: int
    name: str
    ident: str | None
    problems: tuple[str, ...] = ()

    @classmethod
    def of(cls, listing: LayerListing) -> LayerInfo:
        return cls(listing.index, listing.name, listing.ident, tuple(listing.problems))


@dataclass(slots=True)
class TargetReport:
    """One audited target after filtering: what every output format renders.

    ``links`` holds the verdicts to show (``ok`` ones only when asked for); ``summary`` counts
    every verdict that survived the filters, ``ok`` included; ``suppressed`` counts links and
    hard-link findings removed by ``--ignore`` or the allow-list; ``symlinks`` counts every
    symlink audited. ``details``: facts about the target (runtime, namespace, image, path).
    ``error``: why the target could not be audited (then nothing else is filled in).
    """

    label: str
    kind: str
    layers: list[LayerInfo]
    links: list[LinkVerdict] = field(default_factory=list)
    hardlinks: list[HardlinkFinding] = field(default_factory=list)
    summary: dict[str, int] = field(default_factory=dict)
    suppressed: int = 0
    symlinks: int = 0
    details: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    def problems(self) -> list[tuple[int, str]]:
        return [(layer.index, p) for layer in self.layers for p in layer.problems]


def severity_of(verdict: LinkVerdict) -> str | None:
    """``error``/``warning``/``info``, or None for a link that resolves."""
    return SEVERITY.get(verdict.verdict)


def worst_severity(reports: Iterable[TargetReport]) -> str | None:
    """The most serious severity among the findings of ``reports`` (None: nothing found)."""
    worst: str | None = None
    for report in reports:
        found = [severity_of(v) for v in report.links]
        found += [h.severity for h in report.hardlinks]
        if report.problems():
            found.append(PROBLEM_SEVERITY)
        for severity in found:
            if severity is not None and (
                worst is None or SEVERITY_RANK.get(severity, 0) > SEVERITY_RANK.get(worst, 0)
            ):
                worst = severity
    return worst


def rootfs_path(path: bytes) -> str:
    """A rootfs path as text starting with ``/`` (undecodable bytes kept as surrogates)."""
    return "/" + os.fsdecode(path.lstrip(b"/"))


def verdict_order() -> list[Verdict]:
    """Verdicts most serious first, ``ok`` last: the order of groups in the table."""
    return sorted(
        Verdict,
        key=lambda v: (-SEVERITY_RANK.get(SEVERITY.get(v) or "", -1), list(Verdict).index(v)),
    )


# -- JSON / YAML ---------------------------------------------------------------------------


def link_record(verdict: LinkVerdict) -> dict[str, Any]:
    if _UTF8_NAMES:
        # The common case, ~4x faster: every byte field is UTF-8 (so nothing needs an escape
        # or a ``_b64`` sibling) and each path has its one leading "/"; the record is then
        # exactly the one built below.
        try:
            path = verdict.path.decode()
            target = verdict.target.decode()
            resolved = verdict.resolved.decode()
        except UnicodeDecodeError:
            pass
        else:
            if (
                _one_leading_slash(path)
                and _one_leading_slash(resolved)
                and _exact(verdict.message)
                and (verdict.fix is None or _exact(verdict.fix))
            ):
                name = verdict.verdict.value
                return {
                    "path": path,
                    "target": target,
                    "verdict": name,
                    "severity": _SEVERITY_OF[name],
                    "errno": verdict.errno,
                    "resolved": resolved,
                    "layer_added": verdict.layer_added,
                    "layer_broken": verdict.layer_broken,
                    "fix": verdict.fix,
                    "message": verdict.message,
                }
    out: dict[str, Any] = {}
    add_field(out, "path", rootfs_path(verdict.path))
    add_field(out, "target", os.fsdecode(verdict.target))
    out["verdict"] = verdict.verdict.value
    out["severity"] = severity_of(verdict)
    out["errno"] = verdict.errno
    add_field(out, "resolved", rootfs_path(verdict.resolved))
    out["layer_added"] = verdict.layer_added
    out["layer_broken"] = verdict.layer_broken
    add_field(out, "fix", verdict.fix)
    add_field(out, "message", verdict.message)
    return out


# bytes are decoded as UTF-8 (with surrogate escapes) wherever a record is built
_UTF8_NAMES = sys.getfilesystemencoding() == "utf-8" and sys.getfilesystemencodeerrors() == (
    "surrogateescape"
)
_SEVERITY_OF = {verdict.value: severity for verdict, severity in SEVERITY.items()}


def _one_leading_slash(path: str) -> bool:
    """``rootfs_path`` would give ``path`` back unchanged."""
    return path[:1] == "/" and path[1:2] != "/"


def _exact(text: str) -> bool:
    """``is_exact_text`` for the messages and fixes a verdict carries: ASCII, or UTF-8
    without surrogate escapes."""
    return text.isascii() or is_exact_text(text)


def hardlink_record(finding: HardlinkFinding) -> dict[str, Any]:
    out: dict[str, Any] = {"code": finding.code, "severity": finding.severity}
    add_field(out, "path", rootfs_path(finding.path))
    add_field(out, "target", rootfs_path(finding.target) if finding.target else "")
    out["layer"] = finding.layer
    add_field(out, "message", finding.message)
    return out


def target_record(report: TargetReport) -> dict[str, Any]:
    out: dict[str, Any] = {}
    add_field(out, "target", report.label)
    out["kind"] = report.kind
    out["details"] = {name: to_jsonable(value) for name, value in report.details.items()}
    out["error"] = None if report.error is None else escape_text(report.error)
    layers = []
    for layer in report.layers:
        rec: dict[str, Any] = {"index": layer.index}
        add_field(rec, "name", layer.name)
        rec["ident"] = layer.ident
        layers.append(rec)
    out["layers"] = layers
    out["symlinks"] = report.symlinks
    out["suppressed"] = report.suppressed
    out["summary"] = {
        v.value: report.summary[v.value] for v in verdict_order() if v.value in report.summary
    }
    out["links"] = [link_record(v) for v in report.links]
    out["hardlinks"] = [hardlink_record(h) for h in report.hardlinks]
    problems = []
    for index, message in report.problems():
        rec = {"layer": index}
        add_field(rec, "message", message)
        problems.append(rec)
    out["problems"] = problems
    return out


def links_document(reports: Sequence[TargetReport]) -> dict[str, Any]:
    return {"schema": SCHEMA, "targets": [target_record(r) for r in reports]}


def write_links_document(reports: Sequence[TargetReport], fmt: Format, out: TextIO | None = None
                         ) -> None:
    """Write the ``crifs/links/v1`` document as YAML, or as JSON with one link per line.

    Each target's fields go on their own lines and each record of its lists on one line, so
    a large audit stays ``grep``-able and is encoded by the C JSON encoder.
    """
    out = out or sys.stdout
    doc = links_document(reports)
    if fmt is Format.YAML:
        import yaml

        yaml.safe_dump(doc, out, sort_keys=False, allow_unicode=True, width=10**6)
        return
    encode = json.JSONEncoder(ensure_ascii=False).encode
    encode_record = _record_encoder()
    parts = ['{\n  "schema": ', encode(doc["schema"]), ',\n  "targets": [']
    for n, target in enumerate(doc["targets"]):
        parts.append("\n    {" if n == 0 else ",\n    {")
        items = list(target.items())
        for i, (name, value) in enumerate(items):
            sep = "," if i < len(items) - 1 else ""
            if isinstance(value, list) and value and isinstance(value[0], dict):
                rows = ",\n        ".join(map(encode_record, value))
                parts.append(f"\n      {encode(name)}: [\n        {rows}\n      ]{sep}")
            else:
                parts.append(f"\n      {encode(name)}: {encode(value)}{sep}")
        parts.append("\n    }")
    parts.append("\n  ]\n}\n" if doc["targets"] else "]\n}\n")
    out.write("".join(parts))


def _record_encoder() -> Callable[[Any], str]:
    """``JSONEncoder(ensure_ascii=False).encode`` for many records: that method builds a new
    C encoder per call, half the time of encoding 25k short records; this one is built once
    (CPython's ``json.encoder.c_make_encoder``, with the encoder's own settings), else the
    method itself."""
    plain = json.JSONEncoder(ensure_ascii=False)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return plain.encode
    try:
        chunks = make(None, plain.default, json.encoder.encode_basestring, None,
                      plain.key_separator, plain.item_separator, False, False, True)
        probe = {"a": [1, None, 2.5, "\u00e9\n"], "b": True}
        if "".join(chunks(probe, 0)) != plain.encode(probe):
            return plain.encode
    except TypeError:  # another CPython's signature
        return plain.encode
    return lambda record: "".join(chunks(record, 0))


# -- table ---------------------------------------------------------------------------------


def _layer_cell(report: TargetReport, index: int | None) -> str:
    if index is None:
        return ""
    if len(report.layers) <= 1:
        return str(index)
    return f"#{index}"


def write_links_table(
    reports: Sequence[TargetReport], out: TextIO | None = None
) -> None:
    """Per target: a heading, a summary of verdicts with counts, then the rows by verdict."""
    out = out or sys.stdout
    for n, report in enumerate(reports):
        if n:
            out.write("\n")
        _write_target_table(report, out)


def _write_target_table(report: TargetReport, out: TextIO) -> None:
    if report.error is not None:
        out.write(f"{escape_text(report.label)} ({report.kind}): not audited: "
                  f"{escape_text(report.error)}\n")
        return
    layer_word = "layer" if len(report.layers) == 1 else "layers"
    suppressed = f", {report.suppressed} suppressed" if report.suppressed else ""
    out.write(
        f"{escape_text(report.label)} ({report.kind}, {len(report.layers)} {layer_word}, "
        f"{report.symlinks} symlinks{suppressed})\n"
    )
    if len(report.layers) > 1:
        legend = Table(["LAYER", "NAME"])
        for layer in report.layers:
            legend.add(f"#{layer.index}", layer.name)
        legend.render(out)
        out.write("\n")
    summary = Table(["VERDICT", "SEVERITY", "COUNT"])
    for verdict in verdict_order():
        count = report.summary.get(verdict.value, 0)
        if count:
            summary.add(verdict.value, SEVERITY.get(verdict) or "", count)
    hardlink_counts: dict[tuple[str, str], int] = {}
    for finding in report.hardlinks:
        key = (f"hardlink {finding.code}", finding.severity)
        hardlink_counts[key] = hardlink_counts.get(key, 0) + 1
    for (name, severity), count in sorted(hardlink_counts.items()):
        summary.add(name, severity, count)
    if report.problems():
        summary.add("layer problem", PROBLEM_SEVERITY, len(report.problems()))
    if summary.rows:
        summary.render(out)
    else:
        out.write("no symlinks\n")
    order = {v: i for i, v in enumerate(verdict_order())}
    rows = sorted(report.links, key=lambda v: (order[v.verdict], v.path))
    if rows:
        out.write("\n")
        table = Table(["PATH", "TARGET", "VERDICT", "LAYER ADDED", "LAYER BROKEN", "FIX"])
        for v in rows:
            table.add(
                rootfs_path(v.path),
                os.fsdecode(v.target),
                v.verdict.value,
                _layer_cell(report, v.layer_added),
                _layer_cell(report, v.layer_broken),
                v.fix or "",
            )
        table.render(out)
    if report.hardlinks:
        out.write("\n")
        hard = Table(["HARD LINK", "TARGET", "FINDING", "LAYER", "MESSAGE"])
        for h in sorted(report.hardlinks, key=lambda h: (h.code, h.path)):
            hard.add(
                rootfs_path(h.path), rootfs_path(h.target) if h.target else "", h.code,
                _layer_cell(report, h.layer), h.message,
            )
        hard.render(out)
    if report.problems():
        out.write("\n")
        problems = Table(["LAYER", "PROBLEM"])
        for index, message in report.problems():
            problems.add(_layer_cell(report, index), message)
        problems.render(out)
