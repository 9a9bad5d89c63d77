"""Benchmark: read an uncompressed OCI layer tar of 100,000 entries, crifs vs ``tar -tf``.

Writes a seeded layer tar (directories, files with data, symlinks, hard links, whiteouts,
opaque markers; pax format as image builders write) and wraps it as a one-layer OCI image
layout and OCI archive (the layer blob is the same bytes). Then times, best of ``--repeat``,
warm cache: ``tar -tf`` (the goal's yardstick), ``crifs links`` on each form crifs accepts,
Python's ``tarfile`` and bare libarchive-c listings, and ``read_layer_tar`` alone inside one
interpreter (to separate start-up from reading). Exit 0 when every run worked and the reader
saw every entry, 1 when it did not, 2 when a command failed. See bench/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from links_measure import (
    TIME,
    Command,
    crifs_argv,
    crifs_supports_links,
    crifs_verdicts,
    goal_line,
    missing_tool,
    peak_total_pss_mb,
    print_table,
    run_rounds,
)

GENERATOR_VERSION = 2
FANOUT = 8
DATA = bytes(range(256)) * 128  # 32 KiB: the content of every file, cut to its size
# Share of the entries per kind.
ENTRY_KINDS = (("dir", 0.06), ("file", 0.75), ("symlink", 0.14), ("hardlink", 0.03),
               ("whiteout", 0.015), ("opaque", 0.005))
SIZE_RANGES = ((0, 1024), (1024, 8192), (8192, 32768))  # file sizes: 60%, 35%, 5%
SIZE_SHARES = (0.60, 0.35, 0.05)
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"

TARFILE_SCRIPT = """
import sys, tarfile
with tarfile.open(sys.argv[1]) as tar:
    print(sum(1 for _ in tar))
"""
LIBARCHIVE_SCRIPT = """
import sys, libarchive
with libarchive.file_reader(sys.argv[1]) as archive:
    print(sum(1 for _ in archive))
"""
READER_SCRIPT = """
import json, sys, time
started = time.perf_counter()
from crifs.oci.tarlayer import read_layer_tar
imported = time.perf_counter()
listing = read_layer_tar(sys.argv[1], index=0, name="bench")
done = time.perf_counter()
print(json.dumps({"import_s": imported - started, "read_s": done - imported,
                  "entries": len(listing.entries), "whiteouts": len(listing.whiteouts),
                  "opaque": len(listing.opaque), "problems": len(listing.problems)}))
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000, help="tar members")
    parser.add_argument("--seed", type=int, default=1, help="random seed")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per command")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="write the tars in DIR and keep them; reuse them when already there")
    return parser.parse_args(argv)


def write_layer(path: Path, entries: int, seed: int) -> Counter[str]:
    """Write the layer tar; return how many members of each kind it holds.

    Members come in walk order (a directory, then what it holds), parents before children,
    hard links after the file they name, as ``docker build`` and buildkit write them.
    """
    rng = random.Random(seed)
    kinds = rng.choices([k for k, _ in ENTRY_KINDS], [w for _, w in ENTRY_KINDS], k=entries)
    counts = Counter(kinds)
    dir_count = max(1, counts["dir"])
    dirs: list[str] = [""]
    for k in range(1, dir_count + 1):
        parent = dirs[(k - 1) // FANOUT]
        dirs.append(f"{parent}/d{k}" if parent else f"d{k}")
    # every non-directory member goes to a random directory; then each directory is written
    # with its members, directories in index order (a parent's index is below its children's)
    placed: dict[int, list[tuple[str, int]]] = {}
    for n, kind in enumerate(kinds):
        if kind != "dir":
            placed.setdefault(rng.randrange(len(dirs)), []).append((kind, n))
    files: list[str] = []
    opaque_dirs: set[int] = set()
    written: Counter[str] = Counter()
    data = io.BytesIO(DATA)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for k, where in enumerate(dirs):
            if k:
                tar.addfile(_info(where + "/", tarfile.DIRTYPE, 0o755))
                written["dir"] += 1
            prefix = where + "/" if where else ""
            for kind, n in placed.get(k, ()):
                if (kind == "hardlink" and not files) or (kind == "opaque" and k in opaque_dirs):
                    kind = "file"  # nothing to link to yet / one marker a directory: a file
                if kind == "file":
                    low, high = rng.choices(SIZE_RANGES, SIZE_SHARES)[0]
                    info = _info(f"{prefix}f{n}", tarfile.REGTYPE, 0o644)
                    info.size = rng.randrange(low, high)
                    data.seek(0)
                    tar.addfile(info, data)
                    files.append(info.name)
                elif kind == "symlink":
                    info = _info(f"{prefix}l{n}", tarfile.SYMTYPE, 0o777)
                    info.linkname = _link_target(rng, where, files, dirs, n)
                    tar.addfile(info)
                elif kind == "hardlink":
                    info = _info(f"{prefix}h{n}", tarfile.LNKTYPE, 0o644)
                    info.linkname = rng.choice(files)
                    tar.addfile(info)
                elif kind == "whiteout":
                    tar.addfile(_info(f"{prefix}.wh.gone{n}", tarfile.REGTYPE, 0o644))
                else:
                    opaque_dirs.add(k)
                    tar.addfile(_info(f"{prefix}.wh..wh..opq", tarfile.REGTYPE, 0o644))
                written[kind] += 1
    return written


def _info(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = kind, mode, 1_700_000_000
    info.uname = info.gname = "root"
    return info


def _link_target(rng: random.Random, where: str, files: list[str], dirs: list[str],
                 n: int) -> str:
    """A symlink target as images hold them: relative to a sibling or up with ``..``,
    absolute, to a directory, and about one in five broken."""
    roll = rng.random()
    depth = where.count("/") + 1 if where else 0
    if roll < 0.35 and files:
        return "../" * depth + rng.choice(files)
    if roll < 0.60 and files:
        return "/" + rng.choice(files)
    if roll < 0.80:
        return "/" + rng.choice(dirs[1:] or ["."])
    if roll < 0.90:
        return f"missing{n}"
    return f"/usr/lib/missing{n}.so"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_oci(layer: Path, layout: Path, archive: Path) -> None:
    """A one-layer OCI image layout around ``layer`` (hard-linked as its blob), and the same
    layout as an uncompressed OCI archive."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    layer_digest = sha256_file(layer)
    os.link(layer, blobs / layer_digest)

    def blob(document: dict[str, object]) -> dict[str, object]:
        data = json.dumps(document, separators=(",", ":")).encode()
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    config = blob({"architecture": "amd64", "os": "linux", "config": {},
                   "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]}})
    manifest = blob({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
        "layers": [{"mediaType": LAYER_MEDIA_TYPE, "digest": f"sha256:{layer_digest}",
                    "size": layer.stat().st_size}],
    })
    (layout / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", **manifest,
                       "annotations": {"org.opencontainers.image.ref.name": "bench"}}],
    }))
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("oci-layout", "index.json"):
            tar.add(layout / name, arcname=name)
        for blob_path in sorted(blobs.iterdir()):
            tar.add(blob_path, arcname=f"blobs/sha256/{blob_path.name}")


def prepare(base: Path, entries: int, seed: int) -> tuple[Path, Path, Path, Counter[str]]:
    name = f"layer-e{entries}-seed{seed}"
    layer, layout, archive = (base / f"{name}.tar", base / f"{name}-oci-layout",
                              base / f"{name}-oci-archive.tar")
    marker = base / f"{name}.json"
    params = {"version": GENERATOR_VERSION, "entries": entries, "seed": seed}
    if marker.exists() and json.loads(marker.read_text()).get("params") == params:
        print(f"reusing {layer} and its OCI wrappers")
        return layer, layout, archive, Counter(json.loads(marker.read_text())["counts"])
    for stale in (layer, archive):
        stale.unlink(missing_ok=True)
    shutil.rmtree(layout, ignore_errors=True)
    started = time.perf_counter()
    counts = write_layer(layer, entries, seed)
    write_oci(layer, layout, archive)
    seconds = time.perf_counter() - started
    marker.write_text(json.dumps({"params": params, "counts": counts, "build_seconds": seconds}))
    print(f"wrote {layer} ({layer.stat().st_size / 1e6:.0f} MB) and its OCI layout and archive "
          f"in {seconds:.1f}s")
    return layer, layout, archive, counts


def crifs_accepts(target: Path) -> str | None:
    """None unless ``crifs links TARGET`` rejects it as bad input (exit 2): then its one-line
    reason. Any other failure is left for the timed runs to report."""
    proc = subprocess.run(crifs_argv("links", str(target), "-o", "json"), capture_output=True,
                          text=True)
    if proc.returncode != 2:
        return None
    lines = proc.stderr.strip().splitlines()
    return f"not accepted (exit {proc.returncode}): {lines[-1] if lines else ''}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("tar", TIME):
        if missing_tool(tool):
            print(f"cannot run: {tool} missing", file=sys.stderr)
            return 2
    base = args.keep or Path(tempfile.mkdtemp(prefix="crifs-bench-tar-", dir="/var/tmp"))
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="crifs-bench-out-", dir="/var/tmp"))
    try:
        return run(args, base, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)


def run(args: argparse.Namespace, base: Path, work: Path) -> int:
    layer, layout, archive, counts = prepare(base, args.entries, args.seed)
    members = sum(counts.values())
    expected_entries = members - counts["whiteout"] - counts["opaque"]
    crifs_missing = crifs_supports_links()
    print(f"layer: {members:,} members: " + ", ".join(f"{k} {n:,}" for k, n in counts.items()))
    readings: list[dict[str, float]] = []
    reader_out = work / "reader.json"
    commands = [
        tar := Command("tar -tf LAYER", ["tar", "-tf", str(layer)], stdout=work / "tar.out"),
        layer_cmd := Command("crifs links LAYER -o json",
                             crifs_argv("links", str(layer), "-o", "json"), ok_codes=(0, 1),
                             stdout=work / "crifs-layer.json"),
        archive_cmd := Command("crifs links OCI-ARCHIVE -o json",
                               crifs_argv("links", str(archive), "-o", "json"), ok_codes=(0, 1),
                               stdout=work / "crifs-archive.json"),
        layout_cmd := Command("crifs links OCI-LAYOUT -o json",
                              crifs_argv("links", str(layout), "-o", "json"), ok_codes=(0, 1),
                              stdout=work / "crifs-layout.json"),
        reader := Command("read_layer_tar (whole process)",
                          [sys.executable, "-c", READER_SCRIPT, str(layer)], stdout=reader_out),
        Command("python tarfile listing", [sys.executable, "-c", TARFILE_SCRIPT, str(layer)]),
        Command("python libarchive-c listing",
                [sys.executable, "-c", LIBARCHIVE_SCRIPT, str(layer)]),
        startup := Command("crifs links --help (crifs start-up)", crifs_argv("links", "--help"),
                           skipped=crifs_missing),
        Command("python -c pass (interpreter start)", [sys.executable, "-c", "pass"]),
    ]
    crifs_rows = [layer_cmd, archive_cmd, layout_cmd]
    for command, target in zip(crifs_rows, (layer, archive, layout), strict=True):
        command.skipped = crifs_missing or crifs_accepts(target)
    if crifs_missing:
        reader.skipped = crifs_missing
    reader.after = lambda: readings.append(json.loads(reader_out.read_text()))
    for path in (layer, archive):  # warm the page cache, untimed
        with open(path, "rb") as source:
            while source.read(1 << 22):
                pass
    run_rounds(commands, args.repeat)
    print_table(f"layer tar of {members:,} members: best of {args.repeat}, warm cache",
                commands, tar)
    status = 2 if any(c.failure for c in commands) or not tar.samples else 0
    if tar.samples and tar.stdout:
        listed = len(tar.stdout.read_bytes().splitlines())
        print(f"tar -tf listed {listed:,} members")
    if readings:
        best = min(readings, key=lambda r: r["read_s"])
        print(f"read_layer_tar alone: best {best['read_s']:.3f}s read + {best['import_s']:.3f}s "
              f"import; {best['entries']:,.0f} entries, {best['whiteouts']:,.0f} whiteouts, "
              f"{best['opaque']:,.0f} opaque, {best['problems']:,.0f} problems")
        if tar.samples:
            print(goal_line("read_layer_tar alone / tar -tf", best["read_s"] / tar.best, 2))
        if best["entries"] != expected_entries:
            print(f"WRONG: the reader saw {best['entries']:,.0f} entries, the tar holds "
                  f"{expected_entries:,}")
            status = max(status, 1)
    worked = [c for c in crifs_rows if c.samples and not c.failure]
    for command in worked:
        if tar.samples:
            label = command.label.split(" -o")[0]
            print(goal_line(f"{label} / tar -tf", command.best / tar.best, 2)
                  + (f"; without its start-up {command.best - startup.best:.3f}s"
                     if startup.samples else ""))
    if worked:
        total, processes = peak_total_pss_mb(worked[0].argv)
        print(f"{worked[0].label}: peak memory of all {processes} processes (sum of PSS, "
              f"sampled) {total:.1f} MB")
    for command in worked:
        if command.stdout:
            _, summary = crifs_verdicts(command.stdout)
            print(f"{command.label}: {sum(summary.values()):,} symlinks audited "
                  f"(the tar holds {counts['symlink']:,}): "
                  + ", ".join(f"{v} {n:,}" for v, n in sorted(summary.items())))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
