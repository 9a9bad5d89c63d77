"""The sandbox's images: layer contents, their tars, configs and manifests, in memory.

Each demo image is a list of layers; a layer is a list of ``DemoFile``. Building an image gives
the exact OCI blobs (uncompressed layer tars, config, manifest) with their digests, so both
sandbox stores can be written from one description and agree on every id.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
FIXED_MTIME = 1_700_000_000


@dataclass(frozen=True)
class DemoFile:
    path: str  # rootfs path without the leading "/"
    kind: str = "file"  # file | dir | symlink
    data: bytes = b""
    target: str = ""
    mode: int | None = None


@dataclass
class Blob:
    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()


@dataclass
class BuiltImage:
    name: str
    layers: list[list[DemoFile]]
    layer_blobs: list[Blob] = field(default_factory=list)
    config: Blob | None = None
    manifest: Blob | None = None

    @property
    def diff_ids(self) -> list[str]:
        return [b.digest for b in self.layer_blobs]

    @property
    def chain_ids(self) -> list[str]:
        chain: list[str] = []
        for diff_id in self.diff_ids:
            if not chain:
                chain.append(diff_id)
            else:
                raw = f"{chain[-1]} {diff_id}".encode()
                chain.append("sha256:" + hashlib.sha256(raw).hexdigest())
        return chain

    def blobs(self) -> list[Blob]:
        assert self.config and self.manifest
        return [self.manifest, self.config, *self.layer_blobs]


def layer_tar(files: list[DemoFile]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for f in files:
            info = tarfile.TarInfo(f.path)
            info.mtime = FIXED_MTIME
            if f.kind == "dir":
                info.type = tarfile.DIRTYPE
                info.mode = f.mode or 0o755
                tar.addfile(info)
            elif f.kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = f.target
                info.mode = 0o777
                tar.addfile(info)
            else:
                info.size = len(f.data)
                info.mode = f.mode or 0o644
                tar.addfile(info, io.BytesIO(f.data))
    return buf.getvalue()


def build_image(name: str, layers: list[list[DemoFile]]) -> BuiltImage:
    img = BuiltImage(name, layers)
    img.layer_blobs = [Blob(MEDIA_LAYER, layer_tar(files)) for files in layers]
    config = {
        "created": "2023-11-14T22:13:20Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/bin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": img.diff_ids},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": "crifs demo"}],
    }
    img.config = Blob(MEDIA_CONFIG, json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": _descriptor(img.config),
        "layers": [_descriptor(b) for b in img.layer_blobs],
    }
    img.manifest = Blob(MEDIA_MANIFEST, json.dumps(manifest, sort_keys=True).encode())
    return img


def _descriptor(blob: Blob) -> dict[str, object]:
    return {"mediaType": blob.media_type, "digest": blob.digest, "size": len(blob.data)}


def extract(files: list[DemoFile], dest: Path) -> None:
    """Write a layer's files into ``dest`` as an unpacked snapshot would hold them."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        path = dest / f.path
        path.parent.mkdir(parents=True, exist_ok=True)
        if f.kind == "dir":
            path.mkdir(exist_ok=True)
            os.chmod(path, f.mode or 0o755)
        elif f.kind == "symlink":
            os.symlink(f.target, path)
        else:
            path.write_bytes(f.data)
            os.chmod(path, f.mode or 0o644)
        os.utime(path, (FIXED_MTIME, FIXED_MTIME), follow_symlinks=False)


BASE = [
    DemoFile("bin", "dir"),
    DemoFile("etc", "dir"),
    DemoFile("usr", "dir"),
    DemoFile("usr/bin", "dir"),
    DemoFile("usr/lib", "dir"),
    DemoFile("bin/sh", "file", b"#!demo shell\n" * 64, mode=0o755),
    DemoFile("etc/os-release", "file", b'NAME="crifs demo"\nID=demo\n'),
    DemoFile("etc/hostname", "file", b"demo\n"),
    DemoFile("lib", "symlink", target="usr/lib"),
    DemoFile("usr/lib/libc.so.6", "file", b"\x7fELF demo libc" + b"\0" * 8000, mode=0o755),
    DemoFile("etc/mtab", "symlink", target="../proc/self/mounts"),
]
PYTHON = [
    DemoFile("usr/lib/python3", "dir"),
    DemoFile("usr/bin/python3", "file", b"\x7fELF demo python" + b"\0" * 20000, mode=0o755),
    DemoFile("usr/lib/python3/os.py", "file", b"# demo\n" * 500),
    DemoFile("usr/bin/python", "symlink", target="python3"),
]
APP = [
    DemoFile("app", "dir"),
    DemoFile("app/main.py", "file", b"print('hello from crifs demo')\n"),
    DemoFile("app/config.yaml", "file", b"port: 8080\n"),
    # Planted link faults for the audit: a typo'd relative target and a build-host path.
    DemoFile("app/current.yaml", "symlink", target="config.yml"),
    DemoFile("app/static", "symlink", target="/home/builder/web/static"),
    DemoFile("app/python", "symlink", target="../usr/bin/python"),
]
TOOLS = [
    DemoFile("usr/bin/jq", "file", b"\x7fELF demo jq" + b"\0" * 12000, mode=0o755),
]


def demo_images() -> list[BuiltImage]:
    """Two images sharing their base layer, one three layers deep."""
    return [
        build_image("demo.example/web:1.0", [BASE, PYTHON, APP]),
        build_image("demo.example/tools:2.1", [BASE, TOOLS]),
    ]
