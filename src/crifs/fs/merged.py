"""The merged view of a layer stack, built in memory without mounting anything.

Layers are applied bottom (position 0) first, the way an overlay mount or an OCI unpacker
stacks them, and the view remembers which layer provides each visible path and why a path that
once existed is gone. Rules (OCI image-spec ``layer.md``, kernel ``overlayfs.rst``):

- Deletion markers of layer N act on layers below N only: an opaque directory hides every lower
  child of that directory, a whiteout deletes the lower path and its subtree. Markers act first,
  so an entry of layer N at a whited-out path, or below its own opaque directory, stays.
- Markers act on the literal path, never through a symlink: a whiteout of ``lib/x`` where a
  lower ``lib`` is a symlink to ``usr/lib`` deletes nothing in ``usr/lib``
  (anchore/stereoscope#694).
- A directory over a directory merges (the upper one's metadata wins, the children stay); any
  other entry replaces what was there, and a non-directory replacing a directory removes the
  subtree.
- Every layer implies its entries' parent directories, and the parents of its whiteouts, and
  its opaque directories: a layer holding ``a/b`` has a directory ``a``, which replaces a lower
  non-directory ``a`` (a symlink included), as unpacking into an overlay upper dir does.
- The root always exists as a directory.

Deletions are recorded per path: whiteout, opaque, or ``replaced`` (a lower subtree removed
because a directory was replaced by a non-directory). A path re-added by a later layer has no
deletion.

Memory: a single layer is viewed in place (its ``entries`` dict is shared, never copied); a
stack copies the bottom layer once and keeps provenance only for implicit directories: the
provider of an explicit entry is found by asking the layers top-down, which costs a few dict
lookups per query and no per-path storage. The view must not be used while a listing it was
built from is being changed.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, compress, repeat

from crifs.fs.listing import PLAIN_DIR, Entry, EntryKind, LayerListing, fast_constructor

WHITEOUT = "whiteout"
OPAQUE = "opaque"
REPLACED = "replaced"

_DIR = EntryKind.DIR
_SYMLINK = EntryKind.SYMLINK
_HARDLINK = EntryKind.HARDLINK
_MAX_HARDLINK_CHAIN = 64  # a guard against a chain that loops; real chains are short
_ABSENT = Entry(EntryKind.FIFO)  # stands for "no entry" where a kind must be read


@dataclass(frozen=True, slots=True)
class Node:
    """A visible path: what it is and the ``index`` of the layer that provides it."""

    entry: Entry
    layer: int


@dataclass(frozen=True, slots=True)
class Deletion:
    """Why a path that once existed is gone.

    ``entry`` is what was deleted, ``layer_added`` the layer that had provided it,
    ``layer_deleted`` the layer whose marker or entry removed it; ``how`` is ``"whiteout"``,
    ``"opaque"`` or ``"replaced"``; ``cause`` the path of that whiteout, opaque directory or
    replacing entry (``b""`` for the root).
    """

    entry: Entry
    layer_added: int
    layer_deleted: int
    how: str
    cause: bytes = b""


class MergedView:
    """The rootfs a stack of layers shows, path by path (paths as in ``crifs.fs.listing``).

    ``layers`` are given bottom first; ``Node.layer`` and the layers of a ``Deletion`` are the
    ``LayerListing.index`` values, which must grow with the position in the stack.
    """

    def __init__(self, layers: Sequence[LayerListing]) -> None:
        self.layers: list[LayerListing] = list(layers)
        self._position = {layer.index: pos for pos, layer in enumerate(self.layers)}
        self._deletions: dict[bytes, Deletion] = {}
        # Implicit directories and the layer implying them. For a stack they are also stored
        # in ``_entries`` (a private dict); for a single layer ``_entries`` is the layer's own
        # dict, so they live here only and are computed when first needed.
        self._implicit: dict[bytes, int] | None
        self._implicit_stored = len(self.layers) != 1
        self._single_consistent = True
        if not self.layers:
            self._entries: dict[bytes, Entry] = {}
            self._implicit = {}
        elif len(self.layers) == 1:
            self._entries = self.layers[0].entries
            # a layer that lists every parent directory implies none (a directory walk)
            self._implicit = {} if self.layers[0].dirs_complete else None
        else:
            merge = _Merge(self.layers)
            merge.run()
            self._entries = merge.entries
            self._implicit = merge.implicit
            self._deletions = merge.deletions

    # -- queries ------------------------------------------------------------------------

    def entry(self, path: bytes) -> Entry | None:
        """The visible entry at ``path`` (implicit directories as ``PLAIN_DIR``), or ``None``.

        The fast query the resolver uses; ``node`` adds the providing layer.
        """
        found = self._entries.get(path)
        if found is not None:
            return found
        if not path:
            return PLAIN_DIR
        implicit = self._implicit if self._implicit is not None else self._single_implicit()
        return PLAIN_DIR if path in implicit else None

    @property
    def consistent(self) -> bool:
        """True when every visible path's ancestors are directories, as a stack's merge makes
        them; a single layer can break this (a tar with a file ``a`` and a member ``a/b``)."""
        if self._implicit_stored:
            return True
        self._single_implicit()
        return self._single_consistent

    def entry_getter(self) -> Callable[[bytes], Entry | None]:
        """A faster ``entry`` for hot loops that may miss implicit directories and the root:
        on ``None``, ask ``entry``."""
        return self._entries.get

    def node(self, path: bytes) -> Node | None:
        """The visible node at ``path``; implicit parent directories exist as directories."""
        found = self.entry(path)
        if found is None:
            return None
        return Node(found, self.provider(path))

    def provider(self, path: bytes) -> int:
        """The index of the layer providing the visible ``path`` (bottom layer for the root).

        Meaningful only for a visible path.
        """
        if not self._implicit_stored:
            return self.layers[0].index  # a single layer provides everything it shows
        assert self._implicit is not None
        layer = self._implicit.get(path)
        if layer is not None:
            return layer
        for listing in reversed(self.layers):
            if path in listing.entries:
                return listing.index
        return self.layers[0].index if self.layers else 0

    def deletion(self, path: bytes) -> Deletion | None:
        """Why ``path``, which some layer had, is gone now (the latest deletion), else ``None``."""
        return self._deletions.get(path)

    def hardlink_source(self, path: bytes, entry: Entry) -> Entry | None:
        """What a tar hard link at ``path`` shares its inode with, or ``None`` if not found.

        The chain of link names is followed in the providing layer, then in the layers below
        it (a cross-layer link), so a hard link to a symlink is a symlink.
        """
        if not self.layers:
            return None
        start = self._position.get(self.provider(path), len(self.layers) - 1)
        current = entry
        for _ in range(_MAX_HARDLINK_CHAIN):
            target = current.target
            found: Entry | None = None
            for pos in range(start, -1, -1):
                found = self.layers[pos].entries.get(target)
                if found is not None:
                    break
            if found is None:
                return None
            if found.kind is not _HARDLINK:
                return found
            current = found
        return None

    def symlinks(self) -> Iterator[tuple[bytes, Node]]:
        """Every visible symlink, sorted by path; a tar hard link to a symlink counts as one.

        The node's entry is the symlink's own entry (for a hard link: its source).
        """
        for path, node, _ in self.symlink_nodes():
            yield path, node

    def symlink_nodes(self) -> Iterator[tuple[bytes, Node, bool]]:
        """As ``symlinks``, with a flag that is ``True`` when the node's entry is the one
        stored at the path (``False`` for a tar hard link to a symlink)."""
        entries = self._entries
        paths = self._link_paths()
        paths.sort()
        single = None if self._implicit_stored else self.layers[0].index
        providers = self._providers(paths) if single is None else {}
        notable = self.layers[0].notable if single is not None else None
        # the small dict of a single layer's notable entries: fewer cache misses
        get = notable.__getitem__ if notable is not None else entries.__getitem__
        for path in paths:
            found = get(path)
            own = True
            if found.kind is _HARDLINK:
                source = self.hardlink_source(path, found)
                if source is None or source.kind is not _SYMLINK:
                    continue
                found = source
                own = False
            layer = single if single is not None else providers.get(path, self.layers[0].index)
            yield path, _node(found, layer), own

    def link_count(self) -> int:
        """The number of visible symlinks and tar hard links: at least as many as
        ``symlinks`` lists (a hard link counts there only when its source is a symlink)."""
        return len(self._link_paths())

    def _link_paths(self) -> list[bytes]:
        """The visible paths whose entry is a symlink or a tar hard link, unordered.

        When every layer has its ``notable`` entries, only those are looked at (a visible
        symlink is some layer's entry; for one layer they are the visible entries, in a
        stack a lookup tells which are still visible); else every entry. C-level filtering
        either way: the kinds are read once, then each wanted kind picked out."""
        notables = [layer.notable for layer in self.layers]
        candidates: Collection[bytes]
        found: Iterable[Entry]
        if len(notables) == 1 and notables[0] is not None:
            candidates, found = notables[0].keys(), notables[0].values()
        elif notables and all(notable is not None for notable in notables):
            candidates = set(chain.from_iterable(notables))  # type: ignore[arg-type]
            found = map(self._entries.get, candidates, repeat(_ABSENT))  # type: ignore[arg-type]
        else:
            candidates, found = self._entries.keys(), self._entries.values()
        kinds = list(map(operator.attrgetter("kind"), found))
        paths = list(compress(candidates, map(operator.is_, kinds, repeat(_SYMLINK))))
        paths += compress(candidates, map(operator.is_, kinds, repeat(_HARDLINK)))
        return paths

    def _providers(self, paths: list[bytes]) -> dict[bytes, int]:
        """``provider`` of many visible paths that are not directories, at once: a set
        intersection per layer (C-level) instead of up to one lookup per layer per path."""
        remaining = set(paths)
        found: dict[bytes, int] = {}
        # symlinks and hard links are never implicit directories: the layers alone decide
        for listing in reversed(self.layers):
            if not remaining:
                break
            here = listing.entries.keys() & remaining
            found.update(dict.fromkeys(here, listing.index))
            remaining -= here
        return found

    def paths(self) -> Iterable[bytes]:
        """Every visible path (the root only if a layer lists it), unordered."""
        implicit = self._implicit if self._implicit_stored else self._single_implicit()
        if self._implicit_stored or not implicit:
            return self._entries.keys()  # a collection: may be iterated twice without a copy
        return chain(self._entries.keys(), implicit.keys())

    def items(self) -> Iterator[tuple[bytes, Entry]]:
        """Every visible path (the root only if a layer lists it) and its entry, unordered."""
        yield from self._entries.items()
        if not self._implicit_stored:
            for path in self._single_implicit():
                yield path, PLAIN_DIR

    def __len__(self) -> int:
        """The number of visible paths, the root not counted."""
        count = len(self._entries) - (1 if b"" in self._entries else 0)
        if not self._implicit_stored:
            count += len(self._single_implicit())
        return count

    def __contains__(self, path: object) -> bool:
        return isinstance(path, bytes) and self.entry(path) is not None

    # -- internals ----------------------------------------------------------------------

    def _single_implicit(self) -> dict[bytes, int]:
        """Implicit directories of a single layer, found once by one pass over its paths."""
        if self._implicit is None:
            layer = self.layers[0]
            entries = layer.entries
            implicit: dict[bytes, int] = {}
            index = layer.index
            first = operator.itemgetter(0)
            for source in (entries, layer.whiteouts):
                # each distinct parent once, found without a Python-level loop over the paths
                parents = set(map(first, map(bytes.rpartition, source, repeat(b"/"))))
                for parent in parents:
                    while parent and parent not in implicit:
                        listed = entries.get(parent)
                        if listed is not None:
                            if listed.kind is not _DIR:
                                self._single_consistent = False
                            break
                        implicit[parent] = index
                        parent = parent.rpartition(b"/")[0]
            for path in layer.opaque:
                while path and path not in entries and path not in implicit:
                    implicit[path] = index
                    path = path.rpartition(b"/")[0]
            self._implicit = implicit
        return self._implicit


class _Merge:
    """One bottom-up application of a stack of layers; see the module doc for the rules.

    Invariant after each layer: every stored path's ancestors are stored directories.
    """

    def __init__(self, layers: list[LayerListing]) -> None:
        self.layers = layers
        self.entries: dict[bytes, Entry] = {}
        self.implicit: dict[bytes, int] = {}
        self.deletions: dict[bytes, Deletion] = {}
        # parent -> child paths; built only when a directory subtree must be removed
        self.children: dict[bytes, set[bytes]] | None = None

    def run(self) -> None:
        for pos, layer in enumerate(self.layers):
            if pos == 0:
                self._apply_bottom(layer)
            else:
                self._apply(pos, layer)

    def _apply_bottom(self, layer: LayerListing) -> None:
        # Nothing lies below: copy the dict in one go, then fill in implied parents.
        entries = self.entries
        entries.update(layer.entries)
        index = layer.index
        if layer.dirs_complete:  # every parent is listed as a directory: none to imply
            self._imply_marker_dirs(layer)
            return
        parents = set(map(operator.itemgetter(0), map(bytes.rpartition, entries, repeat(b"/"))))
        for parent in parents:  # each distinct parent once, not each path
            if parent and not _is_dir(entries.get(parent)):
                self._make_implicit_dir(parent, index)
                self._ensure_parents(parent, index)
        self._imply_marker_dirs(layer)

    def _apply(self, pos: int, layer: LayerListing) -> None:
        entries = self.entries
        index = layer.index
        for opaque in layer.opaque:
            if not opaque or _is_dir(entries.get(opaque)):
                self._remove_children(opaque, pos, OPAQUE, opaque)
        for whiteout in layer.whiteouts:
            if whiteout and whiteout in entries:
                self._remove(whiteout, pos, WHITEOUT, whiteout)
        self._imply_marker_dirs(layer)
        deletions = self.deletions
        implicit = self.implicit
        for path, entry in layer.entries.items():
            old = entries.get(path)
            if old is None:
                if path:
                    self._add(path, entry)
                    parent = entries.get(path.rpartition(b"/")[0])
                    if parent is None or parent.kind is not _DIR:
                        self._ensure_parents(path, index)
                elif entry.kind is _DIR:
                    entries[path] = entry
                continue
            if old.kind is _DIR and entry.kind is not _DIR:
                if not path:
                    continue  # the root stays a directory
                self._remove_children(path, pos, REPLACED, path)
            entries[path] = entry
            implicit.pop(path, None)
            deletions.pop(path, None)

    def _imply_marker_dirs(self, layer: LayerListing) -> None:
        index = layer.index
        for whiteout in layer.whiteouts:
            self._ensure_parents(whiteout, index)
        for opaque in layer.opaque:
            if opaque and not _is_dir(self.entries.get(opaque)):
                self._make_implicit_dir(opaque, index)
            self._ensure_parents(opaque, index)

    def _ensure_parents(self, path: bytes, index: int) -> None:
        entries = self.entries
        parent = path.rpartition(b"/")[0]
        while parent:
            old = entries.get(parent)
            if old is not None and old.kind is _DIR:
                return
            self._make_implicit_dir(parent, index)
            parent = parent.rpartition(b"/")[0]

    def _make_implicit_dir(self, path: bytes, index: int) -> None:
        # A lower non-directory here has no children (invariant), so nothing else goes.
        if path in self.entries:
            self.entries[path] = PLAIN_DIR
        else:
            self._add(path, PLAIN_DIR)
        self.implicit[path] = index
        self.deletions.pop(path, None)

    def _add(self, path: bytes, entry: Entry) -> None:
        self.entries[path] = entry
        self.deletions.pop(path, None)
        children = self.children
        if children is not None:
            parent = path.rpartition(b"/")[0]
            siblings = children.get(parent)
            if siblings is None:
                children[parent] = {path}
            else:
                siblings.add(path)

    def _remove(self, path: bytes, pos: int, how: str, cause: bytes) -> None:
        old = self.entries[path]
        if old.kind is _DIR:
            self._remove_children(path, pos, how, cause)
        self._record(path, old, pos, how, cause)
        del self.entries[path]
        children = self.children
        if children is not None:
            siblings = children.get(path.rpartition(b"/")[0])
            if siblings is not None:
                siblings.discard(path)

    def _remove_children(self, path: bytes, pos: int, how: str, cause: bytes) -> None:
        children = self._children_index()
        stack = list(children.pop(path, ()))
        entries = self.entries
        while stack:
            child = stack.pop()
            self._record(child, entries[child], pos, how, cause)
            del entries[child]
            grandchildren = children.pop(child, None)
            if grandchildren:
                stack.extend(grandchildren)

    def _record(self, path: bytes, old: Entry, pos: int, how: str, cause: bytes) -> None:
        added = self.implicit.pop(path, None)
        if added is None:
            added = self._lower_provider(path, pos)
        self.deletions[path] = Deletion(old, added, self.layers[pos].index, how, cause)

    def _lower_provider(self, path: bytes, pos: int) -> int:
        for lower in range(pos - 1, -1, -1):
            if path in self.layers[lower].entries:
                return self.layers[lower].index
        return self.layers[0].index

    def _children_index(self) -> dict[bytes, set[bytes]]:
        if self.children is None:
            children: dict[bytes, set[bytes]] = {}
            for path in self.entries:
                if not path:
                    continue
                parent = path.rpartition(b"/")[0]
                siblings = children.get(parent)
                if siblings is None:
                    children[parent] = {path}
                else:
                    siblings.add(path)
            self.children = children
        return self.children


_node = fast_constructor(Node)


def _is_dir(entry: Entry | None) -> bool:
    return entry is not None and entry.kind is _DIR
