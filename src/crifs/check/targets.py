"""What a user names as a link-audit target, resolved to the layers to read.

Spellings (``crifs links TARGET``):

- a directory: a plain rootfs (one layer, read without overlay semantics), unless it holds an
  OCI image layout (``oci-layout``/``index.json``) or an unpacked ``docker save``
  (``manifest.json``), which are read as images;
- a file: an OCI archive or a ``docker save`` tar (``crifs.oci.layout``), every image in it a
  target; any other tar (``docker export``, a rootfs tarball, a single layer; compressed or
  not) is one layer;
- ``image:REF``: an image of a detected store. REF is matched exactly, then as a normalised
  reference (``alpine`` = ``docker.io/library/alpine:latest``, ``localhost/alpine:latest``),
  then as an image id or digest (a unique prefix of at least 4 hex digits), then as the tail
  of a name after a ``/``;
- ``snapshot:KEY``: a snapshot (containerd key, backend id or c/storage layer id/name) and
  its parents; ``layer:ID``: a containers/storage layer (or a unique id prefix) and its
  parents; ``container:ID``: a container's rw layer on top of its image's layers (id, unique
  prefix or name).

In a containerd namespace other than the one wanted, spell ``NS/KEY`` (``image:k8s.io/…`` is
tried as a name first). ``--all-images`` (``all_images=True`` with no spec) targets every image
of every store in the selection.

Layer order is bottom first (index 0 = base), as ``crifs.fs.merged`` applies them. Targets
inside a store are resolved by ``crifs.check.store_targets``.

Nothing is read until a target's ``load`` is called; resolving reads only the store metadata
(``open_stores``) and, for containerd images, the small manifest and config blobs. Read-only.
Errors are ``BadInput`` (a malformed spec, an ambiguous name: the message lists the
candidates), ``NotFound`` (nothing matches) and ``CorruptStore`` (a broken parent chain, a
layer that is neither unpacked nor in the content store).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Protocol

from crifs.errors import BadInput, NotFound, UnsafePath, Unsupported
from crifs.fs.layer_cache import LayerCache
from crifs.fs.listing import LayerListing
from crifs.fs.walk import read_layer_dir
from crifs.oci.tarlayer import read_layer_tar
from crifs.stores import Selection, open_stores

if TYPE_CHECKING:
    from crifs.oci.layout import ImageSource, SourceImage

# The top-level names ``crifs.oci.layout`` recognises an image source by (``OCI_LAYOUT``,
# ``INDEX_JSON``, ``DOCKER_MANIFEST``; a test holds them equal). Known here so that a plain
# rootfs, the common big target, is read without importing the image reader.
_OCI_LAYOUT, _INDEX_JSON, _DOCKER_MANIFEST = "oci-layout", "index.json", "manifest.json"

KIND_ROOTFS = "rootfs"
KIND_ROOTFS_TAR = "rootfs-tar"
KIND_IMAGE = "image"
KIND_SNAPSHOT = "snapshot"
KIND_LAYER = "layer"
KIND_CONTAINER = "container"
STORE_PREFIXES = (KIND_IMAGE, KIND_SNAPSHOT, KIND_LAYER, KIND_CONTAINER)


LayerProgress = Callable[[int, int, int], None]
"""``(position, layers, read)``: layer ``position`` (0 = bottom) of a target's ``layers`` is
being read, ``read`` entries (or tar members) of it so far."""


class Loader(Protocol):
    """Reads a target's layers, bottom first, telling ``progress`` how far it is."""

    def __call__(self, progress: LayerProgress | None = None) -> list[LayerListing]: ...


@dataclass
class AuditTarget:
    """One thing to audit. ``label``: how reports name it; ``kind``: ``rootfs``,
    ``rootfs-tar``, an image source kind (``oci-layout``, ``oci-archive``,
    ``docker-archive``, ``docker-dir``) or a store kind (``image``, ``snapshot``, ``layer``,
    ``container``); ``load(progress=None)`` reads its layers (bottom first) when called,
    telling ``progress`` (a ``LayerProgress``) how far it is now and then; ``details``:
    facts for reports (``runtime``, ``root``, ``namespace``, ``image``, ``id``, ``key``,
    ``path``)."""

    label: str
    kind: str
    load: Loader
    details: Mapping[str, str] = field(default_factory=dict)


def layer_progress(
    progress: LayerProgress | None, position: int, layers: int
) -> Callable[[int], None] | None:
    """The progress callback a layer reader gets for layer ``position`` of ``layers``."""
    return None if progress is None else partial(progress, position, layers)


def resolve_targets(
    spec: str | None,
    selection: Selection,
    *,
    all_images: bool = False,
    namespace: str | None = None,
    all_platforms: bool = False,
    progress: LayerProgress | None = None,
) -> list[AuditTarget]:
    """The targets ``spec`` names (see the module doc). ``namespace`` limits containerd
    lookups to one namespace; ``all_platforms`` audits every platform variant of a
    multi-platform image source instead of the host's. ``progress`` is told how far the
    reading of a tar is: a tar is read once while it is resolved, to tell a rootfs tar (then
    already the listing) from an image archive."""
    if not spec:
        if not all_images:
            raise BadInput(
                "name a target (a directory, an image archive, image:REF, "
                "snapshot:KEY, layer:ID or container:ID) or use --all-images"
            )
        from crifs.check import store_targets

        return store_targets.every_image(open_stores(selection), namespace)
    kind, sep, rest = spec.partition(":")
    if sep and kind in STORE_PREFIXES:
        if not rest:
            raise BadInput(f"{kind}: needs a value, e.g. {kind}:{_EXAMPLE[kind]}")
        from crifs.check import store_targets

        stores = open_stores(selection)
        if kind == KIND_IMAGE:
            return [store_targets.image_target(*store_targets.find_image(stores, rest, namespace))]
        if kind == KIND_CONTAINER:
            return [store_targets.container_target(stores, rest, namespace)]
        return [store_targets.snapshot_target(stores, kind, rest, namespace)]
    return _path_targets(spec, all_platforms, progress)


_EXAMPLE = {
    KIND_IMAGE: "docker.io/library/alpine:3.19",
    KIND_SNAPSHOT: "sha256:<chain id>",
    KIND_LAYER: "<layer id>",
    KIND_CONTAINER: "<container id>",
}


# -- paths -------------------------------------------------------------------------------------


def _path_targets(
    path: str, all_platforms: bool, progress: LayerProgress | None = None
) -> list[AuditTarget]:
    if not os.path.lexists(path):
        prefixes = ", ".join(p + ":" for p in STORE_PREFIXES)
        hint = (
            f" (a store object is named with one of {prefixes})"
            if ":" in path and path.partition(":")[0] not in STORE_PREFIXES
            else ""
        )
        raise BadInput(f"no such file or directory{hint}", path=path)
    if os.path.islink(path) and os.path.isdir(path):
        raise UnsafePath(
            "is a symlink; crifs does not follow symlinks, pass the real path "
            f"instead: {os.path.realpath(path)}",
            path=path,
        )
    if os.path.isfile(path):
        # One pass with libarchive tells a rootfs tar from an image archive and, for the
        # rootfs (the big case: a million members), is already the listing to audit; only
        # image archives, a few members each, are then indexed again to read their blobs.
        listing = read_layer_tar(path, index=0, name=f"rootfs {path}", ident=path,
                                 progress=layer_progress(progress, 0, 1))
        if not _holds_image(listing):
            return [AuditTarget(path, KIND_ROOTFS_TAR, lambda progress=None: [listing],
                                {"path": path})]
    elif os.path.isdir(path) and not any(
        os.path.lexists(os.path.join(path, name))
        for name in (_OCI_LAYOUT, _INDEX_JSON, _DOCKER_MANIFEST)
    ):
        return [_rootfs_target(path)]  # a directory that cannot hold an image
    from crifs.oci.layout import ImageSource, NoImage
    from crifs.oci.sourcefiles import CompressedArchive

    try:
        source = ImageSource.open(path, all_platforms=all_platforms)
    except NoImage:
        if os.path.isdir(path):
            return [_rootfs_target(path)]
        return [_rootfs_tar_target(path, compressed=False)]
    except CompressedArchive:
        return [_rootfs_tar_target(path, compressed=True)]
    cache = LayerCache()  # images of one archive often share layers
    targets = [
        AuditTarget(
            f"{path} ({image.name})",
            source.kind,
            _source_loader(source, image, cache),
            {"path": path, "image": image.name},
        )
        for image in source.images()
    ]
    if not targets:
        raise NotFound("holds no image", path=path)
    return targets


def _source_loader(source: ImageSource, image: SourceImage, cache: LayerCache) -> Loader:
    def load(progress: LayerProgress | None = None) -> list[LayerListing]:
        return source.listings(image, progress, cache)

    return load


def _rootfs_tar_target(path: str, *, compressed: bool) -> AuditTarget:
    """A tar that holds no image (``docker export``, a rootfs tarball, one layer), any
    compression: one layer. A compressed tar that turns out to hold an image layout or a
    docker save is refused: its blobs cannot be read in place."""

    def load(progress: LayerProgress | None = None) -> list[LayerListing]:
        listing = read_layer_tar(path, index=0, name=f"rootfs {path}", ident=path,
                                 progress=layer_progress(progress, 0, 1))
        if compressed and _holds_image(listing):
            raise Unsupported(
                "a compressed image archive; decompress it first (crifs reads "
                "compressed layers, not a compressed outer archive)",
                path=path,
            )
        return [listing]

    return AuditTarget(path, KIND_ROOTFS_TAR, load, {"path": path})


def _holds_image(listing: LayerListing) -> bool:
    names = listing.entries
    if _OCI_LAYOUT.encode() in names:
        return True
    # the two lookups first: a rootfs tar (a million members) is told without a scan
    if _INDEX_JSON.encode() not in names and _DOCKER_MANIFEST.encode() not in names:
        return False
    return any(p.startswith(b"blobs/") for p in names) or any(
        p.endswith(b"/layer.tar") for p in names
    )


def _rootfs_target(path: str) -> AuditTarget:
    def load(progress: LayerProgress | None = None) -> list[LayerListing]:
        return [
            read_layer_dir(path, index=0, name=f"rootfs {path}", ident=path, overlay=False,
                           progress=layer_progress(progress, 0, 1))
        ]

    return AuditTarget(path, KIND_ROOTFS, load, {"path": path})
