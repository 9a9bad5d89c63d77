"""``crifs demo``: a sandbox with both runtimes' stores, built without any runtime installed.

The sandbox is written into a new directory (kept afterwards so the user can run crifs on it)
and the inventory commands run on it, each printed with the command line that produced it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from crifs.errors import BadInput


def build_sandbox(directory: str | os.PathLike[str] | None = None, *, faults: bool = True
                  ) -> dict[str, Path]:
    """Write the sandbox stores; return their roots (``containerd``, ``cstorage``, ``runroot``).

    ``faults`` plants the faults of ``crifs.demo.faults`` for ``crifs check`` to find.
    """
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
        "containerd": build_containerd_root(base / "containerd", images, faults=faults),
        "cstorage": build_cstorage_root(base / "containers-storage", images, faults=faults),
        "runroot": base / "containers-run",
    }
    roots["runroot"].mkdir(mode=0o700)
    return roots


def run_demo(directory: str | None = None) -> int:
    from crifs.cli.main import main

    roots = build_sandbox(directory)
    ctd, cst = str(roots["containerd"]), str(roots["cstorage"])
    print(f"crifs demo: sandbox stores written under {roots['containerd'].parent}")
    print(f"  containerd root:            {ctd}")
    print(f"  containers/storage root:    {cst}\n")
    run = str(roots["runroot"])
    # (argv, exit codes that are expected): check exits 4 on problems left and 1 when it
    # corrected them (fsck); links exits 1 for the links the sandbox breaks on purpose.
    fine, check_codes = {0, 1}, {0, 1, 4}
    steps: list[tuple[list[str], set[int]]] = [
        (["--root", ctd, "info"], fine),
        (["--root", cst, "info"], fine),
        (["--root", ctd, "images", "ls"], fine),
        (["--root", cst, "images", "ls"], fine),
        (["--root", ctd, "containers", "ls"], fine),
        (["--root", cst, "containers", "ls"], fine),
        (["--root", ctd, "snapshots", "tree"], fine),
        (["--root", cst, "snapshots", "tree"], fine),
        (["--root", ctd, "-n", "k8s.io", "snapshots", "mounts", "web-1", "/mnt"], fine),
        (["--root", ctd, "-n", "default", "links", "image:demo.example/web:1.0"], fine),
        (["--root", ctd, "check"], check_codes),
        (["--root", cst, "--runroot", run, "check"], check_codes),
        (["--root", cst, "--runroot", run, "gc"], fine),
        (["--root", ctd, "check", "--repair"], check_codes),
        (["--root", cst, "--runroot", run, "check", "--repair"], check_codes),
        (["--root", cst, "--runroot", run, "check"], check_codes),
    ]
    worst = 0
    for argv, expected in steps:
        print("$ crifs " + " ".join(argv), flush=True)
        code = main(argv)
        if code not in expected:
            worst = max(worst, code, 2)
        print(flush=True)
    print("Try: crifs --root " + ctd + " snapshots ls -o json")
    return worst
