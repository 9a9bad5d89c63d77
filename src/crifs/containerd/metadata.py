"""Decode containerd's ``meta.db`` into plain records (schema: ``crifs.containerd.schema``).

One call, :func:`read_meta_db`, reads the whole file once and returns a :class:`MetaDB`. Every
value that fails to decode raises ``CorruptStore`` naming the file and the bolt path of the bad
value (``…/meta.db: v1/default/snapshots/overlayfs/<key>/createdat: bad time encoding``).
Keys and strings that are not UTF-8 are kept with ``surrogateescape``, so ``os.fsencode``
gives back the stored bytes. Nothing here touches the snapshotter DBs or the content store.
"""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from crifs.containerd import schema as s
from crifs.containerd.bolt import BoltFile, Bucket, open_bolt
from crifs.containerd.encoding import read_gotime, read_varint
from crifs.errors import CorruptStore

T = TypeVar("T")

_GOTIME_HEAD = struct.Struct(">BqiH")  # version, seconds since year 1, nanoseconds, zone
_GO_EPOCH = dt.datetime(1, 1, 1, tzinfo=dt.UTC)
_MAX_GO_SECONDS = 315537897600  # 10000-01-01, the first instant datetime cannot hold
_timedelta = dt.timedelta


def text(b: bytes) -> str:
    """A stored key or string as ``str``; undecodable bytes survive via surrogateescape."""
    return b.decode("utf-8", "surrogateescape")


@dataclass(frozen=True, slots=True)
class Target:
    """An image's target descriptor (``images/<name>/target``)."""

    digest: str | None
    media_type: str | None
    size: int | None


@dataclass(frozen=True, slots=True)
class ImageRecord:
    namespace: str
    name: str
    target: Target | None
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    created: dt.datetime | None = None
    updated: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class ContainerRecord:
    """A container; ``spec``, ``runtime_options`` and ``extensions`` stay raw protobuf ``Any``
    bytes (decode them only when asked)."""

    namespace: str
    id: str
    image: str = ""
    snapshotter: str = ""
    snapshot_key: str = ""
    sandbox_id: str = ""
    runtime_name: str = ""
    runtime_options: bytes | None = None
    spec: bytes | None = None
    extensions: Mapping[str, bytes] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    created: dt.datetime | None = None
    updated: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class SnapshotRecord:
    """A ``v1/<ns>/snapshots/<snapshotter>/<key>`` record: ``name`` is the backend key."""

    namespace: str
    snapshotter: str
    key: str
    name: str | None
    parent: str | None
    labels: Mapping[str, str] = field(default_factory=dict)
    children: tuple[str, ...] = ()
    created: dt.datetime | None = None
    updated: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class BlobRecord:
    namespace: str
    digest: str
    size: int | None
    labels: Mapping[str, str] = field(default_factory=dict)
    created: dt.datetime | None = None
    updated: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class IngestRecord:
    """``content/ingests/<ref>``: ``backend_ref`` is ``<ns>/<seq>/<ref>`` (the ingest dir's
    ``ref`` file); ``expire_at`` is set only for unleased ingests."""

    namespace: str
    ref: str
    backend_ref: str | None
    expire_at: dt.datetime | None = None
    expected: str | None = None


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    namespace: str
    id: str
    created: dt.datetime | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    snapshots: tuple[tuple[str, str], ...] = ()  # (snapshotter, key)
    content: tuple[str, ...] = ()
    ingests: tuple[str, ...] = ()
    images: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SandboxRecord:
    """A sandbox; ``at_root`` marks containerd 1.7's placement outside ``v1``."""

    namespace: str
    id: str
    sandboxer: str = ""
    runtime_name: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    created: dt.datetime | None = None
    updated: dt.datetime | None = None
    at_root: bool = False


@dataclass(slots=True)
class NamespaceRecord:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    images: list[ImageRecord] = field(default_factory=list)
    containers: list[ContainerRecord] = field(default_factory=list)
    snapshots: dict[str, list[SnapshotRecord]] = field(default_factory=dict)
    snapshot_sequences: dict[str, int] = field(default_factory=dict)
    blobs: dict[str, BlobRecord] = field(default_factory=dict)
    ingests: list[IngestRecord] = field(default_factory=list)
    ingest_sequence: int = 0
    leases: list[LeaseRecord] = field(default_factory=list)
    sandboxes: list[SandboxRecord] = field(default_factory=list)


@dataclass(slots=True)
class MetaDB:
    """Everything ``meta.db`` holds. ``db_version`` is ``None`` when ``v1/version`` is absent
    (a fresh or foreign file); ``other_root_buckets`` are top-level buckets besides ``v1``;
    ``root_sandboxes`` are containerd 1.7's sandboxes kept there."""

    path: str
    txid: int
    db_version: int | None
    namespaces: dict[str, NamespaceRecord]
    other_root_buckets: tuple[str, ...] = ()
    root_sandboxes: list[SandboxRecord] = field(default_factory=list)


def read_meta_db(path: str) -> MetaDB:
    """Read ``path`` once. Raises ``NotFound``, ``CorruptStore`` or ``StoreChanged``."""
    bolt = open_bolt(path)
    return _Decoder(bolt).decode()


class _Decoder:
    def __init__(self, bolt: BoltFile) -> None:
        self.bolt = bolt
        self.path = bolt.path

    def corrupt(self, where: str, problem: str) -> CorruptStore:
        return CorruptStore(f"{where}: {problem}", path=self.path)

    def decode(self) -> MetaDB:
        root = self.bolt.root
        namespaces: dict[str, NamespaceRecord] = {}
        version: int | None = None
        others: list[str] = []
        root_sandboxes: list[SandboxRecord] = []
        v1 = root.bucket(s.SCHEMA_V1)
        if v1 is not None:
            for key, value in v1.items():
                if key == s.DB_VERSION and isinstance(value, bytes):
                    version = self.varint(value, "v1/version")
                elif isinstance(value, Bucket):
                    name = text(key)
                    namespaces[name] = self.namespace(name, value)
        for key, sub in root.buckets():
            if key == s.SCHEMA_V1:
                continue
            others.append(text(key))
            # containerd 1.7 keeps sandboxes at <namespace>/sandboxes/<id> outside v1.
            sandboxes = sub.bucket(s.SANDBOXES)
            if sandboxes is not None:
                root_sandboxes += self.sandboxes(text(key), sandboxes,
                                                 f"{text(key)}/sandboxes", at_root=True)
        return MetaDB(self.path, self.bolt.txid, version, namespaces, tuple(others),
                      root_sandboxes)

    # -- scalars -------------------------------------------------------------------------------

    # The bolt path of a value is joined from ``where`` only on failure: these run for every
    # record and must stay cheap.

    def varint(self, value: bytes, *where: str) -> int:
        try:
            return read_varint(value)
        except ValueError as err:
            raise self.corrupt("/".join(where), f"bad varint encoding ({err})") from None

    def time(self, value: bytes, *where: str) -> dt.datetime:
        # The usual value (a time containerd wrote) decoded here, about 3x cheaper than
        # read_gotime (keyword timedelta); anything else, valid or not, goes through
        # read_gotime for the same value or error.
        if len(value) == 15 or len(value) == 16:
            version, seconds, nanos, _ = _GOTIME_HEAD.unpack_from(value)
            if (len(value) == 14 + version and 0 <= nanos < 1_000_000_000
                    and 0 <= seconds < _MAX_GO_SECONDS):
                return _GO_EPOCH + _timedelta(0, seconds, nanos // 1000)
        try:
            return read_gotime(value)
        except ValueError as err:
            raise self.corrupt("/".join(where), f"bad time encoding ({err})") from None

    def strings(self, bucket: Bucket | None) -> dict[str, str]:
        return bucket.text_values() if bucket is not None else {}

    def keys(self, bucket: Bucket | None) -> tuple[str, ...]:
        return bucket.text_keys() if bucket is not None else ()

    def each_bucket(self, parent: Bucket | None, where: str,
                    decode: Callable[[str, Bucket, str], T]) -> Iterator[T]:
        if parent is None:
            return
        for key, sub in parent.buckets():
            name = text(key)
            yield decode(name, sub, f"{where}/{name}")

    # -- objects -------------------------------------------------------------------------------

    def namespace(self, name: str, bucket: Bucket) -> NamespaceRecord:
        where = f"v1/{name}"
        ns = NamespaceRecord(name, labels=self.strings(bucket.bucket(s.LABELS)))
        ns.images = list(self.each_bucket(
            bucket.bucket(s.IMAGES), f"{where}/images",
            lambda key, b, w: self.image(name, key, b, w)))
        ns.containers = list(self.each_bucket(
            bucket.bucket(s.CONTAINERS), f"{where}/containers",
            lambda key, b, w: self.container(name, key, b, w)))
        snapshots = bucket.bucket(s.SNAPSHOTS)
        if snapshots is not None:
            for ss_key, ss_bucket in snapshots.buckets():
                ss = text(ss_key)
                ns.snapshot_sequences[ss] = ss_bucket.sequence
                base = f"{where}/snapshots/{ss}"
                ns.snapshots[ss] = [self.snapshot(name, ss, text(k), b, base)
                                    for k, b in ss_bucket.buckets()]
        content = bucket.bucket(s.CONTENT)
        if content is not None:
            for blob in self.each_bucket(content.bucket(s.BLOB), f"{where}/content/blob",
                                         lambda key, b, w: self.blob(name, key, b, w)):
                ns.blobs[blob.digest] = blob
            ingests = content.bucket(s.INGESTS)
            if ingests is not None:
                ns.ingest_sequence = ingests.sequence
                ns.ingests = list(self.each_bucket(
                    ingests, f"{where}/content/ingests",
                    lambda key, b, w: self.ingest(name, key, b, w)))
        ns.leases = list(self.each_bucket(
            bucket.bucket(s.LEASES), f"{where}/leases",
            lambda key, b, w: self.lease(name, key, b, w)))
        sandboxes = bucket.bucket(s.SANDBOXES)
        if sandboxes is not None:
            ns.sandboxes = self.sandboxes(name, sandboxes, f"{where}/sandboxes", at_root=False)
        return ns

    def times(self, bucket: Bucket, where: str) -> tuple[dt.datetime | None, dt.datetime | None]:
        created = bucket.get(s.CREATED_AT)
        updated = bucket.get(s.UPDATED_AT)
        return (
            self.time(created, where, "createdat") if created else None,
            self.time(updated, where, "updatedat") if updated else None,
        )

    def snapshot(self, ns: str, ss: str, key: str, b: Bucket, base: str) -> SnapshotRecord:
        name = parent = created_raw = updated_raw = None
        labels: dict[str, str] = {}
        children: tuple[str, ...] = ()
        # One pass over the record: this runs once per snapshot and must stay cheap.
        for k, v in b.items():
            if isinstance(v, bytes):
                if k == s.NAME:
                    name = v.decode("utf-8", "surrogateescape")
                elif k == s.PARENT:
                    parent = v.decode("utf-8", "surrogateescape") or None
                elif k == s.CREATED_AT:
                    created_raw = v
                elif k == s.UPDATED_AT:
                    updated_raw = v
            elif k == s.LABELS:
                labels = self.strings(v)
            elif k == s.CHILDREN:
                children = self.keys(v)
        created = self.time(created_raw, base, key, "createdat") if created_raw else None
        if updated_raw == created_raw:  # never updated: skip the second decode
            updated = created
        else:
            updated = self.time(updated_raw, base, key, "updatedat") if updated_raw else None
        return SnapshotRecord(ns, ss, key, name, parent, labels, children, created, updated)

    def image(self, ns: str, name: str, b: Bucket, where: str) -> ImageRecord:
        target = None
        tb = b.bucket(s.TARGET)
        if tb is not None:
            digest, media, size = tb.get(s.DIGEST), tb.get(s.MEDIA_TYPE), tb.get(s.SIZE)
            target = Target(
                text(digest) if digest is not None else None,
                text(media) if media is not None else None,
                self.varint(size, f"{where}/target/size") if size is not None else None,
            )
        created, updated = self.times(b, where)
        return ImageRecord(ns, name, target, self.strings(b.bucket(s.LABELS)),
                           self.strings(b.bucket(s.ANNOTATIONS)), created, updated)

    def container(self, ns: str, cid: str, b: Bucket, where: str) -> ContainerRecord:
        runtime = b.bucket(s.RUNTIME)
        runtime_name = runtime.get(s.NAME) if runtime is not None else None
        extensions = b.bucket(s.EXTENSIONS)
        created, updated = self.times(b, where)
        return ContainerRecord(
            namespace=ns,
            id=cid,
            image=text(b.get(s.IMAGE) or b""),
            snapshotter=text(b.get(s.SNAPSHOTTER) or b""),
            snapshot_key=text(b.get(s.SNAPSHOT_KEY) or b""),
            sandbox_id=text(b.get(s.SANDBOX_ID) or b""),
            runtime_name=text(runtime_name or b""),
            runtime_options=runtime.get(s.OPTIONS) if runtime is not None else None,
            spec=b.get(s.SPEC),
            extensions={text(k): v for k, v in extensions.values()} if extensions else {},
            labels=self.strings(b.bucket(s.LABELS)),
            created=created,
            updated=updated,
        )

    def blob(self, ns: str, digest: str, b: Bucket, where: str) -> BlobRecord:
        size = b.get(s.SIZE)
        created, updated = self.times(b, where)
        return BlobRecord(ns, digest, self.varint(size, f"{where}/size") if size else None,
                          self.strings(b.bucket(s.LABELS)), created, updated)

    def ingest(self, ns: str, ref: str, b: Bucket, where: str) -> IngestRecord:
        backend, expire, expected = b.get(s.REF), b.get(s.EXPIRE_AT), b.get(s.EXPECTED)
        return IngestRecord(
            ns, ref,
            text(backend) if backend is not None else None,
            self.time(expire, f"{where}/expireat") if expire else None,
            text(expected) if expected else None,
        )

    def lease(self, ns: str, lid: str, b: Bucket, where: str) -> LeaseRecord:
        created = b.get(s.CREATED_AT)
        snapshots: list[tuple[str, str]] = []
        sb = b.bucket(s.SNAPSHOTS)
        if sb is not None:
            for ss, keys in sb.buckets():
                snapshots.extend((text(ss), key) for key in self.keys(keys))
        return LeaseRecord(
            ns, lid,
            self.time(created, f"{where}/createdat") if created else None,
            self.strings(b.bucket(s.LABELS)),
            tuple(snapshots),
            self.keys(b.bucket(s.CONTENT)),
            self.keys(b.bucket(s.INGESTS)),
            self.keys(b.bucket(s.IMAGES)),
        )

    def sandboxes(self, ns: str, parent: Bucket, where: str, *, at_root: bool
                  ) -> list[SandboxRecord]:
        def one(sid: str, b: Bucket, w: str) -> SandboxRecord:
            runtime = b.bucket(s.RUNTIME)
            runtime_name = runtime.get(s.NAME) if runtime is not None else None
            created, updated = self.times(b, w)
            return SandboxRecord(ns, sid, text(b.get(s.SANDBOXER) or b""),
                                 text(runtime_name or b""), self.strings(b.bucket(s.LABELS)),
                                 created, updated, at_root)

        return list(self.each_bucket(parent, where, one))
