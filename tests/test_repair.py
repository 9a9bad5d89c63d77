"""The repair executor and its primitives on real directories, real mounts and real runtimes.

Primitives: a removal never follows a symlink (a sentinel outside the store survives), refuses
bind mounts and live overlay mounts, stays inside the store. The journal: which steps an
interrupted run leaves, and a killed repair finished by the next one. Locks: refused while
another process holds ``layers.lock`` or while a real containerd runs; c/storage's last-write
token renewed after every record save.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from crifs.containerd.store import ContainerdStore
from crifs.cstorage.store import CStorageStore
from crifs.errors import Internal, StoreLocked, UnsafePath
from crifs.fs.locks import lock_holders
from crifs.fsck.catalogue import severity_of
from crifs.fsck.findings import Finding, Repair
from crifs.model import Store
from crifs.repair import fsops
from crifs.repair.actions import (
    Action,
    CreateSymlink,
    DeleteImage,
    DeleteLayer,
    DropMountRecord,
    MakeDir,
    RemovePath,
    WriteFile,
)
from crifs.repair.apply import ApplyResult, apply
from crifs.repair.journal import Journal
from crifs.repair.locks import LAST_WRITE_SIZE
from ocibuild import Entry, build_layout, busybox_available, busybox_layer
from runtimes import ContainerdDaemon, Podman, unmount_under

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
BASE = "example.com/repair/base:v1"
Tree = tuple[fsops.Scope, Path, Path]
JUNK = "example.com/repair/junk:v1"


# -- helpers -------------------------------------------------------------------------------


def finding(code: str, obj: str, *actions: Action, order: int = 0,
            runtime: str = "cstorage") -> Finding:
    return Finding(code, severity_of(code), runtime, obj, f"planted {code}",
                   repair=Repair(summary="test", actions=actions, gc=True, order=order))


def run_apply(store: Store, planned: list[Finding],
              lock_timeout: float = 10.0) -> tuple[ApplyResult, list[str]]:
    lines: list[str] = []

    def again() -> Store:
        if isinstance(store, CStorageStore):
            return CStorageStore.open(root=store.root, runroot=store.runroot, take_locks=False)
        assert isinstance(store, ContainerdStore)
        return ContainerdStore.open(root=store.root)

    result = apply(store, planned, reopen=again, check=lambda _: list(planned),
                   log=lines.append, lock_timeout=lock_timeout)
    return result, lines


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    """A store root and, outside it, a host dir with a sentinel file."""
    store = tmp_path / "store"
    host = tmp_path / "host"
    store.mkdir()
    host.mkdir()
    (host / "sentinel").write_bytes(b"host data")
    return fsops.Scope([str(store)]), store, host


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[list[str]]:
    """Mount points a test creates; unmounted (deepest first) afterwards."""
    made: list[str] = []
    yield made
    unmount_under(tmp_path)


# -- primitives ----------------------------------------------------------------------------


def test_removing_a_tree_never_follows_a_symlink_onto_the_host(tree: Tree) -> None:
    scope, store, host = tree
    garbage = store / "garbage"
    (garbage / "a" / "b").mkdir(parents=True)
    (garbage / "a" / "b" / "file").write_bytes(b"x" * 10000)
    (garbage / "a" / "to-file").symlink_to(host / "sentinel")
    (garbage / "a" / "to-dir").symlink_to(host)
    (garbage / "rel").symlink_to("../../host")
    freed = fsops.remove_path(scope, str(garbage), trash=None)
    assert not garbage.exists()
    assert (host / "sentinel").read_bytes() == b"host data"
    assert sorted(os.listdir(host)) == ["sentinel"]
    assert freed.inodes == 7 and freed.disk_bytes >= 10000


def test_a_symlink_named_as_the_path_is_unlinked_not_followed(tree: Tree) -> None:
    scope, store, host = tree
    (store / "link").symlink_to(host)
    fsops.remove_path(scope, str(store / "link"))
    assert not os.path.lexists(store / "link")
    assert (host / "sentinel").exists()


def test_a_symlink_on_the_way_is_refused(tree: Tree) -> None:
    scope, store, host = tree
    (store / "sub").symlink_to(host)
    with pytest.raises(UnsafePath, match="does not follow"):
        fsops.remove_path(scope, str(store / "sub" / "sentinel"))
    with pytest.raises(UnsafePath):
        fsops.write_file(scope, str(store / "sub" / "new"), b"x")
    assert sorted(os.listdir(host)) == ["sentinel"]


def test_paths_outside_the_store_are_refused(tree: Tree) -> None:
    scope, store, host = tree
    for path in (str(host / "sentinel"), str(store), f"{store}/../host/sentinel", "relative"):
        with pytest.raises(UnsafePath):
            fsops.remove_path(scope, path)
    assert (host / "sentinel").exists()


def test_a_missing_path_is_success(tree: Tree) -> None:
    scope, store, _ = tree
    assert fsops.remove_path(scope, str(store / "nope" / "deeper")) == fsops.NOTHING


def test_a_directory_goes_through_the_trash(tree: Tree) -> None:
    scope, store, _ = tree
    trash = store / "trash"
    trash.mkdir()
    (store / "d" / "e").mkdir(parents=True)
    fsops.remove_path(scope, str(store / "d"), trash=str(trash))
    assert not (store / "d").exists() and os.listdir(trash) == []


@needs_root
def test_a_bind_mount_inside_a_dir_makes_the_removal_refuse(tree: Tree, mounts: list[str]) -> None:
    scope, store, host = tree
    garbage = store / "garbage"
    (garbage / "mnt").mkdir(parents=True)
    (garbage / "keep").write_bytes(b"k")
    subprocess.run(["mount", "--bind", str(host), str(garbage / "mnt")], check=True)
    for path in (garbage, garbage / "mnt"):
        with pytest.raises(fsops.Refused, match="mount"):
            fsops.remove_path(scope, str(path))
    assert (garbage / "keep").exists() and (host / "sentinel").exists()
    subprocess.run(["umount", str(garbage / "mnt")], check=True)
    fsops.remove_path(scope, str(garbage))
    assert not garbage.exists() and (host / "sentinel").exists()


@needs_root
def test_a_live_overlay_mounts_dirs_are_refused(tree: Tree, tmp_path: Path,
                                              mounts: list[str]) -> None:
    scope, store, _ = tree
    lower = store / "layer" / "diff"
    lower.mkdir(parents=True)
    (lower / "f").write_bytes(b"lower")
    (store / "l").mkdir()
    (store / "l" / "LINK").symlink_to("../layer/diff")
    upper, work, merged = (store / "up", store / "work", tmp_path / "merged")
    for d in (upper, work, merged):
        d.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={store / 'l' / 'LINK'},upperdir={upper},workdir={work}",
                    str(merged)], check=True)
    assert (merged / "f").read_bytes() == b"lower"
    for path in (store / "layer", lower, store / "l" / "LINK", upper, work):
        with pytest.raises(fsops.Refused, match="overlay mount"):
            fsops.remove_path(scope, str(path))
    subprocess.run(["umount", str(merged)], check=True)
    fsops.remove_path(scope, str(store / "layer"))
    assert not (store / "layer").exists()


def test_create_and_replace_are_idempotent_and_never_leave_scratch(tree: Tree) -> None:
    scope, store, _ = tree
    scratch = store / "scratch"
    scratch.mkdir()
    link = store / "LINK"
    assert fsops.replace_symlink(scope, str(link), "../a/diff", scratch=str(scratch))
    assert not fsops.replace_symlink(scope, str(link), "../a/diff", scratch=str(scratch))
    assert fsops.replace_symlink(scope, str(link), "../b/diff", scratch=str(scratch))
    assert os.readlink(link) == "../b/diff"
    target = store / "file"
    assert fsops.write_file(scope, str(target), b"ABC", 0o644, scratch=str(scratch))
    assert not fsops.write_file(scope, str(target), b"ABC", 0o644, scratch=str(scratch))
    assert target.read_bytes() == b"ABC" and (target.stat().st_mode & 0o777) == 0o644
    assert fsops.make_dir(scope, str(store / "dir"), 0o700)
    assert not fsops.make_dir(scope, str(store / "dir"), 0o700)
    assert (store / "dir").stat().st_mode & 0o777 == 0o700
    with pytest.raises(fsops.Refused, match="directory is in the way"):
        fsops.replace_symlink(scope, str(store / "dir"), "x")
    with pytest.raises(fsops.Refused, match="not a directory"):
        fsops.make_dir(scope, str(target))
    assert os.listdir(scratch) == []
    assert not [n for n in os.listdir(store) if n.startswith(fsops.SCRATCH_PREFIX)]


# -- journal -------------------------------------------------------------------------------


def test_an_interrupted_journal_names_the_started_groups_remaining_steps(tmp_path: Path) -> None:
    journal = Journal(str(tmp_path))
    journal.prepare()
    steps = [{"n": n, "group": g, "op": "remove", "path": f"/x/{n}"}
             for n, g in ((1, 0), (2, 0), (3, 0), (4, 1), (5, 2), (6, 2))]
    journal.start(steps, [{"code": "S6", "object": str(g)} for g in range(3)])
    journal.begin(steps[0])
    journal.done(steps[0])
    journal.begin(steps[1])  # killed here: step 2 may or may not have happened
    journal.close()
    with open(journal.path, "ab") as f:
        f.write(b'{"rec": "done", "ru')  # a torn last line
    unfinished = Journal(str(tmp_path)).unfinished()
    assert unfinished is not None
    assert [s["n"] for s in unfinished.remaining()] == [2, 3]  # group 1, 2 never started
    again = Journal(str(tmp_path))
    again.adopt(unfinished.run)
    again.abandon(0, "test")
    again.end()
    again.close()
    assert Journal(str(tmp_path)).unfinished() is None
    again.clear()
    assert not (tmp_path / ".crifs").exists()


# -- containers/storage --------------------------------------------------------------------


@pytest.fixture
def cstore(podman: Podman, tmp_path: Path) -> Podman:
    """podman with a base image (and a container of it) and a one-layer junk image."""
    if not busybox_available():
        pytest.skip("needs the busybox-static package for the test images")
    build_layout(tmp_path / "layout", {
        BASE: [[*busybox_layer(("sh", "cat")), Entry("etc", "dir"),
                Entry("etc/marker", data=b"ok\n")]],
        JUNK: [[Entry("j", "dir"), Entry("j/1", data=b"j" * 30000)]],
    })
    for ref in (BASE, JUNK):
        podman.pull_layout(tmp_path / "layout", ref)
    podman.run("create", "--name", "user", BASE, "/bin/sh")
    return podman


def open_cstore(podman: Podman) -> CStorageStore:
    return CStorageStore.open(root=podman.root, runroot=podman.runroot)


def image_record(podman: Podman, name: str) -> dict[str, object]:
    images = json.loads((podman.root / "overlay-images" / "images.json").read_text())
    return next(i for i in images if name in (i.get("names") or []))


def token(path: Path) -> bytes:
    # Read in a child: opening and closing the file here would be harmless now, but keeps
    # this test honest about never touching lock files in a process that may hold them.
    return subprocess.run([sys.executable, "-c", f"import sys; sys.stdout.buffer.write("
                           f"open({str(path)!r}, 'rb').read())"],
                          capture_output=True, check=True).stdout


def test_delete_image_and_layer_renew_the_last_write_tokens(cstore: Podman) -> None:
    junk = image_record(cstore, JUNK)
    base = image_record(cstore, BASE)
    layers_lock = cstore.root / "overlay-layers" / "layers.lock"
    images_lock = cstore.root / "overlay-images" / "images.lock"
    before = token(layers_lock), token(images_lock)
    planned = [
        finding("S8", str(junk["id"]), DeleteImage(str(junk["id"]))),
        finding("S11", str(junk["layer"]), DeleteLayer(str(junk["layer"])), order=1),
        finding("S8", str(base["id"]), DeleteImage(str(base["id"]))),  # a container uses it
    ]
    started_ns = time.time_ns()
    result, lines = run_apply(open_cstore(cstore), planned)
    assert [f.object for f in result.applied] == [junk["id"], junk["layer"]]
    assert len(result.failed) == 1 and "container" in result.failed[0][1]
    for lock, old in zip((layers_lock, images_lock), before, strict=True):
        new = token(lock)
        assert len(new) == LAST_WRITE_SIZE and new != old
        now_ns, _counter, pid = struct.unpack("<QQI", new[:20])
        assert pid == os.getpid() and started_ns <= now_ns <= time.time_ns()
    assert not (cstore.root / "overlay" / str(junk["layer"])).exists()
    assert not (cstore.root / "overlay-images" / str(junk["id"])).exists()
    assert any("dropped image" in line for line in lines)
    names = cstore.run("images", "--format", "{{.Repository}}:{{.Tag}}").split()
    assert names == [BASE]
    assert cstore.run("run", "--rm", BASE, "/bin/cat", "/etc/marker").strip() == "ok"


def test_a_stale_mount_record_is_dropped_and_the_token_renewed(cstore: Podman) -> None:
    base = image_record(cstore, BASE)
    mounts_json = cstore.runroot / "overlay-layers" / "mountpoints.json"
    mounts_json.write_text(json.dumps([{"id": base["layer"], "path": "/nonexistent/merged",
                                        "count": 1}]))
    before = token(cstore.runroot / "overlay-layers" / "mountpoints.lock")
    result, _ = run_apply(open_cstore(cstore), [
        finding("S13", str(base["layer"]), DropMountRecord(str(base["layer"])))])
    assert len(result.applied) == 1
    assert json.loads(mounts_json.read_text()) == []
    assert token(cstore.runroot / "overlay-layers" / "mountpoints.lock") != before


def test_layers_in_use_and_canonical_links_are_refused(cstore: Podman) -> None:
    store = open_cstore(cstore)
    base = image_record(cstore, BASE)
    layer = str(base["layer"])
    link = store.link_name(layer)
    assert link is not None
    planned = [
        finding("S11", layer, DeleteLayer(layer)),  # the base image's top layer
        finding("S6", layer, RemovePath(store.paths.layer_dir(layer))),  # has a record
        finding("S2", f"l/{link}", RemovePath(store.paths.link(link))),  # its own link
        finding("S1", "dangling", CreateSymlink(store.paths.link("NEWLINK"), "../nope/diff")),
        finding("S12", "outside", MakeDir("/tmp/crifs-must-not-exist")),
    ]
    result, _ = run_apply(store, planned)
    assert not result.applied and len(result.failed) == 5
    reasons = " | ".join(why for _, why in result.failed)
    for part in ("top layer of image", "has a record", "own link", "dangle", "outside"):
        assert part in reasons
    assert os.path.isdir(store.paths.layer_diff(layer))
    assert os.readlink(store.paths.link(link)).endswith(f"{layer}/diff")
    assert not os.path.lexists(store.paths.link("NEWLINK"))
    assert layer in {str(x["id"]) for x in json.loads(Path(store.paths.layers_json).read_text())}


def test_layer_deletes_share_two_saves_and_keep_what_is_still_used(cstore: Podman) -> None:
    store = open_cstore(cstore)
    layers_json = Path(store.paths.layers_json)
    base_layer = str(image_record(cstore, BASE)["layer"])
    parent, child, kept_parent, kept_child = (c * 64 for c in "abcd")
    records = json.loads(layers_json.read_text())
    records += [{"id": parent}, {"id": child, "parent": parent}, {"id": kept_parent},
                {"id": kept_child, "parent": kept_parent}]
    layers_json.write_text(json.dumps(records))
    planned = [finding("S11", child, DeleteLayer(child), order=-1),
               finding("S11", parent, DeleteLayer(parent)),
               finding("S11", kept_parent, DeleteLayer(kept_parent)),  # its child stays
               finding("S11", base_layer, DeleteLayer(base_layer))]  # an image's top layer
    result, lines = run_apply(open_cstore(cstore), planned)
    assert sorted(f.object for f in result.applied) == sorted([child, parent])
    reasons = {f.object: why for f, why in result.failed}
    assert f"layer {kept_child} is its child" in reasons[kept_parent]
    assert "top layer of image" in reasons[base_layer]
    assert any(line.startswith("flagged 2 layers incomplete (1 record file save)")
               for line in lines), lines
    assert any(line.startswith("dropped 2 layer records (1 record file save)")
               for line in lines), lines
    after = {str(x["id"]): x for x in json.loads(layers_json.read_text())}
    assert parent not in after and child not in after
    for layer in (kept_parent, kept_child, base_layer):
        assert not after[layer].get("flags"), after[layer]
    assert cstore.run("run", "--rm", BASE, "/bin/cat", "/etc/marker").strip() == "ok"


def test_file_actions_and_findings_gone_under_the_lock(cstore: Podman) -> None:
    store = open_cstore(cstore)
    layer = str(image_record(cstore, BASE)["layer"])
    link = store.link_name(layer)
    assert link is not None
    os.unlink(store.paths.link(link))
    write = finding("S3", layer, WriteFile(store.paths.layer_link_file(layer), link),
                    CreateSymlink(store.paths.link(link), f"../{layer}/diff"))
    gone = finding("S6", "f" * 64, RemovePath(store.paths.layer_dir("f" * 64)))
    lines: list[str] = []
    result = apply(store, [write, gone],
                   reopen=lambda: CStorageStore.open(root=store.root, runroot=store.runroot,
                                                     take_locks=False),
                   check=lambda _: [write], log=lines.append)
    assert result.applied == [write] and result.gone == [gone] and not result.failed
    assert os.readlink(store.paths.link(link)) == f"../{layer}/diff"
    assert any("already up to date" in line for line in lines)
    assert cstore.run("run", "--rm", BASE, "/bin/cat", "/etc/marker").strip() == "ok"


def test_a_killed_delete_is_finished_by_the_next_run(cstore: Podman) -> None:
    junk = image_record(cstore, JUNK)
    layer = str(junk["layer"])
    store = open_cstore(cstore)
    planned = [finding("S8", str(junk["id"]), DeleteImage(str(junk["id"]))),
               finding("S11", layer, DeleteLayer(layer), order=1)]
    # Steps: image_drop, remove image dir, layer_mark, remove l/ link, remove layer dir ...
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.environ["CRIFS_KILL_AT_STEP"] = "5"
        try:
            run_apply(store, planned)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9
    journal = Journal(str(cstore.root))
    unfinished = journal.unfinished()
    assert unfinished is not None
    assert [s["op"] for s in unfinished.remaining()][:1] == ["remove"]
    layers = json.loads((cstore.root / "overlay-layers" / "layers.json").read_text())
    assert next(x for x in layers if x["id"] == layer)["flags"] == {"incomplete": True}

    leftover = cstore.root / "overlay-layers" / f"{fsops.SCRATCH_PREFIX}left"
    leftover.write_text("[]")  # as a kill between write and rename across mounts leaves it

    result, lines = run_apply(open_cstore(cstore), planned)
    assert result.resumed == 4  # the layer dir, tar-split, big-data dir, record
    assert not leftover.exists()
    assert lines[0].startswith("finishing an interrupted repair")
    assert not (cstore.root / "overlay" / layer).exists()
    assert not (cstore.root / ".crifs").exists()
    layers = json.loads((cstore.root / "overlay-layers" / "layers.json").read_text())
    assert layer not in {x["id"] for x in layers}
    assert cstore.run("images", "--format", "{{.Repository}}:{{.Tag}}").split() == [BASE]


def test_refused_while_another_process_holds_layers_lock(cstore: Podman) -> None:
    store = open_cstore(cstore)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'rb'); "
         "fcntl.lockf(f, fcntl.LOCK_SH); print('held', flush=True); time.sleep(60)",
         store.paths.layers_lock], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        orphan = store.paths.layer_dir("e" * 64)
        os.makedirs(orphan)
        with pytest.raises(StoreLocked) as err:
            run_apply(store, [finding("S6", "e" * 64, RemovePath(orphan))], lock_timeout=0.3)
        message = str(err.value)
        assert "layers.lock" in message and f"pid {holder.pid}" in message
        assert "\n" not in message
        assert os.path.isdir(orphan)
        # All or none: nothing of ours is left locked.
        for path in (store.paths.storage_lock, store.paths.images_lock):
            assert os.getpid() not in {h.pid for h in lock_holders(path)}
    finally:
        holder.kill()
        holder.wait()
    result, _ = run_apply(store, [finding("S6", "e" * 64, RemovePath(orphan))])
    assert len(result.applied) == 1 and not os.path.exists(orphan)


# -- containerd ----------------------------------------------------------------------------


def test_containerd_refused_while_the_daemon_runs(containerd: ContainerdDaemon) -> None:
    snapshots = containerd.root / "io.containerd.snapshotter.v1.overlayfs" / "snapshots"
    orphan = snapshots / "424242"
    (orphan / "fs" / "etc").mkdir(parents=True)
    (orphan / "fs" / "etc" / "data").write_bytes(b"d" * 5000)
    store = ContainerdStore.open(root=containerd.root)
    planned = [finding("C1", "424242", RemovePath(str(orphan)), runtime="containerd")]
    with pytest.raises(StoreLocked) as err:
        run_apply(store, planned)
    assert f"pid {containerd.pid}" in str(err.value) and "containerd is running" in str(err.value)
    assert orphan.is_dir()
    containerd.stop()
    result, lines = run_apply(ContainerdStore.open(root=containerd.root), planned)
    assert len(result.applied) == 1 and not orphan.exists()
    assert lines[0].startswith(f"removed {orphan}")
    containerd.start()
    containerd.ctr("snapshots", "ls")


def test_a_check_that_drops_the_write_lock_stops_the_repair(cstore: Podman) -> None:
    """POSIX locks belong to the process: a re-check that opens and closes a lock file
    releases our write lock, and the executor must notice before it changes anything."""
    store = open_cstore(cstore)
    orphan = store.paths.layer_dir("d" * 64)
    os.makedirs(orphan)
    planned = [finding("S6", "d" * 64, RemovePath(orphan))]

    def careless_check(_: Store) -> list[Finding]:
        CStorageStore.open(root=store.root, runroot=store.runroot)  # takes read locks
        return planned

    with pytest.raises(Internal, match="lost the write lock"):
        apply(store, planned, reopen=lambda: store, check=careless_check, log=lambda _: None)
    assert os.path.isdir(orphan)


def test_a_long_lived_podman_service_sees_the_repair(cstore: Podman) -> None:
    """``podman system service`` keeps the store loaded and reloads only when a lock file's
    last-write token changes: an edit without it stays invisible, crifs' repair does not."""
    sock = cstore.base / "api.sock"
    service = subprocess.Popen([*cstore.base_argv(), "system", "service", "--time=0",
                                f"unix://{sock}"], env=cstore.env())
    try:
        deadline = time.monotonic() + 20
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert set(service_images(sock)) == {BASE, JUNK}
        images_json = cstore.root / "overlay-images" / "images.json"
        original = images_json.read_text()
        images_json.write_text(original.replace(JUNK, "example.com/repair/renamed:v1"))
        assert set(service_images(sock)) == {BASE, JUNK}  # no token: the service's cache
        images_json.write_text(original)
        junk = image_record(cstore, JUNK)
        result, _ = run_apply(open_cstore(cstore), [
            finding("S8", str(junk["id"]), DeleteImage(str(junk["id"])))])
        assert len(result.applied) == 1
        assert service_images(sock) == [BASE]
    finally:
        service.terminate()
        service.wait(timeout=20)


def service_images(sock: Path) -> list[str]:
    class UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.connect(str(sock))

    conn = UnixConnection("localhost", timeout=20)
    conn.request("GET", "/v4.0.0/libpod/images/json")
    images = json.loads(conn.getresponse().read())
    conn.close()
    return [str(name) for image in images for name in image.get("Names") or []]


def test_deleting_a_layer_keeps_another_layers_link_its_link_file_names(cstore: Podman) -> None:
    store = open_cstore(cstore)
    base_layer = str(image_record(cstore, BASE)["layer"])
    junk = image_record(cstore, JUNK)
    junk_layer = str(junk["layer"])
    base_link, junk_link = store.link_name(base_layer), store.link_name(junk_layer)
    assert base_link and junk_link
    Path(store.paths.layer_link_file(junk_layer)).write_text(base_link)  # S3: wrong name
    result, lines = run_apply(store, [
        finding("S8", str(junk["id"]), DeleteImage(str(junk["id"]))),
        finding("S11", junk_layer, DeleteLayer(junk_layer), order=1)])
    assert len(result.applied) == 2, result.failed
    assert os.readlink(store.paths.link(base_link)) == f"../{base_layer}/diff"
    assert not os.path.lexists(store.paths.link(junk_link))  # found by its target
    assert any(line.startswith(f"kept {store.paths.link(base_link)}") for line in lines)
    assert cstore.run("run", "--rm", BASE, "/bin/cat", "/etc/marker").strip() == "ok"


def test_refused_while_crio_serves_the_store(cstore: Podman, tmp_path: Path) -> None:
    """A process named ``crio`` whose ``--root`` is this graphroot (a stand-in script: CRI-O
    is not packaged here) makes the repair refuse before any lock is taken."""
    crio = tmp_path / "crio"
    crio.write_text("#!/bin/sh\nsleep 60\n")
    crio.chmod(0o755)
    fake = subprocess.Popen([str(crio), "--root", str(cstore.root)], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{fake.pid}/comm").read_text().strip() != "crio":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(StoreLocked, match=f"crio \\(pid {fake.pid}\\) runs on this store"):
            run_apply(open_cstore(cstore), [])
    finally:
        os.killpg(fake.pid, signal.SIGKILL)  # the script and its sleep
        fake.wait()
