"""Options every command shares, defined once, and the glue from options to stores.

Global options (selection, namespace, output format) are declared once, on the root command.
A user may also type them after the verb (``crifs snapshots ls --root R -o json``), as podman
allows: ``hoist_global_options`` moves them in front before parsing, so no command repeats them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Annotated, Any

import typer

from crifs.model import Store
from crifs.report.output import Format
from crifs.stores import Selection, open_stores

RuntimeOpt = Annotated[
    str | None,
    typer.Option(
        "--runtime", metavar="RUNTIME", help="containerd, cstorage or auto (every store found)."
    ),
]
RootOpt = Annotated[
    str | None,
    typer.Option(
        "--root",
        metavar="PATH",
        help="Storage root: containerd root dir or containers/storage graphroot.",
    ),
]
RunrootOpt = Annotated[
    str | None, typer.Option("--runroot", metavar="PATH", help="containers/storage runroot.")
]
StateOpt = Annotated[
    str | None, typer.Option("--state", metavar="PATH", help="containerd state dir.")
]
ConfigOpt = Annotated[
    str | None,
    typer.Option(
        "--config", metavar="FILE", help="containerd config.toml or containers storage.conf."
    ),
]
OutputOpt = Annotated[
    Format | None, typer.Option("--output", "-o", help="Output format.", case_sensitive=False)
]
NamespaceOpt = Annotated[
    str | None,
    typer.Option("--namespace", "-n", metavar="NS", help="containerd namespace (default: all)."),
]
AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address", metavar="SOCK",
        help="containerd's API socket, used to repair a running containerd (default: the "
        "config's [grpc] address, else /run/containerd/containerd.sock).",
    ),
]
SnapshotterOpt = Annotated[
    str | None,
    typer.Option(
        "--snapshotter", metavar="NAME", help="Only this snapshotter/driver (default: all)."
    ),
]


# Options of the root command that take a value, by every spelling.
GLOBAL_VALUE_OPTIONS = frozenset(
    {
        "--runtime",
        "--root",
        "--runroot",
        "--state",
        "--config",
        "-n",
        "--namespace",
        "-o",
        "--output",
        "--lock-timeout",
        "--address",
    }
)


def hoist_global_options(argv: list[str]) -> list[str]:
    """``argv`` with every global option (and its value) moved before the first verb.

    Later occurrences stay later, so the last one given still wins. Nothing after ``--`` moves.
    """
    hoisted: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest.extend(argv[i:])
            break
        name = arg.split("=", 1)[0] if arg.startswith("--") else arg
        if name in GLOBAL_VALUE_OPTIONS:
            takes_next = "=" not in arg and i + 1 < len(argv)
            hoisted.extend(argv[i : i + (2 if takes_next else 1)])
            i += 2 if takes_next else 1
            continue
        if arg.startswith(("-n", "-o")) and len(arg) > 2 and not arg.startswith("--"):
            hoisted.append(arg)  # -nk8s.io, -ojson
            i += 1
            continue
        rest.append(arg)
        i += 1
    return hoisted + rest


GLOBAL_EPILOG = (
    "Global options (--runtime, --root, --runroot, --state, --config, -n/--namespace, "
    "-o/--output, --lock-timeout, --address) may be given here too; see crifs --help."
)


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


@dataclasses.dataclass(frozen=True)
class ScopeColumns:
    """The leading RUNTIME / NAMESPACE / SNAPSHOTTER columns of a table, shown only when the
    listed records differ in them (one store's listing stays as narrow as ctr's)."""

    runtime: bool
    namespace: bool
    snapshotter: bool = False

    @classmethod
    def of(cls, items: Sequence[Any], *, snapshotter: bool = False) -> ScopeColumns:
        return cls(
            runtime=len({i.runtime for i in items}) > 1,
            namespace=any(i.namespace for i in items),
            snapshotter=snapshotter and len({i.snapshotter for i in items}) > 1,
        )

    def headers(self) -> list[str]:
        return (
            (["RUNTIME"] if self.runtime else [])
            + (["NAMESPACE"] if self.namespace else [])
            + (["SNAPSHOTTER"] if self.snapshotter else [])
        )

    def cells(self, item: Any) -> list[str]:
        return (
            ([item.runtime] if self.runtime else [])
            + ([item.namespace or ""] if self.namespace else [])
            + ([item.snapshotter] if self.snapshotter else [])
        )


def data_format(g: Globals) -> Format:
    """The document format for a command with no graph: YAML when asked, else JSON."""
    return Format.YAML if g.output is Format.YAML else Format.JSON


def stores_of(g: Globals) -> list[Store]:
    return open_stores(g.selection)
