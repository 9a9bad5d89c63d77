"""``crifs check --repair`` / ``gc --apply`` on a RUNNING containerd, through its gRPC API.

Garbage is planted with real containerd operations while the daemon runs (an unpinned view,
a prepared active nothing uses, a stale ``children`` entry made the containerd#11908 way, an
expired lease holding an ``extract-*`` snapshot, the leftovers ``ctr run --rm`` and ``ctr images
import`` leave until GC) and with the files a crash leaves (an orphan snapshot dir, a ``new-*``
temp dir, a blob file no record names). crifs, given the daemon's socket, repairs it all
through the API the way ctr would; the daemon's own GC removes the directories and files.
Then every class is gone, the images are unchanged and every image still runs. The client is
also tested on its own against the real daemon.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from crifs.cli.main import main
from crifs.containerd.client import ApiError, ContainerdClient, DaemonUnavailable, target_of
from crifs.containerd.snapshot_index import (
    GC_TRIGGER,
    GC_TRIGGER_DIGEST,
    calls_of,
    chained,
    commands_of,
    container_remove,
    is_gc_trigger,
    snapshot_prepare,
    snapshot_remove,
)
from crifs.repair.actions import ApiCall
from ocibuild import Entry, build_layout, busybox_available, busybox_layer, layout_to_tar
from runtimes import ContainerdDaemon
from test_fsck_containerd import add_to_lease

pytestmark = pytest.mark.containerd

IMAGES = ("example.com/crifs/one:v1", "example.com/crifs/two:v1")
SNAPSHOTS = Path("io.containerd.snapshotter.v1.overlayfs/snapshots")
BLOBS = Path("io.containerd.content.v1.content/blobs/sha256")
ABANDONED = f"extract-1700000001-d29ybGQ sha256:{hashlib.sha256(b'abandoned').hexdigest()}"
PLANTED_CLASSES = {"C1", "C3", "C6", "C7", "C8", "C9"}


def crifs(capsys: pytest.CaptureFixture[str], daemon: ContainerdDaemon, *argv: str
          ) -> tuple[int, dict, str]:
    code = main(["--runtime", "containerd", "--root", str(daemon.root), "--state",
                 str(daemon.state), "--address", str(daemon.socket), *argv, "-o", "json"])
    out, err = capsys.readouterr()
    assert out, err
    return code, json.loads(out), err


def problems(doc: dict, key: str = "findings") -> list[tuple[str, str | None, str]]:
    return sorted((f["code"], f["namespace"], f["object"]) for f in doc[key]
                  if f["severity"] != "info")


def snap(daemon: ContainerdDaemon, *args: str) -> str:
    return daemon.ctr("snapshots", "--snapshotter", "overlayfs", *args)


def import_images(daemon: ContainerdDaemon, tmp_path: Path) -> None:
    base = busybox_layer(("sh", "true", "cat"))
    layout = tmp_path / "layout"
    build_layout(layout, {
        IMAGES[0]: [base, [Entry("etc/one", "file", b"one\n")]],
        IMAGES[1]: [base, [Entry("etc/two", "file", b"two\n" * 1000)]],
    }, compression="gzip")
    daemon.import_image(layout_to_tar(layout, tmp_path / "layout.tar"), "example.com/crifs")


def committed(daemon: ContainerdDaemon) -> str:
    return next(line.split()[0] for line in snap(daemon, "ls").splitlines()[1:]
                if line.split()[-1] == "Committed")


def plant(daemon: ContainerdDaemon) -> dict[str, Path]:
    """Every planted fault while the daemon runs; the planted files by name."""
    top = committed(daemon)
    # C6: GC removes an unpinned child and leaves it in its parent's children (#11908). A
    # restart then makes containerd forget that it collected once, so it does not collect
    # again after the deletions below (the garbage must stay until crifs looks).
    snap(daemon, "prepare", "w6", top)
    snap(daemon, "commit", "p6", "w6")
    snap(daemon, "prepare", "child6", "p6")
    snap(daemon, "label", "child6", "containerd.io/gc.root=")
    daemon.ctr("leases", "create", "--id", "plant-gc")
    daemon.ctr("leases", "rm", "--sync", "plant-gc")
    daemon.stop()
    daemon.start()
    # C7: an expired lease holding an interrupted pull's extraction snapshot
    daemon.ctr("leases", "create", "--id", "expired1", "--expires", "1s")
    snap(daemon, "prepare", ABANDONED, top)
    snap(daemon, "label", ABANDONED, "containerd.io/gc.root=")
    add_to_lease(daemon, "default", "expired1", "snapshots/overlayfs", ABANDONED)
    snap(daemon, "view", "unpinned-view", top)  # C7: no gc.root label
    snap(daemon, "prepare", "leftover-active", top)  # C9: gc.root, no container
    # C1 and C8 files: what a crash leaves
    root = daemon.root
    orphan = root / SNAPSHOTS / "90210"
    (orphan / "fs" / "var").mkdir(parents=True)
    (orphan / "fs" / "var" / "leak").write_bytes(os.urandom(300_000))
    temp = root / SNAPSHOTS / "new-31337"
    temp.mkdir()
    data = b"orphan blob\n" * 5000
    blob = root / BLOBS / hashlib.sha256(data).hexdigest()
    blob.write_bytes(data)
    time.sleep(1.1)  # let expired1 expire
    return {"orphan": orphan, "temp": temp, "blob": blob}


@pytest.mark.skipif(not busybox_available(), reason="needs busybox-static")
def test_live_repair_through_the_api(containerd: ContainerdDaemon, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    import_images(containerd, tmp_path)
    for ref in IMAGES:  # leaves backend records (C3) until GC runs
        containerd.ctr("run", "--rm", ref, "before-" + ref.split("/")[-1][:3], "/bin/true")
    images_before = containerd.ctr("images", "ls")
    files = plant(containerd)

    code, doc, _ = crifs(capsys, containerd, "check")
    found = problems(doc)
    expected = {("C1", None, "90210"), ("C1", None, "new-31337"),
                ("C6", "default", "p6"), ("C7", "default", "expired1"),
                ("C7", "default", ABANDONED), ("C7", "default", "unpinned-view"),
                ("C8", None, "sha256:" + files["blob"].name),
                ("C9", "default", "leftover-active")}
    assert expected <= set(found), found
    assert {c for c, _, _ in found} <= PLANTED_CLASSES, found
    by_key = {(f["code"], f["namespace"], f["object"]): f for f in doc["findings"]}
    view = by_key[("C7", "default", "unpinned-view")]["repair"]
    assert view["calls"] == [{"service": "snapshots", "method": "Remove",
                              "namespace": "default", "action": "api",
                              "fields": [["snapshotter", "overlayfs"],
                                         ["key", "unpinned-view"]]}]
    orphan_calls = by_key[("C1", None, "90210")]["repair"]["calls"]
    assert orphan_calls and all(is_gc_trigger(ApiCall(**{**c, "fields": tuple(
        map(tuple, c["fields"]))})) for c in orphan_calls)

    started = time.monotonic()
    code, doc, log = crifs(capsys, containerd, "check", "--repair")
    took = time.monotonic() - started
    assert not doc["repair"]["refused"] and not doc["repair"]["failed"], doc["repair"]
    applied = {(a["code"], a["namespace"], a["object"]) for a in doc["repair"]["applied"]}
    assert set(found) <= applied | {(g["code"], g["namespace"], g["object"])
                                    for g in doc["repair"]["gone"]}
    assert expected <= applied
    assert "repairing through its API at unix://" in log
    assert "removed snapshot unpinned-view (overlayfs, namespace default)" in log
    assert "deleted lease crifs-gc-trigger (namespace default) and ran containerd's GC" in log
    assert took < 30

    # containerd's GC ran synchronously; allow a moment for anything it schedules after
    deadline = time.monotonic() + 5
    while problems(doc, "remaining") and time.monotonic() < deadline:
        time.sleep(0.3)
        _, doc, _ = crifs(capsys, containerd, "check")
        doc["remaining"] = doc["findings"]
    assert problems(doc, "remaining") == []
    assert code in (0, 1)
    assert not any(p.exists() for p in files.values())
    assert not any(e.name.startswith("new-") or e.name == GC_TRIGGER
                   for e in os.scandir(containerd.root / SNAPSHOTS))
    assert GC_TRIGGER not in containerd.ctr("leases", "ls")
    assert containerd.ctr("images", "ls") == images_before
    for ref in IMAGES:
        name = ref.split("/")[-1][:3]
        assert containerd.ctr("run", "--rm", ref, "after-" + name, "/bin/cat",
                              f"/etc/{name}").strip()
    # gc --apply goes the same way: a new unpinned view and an orphan dir. (The restart stops
    # the GC containerd now schedules after every deletion from collecting them first.)
    containerd.stop()
    containerd.start()
    snap(containerd, "view", "another-view", committed(containerd))
    (containerd.root / SNAPSHOTS / "4242").mkdir()
    code, doc, _ = crifs(capsys, containerd, "gc", "--apply")
    assert code == 0, doc
    assert {(a["code"], a["object"]) for a in doc["repair"]["applied"]} >= {
        ("C7", "another-view"), ("C1", "4242")}
    assert not (containerd.root / SNAPSHOTS / "4242").exists()
    _, doc, _ = crifs(capsys, containerd, "check")
    assert problems(doc) == []


def test_refused_when_the_socket_does_not_answer(containerd: ContainerdDaemon, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    snap(containerd, "prepare", "work")
    snap(containerd, "commit", "base", "work")
    snap(containerd, "view", "unpinned", "base")  # C7: would be removed through the API
    wrong = tmp_path / "no.sock"
    code = main(["--runtime", "containerd", "--root", str(containerd.root), "--address",
                 str(wrong), "check", "--repair", "-o", "json"])
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert code & 8
    (refused,) = doc["repair"]["refused"]
    assert "containerd is running" in refused["error"] and str(wrong) in refused["error"]
    assert "\n" not in refused["error"]
    assert "run: ctr -n default snapshots --snapshotter overlayfs rm unpinned" in err
    assert "unpinned" in snap(containerd, "ls")


def test_a_mounted_snapshot_is_not_removed(containerd: ContainerdDaemon, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """An active snapshot no container uses (C9) but someone mounted by hand: removing it
    would let containerd's Cleanup delete the directories under the mount."""
    snap(containerd, "prepare", "work")
    snap(containerd, "commit", "base", "work")
    snap(containerd, "prepare", "in-use", "base")
    target = tmp_path / "mnt"
    target.mkdir()
    subprocess.run(["sh", "-c", snap(containerd, "mounts", str(target), "in-use")], check=True)
    try:
        code, doc, _ = crifs(capsys, containerd, "check", "--repair")
        failed = {(f["code"], f["object"]): f["error"] for f in doc["repair"]["failed"]}
        assert "overlay mount at " + str(target) in failed[("C9", "in-use")]
        assert code & 8
        assert "in-use" in snap(containerd, "ls")
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_client_against_the_daemon(containerd: ContainerdDaemon) -> None:
    """Each call as ctr makes it; NotFound on a delete and AlreadyExists on a create are
    success (False), other refusals are one-line ApiErrors with the gRPC code."""
    with ContainerdClient(str(containerd.socket), timeout=5) as client:
        version, revision = client.version()
        assert version.startswith(("1.", "2.", "v")) and revision is not None
        assert client.prepare_snapshot("ns-b", "overlayfs", "s1") is True
        assert client.prepare_snapshot("ns-b", "overlayfs", "s1") is False
        info = client.stat_snapshot("ns-b", "overlayfs", "s1")
        assert info is not None and info.kind == "Active" and info.name == "s1"
        assert client.stat_snapshot("default", "overlayfs", "s1") is None  # other namespace
        assert client.remove_snapshot("ns-b", "overlayfs", "s1") is True
        assert client.remove_snapshot("ns-b", "overlayfs", "s1") is False

        digest, made = client.write_content("default", "ref-x", b"hello\n")
        assert made and digest == "sha256:" + hashlib.sha256(b"hello\n").hexdigest()
        assert client.write_content("default", "ref-x", b"hello\n") == (digest, False)
        assert client.content_info("default", digest) == 6
        assert client.delete_content("default", digest) is True
        assert client.delete_content("default", digest) is False
        assert client.content_info("default", digest) is None

        with pytest.raises(ApiError) as refused:
            client.prepare_snapshot("default", "overlayfs", "k", parent="no-such-parent")
        assert refused.value.code == "NOT_FOUND" and "\n" not in str(refused.value)
        with pytest.raises(ApiError) as unknown:
            client.remove_snapshot("default", "no-such-snapshotter", "k")
        assert unknown.value.code == "INVALID_ARGUMENT"
        line = client.run(ApiCall("content", "Delete", "default",
                                  (("digest", GC_TRIGGER_DIGEST),)))
        assert "already gone" in line
        # last: after containerd's first GC it collects after every deletion, which would
        # race the unreferenced blob and snapshot above
        assert client.create_lease("default", "lease-a") is True
        assert client.create_lease("default", "lease-a") is False  # AlreadyExists = done
        assert "lease-a" in client.list_leases("default")
        assert "lease-a" in containerd.ctr("leases", "ls")
        assert client.delete_lease("default", "lease-a", sync=True) is True
        assert client.delete_lease("default", "lease-a") is False  # NotFound = done
        assert "lease-a" not in containerd.ctr("leases", "ls")

    missing = containerd.base / "missing.sock"
    with ContainerdClient(str(missing), timeout=2) as client, \
            pytest.raises(DaemonUnavailable) as err:
        client.version()
    assert target_of(str(missing)) in str(err.value) and "\n" not in str(err.value)


def test_commands_and_calls_come_from_one_description() -> None:
    op = chained(snapshot_prepare("default", "overlayfs", "child", "parent"),
                 snapshot_remove("default", "overlayfs", "child"))
    assert commands_of([op]) == ("ctr -n default snapshots --snapshotter overlayfs prepare "
                                 "child parent && ctr -n default snapshots --snapshotter "
                                 "overlayfs rm child",)
    assert [(c.service, c.method, dict(c.fields)) for c in calls_of([op])] == [
        ("snapshots", "Prepare", {"snapshotter": "overlayfs", "key": "child",
                                  "parent": "parent"}),
        ("snapshots", "Remove", {"snapshotter": "overlayfs", "key": "child"})]
    # a removal that needs ctr containers rm has no API equivalent: no calls at all
    with_container = [container_remove("k8s.io", "c1"), snapshot_remove("k8s.io", "ovl", "k")]
    assert calls_of(with_container) == () and len(commands_of(with_container)) == 2
