"""storage.conf, read the way containers/storage (rootful) finds and reads it.

Search order: ``$CONTAINERS_STORAGE_CONF`` (used even when the file is missing: the store then
runs on built-in defaults), ``/etc/containers/storage.conf``, ``/usr/share/containers/
storage.conf``. Keys read::

    [storage]                  driver, graphroot, runroot, transient_store
    [storage.options]          additionalimagestores, mountopt, mount_program, disable-volatile
    [storage.options.overlay]  mountopt, mount_program (win over the [storage.options] ones)

Defaults are the rootful ones: ``/var/lib/containers/storage`` and ``/run/containers/storage``.
Configured roots go through ``$VAR`` expansion and symlink resolution as containers/storage
does (``expandEnvPath``), because those resolved paths are what ends up in mount options.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass

from crifs.errors import BadInput

ENV_STORAGE_CONF = "CONTAINERS_STORAGE_CONF"
SEARCH_PATH = ("/etc/containers/storage.conf", "/usr/share/containers/storage.conf")
DEFAULT_GRAPHROOT = "/var/lib/containers/storage"
DEFAULT_RUNROOT = "/run/containers/storage"


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """The storage.conf settings crifs uses. ``path`` is the file read (``None``: defaults)."""

    path: str | None = None
    driver: str | None = None
    graphroot: str = DEFAULT_GRAPHROOT
    runroot: str = DEFAULT_RUNROOT
    transient_store: bool = False
    additional_image_stores: tuple[str, ...] = ()
    mountopt: str = ""
    mount_program: str = ""
    disable_volatile: bool = False


def find_config_file(environ: Mapping[str, str] | None = None) -> str | None:
    """The storage.conf containers/storage would read, or ``None`` when there is none."""
    env = os.environ if environ is None else environ
    override = env.get(ENV_STORAGE_CONF)
    if override is not None:
        return override
    for candidate in SEARCH_PATH:
        if os.path.isfile(candidate):
            return candidate
    return None


def load_config(path: str | os.PathLike[str] | None = None) -> StorageConfig:
    """Read ``path`` (or the file found by :func:`find_config_file`).

    A found file that is missing (``$CONTAINERS_STORAGE_CONF`` naming nothing) gives the
    defaults, as containers/storage does; an explicit ``path`` that is missing, a file that is
    not valid TOML or a key of the wrong type raises ``BadInput`` naming the file.
    """
    conf_path = os.fspath(path) if path is not None else find_config_file()
    if conf_path is None:
        return StorageConfig()
    try:
        with open(conf_path, "rb") as conf_file:
            data = tomllib.load(conf_file)
    except FileNotFoundError:
        if path is not None:
            raise BadInput("storage.conf does not exist", path=conf_path) from None
        return StorageConfig(path=None)
    except IsADirectoryError:
        raise BadInput("is a directory, not a storage.conf file", path=conf_path) from None
    except PermissionError:
        raise BadInput("permission denied", path=conf_path) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise BadInput(f"not valid TOML: {err}", path=conf_path) from None
    return _from_toml(data, conf_path)


def _from_toml(data: Mapping[str, object], conf_path: str) -> StorageConfig:
    reader = _TableReader(conf_path)
    storage = reader.table(data, "storage")
    options = reader.table(storage, "storage.options", key="options")
    overlay = reader.table(options, "storage.options.overlay", key="overlay")
    graphroot = reader.string(storage, "storage", "graphroot")
    runroot = reader.string(storage, "storage", "runroot")
    return StorageConfig(
        path=conf_path,
        driver=reader.string(storage, "storage", "driver") or None,
        graphroot=expand_root(graphroot) if graphroot else DEFAULT_GRAPHROOT,
        runroot=expand_root(runroot) if runroot else DEFAULT_RUNROOT,
        transient_store=reader.boolean(storage, "storage", "transient_store"),
        additional_image_stores=tuple(
            reader.string_list(options, "storage.options", "additionalimagestores")
        ),
        mountopt=(
            reader.string(overlay, "storage.options.overlay", "mountopt")
            or reader.string(options, "storage.options", "mountopt")
        ),
        mount_program=(
            reader.string(overlay, "storage.options.overlay", "mount_program")
            or reader.string(options, "storage.options", "mount_program")
        ),
        disable_volatile=reader.boolean(options, "storage.options", "disable-volatile"),
    )


def expand_root(path: str) -> str:
    """``$VAR`` expansion, then symlinks resolved when the path exists (else just cleaned)."""
    expanded = os.path.expandvars(path.replace("$UID", str(os.geteuid())))
    if os.path.lexists(expanded):
        return os.path.realpath(expanded)
    return os.path.normpath(expanded)


class _TableReader:
    """Typed access to TOML tables; a wrong type is a ``BadInput`` naming file and key."""

    def __init__(self, conf_path: str) -> None:
        self.conf_path = conf_path

    def _bad(self, table: str, key: str, want: str) -> BadInput:
        return BadInput(f"[{table}] {key} must be {want}", path=self.conf_path)

    def table(self, parent: Mapping[str, object], name: str, key: str | None = None
              ) -> Mapping[str, object]:
        value = parent.get(key or name, {})
        if not isinstance(value, dict):
            raise BadInput(f"[{name}] must be a table", path=self.conf_path)
        return value

    def string(self, table: Mapping[str, object], table_name: str, key: str) -> str:
        value = table.get(key, "")
        if not isinstance(value, str):
            raise self._bad(table_name, key, "a string")
        return value

    def boolean(self, table: Mapping[str, object], table_name: str, key: str) -> bool:
        value = table.get(key, False)
        if not isinstance(value, bool):
            raise self._bad(table_name, key, "true or false")
        return value

    def string_list(self, table: Mapping[str, object], table_name: str, key: str) -> list[str]:
        value = table.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._bad(table_name, key, "a list of strings")
        return list(value)
