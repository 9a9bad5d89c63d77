"""``crifs images ls``, ``crifs containers ls``, ``crifs namespaces ls``."""

from __future__ import annotations

import typer

from crifs.cli.common import (
    GLOBAL_EPILOG,
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
            Format.YAML if g.output is Format.YAML else Format.JSON,
        )
        return
    show_rt = len({i.runtime for i in images}) > 1
    show_ns = any(i.namespace for i in images)
    table = Table(
        (["RUNTIME"] if show_rt else [])
        + (["NAMESPACE"] if show_ns else [])
        + ["REF", "IMAGE ID", "DIGEST", "SIZE", "PLATFORMS"]
    )
    for i in images:
        size = human_size(i.size_bytes) if i.size_bytes is not None else "-"
        table.add(
            *([i.runtime] if show_rt else []),
            *([i.namespace or ""] if show_ns else []),
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
            Format.YAML if g.output is Format.YAML else Format.JSON,
        )
        return
    show_rt = len({c.runtime for c in containers}) > 1
    show_ns = any(c.namespace for c in containers)
    table = Table(
        (["RUNTIME"] if show_rt else [])
        + (["NAMESPACE"] if show_ns else [])
        + ["CONTAINER", "NAMES", "IMAGE", "SNAPSHOT", "OCI RUNTIME"]
    )
    for c in containers:
        table.add(
            *([c.runtime] if show_rt else []),
            *([c.namespace or ""] if show_ns else []),
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
            Format.YAML if g.output is Format.YAML else Format.JSON,
        )
        return
    table = Table(["NAME"])
    for _, ns in rows:
        table.add(ns)
    table.render()


def _short(image_id: str) -> str:
    hexpart = image_id.split(":", 1)[-1]
    return hexpart[:12]
