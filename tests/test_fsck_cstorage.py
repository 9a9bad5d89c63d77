"""``crifs check`` on containers/storage stores made by a real podman 4.3.1: S1-S13.

A clean store (shared base layers, created, run and mounted containers, an image mount, an
additional image store) gives no finding. Every class is then planted by editing the store the
way crashes and bugs leave it, found with the right object and exact reclaimable bytes (counted
independently with ``du``, hard links once), and for S1/S2/S4/S8 podman itself is shown to fail
on the planted fault: podman 4.3.1 has no ``system check`` to find them first.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from crifs.cstorage import CStorageStore, open_store
from crifs.cstorage.config import StorageConfig
from crifs.fs.usage import Meter
from crifs.fsck import cstorage_links, cstorage_records
from crifs.fsck.findings import CheckOptions, Finding, Reclaimable
from crifs.repair.actions import (
    CreateSymlink,
    DeleteImage,
    DeleteLayer,
    DropMountRecord,
    MakeDir,
    RemovePath,
    WriteFile,
)
from ocibuild import Entry, build_layout, busybox_available, busybox_layer
from runtimes import (
    PODMAN_RUN_LIMITS,
    PODMAN_TOOLS,
    Podman,
    missing_prerequisites,
    unmount_under,
)

REGISTRY = "example.com/fsck"
BASE, MIDDLE, TOP = f"{REGISTRY}/base:v1", f"{REGISTRY}/middle:v1", f"{REGISTRY}/top:v1"
DEEP, LEAF_H, LEAF_I = f"{REGISTRY}/deep:v1", f"{REGISTRY}/h:v1", f"{REGISTRY}/i:v1"
SOLO, JUNK = f"{REGISTRY}/f:v1", f"{REGISTRY}/junk:v1"
DANGLING = "AAAAAAAAAAAAAAAAAAAAAAAAAA"
UNKNOWN_LINK = "ZZZZZZZZZZZZZZZZZZZZZZZZZZ"
ORPHAN = "ab" * 32
BOGUS_PARENT = "0" * 64
NO_LAYER = "f" * 64

pytestmark = pytest.mark.podman


def _file(name: str, size: int, fill: bytes) -> list[Entry]:
    return [Entry(name, data=fill * size)]


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not busybox_available():
        pytest.skip("needs the busybox-static package for the test images")
    base = [*busybox_layer(), Entry("etc", "dir"), Entry("etc/hostname", data=b"fsck\n")]
    middle = [Entry("etc", "dir"), Entry("etc/middle", data=b"m" * 5000)]
    top = [Entry("usr", "dir"), Entry("usr/top", data=b"t" * 20000)]
    images: dict[str, list[Any]] = {
        BASE: [base], MIDDLE: [base, middle], TOP: [base, middle, top],
        DEEP: [base, _file("d", 700, b"d"), _file("e", 900, b"e")],
        LEAF_H: [base, _file("h", 3000, b"h")],
        LEAF_I: [base, _file("i", 4000, b"i")],
        SOLO: [base, _file("f", 100, b"f")],
        JUNK: [_file(f"x{n}", 1000 * n, b"x") for n in range(1, 5)],
    }
    dest = tmp_path_factory.mktemp("fsck-layout") / "layout"
    build_layout(dest, images)
    return dest


# -- helpers ---------------------------------------------------------------------------------


def check(podman: Podman, *, max_age: dt.timedelta = dt.timedelta(hours=24),
          config: StorageConfig | None = None) -> list[Finding]:
    store = open_store(root=podman.root, runroot=podman.runroot,
                       config=config or StorageConfig())
    return run_checks(store, max_age)


def run_checks(store: CStorageStore, max_age: dt.timedelta) -> list[Finding]:
    opts = CheckOptions(max_age=max_age)
    meter = Meter()
    return [*cstorage_links.findings(store, opts, meter),
            *cstorage_records.findings(store, opts, meter)]


def codes(findings: list[Finding]) -> set[tuple[str, str]]:
    return {(f.code, f.object) for f in findings}


def one(findings: list[Finding], code: str, obj: str) -> Finding:
    (found,) = [f for f in findings if f.code == code and f.object == obj]
    return found


def du(*paths: Path | str) -> Reclaimable:
    """What ``du`` counts for ``paths`` together (hard links once): the independent figure."""
    existing = [str(p) for p in paths if os.path.lexists(p)]

    def total(*flags: str) -> int:
        out = subprocess.run(["du", "-s", "-c", *flags, *existing], check=True,
                             capture_output=True, text=True).stdout
        return int(out.strip().splitlines()[-1].split()[0])

    return Reclaimable(apparent_bytes=total("-B1", "--apparent-size"),
                       disk_bytes=total("-B1"), inodes=total("--inodes"))


class Store:
    """The podman store under test, read through its JSON files."""

    def __init__(self, podman: Podman) -> None:
        self.podman = podman
        self.root = podman.root
        self.home = podman.root / "overlay"

    def layers(self) -> list[dict[str, Any]]:
        return json.loads((self.root / "overlay-layers" / "layers.json").read_text())

    def images(self) -> list[dict[str, Any]]:
        return json.loads((self.root / "overlay-images" / "images.json").read_text())

    def containers(self) -> list[dict[str, Any]]:
        return json.loads((self.root / "overlay-containers" / "containers.json").read_text())

    def image(self, ref: str) -> dict[str, Any]:
        return next(i for i in self.images() if ref in i.get("names", []))

    def container(self, name: str) -> dict[str, Any]:
        return next(c for c in self.containers() if name in c["names"])

    def parent(self, layer_id: str) -> str:
        return next(r["parent"] for r in self.layers() if r["id"] == layer_id)

    def link(self, layer_id: str) -> str:
        return (self.home / layer_id / "link").read_text()

    def layer_paths(self, layer_id: str) -> list[Path]:
        return [self.home / layer_id, self.root / "overlay-layers" / f"{layer_id}.tar-split.gz",
                self.root / "overlay-layers" / layer_id]

    def edit(self, name: str, change: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
             ) -> None:
        path = {"layers": self.root / "overlay-layers" / "layers.json",
                "images": self.root / "overlay-images" / "images.json",
                "containers": self.root / "overlay-containers" / "containers.json"}[name]
        path.write_text(json.dumps(change(json.loads(path.read_text()))))


def podman_fails(podman: Podman, *args: str) -> str:
    """Run podman, assert it fails, return its stderr."""
    proc = subprocess.run([*podman.base_argv(), *args], capture_output=True, text=True,
                          env=podman.env(), timeout=120)
    assert proc.returncode != 0, f"podman {' '.join(args)} succeeded: {proc.stdout}"
    return proc.stderr


# -- a clean store ---------------------------------------------------------------------------


def test_clean_store_with_shared_layers_and_mounts_has_no_finding(podman: Podman, layout: Path
                                                                 ) -> None:
    for ref in (BASE, MIDDLE, TOP):
        podman.pull_layout(layout, ref)
    podman.run("create", "--name", "created", BASE, "/bin/sh")
    podman.run("run", *PODMAN_RUN_LIMITS, "--name", "ran", TOP, "/bin/sh", "-c",
               "echo changed > /etc/hostname")
    podman.run("create", "--name", "mounted", MIDDLE, "/bin/sh")
    try:
        merged = podman.run("mount", "mounted").strip()
        podman.run("image", "mount", TOP)
        assert os.path.ismount(merged)
        # max_age 0: any layer nothing reaches would show, however young
        assert check(podman, max_age=dt.timedelta(0)) == []
        assert len(json.loads((podman.runroot / "overlay-layers" / "mountpoints.json")
                              .read_text())) == 2
    finally:
        podman.run("umount", "-a", check=False)
        podman.run("image", "umount", "-a", check=False)
        unmount_under(podman.root)


def test_additional_image_store_layers_and_images_are_not_missing(
    podman: Podman, layout: Path, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A container whose image and parent layers live in a read-only additional store: known
    through storage.conf's additionalimagestores, missing without it."""
    shared = Podman(tmp_path_factory.mktemp("fsck-ais"))
    try:
        shared.pull_layout(layout, MIDDLE)
        podman.run("--storage-opt", f"overlay.imagestore={shared.root}", "create", "--name",
                   "on-shared", MIDDLE, "/bin/sh")
        config = StorageConfig(additional_image_stores=(str(shared.root),))
        assert check(podman, max_age=dt.timedelta(0), config=config) == []
        # Without the additional store the same records look broken: proof the check uses it.
        alone = codes(check(podman, max_age=dt.timedelta(0)))
        container = Store(podman).container("on-shared")
        assert ("S9", container["id"]) in alone
        assert ("S7", container["layer"]) in alone
        assert ("S4", container["layer"]) in alone
    finally:
        shared.cleanup()


# -- every class planted ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted(layout: Path) -> Iterator[tuple[Store, dict[str, str]]]:
    """One podman store with one planted fault per class, shared by the tests that only read
    it (building it takes most of this file's time); returns the store and the ids."""
    reason = missing_prerequisites(PODMAN_TOOLS)
    if reason:
        pytest.skip(f"podman tests: {reason}")
    # podman refuses a runroot path longer than 50 characters: a short private base
    base = Path(tempfile.mkdtemp(prefix="crifs-fsck-"))
    podman = Podman(base)
    try:
        yield _plant(podman, layout)
    finally:
        podman.cleanup()
        if not unmount_under(base):
            shutil.rmtree(base, ignore_errors=True)


def _plant(podman: Podman, layout: Path) -> tuple[Store, dict[str, str]]:
    for ref in (BASE, MIDDLE, TOP, DEEP, LEAF_H, LEAF_I, SOLO, JUNK):
        podman.pull_layout(layout, ref)
    podman.run("create", "--name", "ctr-a", BASE, "/bin/sh")
    podman.run("create", "--name", "ctr-f", SOLO, "/bin/sh")
    podman.run("create", "--name", "ctr-g", BASE, "/bin/sh")
    podman.run("mount", "ctr-a")  # a live mount: its mount record is right
    store = Store(podman)
    ids: dict[str, str] = {}
    ids["B"] = store.image(BASE)["layer"]
    ids["T"] = store.image(TOP)["layer"]
    ids["M"] = store.parent(ids["T"])
    ids["E"] = store.image(DEEP)["layer"]
    ids["D"] = store.parent(ids["E"])
    ids["H"] = store.image(LEAF_H)["layer"]
    ids["I"] = store.image(LEAF_I)["layer"]
    ids["image_i"] = store.image(LEAF_I)["id"]
    ids["image_f"] = store.image(SOLO)["id"]
    ids["ctr_f"] = store.container("ctr-f")["id"]
    ids["ctr_g"] = store.container("ctr-g")["id"]
    ids["ctr_g_layer"] = store.container("ctr-g")["layer"]
    x4 = store.image(JUNK)["layer"]
    x3 = store.parent(x4)
    x2 = store.parent(x3)
    ids.update(X4=x4, X3=x3, X2=x2, X1=store.parent(x2))
    for name in ("M", "B", "D", "E", "H"):
        ids[f"link_{name}"] = store.link(ids[name])
    ids["lower_T"] = (store.home / ids["T"] / "lower").read_text()
    home = store.home

    # S1: M's l/ entry is gone
    (home / "l" / ids["link_M"]).unlink()
    # S2: an entry for a layer that does not exist
    (home / "l" / DANGLING).symlink_to(f"../{NO_LAYER}/diff")
    # S3: D's link file is gone; E's holds garbage
    (home / ids["D"] / "link").unlink()
    (home / ids["E"] / "link").write_text("garbage\n")
    # S4: T's lower names a link nobody has
    (home / ids["T"] / "lower").write_text(f"l/{ids['link_M']}:l/{UNKNOWN_LINK}")
    # S5 (and S2 for its now dangling l/ entry): H's directory is gone
    shutil.rmtree(home / ids["H"])
    # S6: a directory no record names, with hard links, plus a tar-split beside it
    orphan = home / ORPHAN / "diff"
    (orphan / "sub").mkdir(parents=True)
    (orphan / "a").write_bytes(b"a" * 3000)
    os.link(orphan / "a", orphan / "a-again")
    (orphan / "sub" / "c").write_bytes(b"c" * 10000)
    os.link(orphan / "sub" / "c", orphan / "c-again")
    (home / ORPHAN / "link").write_text("ORPHANORPHANORPHANORPHAN22")
    (store.root / "overlay-layers" / f"{ORPHAN}.tar-split.gz").write_bytes(b"z" * 123)
    # S8 (and S6 for its dir): the layer image i needs has no record
    # S9: ctr-g's layer record is gone (and S6 for its dir); image f is gone (ctr-f uses it)
    gone_layers = {ids["I"], ids["ctr_g_layer"]}
    store.edit("images", lambda images: [i for i in images if i["id"] not in (
        ids["image_f"], store.image(JUNK)["id"])])

    # S7 S10 S11: the junk image's four layers, unreferenced once its record is gone
    def edit_layers(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        kept = []
        for record in records:
            if record["id"] in gone_layers:
                continue
            if record["id"] == ids["X4"]:
                record.setdefault("flags", {})["incomplete"] = True
            if record["id"] == ids["X3"]:
                record["parent"] = BOGUS_PARENT
            if record["id"] in (ids["X1"], ids["X2"]):
                record["created"] = "2020-01-01T00:00:00Z"
            kept.append(record)
        return kept

    store.edit("layers", edit_layers)
    # S13: a mount record for a layer nothing has mounted
    mountpoints = podman.runroot / "overlay-layers" / "mountpoints.json"
    records = json.loads(mountpoints.read_text())
    assert len(records) == 1  # ctr-a's live mount
    records.append({"id": ids["B"], "path": str(home / ids["B"] / "merged"), "count": 1})
    mountpoints.write_text(json.dumps(records))
    return store, ids


def test_every_planted_class_is_found_with_its_object_and_repair(
    planted: tuple[Store, dict[str, str]],
) -> None:
    store, ids = planted
    home = store.home
    findings = check(store.podman)
    assert codes(findings) == {
        ("S1", ids["M"]),
        ("S2", f"l/{DANGLING}"), ("S2", f"l/{ids['link_H']}"),
        ("S3", ids["D"]), ("S3", ids["E"]),
        ("S4", ids["T"]),
        ("S5", ids["H"]),
        ("S6", ORPHAN), ("S6", ids["I"]), ("S6", ids["ctr_g_layer"]),
        ("S7", ids["X3"]),
        ("S8", ids["image_i"]),
        ("S9", ids["ctr_f"]), ("S9", ids["ctr_g"]),
        ("S10", ids["X4"]),
        ("S11", ids["X1"]), ("S11", ids["X2"]),
        ("S13", ids["B"]),
    }
    for finding in findings:
        assert finding.runtime == "cstorage" and finding.namespace is None
        assert finding.message and "\n" not in finding.message
        json.dumps(dict(finding.evidence))  # JSON-able

    s1 = one(findings, "S1", ids["M"])
    assert s1.path == str(home / "l" / ids["link_M"])
    assert s1.repair is not None and s1.repair.actions == (
        CreateSymlink(str(home / "l" / ids["link_M"]), f"../{ids['M']}/diff"),)

    s2 = one(findings, "S2", f"l/{DANGLING}")
    assert "correcting link for layer" in s2.message
    assert s2.repair is not None and s2.repair.actions == (RemovePath(str(home / "l" / DANGLING)),)

    # a link file is rewritten to the l/ entry that still points at its layer
    for name in ("D", "E"):
        s3 = one(findings, "S3", ids[name])
        assert s3.repair is not None and s3.repair.actions == (
            WriteFile(str(home / ids[name] / "link"), ids[f"link_{name}"]),)
    assert "garbage" in one(findings, "S3", ids["E"]).message

    s4 = one(findings, "S4", ids["T"])
    assert UNKNOWN_LINK in s4.message and "no such file or directory" in s4.message
    assert s4.repair is not None and s4.repair.actions == (
        WriteFile(str(home / ids["T"] / "lower"), ids["lower_T"]),)

    s5 = one(findings, "S5", ids["H"])
    assert s5.repair is not None and not s5.repair.actions
    assert s5.repair.commands == (f"podman rmi --force {LEAF_H}",)

    s8 = one(findings, "S8", ids["image_i"])
    assert "layer not known" in s8.message and ids["I"] in s8.message
    assert s8.repair is not None and s8.repair.actions == (DeleteImage(ids["image_i"]),)

    for container in ("ctr_f", "ctr_g"):
        s9 = one(findings, "S9", ids[container])
        assert s9.repair is not None and not s9.repair.actions
        assert s9.repair.commands == (f"podman rm --force {ids[container]}",)
    assert "image not known" in one(findings, "S9", ids["ctr_f"]).message
    assert "layer not known" in one(findings, "S9", ids["ctr_g"]).message

    s7 = one(findings, "S7", ids["X3"])
    assert BOGUS_PARENT in s7.message
    s10 = one(findings, "S10", ids["X4"])
    assert "Found incomplete layer" in s10.message
    for finding, layer in ((s7, "X3"), (s10, "X4"), (one(findings, "S11", ids["X1"]), "X1"),
                           (one(findings, "S11", ids["X2"]), "X2")):
        assert finding.repair is not None and finding.repair.gc
        assert finding.repair.actions == (DeleteLayer(ids[layer]),)
    # children before parents: X4 (depth 1 below the bogus parent) ... X1 (a base)
    orders = {layer: one(findings, code, ids[layer]).repair.order  # type: ignore[union-attr]
              for code, layer in (("S11", "X1"), ("S11", "X2"))}
    assert orders["X2"] < orders["X1"]

    s13 = one(findings, "S13", ids["B"])
    assert s13.repair is not None and s13.repair.actions == (DropMountRecord(ids["B"]),)

    s6 = one(findings, "S6", ORPHAN)
    assert s6.repair is not None and s6.repair.gc
    assert RemovePath(str(home / ORPHAN)) in s6.repair.actions
    # I's dir still has its valid l/ entry: removed with it, never left dangling
    s6_i = one(findings, "S6", ids["I"])
    assert s6_i.repair is not None
    assert {a for a in s6_i.repair.actions if isinstance(a, RemovePath)} >= {
        RemovePath(str(home / ids["I"]))}
    assert any(isinstance(a, RemovePath) and "/l/" in a.path for a in s6_i.repair.actions)


def test_reclaimable_bytes_are_exact_and_hard_links_count_once(
    planted: tuple[Store, dict[str, str]],
) -> None:
    store, ids = planted
    findings = check(store.podman)
    measured = {(f.code, f.object): f.reclaimable for f in findings if f.reclaimable}
    expected = {
        ("S6", ORPHAN): du(*store.layer_paths(ORPHAN)),
        ("S6", ids["I"]): du(*store.layer_paths(ids["I"])),
        ("S6", ids["ctr_g_layer"]): du(*store.layer_paths(ids["ctr_g_layer"])),
        ("S7", ids["X3"]): du(*store.layer_paths(ids["X3"])),
        ("S10", ids["X4"]): du(*store.layer_paths(ids["X4"])),
        ("S11", ids["X1"]): du(*store.layer_paths(ids["X1"])),
        ("S11", ids["X2"]): du(*store.layer_paths(ids["X2"])),
        ("S8", ids["image_i"]): du(store.root / "overlay-images" / ids["image_i"]),
    }
    assert measured == expected
    # the orphan: dirs diff, sub; files a, c, link, tar-split; the two hard links are free
    orphan = expected[("S6", ORPHAN)]
    assert orphan.inodes == 1 + 2 + 2 + 2
    assert orphan.apparent_bytes > 3000 + 10000 + 26 + 123
    # nothing that stays is measured: a referenced layer is never reclaimable
    for code in ("S1", "S3", "S4", "S5", "S9", "S13"):
        assert all(f.reclaimable is None for f in findings if f.code == code)
    # measure=False leaves every figure out
    store_obj = open_store(root=store.root, runroot=store.podman.runroot, config=StorageConfig())
    opts = CheckOptions(measure=False)
    unmeasured = [*cstorage_links.findings(store_obj, opts, Meter()),
                  *cstorage_records.findings(store_obj, opts, Meter())]
    assert all(f.reclaimable is None for f in unmeasured)


def test_max_age_spares_young_unreferenced_layers(planted: tuple[Store, dict[str, str]]
                                                 ) -> None:
    store, ids = planted
    old_only = {obj for code, obj in codes(check(store.podman)) if code == "S11"}
    assert old_only == {ids["X1"], ids["X2"]}
    # max_age 0 adds nothing: every other layer is reached, S7/S10 ones are deleted anyway
    everything = codes(check(store.podman, max_age=dt.timedelta(0)))
    assert {obj for code, obj in everything if code == "S11"} == {ids["X1"], ids["X2"]}
    # created in 2020: a century's max_age spares them
    century = codes(check(store.podman, max_age=dt.timedelta(days=36500)))
    assert not any(code == "S11" for code, _ in century)


def test_overlay_l_replaced_by_a_symlink_or_a_file(planted: tuple[Store, dict[str, str]]
                                                  ) -> None:
    store, ids = planted
    link_dir = store.home / "l"
    moved = store.root / "l-moved"
    shutil.move(link_dir, moved)  # the driver home is a mount of its own: copied across
    try:
        link_dir.symlink_to(moved)  # containers/podman#24900
        _check_overlay_l_faults(store, ids)
    finally:  # the store is shared with the other tests
        if link_dir.is_symlink() or link_dir.is_file():
            link_dir.unlink()
        shutil.move(moved, link_dir)


def _check_overlay_l_faults(store: Store, ids: dict[str, str]) -> None:
    link_dir = store.home / "l"
    findings = check(store.podman)
    s12 = one(findings, "S12", "overlay/l")
    assert "symlink" in s12.message
    assert not any(f.code in ("S1", "S2") for f in findings)  # nothing listed through it
    assert s12.repair is not None
    actions = s12.repair.actions
    assert actions[:2] == (RemovePath(str(link_dir)), MakeDir(str(link_dir), 0o755))
    created = {a.path.rsplit("/", 1)[1]: a.target for a in actions if isinstance(a, CreateSymlink)}
    # every recorded layer with a directory and a good link file gets its link back
    assert created[ids["link_M"]] == f"../{ids['M']}/diff"
    assert created[ids["link_B"]] == f"../{ids['B']}/diff"
    assert ids["link_H"] not in created  # H's directory is gone
    # the S3 layers get theirs from their own repair, after the directory exists
    s3 = one(findings, "S3", ids["D"])
    assert s3.repair is not None and s3.repair.order > s12.repair.order
    assert any(isinstance(a, CreateSymlink) for a in s3.repair.actions)
    # T's lower still resolves through the link files: only the unknown name is S4
    assert one(findings, "S4", ids["T"]).repair is not None

    link_dir.unlink()
    link_dir.write_text("not a directory")
    s12 = one(check(store.podman), "S12", "overlay/l")
    assert "not a directory" in s12.message


# -- the link repairs are right: applied, podman runs every image without a warning ---------


def apply_link_repairs(findings: list[Finding]) -> None:
    """Carry out the planned file actions the simplest way (the journaled executor lives in
    ``crifs.repair``; this only proves the plan is right)."""
    planned = sorted((f for f in findings if f.repair is not None),
                     key=lambda f: f.repair.order)  # type: ignore[union-attr]
    for finding in planned:
        assert finding.repair is not None
        for action in finding.repair.actions:
            if isinstance(action, RemovePath):
                path = Path(action.path)
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            elif isinstance(action, MakeDir):
                Path(action.path).mkdir(exist_ok=True)
                os.chmod(action.path, action.mode)
            elif isinstance(action, CreateSymlink):
                Path(action.path).unlink(missing_ok=True)
                Path(action.path).symlink_to(action.target)
            elif isinstance(action, WriteFile):
                Path(action.path).write_text(action.content)
            else:
                raise AssertionError(f"not a link repair: {action}")


def test_link_repairs_leave_podman_working(podman: Podman, layout: Path) -> None:
    for ref in (BASE, MIDDLE, TOP, DEEP):
        podman.pull_layout(layout, ref)
    store = Store(podman)
    home = store.home
    top = store.image(TOP)["layer"]
    middle, deep_top = store.parent(top), store.image(DEEP)["layer"]
    deep_mid = store.parent(deep_top)
    base = store.parent(middle)
    base_link, deep_mid_link = store.link(base), store.link(deep_mid)
    top_lower = (home / top / "lower").read_text()
    (home / "l" / base_link).unlink()                                          # S1
    (home / "l" / DANGLING).symlink_to(f"../{NO_LAYER}/diff")                   # S2
    (home / deep_mid / "link").unlink()                                        # S3, and its
    (home / "l" / deep_mid_link).unlink()                                      # l/ entry too
    (home / middle / "link").write_text("garbage\n")                           # S3
    (home / top / "lower").write_text(f"l/{store.link(middle)}:l/{UNKNOWN_LINK}")  # S4
    findings = check(podman)
    assert codes(findings) == {("S1", base), ("S2", f"l/{DANGLING}"), ("S3", deep_mid),
                               ("S3", middle), ("S4", top)}
    # with both the link file and its entry gone, the name the child's lower file uses is
    # the one that makes everything resolve again
    s3 = one(findings, "S3", deep_mid)
    assert s3.repair is not None and s3.repair.actions == (
        WriteFile(str(home / deep_mid / "link"), deep_mid_link),
        CreateSymlink(str(home / "l" / deep_mid_link), f"../{deep_mid}/diff"))
    assert "reading name of symlink" in s3.message
    assert "reached 10 iterations" in one(findings, "S3", middle).message

    apply_link_repairs(findings)
    assert check(podman) == []
    assert (home / top / "lower").read_text() == top_lower
    # each image shows the file of its top layer (and so mounted its whole chain)
    for ref, path, content in ((BASE, "/bin/sh", None), (MIDDLE, "/etc/middle", "m" * 5000),
                               (TOP, "/usr/top", "t" * 20000), (DEEP, "/e", "e" * 900)):
        proc = subprocess.run([*podman.base_argv(), "run", "--rm", *PODMAN_RUN_LIMITS, ref,
                               "/bin/sh", "-c",
                               f"test -e {path}" + (f" && cat {path}" if content else "")],
                              capture_output=True, text=True, env=podman.env(), timeout=120)
        assert proc.returncode == 0, proc.stderr
        if content is not None:
            assert proc.stdout == content
        assert "corruption" not in proc.stderr and "recreate" not in proc.stderr

    # S12: overlay/l turned into a file; its repair rebuilds the directory and every link
    shutil.rmtree(home / "l")
    (home / "l").write_text("")
    findings = check(podman)
    assert codes(findings) == {("S12", "overlay/l")}
    apply_link_repairs(findings)
    assert check(podman) == []
    assert stat.S_IMODE((home / "l").stat().st_mode) == 0o755  # as podman makes it
    out = podman.run("run", "--rm", *PODMAN_RUN_LIMITS, DEEP, "/bin/sh", "-c", "cat /e")
    assert out == "e" * 900


# -- podman has no check, but fails on what we find ------------------------------------------


def test_podman_fails_on_the_faults_check_finds(podman: Podman, layout: Path) -> None:
    for ref in (BASE, MIDDLE, TOP):
        podman.pull_layout(layout, ref)
    store = Store(podman)
    base = store.image(BASE)["layer"]
    top = store.image(TOP)["layer"]
    middle = store.parent(top)
    assert "system check" not in podman.run("system", "--help")  # podman 4.3.1 has none

    # S1 + S2: the repair podman attempts for the missing link trips over the dangling one
    (store.home / "l" / store.link(base)).unlink()
    (store.home / "l" / DANGLING).symlink_to(f"../{NO_LAYER}/diff")
    assert codes(check(podman)) == {("S1", base), ("S2", f"l/{DANGLING}")}
    stderr = podman_fails(podman, "image", "mount", MIDDLE)
    assert "recreating the missing symlinks" in stderr
    assert f"correcting link for layer {NO_LAYER}" in stderr
    (store.home / "l" / DANGLING).unlink()
    podman.run("image", "umount", "-a", check=False)
    assert check(podman) == []  # podman recreated the link before it failed

    # S4: a lower entry nobody can resolve
    (store.home / middle / "lower").write_text(f"l/{UNKNOWN_LINK}")
    assert codes(check(podman)) == {("S4", middle)}
    stderr = podman_fails(podman, "image", "mount", MIDDLE)
    assert f"overlay/l/{UNKNOWN_LINK}" in stderr and "no such file or directory" in stderr

    # S8: the top layer of an image has no record
    store.edit("layers", lambda records: [r for r in records if r["id"] != top])
    found = codes(check(podman))
    assert ("S8", store.image(TOP)["id"]) in found and ("S6", top) in found
    assert "layer not known" in podman_fails(podman, "image", "mount", TOP)
    unmount_under(podman.root)
