"""Who uses which layer in a containers/storage store: the facts every store check needs once.

A layer is **reached** when an image (its top layer or one of its ``mapped-layers``) or a
container (its RW ``layer``) names it or one of its descendants: the walk follows ``parent``
links, as c/storage's ``Check`` does for "layer not referenced by any images or containers".
A layer is **referenced** when it is reached or some layer record names it as parent (c/storage
refuses to delete a layer with children).

Additional image stores (storage.conf ``additionalimagestores``) are read-only stores whose
layers and images a container or layer of this store may use: a parent or image found there is
known, never missing. Their records are read without locks (nobody writes a read-only store);
one that cannot be decoded falls back to its ``overlay/`` directory names for layers and to
nothing for images.

Nothing here writes, and nothing follows a symlink: the graph is built from the records the
store read at open plus directory listings.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from crifs.cstorage import overlay
from crifs.cstorage.paths import StorePaths
from crifs.cstorage.records import (
    ContainerRecord,
    ImageRecord,
    LayerRecord,
    parse_images,
    parse_layers,
)
from crifs.cstorage.store import CStorageStore
from crifs.errors import CrifsError

_R = TypeVar("_R", LayerRecord, ImageRecord)


@dataclass(frozen=True, slots=True)
class User:
    """An image or container that reaches a layer: ``kind`` is ``image`` or ``container``,
    ``name`` what a user types (first name, else the id)."""

    kind: str
    id: str
    name: str


@dataclass(slots=True)
class LayerGraph:
    """Layers of one store and of its additional image stores, with their users."""

    paths: StorePaths
    layers: dict[str, LayerRecord]
    images: dict[str, ImageRecord]
    containers: dict[str, ContainerRecord]
    children: dict[str, list[str]]
    extra_layers: dict[str, LayerRecord] = field(default_factory=dict)
    extra_layer_ids: frozenset[str] = frozenset()
    extra_image_ids: frozenset[str] = frozenset()
    users: dict[str, list[User]] = field(default_factory=dict)
    additional_homes: tuple[str, ...] = ()
    dirs: frozenset[str] = frozenset()  # layer directories of this store's driver home
    _ancestors: dict[str, tuple[list[str], str | None]] = field(default_factory=dict)

    def has_dir(self, layer_id: str) -> bool:
        """True when ``overlay/<id>`` is a real directory (listed once, never followed)."""
        return layer_id in self.dirs

    def known_layer(self, layer_id: str) -> bool:
        """True when this store or an additional image store has the layer."""
        return layer_id in self.layers or layer_id in self.extra_layer_ids

    def known_image(self, image_id: str) -> bool:
        return image_id in self.images or image_id in self.extra_image_ids

    def record(self, layer_id: str) -> LayerRecord | None:
        return self.layers.get(layer_id) or self.extra_layers.get(layer_id)

    def ancestors(self, layer_id: str) -> tuple[list[str], str | None]:
        """The layer's parent chain, parent first, and the first parent id that no store has
        (``None`` when the chain ends at a base layer). A cycle ends the walk at the repeat.
        The returned list is shared (memoised): do not modify it."""
        memo = self._ancestors
        found = memo.get(layer_id)
        if found is not None:
            return found
        chain: list[str] = []
        seen = {layer_id}
        record = self.record(layer_id)
        missing: str | None = None
        while record is not None and record.parent:
            parent = record.parent
            if parent in seen:
                break
            if not self.known_layer(parent):
                missing = parent
                break
            known = memo.get(parent)
            if known is not None and not seen.intersection(known[0]):
                chain.append(parent)
                chain.extend(known[0])
                missing = known[1]
                break
            seen.add(parent)
            chain.append(parent)
            record = self.record(parent)
        memo[layer_id] = (chain, missing)
        return chain, missing

    def depth(self, layer_id: str) -> int:
        """Number of known ancestors: the base layer is 0. Repairs run deepest first."""
        return len(self.ancestors(layer_id)[0])

    def reached(self, layer_id: str) -> bool:
        return bool(self.users.get(layer_id))

    def referenced(self, layer_id: str) -> bool:
        return self.reached(layer_id) or bool(self.children.get(layer_id))

    def users_of(self, layer_id: str) -> list[User]:
        return list(self.users.get(layer_id, ()))


_GRAPHS: weakref.WeakKeyDictionary[CStorageStore, LayerGraph] = weakref.WeakKeyDictionary()


def layer_graph(store: CStorageStore) -> LayerGraph:
    """The graph of ``store``, built once per opened store (its records never change after
    open); reads only the additional stores' records."""
    graph = _GRAPHS.get(store)
    if graph is None:
        graph = _GRAPHS[store] = _build(store)
    return graph


def _build(store: CStorageStore) -> LayerGraph:
    layers = {layer.id: layer for layer in store.layer_records}
    children: dict[str, list[str]] = {}
    for layer in store.layer_records:
        if layer.parent:
            children.setdefault(layer.parent, []).append(layer.id)
    extra_layers, extra_layer_ids, extra_image_ids = _additional_stores(store.additional_homes)
    graph = LayerGraph(
        paths=store.paths,
        layers=layers,
        images={image.id: image for image in store.image_records},
        containers={c.id: c for c in store.container_records},
        children=children,
        extra_layers=extra_layers,
        extra_layer_ids=frozenset(extra_layer_ids),
        extra_image_ids=frozenset(extra_image_ids),
        additional_homes=tuple(store.additional_homes),
        dirs=frozenset(overlay.list_layer_dirs(store.paths)),
    )
    for image in store.image_records:
        user = User("image", image.id, image.names[0] if image.names else image.id)
        _mark(graph, user, (image.layer, *image.mapped_layers))
    for container in store.container_records:
        user = User("container", container.id,
                    container.names[0] if container.names else container.id)
        _mark(graph, user, (container.layer,))
    return graph


def _mark(graph: LayerGraph, user: User, tops: Iterable[str | None]) -> None:
    for top in tops:
        if not top:
            continue
        for layer_id in _self_and_ancestors(graph, top):
            marked = graph.users.setdefault(layer_id, [])
            # One user is marked in one pass, so a layer it already has ends the walk: its
            # ancestors have it too (keeps a base layer shared by many images linear).
            if marked and marked[-1] == user:
                break
            marked.append(user)


def _self_and_ancestors(graph: LayerGraph, layer_id: str) -> Iterator[str]:
    yield layer_id
    yield from graph.ancestors(layer_id)[0]


def _additional_stores(homes: Iterable[str]
                       ) -> tuple[dict[str, LayerRecord], set[str], set[str]]:
    records: dict[str, LayerRecord] = {}
    layer_ids: set[str] = set()
    image_ids: set[str] = set()
    for home in homes:
        # A driver home is <store root>/overlay; its records live beside it.
        paths = StorePaths(os.path.dirname(home), "", driver=os.path.basename(home))
        layer_ids.update(overlay.list_layer_dirs(paths))
        for layer in _read_records(paths.layers_json, parse_layers):
            records.setdefault(layer.id, layer)
            layer_ids.add(layer.id)
        image_ids.update(image.id for image in _read_records(paths.images_json, parse_images))
    return records, layer_ids, image_ids


def _read_records(path: str, parse: Callable[[str, bytes], list[_R]]) -> list[_R]:
    try:
        with open(path, "rb") as f:
            data = f.read()
        return parse(path, data)
    except (OSError, CrifsError):
        return []
