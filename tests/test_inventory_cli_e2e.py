"""The crifs CLI on stores written by the real runtimes agrees with ctr and podman.

The library-level comparisons live in test_containerd_store.py and test_cstorage_store.py; these
tests drive the command line a user types (``--config``, ``--root``, ``-n``, ``-o json``) while
the daemon runs and after it stops.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crifs.cli.main import main
from ocibuild import Entry, build_layout, layout_to_tar
from runtimes import ContainerdDaemon, Podman

BASE = "example.com/crifs/e2e-base:v1"
APP = "example.com/crifs/e2e-app:v1"


def images() -> dict[str, list[list[Entry]]]:
    base = [
        Entry("etc", "dir"),
        Entry("etc/os-release", data=b"ID=e2e\n"),
        Entry("lib", "symlink", target="usr/lib"),
    ]
    mid = [Entry("usr", "dir"), Entry("usr/lib", "dir"), Entry("usr/lib/x.so", data=b"x" * 5000)]
    top = [
        Entry("app", "dir"),
        Entry("app/run", data=b"#!/bin/sh\n", mode=0o755),
        Entry("etc/os-release", "whiteout"),
    ]
    return {BASE: [base, mid], APP: [base, mid, top]}


def crifs_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    code = main([*argv, "-o", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def ctr_rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()[1:] if line.strip()]


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    build_layout(tmp_path / "layout", images())
    return layout_to_tar(tmp_path / "layout", tmp_path / "layout.tar")


def test_containerd_inventory_through_the_cli(
    containerd: ContainerdDaemon, layout: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for ns in ("default", "k8s.io"):
        containerd.import_image(layout, "example.com/crifs", namespace=ns)
    containerd.ctr("containers", "create", APP, "app-1", namespace="k8s.io")
    top = containerd.ctr("snapshots", "ls", namespace="default").split("\n")[1:]
    committed = [r.split()[0] for r in top if r.strip().endswith("Committed")]
    containerd.ctr("snapshots", "view", "peek", committed[0], namespace="default")
    cfg = str(containerd.config_path)

    def check(running: bool) -> None:
        info = crifs_json(capsys, "--config", cfg, "info")["stores"]
        assert [s["runtime"] for s in info] == ["containerd"]
        assert info[0]["daemon_running"] is running
        assert info[0]["root"]["path"] == str(containerd.root)
        snaps = crifs_json(capsys, "--config", cfg, "snapshots", "ls")["snapshots"]
        for ns in ("default", "k8s.io"):
            got = sorted(
                [s["key"], s["parent"] or "", s["kind"]] for s in snaps if s["namespace"] == ns
            )
            want = expected[ns]["snapshots"]
            assert got == want, ns
            names = sorted(
                i["name"]
                for i in crifs_json(capsys, "--config", cfg, "-n", ns, "images", "ls")["images"]
            )
            assert names == expected[ns]["images"]
            ids = sorted(
                c["id"]
                for c in crifs_json(capsys, "--config", cfg, "containers", "ls", "-n", ns)[
                    "containers"
                ]
            )
            assert ids == expected[ns]["containers"]
        main(["--config", cfg, "-n", "k8s.io", "snapshots", "mounts", "app-1", "/mnt/t"])
        assert capsys.readouterr().out == expected["mounts"]
        usage = crifs_json(capsys, "--config", cfg, "-n", "k8s.io", "snapshots", "usage")
        assert {u["key"]: [u["disk_bytes"], u["inodes"]] for u in usage["usage"]} == expected[
            "usage"
        ]

    expected: dict = {
        "mounts": containerd.ctr("snapshots", "mounts", "/mnt/t", "app-1", namespace="k8s.io")
    }
    expected["usage"] = {
        r[0]: [int(r[1]), int(r[2])]
        for r in ctr_rows(containerd.ctr("snapshots", "usage", "-b", namespace="k8s.io"))
    }
    for ns in ("default", "k8s.io"):
        rows = ctr_rows(containerd.ctr("snapshots", "ls", namespace=ns))
        expected[ns] = {
            "snapshots": sorted([r[0], "", r[1]] if len(r) == 2 else r for r in rows),
            "images": sorted(r[0] for r in ctr_rows(containerd.ctr("images", "ls", namespace=ns))),
            "containers": sorted(
                r[0] for r in ctr_rows(containerd.ctr("containers", "ls", namespace=ns))
            ),
        }
    assert expected["k8s.io"]["containers"] == ["app-1"]
    check(running=True)
    containerd.stop()
    check(running=False)


def test_podman_inventory_through_the_cli(
    podman: Podman, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build_layout(tmp_path / "layout", images())
    podman.pull_layout(tmp_path / "layout", BASE)
    podman.pull_layout(tmp_path / "layout", APP)
    podman.run("create", "--name", "web", APP, "/app/run")
    sel = ["--runtime", "cstorage", "--root", str(podman.root), "--runroot", str(podman.runroot)]
    want_images = {
        i["Id"]: (sorted(i["Names"]), i["Size"])
        for i in json.loads(podman.run("images", "--format", "json"))
    }
    got_images = {
        i["id"]: (sorted(i["names"]), i["size_bytes"])
        for i in crifs_json(capsys, *sel, "images", "ls")["images"]
    }
    assert got_images == want_images
    (want_ctr,) = json.loads(podman.run("ps", "-a", "--format", "json"))
    (got_ctr,) = crifs_json(capsys, *sel, "containers", "ls")["containers"]
    assert got_ctr["id"] == want_ctr["Id"] and got_ctr["names"] == want_ctr["Names"]
    assert got_ctr["image_id"] == want_ctr["ImageID"]
    trees = crifs_json(capsys, *sel, "snapshots", "tree")["trees"]
    assert len(trees) == 1, "both images share their base layer"
    node, chain = trees[0], []
    while True:
        chain.append(node)
        if not node["children"]:
            break
        node = max(node["children"], key=lambda n: len(json.dumps(n)))
    assert [n["kind"] for n in chain] == ["Committed"] * 3 + ["Active"]
    assert chain[-1]["key"] == got_ctr["snapshot_key"]
    info = crifs_json(capsys, *sel, "info")["stores"][0]
    assert info["counts"]["layers"] == 4 and info["counts"]["containers"] == 1
