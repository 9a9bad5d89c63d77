"""A containers/storage store (CRI-O, podman, buildah; overlay driver) read offline into the model.

Mapping (see ``crifs.model``):

- runtime ``cstorage``, namespace ``None``, snapshotter ``overlay`` (the driver name).
- Each layer is a ``Snapshot`` with key = id = the layer id, parent = the parent layer id and
  path ``<graphroot>/overlay/<id>/diff``. **Kind rule**: a layer that is some container's
  ``layer`` (its RW layer) is ``Active``; every other layer is ``Committed`` (image layers,
  their parents, and layers nothing references). c/storage records no writable bit, so this
  is the only rule the records support. ``flags`` is the layer's own ``flags`` map
  (``incomplete`` included); ``details`` carries ``diff_size`` (the uncompressed *tar* size,
  not disk usage), digests, compression, mount count and the owning container.
  ``stored_usage`` is ``None``: the store records no disk usage.
- ``usage()`` measures the ``diff`` dir for every layer (c/storage keeps no usage figure).
- ``mounts()`` is the one overlay mount the driver would build: a container's RW layer gets the
  RW form with the container's ``MountOpts`` (or storage.conf's mountopt), any other layer the
  read-only form ``podman image mount`` uses (see ``crifs.cstorage.overlay``).
- ``images()``: ``size_bytes`` is podman 4.3.1's ``podman images`` Size (c/storage 1.43
  ``store.ImageSize``): for every distinct layer reachable from the top layer and the mapped
  top layers through parents, ``diff-size`` when the layer has a ``diff-digest``, else the
  apparent size of the files in its ``diff`` dir; plus every big-data item's size
  (``big-data-sizes``, else the item file's length). ``None`` where podman would fail (a layer
  or big-data item missing).
- ``containers()``: ``image`` is the name the container was created from (``image-name`` in
  the engine metadata, as ``podman ps`` shows it), else the image's first name, else its id.

Opening takes the store's read locks (``crifs.cstorage.locks``), reads every JSON file once,
and releases them; later calls read only the driver's small files and directory trees.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

from crifs.cstorage import overlay
from crifs.cstorage.config import StorageConfig, load_config
from crifs.cstorage.locks import DEFAULT_TIMEOUT_S, read_locks
from crifs.cstorage.paths import DRIVER, StorePaths, additional_store_home
from crifs.cstorage.records import (
    ContainerRecord,
    ImageRecord,
    LayerRecord,
    MountPointRecord,
    merge_by_id,
    parse_containers,
    parse_images,
    parse_layers,
    parse_mountpoints,
)
from crifs.errors import CorruptStore, CrifsError, NotFound, UnsafePath, Unsupported
from crifs.fs.locks import lock_holders
from crifs.fs.mounts import root_info
from crifs.fs.usage import disk_usage
from crifs.model import (
    CSTORAGE,
    Container,
    Image,
    Mount,
    Snapshot,
    SnapshotKind,
    StoreInfo,
    Usage,
)

ConfigArg = str | os.PathLike[str] | StorageConfig | None
_SUPPORTED_DRIVERS = ("overlay", "overlay2")
_CRIO_DEFAULT_ROOT = "/var/lib/containers/storage"


def detect(root: str | os.PathLike[str] | None = None, config: ConfigArg = None) -> bool:
    """True when ``root`` (or the configured graphroot) holds an overlay containers/storage
    store, i.e. has an ``overlay-layers`` directory. Never raises for bad input."""
    try:
        cfg = _config(config)
    except CrifsError:
        if root is None:
            return False
        cfg = StorageConfig()
    graphroot = os.path.abspath(os.fspath(root)) if root is not None else cfg.graphroot
    return os.path.isdir(StorePaths(graphroot, cfg.runroot).layers_dir)


def open_store(root: str | os.PathLike[str] | None = None,
               runroot: str | os.PathLike[str] | None = None,
               config: ConfigArg = None,
               lock_timeout: float = DEFAULT_TIMEOUT_S,
               *, take_locks: bool = True) -> CStorageStore:
    """Open the store at ``root`` (see :meth:`CStorageStore.open`)."""
    return CStorageStore.open(root=root, runroot=runroot, config=config,
                              lock_timeout=lock_timeout, take_locks=take_locks)


def _config(config: ConfigArg) -> StorageConfig:
    if isinstance(config, StorageConfig):
        return config
    return load_config(config)


class CStorageStore:
    """One containers/storage graphroot, its JSON records read once at open.

    Implements ``crifs.model.Store``; the record lists (``layer_records`` …) and
    :meth:`lower_chain` / :meth:`links` expose the c/storage specifics to check engines.
    """

    runtime = CSTORAGE

    def __init__(self, config: StorageConfig, paths: StorePaths,
                 layers: list[LayerRecord], images: list[ImageRecord],
                 containers: list[ContainerRecord], mountpoints: list[MountPointRecord],
                 locked_files: Sequence[str] = ()) -> None:
        self.config = config
        self.paths = paths
        self.root = Path(paths.graphroot)
        self.runroot = Path(paths.runroot)
        self.layer_records = layers
        self.image_records = images
        self.container_records = containers
        self.mountpoint_records = mountpoints
        self.locked_files = tuple(locked_files)
        self.additional_homes = tuple(additional_store_home(s)
                                      for s in config.additional_image_stores)
        self.driver_settings = overlay.read_driver_settings(
            paths, config.mountopt, config.mount_program, config.disable_volatile)
        self._layers_by_id = {layer.id: layer for layer in layers}
        self._container_by_layer = {c.layer: c for c in containers if c.layer}
        self._mount_by_layer = {m.id: m for m in mountpoints}
        self._snapshots: list[Snapshot] | None = None

    @classmethod
    def open(cls, root: str | os.PathLike[str] | None = None,
             runroot: str | os.PathLike[str] | None = None,
             config: ConfigArg = None,
             lock_timeout: float = DEFAULT_TIMEOUT_S,
             take_locks: bool = True) -> CStorageStore:
        """Read the store under its read locks.

        ``root``/``runroot`` default to storage.conf's (``config``: a path, a loaded
        ``StorageConfig``, or ``None`` to search as containers/storage does). Raises
        ``NotFound`` for a missing graphroot or one that is not a store, ``Unsupported`` for a
        store of another driver, ``CorruptStore`` naming the file for unreadable or malformed
        JSON, ``StoreLocked`` when a writer holds a lock past ``lock_timeout`` seconds and
        ``BadInput`` for a bad storage.conf.

        ``take_locks=False`` reads without touching the lock files: only for a caller that
        already holds them for writing (``crifs.repair``). POSIX record locks belong to the
        process, so taking and releasing a read lock would release that caller's write lock.
        """
        cfg = _config(config)
        graphroot = os.path.abspath(os.fspath(root)) if root is not None else cfg.graphroot
        run = os.path.abspath(os.fspath(runroot)) if runroot is not None else cfg.runroot
        if cfg.driver and cfg.driver not in _SUPPORTED_DRIVERS and root is None:
            raise Unsupported(f"storage driver {cfg.driver!r} is configured; crifs reads only "
                              "the overlay driver", path=cfg.path)
        paths = StorePaths(graphroot, run, transient=cfg.transient_store)
        _check_root(paths)
        lock_files = _lock_files(paths) if take_locks else []
        with read_locks(lock_files, timeout=lock_timeout) as locked:
            layers = merge_by_id(*(parse_layers(p, data) for p, data in _read_all(
                paths.layers_json, *_volatile_candidates(paths, "layers"))))
            images = merge_by_id(*(parse_images(p, data) for p, data in _read_all(
                paths.images_json)))
            containers = merge_by_id(*(parse_containers(p, data) for p, data in _read_all(
                paths.containers_json, *_volatile_candidates(paths, "containers"))))
            mountpoints = [m for p, data in _read_all(paths.mountpoints_json)
                           for m in parse_mountpoints(p, data)]
        return cls(cfg, paths, layers, images, containers, mountpoints, locked)

    # -- Store protocol ----------------------------------------------------------------------

    def namespaces(self) -> list[str]:
        return []

    def snapshots(self, namespace: str | None = None, snapshotter: str | None = None
                  ) -> list[Snapshot]:
        """Every layer record (incomplete ones included), in layers.json order."""
        if snapshotter not in (None, DRIVER):
            return []
        if self._snapshots is None:
            self._snapshots = [self._snapshot(layer) for layer in self.layer_records]
        return list(self._snapshots)

    def images(self, namespace: str | None = None) -> list[Image]:
        return [self._image(record) for record in self.image_records]

    def containers(self, namespace: str | None = None) -> list[Container]:
        images_by_id = {image.id: image for image in self.image_records}
        return [self._container(record, images_by_id) for record in self.container_records]

    def usage(self, snapshot: Snapshot) -> Usage:
        """Measured usage of the layer's ``diff`` dir (every kind: c/storage stores none).
        Raises ``NotFound`` when the layer directory is gone and ``UnsafePath`` when it is a
        symlink (it is never followed)."""
        layer = self._layer(snapshot)
        self._check_layer_dir(layer.id, missing=NotFound)
        return disk_usage(self.paths.layer_diff(layer.id))

    def mounts(self, snapshot: Snapshot) -> list[Mount]:
        """The overlay mount the driver would build for this layer (see module doc). Raises
        ``CorruptStore`` naming the file or link when the lower chain cannot be resolved."""
        layer = self._layer(snapshot)
        self._check_layer_dir(layer.id, missing=CorruptStore)
        lowers = overlay.lower_chain(self.paths, layer.id, self.additional_homes)
        container = self._container_by_layer.get(layer.id)
        if container is not None:
            requested: Sequence[str] = container.mount_opts
            volatile = container.volatile
            label = container.mount_label or (layer.mountlabel or "")
        else:
            requested, volatile, label = ("ro",), False, layer.mountlabel or ""
        options = overlay.option_list(self.driver_settings, requested, volatile)
        return [overlay.build_mount(self.paths, layer.id, lowers, options=options,
                                    mount_label=label, settings=self.driver_settings)]

    def info(self) -> StoreInfo:
        """Roots, daemon, layout, counts and the measured size of all layers (walks them)."""
        layer_dirs = overlay.list_layer_dirs(self.paths)
        with_ids = sum(1 for d in layer_dirs if overlay.has_lower_layers(self.paths, d))
        layout = (overlay.L_LINKS if with_ids == 0 else
                  overlay.LOWER_LAYERS if with_ids == len(
                      [r for r in self.layer_records if r.parent]) else
                  f"{overlay.LOWER_LAYERS} + {overlay.L_LINKS}")
        disk = apparent = 0
        for layer in self.layer_records:
            try:
                used = self.usage(self._snapshot(layer))
            except CrifsError:
                continue
            disk += used.disk_bytes
            apparent += used.apparent_bytes or 0
        running, detail = self._daemon()
        return StoreInfo(
            runtime=CSTORAGE,
            root=root_info(str(self.root)),
            state=root_info(str(self.runroot)),
            drivers=(DRIVER,),
            config_path=self.config.path,
            daemon_running=running,
            daemon_detail=detail,
            layout=layout,
            counts={
                "layers": len(self.layer_records),
                "images": len(self.image_records),
                "containers": len(self.container_records),
                "l_links": len(overlay.list_links(self.paths)),
                "layer_dirs": len(layer_dirs),
                "incomplete_layers": sum(1 for r in self.layer_records if r.incomplete),
                "mounted_layers": sum(1 for m in self.mountpoint_records if m.count > 0),
            },
            total_bytes={"layers_disk": disk, "layers_apparent": apparent},
        )

    # -- c/storage specifics -----------------------------------------------------------------

    def layer(self, layer_id: str) -> LayerRecord:
        """The layer record with this id; ``NotFound`` when there is none."""
        try:
            return self._layers_by_id[layer_id]
        except KeyError:
            raise NotFound(f"no layer {layer_id!r} in {self.paths.layers_json}") from None

    def lower_chain(self, layer_id: str) -> list[overlay.Lower]:
        """The layer's lowers as the driver resolves them (``CorruptStore`` if it cannot)."""
        return overlay.lower_chain(self.paths, layer_id, self.additional_homes)

    def link_name(self, layer_id: str) -> str | None:
        """The layer's ``link`` file (its ``l/`` name), whitespace stripped; ``None`` if
        the file is missing."""
        return overlay.read_link_name(self.paths, self.layer(layer_id).id)

    def links(self) -> list[overlay.LinkEntry]:
        """The entries of ``overlay/l``, never followed."""
        return overlay.list_links(self.paths)

    def image_size(self, image: ImageRecord) -> int | None:
        """podman 4.3.1's image Size (module doc); ``None`` where podman would fail."""
        queue = [lid for lid in (image.layer, *image.mapped_layers) if lid]
        seen: set[str] = set()
        size = 0
        while queue:
            layer_id = queue.pop()
            if layer_id in seen:
                continue
            seen.add(layer_id)
            layer = self._layers_by_id.get(layer_id)
            if layer is None:
                return None
            if layer.diff_digest:
                size += layer.diff_size or 0
            else:
                measured = _files_size(self.paths.layer_diff(layer_id))
                if measured is None:
                    return None
                size += measured
            if layer.parent:
                queue.append(layer.parent)
        for name in image.big_data_names:
            item = image.big_data_sizes.get(name)
            if item is None:
                item = _file_length(self.paths.image_big_data(image.id, name))
                if item is None:
                    return None
            size += item
        return size

    # -- mapping -----------------------------------------------------------------------------

    def _snapshot(self, layer: LayerRecord) -> Snapshot:
        container = self._container_by_layer.get(layer.id)
        kind = SnapshotKind.ACTIVE if container is not None else SnapshotKind.COMMITTED
        return Snapshot(
            runtime=CSTORAGE,
            key=layer.id,
            kind=kind,
            snapshotter=DRIVER,
            namespace=None,
            parent=layer.parent,
            id=layer.id,
            path=self.paths.layer_diff(layer.id),
            created=layer.created,
            names=layer.names,
            flags=dict(layer.flags),
            details=self._details(layer, container),
        )

    def _details(self, layer: LayerRecord, container: ContainerRecord | None
                 ) -> dict[str, object]:
        facts: dict[str, object | None] = {
            "diff_size": layer.diff_size,
            "diff_digest": layer.diff_digest,
            "compressed_size": layer.compressed_size,
            "compressed_diff_digest": layer.compressed_diff_digest,
            "compression": layer.compression,
            "mount_label": layer.mountlabel,
            "metadata": layer.metadata,
            "record_file": layer.source,
            "container": container.id if container is not None else None,
        }
        mount = self._mount_by_layer.get(layer.id)
        if mount is not None:
            facts["mount_count"] = mount.count
            facts["mount_point"] = mount.path
        return {key: value for key, value in facts.items() if value is not None}

    def _image(self, record: ImageRecord) -> Image:
        return Image(
            runtime=CSTORAGE,
            name=record.names[0] if record.names else record.id,
            id=record.id,
            namespace=None,
            digest=record.digest,
            size_bytes=self.image_size(record),
            names=record.names,
            top_layer=record.layer,
            created=record.created,
        )

    def _container(self, record: ContainerRecord, images: Mapping[str, ImageRecord]
                   ) -> Container:
        image_name = record.metadata_fields().get("image-name")
        if not isinstance(image_name, str) or not image_name:
            image = images.get(record.image or "")
            image_name = (image.names[0] if image is not None and image.names
                          else record.image or "")
        return Container(
            runtime=CSTORAGE,
            id=record.id,
            image=image_name,
            namespace=None,
            image_id=record.image,
            names=record.names,
            snapshotter=DRIVER,
            snapshot_key=record.layer,
            created=record.created,
        )

    def _layer(self, snapshot: Snapshot) -> LayerRecord:
        if snapshot.runtime != CSTORAGE:
            raise NotFound(f"snapshot {snapshot.key} is not a containers/storage layer")
        return self.layer(snapshot.id or snapshot.key)

    def _check_layer_dir(self, layer_id: str, missing: type[CrifsError]) -> None:
        layer_dir = self.paths.layer_dir(layer_id)
        try:
            mode = os.lstat(layer_dir).st_mode
        except FileNotFoundError:
            raise missing(f"layer {layer_id} has no directory", path=layer_dir) from None
        if stat.S_ISLNK(mode):
            raise UnsafePath("layer directory is a symlink; crifs does not follow it",
                             path=layer_dir)
        if not stat.S_ISDIR(mode):
            raise CorruptStore("layer directory is not a directory", path=layer_dir)

    def _daemon(self) -> tuple[bool, str]:
        crio = _crio_processes()
        if not crio:
            return False, "no crio process is running (podman and buildah run no daemon)"
        holders = {h.pid for path in _lock_files(self.paths) for h in lock_holders(path)}
        mine = os.path.realpath(self.root)
        for pid, root in crio:
            if pid in holders or os.path.realpath(root) == mine:
                return True, f"crio (pid {pid}) runs on this store"
        others = ", ".join(f"pid {pid} on {root}" for pid, root in crio)
        return False, f"crio runs on another store ({others})"

    def __repr__(self) -> str:
        return f"CStorageStore(root={str(self.root)!r}, runroot={str(self.runroot)!r})"


# -- helpers ---------------------------------------------------------------------------------


def _check_root(paths: StorePaths) -> None:
    if not os.path.isdir(paths.graphroot):
        raise NotFound("containers/storage graphroot does not exist", path=paths.graphroot)
    if os.path.isdir(paths.layers_dir):
        return
    try:
        others = sorted(name[: -len("-layers")] for name in os.listdir(paths.graphroot)
                        if name.endswith("-layers"))
    except OSError:
        others = []
    if others:
        raise Unsupported(f"a containers/storage store of the {', '.join(others)} driver; "
                          "crifs reads only the overlay driver", path=paths.graphroot)
    raise NotFound("is not a containers/storage store (no overlay-layers directory)",
                   path=paths.graphroot)


def _lock_files(paths: StorePaths) -> list[str]:
    graph_containers_lock = os.path.join(paths.containers_dir, "containers.lock")
    run_containers_lock = os.path.join(paths.run_containers_dir, "containers.lock")
    return list(dict.fromkeys([
        paths.storage_lock, paths.layers_lock, paths.images_lock,
        graph_containers_lock, run_containers_lock, paths.mountpoints_lock,
    ]))


def _volatile_candidates(paths: StorePaths, kind: str) -> list[str]:
    """Where volatile-<kind>.json may be: the configured place first, then the other one (a
    store written with transient_store on is readable with a config that says otherwise)."""
    graph_dir = paths.layers_dir if kind == "layers" else paths.containers_dir
    run_dir = paths.run_layers_dir if kind == "layers" else paths.run_containers_dir
    name = f"volatile-{kind}.json"
    first, second = (run_dir, graph_dir) if paths.transient else (graph_dir, run_dir)
    return list(dict.fromkeys([os.path.join(first, name), os.path.join(second, name)]))


def _read_all(*files: str) -> list[tuple[str, bytes]]:
    """``(path, bytes)`` of each file that exists; unreadable ones are ``CorruptStore``."""
    out = []
    for path in files:
        try:
            with open(path, "rb") as f:
                out.append((path, f.read()))
        except FileNotFoundError:
            continue
        except OSError as err:
            raise CorruptStore(f"cannot read: {os.strerror(err.errno or 0)}",
                               path=path) from None
    return out


def _files_size(root: str) -> int | None:
    """Sum of ``st_size`` of every non-directory under ``root``, each inode once (c/storage's
    ``directory.Size``, which ``DiffSize`` uses for a layer without a diff digest)."""
    if not os.path.isdir(root) or os.path.islink(root):
        return None
    seen: set[int] = set()
    total = 0
    stack = [root]
    while stack:
        try:
            it = os.scandir(stack.pop())
        except OSError:
            continue
        with it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if st.st_ino in seen:
                    continue
                seen.add(st.st_ino)
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
                else:
                    total += st.st_size
    return total


def _file_length(path: str) -> int | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _crio_processes() -> list[tuple[int, str]]:
    """``(pid, storage root)`` of every process named ``crio`` (root from ``--root``/``-r``,
    else CRI-O's default)."""
    found = []
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm", "rb") as f:
                if f.read().strip() != b"crio":
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [os.fsdecode(a) for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        found.append((pid, _crio_root(argv)))
    return found


def _crio_root(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg in ("--root", "-r") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--root="):
            return arg.split("=", 1)[1]
    return _CRIO_DEFAULT_ROOT
