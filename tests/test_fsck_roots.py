"""R1-R3 (``crifs.fsck.roots``): storage roots behind bad symlinks, with the wrong owner or
mode, on filesystems the overlay driver cannot use, and configured paths that disagree with
the disk.

Stores are the demo writers' (``crifs.demo``: the files containerd and podman write, without
the runtimes) with the directory modes the runtimes create, and real containerd and podman
stores for the clean cases and the libpod database. Filesystems are real mounts: an overlay,
fuse-overlayfs, an ext4 loop image formatted without the ``filetype`` feature (no d_type, like
xfs ftype=0) and tmpfs, all under the test's temp dir and unmounted afterwards.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from crifs.containerd.store import ContainerdStore
from crifs.cstorage.config import StorageConfig
from crifs.cstorage.store import CStorageStore
from crifs.demo.containerd_sandbox import build_containerd_root
from crifs.demo.cstorage_sandbox import build_cstorage_root
from crifs.demo.images import demo_images
from crifs.fs.dtype import records_d_type
from crifs.fs.usage import Meter, disk_usage
from crifs.fsck import roots
from crifs.fsck.findings import CheckOptions, Finding, Severity
from crifs.model import Store
from ocibuild import build_layout, busybox_available, busybox_layer
from runtimes import ContainerdDaemon, Podman, unmount_under

OVERLAY_DIR = "io.containerd.snapshotter.v1.overlayfs"
Mounter = Callable[..., Path]


def r_findings(store: Store, measure: bool = True) -> list[Finding]:
    return roots.findings(store, CheckOptions(measure=measure), Meter())


def codes(found: list[Finding]) -> list[tuple[str, str]]:
    return sorted((f.code, f.object) for f in found)


def containerd_root(path: Path) -> Path:
    """A demo containerd root with the modes containerd 1.x gives its directories."""
    build_containerd_root(path, demo_images())
    path.chmod(0o711)
    (path / OVERLAY_DIR).chmod(0o700)
    (path / OVERLAY_DIR / "snapshots").chmod(0o700)
    return path


def cstorage_root(path: Path) -> tuple[Path, Path]:
    """A demo graphroot and its runroot, with the modes containers/storage creates."""
    build_cstorage_root(path / "graph", demo_images())
    (path / "graph").chmod(0o700)
    (path / "graph" / "overlay").chmod(0o700)  # as podman 4.3.1 leaves it
    (path / "run").mkdir(mode=0o700)
    return path / "graph", path / "run"


def open_cstorage(graph: Path | str, run: Path | str, config: StorageConfig | str | None = None
                  ) -> CStorageStore:
    return CStorageStore.open(root=graph, runroot=run, config=config or StorageConfig())


def only(found: list[Finding], code: str) -> Finding:
    matching = [f for f in found if f.code == code]
    assert len(matching) == 1, found
    return matching[0]


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Mounter]:
    """``mount(kind, target)`` mounts a fresh filesystem of ``kind`` at ``target``: ``tmpfs``,
    ``ext4``, ``ext4-no-dtype``, ``overlay`` or ``fuse-overlayfs``. All are unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting filesystems needs root")
    mounted: list[Path] = []

    def do_mount(kind: str, target: Path) -> Path:
        target.mkdir(parents=True, exist_ok=True)
        scratch = tmp_path / f"scratch-{len(mounted)}"
        scratch.mkdir()
        if kind == "tmpfs":
            argv = ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(target)]
        elif kind.startswith("ext4"):
            image = scratch / "fs.img"
            with open(image, "wb") as f:
                f.truncate(64 << 20)
            features = ["-O", "^filetype"] if kind == "ext4-no-dtype" else []
            subprocess.run(["mkfs.ext4", "-q", *features, str(image)], check=True)
            argv = ["mount", "-o", "loop", str(image), str(target)]
        elif kind in ("overlay", "fuse-overlayfs"):
            for sub in ("lower", "upper", "work"):
                (scratch / sub).mkdir()
            options = (f"lowerdir={scratch / 'lower'},upperdir={scratch / 'upper'},"
                       f"workdir={scratch / 'work'}")
            if kind == "overlay":
                argv = ["mount", "-t", "overlay", "overlay", "-o", options, str(target)]
            else:
                if shutil.which("fuse-overlayfs") is None or not os.path.exists("/dev/fuse"):
                    pytest.skip("needs fuse-overlayfs and /dev/fuse")
                argv = ["fuse-overlayfs", "-o", options, str(target)]
        else:
            raise AssertionError(kind)
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount {kind}: {proc.stderr.strip()}")
        mounted.append(target)
        return target

    try:
        yield do_mount
    finally:
        for target in reversed(mounted):
            subprocess.run(["umount", "-l", str(target)], capture_output=True)
        unmount_under(tmp_path)


# -- clean stores: no R finding ---------------------------------------------------------------


def test_clean_demo_stores_have_no_root_findings(tmp_path: Path) -> None:
    ctd = containerd_root(tmp_path / "containerd")
    graph, run = cstorage_root(tmp_path / "cs")
    assert r_findings(ContainerdStore.open(root=ctd)) == []
    assert r_findings(open_cstorage(graph, run)) == []


def test_absolute_symlink_to_a_containerd_root_is_fine(tmp_path: Path) -> None:
    real = containerd_root(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real)
    assert r_findings(ContainerdStore.open(root=link)) == []


def test_clean_real_containerd_store(containerd: ContainerdDaemon) -> None:
    containerd.stop()
    store = ContainerdStore.open(root=containerd.root, state=containerd.state,
                                 config=containerd.config_path)
    assert store.config.path is not None  # R3 compares against this config
    # The harness creates root and state with mkdir (0755 under umask 022) before containerd
    # starts. containerd keeps the state dir's mode (and the root's too, before the fix for
    # CVE-2024-25621): worth knowing, not a problem, since the 0700 snapshotter root it made
    # itself keeps other users out.
    found = r_findings(store)
    assert ("R1", str(containerd.state)) in codes(found)
    assert {f.code for f in found} == {"R1"} and {f.severity for f in found} == {Severity.INFO}
    containerd.root.chmod(0o711)  # what containerd 1.x creates
    containerd.state.chmod(0o711)
    assert r_findings(store) == []


def test_clean_real_podman_store(podman: Podman, tmp_path: Path) -> None:
    if not busybox_available():
        pytest.skip("needs the busybox-static package for the test image")
    build_layout(tmp_path / "layout", {"example.com/crifs/roots:v1": [busybox_layer()]})
    podman.pull_layout(tmp_path / "layout", "example.com/crifs/roots:v1")
    podman.run("create", "--name", "c1", "example.com/crifs/roots:v1", "/bin/sh")
    # As for containerd: the harness made these with mkdir; c/storage would make them 0700.
    podman.root.chmod(0o700)
    podman.runroot.chmod(0o700)
    store = CStorageStore.open(root=podman.root, runroot=podman.runroot,
                               config=str(podman.storage_conf))
    assert os.path.isfile(podman.root / "libpod" / "bolt_state.db")
    assert r_findings(store) == []


# -- R1 ---------------------------------------------------------------------------------------


def test_relative_symlinked_containerd_root_is_a_warning(tmp_path: Path) -> None:
    containerd_root(tmp_path / "data" / "containerd")
    link = tmp_path / "root"
    link.symlink_to("data/containerd")
    found = r_findings(ContainerdStore.open(root=link))
    r1 = only(found, "R1")
    assert r1.object == str(link) and r1.severity is Severity.WARNING
    assert r1.evidence["problems"] == ["relative"]
    assert r1.evidence["symlinks"] == [{"path": str(link), "target": "data/containerd"}]
    assert r1.repair is not None and not r1.repair.actions
    assert r1.repair.commands == (f"ln -sfn {tmp_path / 'data' / 'containerd'} {link}",)
    # The command does what it says: afterwards the root is clean.
    subprocess.run(["sh", "-c", r1.repair.commands[0]], check=True)
    assert r_findings(ContainerdStore.open(root=link)) == []


def test_dangling_state_symlink_is_an_error(tmp_path: Path) -> None:
    root = containerd_root(tmp_path / "root")
    state = tmp_path / "state"
    state.symlink_to(tmp_path / "unmounted-disk" / "state")
    r1 = only(r_findings(ContainerdStore.open(root=root, state=state)), "R1")
    assert r1.object == str(state) and r1.severity is Severity.ERROR
    assert r1.evidence["problems"] == ["dangling"]
    assert "does not exist" in r1.message
    assert r1.repair is not None and "ln -sfn" in r1.repair.summary


def test_dangling_link_above_the_runroot_is_found(tmp_path: Path) -> None:
    graph, _ = cstorage_root(tmp_path / "cs")
    (tmp_path / "var-run").symlink_to(tmp_path / "gone")
    runroot = tmp_path / "var-run" / "containers"
    r1 = only(r_findings(open_cstorage(graph, runroot)), "R1")
    assert r1.object == str(runroot)
    assert r1.evidence["symlinks"] == [{"path": str(tmp_path / "var-run"),
                                        "target": str(tmp_path / "gone")}]


def test_symlinked_graphroot_is_an_error_even_when_absolute(tmp_path: Path) -> None:
    graph, run = cstorage_root(tmp_path / "cs")
    link = tmp_path / "storage"
    link.symlink_to(graph)
    r1 = only(r_findings(open_cstorage(link, run)), "R1")
    assert r1.severity is Severity.ERROR and r1.object == str(link)
    assert r1.evidence["problems"] == ["symlink"]
    assert "containers/storage#165" in r1.message
    assert r1.repair is not None
    assert f"mount --bind {graph} {link}" in r1.repair.commands


def test_symlink_above_the_graphroot_is_an_error(tmp_path: Path) -> None:
    cstorage_root(tmp_path / "disk")
    (tmp_path / "lib").symlink_to(tmp_path / "disk")
    graph = tmp_path / "lib" / "graph"
    r1 = only(r_findings(open_cstorage(graph, tmp_path / "disk" / "run")), "R1")
    assert r1.object == str(graph)
    assert r1.evidence["symlinks"] == [{"path": str(tmp_path / "lib"),
                                        "target": str(tmp_path / "disk")}]
    assert r1.repair is not None and not r1.repair.commands  # the link is not the root: advice
    assert str(tmp_path / "disk" / "graph") in r1.repair.summary


def test_symlinked_overlay_home_is_an_error(tmp_path: Path) -> None:
    graph, run = cstorage_root(tmp_path / "cs")
    (graph / "overlay").rename(tmp_path / "elsewhere")
    (graph / "overlay").symlink_to(tmp_path / "elsewhere")
    r1 = only(r_findings(open_cstorage(graph, run)), "R1")
    assert r1.object == str(graph / "overlay")
    assert r1.evidence["problems"] == ["symlink"]


def test_root_owned_by_another_user_than_the_metadata(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    real = containerd_root(tmp_path / "real")
    os.chown(real, 1234, 1234)
    link = tmp_path / "root"
    link.symlink_to(real)
    r1 = only(r_findings(ContainerdStore.open(root=link)), "R1")
    assert r1.severity is Severity.ERROR and r1.evidence["problems"] == ["owner"]
    assert r1.evidence["uid"] == 1234 and r1.evidence["expected_uid"] == 0
    assert str(real) in r1.message  # the symlink's target is named
    assert r1.repair is not None and r1.repair.commands == (f"chown 0:0 {real}",)


@pytest.mark.parametrize(("mode", "snapshots_mode", "severity"), [
    (0o755, 0o700, Severity.INFO),  # snapshots/ still keeps other users out
    (0o755, 0o755, Severity.WARNING),  # the layers are open to other users
    (0o777, 0o700, Severity.ERROR),  # anyone can write into the snapshotter root
])
def test_root_mode_wider_than_the_runtime_creates(tmp_path: Path, mode: int,
                                                  snapshots_mode: int,
                                                  severity: Severity) -> None:
    root = containerd_root(tmp_path / "root")
    (root / OVERLAY_DIR).chmod(mode)
    (root / OVERLAY_DIR / "snapshots").chmod(snapshots_mode)
    r1 = only(r_findings(ContainerdStore.open(root=root)), "R1")
    assert r1.object == str(root / OVERLAY_DIR) and r1.severity is severity
    assert r1.evidence["mode"] == f"{mode:04o}" and r1.evidence["max_mode"] == "0700"
    assert r1.repair is not None and r1.repair.commands == (f"chmod 0700 {root / OVERLAY_DIR}",)


def test_graphroot_0711_is_accepted_wider_is_reported(tmp_path: Path) -> None:
    graph, run = cstorage_root(tmp_path / "cs")
    graph.chmod(0o711)
    assert r_findings(open_cstorage(graph, run)) == []
    graph.chmod(0o755)
    r1 = only(r_findings(open_cstorage(graph, run)), "R1")
    assert r1.evidence["mode"] == "0755" and r1.severity is Severity.INFO
    (graph / "overlay").chmod(0o755)  # the driver home no longer keeps other users out
    assert only(r_findings(open_cstorage(graph, run)), "R1").severity is Severity.WARNING


# -- R2 ---------------------------------------------------------------------------------------


def test_containerd_root_on_overlay_is_overlay_on_overlay(tmp_path: Path, mount: Mounter
                                                          ) -> None:
    merged = mount("overlay", tmp_path / "merged")
    root = containerd_root(merged / "containerd")
    r2 = only(r_findings(ContainerdStore.open(root=root)), "R2")
    assert r2.object == str(root / OVERLAY_DIR) and r2.severity is Severity.ERROR
    assert r2.evidence["fs_type"] == "overlay" and r2.evidence["problems"] == ["stacked"]


def test_graphroot_on_overlay_is_overlay_on_overlay(tmp_path: Path, mount: Mounter) -> None:
    merged = mount("overlay", tmp_path / "merged")
    graph, run = cstorage_root(merged / "cs")
    r2 = only(r_findings(open_cstorage(graph, run)), "R2")
    assert r2.object == str(graph / "overlay") and r2.evidence["problems"] == ["stacked"]


def test_graphroot_on_overlay_with_a_mount_program_is_fine(tmp_path: Path, mount: Mounter
                                                           ) -> None:
    merged = mount("overlay", tmp_path / "merged")
    graph, run = cstorage_root(merged / "cs")
    config = StorageConfig(mount_program="/usr/bin/fuse-overlayfs")
    assert r_findings(open_cstorage(graph, run, config)) == []


def test_root_on_fuse_is_refused_as_upper_dir(tmp_path: Path, mount: Mounter) -> None:
    merged = mount("fuse-overlayfs", tmp_path / "fuse")
    root = containerd_root(merged / "containerd")
    r2 = only(r_findings(ContainerdStore.open(root=root)), "R2")
    assert str(r2.evidence["fs_type"]).startswith("fuse")
    assert r2.evidence["problems"] == ["remote"]


def test_filesystem_without_d_type(tmp_path: Path, mount: Mounter) -> None:
    disk = mount("ext4-no-dtype", tmp_path / "disk")
    assert records_d_type(str(disk)) is False
    root = containerd_root(disk / "containerd")
    r2 = only(r_findings(ContainerdStore.open(root=root)), "R2")
    assert r2.evidence["problems"] == ["no_d_type"] and r2.evidence["fs_type"] == "ext4"
    graph, run = cstorage_root(disk / "cs")
    r2 = only(r_findings(open_cstorage(graph, run)), "R2")
    assert r2.evidence["d_type"] is False


@pytest.mark.parametrize("kind", ["tmpfs", "ext4"])
def test_usable_filesystems_give_no_r2(tmp_path: Path, mount: Mounter, kind: str) -> None:
    disk = mount(kind, tmp_path / "disk")
    disk.chmod(0o700)
    assert records_d_type(str(disk)) in (True, None)  # tmpfs starts empty
    root = containerd_root(disk / "containerd")
    graph, run = cstorage_root(disk / "cs")
    assert r_findings(ContainerdStore.open(root=root)) == []
    assert r_findings(open_cstorage(graph, run)) == []


def test_cached_failed_overlay_probe(tmp_path: Path) -> None:
    graph, run = cstorage_root(tmp_path / "cs")
    (run / "overlay").mkdir()
    (run / "overlay" / "overlay-false").write_text("kernel does not support overlay fs: x")
    r2 = only(r_findings(open_cstorage(graph, run)), "R2")
    assert r2.evidence["problems"] == ["probe"]
    assert r2.evidence["driver_probe"] == "kernel does not support overlay fs: x"


# -- R3 ---------------------------------------------------------------------------------------


def write_containerd_config(path: Path, root: Path, extra: str = "") -> Path:
    path.write_text(f'version = 2\nroot = "{root}"\nstate = "{path.parent / "state"}"\n{extra}',
                    encoding="utf-8")
    return path


def test_containerd_config_naming_an_empty_root(tmp_path: Path) -> None:
    root = containerd_root(tmp_path / "moved")
    (tmp_path / "old").mkdir()
    config = write_containerd_config(tmp_path / "config.toml", tmp_path / "old")
    r3 = only(r_findings(ContainerdStore.open(root=root, config=config)), "R3")
    assert r3.object == str(tmp_path / "old") and r3.severity is Severity.WARNING
    assert r3.evidence["configured_has_meta_db"] is False
    assert "starts empty" in r3.message


def test_containerd_state_differs_from_config(tmp_path: Path) -> None:
    root = containerd_root(tmp_path / "root")
    config = write_containerd_config(tmp_path / "config.toml", root)
    other = tmp_path / "other-state"
    other.mkdir(mode=0o711)
    r3 = only(r_findings(ContainerdStore.open(root=root, state=other, config=config)), "R3")
    assert r3.evidence["key"] == "state" and r3.object == str(tmp_path / "state")


def test_snapshotter_root_path_pointing_at_an_empty_dir(tmp_path: Path) -> None:
    root = containerd_root(tmp_path / "root")
    empty = tmp_path / "fast-disk"
    empty.mkdir(mode=0o700)
    config = write_containerd_config(
        tmp_path / "config.toml", root,
        f'[plugins."io.containerd.snapshotter.v1.overlayfs"]\n  root_path = "{empty}"\n')
    r3 = only(r_findings(ContainerdStore.open(root=root, config=config)), "R3")
    assert r3.object == str(empty)
    assert r3.evidence["default_has_metadata_db"] is True
    assert r3.evidence["configured_has_metadata_db"] is False


def test_snapshotter_moved_leaves_the_old_dir_behind(tmp_path: Path) -> None:
    root = containerd_root(tmp_path / "root")
    moved = tmp_path / "fast-disk"
    shutil.copytree(root / OVERLAY_DIR, moved, symlinks=True)
    config = write_containerd_config(
        tmp_path / "config.toml", root,
        f'[plugins."io.containerd.snapshotter.v1.overlayfs"]\n  root_path = "{moved}"\n')
    store = ContainerdStore.open(root=root, config=config)
    r3 = only(r_findings(store), "R3")
    assert r3.object == str(root / OVERLAY_DIR)
    expected = disk_usage(root / OVERLAY_DIR)
    assert r3.reclaimable is not None
    assert (r3.reclaimable.disk_bytes, r3.reclaimable.inodes) == (expected.disk_bytes,
                                                                  expected.inodes)
    assert only(r_findings(store, measure=False), "R3").reclaimable is None


def test_storage_conf_naming_an_empty_graphroot(tmp_path: Path) -> None:
    graph, run = cstorage_root(tmp_path / "cs")
    (tmp_path / "old").mkdir()
    conf = tmp_path / "storage.conf"
    conf.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{tmp_path / "old"}"\n'
                    f'runroot = "{run}"\n', encoding="utf-8")
    r3 = only(r_findings(open_cstorage(graph, run, str(conf))), "R3")
    assert r3.evidence["key"] == "graphroot" and r3.object == str(tmp_path / "old")


def test_storage_conf_runroot_differs(tmp_path: Path) -> None:
    graph, run = cstorage_root(tmp_path / "cs")
    conf = tmp_path / "storage.conf"
    conf.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{graph}"\n'
                    f'runroot = "{tmp_path / "real-run"}"\n', encoding="utf-8")
    r3 = only(r_findings(open_cstorage(graph, run, str(conf))), "R3")
    assert r3.evidence["key"] == "runroot"


def test_moved_podman_store_mismatches_its_libpod_database(podman: Podman, tmp_path: Path
                                                           ) -> None:
    if not busybox_available():
        pytest.skip("needs the busybox-static package for the test image")
    build_layout(tmp_path / "layout", {"example.com/crifs/roots:v1": [busybox_layer()]})
    podman.pull_layout(tmp_path / "layout", "example.com/crifs/roots:v1")
    moved = tmp_path / "moved"
    shutil.copytree(podman.root, moved, symlinks=True)
    moved.chmod(0o700)
    podman.runroot.chmod(0o700)
    store = CStorageStore.open(root=moved, runroot=podman.runroot, config=StorageConfig())
    r3 = only(r_findings(store), "R3")
    assert r3.severity is Severity.ERROR
    assert r3.object == str(moved / "libpod" / "bolt_state.db")
    assert r3.evidence["mismatched"] == ["graph_root", "static_dir"]
    # podman itself refuses the moved store for the same reason.
    argv = [a if a != str(podman.root) else str(moved) for a in podman.base_argv()]
    proc = subprocess.run([*argv, "images"], capture_output=True, text=True, env=podman.env())
    assert proc.returncode != 0 and "database configuration mismatch" in proc.stderr


def test_sqlite_libpod_database_runroot_mismatch(tmp_path: Path) -> None:
    graph, run = cstorage_root(tmp_path / "cs")
    (graph / "libpod").mkdir(mode=0o700)
    with sqlite3.connect(graph / "libpod" / "db.sql") as conn:
        # The DBConfig table of podman's sqlite state (libpod/sqlite_state.go).
        conn.execute("CREATE TABLE DBConfig(Id INTEGER PRIMARY KEY NOT NULL, SchemaVersion "
                     "INTEGER NOT NULL, Os TEXT NOT NULL, StaticDir TEXT NOT NULL, TmpDir TEXT "
                     "NOT NULL, GraphRoot TEXT NOT NULL, RunRoot TEXT NOT NULL, GraphDriver "
                     "TEXT NOT NULL, VolumeDir TEXT NOT NULL, CHECK (Id IN (1)))")
        conn.execute("INSERT INTO DBConfig VALUES (1, 1, 'linux', ?, '/tmp', ?, ?, 'overlay', "
                     "'/v')", (str(graph / "libpod"), str(graph), "/run/elsewhere"))
    conn.close()
    before = sorted(os.listdir(graph / "libpod"))
    r3 = only(r_findings(open_cstorage(graph, run)), "R3")
    assert r3.evidence["mismatched"] == ["run_root"]
    assert sorted(os.listdir(graph / "libpod")) == before  # read without -wal/-shm files
