"""``crifs check --repair`` end to end on a real containerd store, through the CLI.

Garbage is made with real containerd operations (an unpinned view GC has not collected, a
prepared active nothing uses) and with the files a crash leaves (an orphan snapshot dir, a
``new-*`` temp dir, a blob file no record names). With the daemon running, the repair refuses
and changes nothing. With it stopped, crifs removes the file-level garbage itself and prints
``ctr`` commands for the records; those commands are run against the restarted daemon. Then
every image still runs (``ctr run --rm``), the referenced snapshot dirs are byte-identical, the
freed bytes equal the planted ones and a second check is clean.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import time
from pathlib import Path

import pytest

from crifs.cli.main import main
from ocibuild import Entry, build_layout, busybox_available, busybox_layer, layout_to_tar
from runtimes import ContainerdDaemon, RuntimeCommandError

pytestmark = pytest.mark.containerd

IMAGES = ("example.com/crifs/one:v1", "example.com/crifs/two:v1")
SNAPSHOTS = Path("io.containerd.snapshotter.v1.overlayfs/snapshots")
BLOBS = Path("io.containerd.content.v1.content/blobs/sha256")


def crifs(capsys: pytest.CaptureFixture[str], daemon: ContainerdDaemon, *argv: str
          ) -> tuple[int, dict]:
    code = main(["--runtime", "containerd", "--root", str(daemon.root), "--state",
                 str(daemon.state), *argv, "-o", "json"])
    out, err = capsys.readouterr()
    assert out, err
    return code, json.loads(out)


def dir_digest(root: Path) -> str:
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath, name)
            h.update(str(p).encode())
            h.update(os.readlink(p).encode() if p.is_symlink() else p.read_bytes())
    return h.hexdigest()


def du_bytes(*paths: Path) -> int:
    seen: set[tuple[int, int]] = set()
    total = 0
    for top in paths:
        st = os.lstat(top)
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
        for dirpath, dirnames, filenames in os.walk(top):
            for name in [".", *dirnames, *filenames]:
                st = os.lstat(os.path.join(dirpath, name))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


def run_commands(daemon: ContainerdDaemon, findings: list[dict]) -> None:
    """Run each finding's suggested ctr commands against the daemon, children first.

    Any removal triggers containerd's GC, which may collect what a later command names: that
    command then says "not found", and the object is gone as asked.
    """
    for f in sorted(findings, key=lambda f: f["repair"]["order"] if f["repair"] else 0):
        for command in (f["repair"] or {}).get("commands", []):
            for part in command.split(" && "):
                argv = shlex.split(part)
                assert argv[0] == "ctr", command
                ns = "default"
                if argv[1] == "-n":
                    ns, argv = argv[2], argv[3:]
                else:
                    argv = argv[1:]
                try:
                    daemon.ctr(*argv, namespace=ns)
                except RuntimeCommandError as err:
                    assert "not found" in str(err).split("\n")[0], err


@pytest.mark.skipif(not busybox_available(), reason="needs busybox-static")
def test_repair_keeps_every_image_running(containerd: ContainerdDaemon, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    base = busybox_layer(("sh", "true", "cat"))
    layout = tmp_path / "layout"
    build_layout(layout, {
        IMAGES[0]: [base, [Entry("etc/one", "file", b"one\n")]],
        IMAGES[1]: [base, [Entry("etc/two", "file", b"two\n" * 1000)]],
    }, compression="gzip")
    tar = layout_to_tar(layout, tmp_path / "layout.tar")
    containerd.import_image(tar, "example.com/crifs")
    for ref in IMAGES:
        containerd.ctr("run", "--rm", ref, "before-" + ref.split("/")[-1][:3], "/bin/true")
    top = containerd.ctr("snapshots", "ls").split()[-3]  # any committed key works as parent
    containerd.ctr("snapshots", "view", "unpinned-view", top)  # no gc.root: GC garbage (C7)
    containerd.ctr("snapshots", "prepare", "leftover-active", top)  # gc.root, no container (C9)

    root = containerd.root
    orphan = root / SNAPSHOTS / "90210"
    (orphan / "fs" / "var").mkdir(parents=True)
    (orphan / "fs" / "var" / "leak").write_bytes(os.urandom(300_000))
    os.link(orphan / "fs" / "var" / "leak", orphan / "fs" / "var" / "leak-again")
    temp = root / SNAPSHOTS / "new-31337"
    temp.mkdir()
    data = b"orphan blob\n" * 5000
    blob = root / BLOBS / hashlib.sha256(data).hexdigest()
    blob.write_bytes(data)
    planted = du_bytes(orphan, temp, blob)

    # With the daemon running: refused (it holds meta.db), nothing changes.
    code, doc = crifs(capsys, containerd, "check", "--repair")
    assert code & 8, doc
    assert doc["repair"]["refused"] and not doc["repair"]["applied"]
    assert orphan.exists() and temp.exists() and blob.exists()

    containerd.stop()
    referenced = {p.name: dir_digest(p) for p in (root / SNAPSHOTS).iterdir()
                  if p not in (orphan, temp)}

    code, doc = crifs(capsys, containerd, "check", "--repair")
    assert code == 4, doc  # the records are left for ctr
    applied = {(a["code"], a["object"]) for a in doc["repair"]["applied"]}
    assert ("C1", "90210") in applied and ("C1", "new-31337") in applied
    assert ("C8", "sha256:" + blob.name) in applied
    assert not orphan.exists() and not temp.exists() and not blob.exists()
    freed = sum(f["reclaimable"]["disk_bytes"] for f in doc["findings"]
                if (f["code"], f["object"]) in applied)
    assert freed == planted
    # C3 (the --rm containers' backend records) and C8 (the imported index blob) are real
    # garbage too: the test daemon defers GC, so nothing collected them yet.
    # R1 info: the test harness makes its dirs 0755 (info only; exit code unchanged).
    left = {f["code"] for f in doc["remaining"] if f["severity"] != "info"}
    assert left <= {"C3", "C7", "C8", "C9"}, doc["remaining"]
    assert all(f["repair"]["commands"] for f in doc["remaining"] if f["code"] in left)
    assert {p.name: dir_digest(p) for p in (root / SNAPSHOTS).iterdir()
            if p.name in referenced} == referenced

    containerd.start()
    for ref in IMAGES:
        assert ref in containerd.ctr("images", "ls", "-q").split()
        containerd.ctr("run", "--rm", ref, "after-" + ref.split("/")[-1][:3], "/bin/cat",
                       "/etc/" + ref.split("/")[-1][:3])
    # The commands' removals trigger containerd's GC, which also collects the --rm runs'
    # snapshots just made, in the background, and (containerd#11908) leaves stale children
    # entries (C6) behind: follow crifs's commands round by round until nothing is left.
    run_commands(containerd, [f for f in doc["remaining"] if f["code"] in left])
    deadline = time.monotonic() + 30
    while True:
        code, doc = crifs(capsys, containerd, "check")
        found = [f for f in doc["findings"] if f["severity"] != "info"]
        problems = [(f["code"], f["object"]) for f in found]
        if not problems or time.monotonic() > deadline:
            break
        time.sleep(0.5)
        code, doc = crifs(capsys, containerd, "check")  # after GC settled
        run_commands(containerd, [f for f in doc["findings"] if f["severity"] != "info"])
    assert problems == []
    containerd.stop()
    code, doc = crifs(capsys, containerd, "check")
    assert code == 0, [(f["code"], f["object"], f["message"]) for f in doc["findings"]]
