"""What containerd's GC would collect but has not yet: C7 and C8.

containerd collects garbage only after mutations and deletions, never on a timer, so an idle
node keeps expired leases, the extraction snapshots of interrupted pulls, removed images'
layers and blobs for as long as nothing changes. The mark phase is containerd's own
(:mod:`crifs.containerd.reachability`); everything it does not reach is reported:

- C7 a snapshot no root reaches, and every expired lease (``object`` = lease id);
- C8 a content blob record or ingest record no root reaches; a blob *file* no namespace's
  ``meta.db`` records (nor an ingest expects), and an ingest *directory* whose ref no
  ``meta.db`` ingest names: those two are files crifs may remove itself.

Reclaimable space counts what the removal frees: a snapshot's ``snapshots/<id>`` directory,
a blob file only when no namespace keeps a reachable record for it, an ingest directory.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from typing import TYPE_CHECKING

from crifs.containerd.content import IngestDir
from crifs.containerd.metadata import BlobRecord, IngestRecord
from crifs.containerd.reachability import (
    CONTENT,
    INGEST,
    LeaseState,
    Marking,
    mark,
    snapshot_node,
)
from crifs.containerd.snapshot_index import (
    MetaKey,
    SnapshotIndex,
    content_gc_calls,
    content_remove,
    gc_trigger_ops,
    lease_remove,
    removal_ops,
    trigger_namespace,
)
from crifs.fs.usage import Meter
from crifs.fsck.containerd_snapshots import containerd_finding, ctr_repair
from crifs.fsck.findings import CheckOptions, Finding, Reclaimable, Repair, reclaimable_of
from crifs.model import SnapshotKind
from crifs.repair.actions import ApiCall, RemovePath

if TYPE_CHECKING:
    from crifs.containerd.store import ContainerdStore

# containerd's content store walks only names that are valid digests of these algorithms.
_DIGEST_HEX = {"sha256": 64, "sha384": 96, "sha512": 128}
_HEX = re.compile(r"^[0-9a-f]+$")
_LISTED = 20  # resources listed in a lease's evidence


def findings(store: ContainerdStore, opts: CheckOptions, meter: Meter) -> list[Finding]:
    """C7 and C8 for every namespace of ``store``, judged at ``opts.clock()``."""
    check = _Check(store, opts, meter)
    return [
        *check.expired_leases(),
        *check.unreachable_snapshots(),
        *check.unreachable_blobs(),
        *check.unreachable_ingests(),
        *check.orphan_blob_files(),
        *check.orphan_ingest_dirs(),
    ]


def _when(moment: dt.datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def valid_digest(digest: str) -> bool:
    alg, _, encoded = digest.partition(":")
    return _DIGEST_HEX.get(alg) == len(encoded) and bool(_HEX.match(encoded))


class _Check:
    def __init__(self, store: ContainerdStore, opts: CheckOptions, meter: Meter) -> None:
        self.store = store
        self.opts = opts
        self.meter = meter
        self.marking: Marking = mark(store, opts.clock())
        self.index = SnapshotIndex.of(store)

    def measure(self, *paths: str) -> Reclaimable | None:
        if not self.opts.measure:
            return None
        return reclaimable_of(self.meter.measure(*paths))

    def content_gc_calls(self) -> tuple[ApiCall, ...]:
        """What makes a running containerd remove blob files and ingest dirs no record names
        (its content GC), instead of crifs removing them."""
        return content_gc_calls(trigger_namespace(self.store))

    # -- C7 ------------------------------------------------------------------------------------

    def expired_leases(self) -> list[Finding]:
        out: list[Finding] = []
        for state in self.marking.leases:
            if not state.expired:
                continue
            lease = state.record
            snapshots = [f"{ss}/{key}" for ss, key in lease.snapshots]
            out.append(containerd_finding(
                "C7", lease.id,
                f"lease {lease.id} expired at {_when(state.expires)} but containerd's GC has "
                f"not run since: it still lists {len(snapshots)} snapshot(s), "
                f"{len(lease.content)} blob(s) and {len(lease.ingests)} ingest(s), which GC "
                "frees with it unless something else holds them",
                namespace=lease.namespace,
                repair=ctr_repair("remove the lease and let GC collect what only it held",
                               [lease_remove(lease.namespace, lease.id, sync=True)], gc=True),
                evidence={"expires": _when(state.expires), "created": _when(lease.created),
                          "snapshots": snapshots[:_LISTED],
                          "content": list(lease.content[:_LISTED]),
                          "ingests": list(lease.ingests[:_LISTED]),
                          "images": list(lease.images[:_LISTED])}))
        return out

    def unreachable_snapshots(self) -> list[Finding]:
        out: list[Finding] = []
        for key in sorted(self.index.records):
            ns, ss, user_key = key
            node = snapshot_node(ns, ss, user_key)
            if node in self.marking.marked:
                continue
            out.append(self._unreachable_snapshot(key, self.marking.expired_leases_of(node)))
        return out

    def _unreachable_snapshot(self, key: MetaKey, expired: list[LeaseState]) -> Finding:
        ns, ss, user_key = key
        record = self.index.records[key]
        db = self.store.snapshotter_db(ss)
        backend = db.records.get(record.name) if db is not None and record.name else None
        kind = backend.kind if backend is not None else SnapshotKind.UNKNOWN
        path = None
        if db is not None and backend is not None and backend.id is not None \
                and db.own_dir(backend) is not None:
            path = db.snapshot_dir(backend.id)
        evidence: dict[str, object] = {"snapshotter": ss, "kind": str(kind),
                                       "parent": record.parent}
        if backend is not None:
            evidence.update(id=backend.id, backend_key=backend.key)
        gc_note = "containerd's GC collects it on its next run, which has not happened yet"
        if expired:
            lease = expired[0]
            evidence["expired_leases"] = [x.record.id for x in expired]
            what = (f"snapshot {user_key} is the extraction snapshot of an interrupted pull or "
                    "import" if user_key.startswith("extract-") else f"snapshot {user_key}")
            message = (f"{what}, held only by lease {lease.record.id}, which expired at "
                       f"{_when(lease.expires)}: {gc_note}")
        else:
            message = (f"{kind} snapshot {user_key} is reachable from no image, container, "
                       f"live lease or gc.root label: {gc_note}")
        return containerd_finding(
            "C7", user_key, message, path=path, namespace=ns,
            reclaimable=self.measure(path) if path is not None else None,
            repair=ctr_repair("remove it (children first), as GC would",
                           removal_ops(self.index, key), gc=True, order=-self.index.depth(key)),
            evidence=evidence)

    # -- C8: records ---------------------------------------------------------------------------

    def unreachable_blobs(self) -> list[Finding]:
        marked = self.marking.marked
        blobs = self.store.content_blobs()
        kept_by: dict[str, list[str]] = {}
        for blob in blobs:
            if (CONTENT, blob.namespace, blob.digest) in marked:
                kept_by.setdefault(blob.digest, []).append(blob.namespace)
        for ingest in self.store.ingests():
            if ingest.expected and (INGEST, ingest.namespace, ingest.ref) in marked:
                kept_by.setdefault(ingest.expected, []).append(ingest.namespace)
        out: list[Finding] = []
        for blob in sorted(blobs, key=lambda b: (b.namespace, b.digest)):
            if (CONTENT, blob.namespace, blob.digest) not in marked:
                out.append(self._unreachable_blob(blob, kept_by.get(blob.digest, [])))
        return out

    def _unreachable_blob(self, blob: BlobRecord, kept_by: list[str]) -> Finding:
        path = self.store.content_store.blob_path(blob.digest)
        expired = self.marking.expired_leases_of((CONTENT, blob.namespace, blob.digest))
        held = (f", held only by lease {expired[0].record.id}, which expired" if expired
                else "")
        if kept_by:
            fate = (f"this record on its next run; the file stays, namespace "
                    f"{sorted(kept_by)[0]} still uses it")
            reclaimable = None
        else:
            fate = "it on its next run"
            reclaimable = self.measure(path) if path is not None else None
        evidence: dict[str, object] = {"size": blob.size, "file_kept_by": sorted(set(kept_by))}
        if expired:
            evidence["expired_leases"] = [x.record.id for x in expired]
        return containerd_finding(
            "C8", blob.digest,
            f"blob {blob.digest} in namespace {blob.namespace} is referenced by no image, "
            f"container, live lease, gc.root label or gc.ref label{held}: containerd's GC "
            f"deletes {fate}",
            path=path, namespace=blob.namespace, reclaimable=reclaimable,
            repair=ctr_repair("remove the blob record, as GC would",
                           [content_remove(blob.namespace, blob.digest)], gc=True),
            evidence=evidence)

    def unreachable_ingests(self) -> list[Finding]:
        dirs = {d.ref: d for d in self.store.ingest_dirs() if d.ref}
        now = self.marking.now
        out: list[Finding] = []
        for ingest in sorted(self.store.ingests(), key=lambda i: (i.namespace, i.ref)):
            node = (INGEST, ingest.namespace, ingest.ref)
            if node in self.marking.marked:
                continue
            directory = dirs.get(ingest.backend_ref) if ingest.backend_ref else None
            out.append(self._unreachable_ingest(ingest, directory, now))
        return out

    def _unreachable_ingest(self, ingest: IngestRecord, directory: IngestDir | None,
                            now: dt.datetime) -> Finding:
        expired = self.marking.expired_leases_of((INGEST, ingest.namespace, ingest.ref))
        if ingest.expire_at is not None:
            why = f"it expired at {_when(ingest.expire_at)}"
        elif expired:
            why = f"its lease {expired[0].record.id} expired"
        else:
            why = "it has no expiry and no lease holds it (its lease was removed)"
        path = directory.path if directory is not None else None
        return containerd_finding(
            "C8", ingest.ref,
            f"unfinished write {ingest.ref} in namespace {ingest.namespace} is garbage: {why}; "
            "containerd's GC drops it and aborts its ingest directory on its next run",
            path=path, namespace=ingest.namespace,
            reclaimable=self.measure(path) if path is not None else None,
            repair=ctr_repair("run containerd's GC, which aborts unreferenced writes",
                           gc_trigger_ops(ingest.namespace), gc=True),
            evidence={"backend_ref": ingest.backend_ref, "expire_at": _when(ingest.expire_at),
                      "checked_at": _when(now), "expected": ingest.expected,
                      "data_bytes": directory.data_bytes if directory else None})

    # -- C8: files -----------------------------------------------------------------------------

    def orphan_blob_files(self) -> list[Finding]:
        recorded = {b.digest for b in self.store.content_blobs()}
        recorded |= {i.expected for i in self.store.ingests() if i.expected}
        content = self.store.content_store
        out: list[Finding] = []
        for digest, size in sorted(content.blob_files()):
            if digest in recorded or not valid_digest(digest):
                continue
            path = content.blob_path(digest)
            assert path is not None
            out.append(containerd_finding(
                "C8", digest,
                f"blob file {digest} is named by no namespace's meta.db: left by a content or "
                "image removal whose content GC pass has not run, or by a crash after the write",
                path=path, reclaimable=self.measure(path),
                repair=Repair("remove the blob file (what containerd's content GC does)",
                              actions=(RemovePath(path),), gc=True,
                              calls=self.content_gc_calls()),
                evidence={"size": size, "kind": "blob_file"}))
        return out

    def orphan_ingest_dirs(self) -> list[Finding]:
        known = {i.backend_ref for i in self.store.ingests() if i.backend_ref}
        out: list[Finding] = []
        for directory in sorted(self.store.ingest_dirs(), key=lambda d: d.path):
            if directory.ref is not None and directory.ref in known:
                continue
            name = os.path.basename(directory.path)
            if directory.ref is None:
                message = (f"ingest directory {name} has no ref file: containerd can neither "
                           "list nor abort it; left by a crash while a write started")
            else:
                message = (f"ingest directory {name} holds an unfinished write ({directory.ref}) "
                           "that no namespace's meta.db lists: containerd aborts it on its next "
                           "content GC pass")
            out.append(containerd_finding(
                "C8", f"ingest/{name}", message, path=directory.path,
                reclaimable=self.measure(directory.path),
                repair=Repair("remove the ingest directory (what containerd's Abort does)",
                              actions=(RemovePath(directory.path),), gc=True,
                              # without a ref file containerd's content GC cannot see it
                              calls=self.content_gc_calls() if directory.ref else ()),
                evidence={"kind": "ingest_dir", "ref": directory.ref,
                          "data_bytes": directory.data_bytes, "total": directory.total,
                          "started_at": directory.started_at,
                          "updated_at": directory.updated_at}))
        return out
