"""Faults the demo plants in its sandbox stores, one of each common kind, so ``crifs check``
has something real to find and ``crifs check --repair`` something to fix.

Each planted fault mirrors a failure users hit (the class codes are in crifs.fsck.catalogue):
containerd: an orphan snapshot dir and a ``new-*`` temp dir left by a crash (C1), a snapshotter
record meta.db does not name (C3), a stale ``children`` entry left by GC (C6, containerd#11908),
an expired lease holding an interrupted pull's ``extract-*`` snapshot (C7), a blob file no
record names and an abandoned ingest (C8). containers/storage: a lost ``l/`` link (S1), a
dangling ``l/`` link (S2), an orphan layer dir (S6), an incomplete layer (S10) and a leftover
build layer nothing uses (S11).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from crifs.containerd.encoding import encode_gotime
from crifs.demo.images import DemoFile, extract

if TYPE_CHECKING:
    from crifs.demo.containerd_sandbox import _Backend, _Namespace

LEAK = [DemoFile("var", "dir"), DemoFile("var/cache", "dir"),
        DemoFile("var/cache/leak.bin", "file", bytes(range(256)) * 256)]


def plant_containerd_db_faults(backend: _Backend, ns: _Namespace) -> None:
    """Record faults that live in the two bolt DBs (written afterwards by the sandbox)."""
    from crifs.demo.containerd_sandbox import KIND_ACTIVE, KIND_COMMITTED, NOW

    # C3: the snapshotter committed a layer but the meta.db transaction never happened.
    backend.add(f"{ns.name}/900/sha256:{'c3' * 32}", None, KIND_COMMITTED, LEAK)
    # C6: GC removed a child snapshot and left it in its parent's children bucket.
    parent = next(iter(ns.snapshots))
    parent_rec = ns.snapshots[parent]
    assert isinstance(parent_rec, dict)
    children = parent_rec.setdefault(b"children", {})
    assert isinstance(children, dict)
    children[b"gc-collected-child"] = b""
    # C7: an interrupted pull: an extract-* active snapshot held by a lease that expired.
    key = f"extract-1764590400000000000-AbCd sha256:{'e7' * 32}"
    ns.snapshot(backend, key, parent.decode(), KIND_ACTIVE, LEAK)
    ns.leases = {
        b"interrupted-pull": {
            b"createdat": encode_gotime(NOW),
            b"labels": {b"containerd.io/gc.expire": b"2026-11-02T12:00:00Z"},
            b"snapshots": {b"overlayfs": {key.encode(): b""}},
        }
    }


def plant_containerd_file_faults(root: Path) -> None:
    """Faults that are only files: orphan dirs, an orphan blob, an abandoned ingest."""
    snapshots = root / "io.containerd.snapshotter.v1.overlayfs" / "snapshots"
    extract(LEAK, snapshots / "4711" / "fs")  # C1: crash between mkdir and the DB commit
    (snapshots / "new-2718281828").mkdir()  # C1: Prepare's temp dir, never renamed
    content = root / "io.containerd.content.v1.content"
    data = b"a layer nobody references\n" * 400
    blob = content / "blobs" / "sha256" / hashlib.sha256(data).hexdigest()
    blob.write_bytes(data)  # C8: blob file with no meta.db record in any namespace
    blob.chmod(0o444)
    ingest = content / "ingest" / hashlib.sha256(b"default/7/fetch-abandoned").hexdigest()
    ingest.mkdir(parents=True)
    (ingest / "ref").write_text("default/7/fetch-abandoned")
    (ingest / "data").write_bytes(data[:4096])
    (ingest / "startedat").write_text("2026-11-01T12:00:00Z")
    (ingest / "updatedat").write_text("2026-11-01T12:00:00Z")


def plant_cstorage_faults(root: Path, layers: list[dict[str, object]], links: dict[str, str],
                          add_layer: object) -> None:
    """Faults in a graphroot being built (before layers.json is written)."""
    overlay = root / "overlay"
    # S1: a power cut lost the l/ link of the first image layer.
    first = str(layers[0]["id"])
    os.unlink(overlay / "l" / links[first])
    # S2: a layer was removed but its l/ link stayed.
    os.symlink("../" + "d2" * 32 + "/diff", overlay / "l" / "DANGLINGLINKXXXXXXXXXXXXXX")
    # S6: a layer dir no record knows (an interrupted delete).
    extract(LEAK, overlay / ("5e" * 32) / "diff")
    # S10 and S11: add_layer writes dir, link and record; then mark/age them.
    assert callable(add_layer)
    incomplete, leftover = "10" * 32, "11" * 32
    add_layer(incomplete, None, LEAK)
    add_layer(leftover, None, LEAK)
    for rec in layers:
        if rec["id"] == incomplete:
            rec["flags"] = {"incomplete": True}
        if rec["id"] == leftover:
            rec["names"] = ["buildah-leftover"]
    json.dumps(layers)  # still serialisable
