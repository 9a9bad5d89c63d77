"""``crifs check`` / ``crifs gc`` on the demo sandbox: the planted faults are found, the JSON
shape holds, exit codes follow fsck(8), the dry run changes nothing and ``--repair`` leaves a
clean store. No runtime needed (the real-runtime proofs are in test_fsck_*.py and
test_repair*.py)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

import pytest

from crifs.cli.main import main
from crifs.demo import build_sandbox

PLANTED_CONTAINERD = {"C1", "C3", "C6", "C7", "C8"}
PLANTED_CSTORAGE = {"S1", "S2", "S6", "S10", "S11"}


@pytest.fixture()
def sandbox(tmp_path: Path) -> dict[str, Path]:
    return build_sandbox(tmp_path / "sandbox")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def cst(sandbox: dict[str, Path]) -> list[str]:
    return ["--root", str(sandbox["cstorage"]), "--runroot", str(sandbox["runroot"])]


def tree_digest(root: Path) -> str:
    """Names, kinds, sizes and link targets of everything under root (content of files too)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(
                os.path.join(dirpath, d))]):
            p = os.path.join(dirpath, name)
            h.update(p.encode(errors="surrogateescape"))
            if os.path.islink(p):
                h.update(os.readlink(p).encode(errors="surrogateescape"))
            elif os.path.isfile(p):
                h.update(Path(p).read_bytes())
    return h.hexdigest()


def test_check_finds_every_planted_fault(sandbox, capsys):
    code, out, err = run(capsys, "--root", str(sandbox["containerd"]), "check", "-o", "json")
    assert code == 4, err
    doc = json.loads(out)
    assert doc["schema"] == "crifs/check/v1"
    assert {f["code"] for f in doc["findings"]} >= PLANTED_CONTAINERD
    for f in doc["findings"]:
        assert set(f) >= {"code", "severity", "runtime", "namespace", "object", "path",
                          "message", "reclaimable", "repair", "evidence"}
        assert f["severity"] in ("error", "warning", "info")
    code, out, err = run(capsys, *cst(sandbox), "check", "-o", "json")
    assert code == 4, err
    doc = json.loads(out)
    assert {f["code"] for f in doc["findings"]} >= PLANTED_CSTORAGE
    total = doc["summary"]["reclaimable"]["disk_bytes"]
    assert total == sum(f["reclaimable"]["disk_bytes"] for f in doc["findings"]
                        if f["reclaimable"])
    assert total > 0


def test_clean_sandbox_is_clean(tmp_path, capsys):
    roots = build_sandbox(tmp_path / "clean", faults=False)
    for argv in (["--root", str(roots["containerd"])],
                 ["--root", str(roots["cstorage"]), "--runroot", str(roots["runroot"])]):
        code, out, err = run(capsys, *argv, "check")
        assert code == 0, out + err
        assert "clean" in out


def test_gc_dry_run_prints_the_plan_and_changes_nothing(sandbox, capsys):
    before = tree_digest(sandbox["cstorage"])
    code, out, err = run(capsys, *cst(sandbox), "gc")
    assert code == 0, err
    assert "plan for cstorage" in out and "delete layer" in out
    assert tree_digest(sandbox["cstorage"]) == before
    code, out, err = run(capsys, *cst(sandbox), "gc", "-o", "json")
    doc = json.loads(out)
    assert doc["schema"] == "crifs/gc/v1"
    assert all(f["repair"]["gc"] for f in doc["findings"])


def test_repair_cstorage_corrects_everything(sandbox, capsys):
    code, out, err = run(capsys, *cst(sandbox), "check", "--repair", "-o", "json")
    assert code == 1, out + err
    doc = json.loads(out)
    assert doc["repair"]["applied"] and not doc["repair"]["failed"]
    assert [f for f in doc["remaining"] if f["severity"] != "info"] == []
    code, out, err = run(capsys, *cst(sandbox), "check")
    assert code == 0, out + err


def test_repair_containerd_offline_fixes_files_and_prints_ctr_commands(sandbox, capsys):
    code, out, err = run(capsys, "--root", str(sandbox["containerd"]), "check", "--repair")
    assert code == 4, out + err  # DB records are left for ctr
    assert "run: ctr -n default" in out
    code, out, err = run(capsys, "--root", str(sandbox["containerd"]), "check", "-o", "json")
    left = {f["code"] for f in json.loads(out)["findings"]}
    assert "C1" not in left
    assert not (sandbox["containerd"] / "io.containerd.snapshotter.v1.overlayfs" / "snapshots"
                / "4711").exists()


def test_only_and_bad_max_age(sandbox, capsys):
    code, out, err = run(capsys, *cst(sandbox), "check", "--only", "S2", "-o", "json")
    assert code == 4
    assert {f["code"] for f in json.loads(out)["findings"]} == {"S2"}
    code, out, err = run(capsys, *cst(sandbox), "check", "--only", "Z9")
    assert code == 2 and "unknown finding class" in err
    code, out, err = run(capsys, *cst(sandbox), "check", "--max-age", "soon")
    assert code == 2 and "not a duration" in err


def test_max_age_keeps_young_unreferenced_layers(sandbox, capsys):
    code, out, err = run(capsys, *cst(sandbox), "check", "--max-age", "1000w", "-o", "json")
    assert "S11" not in {f["code"] for f in json.loads(out)["findings"]}


def test_demo_shows_check_and_repair(tmp_path, capsys):
    code, out, err = run(capsys, "demo", "--dir", str(tmp_path / "d"))
    assert code == 0, err
    assert "crifs --root" in out and "check --repair" in out
    assert "after repair" in out


def test_non_utf8_orphan_is_reported_exactly_and_removed_without_following_links(
        sandbox, tmp_path, capsys):
    sentinel = tmp_path / "host-file"
    sentinel.write_bytes(b"keep me\n")
    orphan = os.fsencode(sandbox["cstorage"] / "overlay") + b"/bad\xffname"
    os.makedirs(orphan + b"/diff")
    with open(orphan + b"/diff/f\xfe", "wb") as f:
        f.write(b"x" * 5000)
    os.symlink(os.fsencode(sentinel), orphan + b"/diff/to-host")
    code, out, err = run(capsys, *cst(sandbox), "check", "--only", "S6", "-o", "json")
    found = {f["object"]: f for f in json.loads(out)["findings"]}
    bad = found["bad\\xffname"]
    assert base64.b64decode(bad["object_b64"]) == b"bad\xffname"
    assert base64.b64decode(bad["path_b64"]) == orphan
    code, out, err = run(capsys, *cst(sandbox), "gc", "--apply", "--only", "S6")
    assert code == 0, out + err
    assert not os.path.lexists(orphan)
    assert sentinel.read_bytes() == b"keep me\n"
