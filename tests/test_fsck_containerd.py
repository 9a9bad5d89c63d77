"""``crifs check`` containerd classes C1-C9 against a real containerd.

One module-scoped daemon builds a clean store (two namespaces, imported images, a running and
a created container, a read-only container, a pinned view, a committed snapshot, an in-flight
pull under a live lease) that must give no finding, live and stopped. Then every class is
planted with real containerd operations where one exists (a GC that leaves a stale children
entry, an expired lease holding an extraction snapshot, an image removed before GC ran, a
blob ingested and removed, databases copied aside and restored around an operation) and with
file or bolt edits while the daemon is stopped where none does. The check must name exactly
the planted objects, with reclaimable bytes equal to ``du``'s. Last, the suggested commands are
run against the daemon, and containerd's own GC must remove exactly what C7/C8 predicted.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from crifs.containerd import ContainerdStore, open_store
from crifs.containerd.bolt import Bucket, open_bolt
from crifs.containerd.boltwrite import Tree, write_bolt
from crifs.fs.usage import Meter
from crifs.fsck import containerd_gc, containerd_snapshots
from crifs.fsck.findings import CheckOptions, Finding, Reclaimable
from crifs.repair.actions import RemovePath
from ocibuild import Entry, ImageInfo, build_layout, busybox_available, busybox_layer, layout_to_tar
from runtimes import CONTAINERD_TOOLS, ContainerdDaemon, missing_prerequisites

pytestmark = pytest.mark.containerd

NS1, NS2 = "default", "team-b"
APP = "example.com/crifs/app:v1"
TOOLS = "example.com/crifs/tools:v1"
OVERLAY, NATIVE = "overlayfs", "native"
META_DB = Path("io.containerd.metadata.v1.bolt/meta.db")
OVERLAY_DIR = Path("io.containerd.snapshotter.v1.overlayfs")
NATIVE_DIR = Path("io.containerd.snapshotter.v1.native")
INGEST_DIR = Path("io.containerd.content.v1.content/ingest")
INFLIGHT = f"extract-1700000000-aGVsbG8 sha256:{hashlib.sha256(b'in flight').hexdigest()}"
ABANDONED = f"extract-1700000001-d29ybGQ sha256:{hashlib.sha256(b'abandoned').hexdigest()}"
NEW_DIR = "new-2147483647"

Key = tuple[str, str | None, str]  # (code, namespace, object)


# -- helpers ------------------------------------------------------------------------------------


def check(store: ContainerdStore, now: dt.datetime | None = None) -> list[Finding]:
    meter = Meter()
    opts = CheckOptions(now=now)
    return (containerd_snapshots.findings(store, opts, meter)
            + containerd_gc.findings(store, opts, meter))


def ev(finding: Finding) -> dict[str, Any]:
    """A finding's evidence, typed for tests."""
    return cast(dict[str, Any], finding.evidence)


def keys(found: list[Finding]) -> set[Key]:
    return {(f.code, f.namespace, f.object) for f in found}


def du(path: Path | str) -> Reclaimable:
    """``du``'s own count of ``path``: apparent bytes, allocated bytes, inodes (hard links
    once)."""
    def run(*flags: str) -> int:
        out = subprocess.run(["du", "-s", *flags, str(path)], capture_output=True, text=True,
                             check=True).stdout
        return int(out.split()[0])

    return Reclaimable(run("-B1", "--apparent-size"), run("-B1"), run("--inodes"))


def add_to_lease(daemon: ContainerdDaemon, namespace: str, lease: str, kind: str,
                 resource: str) -> None:
    """``Leases/AddResource`` over containerd's gRPC API (ctr 1.6 has no command for it);
    the request is two nested protobuf messages of string fields, encoded by hand."""
    def field_(number: int, payload: bytes) -> bytes:
        def varint(n: int) -> bytes:
            out = bytearray()
            while True:
                low, n = n & 0x7F, n >> 7
                out.append(low | (0x80 if n else 0))
                if not n:
                    return bytes(out)
        return varint(number << 3 | 2) + varint(len(payload)) + payload

    request = field_(1, lease.encode()) + field_(
        2, field_(1, resource.encode()) + field_(2, kind.encode()))
    with grpc.insecure_channel(f"unix://{daemon.socket}") as channel:
        call = channel.unary_unary("/containerd.services.leases.v1.Leases/AddResource",
                                   request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
        call(request, metadata=(("containerd-namespace", namespace),), timeout=10)


def snap(daemon: ContainerdDaemon, ns: str, *args: str, ss: str = OVERLAY,
         check: bool = True) -> str:
    return daemon.ctr("snapshots", "--snapshotter", ss, *args, namespace=ns, check=check)


def layer_dir(daemon: ContainerdDaemon, ns: str, key: str, ss: str = OVERLAY) -> Path:
    """The writable directory of an active snapshot (overlay upperdir, or native bind source)."""
    line = snap(daemon, ns, "mounts", "/mnt/crifs-fsck", key, ss=ss).strip()
    for option in line.rsplit(" -o ", 1)[-1].split(","):
        if option.startswith("upperdir="):
            return Path(option.removeprefix("upperdir="))
    return Path(shlex.split(line)[3])


def fill(directory: Path, size: int, seed: str) -> None:
    """Files with distinct byte and block counts, a hard link and a sparse file."""
    (directory / seed).mkdir(parents=True, exist_ok=True)
    data = hashlib.sha256(seed.encode()).digest() * (size // 32 + 1)
    (directory / seed / "data").write_bytes(data[:size])
    os.link(directory / seed / "data", directory / seed / "hardlink")
    with open(directory / seed / "sparse", "wb") as f:
        f.truncate(1 << 20)
        f.write(b"s" * 10)


def run_gc(daemon: ContainerdDaemon, namespace: str = NS1) -> None:
    daemon.ctr("leases", "create", "--id", "test-gc", namespace=namespace)
    daemon.ctr("leases", "rm", "--sync", "test-gc", namespace=namespace)


def restart(daemon: ContainerdDaemon) -> None:
    """Stop and start: after its first collection containerd schedules a GC after every
    deletion, and a fresh start forgets that, so planted garbage stays."""
    daemon.stop()
    daemon.start()


def interrupted_ingest(daemon: ContainerdDaemon, ref: str, namespace: str = NS1) -> None:
    """Start ``ctr content ingest REF``, feed it some bytes and kill it mid-write."""
    proc = subprocess.Popen(
        ["ctr", "-a", str(daemon.socket), "-n", namespace, "content", "ingest", ref],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert proc.stdin is not None
    try:
        proc.stdin.write(b"partial write " * 20_000)
        proc.stdin.flush()
        deadline = time.monotonic() + 10
        while ref not in daemon.ctr("content", "active", namespace=namespace):
            assert time.monotonic() < deadline, f"ingest {ref} never became active"
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()


def edit_bolt(path: Path, edit: Callable[[dict[bytes, object]], None]) -> None:
    """Rewrite a stopped daemon's bolt file with ``edit`` applied (bucket sequences kept)."""
    bolt = open_bolt(str(path))
    sequences: dict[tuple[bytes, ...], int] = {}

    def tree(bucket: Bucket, where: tuple[bytes, ...]) -> dict[bytes, object]:
        if bucket.sequence:
            sequences[where] = bucket.sequence
        return {k: tree(v, (*where, k)) if isinstance(v, Bucket) else v
                for k, v in bucket.items()}

    data = tree(bolt.root, ())
    edit(data)
    write_bolt(path, cast(Tree, data), sequences=sequences, txid=bolt.txid + 1,
               page_size=bolt.page_size,
               freelist=bolt.freelist_pgid != 0xFFFFFFFFFFFFFFFF)


def sub(tree: dict[bytes, object], *path: str) -> dict[bytes, object]:
    for part in path:
        child = tree[part.encode()]
        assert isinstance(child, dict)
        tree = child
    return tree


def run_commands(daemon: ContainerdDaemon, commands: tuple[str, ...]) -> None:
    """Run a finding's ``ctr`` commands against the test daemon (its socket added)."""
    for command in commands:
        for part in command.split(" && "):
            argv = shlex.split(part)
            assert argv[0] == "ctr"
            subprocess.run(["ctr", "-a", str(daemon.socket), *argv[1:]], check=True,
                           capture_output=True, timeout=60)


def exists(daemon: ContainerdDaemon, ns: str, key: str, ss: str = OVERLAY) -> bool:
    return subprocess.run(
        ["ctr", "-a", str(daemon.socket), "-n", ns, "snapshots", "--snapshotter", ss, "info",
         key], capture_output=True).returncode == 0


# -- the scenario -------------------------------------------------------------------------------


@dataclass
class World:
    daemon: ContainerdDaemon
    base: Path
    images: dict[str, ImageInfo]
    clean_live: list[Finding] = field(default_factory=list)
    clean_stopped: list[Finding] = field(default_factory=list)
    faults: list[Finding] = field(default_factory=list)
    later: list[Finding] = field(default_factory=list)  # the same store 25 hours on
    expected: dict[Key, Path | None] = field(default_factory=dict)  # object -> measured path
    sizes: dict[Key, Reclaimable] = field(default_factory=dict)  # du of each measured path
    digests: dict[str, str] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # name -> backend key / dir name

    def find(self, code: str, ns: str | None, obj: str) -> Finding:
        found = [f for f in self.faults if (f.code, f.namespace, f.object) == (code, ns, obj)]
        assert len(found) == 1, (code, ns, obj, keys(self.faults))
        return found[0]


def _images() -> dict[str, list[list[Entry]]]:
    app_top = [Entry("etc", "dir"), Entry("etc/app.conf", data=b"mode=test\n" * 300)]
    tools1 = [Entry("opt", "dir"), Entry("opt/tool", data=os.urandom(30_000), mode=0o755)]
    tools2 = [Entry("opt/data", "dir"), Entry("opt/data/blob", data=os.urandom(50_000))]
    return {APP: [busybox_layer(("sh", "sleep")), app_top], TOOLS: [tools1, tools2]}


def _build_clean(world: World, tar: Path) -> None:
    d = world.daemon
    app, tools = world.images[APP], world.images[TOOLS]
    for ns in (NS1, NS2):
        d.import_image(tar, "example.com/crifs", namespace=ns)
    d.ctr("images", "import", "--all-platforms", "--snapshotter", NATIVE, "--base-name",
          "example.com/crifs", str(tar), namespace=NS1)
    d.ctr("run", "-d", APP, "run1", "sleep", "1000", namespace=NS1)
    d.ctr("containers", "create", APP, "c2", namespace=NS2)
    d.ctr("containers", "create", "--read-only", APP, "ro1", namespace=NS1)
    snap(d, NS2, "view", "view1", app.chain_ids[-1])
    snap(d, NS2, "label", "view1", "containerd.io/gc.root=pinned-by-test")
    snap(d, NS2, "prepare", "w1", app.chain_ids[-1])
    fill(layer_dir(d, NS2, "w1"), 20_000, "committed")
    snap(d, NS2, "commit", "committed1", "w1")
    # an unpack in flight: its extraction snapshot is held by a live lease only
    d.ctr("leases", "create", "--id", "pull1", namespace=NS1)
    snap(d, NS1, "prepare", INFLIGHT, tools.chain_ids[0])
    snap(d, NS1, "label", INFLIGHT, "containerd.io/gc.root=")
    add_to_lease(d, NS1, "pull1", f"snapshots/{OVERLAY}", INFLIGHT)
    # ctr images import leaves the OCI index blob unreferenced until GC runs; the default
    # scheduler would collect it right after the import's lease is deleted.
    run_gc(d)
    restart(d)


def _plant_while_running(world: World) -> None:
    d = world.daemon
    top = world.images[APP].chain_ids[-1]
    # C6: GC removes an unpinned child and leaves it in its parent's children (#11908)
    snap(d, NS1, "prepare", "w6", top)
    snap(d, NS1, "commit", "p6", "w6")
    snap(d, NS1, "prepare", "child6", "p6")
    snap(d, NS1, "label", "child6", "containerd.io/gc.root=")
    run_gc(d)
    restart(d)
    # C7: an expired lease holding an abandoned extraction snapshot
    d.ctr("leases", "create", "--id", "expired1", "--expires", "1s", namespace=NS1)
    snap(d, NS1, "prepare", ABANDONED, top)
    snap(d, NS1, "label", ABANDONED, "containerd.io/gc.root=")
    fill(layer_dir(d, NS1, ABANDONED), 70_000, "abandoned")
    add_to_lease(d, NS1, "expired1", f"snapshots/{OVERLAY}", ABANDONED)
    # C7 + C8: an image removed before GC ran (its blobs are still used by NS1)
    d.ctr("images", "rm", TOOLS, namespace=NS2)
    # C7: a container removed with --keep-snapshot, and an unpinned view
    d.ctr("containers", "create", APP, "ck", namespace=NS1)
    fill(layer_dir(d, NS1, "ck"), 30_000, "kept")
    d.ctr("containers", "rm", "--keep-snapshot", "ck", namespace=NS1)
    snap(d, NS1, "view", "v7", top)
    # C9: an active made by ctr snapshots prepare (pinned by gc.root)
    snap(d, NS2, "prepare", "act9", top)
    fill(layer_dir(d, NS2, "act9"), 40_000, "unused")
    # C8: a blob nothing references, a blob whose record was removed, a write left running
    for ref, payload in (("ref-c8", b"unreferenced\n" * 900), ("ref-c8f", b"orphan\n" * 1300)):
        d.ctr("content", "ingest", ref, namespace=NS1, input=payload)
        world.digests[ref] = "sha256:" + hashlib.sha256(payload).hexdigest()
    d.ctr("content", "rm", world.digests["ref-c8f"], namespace=NS1)
    interrupted_ingest(d, "ref-partial")
    # raw material for the C5 and C2 plants made offline below
    for work, name, child in (("w5", "p5", "c5-child"), ("wq", "q5", "c5b-child")):
        snap(d, NS1, "prepare", work, top)
        snap(d, NS1, "commit", name, work)
        snap(d, NS1, "prepare", child, name)
    snap(d, NS2, "prepare", "w2", top)
    fill(layer_dir(d, NS2, "w2"), 10_000, "victim")
    snap(d, NS2, "commit", "c2-victim", "w2")


def _plant_around_restores(world: World) -> None:
    """A database copied aside, an operation, the old copy restored: records one database has
    and the other lacks, as a crash between the two writes (or a restored backup) leaves."""
    d, root = world.daemon, world.daemon.root
    top = world.images[APP].chain_ids[-1]
    d.stop()
    shutil.copy2(root / META_DB, world.base / "meta.db.aside")
    d.start()
    snap(d, NS1, "prepare", "c3-key", top)
    fill(layer_dir(d, NS1, "c3-key"), 25_000, "invisible")
    interrupted_ingest(d, "ref-lost")
    d.stop()
    shutil.copy2(world.base / "meta.db.aside", root / META_DB)
    shutil.copy2(root / NATIVE_DIR / "metadata.db", world.base / "native.db.aside")
    d.start()
    snap(d, NS1, "prepare", "c4-key", top, ss=NATIVE)
    d.stop()
    shutil.copy2(world.base / "native.db.aside", root / NATIVE_DIR / "metadata.db")


def _plant_offline(world: World) -> None:
    root = world.daemon.root
    store = open_store(root=root)
    by_key = {(s.namespace, s.snapshotter, s.key): s for s in store.snapshots()}
    top = world.images[APP].chain_ids[-1]
    p5, q5 = by_key[(NS1, OVERLAY, "p5")], by_key[(NS1, OVERLAY, "q5")]
    assert q5.backend_key is not None and q5.id is not None and p5.backend_key is not None
    world.keys.update(p5=p5.backend_key, q5_dir=q5.id)
    q5_backend = q5.backend_key.encode()

    def drop_parent(tree: dict[bytes, object]) -> None:  # C5 in meta.db
        snapshots = sub(tree, "v1", NS1, "snapshots", OVERLAY)
        del snapshots[b"p5"]
        del sub(snapshots, top, "children")[b"p5"]

    def drop_backend(tree: dict[bytes, object]) -> None:  # C5 in metadata.db
        del sub(tree, "v1", "snapshots")[q5_backend]

    edit_bolt(root / META_DB, drop_parent)
    edit_bolt(root / OVERLAY_DIR / "metadata.db", drop_backend)
    # C1: a crashed Prepare's temp dir, and a native remove that never finished
    fill(root / OVERLAY_DIR / "snapshots" / NEW_DIR / "fs", 15_000, "temp")
    native = store.snapshotter_db(NATIVE)
    assert native is not None
    world.keys["rm_dir"] = f"rm-{native.id_sequence + 40}"
    fill(root / NATIVE_DIR / "snapshots" / world.keys["rm_dir"], 35_000, "removing")
    # C2: a committed snapshot whose directory is gone
    victim = by_key[(NS2, OVERLAY, "c2-victim")]
    assert victim.id is not None
    shutil.rmtree(root / OVERLAY_DIR / "snapshots" / victim.id)
    world.keys["victim_dir"] = str(root / OVERLAY_DIR / "snapshots" / victim.id)


def _expect(world: World) -> None:
    """The exact findings the planted store must give, and du of every measured path."""
    root = world.daemon.root
    store = open_store(root=root)
    by_key = {(s.namespace, s.snapshotter, s.key): s for s in store.snapshots()}
    overlay_snapshots = root / OVERLAY_DIR / "snapshots"
    native_snapshots = root / NATIVE_DIR / "snapshots"

    def snapshot_dir(ns: str, key: str, ss: str = OVERLAY) -> Path:
        snapshot = by_key[(ns, ss, key)]
        assert snapshot.id is not None
        return (overlay_snapshots if ss == OVERLAY else native_snapshots) / snapshot.id

    overlay_db = store.snapshotter_db(OVERLAY)
    native_db = store.snapshotter_db(NATIVE)
    assert overlay_db is not None and native_db is not None
    c3_key = next(k for k in overlay_db.records if k.endswith("/c3-key"))
    c3 = overlay_db.records[c3_key]
    native_known = {str(r.id) for r in native_db.records.values()}
    native_orphans = sorted(e.name for e in os.scandir(native_snapshots)
                            if e.name.isdigit() and e.name not in native_known)
    assert len(native_orphans) == 1  # c4-key's full copy
    content = root / "io.containerd.content.v1.content" / "blobs" / "sha256"
    lost = [p for p in (root / INGEST_DIR).iterdir()
            if (p / "ref").read_text().endswith("/ref-lost")]
    assert len(lost) == 1
    tools = world.images[TOOLS]
    world.keys["c3"] = c3_key
    expected: dict[Key, Path | None] = {
        ("C1", None, NEW_DIR): overlay_snapshots / NEW_DIR,
        ("C1", None, world.keys["rm_dir"]): native_snapshots / world.keys["rm_dir"],
        ("C1", None, native_orphans[0]): native_snapshots / native_orphans[0],
        ("C1", None, world.keys["q5_dir"]): overlay_snapshots / world.keys["q5_dir"],
        ("C2", NS2, "c2-victim"): None,
        ("C3", NS1, c3_key): overlay_snapshots / str(c3.id),
        ("C3", NS1, world.keys["p5"]): None,  # still the parent of c5-child
        ("C4", NS1, "c4-key"): None,
        ("C4", NS1, "q5"): None,
        ("C5", NS1, "c5-child"): None,
        ("C5", NS1, "c5b-child"): None,
        ("C6", NS1, "p6"): None,
        # deleting q5's backend record left its entry in the parents index of its parent
        ("C6", NS1, world.images[APP].chain_ids[-1]): None,
        ("C7", NS1, "expired1"): None,
        ("C7", NS1, ABANDONED): snapshot_dir(NS1, ABANDONED),
        ("C7", NS1, "ck"): snapshot_dir(NS1, "ck"),
        ("C7", NS1, "v7"): snapshot_dir(NS1, "v7"),
        ("C7", NS2, tools.chain_ids[0]): snapshot_dir(NS2, tools.chain_ids[0]),
        ("C7", NS2, tools.chain_ids[1]): snapshot_dir(NS2, tools.chain_ids[1]),
        ("C8", NS1, world.digests["ref-c8"]):
            content / world.digests["ref-c8"].removeprefix("sha256:"),
        ("C8", None, world.digests["ref-c8f"]):
            content / world.digests["ref-c8f"].removeprefix("sha256:"),
        ("C8", None, f"ingest/{lost[0].name}"): lost[0],
        ("C9", NS2, "act9"): snapshot_dir(NS2, "act9"),
        ("C9", NS1, "c5-child"): snapshot_dir(NS1, "c5-child"),
        ("C9", NS1, "c5b-child"): snapshot_dir(NS1, "c5b-child"),
    }
    # the removed image's blobs: records only, NS1 still uses the files
    for digest in (tools.manifest_digest, tools.config_digest, *tools.layer_digests):
        expected[("C8", NS2, digest)] = None
    world.expected = expected
    world.sizes = {k: du(p) for k, p in expected.items() if p is not None}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    reason = missing_prerequisites(CONTAINERD_TOOLS)
    if reason:
        pytest.skip(f"containerd tests: {reason}")
    if not busybox_available():
        pytest.skip("containerd fsck tests: busybox-static is not installed")
    base = tmp_path_factory.mktemp("fsck-ctrd")
    layout = base / "layout"
    images = build_layout(layout, _images())
    tar = layout_to_tar(layout, base / "layout.tar")
    daemon = ContainerdDaemon(base / "daemon")
    world = World(daemon, base, images)
    try:
        daemon.start()
        _build_clean(world, tar)
        world.clean_live = check(open_store(root=daemon.root))
        daemon.stop()
        world.clean_stopped = check(open_store(root=daemon.root))
        daemon.start()
        started = time.monotonic()
        _plant_while_running(world)
        _plant_around_restores(world)
        _plant_offline(world)
        _expect(world)
        time.sleep(max(0.0, 1.2 - (time.monotonic() - started)))  # let expired1 expire
        store = open_store(root=daemon.root)
        world.faults = check(store)
        world.later = check(store, now=dt.datetime.now(dt.UTC) + dt.timedelta(hours=25))
        yield world
    finally:
        daemon.stop()


# -- no false positives -------------------------------------------------------------------------


def test_clean_store_has_no_findings(world: World) -> None:
    assert world.clean_live == []
    assert world.clean_stopped == []


def test_clean_store_has_what_it_should(world: World) -> None:
    """The clean store really holds the tricky cases: a pinned view, native snapshots, and a
    live-leased extraction snapshot."""
    store = open_store(root=world.daemon.root)
    kinds = {(s.namespace, s.key): str(s.kind) for s in store.snapshots()}
    assert kinds[(NS1, "ro1")] == "Active"  # ctr 1.6 --read-only: a read-only spec, no View
    assert kinds[(NS2, "view1")] == "View"
    assert kinds[(NS1, INFLIGHT)] == "Active"
    assert {s.snapshotter for s in store.snapshots(NS1)} == {OVERLAY, NATIVE}


# -- every planted class ------------------------------------------------------------------------


def test_finds_exactly_the_planted_faults(world: World) -> None:
    assert keys(world.faults) == set(world.expected)


def test_reclaimable_bytes_equal_du(world: World) -> None:
    for key, path in world.expected.items():
        finding = world.find(*key)
        if path is None:
            continue
        assert finding.path == str(path), key
        assert finding.reclaimable == world.sizes[key], key
    measured = [k for k, p in world.expected.items() if p is not None]
    assert len(measured) >= 12
    assert sum(world.sizes[k].apparent_bytes for k in measured) > 300_000


def test_c1_orphan_dirs(world: World) -> None:
    temp = world.find("C1", None, NEW_DIR)
    assert ev(temp)["kind"] == "temporary" and temp.repair is not None
    assert temp.repair.actions == (RemovePath(temp.path or ""),) and temp.repair.gc
    removing = world.find("C1", None, world.keys["rm_dir"])
    assert (ev(removing)["kind"], ev(removing)["snapshotter"]) == ("removing", NATIVE)
    restored = [f for f in world.faults
                if f.code == "C1" and ev(f).get("snapshotter") == NATIVE
                and ev(f)["kind"] == "id"]
    assert len(restored) == 1 and "restored from an older copy" in restored[0].message
    lost_parent = world.find("C1", None, world.keys["q5_dir"])
    assert lost_parent.repair is not None and lost_parent.repair.actions == ()
    parent_of = ev(lost_parent)["parent_of"]
    assert isinstance(parent_of, list) and parent_of[0].endswith("/c5b-child")


def test_c2_c3_c4(world: World) -> None:
    victim = world.find("C2", NS2, "c2-victim")
    assert victim.path == world.keys["victim_dir"]
    assert victim.repair is not None
    assert victim.repair.commands == (
        "ctr -n team-b snapshots --snapshotter overlayfs rm c2-victim",)
    invisible = world.find("C3", NS1, world.keys["c3"])
    assert invisible.repair is not None and invisible.repair.gc
    blocked = world.find("C3", NS1, world.keys["p5"])
    assert blocked.reclaimable is None and "c5-child" in blocked.message
    native = world.find("C4", NS1, "c4-key")
    assert native.repair is not None
    assert native.repair.commands == ("ctr -n default snapshots --snapshotter native rm c4-key",)
    q5 = world.find("C4", NS1, "q5").repair
    assert q5 is not None and q5.commands[0].endswith("rm c5b-child")


def test_c5_both_databases(world: World) -> None:
    meta = world.find("C5", NS1, "c5-child")
    assert ev(meta)["database"] == "meta.db" and ev(meta)["missing_parent"] == "p5"
    assert meta.repair is not None and meta.repair.commands[0].endswith("prepare p5")
    backend = world.find("C5", NS1, "c5b-child")
    assert ev(backend)["database"] == "metadata.db"
    assert backend.repair is not None and backend.repair.commands == ()


def test_c6_stale_children(world: World) -> None:
    stale = world.find("C6", NS1, "p6")
    assert ev(stale)["missing_children"] == ["child6"]
    assert "containerd#11908" in stale.message
    assert stale.repair is not None and stale.repair.commands == (
        "ctr -n default snapshots --snapshotter overlayfs prepare child6 p6 && "
        "ctr -n default snapshots --snapshotter overlayfs rm child6",)
    index = world.find("C6", NS1, world.images[APP].chain_ids[-1])
    assert ev(index)["database"] == "metadata.db"
    entries = ev(index)["stale_parents_entries"]
    assert isinstance(entries, list) and entries[0].endswith("/q5")
    assert index.repair is not None and index.repair.commands == ()


def test_c7_unreachable_and_expired(world: World) -> None:
    lease = world.find("C7", NS1, "expired1")
    assert ev(lease)["snapshots"] == [f"{OVERLAY}/{ABANDONED}"]
    abandoned = world.find("C7", NS1, ABANDONED)
    assert "interrupted pull" in abandoned.message and "expired1" in abandoned.message
    assert abandoned.repair is not None
    assert abandoned.repair.commands == (
        f"ctr -n default snapshots --snapshotter overlayfs rm '{ABANDONED}'",)
    tools = world.images[TOOLS]
    base = world.find("C7", NS2, tools.chain_ids[0])
    assert base.repair is not None and base.repair.commands == (
        f"ctr -n team-b snapshots --snapshotter overlayfs rm {tools.chain_ids[1]}",
        f"ctr -n team-b snapshots --snapshotter overlayfs rm {tools.chain_ids[0]}")
    top = world.find("C7", NS2, tools.chain_ids[1])
    assert top.repair is not None and top.repair.order < base.repair.order


def test_c8_blobs_and_ingests(world: World) -> None:
    record = world.find("C8", NS1, world.digests["ref-c8"])
    assert record.repair is not None
    assert record.repair.commands == (f"ctr -n default content rm {world.digests['ref-c8']}",)
    shared = world.find("C8", NS2, world.images[TOOLS].config_digest)
    assert shared.reclaimable is None and ev(shared)["file_kept_by"] == [NS1]
    orphan = world.find("C8", None, world.digests["ref-c8f"])
    assert orphan.repair is not None and orphan.repair.actions == (RemovePath(orphan.path or ""),)
    ingest = next(f for f in world.faults if f.object.startswith("ingest/"))
    assert ev(ingest)["ref"].endswith("/ref-lost")
    assert ingest.repair is not None and ingest.repair.actions and ingest.repair.gc


def test_c9_unused_actives(world: World) -> None:
    unused = world.find("C9", NS2, "act9")
    assert "pinned by its containerd.io/gc.root label" in unused.message
    assert unused.repair is not None and not unused.repair.gc


def test_time_makes_leases_and_ingests_expire(world: World) -> None:
    """25 hours on, the in-flight pull's lease and the interrupted write have expired."""
    extra = keys(world.later) - keys(world.faults)
    assert {("C7", NS1, "pull1"), ("C7", NS1, INFLIGHT), ("C8", NS1, "ref-partial")} <= extra
    partial = next(f for f in world.later if f.object == "ref-partial")
    assert partial.reclaimable is not None and partial.reclaimable.inodes >= 2


def test_measure_off_leaves_reclaimable_unset(world: World) -> None:
    store = open_store(root=world.daemon.root)
    opts = CheckOptions(measure=False)
    found = (containerd_snapshots.findings(store, opts, Meter())
             + containerd_gc.findings(store, opts, Meter()))
    assert keys(found) == keys(world.faults)
    assert all(f.reclaimable is None for f in found)


# -- the repairs work on the real daemon --------------------------------------------------------


def test_c6_commands_unblock_the_parent(world: World) -> None:
    d = world.daemon
    d.start()
    refused = subprocess.run(["ctr", "-a", str(d.socket), "-n", NS1, "snapshots", "rm", "p6"],
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "cannot remove snapshot with child" in refused.stderr
    stale = world.find("C6", NS1, "p6")
    assert stale.repair is not None
    run_commands(d, stale.repair.commands)
    snap(d, NS1, "rm", "p6")
    assert not exists(d, NS1, "p6") and not exists(d, NS1, "child6")


def test_c5_c4_commands_remove_the_records(world: World) -> None:
    d = world.daemon
    if not d.running:
        d.start()
    c5 = world.find("C5", NS1, "c5-child")
    c4 = world.find("C4", NS1, "c4-key")
    assert c5.repair is not None and c4.repair is not None
    run_commands(d, c5.repair.commands)
    run_commands(d, c4.repair.commands)
    assert not exists(d, NS1, "c5-child") and not exists(d, NS1, "p5")
    assert not exists(d, NS1, "c4-key", NATIVE)
    d.stop()
    remaining = keys(check(open_store(root=d.root)))
    assert ("C5", NS1, "c5-child") not in remaining and ("C4", NS1, "c4-key") not in remaining


def test_containerd_gc_collects_what_c7_c8_predicted(world: World) -> None:
    """Run the C3 repair (which ends in a synchronous GC); containerd must then have removed
    every snapshot, lease, blob and ingest C7/C8 named, and nothing else."""
    d = world.daemon
    if not d.running:
        d.start()
    before = {(s.namespace, s.snapshotter, s.key)
              for s in open_store(root=d.root).snapshots()}
    predicted = {(f.namespace, ev(f).get("snapshotter"), f.object)
                 for f in world.faults if f.code == "C7" and "snapshotter" in ev(f)}
    c3 = world.find("C3", NS1, world.keys["c3"])
    assert c3.repair is not None
    run_commands(d, c3.repair.commands)
    d.stop()
    after_store = open_store(root=d.root)
    after = {(s.namespace, s.snapshotter, s.key) for s in after_store.snapshots()}
    assert before - after == predicted
    assert "expired1" not in {x.id for x in after_store.leases()}
    assert "pull1" in {x.id for x in after_store.leases()}
    blob_records = {(b.namespace, b.digest) for b in after_store.content_blobs()}
    for f in world.faults:
        if f.code == "C8" and f.namespace is not None:
            assert (f.namespace, f.object) not in blob_records, f.object
        if f.code == "C8" and f.namespace is None:
            assert f.path is not None and not os.path.lexists(f.path), f.object
    assert not os.path.lexists(world.expected[("C3", NS1, world.keys["c3"])] or "")
    found = check(after_store)
    assert {f.code for f in found} <= {"C1", "C2", "C4", "C5", "C6", "C9"}
    # the native snapshotter has no Cleanup: its leftovers survive containerd's GC
    assert ("C1", None, world.keys["rm_dir"]) in keys(found)
    # and containerd#11908 again: GC removed the image top's children without unlinking them
    top = world.images[APP].chain_ids[-1]
    (stale,) = [f for f in found if f.code == "C6"]
    assert (stale.namespace, stale.object) == (NS1, top)
    assert set(ev(stale)["missing_children"]) == {"ck", "v7", ABANDONED}
