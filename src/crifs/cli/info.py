"""``crifs info``: which stores exist, where they live, what holds them, how big they are."""

from __future__ import annotations

import typer

from crifs.cli.common import (
    data_format,
    globals_of,
    stores_of,
)
from crifs.model import RootInfo, StoreInfo
from crifs.report.output import Format, Table, document, write_document
from crifs.report.values import human_size, record


def info(
    ctx: typer.Context,
) -> None:
    """Runtimes and roots found, drivers, filesystem, free space, daemon, counts and sizes."""
    g = globals_of(ctx)
    infos = [st.info() for st in stores_of(g)]
    if g.output in (Format.JSON, Format.YAML, Format.DOT):
        write_document(
            document("info", "stores", [record(i) for i in infos]),
            data_format(g),
        )
        return
    for n, i in enumerate(infos):
        if n:
            print()
        _table(i).render()


def _table(i: StoreInfo) -> Table:
    t = Table(["FIELD", "VALUE"], title=i.runtime)
    t.add("runtime", i.runtime)
    _root_rows(t, "root", i.root)
    if i.state is not None:
        _root_rows(t, "state", i.state)
    t.add("drivers", ", ".join(i.drivers) or "-")
    t.add("config", i.config_path or "-")
    t.add("layout", i.layout or "-")
    running = {True: "yes", False: "no", None: "unknown"}[i.daemon_running]
    t.add("daemon running", running + (f" ({i.daemon_detail})" if i.daemon_detail else ""))
    for name, count in i.counts.items():
        t.add(f"count.{name}", count)
    for name, size in i.total_bytes.items():
        t.add(f"size.{name}", f"{human_size(size)} ({size} bytes)")
    return t


def _root_rows(t: Table, label: str, r: RootInfo) -> None:
    where = r.path + ("" if r.exists else "  (missing)")
    t.add(label, where)
    if r.is_symlink:
        t.add(f"{label}.symlink", f"-> {r.symlink_target} (resolves to {r.resolved or '?'})")
    if r.fs_type:
        t.add(f"{label}.filesystem", r.fs_type)
    if r.free_bytes is not None and r.total_bytes is not None:
        t.add(f"{label}.free", f"{human_size(r.free_bytes)} of {human_size(r.total_bytes)}")
