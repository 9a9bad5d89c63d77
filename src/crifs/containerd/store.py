"""``ContainerdStore``: a containerd root read offline into the crifs model.

Opening reads ``meta.db`` once and the ``metadata.db`` of every snapshotter crifs knows
(overlayfs, native) that has one; nothing is locked, written or followed out of the root.
Listings are built from that one read and match what ``ctr`` prints for the same store
(``snapshots ls``/``usage``/``mounts``/``info``, ``images ls``, ``containers ls``,
``namespaces ls``) with one deliberate difference: a ``meta.db`` snapshot record whose
snapshotter entry is missing is listed with kind ``Unknown`` (ctr silently skips it).

Which containerd wrote the store decides the overlay option order: ``v1/version`` 4 is 2.x;
3 is 1.6 or 1.7, told apart by 1.7-only traces (sandboxes at the bolt root, or configured
``mount_options``, which 1.6 ignores). Pass ``containerd_version`` to override.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

from crifs.containerd import schema
from crifs.containerd.config import DEFAULT_CONFIG, ContainerdConfig, load_config
from crifs.containerd.content import (
    ContentStore,
    Descriptor,
    HostPlatform,
    ImageWalker,
    IngestDir,
    content_root,
)
from crifs.containerd.metadata import (
    BlobRecord,
    ContainerRecord,
    ImageRecord,
    IngestRecord,
    LeaseRecord,
    MetaDB,
    SandboxRecord,
    SnapshotRecord,
    read_meta_db,
)
from crifs.containerd.snapshotter import BackendRecord, SnapshotterDB, read_snapshotter_db
from crifs.errors import CrifsError, NotFound, UnsafePath
from crifs.fs.locks import PROC_LOCKS, lock_holders
from crifs.fs.mounts import fs_type, root_info
from crifs.fs.usage import disk_usage
from crifs.model import (
    CONTAINERD,
    Container,
    Image,
    Mount,
    Snapshot,
    SnapshotKind,
    StoreInfo,
    Usage,
)

FLAVOR_16, FLAVOR_17, FLAVOR_2X = "1.6", "1.7", "2.x"
OVERLAY_INDEX_PARAM = "/sys/module/overlay/parameters/index"


def resolve_config(
    root: str | os.PathLike[str] | None, config: str | os.PathLike[str] | None
) -> ContainerdConfig:
    """The configuration that governs ``root``.

    An explicit ``config`` is always read. Otherwise the default ``/etc/containerd/config.toml``
    is used when it exists and either no root was given or it names the same root (another
    root's settings, such as ``root_path`` or ``mount_options``, would not apply to it).
    """
    if config is not None:
        return load_config(config)
    if os.path.isfile(DEFAULT_CONFIG):
        try:
            found = load_config(DEFAULT_CONFIG)
        except CrifsError:
            if root is None:
                raise
            return ContainerdConfig()
        if root is None or _same_path(found.root, os.fspath(root)):
            return found
    return ContainerdConfig()


def detect(
    root: str | os.PathLike[str] | None = None, config: str | os.PathLike[str] | None = None
) -> bool:
    """True when ``root`` (or the configured/default root) holds a containerd ``meta.db``."""
    try:
        cfg = resolve_config(root, config)
    except CrifsError:
        return False
    base = os.fspath(root) if root is not None else cfg.root
    return os.path.isfile(os.path.join(base, schema.METADATA_PLUGIN_DIR, schema.META_DB))


def open_store(
    root: str | os.PathLike[str] | None = None,
    state: str | os.PathLike[str] | None = None,
    config: str | os.PathLike[str] | None = None,
    *,
    containerd_version: str | None = None,
) -> ContainerdStore:
    """Open the containerd store at ``root`` (see :meth:`ContainerdStore.open`)."""
    return ContainerdStore.open(
        root=root, state=state, config=config, containerd_version=containerd_version
    )


class ContainerdStore:
    """One containerd root, read once at open. Implements ``crifs.model.Store``."""

    runtime = CONTAINERD

    def __init__(
        self,
        config: ContainerdConfig,
        root: str,
        state: str | None,
        meta: MetaDB,
        snapshotters: dict[str, SnapshotterDB],
        unsupported: tuple[str, ...],
        containerd_version: str | None = None,
    ) -> None:
        self.config = config
        self.root = Path(root)
        self.state = Path(state) if state is not None else None
        self.meta = meta
        self.unsupported_snapshotters = unsupported
        self.containerd_version = containerd_version
        self._snapshotters = snapshotters
        self._content = ContentStore(content_root(root))
        self._host = HostPlatform()
        self._walkers: dict[str, ImageWalker] = {}

    @classmethod
    def open(
        cls,
        root: str | os.PathLike[str] | None = None,
        state: str | os.PathLike[str] | None = None,
        config: str | os.PathLike[str] | None = None,
        *,
        containerd_version: str | None = None,
    ) -> ContainerdStore:
        """Read the store. ``root``/``state`` default to the config's (``/var/lib/containerd``,
        ``/run/containerd``). Raises ``NotFound`` for a missing root or ``meta.db``,
        ``CorruptStore`` naming the file for an undecodable DB, ``BadInput`` for a bad config.
        """
        cfg = resolve_config(root, config)
        root_path = os.path.abspath(os.fspath(root) if root is not None else cfg.root)
        # With only --root, the host's default state dir says nothing about that root.
        state_path: str | None = None
        if state is not None:
            state_path = os.path.abspath(os.fspath(state))
        elif root is None or cfg.path is not None:
            state_path = os.path.abspath(cfg.state)
        if not os.path.isdir(root_path):
            raise NotFound("containerd root does not exist", path=root_path)
        meta_path = os.path.join(root_path, schema.METADATA_PLUGIN_DIR, schema.META_DB)
        if not os.path.lexists(meta_path):
            raise NotFound("not a containerd root: no metadata database", path=meta_path)
        if not _inside(os.path.realpath(meta_path), os.path.realpath(root_path)):
            raise UnsafePath("is a symlink that leaves the containerd root", path=meta_path)
        meta = read_meta_db(meta_path)
        snapshotters: dict[str, SnapshotterDB] = {}
        for name in schema.SUPPORTED_SNAPSHOTTERS:
            ss_root = _snapshotter_root(cfg, root_path, name)
            if os.path.lexists(os.path.join(ss_root, schema.SNAPSHOTTER_DB)):
                snapshotters[name] = read_snapshotter_db(name, ss_root)
        unsupported = tuple(
            name
            for name in _snapshotter_dirs(root_path)
            if name not in schema.SUPPORTED_SNAPSHOTTERS
            and os.path.isfile(
                os.path.join(root_path, schema.snapshotter_dir(name), schema.SNAPSHOTTER_DB)
            )
        )
        return cls(cfg, root_path, state_path, meta, snapshotters, unsupported, containerd_version)

    # -- raw records (cheap views of the one read) --------------------------------------------

    @property
    def meta_db_path(self) -> str:
        return self.meta.path

    @property
    def content_store(self) -> ContentStore:
        return self._content

    def snapshotter_db(self, name: str) -> SnapshotterDB | None:
        """The decoded ``metadata.db`` of snapshotter ``name``, if crifs read one."""
        return self._snapshotters.get(name)

    @property
    def snapshotter_names(self) -> tuple[str, ...]:
        """Snapshotters whose ``metadata.db`` was read."""
        return tuple(self._snapshotters)

    def _namespaces(self, namespace: str | None) -> Iterator[str]:
        if namespace is None:
            yield from self.meta.namespaces
        elif namespace in self.meta.namespaces:
            yield namespace

    def snapshot_records(
        self, namespace: str | None = None, snapshotter: str | None = None
    ) -> list[SnapshotRecord]:
        out: list[SnapshotRecord] = []
        for ns in self._namespaces(namespace):
            for ss, records in self.meta.namespaces[ns].snapshots.items():
                if snapshotter is None or ss == snapshotter:
                    out.extend(records)
        return out

    def image_records(self, namespace: str | None = None) -> list[ImageRecord]:
        return [i for ns in self._namespaces(namespace) for i in self.meta.namespaces[ns].images]

    def container_records(self, namespace: str | None = None) -> list[ContainerRecord]:
        return [
            c for ns in self._namespaces(namespace) for c in self.meta.namespaces[ns].containers
        ]

    def content_blobs(self, namespace: str | None = None) -> list[BlobRecord]:
        return [
            b for ns in self._namespaces(namespace) for b in self.meta.namespaces[ns].blobs.values()
        ]

    def ingests(self, namespace: str | None = None) -> list[IngestRecord]:
        return [i for ns in self._namespaces(namespace) for i in self.meta.namespaces[ns].ingests]

    def ingest_dirs(self) -> list[IngestDir]:
        """Unfinished writes in the content store's ``ingest/`` directory."""
        return list(self._content.ingest_dirs())

    def leases(self, namespace: str | None = None) -> list[LeaseRecord]:
        return [x for ns in self._namespaces(namespace) for x in self.meta.namespaces[ns].leases]

    def sandboxes(self, namespace: str | None = None) -> list[SandboxRecord]:
        """Sandboxes under ``v1`` (2.x) and at the bolt root (1.7)."""
        found = [
            x for ns in self._namespaces(namespace) for x in self.meta.namespaces[ns].sandboxes
        ]
        return found + [
            x for x in self.meta.root_sandboxes if namespace is None or x.namespace == namespace
        ]

    def backend_records(self, snapshotter: str) -> list[BackendRecord]:
        """Records in ``snapshotter``'s ``metadata.db`` that no ``meta.db`` record names
        (in any namespace): what containerd's GC would prune from the backend."""
        db = self._snapshotters.get(snapshotter)
        if db is None:
            return []
        named = {
            r.name
            for ns in self.meta.namespaces.values()
            for r in ns.snapshots.get(snapshotter, ())
            if r.name
        }
        return [r for key, r in db.records.items() if key not in named]

    # -- the Store protocol ------------------------------------------------------------------

    def namespaces(self) -> list[str]:
        return sorted(self.meta.namespaces)

    def snapshots(
        self, namespace: str | None = None, snapshotter: str | None = None
    ) -> list[Snapshot]:
        if namespace is None and snapshotter is None:
            return list(self._all_snapshots)
        return [
            x
            for x in self._all_snapshots
            if (namespace is None or x.namespace == namespace)
            and (snapshotter is None or x.snapshotter == snapshotter)
        ]

    @cached_property
    def _all_snapshots(self) -> list[Snapshot]:
        # One loop per (namespace, snapshotter) with the lookups hoisted: this builds every
        # listed snapshot (10,000 for a big store), so per-snapshot work is kept to the model.
        out: list[Snapshot] = []
        append = out.append
        committed = SnapshotKind.COMMITTED
        for ns in self.meta.namespaces.values():
            for ss, records in ns.snapshots.items():
                db = self._snapshotters.get(ss)
                if db is None:
                    out.extend(self._missing(r) for r in records)
                    continue
                backends = db.records
                own_dir = db.own_dir
                for r in records:
                    backend = backends.get(r.name) if r.name else None
                    if backend is None:
                        append(self._missing(r))
                        continue
                    kind = backend.kind
                    stored = None
                    if kind is committed:
                        stored = Usage(backend.size or 0, backend.inodes or 0)
                    labels = {**backend.labels, **r.labels} if backend.labels else r.labels
                    append(Snapshot(
                        CONTAINERD, r.key, kind, ss, r.namespace, r.parent,
                        str(backend.id) if backend.id is not None else None,
                        r.name, own_dir(backend), labels, r.created, r.updated, stored,
                    ))
        return out

    @staticmethod
    def _missing(r: SnapshotRecord) -> Snapshot:
        """A ``meta.db`` record whose snapshotter has no record (or no database) for it."""
        return Snapshot(
            runtime=CONTAINERD,
            key=r.key,
            kind=SnapshotKind.UNKNOWN,
            snapshotter=r.snapshotter,
            namespace=r.namespace,
            parent=r.parent,
            backend_key=r.name,
            labels=r.labels,
            created=r.created,
            updated=r.updated,
            flags={"backend_missing": True},
        )

    def _backend(self, snapshot: Snapshot) -> tuple[SnapshotterDB, BackendRecord]:
        db = self._snapshotters.get(snapshot.snapshotter)
        if db is None:
            raise NotFound(
                f"snapshot {snapshot.key}: snapshotter {snapshot.snapshotter!r} has "
                "no metadata.db crifs can read",
                path=str(self.root),
            )
        backend = db.records.get(snapshot.backend_key or "")
        if backend is None:
            raise NotFound(
                f"snapshot {snapshot.key}: no record {snapshot.backend_key!r} in the "
                "snapshotter database",
                path=db.db_path,
            )
        return db, backend

    def usage(self, snapshot: Snapshot) -> Usage:
        """As containerd's snapshotter ``Usage``: a live walk of an Active snapshot's own
        directory (st_blocks*512, the directory itself and each inode counted once), the
        values stored at commit time otherwise (0/0 for a View, which stores none)."""
        db, backend = self._backend(snapshot)
        if backend.kind is SnapshotKind.ACTIVE:
            directory = db.own_dir(backend)
            if directory is None:
                raise NotFound(f"snapshot {snapshot.key} has no directory", path=db.db_path)
            return disk_usage(directory)
        return Usage(disk_bytes=backend.size or 0, inodes=backend.inodes or 0)

    def mounts(self, snapshot: Snapshot) -> list[Mount]:
        db, backend = self._backend(snapshot)
        return db.mounts(backend, self.overlay_options, self.mount_flavor)

    @cached_property
    def mount_flavor(self) -> str:
        """Which containerd's mount option order applies: ``1.6``, ``1.7`` or ``2.x``."""
        version = self.containerd_version
        if version:
            if version.lstrip("v").startswith("1.7"):
                return FLAVOR_17
            return FLAVOR_16 if version.lstrip("v").startswith("1.") else FLAVOR_2X
        if self.meta.db_version == schema.DB_VERSION_2X:
            return FLAVOR_2X
        if self.meta.root_sandboxes or self.config.overlay_mount_options:
            return FLAVOR_17
        return FLAVOR_16

    @cached_property
    def overlay_options(self) -> tuple[str, ...]:
        """The snapshotter-wide overlay options containerd computes at start-up."""
        index_off = os.path.exists(OVERLAY_INDEX_PARAM)
        overlay_root = _snapshotter_root(self.config, str(self.root), schema.OVERLAYFS)
        userxattr = _needs_userxattr(overlay_root)
        if self.mount_flavor == FLAVOR_16:
            return tuple(["index=off"] * index_off + ["userxattr"] * userxattr)
        options = list(self.config.overlay_mount_options)
        # Same (odd) tests as containerd: only a bare "index" suppresses index=off.
        if userxattr and "userxattr" not in options:
            options.append("userxattr")
        if index_off and "index" not in options:
            options.append("index=off")
        return tuple(options)

    def images(self, namespace: str | None = None) -> list[Image]:
        return [self._image(r) for r in self.image_records(namespace)]

    def _walker(self, namespace: str) -> ImageWalker:
        walkers = self._walkers
        walker = walkers.get(namespace)
        if walker is None:
            blobs = self.meta.namespaces[namespace].blobs
            walker = walkers[namespace] = ImageWalker(self._content, blobs.__contains__, self._host)
        return walker

    def _image(self, r: ImageRecord) -> Image:
        t = r.target
        size: int | None = None
        platforms: tuple[str, ...] = ()
        image_id = ""
        top_layer = None
        if t is not None and t.digest:
            walker = self._walker(r.namespace)
            target = Descriptor(t.media_type or "", t.digest, t.size or 0)
            size = walker.size(target).size
            platforms, _ = walker.platforms(target)
            image_id = t.digest
            config = walker.config(target)
            if config is not None:
                image_id = config.digest
                top_layer = _top_chain_id(
                    self._content.read_json(config.digest)
                    if walker.available(config.digest)
                    else None
                )
        return Image(
            runtime=CONTAINERD,
            name=r.name,
            id=image_id,
            namespace=r.namespace,
            digest=t.digest if t else None,
            media_type=t.media_type if t else None,
            size_bytes=size,
            platforms=platforms,
            top_layer=top_layer,
            labels=r.labels,
            created=r.created,
            updated=r.updated,
        )

    def containers(self, namespace: str | None = None) -> list[Container]:
        return [
            Container(
                runtime=CONTAINERD,
                id=c.id,
                image=c.image,
                namespace=c.namespace,
                runtime_name=c.runtime_name or None,
                snapshotter=c.snapshotter or None,
                snapshot_key=c.snapshot_key or None,
                labels=c.labels,
                created=c.created,
                updated=c.updated,
            )
            for c in self.container_records(namespace)
        ]

    # -- info --------------------------------------------------------------------------------

    @property
    def layout(self) -> str:
        version = self.meta.db_version
        if version == schema.DB_VERSION_1X:
            return "1.x (db v3)"
        if version == schema.DB_VERSION_2X:
            return "2.x (db v4)"
        return "unknown (no v1/version)" if version is None else f"unknown (db v{version})"

    def daemon(self) -> tuple[bool | None, str | None]:
        """Whether a containerd holds ``meta.db`` open for writing (its lifelong flock)."""
        if not os.path.exists(PROC_LOCKS):
            return None, "cannot tell: /proc/locks is not readable"
        for holder in lock_holders(self.meta.path):
            if holder.family == "FLOCK" and holder.mode == "WRITE" and not holder.blocked:
                who = f"pid {holder.pid} ({holder.process_name() or '?'})"
                return True, f"{who} holds an exclusive flock on {self.meta.path}"
        return False, None

    def info(self) -> StoreInfo:
        """Roots, snapshotters, daemon and totals. ``content_blobs``/``content`` count each
        digest once across namespaces; ``snapshots_disk`` sums :meth:`usage` over every
        listed snapshot (walking Active ones)."""
        running, detail = self.daemon()
        snapshots = self._all_snapshots
        disk = 0
        for snap in snapshots:
            if snap.kind is SnapshotKind.UNKNOWN:
                continue
            try:
                disk += self.usage(snap).disk_bytes
            except NotFound:
                continue
        blob_sizes: dict[str, int] = {}
        for blob in self.content_blobs():
            blob_sizes[blob.digest] = blob.size or 0
        drivers = list(self._snapshotters)
        drivers += [f"{name} (unsupported)" for name in self.unsupported_snapshotters]
        return StoreInfo(
            runtime=CONTAINERD,
            root=root_info(str(self.root)),
            state=root_info(str(self.state)) if self.state is not None else None,
            drivers=tuple(drivers),
            config_path=self.config.path,
            daemon_running=running,
            daemon_detail=detail,
            layout=self.layout,
            counts={
                "namespaces": len(self.meta.namespaces),
                "images": len(self.image_records()),
                "containers": len(self.container_records()),
                "snapshots": len(snapshots),
                "content_blobs": len(blob_sizes),
                "leases": len(self.leases()),
            },
            total_bytes={"snapshots_disk": disk, "content": sum(blob_sizes.values())},
        )

    def __repr__(self) -> str:
        return f"ContainerdStore(root={str(self.root)!r}, layout={self.layout!r})"


# -- helpers --------------------------------------------------------------------------------


def _snapshotter_root(cfg: ContainerdConfig, root: str, name: str) -> str:
    configured = cfg.snapshotter_root_paths.get(name)
    return configured or os.path.join(root, schema.snapshotter_dir(name))


def _snapshotter_dirs(root: str) -> list[str]:
    try:
        with os.scandir(root) as it:
            return sorted(
                e.name.removeprefix(schema.SNAPSHOTTER_DIR_PREFIX)
                for e in it
                if e.name.startswith(schema.SNAPSHOTTER_DIR_PREFIX)
                and e.is_dir(follow_symlinks=False)
            )
    except OSError:
        return []


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _top_chain_id(config: object) -> str | None:
    """The ChainID of an image config's last layer: its top snapshot's key."""
    import hashlib

    if not isinstance(config, dict):
        return None
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not diff_ids:
        return None
    chain: str | None = None
    for diff_id in diff_ids:
        if not isinstance(diff_id, str):
            return None
        chain = (
            diff_id
            if chain is None
            else ("sha256:" + hashlib.sha256(f"{chain} {diff_id}".encode()).hexdigest())
        )
    return chain


def _needs_userxattr(overlay_root: str) -> bool:
    """containerd's ``NeedsUserXAttr``, judged from this process: only inside a user
    namespace, not on tmpfs, and (without the mount probe containerd does on old kernels)
    only on kernels >= 5.11."""
    if not _in_user_namespace():
        return False
    if fs_type(overlay_root) == "tmpfs":
        return False
    release = platform.release().split(".")
    try:
        return (int(release[0]), int(release[1].split("-")[0])) >= (5, 11)
    except (IndexError, ValueError):
        return False


def _in_user_namespace() -> bool:
    try:
        with open("/proc/self/uid_map", encoding="ascii") as f:
            fields = f.read().split()
    except OSError:
        return False
    return fields != ["0", "0", "4294967295"]
