"""``crifs snapshots ls|tree|info|usage|mounts``: containerd snapshots and c/storage layers."""

from __future__ import annotations

from typing import Annotated

import typer

from crifs.cli.common import (
    GLOBAL_EPILOG,
    ScopeColumns,
    SnapshotterOpt,
    globals_of,
    stores_of,
)
from crifs.errors import BadInput, NotFound
from crifs.model import Snapshot, Store, find_snapshot
from crifs.report import tree as tree_report
from crifs.report.output import Format, Table, document, write_document
from crifs.report.values import human_size, record

app = typer.Typer(
    help="Snapshots (containerd) and layers (containers/storage).", no_args_is_help=True
)

KeyArg = Annotated[str, typer.Argument(help="Snapshot key, snapshotter id or layer id.")]


def _listing(
    stores: list[Store], namespace: str | None, snapshotter: str | None
) -> list[tuple[Store, Snapshot]]:
    return [(st, s) for st in stores for s in st.snapshots(namespace, snapshotter)]


def _one(
    stores: list[Store], key: str, namespace: str | None, snapshotter: str | None
) -> tuple[Store, Snapshot]:
    found = [
        (st, s) for st in stores for s in find_snapshot(st.snapshots(namespace, snapshotter), key)
    ]
    if not found:
        where = f" in namespace {namespace}" if namespace else ""
        raise NotFound(f"snapshot {key!r} not found{where}")
    if len(found) > 1:
        places = ", ".join(
            sorted({f"{s.runtime}/{s.namespace or '-'}/{s.snapshotter}" for _, s in found})
        )
        raise BadInput(f"snapshot {key!r} is ambiguous ({places}); use -n/--snapshotter/--runtime")
    return found[0]


@app.command("ls", epilog=GLOBAL_EPILOG)
def ls(
    ctx: typer.Context,
    snapshotter: SnapshotterOpt = None,
) -> None:
    """List snapshots: KEY PARENT KIND, as ctr snapshots ls does, for every namespace."""
    g = globals_of(ctx)
    pairs = _listing(stores_of(g), g.namespace, snapshotter)
    if g.output in (Format.JSON, Format.YAML):
        recs = [record(s) for _, s in pairs]
        write_document(document("snapshots", "snapshots", recs), g.output)
        return
    if g.output is Format.DOT:
        tree_report.write_dot([s for _, s in pairs], {})
        return
    scope = ScopeColumns.of([s for _, s in pairs], snapshotter=True)
    table = Table(scope.headers() + ["KEY", "PARENT", "KIND"])
    for _, s in pairs:
        table.add(*scope.cells(s), s.key, s.parent or "", s.kind.value)
    table.render()


@app.command("tree", epilog=GLOBAL_EPILOG)
def tree(
    ctx: typer.Context,
    snapshotter: SnapshotterOpt = None,
) -> None:
    """Show the parent links as a tree, with each snapshot's own size."""
    g = globals_of(ctx)
    pairs = _listing(stores_of(g), g.namespace, snapshotter)
    sizes = tree_report.usages(pairs)
    snaps = [s for _, s in pairs]
    if g.output is Format.DOT:
        tree_report.write_dot(snaps, sizes)
    elif g.output in (Format.JSON, Format.YAML):
        write_document(
            document("snapshot-tree", "trees", tree_report.nested(snaps, sizes)), g.output
        )
    else:
        tree_report.write_tree(snaps, sizes)


@app.command("info", epilog=GLOBAL_EPILOG)
def info(
    ctx: typer.Context,
    key: KeyArg,
    snapshotter: SnapshotterOpt = None,
) -> None:
    """Everything recorded about one snapshot."""
    g = globals_of(ctx)
    _, snap = _one(stores_of(g), key, g.namespace, snapshotter)
    if g.output in (Format.JSON, Format.YAML):
        write_document(document("snapshots", "snapshots", [record(snap)]), g.output)
        return
    table = Table(["FIELD", "VALUE"])
    for name, value in record(snap).items():
        if isinstance(value, dict):
            if not value:
                table.add(name, "")
            for k, v in value.items():
                table.add(f"{name}.{k}", v)
        else:
            table.add(name, "" if value is None else value)
    table.render()


@app.command("usage", epilog=GLOBAL_EPILOG)
def usage(
    ctx: typer.Context,
    keys: Annotated[list[str] | None, typer.Argument(help="Keys (default: all).")] = None,
    raw_bytes: Annotated[bool, typer.Option("--bytes", "-b", help="Sizes in bytes.")] = False,
    snapshotter: SnapshotterOpt = None,
) -> None:
    """Disk usage of each snapshot's own directory: measured for active, stored for committed."""
    g = globals_of(ctx)
    stores = stores_of(g)
    if keys:
        pairs = [_one(stores, k, g.namespace, snapshotter) for k in keys]
    else:
        pairs = _listing(stores, g.namespace, snapshotter)
    rows = [(s, st.usage(s)) for st, s in pairs]
    if g.output in (Format.JSON, Format.YAML):
        recs = [
            {
                "runtime": s.runtime,
                "namespace": s.namespace,
                "snapshotter": s.snapshotter,
                "key": record(s)["key"],
                "kind": s.kind.value,
                **record(u),
            }
            for s, u in rows
        ]
        write_document(document("usage", "usage", recs), g.output)
        return
    show_ns = ScopeColumns.of([s for _, s in pairs]).namespace
    table = Table((["NAMESPACE"] if show_ns else []) + ["KEY", "SIZE", "INODES"])
    for s, u in rows:
        size = str(u.disk_bytes) if raw_bytes else human_size(u.disk_bytes)
        table.add(*([s.namespace or ""] if show_ns else []), s.key, size, u.inodes)
    table.render()


@app.command("mounts", epilog=GLOBAL_EPILOG)
def mounts(
    ctx: typer.Context,
    key: KeyArg,
    target: Annotated[str, typer.Argument(help="Where the mount would go.")],
    snapshotter: SnapshotterOpt = None,
) -> None:
    """Print the mount command the runtime would run for KEY at TARGET (nothing is mounted)."""
    g = globals_of(ctx)
    store, snap = _one(stores_of(g), key, g.namespace, snapshotter)
    mounts = store.mounts(snap)
    if g.output in (Format.JSON, Format.YAML):
        recs = [record(m, command=m.command(target)) for m in mounts]
        doc = document("mounts", "mounts", recs, key=record(snap)["key"], target=target)
        write_document(doc, g.output)
        return
    for m in mounts:
        print(m.command(target))
