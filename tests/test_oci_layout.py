"""ImageSource: OCI layout dirs, OCI archives and docker-save tars, read without extracting."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest

from crifs.errors import BadInput, CorruptStore, NotFound, UnsafePath, Unsupported
from crifs.fs.listing import EntryKind
from crifs.oci.layout import (
    KIND_DOCKER_ARCHIVE,
    KIND_DOCKER_DIR,
    KIND_OCI_ARCHIVE,
    KIND_OCI_LAYOUT,
    ImageSource,
    short_ident,
)
from crifs.oci.tarlayer import read_layer_tar
from ocibuild import MEDIA_INDEX, Entry, build_layout, layer, layout_to_tar, sha256_digest

BASE = [Entry("bin", "dir"), Entry("bin/sh", "file", data=b"#!"), Entry("lib", "dir"),
        Entry("lib/libc.so.6", "file", data=b"\x7fELF")]
TOP = [Entry("bin/ls", "symlink", target="/lib/missing"), Entry("lib/libc.so.6", "whiteout"),
       Entry("etc", "dir"), Entry("etc/hard", "hardlink", target="bin/sh")]


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    infos = build_layout(tmp_path / "layout", {"example.com/crifs/links:v1": [BASE, TOP]},
                         compression="gzip")
    return tmp_path / "layout", dict(infos)


def test_layout_dir_images_and_listings(layout: tuple[Path, dict[str, Any]]) -> None:
    path, infos = layout
    info = infos["example.com/crifs/links:v1"]
    source = ImageSource.open(path)
    assert source.kind == KIND_OCI_LAYOUT
    [image] = source.images()
    assert image.name == "example.com/crifs/links:v1"
    assert image.manifest_digest == info.manifest_digest
    assert image.config_digest == info.config_digest
    assert [x.digest for x in image.layers] == info.layer_digests
    assert [x.diff_id for x in image.layers] == info.diff_ids
    assert image.platform == "linux/amd64"
    base, top = source.listings(image)
    assert (base.index, top.index) == (0, 1)
    assert top.name == f"layer 1 {short_ident(info.layer_digests[1])}"
    assert top.name.startswith("layer 1 sha256:") and top.name.endswith("…")
    assert top.ident == info.layer_digests[1]
    assert top.source == str(path / "blobs" / "sha256" / info.layer_digests[1][7:])
    assert set(base.entries) == {b"bin", b"bin/sh", b"lib", b"lib/libc.so.6"}
    assert top.whiteouts == {b"lib/libc.so.6"}
    assert top.entries[b"bin/ls"].target == b"/lib/missing"
    assert top.entries[b"etc/hard"].kind is EntryKind.HARDLINK


@pytest.mark.parametrize("compression", [None, "gzip", "zstd"])
def test_oci_archive_matches_the_layout(tmp_path: Path, compression: str | None) -> None:
    build_layout(tmp_path / "l", {"a:1": [BASE, TOP], "b:2": [BASE]},
                 compression=compression)  # type: ignore[arg-type]
    archive = layout_to_tar(tmp_path / "l", tmp_path / "image.tar")
    from_dir, from_tar = ImageSource.open(tmp_path / "l"), ImageSource.open(archive)
    assert from_tar.kind == KIND_OCI_ARCHIVE
    assert [i.name for i in from_tar.images()] == ["a:1", "b:2"]
    for a, b in zip(from_dir.images(), from_tar.images(), strict=True):
        assert a == b
        la, lb = from_dir.listings(a), from_tar.listings(b)
        assert [x.entries for x in la] == [x.entries for x in lb]
        assert [x.whiteouts for x in la] == [x.whiteouts for x in lb]
    first = from_tar.listings(from_tar.images()[0])[0]
    assert first.ident is not None
    assert first.source == f"{archive}:blobs/sha256/{first.ident[7:]}"


def _put(blobs: Path, doc: dict[str, Any]) -> tuple[str, int]:
    data = json.dumps(doc).encode()
    digest = sha256_digest(data)
    (blobs / digest[7:]).write_bytes(data)
    return digest, len(data)


def test_nested_index_picks_the_host_platform(tmp_path: Path) -> None:
    amd = build_layout(tmp_path / "amd", {"x": [BASE]}, architecture="amd64")["x"]
    arm = build_layout(tmp_path / "arm", {"x": [TOP]}, architecture="arm64")["x"]
    shutil.copytree(tmp_path / "amd", tmp_path / "multi")
    blobs = tmp_path / "multi" / "blobs" / "sha256"
    for blob in (tmp_path / "arm" / "blobs" / "sha256").iterdir():
        shutil.copy(blob, blobs / blob.name)
    manifests = [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json",
         "digest": info.manifest_digest, "size": info.manifest_size,
         "platform": {"os": "linux", "architecture": arch}}
        for info, arch in ((arm, "arm64"), (amd, "amd64"))
    ]
    manifests.append({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                      "digest": arm.manifest_digest, "size": arm.manifest_size,
                      "platform": {"os": "unknown", "architecture": "unknown"},
                      "annotations": {"vnd.docker.reference.type": "attestation-manifest"}})
    digest, size = _put(blobs, {"schemaVersion": 2, "mediaType": MEDIA_INDEX,
                                "manifests": manifests})
    (tmp_path / "multi" / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "manifests": [{
            "mediaType": MEDIA_INDEX, "digest": digest, "size": size,
            "annotations": {"io.containerd.image.name": "docker.io/library/x:1",
                            "org.opencontainers.image.ref.name": "1"}}]}))
    [image] = ImageSource.open(tmp_path / "multi").images()
    assert image.name == "docker.io/library/x:1"
    assert image.manifest_digest == amd.manifest_digest and image.platform == "linux/amd64"
    every = ImageSource.open(tmp_path / "multi", all_platforms=True).images()
    assert [i.name for i in every] == ["docker.io/library/x:1 [linux/arm64]",
                                       "docker.io/library/x:1 [linux/amd64]"]


def _docker_save(dest: Path, layers: list[bytes], tags: list[str], *,
                 symlink_second: bool = False, hybrid: bool = False) -> Path:
    """A ``docker save`` tar in the pre-25 format: ``<id>/layer.tar`` members, a config
    ``<hex>.json`` and ``manifest.json`` (optionally with docker 25's OCI index too)."""
    diff_ids = [sha256_digest(raw) for raw in layers]
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    members: list[tuple[tarfile.TarInfo, bytes | None]] = []

    def add(name: str, data: bytes | None = None, *, kind: bytes = tarfile.REGTYPE,
            link: str = "") -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = link
        info.size = len(data) if data is not None else 0
        members.append((info, data))

    layer_paths: list[str] = []
    for i, raw in enumerate(layers):
        layer_id = hashlib.sha256(f"layer{i}".encode()).hexdigest()
        add(layer_id, kind=tarfile.DIRTYPE)
        if symlink_second and i == 1:
            add(f"{layer_id}/layer.tar", kind=tarfile.SYMTYPE,
                link=f"../{layer_paths[0].split('/')[0]}/layer.tar")
        else:
            add(f"{layer_id}/layer.tar", raw)
        layer_paths.append(f"{layer_id}/layer.tar")
    add(config_name, config)
    add("manifest.json", json.dumps([{"Config": config_name, "RepoTags": tags,
                                      "Layers": layer_paths}]).encode())
    if hybrid:
        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add("index.json", b'{"schemaVersion":2,"manifests":[]}')
    with tarfile.open(dest, "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return dest


def test_docker_save_tar(tmp_path: Path) -> None:
    raw = [layer(*BASE), layer(*TOP)]
    path = _docker_save(tmp_path / "save.tar", raw, ["busybox:latest", "busybox:1"])
    source = ImageSource.open(path)
    assert source.kind == KIND_DOCKER_ARCHIVE
    [image] = source.images()
    assert image.name == "busybox:latest"
    assert [x.digest for x in image.layers] == [sha256_digest(r) for r in raw]
    assert image.config_digest is not None and image.platform == "linux/amd64"
    base, top = source.listings(image)
    assert base.ident == sha256_digest(raw[0])
    assert top.whiteouts == {b"lib/libc.so.6"}
    assert base.source == f"{path}:{image.layers[0].member}"
    # the same save unpacked into a directory
    unpacked = tmp_path / "unpacked"
    with tarfile.open(path) as tar:
        tar.extractall(unpacked, filter="tar")
    from_dir = ImageSource.open(unpacked)
    assert from_dir.kind == KIND_DOCKER_DIR
    assert [x.entries for x in from_dir.listings(from_dir.images()[0])] == [
        base.entries, top.entries]


def test_docker_save_symlinked_layer_member(tmp_path: Path) -> None:
    raw = [layer(*BASE), layer(*BASE)]
    path = _docker_save(tmp_path / "save.tar", raw, [], symlink_second=True)
    source = ImageSource.open(path)
    [image] = source.images()
    assert image.name == image.config_digest  # no tag: named by its config digest
    first, second = source.listings(image)
    assert first.entries == second.entries


def test_hybrid_docker_save_prefers_the_oci_index(tmp_path: Path) -> None:
    path = _docker_save(tmp_path / "save.tar", [layer(*BASE)], ["a:1"], hybrid=True)
    source = ImageSource.open(path)
    assert source.kind == KIND_OCI_ARCHIVE and source.images() == []


def test_listings_read_the_same_as_read_layer_tar(layout: tuple[Path, dict[str, Any]]
                                                  ) -> None:
    path, infos = layout
    source = ImageSource.open(path)
    [image] = source.images()
    for listing, desc in zip(source.listings(image), image.layers, strict=True):
        direct = read_layer_tar(path / desc.member, index=listing.index, name=listing.name)
        assert direct.entries == listing.entries


# -- bad input ---------------------------------------------------------------------------------


def test_missing_and_non_image_paths(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        ImageSource.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="holds no image"):
        ImageSource.open(tmp_path / "empty")
    (tmp_path / "junk.bin").write_bytes(b"\x01" * 3000)
    with pytest.raises(BadInput, match="not a tar archive"):
        ImageSource.open(tmp_path / "junk.bin")


def test_compressed_outer_archive_is_unsupported(layout: tuple[Path, dict[str, Any]],
                                                 tmp_path: Path) -> None:
    archive = layout_to_tar(layout[0], tmp_path / "i.tar")
    zipped = tmp_path / "i.tar.gz"
    zipped.write_bytes(gzip.compress(archive.read_bytes()))
    with pytest.raises(Unsupported, match="gzip-compressed archive; decompress it first"):
        ImageSource.open(zipped)


def test_bad_json_and_missing_blobs(layout: tuple[Path, dict[str, Any]]) -> None:
    path, infos = layout
    info = infos["example.com/crifs/links:v1"]
    index = path / "index.json"
    good = index.read_text()
    index.write_text("{not json")
    with pytest.raises(CorruptStore, match=r"index\.json: index\.json is not valid JSON"):
        ImageSource.open(path)
    index.write_text(good)
    layer_blob = path / "blobs" / "sha256" / info.layer_digests[1][7:]
    layer_blob.unlink()
    source = ImageSource.open(path)
    with pytest.raises(CorruptStore) as caught:
        source.listings(source.images()[0])
    assert str(caught.value) == f"{layer_blob}: layer {info.layer_digests[1]} is missing"
    config_blob = path / "blobs" / "sha256" / info.config_digest[7:]
    config_blob.write_bytes(b'{"tampered": true}')
    with pytest.raises(CorruptStore, match="does not match its digest"):
        ImageSource.open(path)


def test_truncated_layer_in_an_archive_names_the_member(tmp_path: Path) -> None:
    info = build_layout(tmp_path / "l", {"a": [BASE + [Entry("big", "file",
                                                             data=b"q" * 9000)]]})["a"]
    blob = tmp_path / "l" / "blobs" / "sha256" / info.layer_digests[0][7:]
    blob.write_bytes(blob.read_bytes()[:4000])
    archive = layout_to_tar(tmp_path / "l", tmp_path / "a.tar")
    source = ImageSource.open(archive)
    with pytest.raises(CorruptStore) as caught:
        source.listings(source.images()[0])
    message = str(caught.value)
    assert message.startswith(f"{archive}:blobs/sha256/{info.layer_digests[0][7:]}: layer "
                              f"{info.layer_digests[0]}: unreadable tar: ")


def test_hostile_member_paths(tmp_path: Path) -> None:
    path = _docker_save(tmp_path / "save.tar", [layer(*BASE)], ["a:1"])
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None)  # type: ignore[union-attr]
                   for m in tar.getmembers()]
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as out:
        for m, data in members:
            if m.name == "manifest.json":
                doc = json.loads(data or b"")
                doc[0]["Layers"] = ["../../etc/passwd"]
                data = json.dumps(doc).encode()
                m.size = len(data)
            out.addfile(m, io.BytesIO(data) if data is not None else None)
    with pytest.raises(CorruptStore, match="outside the image"):
        ImageSource.open(evil)


def test_layout_blob_symlink_out_of_the_directory(layout: tuple[Path, dict[str, Any]],
                                                  tmp_path: Path) -> None:
    path, infos = layout
    info = infos["example.com/crifs/links:v1"]
    blob = path / "blobs" / "sha256" / info.layer_digests[0][7:]
    outside = tmp_path / "outside.tar"
    shutil.move(blob, outside)
    blob.symlink_to(outside)
    source = ImageSource.open(path)
    with pytest.raises(UnsafePath, match="symlink out of the image directory"):
        source.listings(source.images()[0])
