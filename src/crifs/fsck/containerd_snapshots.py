"""containerd snapshot consistency: C1 C2 C3 C4 C5 C6 C9.

Three places must agree about a snapshot: its ``meta.db`` record (user key, ``name`` = backend
key, ``parent`` user key, ``children`` guard), the snapshotter's ``metadata.db`` record
(backend key, numeric ``id``, ``parent`` backend key, the ``parents`` index) and the directory
``snapshots/<id>``. Each class is one way they disagree:

- C1 a directory (``<id>``, ``new-*``, ``rm-*``) no snapshotter record owns;
- C2 a snapshotter record whose directory is missing;
- C3 a snapshotter record no namespace's ``meta.db`` names (``ctr`` cannot see it);
- C4 a ``meta.db`` record whose snapshotter record is missing (``ctr snapshots ls`` skips it);
- C5 a parent link (either database) to a record that does not exist;
- C6 a ``children`` entry (or snapshotter ``parents`` entry) naming a child that is gone,
  which makes ``ctr snapshots rm`` of the parent fail (containerd#11908);
- C9 an Active snapshot no container uses, kept alive by something other than a live lease
  (what GC would collect is C7, in ``containerd_gc``).

Reclaimable space is measured only for orphan or unused ``snapshots/<id>`` directories;
referenced snapshots are never walked. Snapshotters whose ``metadata.db`` crifs cannot read
are checked on the ``meta.db`` side only (C5, C6).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from typing import TYPE_CHECKING

from crifs.containerd import schema
from crifs.containerd.metadata import SnapshotRecord
from crifs.containerd.reachability import LABEL_ROOT, Marking, mark, snapshot_node
from crifs.containerd.snapshot_index import (
    UNBLOCKING,
    CtrOp,
    MetaKey,
    SnapshotIndex,
    backend_children,
    backend_depth,
    backend_subtree,
    calls_of,
    chained,
    commands_of,
    gc_trigger_ops,
    removal_ops,
    snapshot_prepare,
    snapshot_remove,
    split_backend_key,
    trigger_namespace,
)
from crifs.containerd.snapshotter import BackendRecord, SnapshotterDB
from crifs.fs.usage import Meter
from crifs.fsck.catalogue import severity_of
from crifs.fsck.findings import CheckOptions, Finding, Reclaimable, Repair, reclaimable_of
from crifs.model import CONTAINERD, SnapshotKind
from crifs.repair.actions import RemovePath

if TYPE_CHECKING:
    from crifs.containerd.store import ContainerdStore

ISSUE_STALE_CHILDREN = "containerd#11908"
# Snapshotters whose Cleanup (run by containerd's GC) removes directories no record owns.
CLEANED_BY_GC = frozenset({schema.OVERLAYFS})


def findings(store: ContainerdStore, opts: CheckOptions, meter: Meter) -> list[Finding]:
    """C1-C6 and C9 for every snapshotter crifs reads (C5/C6 also for the others)."""
    check = _Check(store, opts, meter)
    out: list[Finding] = []
    for name in store.snapshotter_names:
        db = store.snapshotter_db(name)
        assert db is not None
        out += check.orphan_dirs(db)
        out += check.missing_dirs(db)
        out += check.backend_only(db)
        out += check.backend_missing(db)
    out += check.dangling_parents()
    out += check.stale_children()
    out += check.unused_actives()
    return out


def containerd_finding(code: str, obj: str, message: str, *, path: str | None = None,
                       namespace: str | None = None, reclaimable: Reclaimable | None = None,
                       repair: Repair | None = None, evidence: Mapping[str, object] | None = None
                       ) -> Finding:
    """A containerd finding of class ``code``, with the class's severity (also used by
    ``containerd_gc``)."""
    return Finding(code, severity_of(code), CONTAINERD, obj, message, path, namespace,
                   reclaimable, repair, evidence or {})


def ctr_repair(summary: str, ops: list[CtrOp], *, gc: bool = False, order: int = 0) -> Repair:
    """A repair made of ``ctr`` commands, with the API calls that do the same."""
    return Repair(summary, commands=commands_of(ops), gc=gc, order=order, calls=calls_of(ops))


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


class _Check:
    def __init__(self, store: ContainerdStore, opts: CheckOptions, meter: Meter) -> None:
        self.store = store
        self.opts = opts
        self.meter = meter
        self.now = opts.clock()
        self.index = SnapshotIndex.of(store)

    def measure(self, *paths: str) -> Reclaimable | None:
        if not self.opts.measure:
            return None
        return reclaimable_of(self.meter.measure(*paths))

    def named(self, db: SnapshotterDB, record: BackendRecord) -> MetaKey | None:
        return self.index.by_backend.get((db.name, record.key))

    def object_of(self, db: SnapshotterDB, record: BackendRecord) -> tuple[str, str | None]:
        """What a user types for ``record``: the user key of the meta.db record naming it,
        else the backend key; and the namespace."""
        named = self.named(db, record)
        if named is not None:
            return named[2], named[0]
        namespace, _ = split_backend_key(record.key)
        return record.key, namespace

    # -- C1 ------------------------------------------------------------------------------------

    def orphan_dirs(self, db: SnapshotterDB) -> list[Finding]:
        directory = os.path.join(db.root, "snapshots")
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            return []
        known = {str(r.id) for r in db.records.values() if r.id is not None}
        by_id = db.by_id()
        lost_parent_of: dict[str, list[str]] = {}
        for link in db.parents():
            if link.parent_id not in by_id:
                lost_parent_of.setdefault(str(link.parent_id), []).append(link.child_key)
        # With the daemon running, its GC runs the snapshotter's Cleanup, which removes them.
        cleanup = tuple(calls_of(gc_trigger_ops(trigger_namespace(self.store, db.name),
                                                db.name))) if db.name in CLEANED_BY_GC else ()
        out: list[Finding] = []
        for entry in entries:
            name = entry.name
            if name in known:
                continue
            try:
                mtime = entry.stat(follow_symlinks=False).st_mtime
            except OSError:
                continue  # removed while we looked
            age = int(self.now.timestamp() - mtime)
            evidence: dict[str, object] = {"snapshotter": db.name, "name": name,
                                           "id_sequence": db.id_sequence, "age_seconds": age}
            where = f"{db.name} snapshot dir {name}"
            # native implements no Cleanup: nothing in containerd ever removes its leftovers
            never = ("the native snapshotter has no Cleanup" if db.name == schema.NATIVE
                     else "containerd's Cleanup has not run since")
            if name.startswith("new-"):
                evidence["kind"] = "temporary"
                message = (f"{where} is the temporary directory of a Prepare or View that never "
                           "finished (a crash, or one in flight right now): no snapshotter "
                           f"record names it and {never}")
            elif name.startswith("rm-"):
                evidence["kind"] = "removing"
                message = (f"{where} was renamed for removal but never deleted (the remove "
                           f"crashed or failed), and {never}")
            elif name.isdigit() and int(name) > db.id_sequence:
                evidence["kind"] = "id"
                message = (f"{where} is in no snapshotter record and its id is above the id "
                           f"counter ({db.id_sequence}): metadata.db was replaced or restored "
                           "from an older copy, or the directory never came from it")
            elif name.isdigit():
                evidence["kind"] = "id"
                message = (f"{where} is in no snapshotter record: left by a crash or an "
                           f"asynchronous remove, and {never}")
            else:
                evidence["kind"] = "other"
                message = (f"{where} is not a snapshot directory; containerd's Cleanup "
                           "removes every entry here that no record owns")
            lost_children = lost_parent_of.get(name)
            if lost_children:
                evidence["parent_of"] = sorted(lost_children)
                message += (f"; the parents index still names it the parent of "
                            f"{lost_children[0]}, so it may be that snapshot's lost parent")
                repair = Repair("left in place: a metadata.db repair may still need it as "
                                "the parent of a recorded snapshot")
            else:
                repair = Repair("remove the orphan directory (what containerd's Cleanup does)",
                                actions=(RemovePath(entry.path),), gc=True, calls=cleanup)
            out.append(containerd_finding("C1", name, message, path=entry.path,
                                reclaimable=self.measure(entry.path), repair=repair,
                                evidence=evidence))
        return out

    # -- C2 ------------------------------------------------------------------------------------

    def missing_dirs(self, db: SnapshotterDB) -> list[Finding]:
        out: list[Finding] = []
        for record in sorted(db.records.values(), key=lambda r: r.key):
            own = db.own_dir(record)
            if own is None or record.id is None:
                continue
            snapshot_dir = db.snapshot_dir(record.id)
            if not _is_dir(snapshot_dir):
                missing = snapshot_dir
            elif own != snapshot_dir and not _is_dir(own):
                missing = own
            else:
                continue
            obj, namespace = self.object_of(db, record)
            named = self.named(db, record)
            if named is not None:
                repair = ctr_repair(
                    "remove the snapshot (children first); pull or import its image again "
                    "if it was an image layer", removal_ops(self.index, named))
            else:
                repair = ctr_repair(
                    "no meta.db record names it: GC prunes it after a snapshot removal marks "
                    "the snapshotter dirty",
                    gc_trigger_ops(namespace or trigger_namespace(self.store, db.name),
                                   db.name), gc=True)
            out.append(containerd_finding(
                "C2", obj,
                f"{record.kind} snapshot {obj} ({db.name} id {record.id}) has no directory "
                f"{missing}: its files are gone, so mounting it fails",
                path=missing, namespace=namespace, repair=repair,
                evidence={"snapshotter": db.name, "id": record.id, "backend_key": record.key,
                          "kind": str(record.kind), "missing": missing}))
        return out

    # -- C3 ------------------------------------------------------------------------------------

    def backend_only(self, db: SnapshotterDB) -> list[Finding]:
        children = backend_children(db)
        out: list[Finding] = []
        for record in sorted(self.store.backend_records(db.name), key=lambda r: r.key):
            namespace, _ = split_backend_key(record.key)
            used_below = sorted(r.key for r in backend_subtree(children, record.key)
                                if (db.name, r.key) in self.index.by_backend)
            path = db.snapshot_dir(record.id) if record.id is not None else None
            message = (f"{db.name} snapshot record {record.key} (id {record.id}) is named by "
                       "no namespace's meta.db, so ctr cannot see it: left by a crash between "
                       "the snapshotter and meta.db writes, or by a remove whose GC pass has "
                       "not run")
            evidence: dict[str, object] = {"snapshotter": db.name, "id": record.id,
                                           "kind": str(record.kind), "parent": record.parent}
            if used_below:
                evidence["parent_of_recorded"] = used_below
                message += (f"; it cannot be pruned while it is the parent of the recorded "
                            f"snapshot {used_below[0]}")
                repair = Repair(f"kept: it is the parent of the recorded snapshot "
                                f"{used_below[0]}")
                reclaimable = None
            else:
                repair = ctr_repair(
                    "GC prunes it (and Cleanup removes its directory) after a snapshot removal "
                    "marks the snapshotter dirty",
                    gc_trigger_ops(namespace or trigger_namespace(self.store, db.name),
                                   db.name), gc=True, order=-backend_depth(db, record))
                reclaimable = self.measure(path) if path is not None else None
            out.append(containerd_finding("C3", record.key, message, path=path, namespace=namespace,
                                reclaimable=reclaimable, repair=repair, evidence=evidence))
        return out

    # -- C4 ------------------------------------------------------------------------------------

    def backend_missing(self, db: SnapshotterDB) -> list[Finding]:
        out: list[Finding] = []
        for key, record in sorted(self.index.records.items()):
            if key[1] != db.name or (record.name and record.name in db.records):
                continue
            out.append(containerd_finding(
                "C4", record.key,
                f"snapshot {record.key} is in meta.db but {db.name} has no record "
                f"{record.name or '(no name)'}: ctr snapshots ls skips it, it cannot be "
                "mounted, and no new snapshot can take its key ('already exists')",
                namespace=record.namespace,
                repair=ctr_repair("remove the record (children first)",
                               removal_ops(self.index, key)),
                evidence={"snapshotter": db.name, "backend_key": record.name,
                          "parent": record.parent}))
        return out

    # -- C5 ------------------------------------------------------------------------------------

    def dangling_parents(self) -> list[Finding]:
        by_object: dict[tuple[str | None, str], Finding] = {}
        for name in self.store.snapshotter_names:
            db = self.store.snapshotter_db(name)
            assert db is not None
            for backend in sorted(db.records.values(), key=lambda r: r.key):
                if not backend.parent or backend.parent in db.records:
                    continue
                obj, namespace = self.object_of(db, backend)
                by_object[(namespace, obj)] = containerd_finding(
                    "C5", obj,
                    f"{db.name} record {backend.key} names parent {backend.parent}, which has "
                    "no record: it cannot be mounted, and GC can never prune it (the "
                    "snapshotter's remove fails with 'not found'), so removing it through ctr "
                    "would not free its directory",
                    namespace=namespace,
                    repair=Repair("needs an offline metadata.db repair, which crifs does not "
                                  "make"),
                    evidence={"snapshotter": db.name, "database": "metadata.db",
                              "backend_key": backend.key, "missing_parent": backend.parent})
        for key, record in sorted(self.index.records.items()):
            ns, ss, user_key = key
            if not record.parent or (ns, ss, record.parent) in self.index.records:
                continue
            if (ns, user_key) in by_object:
                continue  # both databases: the metadata.db finding says what must not be done
            ops = [snapshot_prepare(ns, ss, record.parent),
                   *removal_ops(self.index, key),
                   snapshot_remove(ns, ss, record.parent)]
            by_object[(ns, user_key)] = containerd_finding(
                "C5", user_key,
                f"snapshot {user_key} names parent {record.parent}, which does not exist in "
                f"namespace {ns}: it cannot be mounted, and ctr snapshots rm fails ('parent "
                "snapshot does not exist')",
                namespace=ns,
                repair=ctr_repair("recreate the missing parent as an empty snapshot so containerd "
                               "can remove the child, then remove both", ops),
                evidence={"snapshotter": ss, "database": "meta.db",
                          "missing_parent": record.parent})
        return list(by_object.values())

    # -- C6 ------------------------------------------------------------------------------------

    def stale_children(self) -> list[Finding]:
        out: dict[tuple[str | None, str], Finding] = {}
        for key, record in sorted(self.index.records.items()):
            gone, moved = self._stale_meta_children(key, record)
            if not gone and not moved:
                continue
            ns, ss, parent = key
            ops = [chained(snapshot_prepare(ns, ss, child, parent),
                           snapshot_remove(ns, ss, child)) for child in gone]
            stale = gone + moved
            message = (f"snapshot {parent} still lists {len(stale)} child(ren) in meta.db that "
                       f"no longer exist there ({stale[0]}): containerd's GC removed them "
                       f"without unlinking them ({ISSUE_STALE_CHILDREN}), so ctr snapshots rm "
                       f"{parent} fails with 'cannot remove snapshot with child'")
            summary = ("recreate each missing child through the API and remove it again, "
                       "which drops the stale entry")
            if moved:
                summary += ("; children that now exist under another parent cannot be unlinked "
                            "through the API")
            out[(ns, parent)] = containerd_finding(
                "C6", parent, message, namespace=ns,
                repair=ctr_repair(summary, ops, order=UNBLOCKING),
                evidence={"snapshotter": ss, "database": "meta.db", "missing_children": gone,
                          "reparented_children": moved})
        for name in self.store.snapshotter_names:
            db = self.store.snapshotter_db(name)
            assert db is not None
            for parent_key, stale in self._stale_backend_children(db).items():
                parent_record = db.records[parent_key]
                obj, namespace = self.object_of(db, parent_record)
                message = (f"{db.name} record {parent_record.key}'s parents index still lists "
                           f"{len(stale)} child(ren) that no longer exist ({stale[0]}): the "
                           "snapshotter refuses to remove it ('cannot remove snapshot with "
                           "child'), so GC can never prune it")
                existing = out.get((namespace, obj))
                evidence = {"snapshotter": db.name, "database": "metadata.db",
                            "stale_parents_entries": stale}
                if existing is not None:
                    merged = {**existing.evidence, "metadata_db": evidence}
                    out[(namespace, obj)] = containerd_finding(
                        "C6", obj, f"{existing.message}; {message}", namespace=namespace,
                        repair=existing.repair, evidence=merged)
                    continue
                out[(namespace, obj)] = containerd_finding(
                    "C6", obj, message, namespace=namespace,
                    repair=Repair("needs an offline metadata.db repair, which crifs does not "
                                  "make"),
                    evidence=evidence)
        return list(out.values())

    def _stale_meta_children(self, key: MetaKey,
                             record: SnapshotRecord) -> tuple[list[str], list[str]]:
        ns, ss, parent = key
        gone: list[str] = []
        moved: list[str] = []
        for child in record.children:
            child_record = self.index.records.get((ns, ss, child))
            if child_record is None:
                gone.append(child)
            elif child_record.parent != parent:
                moved.append(child)
        return gone, moved

    @staticmethod
    def _stale_backend_children(db: SnapshotterDB) -> dict[str, list[str]]:
        """Stale ``parents`` entries by the parent's backend key."""
        by_id = db.by_id()
        out: dict[str, list[str]] = {}
        for link in db.parents():
            parent = by_id.get(link.parent_id)
            if parent is None:
                continue  # blocks nothing: no record has that id
            child = db.records.get(link.child_key)
            if child is not None and child.id == link.child_id and child.parent == parent.key:
                continue
            out.setdefault(parent.key, []).append(f"{link.child_id} {link.child_key}")
        return out

    # -- C9 ------------------------------------------------------------------------------------

    def unused_actives(self) -> list[Finding]:
        marking = mark(self.store, self.now)
        out: list[Finding] = []
        for key, record in sorted(self.index.records.items()):
            ns, ss, user_key = key
            db = self.store.snapshotter_db(ss)
            backend = db.records.get(record.name) if db is not None and record.name else None
            if db is None or backend is None or backend.kind is not SnapshotKind.ACTIVE:
                continue
            if key in self.index.containers:
                continue
            node = snapshot_node(ns, ss, user_key)
            if node not in marking.marked or marking.live_leases_of(node):
                continue  # GC's to collect (C7), or an operation in flight under its lease
            out.append(self._unused_active(key, record, backend, db, marking))
        return out

    def _unused_active(self, key: MetaKey, record: SnapshotRecord, backend: BackendRecord,
                       db: SnapshotterDB, marking: Marking) -> Finding:
        ns, ss, user_key = key
        pinned = LABEL_ROOT in record.labels
        if pinned:
            why = ("pinned by its containerd.io/gc.root label (ctr snapshots prepare sets one), "
                   "so GC keeps it forever")
        else:
            why = f"kept by {marking.reason(snapshot_node(ns, ss, user_key))}"
        path = db.snapshot_dir(backend.id) if backend.id is not None else None
        evidence: dict[str, object] = {"snapshotter": ss, "id": backend.id,
                                       "parent": record.parent, "pinned_by_gc_root": pinned}
        if pinned:
            evidence["gc_root"] = record.labels[LABEL_ROOT]
        if record.created is not None:
            evidence["created"] = record.created.isoformat()
        return containerd_finding(
            "C9", user_key,
            f"active snapshot {user_key} is used by no container and {why}",
            path=path, namespace=ns,
            reclaimable=self.measure(path) if path is not None else None,
            repair=ctr_repair("remove it if nothing outside containerd still uses it",
                           [snapshot_remove(ns, ss, user_key)]),
            evidence=evidence)
