"""Write a containerd root (1.6/1.7 layout) the way containerd would, without containerd.

``meta.db`` and the overlayfs ``metadata.db`` are bbolt files with containerd's schema; snapshot
directories hold the unpacked layers; the content store holds the blobs. Two namespaces:
``default`` pulled ``web``; ``k8s.io`` pulled both images the way the CRI records them (tag,
repo@digest and image-id records) and runs a container ``web-1`` on an active snapshot.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from crifs.containerd.boltwrite import write_bolt
from crifs.containerd.encoding import encode_gotime, encode_uvarint, encode_varint
from crifs.demo.faults import plant_containerd_db_faults, plant_containerd_file_faults
from crifs.demo.images import BuiltImage, extract
from crifs.fs.usage import disk_usage

SNAPSHOTTER = "overlayfs"
META_DIR = "io.containerd.metadata.v1.bolt"
OVERLAY_DIR = "io.containerd.snapshotter.v1.overlayfs"
CONTENT_DIR = "io.containerd.content.v1.content"
KIND_ACTIVE, KIND_COMMITTED = 2, 3
NOW = dt.datetime(2026, 11, 1, 12, 0, 0, tzinfo=dt.UTC)

Tree = dict[bytes, "bytes | Tree"]


@dataclass
class _Backend:
    """The overlayfs snapshotter's own records, in allocation order."""

    root: Path
    next_id: int = 1
    snapshots: Tree = field(default_factory=dict)
    parents: Tree = field(default_factory=dict)
    ids: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, parent: str | None, kind: int, files: list | None) -> int:
        sid = self.next_id
        self.next_id += 1
        fs = self.root / OVERLAY_DIR / "snapshots" / str(sid) / "fs"
        extract(files or [], fs)
        if kind == KIND_ACTIVE:
            (fs.parent / "work").mkdir(mode=0o711)
        rec: Tree = {
            b"id": encode_uvarint(sid),
            b"kind": bytes([kind]),
            b"createdat": encode_gotime(NOW),
            b"updatedat": encode_gotime(NOW),
        }
        if parent:
            rec[b"parent"] = parent.encode()
            self.parents[encode_uvarint(self.ids[parent]) + b"\0" + encode_uvarint(sid)] = (
                name.encode()
            )
        if kind == KIND_COMMITTED:
            usage = disk_usage(fs)
            rec[b"size"] = encode_varint(usage.disk_bytes)
            rec[b"inodes"] = encode_varint(usage.inodes)
        self.snapshots[name.encode()] = rec
        self.ids[name] = sid
        return sid


@dataclass
class _Namespace:
    name: str
    seq: int = 0
    images: Tree = field(default_factory=dict)
    containers: Tree = field(default_factory=dict)
    snapshots: Tree = field(default_factory=dict)
    blobs: Tree = field(default_factory=dict)
    leases: Tree = field(default_factory=dict)
    backend_names: dict[str, str] = field(default_factory=dict)

    def snapshot(
        self,
        backend: _Backend,
        key: str,
        parent: str | None,
        kind: int,
        files: list | None,
        labels: dict[str, str] | None = None,
    ) -> None:
        self.seq += 1
        name = f"{self.name}/{self.seq}/{key}"
        backend.add(name, self.backend_names.get(parent or ""), kind, files)
        self.backend_names[key] = name
        rec: Tree = {
            b"name": name.encode(),
            b"createdat": encode_gotime(NOW),
            b"updatedat": encode_gotime(NOW),
        }
        if parent:
            rec[b"parent"] = parent.encode()
            parent_rec = self.snapshots[parent.encode()]
            assert isinstance(parent_rec, dict)
            children = parent_rec.setdefault(b"children", {})
            assert isinstance(children, dict)
            children[key.encode()] = b""
        if labels:
            rec[b"labels"] = {k.encode(): v.encode() for k, v in labels.items()}
        self.snapshots[key.encode()] = rec

    def pull(self, backend: _Backend, image: BuiltImage, names: list[str]) -> None:
        """Record an image under ``names`` and unpack its layers as committed snapshots."""
        assert image.manifest and image.config
        for name in names:
            self.images[name.encode()] = {
                b"createdat": encode_gotime(NOW),
                b"updatedat": encode_gotime(NOW),
                b"target": {
                    b"digest": image.manifest.digest.encode(),
                    b"mediatype": image.manifest.media_type.encode(),
                    b"size": encode_varint(len(image.manifest.data)),
                },
            }
        manifest_labels = {"containerd.io/gc.ref.content.config": image.config.digest}
        for i, blob in enumerate(image.layer_blobs):
            manifest_labels[f"containerd.io/gc.ref.content.l.{i}"] = blob.digest
        chain = image.chain_ids
        self._blob(image.manifest.digest, len(image.manifest.data), manifest_labels)
        self._blob(
            image.config.digest,
            len(image.config.data),
            {f"containerd.io/gc.ref.snapshot.{SNAPSHOTTER}": chain[-1]},
        )
        for blob in image.layer_blobs:
            self._blob(blob.digest, len(blob.data), {})
        for i, (chain_id, files) in enumerate(zip(chain, image.layers, strict=True)):
            if chain_id.encode() not in self.snapshots:
                self.snapshot(backend, chain_id, chain[i - 1] if i else None, KIND_COMMITTED, files)

    def _blob(self, digest: str, size: int, labels: dict[str, str]) -> None:
        rec: Tree = {
            b"createdat": encode_gotime(NOW),
            b"updatedat": encode_gotime(NOW),
            b"size": encode_varint(size),
        }
        if labels:
            rec[b"labels"] = {k.encode(): v.encode() for k, v in labels.items()}
        self.blobs[digest.encode()] = rec

    def container(self, backend: _Backend, cid: str, image: BuiltImage, files: list) -> None:
        self.snapshot(backend, cid, image.chain_ids[-1], KIND_ACTIVE, files)
        self.containers[cid.encode()] = {
            b"createdat": encode_gotime(NOW),
            b"updatedat": encode_gotime(NOW),
            b"image": image.name.encode(),
            b"snapshotter": SNAPSHOTTER.encode(),
            b"snapshotKey": cid.encode(),
            b"runtime": {b"name": b"io.containerd.runc.v2"},
            b"labels": {b"io.cri-containerd.kind": b"container"},
        }

    def tree(self) -> Tree:
        ns: Tree = {
            b"snapshots": {SNAPSHOTTER.encode(): self.snapshots},
            b"content": {b"blob": self.blobs},
        }
        if self.images:
            ns[b"images"] = self.images
        if self.containers:
            ns[b"containers"] = self.containers
        if self.leases:
            ns[b"leases"] = self.leases
        return ns


def build_containerd_root(root: Path, images: list[BuiltImage], *, faults: bool = False) -> Path:
    """Write a containerd root under ``root``; return it. ``faults`` plants the demo's faults
    (``crifs.demo.faults``)."""
    web, tools = images
    backend = _Backend(root)
    default = _Namespace("default")
    default.pull(backend, web, [web.name])
    k8s = _Namespace("k8s.io")
    for image in (web, tools):
        assert image.manifest and image.config
        repo = image.name.rsplit(":", 1)[0]
        k8s.pull(
            backend, image, [image.name, f"{repo}@{image.manifest.digest}", image.config.digest]
        )
    k8s.container(backend, "web-1", web, [])
    if faults:
        plant_containerd_db_faults(backend, default)
    _write_blobs(root, images)
    namespaces = {b"default": default, b"k8s.io": k8s}
    meta: Tree = {b"v1": {b"version": encode_varint(3)}}
    v1 = meta[b"v1"]
    assert isinstance(v1, dict)
    sequences: dict[tuple[bytes, ...], int] = {}
    for name, ns in namespaces.items():
        v1[name] = ns.tree()
        sequences[(b"v1", name, b"snapshots", SNAPSHOTTER.encode())] = ns.seq
    (root / META_DIR).mkdir(parents=True, exist_ok=True)
    write_bolt(root / META_DIR / "meta.db", meta, sequences=sequences, txid=41)
    overlay: Tree = {b"v1": {b"snapshots": backend.snapshots, b"parents": backend.parents}}
    write_bolt(
        root / OVERLAY_DIR / "metadata.db",
        overlay,
        sequences={(b"v1", b"snapshots"): backend.next_id - 1},
        txid=17,
    )
    if faults:
        plant_containerd_file_faults(root)
    # The modes containerd creates (services/server, the overlay plugin).
    root.chmod(0o711)
    for sub in (OVERLAY_DIR, f"{OVERLAY_DIR}/snapshots"):
        (root / sub).chmod(0o700)
    return root


def _write_blobs(root: Path, images: list[BuiltImage]) -> None:
    blobs = root / CONTENT_DIR / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (root / CONTENT_DIR / "ingest").mkdir(exist_ok=True)
    for image in images:
        for blob in image.blobs():
            path = blobs / blob.digest.split(":", 1)[1]
            if not path.exists():
                path.write_bytes(blob.data)
                path.chmod(0o444)
