"""read_layer_dir: kinds, hard-link groups, overlay whiteouts and opaque dirs, unsafe roots,
unreadable parts, mounts inside the tree, and a timed walk."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crifs.errors import BadInput, NotFound, UnsafePath
from crifs.fs.listing import PLAIN_DIR, PLAIN_FILE, Entry, EntryKind
from crifs.fs.walk import MAX_EXAMPLES, read_layer_dir

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mknod, trusted.* xattrs)")


def walk(path: Path | bytes, **kw: object):  # noqa: ANN201 - LayerListing
    return read_layer_dir(path, index=1, name="layer 1 test", ident="id1", **kw)  # type: ignore[arg-type]


def test_kinds_names_and_targets(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "usr" / "lib" / "libc.so.6").write_bytes(b"\x7fELF")
    (root / "lib").symlink_to("usr/lib")
    (root / "usr" / "lib" / "dangling").symlink_to("/nowhere/at/all")
    long_target = ("a/" * 2047 + "b")[:4095]
    (root / "long").symlink_to(long_target)
    os.mkfifo(root / "fifo")
    raw_root = os.fsencode(root)
    os.mkdir(raw_root + b"/caf\xe9")
    os.symlink(b"\xff\xfe", raw_root + b"/caf\xe9/l\xe9")
    listing = walk(root)
    entries = listing.entries
    assert listing.index == 1 and listing.ident == "id1" and listing.source == str(root)
    assert entries[b"usr"] is PLAIN_DIR and entries[b"usr/lib/libc.so.6"] is PLAIN_FILE
    assert entries[b"lib"].kind is EntryKind.SYMLINK and entries[b"lib"].target == b"usr/lib"
    assert entries[b"usr/lib/dangling"].target == b"/nowhere/at/all"
    assert entries[b"long"].target == long_target.encode() and len(long_target) == 4095
    assert entries[b"fifo"].kind is EntryKind.FIFO
    assert entries[b"caf\xe9/l\xe9"].target == b"\xff\xfe"
    assert b"" not in entries and not listing.problems and not listing.whiteouts


def test_hard_link_groups(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "a").write_bytes(b"x")
    os.link(root / "a", root / "b")
    os.link(root / "a", root / "c")
    (root / "solo").write_bytes(b"y")
    outside = tmp_path / "outside"
    outside.write_bytes(b"z")
    os.link(outside, root / "linked-out")
    for mode in ("groups", "all"):
        entries = walk(root, hardlinks=mode).entries
        group = [entries[k] for k in (b"a", b"b", b"c")]
        assert all(e.kind is EntryKind.FILE and e.nlink == 3 for e in group)
        assert len({e.inode for e in group}) == 1 and group[0].inode is not None
        assert entries[b"solo"] is PLAIN_FILE
    # a link to a file outside the layer shows only when every file is stat'ed
    assert walk(root).entries[b"linked-out"] is PLAIN_FILE
    assert walk(root, hardlinks="all").entries[b"linked-out"].nlink == 2
    off = walk(root, hardlinks="off").entries
    assert all(off[k] is PLAIN_FILE for k in (b"a", b"b", b"c", b"linked-out"))
    with pytest.raises(BadInput, match="unknown hard-link mode"):
        walk(root, hardlinks="yes")



def test_hard_link_groups_across_directories_match_a_full_stat(tmp_path: Path) -> None:
    """Groups found from directory-entry inode numbers (in any order, across directories)
    are the ones an lstat of every file finds, and their members are lstat-ed exactly."""
    root = tmp_path / "root"
    for d in ("a", "b/c", "d"):
        (root / d).mkdir(parents=True)
    for i in range(30):
        (root / "a" / f"f{i}").write_bytes(b"x")
    os.link(root / "a" / "f7", root / "b" / "c" / "seven")
    os.link(root / "a" / "f7", root / "d" / "also-seven")
    os.link(root / "a" / "f29", root / "a" / "twenty-nine")
    (root / "b" / "c" / "one").write_bytes(b"y")
    os.link(root / "b" / "c" / "one", root / "one")
    (root / "d" / "link").symlink_to("../a/f7")
    grouped, stat_all = walk(root).entries, walk(root, hardlinks="all").entries
    assert grouped == stat_all
    assert {k for k, e in grouped.items() if e.nlink > 1} == {
        b"a/f7", b"b/c/seven", b"d/also-seven", b"a/f29", b"a/twenty-nine", b"b/c/one",
        b"one"}
    assert grouped[b"a/f7"].nlink == 3 and grouped[b"one"].nlink == 2
    assert grouped[b"a/f0"] is PLAIN_FILE and grouped[b"d/link"].target == b"../a/f7"


def test_symlink_entries_are_ordinary_entries(tmp_path: Path) -> None:
    """Symlink entries are built without the dataclass constructor (speed): they must be the
    same values, hashable and frozen."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "l").symlink_to(b"\xff/target")  # type: ignore[arg-type]
    made = walk(root).entries[b"l"]
    expected = Entry(EntryKind.SYMLINK, b"\xff/target")
    assert type(made) is Entry and made == expected and hash(made) == hash(expected)
    assert repr(made) == repr(expected)
    with pytest.raises(AttributeError):
        made.target = b"other"  # type: ignore[misc]

@needs_root
def test_overlay_whiteouts_and_opaque_dirs(tmp_path: Path) -> None:
    root = tmp_path / "upper"
    (root / "etc").mkdir(parents=True)
    os.mknod(root / "etc" / "motd", 0o600 | 0o020000, os.makedev(0, 0))  # whiteout
    os.mknod(root / "null", 0o666 | 0o020000, os.makedev(1, 3))  # a real device
    (root / "var" / "cache").mkdir(parents=True)
    (root / "var" / "cache" / "new").write_bytes(b"")
    os.setxattr(root / "var" / "cache", "trusted.overlay.opaque", b"y")
    (root / "home").mkdir()
    os.setxattr(root / "home", "user.overlay.opaque", b"y")
    # xattr whiteouts: only in a directory marked overlay.opaque=x
    xdir = root / "opt"
    xdir.mkdir()
    os.setxattr(xdir, "trusted.overlay.opaque", b"x")
    (xdir / "gone").write_bytes(b"")
    os.setxattr(xdir / "gone", "trusted.overlay.whiteout", b"")
    (xdir / "kept").write_bytes(b"")
    (root / "plain").write_bytes(b"")
    os.setxattr(root / "plain", "trusted.overlay.whiteout", b"")  # parent not marked: a file
    listing = walk(root)
    assert listing.whiteouts == {b"etc/motd", b"opt/gone"}
    assert listing.opaque == {b"var/cache", b"home"}
    assert listing.entries[b"null"].kind is EntryKind.CHAR
    assert b"etc/motd" not in listing.entries and b"opt/gone" not in listing.entries
    assert listing.entries[b"opt/kept"] is PLAIN_FILE
    assert listing.entries[b"plain"] is PLAIN_FILE
    assert listing.entries[b"var/cache/new"] is PLAIN_FILE
    # as a plain rootfs the same tree has devices and no deletions
    rootfs = walk(root, overlay=False)
    assert not rootfs.whiteouts and not rootfs.opaque
    assert rootfs.entries[b"etc/motd"].kind is EntryKind.CHAR
    assert rootfs.entries[b"opt/gone"] is PLAIN_FILE


def test_unsafe_missing_and_non_directory_roots(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real)
    with pytest.raises(UnsafePath) as caught:
        walk(tmp_path / "alias")
    assert str(caught.value) == (f"{tmp_path / 'alias'}: is a symlink; crifs does not follow "
                                 f"symlinks, pass the real path instead: {real}")
    with pytest.raises(NotFound):
        walk(tmp_path / "missing")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(BadInput, match="is not a directory"):
        walk(tmp_path / "file")
    assert walk(os.fsencode(real)).entries == {}


@needs_root
def test_unreadable_directories_are_problems_not_crashes(tmp_path: Path) -> None:
    """Walk as root without CAP_DAC_OVERRIDE/READ_SEARCH (setpriv): another user's 0700
    directory cannot be listed, as for an unprivileged crifs."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    root = tmp_path / "tree"
    (root / "open").mkdir(parents=True)
    (root / "open" / "f").write_bytes(b"")
    (root / "closed").mkdir()
    (root / "closed" / "secret").write_bytes(b"")
    os.chown(root / "closed", 65534, 65534)
    os.chmod(root / "closed", 0o700)
    code = ("import sys, json; from crifs.fs.walk import read_layer_dir; "
            "l = read_layer_dir(sys.argv[1], index=0, name='x'); "
            "print(json.dumps([sorted(k.decode() for k in l.entries), l.problems]))")
    out = subprocess.run([setpriv, "--bounding-set=-dac_override,-dac_read_search",
                          sys.executable, "-c", code, str(root)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    entries, problems = json.loads(out.stdout)
    assert entries == ["closed", "open", "open/f"]
    assert problems == ["cannot list /closed: Permission denied; its contents are not audited"]


@needs_root
def test_mounts_inside_the_tree_are_not_entered(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "proc").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(root / "proc")], check=True)
    try:
        (root / "proc" / "inside").write_bytes(b"")
        listing = walk(root, overlay=False)
    finally:
        subprocess.run(["umount", str(root / "proc")], check=True)
    assert listing.entries[b"proc"] is PLAIN_DIR
    assert b"proc/inside" not in listing.entries
    assert listing.problems == ["/proc is another filesystem mounted here; not descended into"]


def test_problem_count_is_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    root.mkdir()
    for i in range(MAX_EXAMPLES + 5):
        (root / f"l{i}").symlink_to("x")

    def failing_readlink(path: object) -> bytes:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "readlink", failing_readlink)
    listing = walk(root)
    assert len(listing.problems) == MAX_EXAMPLES + 1
    assert listing.problems[0].endswith(": Permission denied; left out")
    assert listing.problems[-1] == "... and 5 more problems of the same kind (unreadable)"


def test_timed_walk_of_100k_entries(tmp_path: Path) -> None:
    """Prints time and peak RSS of a 100k-entry walk (1M-entry figures are in the report)."""
    root = tmp_path / "big"
    root.mkdir()
    made = 0
    for d in range(500):
        sub = root / f"d{d:03d}"
        sub.mkdir()
        for f in range(180):
            (sub / f"f{f}").touch()
        for s in range(20):
            (sub / f"l{s}").symlink_to(f"../d{(d + 1) % 500:03d}/f{s}")
        made += 201
    start = time.perf_counter()
    listing = walk(root)
    elapsed = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    assert len(listing.entries) == made
    print(f"\nwalk of {made} entries: {elapsed:.2f} s, process peak RSS {rss} MB")
    assert elapsed < 10


def _mixed_tree(root: Path, dirs: int = 40) -> None:
    """Dirs several levels deep with files, symlinks, hard links across subtrees, a FIFO."""
    for d in range(dirs):
        sub = root / f"top{d % 4}" / f"mid{d % 7}" / f"d{d}"
        sub.mkdir(parents=True, exist_ok=True)
        for f in range(12):
            (sub / f"f{f}").write_bytes(b"x")
        (sub / "up").symlink_to(f"../../../top{(d + 1) % 4}")
        (sub / "gone").symlink_to("missing")
        raw = os.fsencode(sub)
        os.symlink(b"\xff\xfe", raw + b"/odd\xe9")
    os.link(root / "top0" / "mid0" / "d0" / "f1", root / "top3" / "mid6" / "d27" / "also-f1")
    os.link(root / "top1" / "mid1" / "d1" / "f2", root / "top1" / "mid1" / "d1" / "f2-again")
    os.mkfifo(root / "top2" / "fifo")


def _same_listing(a, b) -> None:  # noqa: ANN001
    assert a.entries == b.entries
    assert a.notable == b.notable
    assert a.notable == {k: e for k, e in a.entries.items() if e not in (PLAIN_FILE, PLAIN_DIR)}
    assert (a.whiteouts, a.opaque, a.dirs_complete) == (b.whiteouts, b.opaque, True)
    assert sorted(a.problems) == sorted(b.problems)


@pytest.mark.parametrize("mode", ["groups", "all", "off"])
def test_two_process_walk_gives_the_one_process_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """A forked helper walks part of the tree (hard links across the two parts included)."""
    from crifs.fs import walk as walk_module

    root = tmp_path / "root"
    _mixed_tree(root)
    monkeypatch.setattr(walk_module, "PARALLEL_AFTER", 0)
    alone = walk(root, hardlinks=mode)
    started: list[object] = []
    real_start = walk_module.ForkedJob.start

    def counting_start(job):  # noqa: ANN001, ANN202
        job_handle = real_start(job)
        started.append(job_handle)
        return job_handle

    monkeypatch.setattr(walk_module.ForkedJob, "start", staticmethod(counting_start))
    monkeypatch.setattr(walk_module, "PARALLEL_AFTER", 1)
    monkeypatch.setattr(walk_module, "_PARALLEL_TASKS", 4)  # the four top-level dirs
    shared = walk(root, hardlinks=mode)
    assert started and started[0] is not None
    _same_listing(shared, alone)
    if mode != "off":
        assert shared.entries[b"top3/mid6/d27/also-f1"].nlink == 2


def test_a_failed_helper_leaves_its_part_to_the_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from crifs.fs import walk as walk_module

    root = tmp_path / "root"
    _mixed_tree(root)
    monkeypatch.setattr(walk_module, "PARALLEL_AFTER", 0)
    alone = walk(root)
    monkeypatch.setattr(walk_module, "PARALLEL_AFTER", 1)
    monkeypatch.setattr(walk_module, "_PARALLEL_TASKS", 4)

    ran = tmp_path / "helper-ran"

    def broken_export(self, done, **kw):  # noqa: ANN001, ANN003, ANN202 - in the helper only
        ran.write_text(str(os.getpid()))
        raise RuntimeError("helper dies")

    monkeypatch.setattr(walk_module._Walker, "export", broken_export)
    _same_listing(walk(root), alone)
    assert int(ran.read_text()) != os.getpid()


def test_a_helper_failing_midway_leaves_the_rest_to_the_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the helper sent before it failed is kept; the tasks it did not send are walked
    by the parent (each exactly once)."""
    from crifs.fs import walk as walk_module

    root = tmp_path / "root"
    _mixed_tree(root, dirs=80)
    monkeypatch.setattr(walk_module, "PARALLEL_AFTER", 0)
    alone = walk(root)
    monkeypatch.setattr(walk_module, "PARALLEL_AFTER", 1)
    monkeypatch.setattr(walk_module, "_PARALLEL_TASKS", 28)  # the mid-level dirs
    real_export = walk_module._Walker.export
    calls: list[int] = []

    def export_once(self, done, **kw):  # noqa: ANN001, ANN003, ANN202 - in the helper only
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("helper dies after one task")
        return real_export(self, done, **kw)

    monkeypatch.setattr(walk_module._Walker, "export", export_once)
    _same_listing(walk(root), alone)


def test_problems_of_both_processes_are_counted_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from crifs.fs import walk as walk_module

    root = tmp_path / "root"
    _mixed_tree(root)

    def failing_readlink(path: object) -> bytes:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "readlink", failing_readlink)
    monkeypatch.setattr(walk_module, "PARALLEL_AFTER", 0)
    alone = walk(root)
    monkeypatch.setattr(walk_module, "PARALLEL_AFTER", 1)
    monkeypatch.setattr(walk_module, "_PARALLEL_TASKS", 4)
    shared = walk(root)
    assert len(shared.problems) == MAX_EXAMPLES + 1
    assert shared.problems[-1] == alone.problems[-1] == (
        f"... and {3 * 40 - MAX_EXAMPLES} more problems of the same kind (unreadable)")
    assert shared.entries == alone.entries


def test_forked_job_chunks_failure_and_kill() -> None:
    from crifs.fs.forked import ForkedJob

    def chatty(send):  # noqa: ANN001, ANN202
        for i in range(3):
            send(b"chunk %d " % i + b"x" * 100_000)
        return str(os.getpid()).encode()

    job = ForkedJob.start(chatty)
    assert job is not None
    taken: list[bytes] = []
    deadline = time.perf_counter() + 10
    while len(taken) < 3 and time.perf_counter() < deadline:
        taken += job.chunks()  # whole chunks only, never waiting
    rest = job.finish()
    assert rest is not None
    every = taken + rest  # the last one may have come with the others
    assert len(every) == 4 and int(every[3]) != os.getpid()
    assert [c[:8] for c in every[:3]] == [b"chunk 0 ", b"chunk 1 ", b"chunk 2 "]
    assert all(len(c) == 100_008 for c in every[:3])

    def failing(send):  # noqa: ANN001, ANN202
        send(b"whole")
        raise ValueError("no")

    failed = ForkedJob.start(failing)
    assert failed is not None and failed.finish() is None

    slow = ForkedJob.start(lambda send: time.sleep(60) or b"")  # type: ignore[func-returns-value]
    assert slow is not None
    started = time.perf_counter()
    slow.kill()
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize("parallel_after", [0, 1])
def test_progress_reports_entries_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parallel_after: int
) -> None:
    """Told now and then while one process or two walk, and the total at the end; a helper
    never calls it (it would draw from another process)."""
    from crifs.fs import walk as walk_module

    root = tmp_path / "root"
    _mixed_tree(root)
    monkeypatch.setattr(walk_module, "PARALLEL_AFTER", parallel_after)
    monkeypatch.setattr(walk_module, "PROGRESS_DIRS", 8)
    monkeypatch.setattr(walk_module, "_PARALLEL_TASKS", 4)
    parent = os.getpid()
    log = tmp_path / "progress.log"  # a file: calls made in a helper would show up too

    def tell(seen: int) -> None:
        with log.open("a") as out:
            out.write(f"{os.getpid()} {seen}\n")

    listing = walk(root, progress=tell)
    told = [tuple(map(int, line.split())) for line in log.read_text().splitlines()]
    assert len(told) > 2
    assert {pid for pid, _ in told} == {parent}
    counts = [seen for _, seen in told]
    assert counts == sorted(counts) and counts[-1] == len(listing.entries)
