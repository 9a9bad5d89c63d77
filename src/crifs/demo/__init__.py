"""``crifs demo``: a sandbox with both runtimes' stores, built without any runtime installed.

The sandbox is written into a new directory (kept afterwards so the user can run crifs on it)
and the inventory commands run on it, each printed with the command line that produced it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from crifs.errors import BadInput


def build_sandbox(directory: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """Write the sandbox stores; return their roots (``containerd``, ``cstorage``, ``runroot``)."""
    from crifs.demo.containerd_sandbox import build_containerd_root
    from crifs.demo.cstorage_sandbox import build_cstorage_root
    from crifs.demo.images import demo_images

    if directory is None:
        base = Path(tempfile.mkdtemp(prefix="crifs-demo-"))
    else:
        base = Path(directory)
        if base.exists() and (not base.is_dir() or any(base.iterdir())):
            raise BadInput("demo directory exists and is not empty", path=base)
        base.mkdir(parents=True, exist_ok=True)
    images = demo_images()
    roots = {
        "containerd": build_containerd_root(base / "containerd", images),
        "cstorage": build_cstorage_root(base / "containers-storage", images),
        "runroot": base / "containers-run",
    }
    roots["runroot"].mkdir()
    return roots


def run_demo(directory: str | None = None) -> int:
    from crifs.cli.main import main

    roots = build_sandbox(directory)
    ctd, cst = str(roots["containerd"]), str(roots["cstorage"])
    print(f"crifs demo: sandbox stores written under {roots['containerd'].parent}")
    print(f"  containerd root:            {ctd}")
    print(f"  containers/storage root:    {cst}\n")
    steps = [
        ["--root", ctd, "info"],
        ["--root", cst, "info"],
        ["--root", ctd, "images", "ls"],
        ["--root", cst, "images", "ls"],
        ["--root", ctd, "containers", "ls"],
        ["--root", cst, "containers", "ls"],
        ["--root", ctd, "snapshots", "tree"],
        ["--root", cst, "snapshots", "tree"],
        ["--root", ctd, "-n", "k8s.io", "snapshots", "mounts", "web-1", "/mnt"],
        ["--root", ctd, "-n", "default", "links", "image:demo.example/web:1.0"],
    ]
    worst = 0
    for argv in steps:
        print("$ crifs " + " ".join(argv), flush=True)
        code = main(argv)
        if code >= 2:  # 1 is "findings", which the sandbox plants on purpose
            worst = max(worst, code)
        print(flush=True)
    print("Try: crifs --root " + ctd + " snapshots ls -o json")
    return worst
