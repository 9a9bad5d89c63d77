"""The bolt reader and writer against the real thing: the bbolt Go library and containerd.

The Go helper in ``tests/bolt_go`` is built once per session from Debian's packaged bbolt
(``golang-go``, ``golang-github-coreos-bbolt-dev``), offline. Tests skip when it cannot be
built; the containerd test skips without root or the containerd packages.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from crifs.containerd.bolt import Bucket, open_bolt
from crifs.containerd.boltwrite import write_bolt
from crifs.containerd.encoding import (
    encode_uvarint,
    encode_varint,
    read_gotime,
    read_uvarint,
    read_varint,
)
from runtimes import ContainerdDaemon

GO_SOURCE = Path(__file__).parent / "bolt_go"
GOPATH = "/usr/share/gocode"
BBOLT_SOURCE = Path(GOPATH) / "src" / "go.etcd.io" / "bbolt"


class BoltCheck:
    """The built Go helper: dump/gen/mutate/gotime/varint with the real bbolt."""

    def __init__(self, binary: Path) -> None:
        self.binary = binary

    def run(self, *args: object) -> str:
        proc = subprocess.run([str(self.binary), *map(str, args)], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, f"boltcheck {args[0]} failed: {proc.stderr.strip()}"
        return proc.stdout

    def dump(self, *paths: Path) -> list[dict[str, object]]:
        return json.loads(self.run("dump", *paths))  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def boltcheck(tmp_path_factory: pytest.TempPathFactory) -> BoltCheck:
    go = shutil.which("go")
    if go is None:
        pytest.skip("bbolt cross-checks: no `go` (apt-get install golang-go)")
    if not BBOLT_SOURCE.is_dir():
        pytest.skip(f"bbolt cross-checks: no bbolt source at {BBOLT_SOURCE} "
                    "(apt-get install golang-github-coreos-bbolt-dev)")
    out = tmp_path_factory.mktemp("boltcheck")
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": GOPATH, "GOCACHE": str(out / "cache"),
           "GOFLAGS": "", "CGO_ENABLED": "0"}
    proc = subprocess.run([go, "build", "-o", str(out / "boltcheck"), "."], cwd=GO_SOURCE,
                          env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"building tests/bolt_go failed:\n{proc.stderr}")
    return BoltCheck(out / "boltcheck")


def as_dump(bucket: Bucket, *, sequence: int | None = None) -> dict[str, object]:
    """Our view of a bucket in the Go helper's JSON shape."""
    items: list[dict[str, object]] = []
    for key, value in bucket.items():
        if isinstance(value, Bucket):
            items.append({"k": key.hex(), "b": as_dump(value)})
        else:
            items.append({"k": key.hex(), "v": value.hex()})
    return {"seq": bucket.sequence if sequence is None else sequence, "items": items}


def assert_same_as_bbolt(boltcheck: BoltCheck, *paths: Path) -> None:
    for path, dumped in zip(paths, boltcheck.dump(*paths), strict=True):
        assert dumped["check"] == [], f"bbolt Check on {path}: {dumped['check']}"
        ours = open_bolt(path)
        assert (ours.page_size, ours.txid) == (dumped["page_size"], dumped["txid"])
        # bbolt has no public accessor for the root bucket's sequence; Go reports 0.
        assert as_dump(ours.root, sequence=0) == dumped["root"], f"{path} differs"


def random_tree(rng: random.Random, depth: int = 0) -> dict[bytes, Any]:
    """A few hundred entries at most: nested, inline-sized, big and empty values."""
    tree: dict[bytes, Any] = {}
    width = rng.choice([3, 10] if depth == 0 else [0, 1, 3, 10, 40] + [300] * (depth == 1))
    for _ in range(width):
        key = rng.randbytes(rng.randint(1, 24))
        roll = rng.random()
        if roll < 0.3 and depth < 4 and width <= 10:
            tree[key] = random_tree(rng, depth + 1)
        elif roll < 0.33:
            tree[key] = rng.randbytes(rng.randint(3000, 70000))
        else:
            tree[key] = rng.randbytes(rng.randint(0, 120))
    return tree


def random_sequences(rng: random.Random, tree: dict[bytes, Any],
                     path: tuple[bytes, ...] = ()) -> Iterator[tuple[tuple[bytes, ...], int]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            if rng.random() < 0.5:
                yield (*path, key), rng.randrange(1 << 64)
            yield from random_sequences(rng, value, (*path, key))


# -- our writer, read by bbolt ---------------------------------------------------------------


@pytest.mark.parametrize("page_size", [1024, 4096, 16384])
@pytest.mark.parametrize("freelist", [False, True])
def test_bbolt_reads_and_checks_our_files(
    boltcheck: BoltCheck, tmp_path: Path, page_size: int, freelist: bool
) -> None:
    paths = []
    for seed in range(12):
        rng = random.Random(seed * 1000 + page_size)
        tree = {b"v1": random_tree(rng), b"big": {b"%06d" % i: rng.randbytes(i % 90)
                                                   for i in range(rng.choice([0, 50, 5000]))}}
        path = tmp_path / f"ours-{seed}.db"
        write_bolt(path, tree, page_size=page_size, freelist=freelist, txid=seed + 1,
                   sequences=dict(random_sequences(rng, tree)))
        paths.append(path)
    assert_same_as_bbolt(boltcheck, *paths)


@pytest.mark.parametrize("freelist", [False, True])
def test_bbolt_keeps_writing_to_our_file(
    boltcheck: BoltCheck, tmp_path: Path, freelist: bool
) -> None:
    """bbolt opens our file read-write (rebuilding or reading the freelist) and commits."""
    rng = random.Random(7)
    path = tmp_path / "ours.db"
    write_bolt(path, {b"v1": random_tree(rng), b"alpha": random_tree(rng)}, freelist=freelist)
    boltcheck.run("mutate", path, 11, 400)
    assert_same_as_bbolt(boltcheck, path)
    assert open_bolt(path).txid > 1


# -- bbolt's files, read by us ---------------------------------------------------------------


@pytest.mark.parametrize("page_size", [1024, 4096, 16384])
@pytest.mark.parametrize("no_freelist_sync", [False, True])
def test_we_read_files_bbolt_wrote(
    boltcheck: BoltCheck, tmp_path: Path, page_size: int, no_freelist_sync: bool
) -> None:
    """Nested buckets, bulk inserts (branch pages), big values, deletes, sequences."""
    paths = []
    for seed in (1, 2, 3):
        path = tmp_path / f"go-{seed}.db"
        boltcheck.run("gen", path, seed, page_size, int(no_freelist_sync), 150)
        paths.append(path)
    assert_same_as_bbolt(boltcheck, *paths)
    bolt = open_bolt(paths[0])
    assert bolt.page_size == page_size
    assert (bolt.freelist_pgid == 0xFFFF_FFFF_FFFF_FFFF) == no_freelist_sync


def test_scalar_encodings_match_go(boltcheck: BoltCheck) -> None:
    for value in (0, 1, -1, 3, 4, 63, -64, 64, 300, -300, 1 << 40, (1 << 63) - 1, -(1 << 63)):
        varint, uvarint = boltcheck.run("varint", value).split()
        assert encode_varint(value) == bytes.fromhex(varint)
        assert read_varint(bytes.fromhex(varint)) == value
        assert encode_uvarint(abs(value)) == bytes.fromhex(uvarint)
        assert read_uvarint(bytes.fromhex(uvarint)) == (abs(value), len(bytes.fromhex(uvarint)))
    for seconds, nanos, zone in [(1700000000, 123456789, "utc"), (0, 0, "utc"),
                                 (-62135596800, 0, "utc"), (253402300799, 999999999, "utc"),
                                 (1700000000, 5, "3600"), (1700000000, 5, "-19801")]:
        encoded = bytes.fromhex(boltcheck.run("gotime", seconds, nanos, zone).strip())
        expected = datetime.fromtimestamp(seconds, UTC).replace(microsecond=nanos // 1000) \
            if seconds >= 0 else datetime(1, 1, 1, tzinfo=UTC)
        assert read_gotime(encoded) == expected, (seconds, nanos, zone)


# -- a real containerd, read while it runs ---------------------------------------------------


def test_live_containerd_meta_db(containerd: ContainerdDaemon, boltcheck: BoltCheck) -> None:
    containerd.ctr("namespaces", "create", "foo", "team=storage", "tier=gold")
    containerd.ctr("snapshots", "prepare", "base-active", namespace="testns")
    containerd.ctr("snapshots", "commit", "base", "base-active", namespace="testns")
    containerd.ctr("snapshots", "prepare", "x", "base", namespace="testns")
    containerd.ctr("snapshots", "label", "x", "crifs.test=yes", namespace="testns")

    meta_db = containerd.root / "io.containerd.metadata.v1.bolt" / "meta.db"
    snap_db = containerd.root / "io.containerd.snapshotter.v1.overlayfs" / "metadata.db"
    assert containerd.running
    # containerd holds LOCK_EX on meta.db; the reader must not need any lock.
    with open(meta_db, "rb") as probe, pytest.raises(BlockingIOError):
        fcntl.flock(probe.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)

    bolt = open_bolt(meta_db)
    # containerd 1.6 still syncs the freelist (no NoFreelistSync): either form must read.
    assert bolt.freelist_pgid == 0xFFFF_FFFF_FFFF_FFFF or (
        2 <= bolt.freelist_pgid < bolt.high_water_mark)
    v1 = bolt.root.bucket(b"v1")
    assert v1 is not None and read_varint(v1.get(b"version") or b"") == 3  # containerd 1.6
    labels = v1.bucket(b"foo").bucket(b"labels")  # type: ignore[union-attr]
    assert dict(labels.values()) == {b"team": b"storage", b"tier": b"gold"}  # type: ignore[union-attr]
    overlay = v1.bucket(b"testns").bucket(b"snapshots").bucket(b"overlayfs")  # type: ignore[union-attr]
    assert overlay is not None
    assert [key for key, _ in overlay.buckets()] == [b"base", b"x"]
    x = overlay.bucket(b"x")
    assert x is not None and x.get(b"parent") == b"base"
    assert x.bucket(b"labels").get(b"crifs.test") == b"yes"  # type: ignore[union-attr]
    assert read_gotime(x.get(b"createdat") or b"").year >= 2024
    base = overlay.bucket(b"base")
    assert base is not None and list(base.bucket(b"children").values()) == [(b"x", b"")]  # type: ignore[union-attr]
    # Backend names are "<ns>/<seq>/<key>" with seq from the snapshotter bucket's sequence.
    backend = (x.get(b"name") or b"").split(b"/")
    assert backend[0] == b"testns" and backend[2] == b"x"
    assert overlay.sequence == max(int(n.split(b"/")[1]) for n in
                                   (b.get(b"name") or b"0/0" for _, b in overlay.buckets()))

    snapshots = open_bolt(snap_db).root.bucket(b"v1").bucket(b"snapshots")  # type: ignore[union-attr]
    assert snapshots is not None
    record = snapshots.bucket(x.get(b"name") or b"")
    assert record is not None and record.get(b"kind") == b"\x02"  # active
    snapshot_id, _ = read_uvarint(record.get(b"id") or b"")
    assert (snap_db.parent / "snapshots" / str(snapshot_id)).is_dir()

    # Once containerd is gone bbolt can open the files too: compare full dumps.
    containerd.stop()
    assert_same_as_bbolt(boltcheck, meta_db, snap_db)
