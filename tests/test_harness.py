"""The test harness itself: the OCI builder and the private containerd / podman instances."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from ocibuild import (
    Entry,
    ImageInfo,
    build_layout,
    busybox_available,
    busybox_layer,
    chain_ids,
    layer,
    layout_to_tar,
    sha256_digest,
)
from runtimes import PODMAN_RUN_LIMITS, ContainerdDaemon, Podman

BASE_REF = "example.com/crifs/harness:v1"
SIBLING_REF = "example.com/crifs/sibling:v1"
NON_UTF8 = b"etc/caf\xe9"

# Prints what the merged rootfs looks like; expected output in EXPECTED_VIEW.
VIEW_SCRIPT = (
    "cd / && "
    "echo hello=$(busybox cat /etc/hello) && "
    "echo motd=$([ -e /etc/motd ] && echo present || echo gone) && "
    "echo non_utf8=$(busybox ls /etc | busybox grep -c caf) && "
    "echo cache=$(busybox ls -A /var/cache | busybox tr '\\n' ' ') && "
    "echo link=$(busybox readlink /etc/greeting) && "
    "echo hardlinks=$(busybox stat -c %h /usr/data/a) && "
    "echo same_inode=$([ /usr/data/a -ef /usr/data/b ] && echo yes || echo no)"
)
EXPECTED_VIEW = [
    "hello=hello from layer 3",
    "motd=gone",
    "non_utf8=0",
    "cache=fresh",
    "link=hello",
    "hardlinks=2",
    "same_inode=yes",
]


def base_layer() -> list[Entry]:
    return [
        *busybox_layer(),
        Entry("etc", "dir"),
        Entry("etc/hello", data=b"hello from layer 1\n"),
        Entry("etc/motd", data=b"removed in layer 2\n"),
        Entry("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n"),
        Entry(NON_UTF8, data=b"non-utf8 name\n"),
        Entry("var", "dir"),
        Entry("var/cache", "dir"),
        Entry("var/cache/stale-1", data=b"hidden by opaque\n"),
        Entry("var/cache/stale-2", data=b"hidden by opaque\n"),
    ]


def harness_images() -> dict[str, list[list[Entry]]]:
    middle = [
        Entry("etc/motd", "whiteout"),
        Entry(NON_UTF8, "whiteout"),
        Entry("var/cache", "dir"),
        Entry("var/cache", "opaque"),
        Entry("var/cache/fresh", data=b"only file left\n"),
        Entry("etc/greeting", "symlink", target="hello"),
    ]
    top = [
        Entry("etc/hello", data=b"hello from layer 3\n"),
        Entry("usr", "dir"),
        Entry("usr/data", "dir"),
        Entry("usr/data/a", data=b"shared inode\n"),
        Entry("usr/data/b", "hardlink", target="usr/data/a"),
    ]
    sibling = [Entry("etc/hello", data=b"hello from the sibling\n")]
    return {BASE_REF: [base_layer(), middle, top], SIBLING_REF: [base_layer(), sibling]}


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, ImageInfo]]:
    """The harness images as an OCI layout dir and as a tar of it."""
    if not busybox_available():
        pytest.skip("needs /bin/busybox (package busybox-static) for runnable images")
    base = tmp_path_factory.mktemp("layout")
    infos = build_layout(base / "layout", harness_images())
    return base / "layout", layout_to_tar(base / "layout", base / "layout.tar"), infos


def parse_snapshots_ls(text: str) -> dict[str, tuple[str, str]]:
    """`ctr snapshots ls` rows as {key: (parent, kind)}; the table has trailing padding."""
    lines = text.splitlines()
    assert lines and lines[0].split() == ["KEY", "PARENT", "KIND"], text
    rows: dict[str, tuple[str, str]] = {}
    for line in lines[1:]:
        fields = line.split()
        if len(fields) == 2:
            rows[fields[0]] = ("", fields[1])
        elif len(fields) == 3:
            rows[fields[0]] = (fields[1], fields[2])
    return rows


# -- OCI builder ------------------------------------------------------------------------------


def test_layer_tar_encodes_whiteouts_hardlinks_and_raw_names() -> None:
    data = layer(
        Entry("etc/motd", "whiteout"),
        Entry("var/cache", "opaque"),
        Entry("usr/b", "hardlink", target="/usr/a"),
        Entry("etc/link", "symlink", target="../x"),
        Entry(NON_UTF8, data=b"z"),
        Entry("dev/null", "char", devmajor=1, devminor=3),
        Entry("run/fifo", "fifo"),
    )
    raw_names = []
    with tarfile.open(fileobj=io.BytesIO(data), encoding="utf-8",
                      errors="surrogateescape") as tar:
        members = {m.name: m for m in tar.getmembers()}
        raw_names = [m.name.encode("utf-8", "surrogateescape") for m in tar.getmembers()]
    assert members["etc/.wh.motd"].isreg() and members["etc/.wh.motd"].size == 0
    assert members["var/cache/.wh..wh..opq"].isreg()
    assert members["usr/b"].type == tarfile.LNKTYPE and members["usr/b"].linkname == "usr/a"
    assert members["etc/link"].linkname == "../x"
    assert members["dev/null"].ischr() and members["dev/null"].devminor == 3
    assert members["run/fifo"].isfifo()
    assert NON_UTF8 in raw_names
    assert NON_UTF8 in data  # stored as the raw bytes, not re-encoded
    assert layer(Entry("a")) == layer(Entry("a")), "layers must be deterministic"


def test_chain_ids_follow_the_oci_spec() -> None:
    diff = [sha256_digest(b"1"), sha256_digest(b"2"), sha256_digest(b"3")]
    chain = chain_ids(diff)
    assert chain[0] == diff[0]
    assert chain[1] == sha256_digest(f"{diff[0]} {diff[1]}".encode())
    assert chain[2] == sha256_digest(f"{chain[1]} {diff[2]}".encode())


@pytest.mark.parametrize("compression", [None, "gzip", "zstd"])
def test_build_layout_shares_base_layer(tmp_path: Path, compression: str | None) -> None:
    images = {"a:1": [[Entry("x", data=b"1")], [Entry("y")]], "b:1": [[Entry("x", data=b"1")]]}
    infos = build_layout(tmp_path, images, compression=compression)  # type: ignore[arg-type]
    assert infos["a:1"].layer_digests[0] == infos["b:1"].layer_digests[0]
    assert infos["a:1"].chain_ids[0] == infos["b:1"].chain_ids[0] == infos["a:1"].diff_ids[0]
    blobs = sorted(p.name for p in (tmp_path / "blobs" / "sha256").iterdir())
    # 2 distinct layers + 2 configs + 2 manifests
    assert len(blobs) == 6
    index = json.loads((tmp_path / "index.json").read_text())
    refs = [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]]
    assert refs == ["a:1", "b:1"]
    for digest in blobs:
        blob = (tmp_path / "blobs" / "sha256" / digest).read_bytes()
        assert sha256_digest(blob) == f"sha256:{digest}"


# -- containerd -------------------------------------------------------------------------------


def test_containerd_import_in_two_namespaces_lists_committed_chain(
    containerd: ContainerdDaemon, layout: tuple[Path, Path, dict[str, ImageInfo]]
) -> None:
    _, layout_tar, infos = layout
    for namespace in ("default", "crifs-second"):
        containerd.import_image(layout_tar, "example.com/crifs", namespace=namespace)
    assert set(containerd.ctr("namespaces", "ls", "-q").split()) >= {"default", "crifs-second"}
    for namespace in ("default", "crifs-second"):
        images = containerd.ctr("images", "ls", "-q", namespace=namespace).split()
        assert {BASE_REF, SIBLING_REF} <= set(images)
        rows = parse_snapshots_ls(containerd.ctr("snapshots", "ls", namespace=namespace))
        for info in infos.values():
            for index, chain_id in enumerate(info.chain_ids):
                parent = info.chain_ids[index - 1] if index else ""
                assert rows[chain_id] == (parent, "Committed"), (namespace, chain_id)
        # base layer shared: 3 + 2 - 1 snapshots
        assert len(rows) == 4
    overlay = containerd.root / "io.containerd.snapshotter.v1.overlayfs" / "snapshots"
    # metadata keys are per namespace, so each namespace unpacks its own backend snapshots
    assert len(list(overlay.iterdir())) == 8


def test_containerd_runs_image_with_layer_semantics(
    containerd: ContainerdDaemon, layout: tuple[Path, Path, dict[str, ImageInfo]]
) -> None:
    _, layout_tar, _ = layout
    containerd.import_image(layout_tar, BASE_REF)  # a full ref imports just that image
    assert containerd.ctr("images", "ls", "-q").split() == [BASE_REF]
    out = containerd.ctr("run", "--rm", "--snapshotter", "overlayfs", BASE_REF, "harness-cat",
                         "/bin/busybox", "cat", "/etc/passwd")
    assert out == "root:x:0:0:root:/root:/bin/sh\n"
    out = containerd.ctr("run", "--rm", BASE_REF, "harness-view",
                         "/bin/busybox", "sh", "-c", VIEW_SCRIPT)
    assert out.splitlines() == EXPECTED_VIEW
    assert containerd.ctr("containers", "ls", "-q").split() == []


def test_containerd_gc_waits_for_sync_and_stop_unmounts(
    containerd: ContainerdDaemon, layout: tuple[Path, Path, dict[str, ImageInfo]]
) -> None:
    _, layout_tar, infos = layout
    containerd.import_image(layout_tar, "example.com/crifs")
    sibling_top = infos[SIBLING_REF].chain_ids[-1]
    containerd.ctr("images", "rm", SIBLING_REF)
    assert sibling_top in parse_snapshots_ls(containerd.ctr("snapshots", "ls")), \
        "GC must not run without --sync"
    containerd.ctr("images", "rm", "--sync", BASE_REF)
    assert parse_snapshots_ls(containerd.ctr("snapshots", "ls")) == {}
    # a restart keeps the daemon usable; stop leaves nothing mounted under base
    containerd.ctr("snapshots", "prepare", "held-active")
    containerd.stop()
    assert containerd.pid is None
    mountinfo = Path("/proc/self/mountinfo").read_text()
    assert str(containerd.base) not in mountinfo
    containerd.start()
    assert "held-active" in parse_snapshots_ls(containerd.ctr("snapshots", "ls"))


# -- podman -----------------------------------------------------------------------------------


def test_podman_pulls_layout_and_runs_it(
    podman: Podman, layout: tuple[Path, Path, dict[str, ImageInfo]]
) -> None:
    layout_dir, _, infos = layout
    podman.pull_layout(layout_dir, BASE_REF)
    podman.pull_layout(layout_dir, SIBLING_REF)
    listed = json.loads(podman.run("images", "--format", "json"))
    names = {name for image in listed for name in image.get("Names") or []}
    assert {BASE_REF, SIBLING_REF} <= names
    ids = {image["Id"] for image in listed}
    assert infos[BASE_REF].config_digest.removeprefix("sha256:") in ids
    out = podman.run("run", "--rm", "--network", "none", *PODMAN_RUN_LIMITS, BASE_REF,
                     "/bin/busybox", "cat", "/etc/passwd")
    assert out == "root:x:0:0:root:/root:/bin/sh\n"
    out = podman.run("run", "--rm", "--network", "none", *PODMAN_RUN_LIMITS, BASE_REF,
                     "/bin/busybox", "sh", "-c", VIEW_SCRIPT)
    assert out.splitlines() == EXPECTED_VIEW
    layers = json.loads((podman.root / "overlay-layers" / "layers.json").read_text())
    assert len(layers) == 4, "the base layer is stored once"
