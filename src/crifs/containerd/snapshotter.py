"""A snapshotter's own ``metadata.db`` and directory layout (overlayfs and native).

Both snapshotters share containerd's ``snapshots/storage`` MetaStore (schema in
``crifs.containerd.schema``): records are named by *backend key* (``<ns>/<seq>/<user key>``),
carry a numeric id that names the directory ``snapshots/<id>``, and point at their parent by
backend key. Directory per id: overlayfs keeps the layer in ``snapshots/<id>/fs`` (plus
``work`` for actives); native keeps a full copy in ``snapshots/<id>`` and gives a View with a
parent no directory at all.

:func:`read_snapshotter_db` decodes every record once (cheap: no stat); the ``parents`` index
is decoded only when asked for. Values that fail to decode raise ``CorruptStore`` naming the
file and the bolt path.
"""

from __future__ import annotations

import datetime as dt
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from crifs.containerd import schema as s
from crifs.containerd.bolt import Bucket, open_bolt
from crifs.containerd.encoding import read_gotime, read_uvarint, read_varint
from crifs.containerd.metadata import text
from crifs.errors import BadInput, CorruptStore
from crifs.model import Mount, SnapshotKind

# containerd's snapshots.Kind (uint8 iota); any other byte prints as "Unknown".
KINDS = {0: SnapshotKind.UNKNOWN, 1: SnapshotKind.VIEW, 2: SnapshotKind.ACTIVE,
         3: SnapshotKind.COMMITTED}


@dataclass(frozen=True, slots=True)
class BackendRecord:
    """One ``v1/snapshots/<backend key>`` record. ``size``/``inodes`` exist for committed
    snapshots only (measured by containerd at commit time).

    The times are kept as their validated Go encoding and decoded on access: listings never
    need them (``ctr`` shows meta.db's times), and decoding 20,000 of them is measurable.
    """

    key: str
    id: int | None
    kind: SnapshotKind
    parent: str | None
    labels: Mapping[str, str] = field(default_factory=dict)
    size: int | None = None
    inodes: int | None = None
    created_at: bytes | None = field(default=None, repr=False)
    updated_at: bytes | None = field(default=None, repr=False)

    @property
    def created(self) -> dt.datetime | None:
        return read_gotime(self.created_at) if self.created_at else None

    @property
    def updated(self) -> dt.datetime | None:
        return read_gotime(self.updated_at) if self.updated_at else None


@dataclass(frozen=True, slots=True)
class ParentLink:
    """One ``v1/parents`` entry: ``child_key`` is the child's backend key."""

    parent_id: int
    child_id: int
    child_key: str


class SnapshotterDB:
    """The decoded ``metadata.db`` of snapshotter ``name`` rooted at ``root``."""

    def __init__(self, name: str, root: str, db_path: str, txid: int,
                 id_sequence: int, records: dict[str, BackendRecord],
                 parents_bucket: Bucket | None) -> None:
        self.name = name
        self.root = root
        self.db_path = db_path
        self.txid = txid
        self.id_sequence = id_sequence  # last id handed out (the bucket sequence)
        self.records = records
        self._parents_bucket = parents_bucket
        self._parents: list[ParentLink] | None = None
        self._by_id: dict[int, BackendRecord] | None = None
        self._snapshots_dir = os.path.join(root, "snapshots")
        self._layer_suffix = "/fs" if name == s.OVERLAYFS else ""

    # -- directories -----------------------------------------------------------------------

    def snapshot_dir(self, snapshot_id: int | str) -> str:
        """``<root>/snapshots/<id>``: everything the snapshotter keeps for that id."""
        return os.path.join(self.root, "snapshots", str(snapshot_id))

    def layer_dir(self, snapshot_id: int | str) -> str:
        """The directory holding the snapshot's files (overlay upper dir / native copy)."""
        # Built by concatenation: this runs once per listed snapshot.
        return f"{self._snapshots_dir}/{snapshot_id}{self._layer_suffix}"

    def work_dir(self, snapshot_id: int | str) -> str:
        return os.path.join(self.root, "snapshots", str(snapshot_id), "work")

    def own_dir(self, record: BackendRecord) -> str | None:
        """The layer directory ``record`` owns, ``None`` when the snapshotter made none."""
        if record.id is None:
            return None
        if self.name == s.NATIVE and record.kind is SnapshotKind.VIEW and record.parent:
            return None
        return self.layer_dir(record.id)

    # -- lookups ---------------------------------------------------------------------------

    def by_id(self) -> Mapping[int, BackendRecord]:
        if self._by_id is None:
            self._by_id = {r.id: r for r in self.records.values() if r.id is not None}
        return self._by_id

    def parent_chain(self, record: BackendRecord) -> list[BackendRecord]:
        """Parents of ``record``, nearest first (containerd's ``ParentIDs`` order).

        Raises ``CorruptStore`` for a parent key with no record or a cycle.
        """
        chain: list[BackendRecord] = []
        seen = {record.key}
        current = record
        while current.parent:
            parent = self.records.get(current.parent)
            if parent is None:
                raise CorruptStore(
                    f"snapshot {current.key}: parent {current.parent} has no record",
                    path=self.db_path)
            if parent.key in seen:
                raise CorruptStore(f"snapshot {record.key}: parent chain loops at {parent.key}",
                                   path=self.db_path)
            seen.add(parent.key)
            chain.append(parent)
            current = parent
        return chain

    # -- mounts ----------------------------------------------------------------------------

    def mounts(self, record: BackendRecord, overlay_options: Sequence[str],
               flavor: str) -> list[Mount]:
        """The mounts containerd's ``Mounts(key)`` returns for ``record``.

        ``overlay_options`` are the snapshotter-wide overlay options (configured
        ``mount_options``, ``userxattr``, ``index=off``) already in the order ``flavor``
        (``1.6``, ``1.7`` or ``2.x``) builds them; 1.x puts them before ``workdir``, 2.x after
        ``lowerdir``. Raises ``BadInput`` for a committed snapshot (containerd: "not active or
        view") and ``CorruptStore`` for a broken parent chain or a record without an id.
        """
        if record.kind not in (SnapshotKind.ACTIVE, SnapshotKind.VIEW):
            raise BadInput(f"snapshot {record.key} is {record.kind}, not active or view; "
                           "only those have mounts", path=self.db_path)
        own = self._require_id(record)
        parents = [self._require_id(p) for p in self.parent_chain(record)]
        read_only = record.kind is SnapshotKind.VIEW
        if self.name != s.OVERLAYFS:
            # native: the snapshot's own copy, or for a View its parent's directory.
            source = own if not parents or not read_only else parents[0]
            return [Mount("bind", self.layer_dir(source), ("rbind", "ro" if read_only else "rw"))]
        if not parents:
            return [Mount("bind", self.layer_dir(own), ("ro" if read_only else "rw", "rbind"))]
        if read_only and len(parents) == 1:
            return [Mount("bind", self.layer_dir(parents[0]), ("ro", "rbind"))]
        options: list[str] = [] if flavor == "2.x" else list(overlay_options)
        if not read_only:
            options += [f"workdir={self.work_dir(own)}", f"upperdir={self.layer_dir(own)}"]
        options.append("lowerdir=" + ":".join(self.layer_dir(p) for p in parents))
        if flavor == "2.x":
            options += overlay_options
        return [Mount("overlay", "overlay", tuple(options))]

    def _require_id(self, record: BackendRecord) -> int:
        if record.id is None:
            raise CorruptStore(f"v1/snapshots/{record.key}: no id", path=self.db_path)
        return record.id

    def parents(self) -> list[ParentLink]:
        """The ``v1/parents`` index (decoded on first use)."""
        if self._parents is None:
            links: list[ParentLink] = []
            if self._parents_bucket is not None:
                for key, value in self._parents_bucket.values():
                    links.append(self._parent_link(key, value))
            self._parents = links
        return self._parents

    def _parent_link(self, key: bytes, value: bytes) -> ParentLink:
        try:
            parent_id, n = read_uvarint(key)
            if key[n : n + 1] != b"\x00":
                raise ValueError("no 0x00 separator after the parent id")
            child_id, m = read_uvarint(key, n + 1)
            if n + 1 + m != len(key):
                raise ValueError("trailing bytes after the child id")
        except ValueError as err:
            raise CorruptStore(f"v1/parents/{key.hex()}: bad parent link key ({err})",
                               path=self.db_path) from None
        return ParentLink(parent_id, child_id, text(value))


def read_snapshotter_db(name: str, root: str) -> SnapshotterDB:
    """Read ``<root>/metadata.db`` of snapshotter ``name`` once.

    Raises ``NotFound`` when the file is missing, ``CorruptStore``/``StoreChanged`` otherwise.
    """
    db_path = os.path.join(root, s.SNAPSHOTTER_DB)
    bolt = open_bolt(db_path)
    records: dict[str, BackendRecord] = {}
    id_sequence = 0
    parents_bucket = None
    v1 = bolt.root.bucket(s.SCHEMA_V1)
    if v1 is not None:
        parents_bucket = v1.bucket(s.PARENTS)
        snapshots = v1.bucket(s.SNAPSHOTS)
        if snapshots is not None:
            id_sequence = snapshots.sequence
            for key, bucket in snapshots.buckets():
                record = _record(text(key), bucket, db_path)
                records[record.key] = record
    return SnapshotterDB(name, root, db_path, bolt.txid, id_sequence, records, parents_bucket)


def _record(key: str, b: Bucket, db_path: str) -> BackendRecord:
    # Runs once per record: the bolt path of a bad value is built only on failure.
    snapshot_id = parent = created = updated = size = inodes = None
    kind = SnapshotKind.UNKNOWN
    labels: dict[str, str] = {}
    k = b""
    try:
        for k, v in b.items():
            if isinstance(v, Bucket):
                if k == s.LABELS:
                    labels = v.text_values()
                continue
            if k == s.CREATED_AT:
                created = _checked_time(v)
            elif k == s.UPDATED_AT:
                updated = created if v == created else _checked_time(v)
            elif k == s.ID:
                snapshot_id = _uvarint(v)
            elif k == s.KIND:
                # containerd reads a kind only when it is exactly one byte.
                kind = KINDS.get(v[0], SnapshotKind.UNKNOWN) if len(v) == 1 else kind
            elif k == s.PARENT:
                parent = text(v) or None
            elif k == s.SIZE:
                size = _varint(v)
            elif k == s.INODES:
                inodes = _varint(v)
    except ValueError as err:
        encoding = "time" if k in (s.CREATED_AT, s.UPDATED_AT) else "varint"
        raise CorruptStore(f"v1/snapshots/{key}/{text(k)}: bad {encoding} encoding ({err})",
                           path=db_path) from None
    return BackendRecord(key, snapshot_id, kind, parent, labels, size, inodes, created, updated)


def _uvarint(v: bytes) -> int:
    """Go's ``Uvarint`` with a shortcut for exact one- and two-byte encodings (ids below
    16384): this runs for every record, and the general decoder costs more than the rest."""
    if len(v) == 1 and v[0] < 0x80:
        return v[0]
    if len(v) == 2 and v[0] >= 0x80 and v[1] < 0x80:
        return (v[0] & 0x7F) | (v[1] << 7)
    return read_uvarint(v)[0]


def _varint(v: bytes) -> int:
    """Go's zigzag ``Varint`` (same shortcut)."""
    if len(v) > 2:
        return read_varint(v)
    u = _uvarint(v)
    return (u >> 1) ^ -(u & 1)


_GOTIME_HEAD = struct.Struct(">Bqi")
_MAX_GO_SECONDS = 315537897600  # 10000-01-01, past what datetime holds


def _checked_time(value: bytes) -> bytes:
    """``value`` if ``read_gotime`` will decode it, else ValueError (without decoding)."""
    if len(value) not in (15, 16) or len(value) != 14 + value[0]:
        raise ValueError(f"{len(value)} bytes, not a Go binary time")
    _, seconds, nanos = _GOTIME_HEAD.unpack_from(value)
    if not (0 <= nanos < 1_000_000_000 and 0 <= seconds < _MAX_GO_SECONDS):
        raise ValueError(f"time {seconds}s {nanos}ns out of range")
    return value

