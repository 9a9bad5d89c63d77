"""``crifs images ls``, ``crifs containers ls``, ``crifs namespaces ls``."""

from __future__ import annotations

import typer

from crifs.cli.common import (
    GLOBAL_EPILOG,
    ScopeColumns,
    data_format,
    globals_of,
    stores_of,
)
from crifs.report.output import Format, Table, document, write_document
from crifs.report.values import human_size, record

images_app = typer.Typer(help="Image records.", no_args_is_help=True)
containers_app = typer.Typer(help="Container records.", no_args_is_help=True)
namespaces_app = typer.Typer(help="containerd namespaces.", no_args_is_help=True)


@images_app.command("ls", epilog=GLOBAL_EPILOG)
def images_ls(
    ctx: typer.Context,
) -> None:
    """List images: name, type, digest, size and platforms, as ctr/podman show them."""
    g = globals_of(ctx)
    images = [i for st in stores_of(g) for i in st.images(g.namespace)]
    if g.output in (Format.JSON, Format.YAML, Format.DOT):
        write_document(
            document("images", "images", [record(i) for i in images]),
            data_format(g),
        )
        return
    scope = ScopeColumns.of(images)
    table = Table(scope.headers() + ["REF", "IMAGE ID", "DIGEST", "SIZE", "PLATFORMS"])
    for i in images:
        size = human_size(i.size_bytes) if i.size_bytes is not None else "-"
        table.add(
            *scope.cells(i),
            i.name,
            _short(i.id),
            i.digest or "",
            size,
            ",".join(i.platforms),
        )
    table.render()


@containers_app.command("ls", epilog=GLOBAL_EPILOG)
def containers_ls(
    ctx: typer.Context,
) -> None:
    """List containers with their image and rootfs snapshot."""
    g = globals_of(ctx)
    containers = [c for st in stores_of(g) for c in st.containers(g.namespace)]
    if g.output in (Format.JSON, Format.YAML, Format.DOT):
        write_document(
            document("containers", "containers", [record(c) for c in containers]),
            data_format(g),
        )
        return
    scope = ScopeColumns.of(containers)
    table = Table(scope.headers() + ["CONTAINER", "NAMES", "IMAGE", "SNAPSHOT", "OCI RUNTIME"])
    for c in containers:
        table.add(
            *scope.cells(c),
            c.id,
            ",".join(c.names),
            c.image,
            c.snapshot_key or "",
            c.runtime_name or "",
        )
    table.render()


@namespaces_app.command("ls", epilog=GLOBAL_EPILOG)
def namespaces_ls(
    ctx: typer.Context,
) -> None:
    """List containerd namespaces."""
    g = globals_of(ctx)
    rows = [(st.runtime, ns) for st in stores_of(g) for ns in st.namespaces()]
    if g.output in (Format.JSON, Format.YAML, Format.DOT):
        recs = [{"runtime": rt, "name": ns} for rt, ns in rows]
        write_document(
            document("namespaces", "namespaces", recs),
            data_format(g),
        )
        return
    table = Table(["NAME"])
    for _, ns in rows:
        table.add(ns)
    table.render()


def _short(image_id: str) -> str:
    hexpart = image_id.split(":", 1)[-1]
    return hexpart[:12]
