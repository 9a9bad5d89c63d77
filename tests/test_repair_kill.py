"""kill -9 at every step of a real repair, then prove podman still works and a re-run finishes.

A real podman 4.3.1 store gets planted garbage: orphan dirs (one holding a symlink to a host
sentinel file), an unreferenced chain of 3 old layers (its image record removed), an
incomplete layer, a dangling ``l/`` entry and a missing ``l/`` link of a referenced layer.
The repair runs in a child process that SIGKILLs itself right after journal step N is begun
(``CRIFS_KILL_AT_STEP``), for every N until the run finishes unkilled, plus a few kills at
random times of a ``python -c`` driver. After each kill ``podman images`` and ``podman ps -a``
must work; after the re-run every image runs, every referenced layer is byte-identical, the
garbage is gone and exactly its bytes were freed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

from crifs.cstorage.store import CStorageStore
from crifs.fsck.findings import Finding
from ocibuild import Entry, build_layout, busybox_available, busybox_layer
from runtimes import PODMAN_RUN_LIMITS, Podman, unmount_under

BASE = "example.com/kill/base:v1"
TOP = "example.com/kill/top:v1"
JUNK = "example.com/kill/junk:v1"
PARTIAL = "example.com/kill/partial:v1"
TESTS_DIR = Path(__file__).resolve().parent
EXPECTED_CODES = {"S1", "S2", "S6", "S10", "S11"}


def _images() -> dict[str, list[list[Entry]]]:
    shell = [*busybox_layer(), Entry("etc", "dir"), Entry("etc/marker", data=b"kill\n")]
    return {
        BASE: [shell],
        TOP: [shell, [Entry("usr", "dir"), Entry("usr/top", data=b"t" * 20000)]],
        JUNK: [[Entry("a", "dir"), Entry("a/1", data=b"1" * 30000)],
               [Entry("b", "dir"), Entry("b/2", data=b"2" * 40000)],
               [Entry("c", "dir"), Entry("c/3", data=b"3" * 50000)]],
        PARTIAL: [[Entry("p", "dir"), Entry("p/x", data=b"p" * 60000)]],
    }


# -- the planted store -------------------------------------------------------------------


@dataclass
class Planted:
    garbage_paths: list[str]  # everything the repair must remove
    garbage_layers: list[str]  # layer records it must drop
    missing_link: str  # l/ path it must recreate
    referenced: list[str]  # layer ids that must survive byte-identical
    sentinel: Path


def _read_json(path: Path) -> list[dict[str, object]]:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value), encoding="utf-8")


def _names(record: dict[str, object]) -> list[str]:
    names = record.get("names")
    return [str(n) for n in names] if isinstance(names, list) else []


def _drop_image(root: Path, name: str) -> str:
    """Remove an image's record and big-data dir; returns its top layer id."""
    images_json = root / "overlay-images" / "images.json"
    images = _read_json(images_json)
    image = next(i for i in images if name in _names(i))
    _write_json(images_json, [i for i in images if i is not image])
    shutil.rmtree(root / "overlay-images" / str(image["id"]))
    return str(image["layer"])


def plant(podman: Podman, sentinel: Path) -> Planted:
    root = podman.root
    layers_json = root / "overlay-layers" / "layers.json"
    chain_top = _drop_image(root, JUNK)
    partial = _drop_image(root, PARTIAL)
    layers = _read_json(layers_json)
    by_id = {str(layer["id"]): layer for layer in layers}
    chain: list[str] = []
    layer_id: str | None = chain_top
    while layer_id:
        chain.append(layer_id)
        parent = by_id[layer_id].get("parent")
        layer_id = str(parent) if parent else None
    for layer_id in chain:
        by_id[layer_id]["created"] = "2020-01-01T00:00:00Z"
    by_id[partial]["flags"] = {"incomplete": True}
    _write_json(layers_json, layers)

    garbage: list[str] = []
    for layer_id in [*chain, partial]:
        garbage += [str(root / "overlay" / layer_id),
                    str(root / "overlay-layers" / f"{layer_id}.tar-split.gz")]
        link = (root / "overlay" / layer_id / "link").read_text().strip()
        garbage.append(str(root / "overlay" / "l" / link))
    orphan = root / "overlay" / secrets.token_hex(32)
    (orphan / "diff" / "etc").mkdir(parents=True)
    (orphan / "diff" / "etc" / "data").write_bytes(b"o" * 12345)
    (orphan / "diff" / "etc" / "host").symlink_to(sentinel)  # must not be followed
    (orphan / "diff" / "hostdir").symlink_to(sentinel.parent)
    (orphan / "link").write_text("ORPHANLINKAAAAAAAAAAAAAAAA")
    os.symlink(f"../{orphan.name}/diff", root / "overlay" / "l" / "ORPHANLINKAAAAAAAAAAAAAAAA")
    bare = root / "overlay" / secrets.token_hex(32)
    (bare / "a" / "b" / "c").mkdir(parents=True)
    (bare / "a" / "b" / "c" / "f").write_bytes(b"y" * 7000)
    (bare / "a" / "g").write_bytes(b"z" * 3000)
    dangling = root / "overlay" / "l" / "DANGLINGAAAAAAAAAAAAAAAAAA"
    os.symlink("../" + "f" * 64 + "/diff", dangling)
    garbage += [str(orphan), str(root / "overlay" / "l" / "ORPHANLINKAAAAAAAAAAAAAAAA"),
                str(bare), str(dangling)]

    images = _read_json(root / "overlay-images" / "images.json")
    containers = _read_json(root / "overlay-containers" / "containers.json")
    referenced = _reachable([str(i["layer"]) for i in images] +
                            [str(c["layer"]) for c in containers], by_id)
    base_top = next(str(i["layer"]) for i in images if BASE in _names(i))
    missing = root / "overlay" / "l" / (root / "overlay" / base_top / "link").read_text().strip()
    missing.unlink()
    return Planted(garbage, [*chain, partial], str(missing), referenced, sentinel)


def _reachable(tops: Iterable[str], by_id: dict[str, dict[str, object]]) -> list[str]:
    seen: list[str] = []
    for top in tops:
        layer_id: str | None = top
        while layer_id and layer_id not in seen:
            seen.append(layer_id)
            parent = by_id.get(layer_id, {}).get("parent")
            layer_id = str(parent) if parent else None
    return seen


# -- measuring -----------------------------------------------------------------------------


def tree_hash(path: Path) -> str:
    """Names, types, modes, owners, contents and link targets of a tree (no times)."""
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted([*dirnames, *filenames]):
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            digest.update(f"{os.path.relpath(full, path)}\0{st.st_mode}\0{st.st_uid}\0"
                          f"{st.st_gid}\0".encode("utf-8", "surrogateescape"))
            if stat.S_ISLNK(st.st_mode):
                digest.update(os.readlink(full).encode("utf-8", "surrogateescape"))
            elif stat.S_ISREG(st.st_mode):
                digest.update(Path(full).read_bytes())
    return digest.hexdigest()


def layer_hashes(root: Path, layer_ids: Iterable[str]) -> dict[str, str]:
    out = {}
    for layer_id in layer_ids:
        layer_dir = root / "overlay" / layer_id
        parts = [tree_hash(layer_dir / "diff")]
        for name in ("link", "lower"):
            f = layer_dir / name
            parts.append(f.read_text() if f.exists() else "-")
        out[layer_id] = "|".join(parts)
    return out


def payload_bytes(root: Path) -> int:
    """Allocated bytes of layer payloads (overlay/ and the layer store's tar-splits and data),
    each inode once; record files, locks and the fixed directories themselves excluded."""
    seen: set[tuple[int, int]] = set()
    total = 0
    tops = {root / "overlay", root / "overlay" / "l", root / "overlay-layers"}
    for top in (root / "overlay", root / "overlay-layers"):
        for dirpath, dirnames, filenames in os.walk(top):
            for name in [*dirnames, *filenames]:
                full = Path(dirpath) / name
                if full in tops or name.endswith((".json", ".lock")):
                    continue
                st = os.lstat(full)
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


# -- the repair driver (run in a child process) -------------------------------------------


def planned_findings(store: CStorageStore) -> list[Finding]:
    from crifs.fsck.run import check_store

    return [f for f in check_store(store) if f.repair is not None and f.repair.actions]


def drive(root: str, runroot: str, report: str | None = None) -> None:
    """What ``crifs check --repair`` does: plan with a read-locked check, then apply."""
    from crifs.fsck.run import check_store
    from crifs.repair.apply import apply

    store = CStorageStore.open(root=root, runroot=runroot)
    lines: list[str] = []
    result = apply(
        store, planned_findings(store),
        reopen=lambda: CStorageStore.open(root=root, runroot=runroot, take_locks=False),
        check=check_store, log=lines.append)
    if report is not None:
        Path(report).write_text(json.dumps({
            "applied": [f.code for f in result.applied],
            "failed": [f"{f.code} {f.object}: {why}" for f, why in result.failed],
            "gone": [f.code for f in result.gone], "resumed": result.resumed,
            "freed": result.freed.disk_bytes, "log": lines}))


def run_forked(podman: Podman, kill_at: int | None, report: Path | None = None) -> int:
    """Run :func:`drive` in a forked child (crifs is already imported: no start-up cost).
    Returns the child's wait status as a signal number (negative) or exit code."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            if kill_at is None:
                os.environ.pop("CRIFS_KILL_AT_STEP", None)
            else:
                os.environ["CRIFS_KILL_AT_STEP"] = str(kill_at)
            drive(str(podman.root), str(podman.runroot), str(report) if report else None)
        except BaseException:
            traceback.print_exc()
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def run_python_c(podman: Podman, kill_after: float | None) -> tuple[int, float, float]:
    """The same driver through ``python -c``, SIGKILLed from outside after ``kill_after`` s
    (never when ``None``). Returns the exit status, when the journal first appeared and when
    the process ended (seconds from start)."""
    code = (f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r}); import test_repair_kill as t; "
            f"t.drive({str(podman.root)!r}, {str(podman.runroot)!r})")
    journal = podman.root / ".crifs" / "journal.jsonl"
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", code], env=podman.env())
    journal_at = float("inf")
    while proc.poll() is None:
        now = time.monotonic() - start
        if journal_at == float("inf") and journal.exists():
            journal_at = now
        if kill_after is not None and now >= kill_after:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            break
        time.sleep(0.002)
    return proc.returncode, journal_at, time.monotonic() - start


# -- the test ------------------------------------------------------------------------------


@pytest.fixture
def planted(podman: Podman, tmp_path: Path) -> tuple[Podman, Planted, Path]:
    if not busybox_available():
        pytest.skip("needs the busybox-static package for the test images")
    layout = tmp_path / "layout"
    build_layout(layout, _images())
    for ref in _images():
        podman.pull_layout(layout, ref)
    podman.run("create", "--name", "keeper", TOP, "/bin/sh")
    sentinel_dir = tmp_path / "host"
    sentinel_dir.mkdir()
    sentinel = sentinel_dir / "sentinel"
    sentinel.write_bytes(b"must survive")
    info = plant(podman, sentinel)
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    for name in ("root", "runroot"):
        shutil.copytree(podman.base / name, pristine / name, symlinks=True)
    return podman, info, pristine


def wait_for_helpers(podman: Podman, timeout: float = 15.0) -> None:
    """Wait until no process names this store on its command line (conmon runs ``podman
    container cleanup`` after ``podman run --rm`` has returned)."""
    marker = str(podman.root).encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = False
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    busy = marker in f.read()
            except OSError:
                continue
            if busy:
                break
        if not busy:
            return
        time.sleep(0.05)


def restore(podman: Podman, pristine: Path) -> None:
    wait_for_helpers(podman)
    unmount_under(podman.base)
    for name in ("root", "runroot"):
        shutil.rmtree(podman.base / name)
        shutil.copytree(pristine / name, podman.base / name, symlinks=True)


def assert_podman_loads(podman: Podman) -> None:
    names = set(podman.run("images", "--format", "{{.Repository}}:{{.Tag}}").split())
    assert names == {BASE, TOP}
    assert podman.run("ps", "-a", "--format", "{{.Names}}").split() == ["keeper"]


def assert_repaired(podman: Podman, info: Planted, before: dict[str, str],
                    garbage_bytes: int, pristine_payload: int, run_images: bool) -> None:
    root = podman.root
    for path in info.garbage_paths:
        assert not os.path.lexists(path), f"garbage left: {path}"
    ids = {str(layer["id"]) for layer in _read_json(root / "overlay-layers" / "layers.json")}
    assert not ids & set(info.garbage_layers)
    assert os.readlink(info.missing_link).endswith("/diff"), "missing l/ link not recreated"
    assert layer_hashes(root, info.referenced) == before
    assert info.sentinel.read_bytes() == b"must survive"
    assert not (root / ".crifs").exists(), "journal or trash left after a finished run"
    freed = pristine_payload - payload_bytes(root)
    restored_link = os.lstat(info.missing_link).st_blocks * 512
    assert freed == garbage_bytes - restored_link
    if run_images:
        assert_podman_loads(podman)
        for ref in (BASE, TOP):
            out = podman.run("run", "--rm", *PODMAN_RUN_LIMITS, ref, "/bin/sh", "-c",
                             "cat /etc/marker")
            assert out.strip() == "kill"


def garbage_size(paths: Iterable[str]) -> int:
    seen: set[tuple[int, int]] = set()
    total = 0
    for top in paths:
        for dirpath, dirnames, filenames in [(os.path.dirname(top), [], [os.path.basename(top)])
                                             ] + list(os.walk(top)):
            for name in [*dirnames, *filenames]:
                st = os.lstat(os.path.join(dirpath, name))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


def test_kill_at_every_step_then_rerun_finishes(planted: tuple[Podman, Planted, Path],
                                                 tmp_path: Path) -> None:
    podman, info, pristine = planted
    store = CStorageStore.open(root=podman.root, runroot=podman.runroot)
    codes = {f.code for f in planned_findings(store)}
    assert codes >= EXPECTED_CODES, f"the detectors miss planted faults: {codes}"
    before = layer_hashes(podman.root, [i for i in info.referenced])
    garbage_bytes = garbage_size(info.garbage_paths)
    pristine_payload = payload_bytes(podman.root)
    assert garbage_bytes > 200_000

    report = tmp_path / "report.json"
    step = 0
    kills = 0
    while True:
        step += 1
        restore(podman, pristine)
        status = run_forked(podman, kill_at=step)
        if status == 0:  # the plan has fewer steps: it ran to the end
            assert_repaired(podman, info, before, garbage_bytes, pristine_payload,
                            run_images=True)
            break
        assert status == -signal.SIGKILL, f"driver failed at step {step} (status {status})"
        kills += 1
        assert (podman.root / ".crifs" / "journal.jsonl").exists()
        if step == 1:  # the layer record saves are batched: one step flags all, one drops all
            plan = json.loads((podman.root / ".crifs" / "journal.jsonl").read_text()
                              .splitlines()[0])
            batched = {s["op"]: {str(x[0]) for x in s["layers"]} for s in plan["steps"]
                       if s["op"] in ("layers_mark", "layers_drop")}
            assert batched == dict.fromkeys(("layers_mark", "layers_drop"),
                                            set(info.garbage_layers)), batched
        assert_podman_loads(podman)
        assert run_forked(podman, kill_at=None, report=report) == 0
        result = json.loads(report.read_text())
        assert not result["failed"], result
        assert result["resumed"] >= 1, result  # the killed step's finding was finished
        # Running every image after every kill would double the time: every 3rd kill.
        assert_repaired(podman, info, before, garbage_bytes, pristine_payload,
                        run_images=step % 3 == 1)
    # 4 deleted layers: 1 batched mark + 4 x 4 removals + 1 batched drop, plus the others.
    assert kills >= 20, f"only {kills} steps in the plan"
    print(f"killed at {kills} steps, re-ran each to completion")

    # Random-time kills from outside, inside the window in which the journal exists.
    restore(podman, pristine)
    status, journal_at, ended = run_python_c(podman, kill_after=None)
    assert status == 0 and journal_at < ended
    rng = random.Random(4)
    statuses = []
    for _ in range(4):
        restore(podman, pristine)
        status, _, _ = run_python_c(podman, kill_after=rng.uniform(journal_at, ended))
        statuses.append(status)
        assert_podman_loads(podman)
        assert run_forked(podman, kill_at=None, report=report) == 0
        assert not json.loads(report.read_text())["failed"]
        assert_repaired(podman, info, before, garbage_bytes, pristine_payload, run_images=False)
    print(f"journal window {journal_at:.2f}-{ended:.2f} s; random kills: {statuses}")
    assert_repaired(podman, info, before, garbage_bytes, pristine_payload, run_images=True)
