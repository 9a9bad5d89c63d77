"""resolve_targets against real stores (containerd, podman) and files: every spelling, layer
order bottom first, and listings that match the layers the image was built from."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from crifs.check.targets import resolve_targets
from crifs.errors import BadInput, NotFound, UnsafePath, Unsupported
from crifs.fs.listing import EntryKind, LayerListing
from crifs.oci.layout import layer_name
from crifs.stores import Selection
from ocibuild import Entry as E
from ocibuild import ImageInfo, build_layout, compress, layer, layout_to_tar
from runtimes import (
    CONTAINERD_TOOLS,
    PODMAN_TOOLS,
    ContainerdDaemon,
    Podman,
    missing_prerequisites,
)

REF = "example.com/crifs/links:v1"
NAMED = b"caf\xe9"

L0 = [E("bin", "dir"), E("bin/tool", data=b"#!"), E("etc", "dir"), E("etc/motd", data=b"hi"),
      E("lib", "dir"), E("lib/libc.so.6", data=b"\x7fELF"), E("var", "dir"),
      E("var/cache", "dir"), E("var/cache/old", data=b"o"), E(NAMED, "dir"),
      E(NAMED + b"/\xff", data=b"n")]
L1 = [E("etc", "dir"), E("etc/motd", "whiteout"), E("var", "dir"), E("var/cache", "dir"),
      E("var/cache", "opaque"), E("var/cache/new", data=b"n"), E("bin", "dir"),
      E("bin/ls", "symlink", target="/lib/libc.so.6"),
      E("bin/broken", "symlink", target="../nowhere"),
      E("bin/tool2", data=b"t"), E("bin/hard", "hardlink", target="bin/tool2")]
PATHS = [
    {b"bin", b"bin/tool", b"etc", b"etc/motd", b"lib", b"lib/libc.so.6", b"var", b"var/cache",
     b"var/cache/old", NAMED, NAMED + b"/\xff"},
    {b"etc", b"var", b"var/cache", b"var/cache/new", b"bin", b"bin/ls", b"bin/broken",
     b"bin/tool2", b"bin/hard"},
]


def check_image_layers(layers: list[LayerListing], *, from_tars: bool = False) -> None:
    """The two image layers as built, whichever way they were stored."""
    assert [x.index for x in layers[:2]] == [0, 1]
    base, top = layers[0], layers[1]
    assert set(base.entries) == PATHS[0] and not base.whiteouts and not base.opaque
    assert set(top.entries) == PATHS[1]
    assert top.whiteouts == {b"etc/motd"} and top.opaque == {b"var/cache"}
    assert top.entries[b"bin/ls"].target == b"/lib/libc.so.6"
    assert top.entries[b"bin/broken"].target == b"../nowhere"
    hard, tool2 = top.entries[b"bin/hard"], top.entries[b"bin/tool2"]
    if from_tars:
        assert hard.kind is EntryKind.HARDLINK and hard.target == b"bin/tool2"
    else:  # unpacked: one inode with two names
        assert hard.inode == tool2.inode is not None and hard.nlink == 2
    for listing in layers:
        assert listing.name == layer_name(listing.index, listing.ident or "")
        assert not listing.problems


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, ImageInfo]:
    base = tmp_path_factory.mktemp("targets-image")
    info = build_layout(base / "layout", {REF: [L0, L1]}, compression="gzip")[REF]
    return base / "layout", layout_to_tar(base / "layout", base / "layout.tar"), info


# -- files -------------------------------------------------------------------------------------


def test_plain_rootfs_dir(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    [target] = resolve_targets(str(root), Selection())
    assert (target.kind, target.label) == ("rootfs", str(root))
    [listing] = target.load()
    assert listing.entries[b"bin"].target == b"usr/bin"
    assert listing.index == 0 and listing.ident == str(root)


def test_rootfs_with_files_named_like_image_metadata(tmp_path: Path) -> None:
    """A web root with index.json, an app with manifest.json: still plain rootfs targets."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "index.json").write_text("{}")
    (root / "manifest.json").write_text('{"name": "app"}')
    [target] = resolve_targets(str(root), Selection())
    assert target.kind == "rootfs"
    tarball = tmp_path / "www.tar"
    tarball.write_bytes(layer(E("index.json", data=b"{}"), E("manifest.json", data=b"[]")))
    [target] = resolve_targets(str(tarball), Selection())
    assert target.kind == "rootfs-tar"
    assert set(target.load()[0].entries) == {b"index.json", b"manifest.json"}


def test_layout_dir_and_archive(built: tuple[Path, Path, ImageInfo]) -> None:
    layout, archive, info = built
    for path, kind in ((layout, "oci-layout"), (archive, "oci-archive")):
        [target] = resolve_targets(str(path), Selection())
        assert target.kind == kind and target.label == f"{path} ({REF})"
        layers = target.load()
        check_image_layers(layers, from_tars=True)
        assert [x.ident for x in layers] == info.layer_digests


@pytest.mark.parametrize("compression", [None, "gzip", "zstd"])
def test_rootfs_tarball_is_one_layer(tmp_path: Path, compression: str | None) -> None:
    path = tmp_path / "rootfs.tar"
    path.write_bytes(compress(layer(*L0, E("bin/sh", "symlink", target="tool")),
                              compression))  # type: ignore[arg-type]
    [target] = resolve_targets(str(path), Selection())
    assert (target.kind, target.label) == ("rootfs-tar", str(path))
    [listing] = target.load()
    assert set(listing.entries) == PATHS[0] | {b"bin/sh"}


def test_images_of_one_archive_read_a_shared_layer_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from crifs.oci import layout as layout_module

    top = [E("srv", "dir"), E("srv/x", "symlink", target="../etc/passwd")]
    refs = {"example.com/crifs/one:v1": [L0, L1], "example.com/crifs/two:v1": [L0, top]}
    build_layout(tmp_path / "layout", refs, compression="gzip")
    archive = layout_to_tar(tmp_path / "layout", tmp_path / "layout.tar")
    for path in (tmp_path / "layout", archive):
        alone = {}  # each image loaded by a resolve of its own: nothing cached for it
        for number in range(2):
            target = resolve_targets(str(path), None)[number]
            alone[target.label] = target.load()
        read: list[str] = []

        def counting(source, read=read, real=layout_module.read_layer_tar, **kw):  # noqa: ANN001, ANN202
            read.append(kw["ident"])
            return real(source, **kw)

        monkeypatch.setattr(layout_module, "read_layer_tar", counting)
        targets = resolve_targets(str(path), None)
        assert len(targets) == 2
        for target in targets:
            layers = target.load()
            assert [(x.index, x.name, x.entries) for x in layers] == [
                (x.index, x.name, x.entries) for x in alone[target.label]
            ]
        assert len(read) == len(set(read)) == 3  # L0, L1 and the second image's top
        monkeypatch.undo()


def test_compressed_image_archive_is_refused(built: tuple[Path, Path, ImageInfo],
                                             tmp_path: Path) -> None:
    _, archive, _ = built
    zipped = tmp_path / "image.tar.gz"
    zipped.write_bytes(compress(archive.read_bytes(), "gzip"))
    [target] = resolve_targets(str(zipped), Selection())
    with pytest.raises(Unsupported, match="compressed image archive; decompress it first"):
        target.load()


def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="no such file or directory"):
        resolve_targets(str(tmp_path / "missing"), Selection())
    with pytest.raises(BadInput, match="a store object is named with one of image:"):
        resolve_targets("imgae:alpine", Selection())
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    with pytest.raises(UnsafePath, match="pass the real path instead"):
        resolve_targets(str(tmp_path / "alias"), Selection())
    with pytest.raises(BadInput, match="name a target"):
        resolve_targets("", Selection())
    with pytest.raises(BadInput, match="image: needs a value"):
        resolve_targets("image:", Selection())


def test_image_marker_names_are_the_image_readers(tmp_path: Path) -> None:
    """targets.py knows the names an image source is recognised by without importing the
    image reader; they must be that reader's, and a special file is still refused."""
    from crifs.check import targets
    from crifs.oci import layout

    assert (targets._OCI_LAYOUT, targets._INDEX_JSON, targets._DOCKER_MANIFEST) == (
        layout.OCI_LAYOUT, layout.INDEX_JSON, layout.DOCKER_MANIFEST)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(BadInput, match="neither a directory nor an archive file"):
        resolve_targets(str(tmp_path / "fifo"), Selection())


# -- containerd --------------------------------------------------------------------------------


class Ctrd:
    def __init__(self, daemon: ContainerdDaemon, info: ImageInfo) -> None:
        self.daemon = daemon
        self.info = info
        self.sel = Selection(runtime="containerd", root=str(daemon.root))


@pytest.fixture(scope="module")
def ctrd(tmp_path_factory: pytest.TempPathFactory,
         built: tuple[Path, Path, ImageInfo]) -> Iterator[Ctrd]:
    reason = missing_prerequisites(CONTAINERD_TOOLS)
    if reason:
        pytest.skip(f"containerd tests: {reason}")
    _, archive, info = built
    daemon = ContainerdDaemon(tmp_path_factory.mktemp("targets-ctrd"))
    try:
        daemon.start()
        daemon.import_image(archive, REF)
        daemon.ctr("images", "import", "--no-unpack", "--base-name", REF.rpartition(":")[0],
                   str(archive), namespace="packed")
        daemon.ctr("images", "import", "--snapshotter", "native", "--base-name",
                   REF.rpartition(":")[0], str(archive), namespace="nat")
        daemon.ctr("containers", "create", REF, "c-links")
        upper = daemon.root / "io.containerd.snapshotter.v1.overlayfs" / "snapshots"
        # the container's rw snapshot is the newest snapshot directory
        newest = max(upper.iterdir(), key=lambda p: int(p.name))
        (newest / "fs" / "written-at-runtime").write_bytes(b"x")
        yield Ctrd(daemon, info)
    finally:
        daemon.stop()


def test_containerd_image_uses_unpacked_snapshots(ctrd: Ctrd) -> None:
    [target] = resolve_targets(f"image:{REF}", ctrd.sel, namespace="default")
    assert target.kind == "image" and target.label == f"image:{REF} (namespace default)"
    assert target.details["runtime"] == "containerd"
    layers = target.load()
    check_image_layers(layers)
    assert [x.ident for x in layers] == ctrd.info.chain_ids
    assert all("/io.containerd.snapshotter.v1.overlayfs/snapshots/" in (x.source or "")
               for x in layers)


def test_containerd_image_spellings(ctrd: Ctrd) -> None:
    with pytest.raises(BadInput, match="ambiguous: 3 matches"):
        resolve_targets(f"image:{REF}", ctrd.sel)  # in namespaces default, nat and packed
    [target] = resolve_targets(f"image:default/{REF}", ctrd.sel)
    assert target.details["namespace"] == "default"
    for spec in ("image:crifs/links:v1", f"image:{ctrd.info.config_digest}",
                 f"image:{ctrd.info.config_digest[7:19]}", f"image:{ctrd.info.manifest_digest}"):
        [target] = resolve_targets(spec, ctrd.sel, namespace="default")
        assert target.details["image"] == REF, spec
    with pytest.raises(NotFound, match="no image 'nope'"):
        resolve_targets("image:nope", ctrd.sel)


def test_containerd_image_not_unpacked_reads_the_content_store(ctrd: Ctrd) -> None:
    [target] = resolve_targets(f"image:packed/{REF}", ctrd.sel)
    layers = target.load()
    check_image_layers(layers, from_tars=True)
    assert [x.ident for x in layers] == ctrd.info.layer_digests
    assert all("/io.containerd.content.v1.content/blobs/sha256/" in (x.source or "")
               for x in layers)


def test_containerd_snapshot_and_container(ctrd: Ctrd) -> None:
    top = ctrd.info.chain_ids[-1]
    with pytest.raises(BadInput, match="ambiguous: 2 matches"):
        resolve_targets(f"snapshot:{top}", ctrd.sel)  # unpacked in default and nat
    [snap] = resolve_targets(f"snapshot:default/{top}", ctrd.sel)
    assert [snap.label] == [x.label for x in resolve_targets(f"snapshot:{top}", ctrd.sel,
                                                               namespace="default")]
    assert snap.kind == "snapshot" and snap.label == f"snapshot:{top} (namespace default)"
    check_image_layers(snap.load())
    [container] = resolve_targets("container:c-links", ctrd.sel)
    layers = container.load()
    assert len(layers) == 3 and layers[2].ident == "c-links"
    check_image_layers(layers)
    assert set(layers[2].entries) == {b"written-at-runtime"}
    with pytest.raises(NotFound, match="no layer"):
        resolve_targets(f"layer:{top}", ctrd.sel)  # layer: is containers/storage only
    with pytest.raises(NotFound, match="no container 'nope'"):
        resolve_targets("container:nope", ctrd.sel)


def test_containerd_all_images(ctrd: Ctrd) -> None:
    targets = resolve_targets(None, ctrd.sel, all_images=True)
    assert sorted(t.label for t in targets) == [f"image:{REF} (namespace default)",
                                                f"image:{REF} (namespace nat)",
                                                f"image:{REF} (namespace packed)"]
    for target in targets:
        if "nat)" not in target.label:
            check_image_layers(target.load(), from_tars="packed" in target.label)


def test_containerd_native_snapshots_are_full_copies(ctrd: Ctrd) -> None:
    """Each native snapshot holds the whole rootfs: the top one is the only layer."""
    [target] = resolve_targets(f"image:nat/{REF}", ctrd.sel)
    [rootfs] = target.load()
    assert rootfs.ident == ctrd.info.chain_ids[-1]
    assert "/io.containerd.snapshotter.v1.native/snapshots/" in (rootfs.source or "")
    merged = (PATHS[0] | PATHS[1]) - {b"etc/motd", b"var/cache/old"}
    assert set(rootfs.entries) == merged
    assert not rootfs.whiteouts and not rootfs.opaque


# -- containers/storage (podman) ---------------------------------------------------------------


class Pod:
    def __init__(self, podman: Podman, info: ImageInfo, image_id: str, top_layer: str) -> None:
        self.podman = podman
        self.info = info
        self.image_id = image_id
        self.top_layer = top_layer
        self.sel = Selection(runtime="cstorage", root=str(podman.root),
                             runroot=str(podman.runroot), config=str(podman.storage_conf))


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory,
        built: tuple[Path, Path, ImageInfo]) -> Iterator[Pod]:
    reason = missing_prerequisites(PODMAN_TOOLS)
    if reason:
        pytest.skip(f"podman tests: {reason}")
    layout, _, info = built
    podman = Podman(tmp_path_factory.mktemp("pod"))
    try:
        podman.pull_layout(layout, REF)
        podman.run("create", "--name", "c-links", REF, "/bin/true")
        from crifs.cstorage import open_store

        store = open_store(root=podman.root, runroot=podman.runroot,
                           config=podman.storage_conf)
        [image] = store.images()
        [container] = store.containers()
        rw = next(s for s in store.snapshots() if s.key == container.snapshot_key)
        assert rw.path is not None
        (Path(rw.path) / "written-at-runtime").write_bytes(b"x")
        yield Pod(podman, info, image.id, image.top_layer or "")
    finally:
        podman.cleanup()


def test_podman_image_layer_and_container(pod: Pod) -> None:
    [image] = resolve_targets(f"image:{REF}", pod.sel)
    assert image.details["runtime"] == "cstorage" and image.label == f"image:{REF}"
    layers = image.load()
    check_image_layers(layers)
    assert layers[-1].ident == pod.top_layer
    assert all(x.source == str(pod.podman.root / "overlay" / (x.ident or "") / "diff")
               for x in layers)
    for spec in (f"layer:{pod.top_layer}", f"layer:{pod.top_layer[:12]}",
                 f"snapshot:{pod.top_layer}", f"image:{pod.image_id[:12]}",
                 "image:crifs/links:v1"):
        [target] = resolve_targets(spec, pod.sel)
        check_image_layers(target.load())
    [container] = resolve_targets("container:c-links", pod.sel)
    layers = container.load()
    assert len(layers) == 3 and set(layers[2].entries) == {b"written-at-runtime"}
    check_image_layers(layers)
    assert container.details["image"] == REF
    with pytest.raises(NotFound):
        resolve_targets("layer:0000000000000000", pod.sel)


def test_podman_all_images(pod: Pod) -> None:
    [target] = resolve_targets(None, pod.sel, all_images=True)
    check_image_layers(target.load())


def test_podman_missing_layer_dir_fails_at_load(pod: Pod, tmp_path: Path) -> None:
    """A broken store fails when the target is loaded, naming the layer directory."""
    [target] = resolve_targets(f"image:{REF}", pod.sel)
    diff = pod.podman.root / "overlay" / pod.top_layer / "diff"
    moved = tmp_path / "diff"
    os.rename(diff, moved)
    try:
        with pytest.raises(NotFound, match=f"{diff}: directory does not exist"):
            target.load()
    finally:
        os.rename(moved, diff)


def test_podman_all_images_read_each_shared_layer_once(
    pod: Pod, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second image committed from the container stacks the first one's layers: with
    --all-images each layer directory is read once, and each image gets the listings it gets
    alone (same entries, its own positions)."""
    from crifs.check import store_targets

    pod.podman.run("commit", "c-links", "localhost/crifs/second:v1")
    try:
        alone = {
            target.label: target.load()
            for ref in (f"image:{REF}", "image:localhost/crifs/second:v1")
            for target in resolve_targets(ref, pod.sel)
        }
        read: list[str] = []
        real = store_targets.read_layer_dir

        def counting(path: str, **kw: object):  # noqa: ANN202 - LayerListing
            read.append(path)
            return real(path, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(store_targets, "read_layer_dir", counting)
        targets = resolve_targets(None, pod.sel, all_images=True)
        assert sorted(t.label for t in targets) == sorted(alone)
        for target in targets:
            layers = target.load()
            expected = alone[target.label]
            assert [(x.index, x.name, x.ident) for x in layers] == [
                (x.index, x.name, x.ident) for x in expected
            ]
            assert [x.entries for x in layers] == [x.entries for x in expected]
            assert [x.problems for x in layers] == [x.problems for x in expected]
        assert len(read) == len(set(read)) == len(alone["image:localhost/crifs/second:v1"])
    finally:
        pod.podman.run("rmi", "localhost/crifs/second:v1")
