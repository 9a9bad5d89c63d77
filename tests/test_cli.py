"""The CLI on the demo sandbox: verbs, JSON shapes, exit codes, bad input. No runtime needed."""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from crifs.cli.main import main
from crifs.demo import build_sandbox


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_sandbox(tmp_path_factory.mktemp("demo") / "sandbox", faults=False)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    code, out, err = run(capsys, *argv, "-o", "json")
    assert code == 0, err
    return json.loads(out)


def test_snapshots_ls_json_lists_every_namespace(sandbox, capsys):
    doc = run_json(capsys, "--root", str(sandbox["containerd"]), "snapshots", "ls")
    assert doc["schema"] == "crifs/snapshots/v1"
    by_ns: dict[str, list[dict]] = {}
    for s in doc["snapshots"]:
        by_ns.setdefault(s["namespace"], []).append(s)
    assert sorted(by_ns) == ["default", "k8s.io"]
    assert len(by_ns["default"]) == 3
    assert len(by_ns["k8s.io"]) == 5
    active = [s for s in by_ns["k8s.io"] if s["kind"] == "Active"]
    assert [s["key"] for s in active] == ["web-1"]
    for s in doc["snapshots"]:
        assert s["runtime"] == "containerd"
        assert s["path"].endswith(f"/snapshots/{s['id']}/fs")
        assert os.path.isdir(s["path"])


def test_options_after_the_verb_override_those_before(sandbox, capsys):
    doc = run_json(
        capsys,
        "--root",
        "/nonexistent",
        "snapshots",
        "ls",
        "--root",
        str(sandbox["containerd"]),
        "-n",
        "default",
    )
    assert {s["namespace"] for s in doc["snapshots"]} == {"default"}


def test_cstorage_layers_are_snapshots(sandbox, capsys):
    doc = run_json(capsys, "--root", str(sandbox["cstorage"]), "snapshots", "ls")
    kinds = sorted(s["kind"] for s in doc["snapshots"])
    assert kinds == ["Active"] + ["Committed"] * 4
    for s in doc["snapshots"]:
        assert s["runtime"] == "cstorage" and s["namespace"] is None
        assert s["key"] == s["id"] and s["path"].endswith(f"/overlay/{s['id']}/diff")


def test_tree_json_nests_children_under_parents(sandbox, capsys):
    doc = run_json(
        capsys, "--root", str(sandbox["containerd"]), "-n", "k8s.io", "snapshots", "tree"
    )
    assert doc["schema"] == "crifs/snapshot-tree/v1"
    (root,) = doc["trees"]
    assert root["parent"] is None and len(root["children"]) == 2
    depth, node = 0, root
    while node["children"]:
        node = max(node["children"], key=lambda n: len(json.dumps(n)))
        depth += 1
    assert node["key"] == "web-1" and depth == 3
    assert node["usage"]["inodes"] >= 1


def test_tree_dot_and_text(sandbox, capsys):
    code, out, _ = run(capsys, "--root", str(sandbox["cstorage"]), "snapshots", "tree", "-o", "dot")
    assert code == 0 and out.startswith("digraph snapshots {") and out.count("->") == 4
    code, out, _ = run(capsys, "--root", str(sandbox["containerd"]), "snapshots", "tree")
    assert code == 0 and "web-1" in out and "Committed" in out


def test_yaml_output_is_the_same_document(sandbox, capsys):
    as_json = run_json(capsys, "--root", str(sandbox["containerd"]), "images", "ls")
    code, out, _ = run(capsys, "--root", str(sandbox["containerd"]), "images", "ls", "-o", "yaml")
    assert code == 0 and yaml.safe_load(out) == as_json


def test_images_and_containers(sandbox, capsys):
    images = run_json(capsys, "--root", str(sandbox["containerd"]), "images", "ls")["images"]
    names = {(i["namespace"], i["name"]) for i in images}
    assert ("default", "demo.example/web:1.0") in names
    assert ("k8s.io", "demo.example/tools:2.1") in names
    assert all(i["size_bytes"] > 0 for i in images)
    containers = run_json(capsys, "--root", str(sandbox["cstorage"]), "containers", "ls")
    (c,) = containers["containers"]
    assert c["names"] == ["web-1"] and c["runtime"] == "cstorage"


def test_mounts_prints_the_overlay_command(sandbox, capsys):
    code, out, _ = run(
        capsys,
        "--root",
        str(sandbox["containerd"]),
        "-n",
        "k8s.io",
        "snapshots",
        "mounts",
        "web-1",
        "/mnt/x",
    )
    assert code == 0
    assert out.startswith("mount -t overlay overlay /mnt/x -o ")
    lower = out.split("lowerdir=")[1].split(",")[0].strip().split(":")
    assert len(lower) == 3 and all(p.endswith("/fs") for p in lower)


def test_info_lists_both_runtimes_when_given_their_roots(sandbox, capsys):
    for runtime, root in (("containerd", sandbox["containerd"]), ("cstorage", sandbox["cstorage"])):
        doc = run_json(capsys, "--root", str(root), "info")
        (store,) = doc["stores"]
        assert store["runtime"] == runtime
        assert store["root"]["exists"] is True
        assert store["daemon_running"] in (False, None)


def test_unknown_key_exits_1(sandbox, capsys):
    code, out, err = run(
        capsys, "--root", str(sandbox["containerd"]), "snapshots", "info", "no-such-key"
    )
    assert code == 1 and out == "" and "no-such-key" in err and "Traceback" not in err


def test_missing_root_exits_2_with_one_line(tmp_path, capsys):
    missing = tmp_path / "nope"
    code, out, err = run(capsys, "--root", str(missing), "snapshots", "ls")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and str(missing) in err


@pytest.mark.parametrize("runtime", ["containerd", "cstorage"])
def test_missing_root_with_explicit_runtime_exits_2(tmp_path, capsys, runtime):
    code, _, err = run(capsys, "--runtime", runtime, "--root", str(tmp_path / "x"), "images", "ls")
    assert code == 2 and str(tmp_path / "x") in err and err.count("\n") == 1


def test_corrupt_meta_db_exits_2_naming_the_file(sandbox, tmp_path, capsys):
    root = tmp_path / "containerd"
    shutil.copytree(sandbox["containerd"], root, symlinks=True)
    meta = root / "io.containerd.metadata.v1.bolt" / "meta.db"
    data = bytearray(meta.read_bytes())
    data[16:32] = b"\xff" * 16  # meta0 magic/version/page size
    data[4096 + 16 : 4096 + 32] = b"\xff" * 16  # meta1
    meta.write_bytes(bytes(data))
    code, out, err = run(capsys, "--root", str(root), "snapshots", "ls")
    assert code == 2 and out == "" and str(meta) in err and err.count("\n") == 1


def test_malformed_layers_json_exits_2_naming_the_file(sandbox, tmp_path, capsys):
    root = tmp_path / "storage"
    shutil.copytree(sandbox["cstorage"], root, symlinks=True)
    layers = root / "overlay-layers" / "layers.json"
    layers.write_text(layers.read_text()[:-7])
    code, out, err = run(capsys, "--root", str(root), "images", "ls")
    assert code == 2 and out == "" and str(layers) in err and err.count("\n") == 1


def test_non_utf8_file_names_are_escaped_with_b64(sandbox, tmp_path, capsys):
    root = tmp_path / "storage"
    shutil.copytree(sandbox["cstorage"], root, symlinks=True)
    (root / "overlay" / os.fsdecode(b"orphan-\xff")).mkdir()
    code, _, err = run(capsys, "--root", str(root), "snapshots", "ls", "-o", "json")
    assert code == 0, err
    from crifs.model import Snapshot, SnapshotKind
    from crifs.report.values import record

    rec = record(
        Snapshot(
            "cstorage",
            os.fsdecode(b"k\xffy"),
            SnapshotKind.COMMITTED,
            "overlay",
            path=os.fsdecode(b"/x/\xfe"),
        )
    )
    assert rec["key"] == "k\\xffy" and base64.b64decode(rec["key_b64"]) == b"k\xffy"
    assert rec["path"] == "/x/\\xfe" and base64.b64decode(rec["path_b64"]) == b"/x/\xfe"


def test_demo_runs_the_inventory(tmp_path, capsys):
    code, out, err = run(capsys, "demo", "--dir", str(tmp_path / "d"))
    assert code == 0, err
    assert "demo.example/web:1.0" in out and "mount -t overlay" in out
    code, _, err = run(capsys, "demo", "--dir", str(tmp_path / "d"))
    assert code == 2 and "not empty" in err


def test_global_options_are_hoisted_in_every_spelling():
    from crifs.cli.common import hoist_global_options

    argv = ["snapshots", "ls", "--root=/a", "-ojson", "-n", "k8s.io", "--snapshotter", "x",
            "--", "-o", "yaml"]
    assert hoist_global_options(argv) == [
        "--root=/a", "-ojson", "-n", "k8s.io", "snapshots", "ls", "--snapshotter", "x",
        "--", "-o", "yaml",
    ]


def test_no_arguments_prints_help(capsys):
    code, out, err = run(capsys)
    assert code in (0, 2) and "Usage" in out + err


def test_usage_errors_exit_2_with_one_line(capsys):
    code, out, err = run(capsys, "snapshots", "ls", "--bogus")
    assert code == 2 and out == "" and err.count("\n") == 1 and "--bogus" in err
    code, out, err = run(capsys, "-o", "xml", "images", "ls")
    assert code == 2 and "xml" in err and err.count("\n") == 1
