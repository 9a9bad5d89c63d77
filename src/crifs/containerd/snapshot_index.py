"""Lookups over one read of a containerd store's snapshot records, and the ``ctr`` commands
that act on them, each with the containerd API calls that do the same (``CtrOp``).

The index follows ``meta.db``'s ``parent`` fields (what GC and mounts use), never the
``children`` buckets, which are only a removal guard and may be stale (containerd#11908).

Commands are printed for a person to run against the live daemon: every argument is
shell-quoted (extraction keys contain a space) and the snapshotter is always named, so a
``CONTAINERD_SNAPSHOTTER`` in the user's environment cannot redirect them.
"""

from __future__ import annotations

import hashlib
import shlex
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from crifs.containerd.metadata import ContainerRecord, SnapshotRecord
from crifs.containerd.snapshotter import BackendRecord, SnapshotterDB
from crifs.repair.actions import ApiCall

if TYPE_CHECKING:
    from crifs.containerd.store import ContainerdStore

MetaKey = tuple[str, str, str]  # (namespace, snapshotter, user key)

# A throw-away name for the snapshot/lease/write that makes containerd run its GC.
GC_TRIGGER = "crifs-gc-trigger"
GC_TRIGGER_BLOB = b"crifs gc trigger\n"
GC_TRIGGER_DIGEST = "sha256:" + hashlib.sha256(GC_TRIGGER_BLOB).hexdigest()
# ``Repair.order`` of repairs that unblock others (a stale children entry makes the removal
# of its parent fail): before any removal, whose order is minus a depth.
UNBLOCKING = -(1 << 20)


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


# -- ctr commands and their API equivalents -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class CtrOp:
    """One ``ctr`` command line and the containerd API calls that do the same, built together
    so they cannot drift. ``calls`` is ``None`` when crifs makes no API equivalent: then a
    repair made of it has commands only, and crifs leaves it to the user."""

    command: str
    calls: tuple[ApiCall, ...] | None


def ctr(namespace: str, *args: str) -> str:
    """``ctr -n NS ARGS`` with every argument shell-quoted."""
    return shlex.join(["ctr", "-n", namespace, *args])


def ctr_snapshots(namespace: str, snapshotter: str, *args: str) -> str:
    return ctr(namespace, "snapshots", "--snapshotter", snapshotter, *args)


def api_call(service: str, method: str, namespace: str, **fields: str) -> ApiCall:
    """An :class:`ApiCall` with ``fields`` in the order given (empty ones left out)."""
    return ApiCall(service, method, namespace, tuple((k, v) for k, v in fields.items() if v))


def snapshot_prepare(namespace: str, snapshotter: str, key: str,
                     parent: str | None = None) -> CtrOp:
    """``ctr snapshots prepare KEY [PARENT]``. (ctr also labels it ``gc.root``; crifs removes
    what it prepares right after, so its calls do not, and a crash leaves GC garbage.)"""
    args = ("prepare", key) + ((parent,) if parent else ())
    return CtrOp(ctr_snapshots(namespace, snapshotter, *args),
                 (api_call("snapshots", "Prepare", namespace, snapshotter=snapshotter, key=key,
                           parent=parent or ""),))


def snapshot_remove(namespace: str, snapshotter: str, key: str) -> CtrOp:
    return CtrOp(ctr_snapshots(namespace, snapshotter, "rm", key),
                 (api_call("snapshots", "Remove", namespace, snapshotter=snapshotter, key=key),))


def container_remove(namespace: str, container_id: str) -> CtrOp:
    """``ctr containers rm ID``: no API equivalent here, since ctr also deletes the
    container's stopped task and refuses a running one (the tasks service crifs does not
    call)."""
    return CtrOp(ctr(namespace, "containers", "rm", container_id), None)


def lease_create(namespace: str, lease_id: str) -> CtrOp:
    return CtrOp(ctr(namespace, "leases", "create", "--id", lease_id),
                 (api_call("leases", "Create", namespace, id=lease_id),))


def lease_remove(namespace: str, lease_id: str, *, sync: bool = False) -> CtrOp:
    """``ctr leases rm [--sync] ID``; with sync containerd runs its GC before answering."""
    return CtrOp(ctr(namespace, "leases", "rm", *(("--sync",) if sync else ()), lease_id),
                 (api_call("leases", "Delete", namespace, id=lease_id,
                           sync="true" if sync else ""),))


def content_remove(namespace: str, digest: str) -> CtrOp:
    return CtrOp(ctr(namespace, "content", "rm", digest),
                 (api_call("content", "Delete", namespace, digest=digest),))


def chained(*ops: CtrOp) -> CtrOp:
    """``A && B``: the second command only after the first succeeded."""
    calls: tuple[ApiCall, ...] | None = ()
    for op in ops:
        calls = None if calls is None or op.calls is None else calls + op.calls
    return CtrOp(" && ".join(op.command for op in ops), calls)


def commands_of(ops: Iterable[CtrOp]) -> tuple[str, ...]:
    return tuple(op.command for op in ops)


def calls_of(ops: Iterable[CtrOp]) -> tuple[ApiCall, ...]:
    """Every op's calls in order, or none at all when one op has no API equivalent (doing
    only part of a removal through the API would leave it half done)."""
    out: list[ApiCall] = []
    for op in ops:
        if op.calls is None:
            return ()
        out += op.calls
    return tuple(out)


def removal_ops(index: SnapshotIndex, key: MetaKey) -> list[CtrOp]:
    """Remove ``key`` and everything below it, children first; a snapshot a container names
    is removed with its container (``ctr containers rm`` drops both)."""
    ns, ss, _ = key
    out: list[CtrOp] = []
    for node in [*index.descendants(key), key]:
        users = index.containers.get(node)
        if users:
            out += [container_remove(ns, c.id) for c in users]
        else:
            out.append(snapshot_remove(ns, ss, node[2]))
    return out


def gc_trigger_ops(namespace: str, snapshotter: str | None = None) -> list[CtrOp]:
    """Make containerd run its GC now. With ``snapshotter``, a snapshot is created and removed
    first: GC prunes a snapshotter's backend records and runs its ``Cleanup`` only when a
    snapshot removal marked that snapshotter dirty."""
    out: list[CtrOp] = []
    if snapshotter is not None:
        out += [snapshot_prepare(namespace, snapshotter, GC_TRIGGER),
                snapshot_remove(namespace, snapshotter, GC_TRIGGER)]
    return out + [lease_create(namespace, GC_TRIGGER),
                  lease_remove(namespace, GC_TRIGGER, sync=True)]


def content_gc_calls(namespace: str) -> tuple[ApiCall, ...]:
    """Make containerd's content GC run now: it walks the blob files and ingest directories
    and removes every one no namespace's ``meta.db`` names, but only after a content record
    was deleted. So a tiny trigger blob is written, its record deleted, and GC run."""
    return (api_call("content", "Write", namespace, ref=GC_TRIGGER,
                     data=GC_TRIGGER_BLOB.decode()),
            api_call("content", "Delete", namespace, digest=GC_TRIGGER_DIGEST),
            *calls_of([lease_create(namespace, GC_TRIGGER),
                       lease_remove(namespace, GC_TRIGGER, sync=True)]))


def is_gc_trigger(call: ApiCall) -> bool:
    """Whether ``call`` only serves to make containerd's GC run (on a trigger object), so
    an executor may run each distinct one once, after every other call."""
    fields = dict(call.fields)
    return GC_TRIGGER in (fields.get("key"), fields.get("id"), fields.get("ref")) or \
        fields.get("digest") == GC_TRIGGER_DIGEST


def trigger_namespace(store: ContainerdStore, snapshotter: str | None = None) -> str:
    """A namespace that exists in ``store`` (one using ``snapshotter`` when given), so a GC
    trigger does not create a namespace; ``default`` for an empty store."""
    if snapshotter is not None:
        used = sorted({r.namespace for r in store.snapshot_records()
                       if r.snapshotter == snapshotter})
        if used:
            return used[0]
    return next(iter(sorted(store.namespaces())), "default")
