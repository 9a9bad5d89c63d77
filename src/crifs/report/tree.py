"""The snapshot parent tree: as text (rich), nested JSON records, or Graphviz dot.

Parents are matched within one (runtime, namespace, snapshotter). A parent that no record
names is drawn as a placeholder marked missing, so a broken chain is visible, not dropped.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from crifs.errors import CrifsError
from crifs.model import Snapshot, Store, Usage
from crifs.report.values import escape_text, human_size, record

Ident = tuple[str, str | None, str, str]


def ident(s: Snapshot) -> Ident:
    return (s.runtime, s.namespace, s.snapshotter, s.key)


def parent_ident(s: Snapshot) -> Ident | None:
    return None if not s.parent else (s.runtime, s.namespace, s.snapshotter, s.parent)


def usages(pairs: Iterable[tuple[Store, Snapshot]]) -> dict[Ident, Usage | None]:
    """Each snapshot's usage, ``None`` where it cannot be measured (directory gone)."""
    out: dict[Ident, Usage | None] = {}
    for store, snap in pairs:
        try:
            out[ident(snap)] = store.usage(snap)
        except CrifsError:
            out[ident(snap)] = None
    return out


def _children(snaps: list[Snapshot]) -> tuple[list[Ident], dict[Ident, list[Snapshot]], set[Ident]]:
    """Roots (incl. missing parents), children by parent, and the set of missing parents."""
    known = {ident(s) for s in snaps}
    children: dict[Ident, list[Snapshot]] = defaultdict(list)
    roots: list[Ident] = []
    missing: set[Ident] = set()
    for s in snaps:
        p = parent_ident(s)
        if p is None:
            roots.append(ident(s))
            continue
        children[p].append(s)
        if p not in known and p not in missing:
            missing.add(p)
            roots.append(p)
    return roots, children, missing


def nested(snaps: list[Snapshot], sizes: dict[Ident, Usage | None]) -> list[dict[str, Any]]:
    """Trees as nested records: each snapshot's record plus ``usage`` and ``children``."""
    by_ident = {ident(s): s for s in snaps}
    roots, children, missing = _children(snaps)

    def node(i: Ident, seen: frozenset[Ident]) -> dict[str, Any]:
        if i in missing:
            rec: dict[str, Any] = {
                "runtime": i[0],
                "namespace": i[1],
                "snapshotter": i[2],
                "key": escape_text(i[3]),
                "missing": True,
            }
        else:
            u = sizes.get(i)
            rec = record(by_ident[i], usage=record(u) if u else None, missing=False)
        rec["children"] = [
            node(ident(c), seen | {i}) for c in children.get(i, []) if ident(c) not in seen
        ]
        return rec

    return [node(r, frozenset()) for r in roots]


def _label(
    i: Ident, by_ident: dict[Ident, Snapshot], sizes: dict[Ident, Usage | None], missing: set[Ident]
) -> str:
    from rich.markup import escape

    key = escape(escape_text(i[3]))
    if i in missing:
        return f"[red]{key}  (missing)[/red]"
    s = by_ident[i]
    u = sizes.get(i)
    size = human_size(u.disk_bytes) if u else "?"
    return f"{key}  [dim]{s.kind.value}  {size}[/dim]"


def write_tree(snaps: list[Snapshot], sizes: dict[Ident, Usage | None]) -> None:
    from rich.console import Console  # only trees drawn as text need rich: keep start-up light
    from rich.markup import escape
    from rich.tree import Tree

    by_ident = {ident(s): s for s in snaps}
    roots, children, missing = _children(snaps)
    groups: dict[tuple[str, str | None, str], list[Ident]] = defaultdict(list)
    for r in roots:
        groups[(r[0], r[1], r[2])].append(r)
    console = Console(
        file=sys.stdout, highlight=False, width=None if sys.stdout.isatty() else 10**4
    )
    for (runtime, ns, snapshotter), group_roots in groups.items():
        title = f"{runtime} {ns + ' ' if ns else ''}{snapshotter}"
        top = Tree(f"[bold]{escape(escape_text(title))}[/bold]")
        stack = [(top, r, frozenset[Ident]()) for r in reversed(group_roots)]
        while stack:
            parent_node, i, seen = stack.pop()
            branch = parent_node.add(_label(i, by_ident, sizes, missing))
            for c in reversed(children.get(i, [])):
                if ident(c) not in seen:
                    stack.append((branch, ident(c), seen | {i}))
        console.print(top)


def write_dot(snaps: list[Snapshot], sizes: dict[Ident, Usage | None]) -> None:
    """A Graphviz digraph: one node per snapshot, an edge from each child to its parent."""
    by_ident = {ident(s): s for s in snaps}
    _, _, missing = _children(snaps)
    names = {i: f"n{n}" for n, i in enumerate([*by_ident, *sorted(missing, key=str)])}
    out = sys.stdout
    out.write("digraph snapshots {\n  rankdir=BT;\n  node [shape=box, fontname=monospace];\n")
    for i, name in names.items():
        label = escape_text(i[3])
        if i in missing:
            out.write(f'  {name} [label="{_dot(label)}\\n(missing)", color=red];\n')
            continue
        s = by_ident[i]
        u = sizes.get(i)
        extra = f"\\n{s.kind.value}" + (f" {human_size(u.disk_bytes)}" if u else "")
        ns = f"{s.namespace}/" if s.namespace else ""
        out.write(f'  {name} [label="{_dot(ns + label)}{extra}"];\n')
    for s in snaps:
        p = parent_ident(s)
        if p is not None:
            out.write(f"  {names[ident(s)]} -> {names[p]};\n")
    out.write("}\n")


def _dot(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
