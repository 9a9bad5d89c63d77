"""The runtime-neutral store model every backend maps into.

Terms (as in containerd's ``snapshots/snapshotter.go``, extended to containers/storage):

- A **snapshot** is one filesystem layer of a store. In containerd it is a snapshotter record
  named by a user-visible **key** (``sha256:<chainID>`` for an image layer, the container id for
  a container rootfs) inside a **namespace**; the snapshotter stores it under a numeric **id**
  as ``snapshots/<id>/fs``. In containers/storage it is a layer, whose key and id are both the
  layer id, stored as ``overlay/<id>/diff``, and whose namespace is ``None``.
- **Kinds**: ``Committed`` snapshots are read-only parents (image layers); ``Active`` ones are
  writable (a container rootfs, an unpack in progress); ``View`` is a read-only active. Active
  snapshots never become committed ones and vice versa: commit makes a new record.
- A snapshot's **parent** is the key of the snapshot below it; the chain from a snapshot down
  to a parentless base is what an overlay mount stacks.
- **Usage** is what the bytes on disk cost: ``disk_bytes`` (allocated, st_blocks*512) and
  ``inodes``, hard links counted once, measured as containerd's ``fs.DiskUsage`` does (the
  directory itself included). ``apparent_bytes`` (sum of st_size) is ``None`` when only a stored
  figure is known.

Paths are host paths as ``str``; bytes that are not UTF-8 are kept with ``surrogateescape``
(``os.fsdecode``), so ``os.fsencode(path)`` gives back the exact bytes. Rendering to JSON turns
them into ``\\xNN`` escapes plus ``path_b64`` (see ``crifs.report``).

Every type here is a plain value: no I/O happens in this module.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol, runtime_checkable

CONTAINERD = "containerd"
CSTORAGE = "cstorage"
RUNTIMES = (CONTAINERD, CSTORAGE)


class SnapshotKind(StrEnum):
    """Kinds as ``ctr snapshots ls`` prints them (containerd's ``Kind.String()``)."""

    UNKNOWN = "Unknown"
    VIEW = "View"
    ACTIVE = "Active"
    COMMITTED = "Committed"


@dataclass(frozen=True, slots=True)
class Usage:
    """Disk cost of a snapshot's own directory (not its parents)."""

    disk_bytes: int
    inodes: int
    apparent_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One layer: a containerd snapshot or a containers/storage layer.

    ``key`` is what a user types (``ctr snapshots info KEY``, a layer id). ``id`` is the
    backend's directory name (containerd: the numeric snapshotter id; c/storage: the layer id).
    ``backend_key`` is containerd's ``<ns>/<seq>/<key>`` snapshotter name. ``path`` is the
    directory holding the layer's files (``…/snapshots/<id>/fs`` or ``…/overlay/<id>/diff``),
    or ``None`` when the snapshot has no directory of its own (a native View with a parent).
    ``stored_usage`` is the size the store recorded at commit time, when it records one.
    ``details`` holds backend facts that have no common field, e.g. a c/storage layer's
    ``diff_size`` (the uncompressed tar size, not disk usage), digests and mount count.
    """

    runtime: str
    key: str
    kind: SnapshotKind
    snapshotter: str
    namespace: str | None = None
    parent: str | None = None
    id: str | None = None
    backend_key: str | None = None
    path: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    created: dt.datetime | None = None
    updated: dt.datetime | None = None
    stored_usage: Usage | None = None
    names: tuple[str, ...] = ()
    flags: Mapping[str, object] = field(default_factory=dict)
    details: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Image:
    """An image record. containerd: a name in a namespace pointing at a target descriptor.
    containers/storage: an image id with names and a top layer.

    ``size_bytes`` is what the runtime's own listing shows (``ctr images ls`` SIZE: the sum of
    the content blobs the image references; ``podman images`` Size: layers plus big data).
    """

    runtime: str
    name: str
    id: str
    namespace: str | None = None
    digest: str | None = None
    media_type: str | None = None
    size_bytes: int | None = None
    platforms: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    top_layer: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    created: dt.datetime | None = None
    updated: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class Container:
    """A container record and the snapshot (rootfs layer) it owns."""

    runtime: str
    id: str
    image: str
    namespace: str | None = None
    image_id: str | None = None
    names: tuple[str, ...] = ()
    runtime_name: str | None = None
    snapshotter: str | None = None
    snapshot_key: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    created: dt.datetime | None = None
    updated: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class Mount:
    """One mount as the runtime would perform it (containerd's ``mount.Mount``)."""

    type: str
    source: str
    options: tuple[str, ...] = ()

    def command(self, target: str) -> str:
        """The shell command ``ctr snapshots mounts`` prints for this mount."""
        return f"mount -t {self.type} {self.source} {target} -o {','.join(self.options)}"


@dataclass(frozen=True, slots=True)
class RootInfo:
    """Where a store lives on this host and what holds it."""

    path: str
    exists: bool
    is_symlink: bool = False
    symlink_target: str | None = None
    resolved: str | None = None
    fs_type: str | None = None
    free_bytes: int | None = None
    total_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class StoreInfo:
    """What ``crifs info`` shows for one store."""

    runtime: str
    root: RootInfo
    state: RootInfo | None
    drivers: tuple[str, ...]
    config_path: str | None
    daemon_running: bool | None
    daemon_detail: str | None
    layout: str | None
    counts: Mapping[str, int]
    total_bytes: Mapping[str, int]


@runtime_checkable
class Store(Protocol):
    """One runtime's storage, read offline from its files.

    Contract for every backend:

    - Opening a store reads its metadata once (taking the runtime's read locks where it has
      them) and raises ``NotFound`` for a missing root, ``CorruptStore`` for undecodable
      metadata and ``StoreLocked`` when a writer holds a lock past the timeout. Nothing is ever
      written, locked for writing, or followed through a symlink out of the root.
    - Listings are snapshots of that one read; they return every record the store holds, also
      records the runtime's own tools would skip (a containerd record whose snapshotter entry is
      missing is listed with kind ``Unknown``).
    - ``namespace=None`` means all namespaces; c/storage has none and ignores the filter.
    """

    runtime: str
    root: Path

    def info(self) -> StoreInfo:
        """Roots, drivers, daemon, counts and total sizes of this store."""
        ...

    def namespaces(self) -> list[str]:
        """Namespace names, sorted. containers/storage returns ``[]``."""
        ...

    def images(self, namespace: str | None = None) -> list[Image]:
        """Image records, in the store's order."""
        ...

    def containers(self, namespace: str | None = None) -> list[Container]:
        """Container records, in the store's order."""
        ...

    def snapshots(
        self, namespace: str | None = None, snapshotter: str | None = None
    ) -> list[Snapshot]:
        """Every snapshot/layer record, optionally filtered by namespace and snapshotter."""
        ...

    def usage(self, snapshot: Snapshot) -> Usage:
        """Usage as the runtime reports it: measured for Active, stored for Committed,
        zero for View. Raises ``NotFound`` when the directory is gone."""
        ...

    def mounts(self, snapshot: Snapshot) -> list[Mount]:
        """The mounts the runtime would use for this snapshot, lowerdir order included.
        Raises ``CorruptStore`` when a parent in the chain is missing."""
        ...


def find_snapshot(snapshots: Iterable[Snapshot], key: str) -> list[Snapshot]:
    """All snapshots whose key (or id, or a c/storage name) equals ``key``."""
    return [s for s in snapshots if key in (s.key, s.id, s.backend_key) or key in s.names]
