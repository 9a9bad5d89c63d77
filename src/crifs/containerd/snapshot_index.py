"""Lookups over one read of a containerd store's snapshot records, and the ``ctr`` commands
that act on them.

The index follows ``meta.db``'s ``parent`` fields (what GC and mounts use), never the
``children`` buckets, which are only a removal guard and may be stale (containerd#11908).

Commands are printed for a person to run against the live daemon: every argument is
shell-quoted (extraction keys contain a space) and the snapshotter is always named, so a
``CONTAINERD_SNAPSHOTTER`` in the user's environment cannot redirect them.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from crifs.containerd.metadata import ContainerRecord, SnapshotRecord
from crifs.containerd.snapshotter import BackendRecord, SnapshotterDB

if TYPE_CHECKING:
    from crifs.containerd.store import ContainerdStore

MetaKey = tuple[str, str, str]  # (namespace, snapshotter, user key)

# A throw-away name for the snapshot/lease that makes containerd run its GC.
GC_TRIGGER = "crifs-gc-trigger"


@dataclass(slots=True)
class SnapshotIndex:
    """``meta.db`` snapshot records of every namespace, with their children (by ``parent``),
    the containers that name them and the records naming each backend key."""

    records: dict[MetaKey, SnapshotRecord] = field(default_factory=dict)
    children: dict[MetaKey, list[MetaKey]] = field(default_factory=dict)
    containers: dict[MetaKey, list[ContainerRecord]] = field(default_factory=dict)
    by_backend: dict[tuple[str, str], MetaKey] = field(default_factory=dict)  # (ss, name)

    @classmethod
    def of(cls, store: ContainerdStore) -> SnapshotIndex:
        index = cls()
        for record in store.snapshot_records():
            key = (record.namespace, record.snapshotter, record.key)
            index.records[key] = record
            if record.name:
                index.by_backend[(record.snapshotter, record.name)] = key
        for key, record in index.records.items():
            if record.parent:
                parent = (key[0], key[1], record.parent)
                index.children.setdefault(parent, []).append(key)
        for container in store.container_records():
            if container.snapshotter:
                key = (container.namespace, container.snapshotter, container.snapshot_key)
                index.containers.setdefault(key, []).append(container)
        return index

    def descendants(self, key: MetaKey) -> list[MetaKey]:
        """Every record below ``key``, deepest first (the order removal must take)."""
        out: list[MetaKey] = []
        seen = {key}
        # iterative post-order: a child is emitted after all of its own children
        stack: list[tuple[MetaKey, bool]] = [(c, False) for c in
                                             sorted(self.children.get(key, ()), reverse=True)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                out.append(node)
                continue
            if node in seen:
                continue
            seen.add(node)
            stack.append((node, True))
            stack += [(c, False) for c in sorted(self.children.get(node, ()), reverse=True)]
        return out

    def depth(self, key: MetaKey) -> int:
        """Number of parents above ``key`` that exist (0 for a base layer)."""
        depth = 0
        seen = {key}
        record = self.records.get(key)
        while record is not None and record.parent:
            parent = (key[0], key[1], record.parent)
            if parent in seen:
                break
            seen.add(parent)
            record = self.records.get(parent)
            if record is None:
                break
            depth += 1
        return depth


def backend_children(db: SnapshotterDB) -> dict[str, list[BackendRecord]]:
    """Backend records by their parent's backend key."""
    out: dict[str, list[BackendRecord]] = {}
    for record in db.records.values():
        if record.parent:
            out.setdefault(record.parent, []).append(record)
    return out


def backend_subtree(children: dict[str, list[BackendRecord]], key: str) -> Iterator[BackendRecord]:
    """Every backend record below ``key`` (any order, each once)."""
    stack = list(children.get(key, ()))
    seen = {key}
    while stack:
        record = stack.pop()
        if record.key in seen:
            continue
        seen.add(record.key)
        yield record
        stack.extend(children.get(record.key, ()))


def backend_depth(db: SnapshotterDB, record: BackendRecord) -> int:
    depth = 0
    seen = {record.key}
    current = record
    while current.parent and current.parent not in seen:
        parent = db.records.get(current.parent)
        if parent is None:
            break
        seen.add(parent.key)
        depth += 1
        current = parent
    return depth


def split_backend_key(name: str) -> tuple[str | None, str]:
    """``"<ns>/<seq>/<key>"`` → ``(ns, key)``; ``(None, name)`` when it has not that shape."""
    parts = name.split("/", 2)
    if len(parts) == 3 and parts[1].isdigit():
        return parts[0], parts[2]
    return None, name


# -- ctr commands -------------------------------------------------------------------------------


def ctr(namespace: str, *args: str) -> str:
    """``ctr -n NS ARGS`` with every argument shell-quoted."""
    return shlex.join(["ctr", "-n", namespace, *args])


def ctr_snapshots(namespace: str, snapshotter: str, *args: str) -> str:
    return ctr(namespace, "snapshots", "--snapshotter", snapshotter, *args)


def removal_commands(index: SnapshotIndex, key: MetaKey) -> list[str]:
    """The commands that remove ``key`` and everything below it, children first; a snapshot
    a container names is removed with its container (``ctr containers rm`` drops both)."""
    ns, ss, _ = key
    out: list[str] = []
    for node in [*index.descendants(key), key]:
        users = index.containers.get(node)
        if users:
            out += [ctr(ns, "containers", "rm", c.id) for c in users]
        else:
            out.append(ctr_snapshots(ns, ss, "rm", node[2]))
    return out


def gc_trigger_commands(namespace: str, snapshotter: str | None = None) -> list[str]:
    """Commands that make containerd run its GC now. With ``snapshotter``, a snapshot is
    created and removed first: GC prunes a snapshotter's backend records and runs its
    ``Cleanup`` only when a snapshot removal marked that snapshotter dirty."""
    out: list[str] = []
    if snapshotter is not None:
        out += [ctr_snapshots(namespace, snapshotter, "prepare", GC_TRIGGER),
                ctr_snapshots(namespace, snapshotter, "rm", GC_TRIGGER)]
    out += [ctr(namespace, "leases", "create", "--id", GC_TRIGGER),
            ctr(namespace, "leases", "rm", "--sync", GC_TRIGGER)]
    return out
