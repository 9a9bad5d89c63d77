"""Build small, deterministic OCI images for tests, without any image tool.

``layer(*entries)`` packs rootfs entries into one uncompressed layer tar (GNU format, so a path
that is not valid UTF-8 is stored as its raw bytes). ``build_layout`` writes an OCI image layout
(``oci-layout``, ``index.json`` with an ``org.opencontainers.image.ref.name`` annotation per
manifest, ``blobs/sha256/...``) in which identical layers are stored once. The same inputs always
give the same bytes and digests: mtimes are fixed, owners are numeric, gzip has no timestamp.

Entry paths are rootfs paths without a leading ``/`` (one is stripped if given). Whiteouts are
given as the path they delete: ``Entry("etc/motd", "whiteout")`` becomes ``etc/.wh.motd``, and
``Entry("var/cache", "opaque")`` becomes ``var/cache/.wh..wh..opq``. Parent directories are NOT
added implicitly, so a test can build a layer that lacks them; list them when they matter.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Kind = Literal["file", "dir", "symlink", "hardlink", "whiteout", "opaque", "fifo", "char"]
Compression = Literal["gzip", "zstd"] | None

FIXED_MTIME = 1_700_000_000  # 2023-11-14T22:13:20Z
FIXED_CREATED = "2023-11-14T22:13:20Z"
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = {
    None: "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"

_DEFAULT_MODES: dict[str, int] = {
    "file": 0o644, "dir": 0o755, "symlink": 0o777, "hardlink": 0o644,
    "whiteout": 0o644, "opaque": 0o644, "fifo": 0o644, "char": 0o666,
}


@dataclass(frozen=True)
class Entry:
    """One rootfs entry of a layer. ``path``/``target`` may be bytes for non-UTF-8 names.

    ``target`` is the symlink text for ``symlink`` (kept verbatim) and the rootfs path of the
    linked file for ``hardlink``. ``devmajor``/``devminor`` are used for ``char`` only.
    """

    path: str | bytes
    kind: Kind = "file"
    data: bytes = b""
    target: str | bytes = ""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    mtime: int = FIXED_MTIME
    devmajor: int = 0
    devminor: int = 0


@dataclass(frozen=True)
class ImageInfo:
    """Digests and sizes of one image written by :func:`build_layout` (digests as sha256:hex)."""

    ref: str
    manifest_digest: str
    manifest_size: int
    config_digest: str
    config_size: int
    layer_digests: list[str]
    layer_sizes: list[int]
    layer_media_types: list[str]
    diff_ids: list[str]
    chain_ids: list[str]
    uncompressed_sizes: list[int] = field(default_factory=list)


def _as_str(path: str | bytes) -> str:
    # surrogateescape round-trips undecodable bytes through tarfile's GNU encoder unchanged.
    return os.fsdecode(path) if isinstance(path, bytes) else path


def _rootfs_name(path: str | bytes) -> str:
    name = _as_str(path)
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def _tar_name(entry: Entry) -> str:
    name = _rootfs_name(entry.path)
    if entry.kind == "whiteout":
        parent, _, base = name.rpartition("/")
        return f"{parent}/{WHITEOUT_PREFIX}{base}" if parent else f"{WHITEOUT_PREFIX}{base}"
    if entry.kind == "opaque":
        return f"{name}/{OPAQUE_MARKER}" if name else OPAQUE_MARKER
    return name


_TAR_TYPES = {
    "file": tarfile.REGTYPE, "whiteout": tarfile.REGTYPE, "opaque": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
    "fifo": tarfile.FIFOTYPE, "char": tarfile.CHRTYPE,
}


def _tarinfo(entry: Entry) -> tarfile.TarInfo:
    if entry.kind not in _TAR_TYPES:
        raise ValueError(f"unknown entry kind {entry.kind!r} for {entry.path!r}")
    info = tarfile.TarInfo(_tar_name(entry))
    info.type = _TAR_TYPES[entry.kind]
    info.mode = entry.mode if entry.mode is not None else _DEFAULT_MODES[entry.kind]
    info.uid, info.gid = entry.uid, entry.gid
    info.uname = info.gname = ""
    info.mtime = entry.mtime
    if entry.kind == "file":
        info.size = len(entry.data)
    elif entry.kind == "symlink":
        info.linkname = _as_str(entry.target)
    elif entry.kind == "hardlink":
        info.linkname = _rootfs_name(entry.target)
    elif entry.kind == "char":
        info.devmajor, info.devminor = entry.devmajor, entry.devminor
    return info


def layer(*entries: Entry) -> bytes:
    """The uncompressed tar bytes of one layer holding ``entries`` in the given order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as tar:
        for entry in entries:
            info = _tarinfo(entry)
            payload = io.BytesIO(entry.data) if info.type == tarfile.REGTYPE else None
            tar.addfile(info, payload)
    return buffer.getvalue()


def compress(data: bytes, compression: Compression) -> bytes:
    """Compress a layer tar deterministically (gzip without name or timestamp)."""
    if compression is None:
        return data
    if compression == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)
    if compression == "zstd":
        import zstandard  # a crifs dependency; imported lazily so gzip-only users need not

        return zstandard.ZstdCompressor(level=3).compress(data)
    raise ValueError(f"unknown compression {compression!r}")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """OCI ChainIDs: chain[0] = diff[0], chain[n] = sha256(chain[n-1] + " " + diff[n])."""
    chains: list[str] = []
    for diff_id in diff_ids:
        if not chains:
            chains.append(diff_id)
        else:
            chains.append(sha256_digest(f"{chains[-1]} {diff_id}".encode()))
    return chains


def _canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


class _BlobWriter:
    def __init__(self, dest: Path) -> None:
        self.directory = dest / "blobs" / "sha256"
        self.directory.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes) -> str:
        digest = sha256_digest(data)
        path = self.directory / digest.removeprefix("sha256:")
        if not path.exists():
            path.write_bytes(data)
        return digest


def _image_config(diff_ids: list[str], architecture: str, os_name: str,
                  config_extra: Mapping[str, Any] | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "created": FIXED_CREATED,
        "architecture": architecture,
        "os": os_name,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": FIXED_CREATED, "created_by": "crifs tests/ocibuild.py"}
                    for _ in diff_ids],
    }
    for key, value in (config_extra or {}).items():
        if key == "config" and isinstance(value, Mapping):
            config["config"] = {**config["config"], **value}
        else:
            config[key] = value
    return config


LayerSpec = Sequence[Entry] | bytes


def build_layout(
    dest: Path,
    images: Mapping[str, Sequence[LayerSpec]],
    *,
    compression: Compression = None,
    architecture: str = "amd64",
    os: str = "linux",  # noqa: A002 - named after the OCI config field
    config_extra: Mapping[str, Any] | None = None,
) -> dict[str, ImageInfo]:
    """Write an OCI image layout at ``dest`` holding one manifest per entry of ``images``.

    Keys are the ref names written as ``org.opencontainers.image.ref.name`` (e.g.
    ``example.com/crifs/base:v1``; use the same string with ``podman pull oci:DIR:REF``). Each
    value lists the layers bottom-up, either as entries or as ready uncompressed tar bytes.
    Identical layers (and configs) are stored once. Returns per ref the digests and sizes.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    blobs = _BlobWriter(dest)
    (dest / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}', encoding="utf-8")
    media_type = MEDIA_LAYER[compression]
    results: dict[str, ImageInfo] = {}
    index_manifests: list[dict[str, Any]] = []
    for ref, layer_specs in images.items():
        diff_ids: list[str] = []
        digests: list[str] = []
        sizes: list[int] = []
        raw_sizes: list[int] = []
        for spec in layer_specs:
            raw = spec if isinstance(spec, bytes) else layer(*spec)
            blob = compress(raw, compression)
            diff_ids.append(sha256_digest(raw))
            digests.append(blobs.put(blob))
            sizes.append(len(blob))
            raw_sizes.append(len(raw))
        config_bytes = _canonical_json(_image_config(diff_ids, architecture, os, config_extra))
        config_digest = blobs.put(config_bytes)
        manifest = {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest,
                       "size": len(config_bytes)},
            "layers": [{"mediaType": media_type, "digest": d, "size": s}
                       for d, s in zip(digests, sizes, strict=True)],
        }
        manifest_bytes = _canonical_json(manifest)
        manifest_digest = blobs.put(manifest_bytes)
        index_manifests.append({
            "mediaType": MEDIA_MANIFEST,
            "digest": manifest_digest,
            "size": len(manifest_bytes),
            "platform": {"architecture": architecture, "os": os},
            "annotations": {ANNOTATION_REF_NAME: ref},
        })
        results[ref] = ImageInfo(
            ref=ref, manifest_digest=manifest_digest, manifest_size=len(manifest_bytes),
            config_digest=config_digest, config_size=len(config_bytes),
            layer_digests=digests, layer_sizes=sizes,
            layer_media_types=[media_type] * len(digests), diff_ids=diff_ids,
            chain_ids=chain_ids(diff_ids), uncompressed_sizes=raw_sizes,
        )
    index = {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": index_manifests}
    (dest / "index.json").write_bytes(_canonical_json(index))
    return results


def layout_to_tar(layout_dir: Path, tar_path: Path) -> Path:
    """Pack an OCI layout directory into a tar (for ``ctr images import``); returns tar_path."""
    layout_dir = Path(layout_dir)
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("oci-layout", "index.json"):
            tar.add(layout_dir / name, arcname=name)
        tar.add(layout_dir / "blobs", arcname="blobs", recursive=True)
    return Path(tar_path)


BUSYBOX_PATH = Path("/bin/busybox")


def busybox_available() -> bool:
    return BUSYBOX_PATH.is_file()


def busybox_layer(applets: Sequence[str] = ("sh",)) -> list[Entry]:
    """Entries for ``bin/busybox`` (the host's static busybox) plus ``bin/<applet>`` symlinks.

    Requires the busybox-static package; check :func:`busybox_available` and skip otherwise.
    """
    entries = [
        Entry("bin", "dir"),
        Entry("bin/busybox", "file", data=BUSYBOX_PATH.read_bytes(), mode=0o755),
    ]
    entries += [Entry(f"bin/{applet}", "symlink", target="busybox") for applet in applets]
    return entries
