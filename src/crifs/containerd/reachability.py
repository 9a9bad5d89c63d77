"""containerd's garbage-collection mark phase, computed offline from one ``meta.db`` read.

This answers "what would containerd's GC keep?" with containerd's own rules
(``metadata/gc.go`` ``scanRoots``/``references``; reference: containerd.md §3), so a check can
name what GC would collect but has not yet (it runs only after mutations, never on a timer).

Nodes are ``(kind, namespace, key)``; a snapshot's key is ``"<snapshotter>/<user key>"`` as in
containerd. Per namespace the **roots** are:

- leases whose ``containerd.io/gc.expire`` (RFC 3339) has not passed, with their content,
  snapshots, ingests (and, 2.x, images); ``containerd.io/gc.flat`` makes those roots *flat*:
  label references are not followed from them, parent links still are;
- images: their target digest and label references (2.x: the image itself is a node, and an
  image whose ``containerd.io/gc.expire`` passed is not a root);
- ingests whose ``expireat`` is in the future;
- content blobs and snapshots labelled ``containerd.io/gc.root`` (any value);
- containers: their ``snapshotter``/``snapshotKey`` and label references;
- sandboxes: their label references.

**Edges**: content → its label references; snapshot → its parent and label references;
ingest → its ``expected`` digest; image (2.x) → target and label references; plus the
back-references of containerd 2.2 (``containerd.io/gc.bref.*`` on X names an object that
keeps X). A reference to a missing object is a dead edge, as in containerd. The
``children`` buckets are never read: GC does not use them.

Not modelled: containerd 2.3's conditional references (``containerd.io/gc.cond.*``).
"""

from __future__ import annotations

import datetime as dt
import re
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from crifs.containerd import schema
from crifs.containerd.metadata import LeaseRecord

if TYPE_CHECKING:
    from crifs.containerd.store import ContainerdStore

CONTENT, SNAPSHOT, INGEST, IMAGE, LEASE, CONTAINER, SANDBOX = (
    "content", "snapshot", "ingest", "image", "lease", "container", "sandbox")

Node = tuple[str, str, str]  # (kind, namespace, key)

LABEL_ROOT = "containerd.io/gc.root"
LABEL_EXPIRE = "containerd.io/gc.expire"
LABEL_FLAT = "containerd.io/gc.flat"
_REF = "containerd.io/gc.ref."
_BREF = "containerd.io/gc.bref."
_REF_CONTENT = "containerd.io/gc.ref.content"
_REF_SNAPSHOT = "containerd.io/gc.ref.snapshot."
_REF_IMAGE = "containerd.io/gc.ref.image"
_BREF_CONTENT = "containerd.io/gc.bref.content"
_BREF_SNAPSHOT = "containerd.io/gc.bref.snapshot."
_BREF_IMAGE = "containerd.io/gc.bref.image"
_BREF_CONTAINER = "containerd.io/gc.bref.container"

# Go's time.Parse(time.RFC3339, ...) accepts exactly this shape (fraction optional).
_RFC3339 = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)$")


def snapshot_node(namespace: str, snapshotter: str, key: str) -> Node:
    return (SNAPSHOT, namespace, f"{snapshotter}/{key}")


def parse_expiry(value: str | None) -> dt.datetime | None:
    """A ``containerd.io/gc.expire`` value as an aware time; ``None`` when absent or invalid
    (containerd ignores an invalid value and keeps the lease)."""
    if value is None or not _RFC3339.match(value):
        return None
    text = value[:-1] + "+00:00" if value.endswith("Z") else value
    head, sep, rest = text.partition(".")
    if sep:  # Python takes at most 6 fraction digits; Go up to 9
        digits = re.match(r"\d+", rest)
        assert digits is not None
        text = f"{head}.{digits.group()[:6].ljust(6, '0')}{rest[digits.end():]}"
    try:
        return dt.datetime.fromisoformat(text)
    except ValueError:
        return None


def _named(key: str, prefix: str) -> bool:
    """``key`` is ``prefix`` itself or ``prefix`` followed by a ``.``/``/`` name."""
    return key == prefix or (key.startswith(prefix) and key[len(prefix)] in "./")


def label_references(namespace: str, labels: Mapping[str, str], images: bool) -> Iterator[Node]:
    """The nodes ``labels`` reference (``gc.ref.content*``, ``gc.ref.snapshot.<ss>[/…]`` and,
    when ``images`` (2.x), ``gc.ref.image*``)."""
    for key, value in labels.items():
        if not key.startswith(_REF):
            continue
        if _named(key, _REF_CONTENT):
            yield (CONTENT, namespace, value)
        elif key.startswith(_REF_SNAPSHOT):
            snapshotter = key[len(_REF_SNAPSHOT):].split("/", 1)[0]
            yield snapshot_node(namespace, snapshotter, value)
        elif images and _named(key, _REF_IMAGE):
            yield (IMAGE, namespace, value)


def _back_references(namespace: str, labels: Mapping[str, str]) -> Iterator[Node]:
    """The nodes that keep the labelled object alive through its ``gc.bref.*`` labels."""
    for key, value in labels.items():
        if not key.startswith(_BREF):
            continue
        if _named(key, _BREF_CONTENT):
            yield (CONTENT, namespace, value)
        elif key.startswith(_BREF_SNAPSHOT):
            snapshotter = key[len(_BREF_SNAPSHOT):].split("/", 1)[0]
            yield snapshot_node(namespace, snapshotter, value)
        elif _named(key, _BREF_IMAGE):
            yield (IMAGE, namespace, value)
        elif _named(key, _BREF_CONTAINER):
            yield (CONTAINER, namespace, value)


@dataclass(frozen=True, slots=True)
class LeaseState:
    """A lease and whether GC still honours it at ``now``."""

    record: LeaseRecord
    expires: dt.datetime | None
    expired: bool


@dataclass(slots=True)
class Marking:
    """The result of the mark phase at ``now``.

    ``marked``: every node GC keeps. ``roots``: why each root is one (``"gc.root label"``,
    ``"lease L"``, ``"image NAME"``, ``"container ID"`` …). ``via``: for a node reached through
    an edge, the node it was first reached from. ``leases_of``: per resource node, the leases
    that list it (live or expired).
    """

    now: dt.datetime
    marked: set[Node] = field(default_factory=set)
    roots: dict[Node, str] = field(default_factory=dict)
    via: dict[Node, Node] = field(default_factory=dict)
    leases: list[LeaseState] = field(default_factory=list)
    leases_of: dict[Node, list[LeaseState]] = field(default_factory=dict)

    def live_leases_of(self, node: Node) -> list[LeaseState]:
        return [x for x in self.leases_of.get(node, ()) if not x.expired]

    def expired_leases_of(self, node: Node) -> list[LeaseState]:
        return [x for x in self.leases_of.get(node, ()) if x.expired]

    def reason(self, node: Node) -> str | None:
        """Why ``node`` is kept: its root reason, or the chain that reaches it, nearest
        first (``"referenced by content sha256:… (image NAME)"``)."""
        if node not in self.marked:
            return None
        hops: list[Node] = []
        current = node
        seen = {node}
        while current not in self.roots and current in self.via:
            current = self.via[current]
            if current in seen:
                break
            seen.add(current)
            hops.append(current)
        root_reason = self.roots.get(current, "a reference")
        if not hops:
            return root_reason
        first = hops[0]
        return f"referenced by {first[0]} {first[2]} ({root_reason})"


_cache: weakref.WeakKeyDictionary[ContainerdStore, Marking] = weakref.WeakKeyDictionary()


def mark(store: ContainerdStore, now: dt.datetime) -> Marking:
    """The mark phase over every namespace of ``store`` at ``now`` (cached per store and
    instant, so the detectors of one check share it)."""
    cached = _cache.get(store)
    if cached is not None and cached.now == now:
        return cached
    marking = _Marker(store, now).run()
    _cache[store] = marking
    return marking


class _Marker:
    def __init__(self, store: ContainerdStore, now: dt.datetime) -> None:
        self.store = store
        self.now = now
        self.images_are_nodes = store.meta.db_version == schema.DB_VERSION_2X
        self.marking = Marking(now)
        meta = store.meta
        self.blobs = {(ns, d): b for ns, rec in meta.namespaces.items()
                      for d, b in rec.blobs.items()}
        self.snapshots = {(ns, f"{ss}/{r.key}"): r for ns, rec in meta.namespaces.items()
                          for ss, records in rec.snapshots.items() for r in records}
        self.ingests = {(i.namespace, i.ref): i for i in store.ingests()}
        self.images = {(i.namespace, i.name): i for i in store.image_records()}
        self.back_refs: dict[Node, list[Node]] = {}
        # (node, flat) pairs still to visit
        self.stack: list[tuple[Node, bool, Node | None]] = []

    def run(self) -> Marking:
        self._collect_back_references()
        for ns in self.store.meta.namespaces:
            self._roots(ns)
        for (ns, digest), blob in self.blobs.items():
            if LABEL_ROOT in blob.labels:
                self.root((CONTENT, ns, digest), "gc.root label")
        for (ns, key), snap in self.snapshots.items():
            if LABEL_ROOT in snap.labels:
                self.root((SNAPSHOT, ns, key), "gc.root label")
        self._mark()
        return self.marking

    def root(self, node: Node, reason: str, flat: bool = False) -> None:
        self.marking.roots.setdefault(node, reason)
        self.stack.append((node, flat, None))

    def _collect_back_references(self) -> None:
        def add(owner: Node, labels: Mapping[str, str]) -> None:
            for keeper in _back_references(owner[1], labels):
                self.back_refs.setdefault(keeper, []).append(owner)

        for (ns, digest), blob in self.blobs.items():
            add((CONTENT, ns, digest), blob.labels)
        for (ns, key), snap in self.snapshots.items():
            add((SNAPSHOT, ns, key), snap.labels)
        if self.images_are_nodes:
            for (ns, name), image in self.images.items():
                add((IMAGE, ns, name), image.labels)

    def _roots(self, ns: str) -> None:
        """Leases, images, ingests, containers and sandboxes of ``ns`` (labelled roots are
        added by ``run`` for all namespaces at once)."""
        store, now, marking = self.store, self.now, self.marking
        nodes_of_images = self.images_are_nodes
        for lease in store.leases(ns):
            expires = parse_expiry(lease.labels.get(LABEL_EXPIRE))
            state = LeaseState(lease, expires, expires is not None and now > expires)
            marking.leases.append(state)
            resources: list[Node] = [(CONTENT, ns, d) for d in lease.content]
            resources += [snapshot_node(ns, ss, key) for ss, key in lease.snapshots]
            resources += [(INGEST, ns, ref) for ref in lease.ingests]
            if nodes_of_images:
                resources += [(IMAGE, ns, name) for name in lease.images]
            for node in resources:
                marking.leases_of.setdefault(node, []).append(state)
            if state.expired:
                continue
            lease_node = (LEASE, ns, lease.id)
            marking.marked.add(lease_node)
            marking.roots[lease_node] = f"lease {lease.id}"
            flat = LABEL_FLAT in lease.labels
            for node in resources:
                self.root(node, f"lease {lease.id}", flat and node[0] != INGEST)
        for image in store.image_records(ns):
            reason = f"image {image.name}"
            if nodes_of_images:
                expires = parse_expiry(image.labels.get(LABEL_EXPIRE))
                if expires is None or not now > expires:
                    self.root((IMAGE, ns, image.name), reason)
                continue
            if image.target is not None and image.target.digest is not None:
                self.root((CONTENT, ns, image.target.digest), reason)
            for node in label_references(ns, image.labels, False):
                self.root(node, reason)
        for ingest in store.ingests(ns):
            if ingest.expire_at is not None and not now > ingest.expire_at:
                self.root((INGEST, ns, ingest.ref), f"ingest {ingest.ref} (expires "
                          f"{ingest.expire_at.isoformat()})")
        for container in store.container_records(ns):
            reason = f"container {container.id}"
            container_node = (CONTAINER, ns, container.id)
            marking.marked.add(container_node)
            marking.roots[container_node] = reason
            if container.snapshotter:
                self.root(snapshot_node(ns, container.snapshotter, container.snapshot_key),
                          reason)
            for node in label_references(ns, container.labels, nodes_of_images):
                self.root(node, reason)
            self._back_of(container_node)
        for sandbox in store.sandboxes(ns):
            reason = f"sandbox {sandbox.id}"
            sandbox_node = (SANDBOX, ns, sandbox.id)
            marking.marked.add(sandbox_node)
            marking.roots[sandbox_node] = reason
            for node in label_references(ns, sandbox.labels, nodes_of_images):
                self.root(node, reason)

    def _back_of(self, node: Node) -> None:
        for owner in self.back_refs.get(node, ()):
            self.stack.append((owner, False, node))

    def _mark(self) -> None:
        marking = self.marking
        visited: set[tuple[Node, bool]] = set()
        stack = self.stack
        while stack:
            node, flat, source = stack.pop()
            if (node, flat) in visited:
                continue
            visited.add((node, flat))
            if node not in marking.marked:
                marking.marked.add(node)
                if source is not None and node not in marking.roots:
                    marking.via.setdefault(node, source)
            for target, target_flat in self._edges(node, flat):
                stack.append((target, target_flat, node))
            for owner in self.back_refs.get(node, ()):
                stack.append((owner, False, node))

    def _edges(self, node: Node, flat: bool) -> Iterable[tuple[Node, bool]]:
        kind, ns, key = node
        images = self.images_are_nodes
        if kind == CONTENT:
            blob = self.blobs.get((ns, key))
            if blob is None or flat:
                return ()
            return [(n, False) for n in label_references(ns, blob.labels, images)]
        if kind == SNAPSHOT:
            snap = self.snapshots.get((ns, key))
            if snap is None:
                return ()
            out: list[tuple[Node, bool]] = []
            if snap.parent:
                out.append((snapshot_node(ns, snap.snapshotter, snap.parent), flat))
            if not flat:
                out += [(n, False) for n in label_references(ns, snap.labels, images)]
            return out
        if kind == INGEST:
            ingest = self.ingests.get((ns, key))
            if ingest is None or not ingest.expected:
                return ()
            return [((CONTENT, ns, ingest.expected), False)]
        if kind == IMAGE:
            image = self.images.get((ns, key))
            if image is None:
                return ()
            out = []
            if image.target is not None and image.target.digest is not None:
                out.append(((CONTENT, ns, image.target.digest), False))
            if not flat:
                out += [(n, False) for n in label_references(ns, image.labels, images)]
            return out
        return ()
