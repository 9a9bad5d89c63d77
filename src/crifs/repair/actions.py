"""The steps a repair is made of, as plain values.

A detector (``crifs.fsck``) attaches these to a finding; the executor (``crifs.repair.apply``)
runs them. Every action is **idempotent**: running it again after it completed, or after a
kill -9 part-way through, finishes the job and never does harm. Every action keeps to the store
root: paths are absolute host paths inside the store, never followed through a symlink.

``action`` is the stable name written in JSON plans and journals.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RemovePath:
    """Remove a file, symlink or whole directory tree at ``path``.

    Contract: never follows a symlink (a symlink is unlinked, not its target); refuses when
    ``path`` or anything below it is a mount point or is named by a live overlay mount
    (``lowerdir``/``upperdir``/``workdir``); a directory is first renamed into the store's
    trash (atomic, so the runtime sees it either present or gone) and then deleted. A path
    that is already gone is success.
    """

    path: str
    action: str = "remove"


@dataclass(frozen=True, slots=True)
class CreateSymlink:
    """Make ``path`` a symlink to ``target`` (e.g. ``overlay/l/<LINK>`` → ``../<id>/diff``).

    Contract: created under a temporary name and renamed into place, so ``path`` is never
    missing while being replaced; an existing correct link is success; an existing wrong
    symlink or regular file is replaced; a directory at ``path`` is refused.
    """

    path: str
    target: str
    action: str = "symlink"


@dataclass(frozen=True, slots=True)
class WriteFile:
    """Write ``content`` to ``path`` atomically (temporary file, fsync, rename).

    Used for a c/storage layer's ``link`` file (26 base32 chars, no newline).
    """

    path: str
    content: str
    mode: int = 0o644
    action: str = "write"


@dataclass(frozen=True, slots=True)
class MakeDir:
    """Create directory ``path`` (and nothing above it); an existing directory is success."""

    path: str
    mode: int = 0o700
    action: str = "mkdir"


@dataclass(frozen=True, slots=True)
class DeleteLayer:
    """Delete a containers/storage layer the way c/storage does (``layers.go`` delete).

    Protocol, under ``layers.lock`` held for writing: mark the record ``incomplete`` and
    save, remove ``l/<link>`` and ``overlay/<id>``, remove ``overlay-layers/<id>.tar-split.gz``
    and ``overlay-layers/<id>/``, then drop the record and save. A kill -9 anywhere leaves
    either the intact layer, an incomplete one c/storage deletes itself on load, or an orphan
    dir a re-run removes. A layer that is already gone is success.
    """

    layer_id: str
    action: str = "delete_layer"


@dataclass(frozen=True, slots=True)
class DeleteImage:
    """Drop a containers/storage image record (``images.json``) and ``overlay-images/<id>/``.

    Its layers are left to their own findings (they become unreferenced). Refused when a
    container record names the image.
    """

    image_id: str
    action: str = "delete_image"


@dataclass(frozen=True, slots=True)
class DropMountRecord:
    """Drop ``layer_id``'s entry from runroot ``overlay-layers/mountpoints.json`` (only when
    nothing is mounted at its path)."""

    layer_id: str
    action: str = "drop_mount_record"


Action = (
    RemovePath | CreateSymlink | WriteFile | MakeDir | DeleteLayer | DeleteImage | DropMountRecord
)


@dataclass(frozen=True, slots=True)
class ApiCall:
    """One request to a running containerd's gRPC API (``containerd.services.<service>.v1``),
    made in ``namespace``: what a repair does through the daemon instead of a ``ctr`` command.

    ``service``/``method`` name the RPC (``snapshots``/``Remove``, ``leases``/``Delete``,
    ``content``/``Delete``, ``snapshots``/``Prepare``, ``leases``/``Create``); ``fields`` are the
    request's string fields by their proto names (``snapshotter``, ``key``, ``parent``, ``id``,
    ``digest``, ``sync``). Contract: a call whose object is already gone (NotFound) is success,
    so a plan can be re-run.
    """

    service: str
    method: str
    namespace: str
    fields: tuple[tuple[str, str], ...] = ()
    action: str = "api"
