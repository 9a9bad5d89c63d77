"""Options every command shares, defined once, and the glue from options to stores.

Selection options (``--runtime``, ``--root``, ``--runroot``, ``--state``, ``--config``) and the
output format may be given before the verb (``crifs --root R snapshots ls``) or after it
(``crifs snapshots ls --root R``); the later one wins.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer

from crifs.model import Store
from crifs.report.output import Format
from crifs.stores import Selection, open_stores

RuntimeOpt = Annotated[
    str | None,
    typer.Option("--runtime", help="containerd, cstorage or auto (every store found)."),
]
RootOpt = Annotated[
    str | None,
    typer.Option(
        "--root", help="Storage root: containerd root dir or containers/storage graphroot."
    ),
]
RunrootOpt = Annotated[str | None, typer.Option("--runroot", help="containers/storage runroot.")]
StateOpt = Annotated[str | None, typer.Option("--state", help="containerd state dir.")]
ConfigOpt = Annotated[
    str | None,
    typer.Option("--config", help="containerd config.toml or containers storage.conf."),
]
OutputOpt = Annotated[
    Format | None, typer.Option("--output", "-o", help="Output format.", case_sensitive=False)
]
NamespaceOpt = Annotated[
    str | None,
    typer.Option("--namespace", "-n", help="containerd namespace (default: all)."),
]
SnapshotterOpt = Annotated[
    str | None,
    typer.Option("--snapshotter", help="Only this snapshotter/driver (default: all)."),
]


@dataclasses.dataclass
class Globals:
    selection: Selection = dataclasses.field(default_factory=Selection)
    output: Format = Format.TABLE
    namespace: str | None = None


def globals_of(ctx: typer.Context) -> Globals:
    root = ctx.find_root()
    if not isinstance(root.obj, Globals):
        root.obj = Globals()
    return root.obj


def resolve(
    ctx: typer.Context,
    *,
    runtime: str | None = None,
    root: str | None = None,
    runroot: str | None = None,
    state: str | None = None,
    config: str | None = None,
    output: Format | None = None,
    namespace: str | None = None,
) -> Globals:
    """Globals with the command's own options laid over the ones given before the verb."""
    g = globals_of(ctx)
    base = g.selection
    selection = dataclasses.replace(
        base,
        runtime=runtime if runtime is not None else base.runtime,
        root=root if root is not None else base.root,
        runroot=runroot if runroot is not None else base.runroot,
        state=state if state is not None else base.state,
        config=config if config is not None else base.config,
    )
    return Globals(
        selection=selection,
        output=output or g.output,
        namespace=namespace if namespace is not None else g.namespace,
    )


def stores_of(g: Globals) -> list[Store]:
    return open_stores(g.selection)
