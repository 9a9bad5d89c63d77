"""containerd's ``config.toml``: only the settings that decide where and how things are stored.

Three config versions exist. Version 1 (no ``version`` key) names plugins by their short id
(``[plugins.overlayfs]``, ``[plugins.cri.containerd]``); versions 2 (containerd 1.x) and 3
(2.x) use full plugin URIs (``[plugins."io.containerd.snapshotter.v1.overlayfs"]``). The CRI
snapshotter moved from ``[plugins."io.containerd.grpc.v1.cri".containerd] snapshotter`` (v2) to
``[plugins."io.containerd.cri.v1.images"] snapshotter`` (v3). ``imports`` files are merged in
after the main file, later values winning, as containerd does.
"""

from __future__ import annotations

import glob
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from crifs.containerd import schema
from crifs.errors import BadInput, NotFound

DEFAULT_CONFIG = "/etc/containerd/config.toml"
DEFAULT_ROOT = "/var/lib/containerd"
DEFAULT_STATE = "/run/containerd"
DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
DEFAULT_SNAPSHOTTER = schema.OVERLAYFS

_CRI_V2 = "io.containerd.grpc.v1.cri"
_CRI_IMAGES_V3 = "io.containerd.cri.v1.images"


@dataclass(frozen=True, slots=True)
class ContainerdConfig:
    """The storage-relevant part of one containerd configuration (defaults filled in)."""

    path: str | None = None
    version: int = 2
    root: str = DEFAULT_ROOT
    state: str = DEFAULT_STATE
    snapshotter_root_paths: Mapping[str, str] = field(default_factory=dict)
    cri_snapshotter: str = DEFAULT_SNAPSHOTTER
    overlay_mount_options: tuple[str, ...] = ()
    grpc_address: str | None = None  # ``[grpc] address``: the API socket (None: not set)

    def snapshotter_root(self, name: str) -> str:
        """The directory snapshotter ``name`` keeps its ``metadata.db`` and snapshots in."""
        configured = self.snapshotter_root_paths.get(name)
        return configured or os.path.join(self.root, schema.snapshotter_dir(name))


def load_config(path: str | os.PathLike[str]) -> ContainerdConfig:
    """Read ``path`` (and its ``imports``). Raises ``NotFound``/``BadInput`` for a bad file."""
    path = os.fspath(path)
    data = _read_toml(path)
    for imported in _import_paths(path, data.get("imports")):
        data = _merge(data, _read_toml(imported))
    return config_from_mapping(data, path=path)


def config_from_mapping(data: Mapping[str, Any], path: str | None = None) -> ContainerdConfig:
    """Interpret an already parsed config document."""
    version = _int(data.get("version"), default=1)
    plugins = _table(data.get("plugins"))

    def plugin(full: str, short: str) -> Mapping[str, Any]:
        return _table(plugins.get(short if version < 2 else full))

    root_paths: dict[str, str] = {}
    for name in schema.SUPPORTED_SNAPSHOTTERS:
        root_path = plugin(schema.SNAPSHOTTER_DIR_PREFIX + name, name).get("root_path")
        if isinstance(root_path, str) and root_path:
            root_paths[name] = root_path
    overlay = plugin(schema.SNAPSHOTTER_DIR_PREFIX + schema.OVERLAYFS, schema.OVERLAYFS)
    mount_options = overlay.get("mount_options")
    options = tuple(o for o in mount_options if isinstance(o, str)) if isinstance(
        mount_options, list) else ()

    if version >= 3:
        cri_snapshotter = _table(plugins.get(_CRI_IMAGES_V3)).get("snapshotter")
    else:
        cri = _table(plugins.get(_CRI_V2 if version == 2 else "cri"))
        cri_snapshotter = _table(cri.get("containerd")).get("snapshotter")

    return ContainerdConfig(
        path=path,
        version=version,
        root=_str(data.get("root")) or DEFAULT_ROOT,
        state=_str(data.get("state")) or DEFAULT_STATE,
        snapshotter_root_paths=root_paths,
        cri_snapshotter=_str(cri_snapshotter) or DEFAULT_SNAPSHOTTER,
        overlay_mount_options=options,
        grpc_address=_str(_table(data.get("grpc")).get("address")),
    )


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise NotFound("config file does not exist", path=path) from None
    except tomllib.TOMLDecodeError as err:
        raise BadInput(f"not valid TOML: {err}", path=path) from None
    except (OSError, UnicodeDecodeError) as err:
        raise BadInput(f"cannot read config: {err}", path=path) from None


def _import_paths(path: str, imports: object) -> list[str]:
    if not isinstance(imports, list):
        return []
    found: list[str] = []
    base = os.path.dirname(path)
    for pattern in imports:
        if not isinstance(pattern, str):
            continue
        full = pattern if os.path.isabs(pattern) else os.path.join(base, pattern)
        found.extend(sorted(glob.glob(full)))
    return [p for p in found if os.path.realpath(p) != os.path.realpath(path)]


def _merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _table(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default
