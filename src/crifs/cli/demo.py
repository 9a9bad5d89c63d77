"""``crifs demo``: build a sandbox store that needs no runtime and show the inventory on it."""

from __future__ import annotations

from typing import Annotated

import typer


def demo(
    directory: Annotated[
        str | None,
        typer.Option("--dir", metavar="DIR", help="Build the sandbox here (default: a temp dir)."),
    ] = None,
) -> None:
    """Build a sandbox containerd + containers/storage store and run the inventory on it."""
    from crifs.demo import run_demo

    code = run_demo(directory)
    if code:
        raise typer.Exit(code)
