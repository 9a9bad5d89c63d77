"""Rendering store-check findings: the table, the summary line, the repair plan.

The JSON shape (``crifs/check/v1``, ``crifs/gc/v1``) is built by the CLI from ``record()`` of
each finding; this module only writes what people read.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TextIO

from crifs.fsck.findings import Finding, Reclaimable
from crifs.fsck.run import Summary
from crifs.model import CONTAINERD, Store
from crifs.repair.actions import ApiCall
from crifs.report.output import Table
from crifs.report.values import escape_text, human_size, record

_ACTION_VERBS = {
    "remove": "remove {path}",
    "symlink": "link {path} -> {target}",
    "write": "write {path}",
    "mkdir": "mkdir {path}",
    "delete_layer": "delete layer {layer_id}",
    "delete_image": "delete image {image_id}",
    "drop_mount_record": "drop mount record of layer {layer_id}",
}


def size_cell(r: Reclaimable | None) -> str:
    return "" if r is None else human_size(r.disk_bytes)


def write_table(findings: Sequence[Finding], out: TextIO | None = None) -> None:
    runtimes = len({f.runtime for f in findings}) > 1
    namespaces = any(f.namespace for f in findings)
    table = Table(
        ["SEVERITY", "CODE"] + (["RUNTIME"] if runtimes else [])
        + (["NAMESPACE"] if namespaces else []) + ["OBJECT", "RECLAIMABLE", "MESSAGE"]
    )
    for f in findings:
        table.add(
            f.severity.value, f.code, *([f.runtime] if runtimes else []),
            *([f.namespace or ""] if namespaces else []),
            f.object, size_cell(f.reclaimable), f.message,
        )
    table.render(out)


def summary_line(summary: Summary, *, what: str = "finding") -> str:
    r = summary.reclaimable
    if not summary.findings:
        return f"no {what}s: the store is clean"
    plural = "" if summary.findings == 1 else "s"
    parts = [f"{summary.findings} {what}{plural} ({summary.errors} error, "
             f"{summary.warnings} warning, {summary.info} info)"]
    parts.append(f"reclaimable {human_size(r.disk_bytes)} on disk ({r.disk_bytes} bytes, "
                 f"{r.inodes} inodes)")
    parts.append(f"{summary.repairable} repairable by crifs, {summary.manual} by command")
    return "; ".join(parts)


def action_text(action: Any) -> str:
    fields = {k: escape_text(str(v)) for k, v in record(action).items()}
    return _ACTION_VERBS.get(fields.get("action", ""), "{action}").format(**fields)


def call_text(call: ApiCall) -> str:
    """``snapshots.Remove snapshotter=overlayfs key=K (namespace default)``."""
    fields = " ".join(f"{k}={escape_text(v)}" for k, v in call.fields if k != "data")
    return f"{call.service}.{call.method} {fields} (namespace {escape_text(call.namespace)})"


def _live_lines(f: Finding, size: str) -> list[str]:
    """What a repair of a running containerd does about ``f``: its API calls."""
    assert f.repair is not None
    if not f.repair.calls:
        if f.repair.actions:
            return [f"{f.code:<4} left while containerd runs: "
                    f"{action_text(f.repair.actions[0])}{size}"]
        return [f"{f.code:<4} run: {escape_text(c)}" for c in f.repair.commands] or \
            [f"{f.code:<4} {escape_text(f.repair.summary)}"]
    # Imported here: a containers/storage check must not load containerd's readers.
    from crifs.containerd.snapshot_index import is_gc_trigger

    lines = [f"{f.code:<4} api: {call_text(c)}" for c in f.repair.calls if not is_gc_trigger(c)]
    if len(lines) < len(f.repair.calls):
        lines.append(f"{f.code:<4} containerd's GC collects {escape_text(f.path or f.object)}")
    lines[0] += size
    return lines


def plan_lines(findings: Sequence[Finding], *, gc_only: bool = False,
               live: bool = False) -> list[str]:
    """One line per step a repair would take (or command a user must run), children first.
    ``live``: containerd runs, so its findings are repaired through its API calls."""
    lines: list[str] = []
    with_repair = [f for f in findings if f.repair is not None and (f.repair.gc or not gc_only)]
    ordered = sorted(with_repair, key=lambda f: f.repair.order if f.repair else 0)
    through_api = False
    for f in ordered:
        assert f.repair is not None
        size = f" ({size_cell(f.reclaimable)})" if f.reclaimable else ""
        if live and f.runtime == CONTAINERD:
            lines += _live_lines(f, size)
            through_api = through_api or bool(f.repair.calls)
            continue
        for action in f.repair.actions:
            lines.append(f"{f.code:<4} {action_text(action)}{size}")
            size = ""
        for command in f.repair.commands:
            lines.append(f"{f.code:<4} run: {escape_text(command)}")
        if not f.repair.actions and not f.repair.commands:
            lines.append(f"{f.code:<4} {escape_text(f.repair.summary)}")
    if through_api:
        lines.append("then one synchronous containerd GC (leases.Create + leases.Delete sync): "
                     "prunes records, snapshot dirs and blob files nothing names")
    return lines


def write_plan(store: Store, findings: Sequence[Finding], *, gc_only: bool = False,
               out: TextIO | None = None, live: bool = False) -> None:
    out = out or sys.stdout
    lines = plan_lines(findings, gc_only=gc_only, live=live)
    if not lines:
        return
    out.write(f"plan for {store.runtime} {escape_text(str(store.root))}:\n")
    for line in lines:
        out.write(f"  {line}\n")
