"""Rewriting ``layers.json``, ``images.json`` and ``mountpoints.json`` the way c/storage saves
them: the whole array marshalled compactly, written to a temporary file, fsync'ed and renamed
over the old one (c/storage ``ioutils.AtomicWriteFile``, mode 0600), so a reader sees the old
or the new file and never a torn one.

Only the entries a change names are touched; every other entry is written back exactly as
decoded, unknown fields included. The caller holds the file's lock for writing and records
the write on it afterwards (``crifs.repair.locks.CStorageWriteLocks.record_write``).

:class:`RecordBook` holds the raw entries of every record file for a writer: read once under
the write locks, changed in memory and saved from there (nobody else writes meanwhile).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

from crifs.cstorage.paths import StorePaths
from crifs.cstorage.records import decode_array
from crifs.errors import CorruptStore
from crifs.repair.fsops import Scope, write_file

Entries = list[dict[str, Any]]
INCOMPLETE = "incomplete"
RECORD_MODE = 0o600


def read_entries(path: str) -> Entries:
    """The raw objects of a record file; a missing or empty file is ``[]``. ``CorruptStore``
    names the file when it is not a JSON array of objects."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    except OSError as err:
        raise CorruptStore(f"cannot read: {os.strerror(err.errno or 0)}", path=path) from None
    return [dict(entry) for entry in decode_array(path, data)]


def encode_entries(entries: Entries) -> bytes:
    """Compact JSON as Go's ``json.Marshal`` writes it (UTF-8, no spaces)."""
    return json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def rewrite(path: str, change: Callable[[Entries], bool], *, scope: Scope,
            scratch: str | None = None) -> bool:
    """Apply ``change`` to the entries of ``path`` and save them atomically when it reports a
    change. Returns whether the file was written."""
    entries = read_entries(path)
    if not change(entries):
        return False
    write_file(scope, path, encode_entries(entries), mode=record_mode(path), scratch=scratch)
    return True


def record_mode(path: str) -> int:
    """The mode of an existing record file (kept on rewrite), else c/storage's 0600."""
    try:
        return os.lstat(path).st_mode & 0o7777
    except OSError:
        return RECORD_MODE


# -- changes -----------------------------------------------------------------------------


def flag_incomplete(layer_id: str) -> Callable[[Entries], bool]:
    """Set ``flags.incomplete = true`` on the layer (c/storage's first delete step)."""

    def change(entries: Entries) -> bool:
        for entry in entries:
            if entry.get("id") == layer_id:
                flags = entry.get("flags")
                if not isinstance(flags, dict):
                    flags = {}
                if flags.get(INCOMPLETE) is True:
                    return False
                entry["flags"] = {**flags, INCOMPLETE: True}
                return True
        return False

    return change


def flag_incomplete_all(layer_ids: Collection[str]) -> Callable[[Entries], bool]:
    """:func:`flag_incomplete` for several layers in one pass (one save for all of them)."""
    wanted = set(layer_ids)

    def change(entries: Entries) -> bool:
        changed = False
        for entry in entries:
            if entry.get("id") not in wanted:
                continue
            flags = entry.get("flags")
            if not isinstance(flags, dict):
                flags = {}
            if flags.get(INCOMPLETE) is not True:
                entry["flags"] = {**flags, INCOMPLETE: True}
                changed = True
        return changed

    return change


def drop_ids(entry_ids: Collection[str]) -> Callable[[Entries], bool]:
    """Remove every entry whose ``id`` is one of ``entry_ids`` (one pass)."""
    wanted = set(entry_ids)

    def change(entries: Entries) -> bool:
        kept = [e for e in entries if e.get("id") not in wanted]
        if len(kept) == len(entries):
            return False
        entries[:] = kept
        return True

    return change


def drop_id(entry_id: str) -> Callable[[Entries], bool]:
    """Remove every entry whose ``id`` is ``entry_id``."""

    def change(entries: Entries) -> bool:
        kept = [e for e in entries if e.get("id") != entry_id]
        if len(kept) == len(entries):
            return False
        entries[:] = kept
        return True

    return change


def layer_record_files(paths: StorePaths) -> list[str]:
    """Files a layer record can live in: ``layers.json`` then the volatile ones."""
    graph = os.path.join(paths.layers_dir, "volatile-layers.json")
    run = os.path.join(paths.run_layers_dir, "volatile-layers.json")
    return list(dict.fromkeys([paths.layers_json, paths.volatile_layers_json, graph, run]))


def container_record_files(paths: StorePaths) -> list[str]:
    graph = os.path.join(paths.containers_dir, "volatile-containers.json")
    run = os.path.join(paths.run_containers_dir, "volatile-containers.json")
    return list(dict.fromkeys([paths.containers_json, paths.volatile_containers_json, graph,
                               run]))


class RecordBook:
    """The store's record files as raw entries, read once under the write locks and kept in
    step with our own saves (nobody else can write while we hold the locks). Whoever changes
    the layer entries in ``files`` calls :meth:`changed` (the id index is rebuilt lazily)."""

    def __init__(self, paths: StorePaths) -> None:
        self.layer_files = layer_record_files(paths)
        self.files: dict[str, Entries] = {p: read_entries(p) for p in self.layer_files}
        for path in (paths.images_json, paths.mountpoints_json):
            self.files[path] = read_entries(path)
        self.images_json = paths.images_json
        self.containers = [c for p in container_record_files(paths)
                           for c in read_entries(p)]
        self._index: dict[str, tuple[str, Mapping[str, Any]]] | None = None

    def changed(self) -> None:
        """Layer entries were added, dropped or replaced: forget the id index."""
        self._index = None

    def _layer_index(self) -> dict[str, tuple[str, Mapping[str, Any]]]:
        """id -> (file, entry) of the first entry with that id, in ``layer_files`` order."""
        if self._index is None:
            index: dict[str, tuple[str, Mapping[str, Any]]] = {}
            for path in self.layer_files:
                for entry in self.files[path]:
                    layer_id = entry.get("id")
                    if isinstance(layer_id, str):
                        index.setdefault(layer_id, (path, entry))
            self._index = index
        return self._index

    def layers(self) -> Iterator[Mapping[str, Any]]:
        for path in self.layer_files:
            yield from self.files[path]

    def layer(self, layer_id: str) -> Mapping[str, Any] | None:
        hit = self._layer_index().get(layer_id)
        return hit[1] if hit is not None else None

    def file_of_layer(self, layer_id: str) -> str | None:
        hit = self._layer_index().get(layer_id)
        return hit[0] if hit is not None else None

    def image(self, image_id: str) -> Mapping[str, Any] | None:
        return next((e for e in self.files[self.images_json] if e.get("id") == image_id), None)

    def blocker(self, layer_id: str) -> str | None:
        """Why c/storage would refuse to delete this (complete) layer, or ``None``."""
        for c in self.containers:
            if c.get("layer") == layer_id:
                return f"it is container {c.get('id')}'s layer"
        for image in self.files[self.images_json]:
            if image.get("layer") == layer_id or layer_id in (image.get("mapped-layers")
                                                              or ()):
                return f"it is the top layer of image {image.get('id')}"
        for layer in self.layers():
            if layer.get("parent") == layer_id:
                return f"layer {layer.get('id')} is its child"
        return None

    def blockers(self, layer_ids: Collection[str], going: Collection[str] = (),
                 kept: Mapping[str, str] | None = None) -> dict[str, str]:
        """Why c/storage would refuse to delete each of ``layer_ids`` (complete layers) when
        they are deleted together with ``going`` (layers deleted regardless, e.g. already
        incomplete): :meth:`blocker`, except that a child which is itself being deleted does
        not block; a layer kept for any reason (``kept``: layer -> why, e.g. mounted) keeps
        its parents too. Layers not in the answer may all be deleted. One pass over the
        records, not one per layer."""
        users: dict[str, str] = {}
        for c in self.containers:
            users.setdefault(str(c.get("layer")), f"it is container {c.get('id')}'s layer")
        for image in self.files[self.images_json]:
            mapped = image.get("mapped-layers")
            for layer in [image.get("layer"), *(mapped if isinstance(mapped, list) else ())]:
                users.setdefault(str(layer), f"it is the top layer of image {image.get('id')}")
        children: dict[str, list[str]] = {}
        parents: dict[str, str] = {}
        for layer in self.layers():
            parent, child = layer.get("parent"), layer.get("id")
            if isinstance(parent, str) and parent:
                children.setdefault(parent, []).append(str(child))
                if isinstance(child, str):
                    parents.setdefault(child, parent)
        checked = dict.fromkeys(layer_ids)
        deleting = {*checked, *going}
        blocked: dict[str, str] = {}
        for layer_id in checked:
            why = users.get(layer_id) or next(
                (f"layer {c} is its child" for c in children.get(layer_id, ())
                 if c not in deleting), None) or (kept or {}).get(layer_id)
            if why is not None:
                blocked[layer_id] = why
        pending = list(blocked)
        while pending:  # a kept layer keeps its parent (c/storage deletes children first)
            child = pending.pop()
            parent = parents.get(child)
            if parent is not None and parent in checked and parent not in blocked:
                blocked[parent] = f"layer {child} is its child"
                pending.append(parent)
        return blocked
