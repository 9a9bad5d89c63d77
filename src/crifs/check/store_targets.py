"""Link-audit targets inside a store: ``image:REF``, ``snapshot:KEY``, ``layer:ID``,
``container:ID`` and ``--all-images`` (see ``crifs.check.targets`` for the spellings).

containerd images use their unpacked snapshots (overlayfs: one directory per layer with overlay
whiteouts; native: the top snapshot alone, since each native snapshot is a full copy), found by
the chain IDs of the config's ``diff_ids`` in the image's namespace; when they are not unpacked,
the layer blobs of the content store are read as tars instead. containers/storage images use
the ``diff`` directories of the top layer's parent chain. Resolving reads only store metadata
and, for containerd images, the small manifest and config blobs.

Imported only when a store target is named, so auditing a directory or a tar does not pay for
loading the store backends.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from crifs.check.targets import (
    KIND_CONTAINER,
    KIND_IMAGE,
    KIND_LAYER,
    AuditTarget,
    LayerProgress,
    Loader,
    layer_progress,
)
from crifs.containerd.content import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    Descriptor,
    HostPlatform,
    ImageWalker,
)
from crifs.containerd.store import ContainerdStore
from crifs.errors import BadInput, CorruptStore, NotFound
from crifs.fs.layer_cache import LayerCache
from crifs.fs.listing import LayerListing
from crifs.fs.walk import read_layer_dir
from crifs.model import CONTAINERD, CSTORAGE, Container, Image, Snapshot, Store
from crifs.oci.layout import layer_name
from crifs.oci.tarlayer import read_layer_tar

_MAX_CHAIN = 1000
_MIN_PREFIX = 4
_HEX = re.compile(r"^(sha256:)?[0-9a-f]+$")


# -- layers of a store -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _DirLayer:
    path: str | None
    ident: str
    overlay: bool = True
    note: str | None = None  # a problem to attach to the listing (e.g. an incomplete layer)


@dataclass(frozen=True, slots=True)
class _BlobLayer:
    path: str
    ident: str


def _loader(
    layers: Sequence[_DirLayer | _BlobLayer], what: str, cache: LayerCache | None = None
) -> Loader:
    """Reads ``layers`` when called; through ``cache`` when given (``--all-images``)."""

    def load(progress: LayerProgress | None = None) -> list[LayerListing]:
        out: list[LayerListing] = []
        for i, layer in enumerate(layers):
            name = layer_name(i, layer.ident)
            read = partial(_read_layer, layer, i, name, layer_progress(progress, i, len(layers)))
            if isinstance(layer, _DirLayer) and layer.path is None:
                raise CorruptStore(
                    f"{what}: layer {layer.ident} has no directory on disk "
                    "(its snapshotter record is missing)"
                )
            if cache is None:
                listing = read()
            else:
                where = (type(layer).__name__, layer.path, isinstance(layer, _DirLayer)
                         and layer.overlay)
                listing = cache.listing(where, read, index=i, name=name)
            if isinstance(layer, _DirLayer) and layer.note:
                listing.problems.append(layer.note)
            out.append(listing)
        return out

    return load


def _read_layer(
    layer: _DirLayer | _BlobLayer, index: int, name: str, told: Callable[[int], None] | None
) -> LayerListing:
    if isinstance(layer, _BlobLayer):
        return read_layer_tar(layer.path, index=index, name=name, ident=layer.ident,
                              progress=told)
    assert layer.path is not None  # refused by the loader
    return read_layer_dir(layer.path, index=index, name=name, ident=layer.ident,
                          overlay=layer.overlay, progress=told)


def _chain(snapshots: Mapping[str, Snapshot], top: Snapshot, what: str) -> list[Snapshot]:
    """``top`` and its parents, bottom first; ``CorruptStore`` for a missing parent or loop."""
    chain = [top]
    seen = {top.key}
    current = top
    while current.parent:
        parent = snapshots.get(current.parent)
        if parent is None:
            raise CorruptStore(
                f"{what}: parent {current.parent} of {current.key} is not in the store"
            )
        if parent.key in seen or len(chain) > _MAX_CHAIN:
            raise CorruptStore(f"{what}: the parent chain of {top.key} loops at {parent.key}")
        seen.add(parent.key)
        chain.append(parent)
        current = parent
    chain.reverse()
    return chain


def _dir_layers(chain: Sequence[Snapshot]) -> list[_DirLayer]:
    """Directory layers for a snapshot chain (bottom first), as the snapshotter mounts it."""
    top = chain[-1]
    if top.runtime == CONTAINERD and top.snapshotter == "native":
        # Every native snapshot is a full copy of its parent plus its changes: the top one
        # (or, for a View without a directory, the nearest parent with one) is the rootfs.
        for snap in reversed(chain):
            if snap.path is not None:
                return [_DirLayer(snap.path, snap.key, overlay=False)]
        return [_DirLayer(None, top.key, overlay=False)]
    return [_DirLayer(s.path, s.key, note=_incomplete_note(s)) for s in chain]


def _incomplete_note(snap: Snapshot) -> str | None:
    if snap.flags.get("incomplete") is True:
        return (
            f"layer {snap.key} is flagged incomplete in {CSTORAGE} (an interrupted "
            "pull or commit): its files may be partial"
        )
    return None


def _snapshots_by_key(store: Store, snap: Snapshot) -> dict[str, Snapshot]:
    return {
        s.key: s for s in store.snapshots(namespace=snap.namespace, snapshotter=snap.snapshotter)
    }


def _where(store: Store, namespace: str | None) -> str:
    return f"{store.runtime} {store.root}" + (f" namespace {namespace}" if namespace else "")


def _details(store: Store, namespace: str | None, **extra: str) -> dict[str, str]:
    out = {"runtime": store.runtime, "root": str(store.root)}
    if namespace:
        out["namespace"] = namespace
    out.update(extra)
    return out


# -- snapshot:KEY and layer:ID -----------------------------------------------------------------


def snapshot_target(
    stores: Sequence[Store], kind: str, key: str, namespace: str | None
) -> AuditTarget:
    found: list[tuple[Store, Snapshot]] = []
    for store in stores:
        if kind == KIND_LAYER and store.runtime != CSTORAGE:
            continue
        found += [(store, s) for s in _match_snapshots(store, key, namespace)]
    if not found:
        where = "containers/storage store" if kind == KIND_LAYER else "store"
        raise NotFound(f"no {kind} {key!r} in any detected {where}")
    store, snap = _one(
        found,
        f"{kind} {key!r}",
        lambda pair: f"{_where(pair[0], pair[1].namespace)}: {pair[1].key}",
    )
    chain = _chain(_snapshots_by_key(store, snap), snap, f"{kind} {snap.key}")
    label = f"{kind}:{snap.key}" + (f" (namespace {snap.namespace})" if snap.namespace else "")
    return AuditTarget(
        label,
        kind,
        _loader(_dir_layers(chain), label),
        _details(store, snap.namespace, key=snap.key),
    )


def _match_snapshots(store: Store, key: str, namespace: str | None) -> list[Snapshot]:
    ns, _, short = key.partition("/")
    candidates = store.snapshots(namespace=namespace)
    exact = [s for s in candidates if key in (s.key, s.id, s.backend_key) or key in s.names]
    if exact:
        return exact
    if namespace is None and short and store.runtime == CONTAINERD:
        scoped = [s for s in store.snapshots(namespace=ns) if short in (s.key, s.id)]
        if scoped:
            return scoped
    if store.runtime == CSTORAGE and len(key) >= _MIN_PREFIX and _HEX.match(key):
        return [s for s in candidates if s.key.startswith(key)]
    return []


# -- container:ID ------------------------------------------------------------------------------


def container_target(stores: Sequence[Store], ident: str, namespace: str | None) -> AuditTarget:
    found: list[tuple[Store, Container]] = []
    for store in stores:
        containers = store.containers(namespace)
        exact = [c for c in containers if ident == c.id or ident in c.names]
        if not exact and "/" in ident and store.runtime == CONTAINERD and namespace is None:
            ns, _, short = ident.partition("/")
            exact = [c for c in store.containers(ns) if short == c.id]
        if not exact and len(ident) >= _MIN_PREFIX:
            exact = [c for c in containers if c.id.startswith(ident)]
        found += [(store, c) for c in exact]
    if not found:
        raise NotFound(f"no container {ident!r} in any detected store")
    store, container = _one(
        found, f"container {ident!r}", lambda p: f"{_where(p[0], p[1].namespace)}: {p[1].id}"
    )
    label = f"container:{container.id}"
    if not container.snapshot_key:
        raise CorruptStore(f"{label}: the container record names no rootfs snapshot/layer")
    snaps = {
        s.key: s
        for s in store.snapshots(namespace=container.namespace, snapshotter=container.snapshotter)
    }
    top = snaps.get(container.snapshot_key)
    if top is None:
        raise CorruptStore(
            f"{label}: its rootfs {container.snapshot_key} is not in the store "
            f"({_where(store, container.namespace)})"
        )
    chain = _chain(snaps, top, label)
    return AuditTarget(
        label,
        KIND_CONTAINER,
        _loader(_dir_layers(chain), label),
        _details(store, container.namespace, image=container.image, key=container.snapshot_key),
    )


# -- image:REF ---------------------------------------------------------------------------------


def find_image(stores: Sequence[Store], ref: str, namespace: str | None) -> tuple[Store, Image]:
    candidates = [(store, image) for store in stores for image in store.images(namespace)]
    for rule in _IMAGE_RULES:
        matches = [(s, i) for s, i in candidates if rule(ref, i)]
        if matches:
            return _one(
                matches, f"image {ref!r}", lambda p: f"{_where(p[0], p[1].namespace)}: {p[1].name}"
            )
    if namespace is None and "/" in ref:
        ns, _, short = ref.partition("/")
        scoped = [
            (store, image)
            for store in stores
            if store.runtime == CONTAINERD
            for image in store.images(ns)
        ]
        for rule in _IMAGE_RULES:
            matches = [(s, i) for s, i in scoped if rule(short, i)]
            if matches:
                return _one(
                    matches,
                    f"image {ref!r}",
                    lambda p: f"{_where(p[0], p[1].namespace)}: {p[1].name}",
                )
    raise NotFound(f"no image {ref!r} in any detected store")


def _names(image: Image) -> tuple[str, ...]:
    return (image.name, *image.names)


def _normalized(ref: str) -> set[str]:
    """The references a short name stands for (docker's and podman's defaults)."""
    base, at, digest = ref.partition("@")
    last = base.rpartition("/")[2]
    tagged = base if ":" in last or at else base + ":latest"
    full = tagged + (at + digest if at else "")
    first = full.split("/", 1)[0]
    if "/" not in full:
        return {f"docker.io/library/{full}", f"localhost/{full}"}
    if "." in first or ":" in first or first == "localhost":
        return {full}
    return {f"docker.io/{full}", f"localhost/{full}"}


def _by_id(ref: str, image: Image) -> bool:
    if not _HEX.match(ref):
        return False
    bare = ref.removeprefix("sha256:")
    ids = [x.removeprefix("sha256:") for x in (image.id, image.digest or "") if x]
    return any(x == bare or (len(bare) >= _MIN_PREFIX and x.startswith(bare)) for x in ids)


_IMAGE_RULES: tuple[Callable[[str, Image], bool], ...] = (
    lambda ref, image: ref in _names(image),
    lambda ref, image: bool(_normalized(ref) & set(_names(image))),
    _by_id,
    lambda ref, image: any(
        n.endswith("/" + ref) or n.endswith("/" + ref + ":latest") for n in _names(image)
    ),
)


def image_target(store: Store, image: Image, cache: LayerCache | None = None) -> AuditTarget:
    """The target ``image:REF``; ``cache`` shares layer listings with other images."""
    label = f"image:{image.name}" + (f" (namespace {image.namespace})" if image.namespace else "")
    details = _details(store, image.namespace, image=image.name, id=image.id)

    def load(progress: LayerProgress | None = None) -> list[LayerListing]:
        # Finding the layers is part of loading, so that with --all-images one broken image
        # fails alone.
        if store.runtime == CSTORAGE:
            if not image.top_layer:
                return []
            snaps = {s.key: s for s in store.snapshots()}
            top = snaps.get(image.top_layer)
            if top is None:
                raise CorruptStore(f"{label}: its top layer {image.top_layer} is not in the store")
            layers: Sequence[_DirLayer | _BlobLayer] = _dir_layers(_chain(snaps, top, label))
        else:
            layers = _containerd_image_layers(store, image, label)
        return _loader(layers, label, cache)(progress)

    return AuditTarget(label, KIND_IMAGE, load, details)


def _containerd_image_layers(
    store: Store, image: Image, label: str
) -> list[_DirLayer | _BlobLayer]:
    if not isinstance(store, ContainerdStore):
        raise TypeError("a containerd image needs a ContainerdStore")
    if not image.digest or image.namespace is None:
        raise CorruptStore(f"{label}: the image record has no target")
    blobs = store.meta.namespaces[image.namespace].blobs
    walker = ImageWalker(store.content_store, blobs.__contains__, HostPlatform())
    manifest = _host_manifest(walker, Descriptor(image.media_type or "", image.digest, 0), label)
    children = walker.children(manifest)
    if not children:
        raise CorruptStore(f"{label}: manifest {manifest.digest} is not in the content store")
    config, layers = children[0], children[1:]
    config_doc = (
        store.content_store.read_json(config.digest) if walker.available(config.digest) else None
    )
    diff_ids = _diff_ids(config_doc)
    if diff_ids is not None and len(diff_ids) == len(layers):
        unpacked = _unpacked(store, image.namespace, _chain_ids(diff_ids), label)
        if unpacked is not None:
            return unpacked
    out: list[_DirLayer | _BlobLayer] = []
    for layer in layers:
        path = store.content_store.blob_path(layer.digest)
        if path is None or not walker.available(layer.digest) or not os.path.isfile(path):
            raise CorruptStore(
                f"{label}: layer {layer.digest} is neither unpacked into "
                "snapshots nor in the content store"
            )
        out.append(_BlobLayer(path, layer.digest))
    return out


def _host_manifest(walker: ImageWalker, target: Descriptor, label: str) -> Descriptor:
    """The manifest this host would run: ``target`` itself, or the best platform match
    down its (nested) indexes, in containerd's preference order."""
    host = walker.host
    desc = target
    for _ in range(8):
        if desc.media_type in MANIFEST_TYPES:
            return desc
        if desc.media_type not in INDEX_TYPES:
            raise CorruptStore(
                f"{label}: target {desc.digest} has media type "
                f"{desc.media_type!r}, neither a manifest nor an index"
            )
        kids = walker.children(desc)
        if kids is None:
            raise CorruptStore(f"{label}: index {desc.digest} is not in the content store")
        ranked = sorted(
            (
                (len(host.vector) if k.platform is None else host.rank(k.platform), i, k)
                for i, k in enumerate(kids)
            ),
            key=lambda item: (item[0] is None, item[0] or 0, item[1]),
        )
        if not ranked or ranked[0][0] is None:
            raise NotFound(f"{label}: no manifest for this host's platform ({host.spec.format()})")
        desc = ranked[0][2]
    raise CorruptStore(f"{label}: indexes nested too deep")


def _unpacked(
    store: Store, namespace: str, chain_ids: list[str], label: str
) -> list[_DirLayer | _BlobLayer] | None:
    """The snapshot layers of an unpacked image, ``None`` when no snapshotter has its top
    chain ID (overlayfs preferred)."""
    by_snapshotter: dict[str, dict[str, Snapshot]] = {}
    for snap in store.snapshots(namespace=namespace):
        by_snapshotter.setdefault(snap.snapshotter, {})[snap.key] = snap
    for name in sorted(by_snapshotter, key=lambda n: (n != "overlayfs", n)):
        snaps = by_snapshotter[name]
        top = snaps.get(chain_ids[-1])
        if top is None:
            continue
        chain = _chain(snaps, top, label)
        if [s.key for s in chain] != chain_ids:
            raise CorruptStore(
                f"{label}: snapshot chain of {top.key} ({len(chain)} layers) "
                f"does not match the image's {len(chain_ids)} layers"
            )
        return list(_dir_layers(chain))
    return None


def _diff_ids(config: object) -> list[str] | None:
    rootfs = config.get("rootfs") if isinstance(config, dict) else None
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if isinstance(ids, list) and ids and all(isinstance(x, str) for x in ids):
        return ids
    return None


def _chain_ids(diff_ids: Sequence[str]) -> list[str]:
    chain: list[str] = []
    for diff_id in diff_ids:
        chain.append(
            diff_id
            if not chain
            else "sha256:" + hashlib.sha256(f"{chain[-1]} {diff_id}".encode()).hexdigest()
        )
    return chain


# -- --all-images ------------------------------------------------------------------------------


def every_image(stores: Iterable[Store], namespace: str | None) -> list[AuditTarget]:
    """Every image of ``stores``, sharing one ``LayerCache``: most images of a node stack the
    same few base layers, read once this way."""
    cache = LayerCache()
    return [
        image_target(store, image, cache)
        for store in stores
        for image in store.images(namespace)
    ]


# -- helpers -----------------------------------------------------------------------------------

T = TypeVar("T")


def _one(found: list[T], what: str, describe: Callable[[T], str]) -> T:
    if len(found) == 1:
        return found[0]
    shown = "; ".join(describe(x) for x in found[:5])
    more = f" and {len(found) - 5} more" if len(found) > 5 else ""
    raise BadInput(
        f"{what} is ambiguous: {len(found)} matches ({shown}{more}); "
        "give the full id or name, or the namespace as NS/NAME"
    )
