"""The containers/storage backend against a real podman 4.3.1 store.

Every listing is compared with what podman itself reports (``podman images/ps --format
json``) and every container mount with what the kernel shows after ``podman mount``. Faults
are planted in the store (or a copy of it) and read with crifs *before* podman runs again,
because podman repairs some of them on its next call.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from crifs.cstorage import CStorageStore, detect, load_config, open_store
from crifs.cstorage.config import StorageConfig
from crifs.cstorage.overlay import link_target_layer
from crifs.cstorage.paths import big_data_file_name
from crifs.cstorage.records import parse_go_time, parse_layers
from crifs.errors import BadInput, CorruptStore, NotFound, StoreLocked, Unsupported
from crifs.model import Snapshot, SnapshotKind, Store
from ocibuild import Entry, ImageInfo, build_layout, busybox_available, busybox_layer
from runtimes import Podman, unmount_under

BASE_REF = "example.com/crifs/base:v1"
MIDDLE_REF = "example.com/crifs/middle:v1"
TOP_REF = "example.com/crifs/top:v1"
NON_UTF8 = b"etc/caf\xe9"


def image_layers() -> dict[str, list[list[Entry]]]:
    """Three images sharing their lower layers: base ⊂ middle ⊂ top."""
    base = [
        *busybox_layer(),
        Entry("etc", "dir"),
        Entry("etc/hostname", data=b"crifs\n"),
        Entry(NON_UTF8, data=b"non-utf8 name\n"),
    ]
    middle = [Entry("etc", "dir"), Entry("etc/middle", data=b"m" * 5000)]
    top = [Entry("usr", "dir"), Entry("usr/top", data=b"t" * 20000)]
    return {BASE_REF: [base], MIDDLE_REF: [base, middle], TOP_REF: [base, middle, top]}


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, dict[str, ImageInfo]]:
    if not busybox_available():
        pytest.skip("needs the busybox-static package for the test images")
    infos = build_layout(tmp_path / "layout", image_layers())
    return tmp_path / "layout", infos


@pytest.fixture
def store_podman(podman: Podman, layout: tuple[Path, dict[str, ImageInfo]]) -> Podman:
    """podman with the three images pulled and containers ``ctr-base`` and ``ctr-top``."""
    layout_dir, _ = layout
    for ref in (BASE_REF, MIDDLE_REF, TOP_REF):
        podman.pull_layout(layout_dir, ref)
    podman.run("create", "--name", "ctr-base", BASE_REF, "/bin/sh")
    podman.run("create", "--name", "ctr-top", TOP_REF, "/bin/sh")
    return podman


def open_podman_store(podman: Podman, lock_timeout: float = 10.0) -> CStorageStore:
    return open_store(root=podman.root, runroot=podman.runroot, config=podman.storage_conf,
                      lock_timeout=lock_timeout)


def copy_store(podman: Podman, dest: Path) -> Path:
    """A copy of the graphroot (symlinks copied as symlinks) for fault planting."""
    shutil.copytree(podman.root, dest, symlinks=True)
    return dest


def open_copy(root: Path, podman: Podman) -> CStorageStore:
    return open_store(root=root, runroot=podman.runroot, config=StorageConfig())


def by_key(store: CStorageStore) -> dict[str, Snapshot]:
    return {s.key: s for s in store.snapshots()}


def mount_options(mount_point: str) -> dict[str, str]:
    """Super-block options of the mount at ``mount_point`` from /proc/self/mountinfo."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        if fields[4] != mount_point:
            continue
        super_options = fields[fields.index("-") + 3]
        options = {}
        for option in super_options.split(","):
            key, _, value = option.partition("=")
            options[key] = value
        return options
    raise AssertionError(f"{mount_point} is not mounted")


def as_options(mount_options_tuple: tuple[str, ...]) -> dict[str, str]:
    return {k: v for k, _, v in (o.partition("=") for o in mount_options_tuple)}


# -- listings vs podman ----------------------------------------------------------------------


def test_images_match_podman_images_json(store_podman: Podman) -> None:
    store = open_podman_store(store_podman)
    assert isinstance(store, Store)
    podman_images = {i["Id"]: i for i in json.loads(store_podman.run(
        "images", "--format", "json"))}
    ours = {i.id: i for i in store.images()}
    assert set(ours) == set(podman_images)
    for image_id, image in ours.items():
        expected = podman_images[image_id]
        assert image.size_bytes == expected["Size"], image.name
        assert image.digest == expected["Digest"]
        assert list(image.names) == (expected.get("Names") or [])
        assert image.name == expected["Names"][0]
        assert image.created is not None
        assert int(image.created.timestamp()) == expected["Created"]
        assert image.runtime == "cstorage" and image.namespace is None


def test_containers_match_podman_ps_json(store_podman: Podman) -> None:
    store = open_podman_store(store_podman)
    podman_ps = {c["Id"]: c for c in json.loads(store_podman.run(
        "ps", "-a", "--format", "json"))}
    ours = {c.id: c for c in store.containers()}
    assert set(ours) == set(podman_ps) and len(ours) == 2
    for container_id, container in ours.items():
        expected = podman_ps[container_id]
        assert list(container.names) == expected["Names"]
        assert container.image_id == expected["ImageID"]
        assert container.image == expected["Image"]
        assert container.snapshotter == "overlay"
        assert container.snapshot_key in by_key(store)


def test_layers_map_to_a_shared_chain_with_active_container_layers(
    store_podman: Podman, layout: tuple[Path, dict[str, ImageInfo]],
) -> None:
    store = open_podman_store(store_podman)
    snapshots = by_key(store)
    image_layers = {i.top_layer for i in store.images()}
    container_layers = {c.snapshot_key for c in store.containers()}
    # 3 shared image layers + 2 container RW layers
    assert len(snapshots) == 5
    assert {k for k, s in snapshots.items() if s.kind is SnapshotKind.ACTIVE} == container_layers
    assert image_layers <= {k for k, s in snapshots.items() if s.kind is SnapshotKind.COMMITTED}
    # the chain is linear: base (the diffID hex) <- middle <- top
    top = next(i for i in store.images() if i.name == TOP_REF)
    chain = []
    key: str | None = top.top_layer
    while key is not None:
        chain.append(key)
        key = snapshots[key].parent
    assert len(chain) == 3
    layer_ids = json.loads((store_podman.root / "overlay-layers" / "layers.json").read_text())
    base_record = next(r for r in layer_ids if r["id"] == chain[-1])
    assert base_record["diff-digest"] == f"sha256:{chain[-1]}"
    for key, snap in snapshots.items():
        assert snap.path == str(store_podman.root / "overlay" / key / "diff")
        assert snap.snapshotter == "overlay" and snap.namespace is None
        assert snap.flags == {}
    # details carry the layer's tar size (diff-size), which is not its disk usage
    info = layout[1][TOP_REF]
    assert [snapshots[k].details["diff_size"] for k in reversed(chain)] == \
        info.uncompressed_sizes
    assert [snapshots[k].details["diff_digest"] for k in reversed(chain)] == info.diff_ids


def test_usage_measures_diff_dirs_with_non_utf8_names(store_podman: Podman) -> None:
    store = open_podman_store(store_podman)
    for snap in store.snapshots():
        used = store.usage(snap)
        assert used.inodes >= 1
        assert used.apparent_bytes is not None
    base = next(s for s in store.snapshots() if s.parent is None)
    assert base.path is not None
    names = os.listdir(os.fsencode(os.path.join(base.path, "etc")))
    assert b"caf\xe9" in names
    used = store.usage(base)
    # diff/, bin/, bin/busybox, bin/sh, etc/, etc/hostname, etc/caf\xe9
    assert used.inodes == 7
    assert used.apparent_bytes is not None and used.apparent_bytes > 500_000


def test_info_reports_roots_layout_and_counts(store_podman: Podman) -> None:
    store = open_podman_store(store_podman)
    info = store.info()
    assert info.root.exists and info.root.path == str(store_podman.root)
    assert info.root.fs_type and info.root.free_bytes
    assert info.state is not None and info.state.path == str(store_podman.runroot)
    assert info.drivers == ("overlay",)
    assert info.config_path == str(store_podman.storage_conf)
    assert info.daemon_running is False
    assert info.layout == "l/ links"
    assert info.counts["layers"] == 5
    assert info.counts["images"] == 3
    assert info.counts["containers"] == 2
    assert info.counts["l_links"] == 5
    assert info.total_bytes["layers_disk"] == sum(
        store.usage(s).disk_bytes for s in store.snapshots())


def test_detect_and_open_errors(store_podman: Podman, tmp_path: Path) -> None:
    assert detect(store_podman.root)
    assert not detect(tmp_path)
    with pytest.raises(NotFound, match="does not exist"):
        open_store(root=tmp_path / "missing", runroot=tmp_path / "run", config=StorageConfig())
    with pytest.raises(NotFound, match="is not a containers/storage store"):
        open_store(root=tmp_path, runroot=tmp_path / "run", config=StorageConfig())
    (tmp_path / "vfs-root" / "vfs-layers").mkdir(parents=True)
    with pytest.raises(Unsupported, match="vfs driver"):
        open_store(root=tmp_path / "vfs-root", config=StorageConfig())


# -- mounts vs the kernel --------------------------------------------------------------------


def test_container_mounts_equal_what_podman_mounts(store_podman: Podman) -> None:
    store = open_podman_store(store_podman)
    snapshots = by_key(store)
    try:
        for container in store.containers():
            assert container.snapshot_key is not None
            (ours,) = store.mounts(snapshots[container.snapshot_key])
            mount_point = store_podman.run("mount", container.id).strip()
            kernel = mount_options(mount_point)
            assert ours.type == "overlay" and ours.source == "overlay"
            mine = as_options(ours.options)
            for key in ("lowerdir", "upperdir", "workdir"):
                assert mine[key] == kernel[key], key
            # the driver puts the l/ symlink paths themselves into lowerdir (c/storage 1.43)
            assert all(p.startswith(str(store_podman.root / "overlay" / "l") + "/")
                       for p in mine["lowerdir"].split(":"))
            store_podman.run("umount", container.id)
    finally:
        unmount_under(store_podman.root)


def test_image_mount_equals_read_only_form(store_podman: Podman) -> None:
    store = open_podman_store(store_podman)
    snapshots = by_key(store)
    try:
        for image in store.images():
            assert image.top_layer is not None
            (ours,) = store.mounts(snapshots[image.top_layer])
            mount_point = store_podman.run("image", "mount", image.id).strip()
            kernel = mount_options(mount_point)
            assert "ro" in kernel and "ro" in ours.options
            assert as_options(ours.options)["lowerdir"] == kernel["lowerdir"]
            store_podman.run("image", "umount", image.id)
    finally:
        unmount_under(store_podman.root)


def test_lower_layers_layout_mounts_layer_diff_dirs(store_podman: Podman, tmp_path: Path
                                                   ) -> None:
    """A store written by c/storage >= 1.63 (``lower-layers``): lowerdir names the diff dirs;
    the options we compute mount in the kernel and show the container's view."""
    root = copy_store(store_podman, tmp_path / "copy")
    before = open_copy(root, store_podman)
    for snap in before.snapshots():
        chain = [lower.layer_id for lower in before.lower_chain(snap.key)]
        if chain:
            (root / "overlay" / snap.key / "lower-layers").write_text(":".join(chain))
    store = open_copy(root, store_podman)
    assert store.info().layout == "lower-layers"
    top_ctr = next(c for c in store.containers() if c.names == ("ctr-top",))
    assert top_ctr.snapshot_key is not None
    (mount,) = store.mounts(by_key(store)[top_ctr.snapshot_key])
    lowers = as_options(mount.options)["lowerdir"].split(":")
    assert len(lowers) == 3
    assert all(p.startswith(str(root / "overlay") + "/") and p.endswith("/diff")
               and "/l/" not in p for p in lowers)
    target = tmp_path / "merged"
    target.mkdir()
    subprocess.run(["mount", "-t", mount.type, mount.source, str(target), "-o",
                    ",".join(mount.options)], check=True)
    try:
        assert (target / "usr" / "top").stat().st_size == 20000
        assert (target / "etc" / "middle").read_bytes() == b"m" * 5000
        assert (target / "bin" / "busybox").is_file()
    finally:
        subprocess.run(["umount", str(target)], check=True)


def mount_flags(mount_point: str) -> set[str]:
    """Per-mount flags (``rw``, ``nodev``, …) of the mount at ``mount_point``."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        if fields[4] == mount_point:
            return set(fields[5].split(","))
    raise AssertionError(f"{mount_point} is not mounted")


def test_mountopt_and_volatile_reach_the_mount_as_podman_passes_them(
    podman: Podman, layout: tuple[Path, dict[str, ImageInfo]],
) -> None:
    """storage.conf's mountopt applies to container mounts only (an image mount passes "ro",
    which replaces it); a container created with --rm is Volatile.

    podman 4.3.1 drops storage.conf's driver options when --root or --storage-driver is given
    (which the fixture always does), so podman gets the same mountopt as --storage-opt.
    """
    with podman.storage_conf.open("a", encoding="utf-8") as conf:
        conf.write('[storage.options.overlay]\nmountopt = "nodev"\n')
    storage_opt = ("--storage-opt", "overlay.mountopt=nodev")
    podman.pull_layout(layout[0], BASE_REF)
    podman.run("create", "--rm", "--name", "ctr-volatile", BASE_REF, "/bin/sh")
    store = open_podman_store(podman)
    assert store.config.mountopt == "nodev"
    (container,) = store.containers()
    assert container.snapshot_key is not None
    snapshots = by_key(store)
    (rw,) = store.mounts(snapshots[container.snapshot_key])
    assert rw.options[3:] == ("nodev", "volatile")
    (image,) = store.images()
    assert image.top_layer is not None
    (ro,) = store.mounts(snapshots[image.top_layer])
    assert ro.options[1:] == ("ro",)
    try:
        mount_point = podman.run(*storage_opt, "mount", container.id).strip()
        assert "nodev" in mount_flags(mount_point)
        kernel = mount_options(mount_point)
        assert kernel["fsync"] == "volatile"  # how kernel 6.x shows "volatile"
        assert {k: kernel[k] for k in ("lowerdir", "upperdir", "workdir")} == \
            {k: v for k, v in as_options(rw.options).items() if k in kernel}
        image_point = podman.run(*storage_opt, "image", "mount", image.id).strip()
        assert "nodev" not in mount_flags(image_point)
        assert "ro" in mount_flags(image_point)
    finally:
        podman.run("umount", "-a", check=False)
        podman.run("image", "umount", "-a", check=False)
        unmount_under(podman.root)


def test_deep_chain_uses_the_drivers_relative_page_size_fallback(
    podman: Podman, tmp_path: Path,
) -> None:
    """76 layers: absolute lowerdirs exceed a page, so the driver mounts from its home with
    ``l/<link>`` lowers (the RO form keeps the absolute upper ``diff``). Ours is the same."""
    if not busybox_available():
        pytest.skip("needs the busybox-static package for the test images")
    layers = [busybox_layer()] + [[Entry(f"f{i}", data=b"%d" % i)] for i in range(75)]
    build_layout(tmp_path / "deep", {"example.com/crifs/deep:v1": layers})
    podman.pull_layout(tmp_path / "deep", "example.com/crifs/deep:v1")
    podman.run("create", "--name", "deep", "example.com/crifs/deep:v1", "/bin/sh")
    store = open_podman_store(podman)
    snapshots = by_key(store)
    (container,) = store.containers()
    (image,) = store.images()
    assert container.snapshot_key is not None and image.top_layer is not None
    (rw,) = store.mounts(snapshots[container.snapshot_key])
    (ro,) = store.mounts(snapshots[image.top_layer])
    rw_options, ro_options = as_options(rw.options), as_options(ro.options)
    assert rw_options["upperdir"] == f"{container.snapshot_key}/diff"
    assert rw_options["lowerdir"].startswith("l/")
    assert ro_options["lowerdir"].startswith(f"{podman.root}/overlay/{image.top_layer}/diff:l/")
    try:
        kernel_rw = mount_options(podman.run("mount", container.id).strip())
        kernel_ro = mount_options(podman.run("image", "mount", image.id).strip())
        for key in ("lowerdir", "upperdir", "workdir"):
            assert rw_options[key] == kernel_rw[key]
        assert ro_options["lowerdir"] == kernel_ro["lowerdir"]
    finally:
        podman.run("umount", "-a", check=False)
        podman.run("image", "umount", "-a", check=False)
        unmount_under(podman.root)


# -- faults ----------------------------------------------------------------------------------


def test_broken_l_links_fail_mounts_cleanly_but_listing_works(
    store_podman: Podman, tmp_path: Path,
) -> None:
    root = copy_store(store_podman, tmp_path / "copy")
    store = open_copy(root, store_podman)
    top_ctr = next(c for c in store.containers() if c.names == ("ctr-top",))
    assert top_ctr.snapshot_key is not None
    snap = by_key(store)[top_ctr.snapshot_key]
    lower_ids = [lower.layer_id for lower in store.lower_chain(snap.key)]
    entries = (root / "overlay" / snap.key / "lower").read_text().split(":")
    first, second, third = (root / "overlay" / entry for entry in entries)

    first.unlink()  # missing
    second.unlink()
    second.write_text("not a link")  # a regular file in place of the symlink
    third.unlink()
    third.symlink_to("/etc")  # points out of the store: never followed

    store = open_copy(root, store_podman)
    assert len(store.snapshots()) == 5 and len(store.images()) == 3
    links = {entry.name: entry for entry in store.links()}
    assert first.name not in links
    assert links[second.name].target is None
    assert links[third.name].target == "/etc" and links[third.name].layer_id is None
    with pytest.raises(CorruptStore, match=f"^{first}: missing, but layer {snap.key} lists it"):
        store.mounts(snap)
    first.symlink_to(f"../{lower_ids[0]}/diff")  # repaired by hand: the next link fails
    with pytest.raises(CorruptStore, match=f"^{second}: not a symlink"):
        store.mounts(snap)
    second.unlink()
    second.symlink_to(f"../{lower_ids[1]}/diff")
    with pytest.raises(CorruptStore, match=f"^{third}: points to '/etc', not to"):
        store.mounts(snap)
    third.unlink()
    third.symlink_to(f"../{lower_ids[2]}/diff")
    assert store.mounts(snap)[0].options[0].startswith(f"lowerdir={first}:{second}:{third}")


def test_corrupt_json_names_file_and_position(store_podman: Podman, tmp_path: Path) -> None:
    root = copy_store(store_podman, tmp_path / "copy")
    layers_json = root / "overlay-layers" / "layers.json"
    records = json.loads(layers_json.read_text())

    layers_json.write_text(json.dumps(records, indent=1)[:-40])
    with pytest.raises(CorruptStore, match=rf"^{layers_json}: line \d+ column \d+: ") as err:
        open_copy(root, store_podman)
    assert "\n" not in str(err.value)

    del records[1]["id"]
    layers_json.write_text(json.dumps(records))
    with pytest.raises(CorruptStore, match=rf"^{layers_json}: entry 2 has no id$"):
        open_copy(root, store_podman)

    records[1]["id"] = "../../etc"
    layers_json.write_text(json.dumps(records))
    with pytest.raises(CorruptStore, match="not a single path component"):
        open_copy(root, store_podman)

    layers_json.write_text(json.dumps({"layers": []}))
    with pytest.raises(CorruptStore, match="expected a JSON array, found an object"):
        open_copy(root, store_podman)

    layers_json.write_bytes(b"")  # an empty file is an empty store, as for c/storage
    assert open_copy(root, store_podman).snapshots() == []

    images_json = root / "overlay-images" / "images.json"
    images = json.loads(images_json.read_text())
    images[0]["names"] = "not-a-list"
    images_json.write_text(json.dumps(images))
    with pytest.raises(CorruptStore, match=rf"{images_json}: entry 1 field 'names' is a "
                                           "string, not an array of strings"):
        open_copy(root, store_podman)


def test_incomplete_layer_is_listed_before_podman_deletes_it(store_podman: Podman) -> None:
    layers_json = store_podman.root / "overlay-layers" / "layers.json"
    records = json.loads(layers_json.read_text())
    top = next(r for r in records if r.get("parent") and not any(
        o.get("parent") == r["id"] for o in records))
    top.setdefault("flags", {})["incomplete"] = True
    layers_json.write_text(json.dumps(records))
    store = open_podman_store(store_podman)  # read with crifs first: podman would repair it
    snap = by_key(store)[top["id"]]
    assert snap.flags == {"incomplete": True}
    assert store.info().counts["incomplete_layers"] == 1
    store_podman.run("images")  # podman's first call deletes incomplete layers
    assert top["id"] not in by_key(open_podman_store(store_podman))


def test_volatile_and_transient_records_are_read(store_podman: Podman, tmp_path: Path) -> None:
    """transient_store keeps containers (and volatile layers) in the runroot; a record in both
    files is listed once, the main file's copy first, as containers/storage loads them."""
    root = copy_store(store_podman, tmp_path / "graph")
    runroot = tmp_path / "run"
    for sub in ("overlay-containers", "overlay-layers"):
        (runroot / sub).mkdir(parents=True)
    containers_json = root / "overlay-containers" / "containers.json"
    containers = json.loads(containers_json.read_text())
    containers_json.write_text(json.dumps(containers[:1]))
    (runroot / "overlay-containers" / "volatile-containers.json").write_text(
        json.dumps(containers))
    layers_json = root / "overlay-layers" / "layers.json"
    layers = json.loads(layers_json.read_text())
    rw_ids = {c["layer"] for c in containers}
    layers_json.write_text(json.dumps([r for r in layers if r["id"] not in rw_ids]))
    (runroot / "overlay-layers" / "volatile-layers.json").write_text(
        json.dumps([r for r in layers if r["id"] in rw_ids]))
    (runroot / "overlay-containers" / "containers.lock").touch()

    transient = StorageConfig(transient_store=True)
    store = open_store(root=root, runroot=runroot, config=transient)
    assert [c.id for c in store.containers()] == [c["id"] for c in containers]
    assert str(runroot / "overlay-containers" / "containers.lock") in store.locked_files
    snapshots = store.snapshots()
    assert len(snapshots) == 5
    assert {s.key for s in snapshots if s.kind is SnapshotKind.ACTIVE} == rw_ids
    assert all(str(s.details["record_file"]).endswith("volatile-layers.json")
               for s in snapshots if s.key in rw_ids)
    # a config without transient_store still finds the runroot files
    assert len(open_store(root=root, runroot=runroot, config=StorageConfig()).containers()) == 2


def test_link_file_with_newline_is_stripped(store_podman: Podman, tmp_path: Path) -> None:
    root = copy_store(store_podman, tmp_path / "copy")
    store = open_copy(root, store_podman)
    base = next(s for s in store.snapshots() if s.parent is None)
    link_file = root / "overlay" / base.key / "link"
    name = link_file.read_text()
    assert "\n" not in name and len(name) == 26
    link_file.write_text(name + "\n")
    assert store.link_name(base.key) == name


# -- locks -----------------------------------------------------------------------------------

_HOLD_LOCK = textwrap.dedent("""
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    sys.stdin.read()
""")


@pytest.fixture
def lock_holder(store_podman: Podman) -> Iterator[subprocess.Popen[str]]:
    lock = store_podman.root / "overlay-layers" / "layers.lock"
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(lock)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_writer_holding_layers_lock_times_out_then_reads(
    store_podman: Podman, lock_holder: subprocess.Popen[str],
) -> None:
    lock = store_podman.root / "overlay-layers" / "layers.lock"
    with pytest.raises(StoreLocked) as err:
        open_podman_store(store_podman, lock_timeout=0.5)
    message = str(err.value)
    assert message.startswith(f"{lock}: held for writing by pid {lock_holder.pid} (python")
    assert message.endswith("for more than 0.5 s")
    assert lock_holder.stdin is not None
    lock_holder.stdin.close()
    lock_holder.wait(timeout=10)
    store = open_podman_store(store_podman, lock_timeout=0.5)
    assert str(lock) in store.locked_files
    assert len(store.snapshots()) == 5


def test_podman_can_write_after_we_read(store_podman: Podman) -> None:
    open_podman_store(store_podman)
    store_podman.run("rm", "ctr-base")  # our read locks are released
    assert len(open_podman_store(store_podman).containers()) == 1


# -- pure units (no runtime) -----------------------------------------------------------------


def test_storage_conf_is_read_like_containers_storage(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "storage.conf"
    real_root = tmp_path / "real-root"
    real_root.mkdir()
    (tmp_path / "link-root").symlink_to(real_root)
    conf.write_text(textwrap.dedent(f"""
        [storage]
        driver = "overlay"
        graphroot = "{tmp_path}/link-root"
        runroot = "$CRIFS_TEST_RUN/run"
        transient_store = true
        [storage.options]
        additionalimagestores = ["/ais"]
        mountopt = "nodev"
        [storage.options.overlay]
        mountopt = "nodev,metacopy=on"
    """))
    monkeypatch.setenv("CRIFS_TEST_RUN", str(tmp_path))
    monkeypatch.setenv("CONTAINERS_STORAGE_CONF", str(conf))
    cfg = load_config()
    assert cfg.path == str(conf)
    assert cfg.graphroot == str(real_root)  # symlinks resolved, as expandEnvPath does
    assert cfg.runroot == f"{tmp_path}/run"
    assert cfg.transient_store and cfg.additional_image_stores == ("/ais",)
    assert cfg.mountopt == "nodev,metacopy=on"  # [storage.options.overlay] wins
    conf.write_text("[storage]\ngraphroot = 3\n")
    with pytest.raises(BadInput, match=r"\[storage\] graphroot must be a string"):
        load_config()
    conf.write_text("[storage\n")
    with pytest.raises(BadInput, match=f"^{conf}: not valid TOML"):
        load_config()
    monkeypatch.setenv("CONTAINERS_STORAGE_CONF", str(tmp_path / "none.conf"))
    assert load_config().graphroot == "/var/lib/containers/storage"
    with pytest.raises(BadInput, match="storage.conf does not exist"):
        load_config(tmp_path / "none.conf")


def test_record_helpers() -> None:
    assert big_data_file_name("manifest") == "manifest"
    assert big_data_file_name("sha256:ab") == "=c2hhMjU2OmFi"
    assert link_target_layer("../abc/diff") == "abc"
    assert link_target_layer("../../abc/diff") is None
    assert link_target_layer("/etc") is None
    assert parse_go_time("0001-01-01T00:00:00Z") is None
    assert parse_go_time("2026-11-29T04:37:02.933750039+02:00") == dt.datetime(
        2026, 11, 29, 2, 37, 2, 933750, tzinfo=dt.UTC)
    layers = parse_layers("x.json", b'[{"id":"a","diff-size":-1,"flags":{"incomplete":true}}]')
    assert layers[0].incomplete and layers[0].diff_size == -1
    with pytest.raises(CorruptStore, match=r"^x.json: entry 1 field 'created' is 'yesterday'"):
        parse_layers("x.json", b'[{"id":"a","created":"yesterday"}]')
    with pytest.raises(CorruptStore, match=r"^x.json: byte 2: not UTF-8"):
        parse_layers("x.json", b'[{\xff}]')
