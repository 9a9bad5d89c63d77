"""The ``crifs`` command: option parsing, the one error wrapper, exit codes.

``main(argv)`` returns the exit status instead of exiting, so tests run it in-process.
Exit codes: 0 success, 1 the thing asked for does not hold or was not found, 2 bad input or
usage (one line on stderr naming the file and the problem), 8 a bug in crifs.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Sequence
from typing import Annotated

import typer

from crifs import __version__
from crifs.cli import common
from crifs.cli.common import (
    AddressOpt,
    ConfigOpt,
    NamespaceOpt,
    OutputOpt,
    RootOpt,
    RunrootOpt,
    StateOpt,
)
from crifs.errors import CrifsError
from crifs.report.output import Format
from crifs.stores import Selection

app = typer.Typer(
    name="crifs",
    help="fsck and x-ray for container storage (containerd, CRI-O, podman).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        print(f"crifs {__version__}")
        raise typer.Exit()


@app.callback()
def _globals(
    ctx: typer.Context,
    runtime: Annotated[
        str, typer.Option("--runtime", metavar="RUNTIME", help="containerd, cstorage or auto.")
    ] = "auto",
    root: RootOpt = None,
    runroot: RunrootOpt = None,
    state: StateOpt = None,
    config: ConfigOpt = None,
    namespace: NamespaceOpt = None,
    output: OutputOpt = None,
    lock_timeout: Annotated[
        float,
        typer.Option(
            "--lock-timeout", metavar="SECONDS", help="Seconds to wait for a store's read locks."
        ),
    ] = 10.0,
    address: AddressOpt = None,
    version: Annotated[
        bool | None, typer.Option("--version", callback=_version, is_eager=True)
    ] = None,
) -> None:
    ctx.obj = common.Globals(
        selection=Selection(
            runtime=runtime,
            root=root,
            runroot=runroot,
            state=state,
            config=config,
            lock_timeout=lock_timeout,
            address=address,
        ),
        output=output or Format.TABLE,
        namespace=namespace,
    )


def _register() -> None:
    from crifs.cli import check, demo, info, inventory, links, snapshots

    app.add_typer(snapshots.app, name="snapshots")
    app.add_typer(inventory.images_app, name="images")
    app.add_typer(inventory.containers_app, name="containers")
    app.add_typer(inventory.namespaces_app, name="namespaces")
    app.command("info", epilog=common.GLOBAL_EPILOG)(info.info)
    app.command("links", epilog=common.GLOBAL_EPILOG)(links.links)
    app.command("check", epilog=common.GLOBAL_EPILOG)(check.check)
    app.command("gc", epilog=common.GLOBAL_EPILOG)(check.gc)
    app.command("demo")(demo.demo)


_register()


def main(argv: Sequence[str] | None = None) -> int:
    """Run crifs with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    # A command builds its objects once and exits: the cyclic collector would only re-scan
    # them (20% of a 10,000-snapshot listing), so it stays off for the command's lifetime.
    gc.disable()
    command = typer.main.get_command(app)
    try:
        result = command.main(
            args=common.hoist_global_options(list(sys.argv[1:] if argv is None else argv)),
            prog_name="crifs",
            standalone_mode=False,
        )
    except CrifsError as err:
        _error(str(err))
        return err.exit_code
    except typer.Abort:
        _error("aborted")
        return 130
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except BrokenPipeError:
        # Output was cut short by the reader (``| head``): not an error of ours.
        sys.stderr.close()
        return 0
    except Exception as err:
        usage = _usage_error(err)
        if usage is not None:
            print(usage, file=sys.stderr)
            return 2
        # A bug: say so in one line unless asked for the traceback.
        if os.environ.get("CRIFS_DEBUG"):
            raise
        _error(f"internal error: {type(err).__name__}: {err} (set CRIFS_DEBUG=1 for a traceback)")
        return 8
    return result if isinstance(result, int) else 0


def _usage_error(err: Exception) -> str | None:
    """The message for a command-line usage error, or None if ``err`` is not one.

    Recognised by shape: typer vendors its own copy of click, so its exception classes differ
    between typer versions and cannot be imported from one stable place.
    """
    format_message = getattr(err, "format_message", None)
    if format_message is None or not hasattr(err, "exit_code"):
        return None
    if type(err).__name__ == "NoArgsIsHelpError":
        return str(format_message())  # the help text itself
    return f"crifs: {format_message()} (see crifs --help)"


def _error(message: str) -> None:
    print(f"crifs: {message}", file=sys.stderr)


def run() -> None:
    sys.exit(main())
