"""Finding and opening the stores a command works on.

``--runtime auto`` opens every store it finds: with ``--root``, the one store whose layout the
root has; without, the runtimes' default (or configured) roots that exist on this host.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass

from crifs.errors import BadInput, CrifsError, NotFound
from crifs.model import CONTAINERD, CSTORAGE, Store

AUTO = "auto"


@dataclass(frozen=True, slots=True)
class Selection:
    """What the user pointed crifs at (the global options)."""

    runtime: str = AUTO
    root: str | None = None
    runroot: str | None = None
    state: str | None = None
    config: str | None = None
    lock_timeout: float = 10.0
    address: str | None = None  # containerd's API socket (None: the config's, else default)


def open_stores(sel: Selection) -> list[Store]:
    """The stores ``sel`` names, opened. A root that is missing or holds no store is bad input."""
    runtimes = _runtimes_for(sel)
    stores: list[Store] = []
    for runtime in runtimes:
        try:
            stores.append(_open(runtime, sel))
        except NotFound as err:
            raise BadInput(err.message, path=err.path) from None
    return stores


def _runtimes_for(sel: Selection) -> list[str]:
    from crifs import containerd, cstorage

    if sel.runtime in (CONTAINERD, CSTORAGE):
        return [sel.runtime]
    if sel.runtime != AUTO:
        raise BadInput(f"unknown runtime {sel.runtime!r} (use containerd, cstorage or auto)")
    if sel.config:
        return [_runtime_of_config(sel.config)]
    if sel.root:
        if not os.path.lexists(sel.root):
            raise BadInput("storage root does not exist", path=sel.root)
        found = [
            name
            for name, mod in ((CONTAINERD, containerd), (CSTORAGE, cstorage))
            if mod.detect(root=sel.root)
        ]
        if not found:
            raise BadInput(
                "neither a containerd root nor a containers/storage graphroot", path=sel.root
            )
        return found
    found = [name for name, mod in ((CONTAINERD, containerd), (CSTORAGE, cstorage)) if mod.detect()]
    if not found:
        raise BadInput(
            "no container store found in the default locations "
            "(/var/lib/containerd, /var/lib/containers/storage); use --root or --config"
        )
    return found


def _runtime_of_config(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise BadInput("config file does not exist", path=path) from None
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise BadInput(f"cannot read config: {err}", path=path) from None
    if "storage" in data:
        return CSTORAGE
    if any(k in data for k in ("root", "state", "plugins", "grpc", "version")):
        return CONTAINERD
    raise BadInput("neither a containerd config.toml nor a storage.conf", path=path)


def _open(runtime: str, sel: Selection) -> Store:
    if runtime == CONTAINERD:
        from crifs.containerd import open_store as open_containerd

        return open_containerd(root=sel.root, state=sel.state, config=sel.config)
    from crifs.cstorage import open_store as open_cstorage

    return open_cstorage(
        root=sel.root, runroot=sel.runroot, config=sel.config, lock_timeout=sel.lock_timeout
    )


__all__ = ["AUTO", "CrifsError", "Selection", "open_stores"]
