"""Benchmark: ``crifs check`` against ``du -s`` on a 2,000-layer store of each runtime.

Builds, with the real runtimes, a containers/storage store (``podman pull`` of ``--images``
images holding ``--layers`` layers together) and a containerd store (``ctr images import`` of the
same images: as many snapshots), each layer holding ``--files`` small files, and plants what a
check has to measure: one image whose ``--garbage`` own layers nothing references any more (its
record removed and those layers dated 2020 for c/storage; ``ctr images rm`` without GC for
containerd) and ``--orphans`` layer dirs no record names. Then times, in interleaved rounds, best of
``--repeat``::

    du -s ROOT
    python -m crifs --runtime cstorage --root R --runroot RR check -o json
    python -m crifs --runtime containerd --root R check -o json

and prints their ratio (goal: check <= 0.1 x du; the default check never walks the contents of
referenced layers, only the orphans it measures). ``--cold`` adds rounds with the page and
dentry caches dropped before every command. Exit status: 0 the checks found what was planted,
1 they did not, 2 a command failed or a prerequisite is missing.

Needs root, podman and containerd (the test harness in ``tests/runtimes.py``). See
bench/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from links_measure import Command, crifs_argv, filesystem_type, goal_line, measure  # noqa: E402
from ocibuild import Entry, build_layout, layer, layout_to_tar  # noqa: E402
from runtimes import (  # noqa: E402 - reuses the test harness, put on sys.path above
    CONTAINERD_TOOLS,
    PODMAN_TOOLS,
    ContainerdDaemon,
    Podman,
    missing_prerequisites,
    unmount_under,
)

NAMESPACE = "k8s.io"
REF = "bench.example/check-du/img{:02d}:v1"
OLD = "2020-01-01T00:00:00Z"  # older than check's default --max-age (24h)
GOAL = 0.1


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2000, help="layers (= snapshots) in all")
    parser.add_argument("--images", type=int, default=20, help="images sharing those layers")
    parser.add_argument("--shared", type=int, default=5, help="base layers every image shares")
    parser.add_argument("--files", type=int, default=100, help="files in each layer")
    parser.add_argument("--garbage", type=int, default=20,
                        help="layers only the removed image 0 had (unreferenced afterwards)")
    parser.add_argument("--orphans", type=int, default=5, help="layer dirs without a record")
    parser.add_argument("--containers", type=int, default=3, help="containers (RW layers)")
    parser.add_argument("--runtime", choices=("both", "cstorage", "containerd"), default="both")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds (best wins)")
    parser.add_argument("--cold", action="store_true",
                        help="also time rounds with caches dropped before every command")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="build the stores in DIR and keep them; reuse them if built")
    args = parser.parse_args(argv)
    if (args.layers < args.shared + args.garbage + args.images
            or args.images < args.containers + 2):
        parser.error("need layers >= shared + garbage + images, images >= containers + 2")
    return args


# -- the images -------------------------------------------------------------------------------


def chains(args: argparse.Namespace) -> list[list[str]]:
    """Layer names per image, bottom-up: ``--shared`` common ones, then the image's own.
    Image 0 (the one made garbage) has ``--garbage`` own layers; the others share the rest."""
    shared = [f"base{i:03d}" for i in range(args.shared)]
    unique, extra = divmod(args.layers - args.shared - args.garbage, args.images - 1)
    out = [shared + [f"img00-{i:04d}" for i in range(args.garbage)]]
    for n in range(1, args.images):
        count = unique + (extra if n == 1 else 0)
        out.append(shared + [f"img{n:02d}-{i:04d}" for i in range(count)])
    return out


def layer_tar(name: str, files: int) -> bytes:
    """``files`` small files (0-2 KiB, seeded by the layer name) in four directories."""
    rng = random.Random(name)
    entries = [Entry("opt", "dir"), Entry(f"opt/{name}", "dir")]
    per_dir = -(-files // 4)
    for i in range(files):
        directory = f"opt/{name}/d{i // per_dir}"
        if i % per_dir == 0:
            entries.append(Entry(directory, "dir"))
        entries.append(Entry(f"{directory}/f{i:03d}", data=rng.randbytes(rng.randrange(2048))))
    return layer(*entries)


def write_layout(base: Path, args: argparse.Namespace) -> Path:
    layout = base / "layout"
    if (layout / "index.json").exists():
        return layout
    shutil.rmtree(layout, ignore_errors=True)
    tars: dict[str, bytes] = {}
    images: dict[str, list[bytes]] = {}
    for n, names in enumerate(chains(args)):
        images[REF.format(n)] = [tars.setdefault(name, layer_tar(name, args.files))
                                 for name in names]
    build_layout(layout, images)
    return layout


# -- the stores -------------------------------------------------------------------------------


@dataclass
class BenchStore:
    """One built store: what to time and what its check must find."""

    runtime: str
    root: Path
    crifs_args: list[str]
    planted: dict[str, int]
    build_seconds: float
    counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Built:
    """What a ``--keep`` marker file records about a finished store."""

    planted: dict[str, int]
    build_seconds: float


def read_marker(marker: Path, params: dict[str, int]) -> Built | None:
    """The finished store's record when it was built with ``params``."""
    if not marker.exists():
        return None
    data = json.loads(marker.read_text())
    if data.get("params") != params:
        return None
    return Built(dict(data["planted"]), float(data["build_seconds"]))


def write_marker(marker: Path, params: dict[str, int], built: Built) -> None:
    marker.write_text(json.dumps({"params": params, "planted": built.planted,
                                  "build_seconds": built.build_seconds}))


def store_params(args: argparse.Namespace) -> dict[str, int]:
    return {key: getattr(args, key) for key in ("layers", "images", "shared", "garbage",
                                                 "files", "orphans", "containers")}


def build_cstorage(base: Path, args: argparse.Namespace, layout: Callable[[], Path]
                   ) -> BenchStore:
    podman = Podman(base / "cstorage")
    marker = base / "cstorage.json"
    params = store_params(args)
    built = read_marker(marker, params)
    if built is None:
        if (podman.root / "overlay-layers").exists():
            raise SystemExit(f"{podman.root} holds another or a half-built store; "
                             "use a new --keep")
        started = time.perf_counter()
        layout_dir = layout()
        for n in range(args.images):
            podman.pull_layout(layout_dir, REF.format(n))
            print(f"  podman pull {n + 1}/{args.images}", end="\r", flush=True)
        for n in range(args.containers):
            podman.run("create", "--name", f"bench-{n}", REF.format(n + 1), "/bin/true")
        planted = plant_cstorage(podman.root, args)
        # podman makes these 0700 itself; the harness pre-creates them with mkdir.
        podman.root.chmod(0o700)
        podman.runroot.chmod(0o700)
        built = Built(planted, time.perf_counter() - started)
        write_marker(marker, params, built)
    return BenchStore("cstorage", podman.root,
                      ["--runtime", "cstorage", "--root", str(podman.root),
                       "--runroot", str(podman.runroot)],
                      built.planted, built.build_seconds)


def plant_cstorage(root: Path, args: argparse.Namespace) -> dict[str, int]:
    """Drop image 0's record (its own layers become unreferenced, dated 2020) and copy
    ``--orphans`` layer diffs into dirs no record names."""
    images_json = root / "overlay-images" / "images.json"
    images = json.loads(images_json.read_text())
    dropped = next(i for i in images if REF.format(0) in i.get("names", []))
    images.remove(dropped)
    write_json(images_json, images)
    shutil.rmtree(root / "overlay-images" / dropped["id"])
    layers_json = root / "overlay-layers" / "layers.json"
    layers = json.loads(layers_json.read_text())
    parent = {rec["id"]: rec.get("parent") for rec in layers}
    containers = json.loads((root / "overlay-containers" / "containers.json").read_text())
    reachable: set[str] = set()
    for top in [i["layer"] for i in images] + [c["layer"] for c in containers]:
        while top and top not in reachable:
            reachable.add(top)
            top = parent.get(top)
    unreferenced = [rec for rec in layers if rec["id"] not in reachable]
    for rec in unreferenced:
        rec["created"] = OLD
    write_json(layers_json, layers)
    for n, rec in enumerate(sorted(layers, key=lambda r: r["id"])[:args.orphans]):
        orphan = root / "overlay" / hashlib.sha256(f"orphan-{n}".encode()).hexdigest()
        shutil.copytree(root / "overlay" / rec["id"] / "diff", orphan / "diff", symlinks=True)
        for sub in ("work", "merged"):
            (orphan / sub).mkdir(mode=0o700)
    return {"S11": len(unreferenced), "S6": args.orphans}


def write_json(path: Path, data: object) -> None:
    scratch = path.with_name(path.name + ".bench-tmp")
    scratch.write_text(json.dumps(data))
    os.replace(scratch, path)


def build_containerd(base: Path, args: argparse.Namespace, layout: Callable[[], Path]
                     ) -> BenchStore:
    daemon = ContainerdDaemon(base / "containerd")
    marker = base / "containerd.json"
    params = store_params(args)
    built = read_marker(marker, params)
    if built is None:
        if (daemon.root / "io.containerd.metadata.v1.bolt").exists():
            raise SystemExit(f"{daemon.root} holds another or a half-built store; "
                             "use a new --keep")
        started = time.perf_counter()
        layout_tar = layout_to_tar(layout(), base / "layout.tar")
        daemon.start()
        try:
            # Not daemon.ctr(): one import of 2,000 layers outlasts the harness's timeout.
            subprocess.run(["ctr", "-a", str(daemon.socket), "-n", NAMESPACE, "images",
                            "import", "--all-platforms", "--snapshotter", "overlayfs",
                            str(layout_tar)], check=True, stdout=subprocess.DEVNULL)
            for n in range(args.containers):
                daemon.ctr("containers", "create", REF.format(n + 1), f"bench-{n}",
                           namespace=NAMESPACE)
            # Both of image 0's names (the CRI plugin adds sha256:<config> in k8s.io), without
            # --sync: GC is deferred in the harness, so its own snapshots and blobs stay on
            # disk, unreferenced.
            daemon.ctr("images", "rm", REF.format(0), config_ref(layout(), REF.format(0)),
                       namespace=NAMESPACE)
        finally:
            daemon.stop()
            layout_tar.unlink(missing_ok=True)
        planted = plant_containerd(daemon.root, args)
        daemon.root.chmod(0o711)  # as containerd 1.x creates it (the harness uses mkdir)
        built = Built(planted, time.perf_counter() - started)
        write_marker(marker, params, built)
    return BenchStore("containerd", daemon.root,
                      ["--runtime", "containerd", "--root", str(daemon.root)],
                      built.planted, built.build_seconds)


def config_ref(layout: Path, ref: str) -> str:
    """``sha256:<config digest>`` of image ``ref`` in the OCI layout: the name the CRI plugin
    gives every image it sees in namespace k8s.io."""
    index = json.loads((layout / "index.json").read_text())
    manifest = next(m for m in index["manifests"]
                    if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == ref)
    algorithm, digest = manifest["digest"].split(":", 1)
    data = json.loads((layout / "blobs" / algorithm / digest).read_text())
    return str(data["config"]["digest"])


def plant_containerd(root: Path, args: argparse.Namespace) -> dict[str, int]:
    """Copy ``--orphans`` snapshot dirs to ids no snapshotter record has."""
    snapshots = root / "io.containerd.snapshotter.v1.overlayfs" / "snapshots"
    ids = sorted(int(name) for name in os.listdir(snapshots) if name.isdigit())
    for n in range(args.orphans):
        shutil.copytree(snapshots / str(ids[n]), snapshots / str(ids[-1] + 1000 + n),
                        symlinks=True)
    return {"C7": args.garbage, "C1": args.orphans}


# -- timing -----------------------------------------------------------------------------------


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def run_rounds(commands: Sequence[Command], repeat: int, cold: bool) -> None:
    """Every command once per round, ``repeat`` rounds; caches dropped first when ``cold``."""
    for _ in range(repeat):
        for command in commands:
            if command.failure:
                continue
            if cold:
                drop_caches()
            sample, stderr = measure(command.argv, command.stdout)
            if sample.returncode not in command.ok_codes:
                last = stderr.splitlines()[-1] if stderr else "(no stderr)"
                command.failure = f"exit {sample.returncode}: {last}"
                continue
            command.samples.append(sample)


def in_process(store: BenchStore, repeat: int, cold: bool) -> float | str:
    """Best seconds of ``open + check_store`` inside this process (no interpreter start, the
    modules imported once), or why it failed: the fallback figure while the CLI cannot run
    the check."""
    best: float | str = "not run"
    for _ in range(repeat):
        if cold:
            drop_caches()
        seconds = _check_once(store)
        if isinstance(seconds, str):
            return seconds
        best = seconds if isinstance(best, str) else min(best, seconds)
    return best


def _check_once(store: BenchStore) -> float | str:
    try:
        from crifs.containerd.store import ContainerdStore
        from crifs.cstorage.config import StorageConfig
        from crifs.cstorage.store import CStorageStore
        from crifs.fsck.run import check_store
        from crifs.model import Store

        started = time.perf_counter()
        opened: Store
        if store.runtime == "cstorage":
            runroot = store.crifs_args[store.crifs_args.index("--runroot") + 1]
            opened = CStorageStore.open(root=store.root, runroot=runroot, config=StorageConfig())
        else:
            opened = ContainerdStore.open(root=store.root)
        check_store(opened)
        return time.perf_counter() - started
    except Exception as error:  # noqa: BLE001 - reported as the row's failure
        return f"{type(error).__name__}: {error}"


def count_findings(output: Path) -> Counter[str]:
    document = json.loads(output.read_text())
    return Counter(f["code"] for f in document.get("findings", []))


def report(store: BenchStore, commands: list[Command], label: str, engine: float | str
           ) -> float | None:
    du, check = commands[0], commands[1]
    print(f"\n{store.runtime}: {store.root} ({filesystem_type(store.root)}), {label}")
    print(f"{'command':<52} {'best s':>8} {'runs (s)':<28} {'peak RSS':>10} {'x du':>7}")
    for command in commands:
        if command.failure or not command.samples:
            print(f"{command.label:<52} FAILED: {command.failure}")
            continue
        runs = " ".join(f"{s.seconds:.3f}" for s in command.samples)
        ratio = f"{command.best / du.best:.3f}" if du.samples else "-"
        print(f"{command.label:<52} {command.best:>8.3f} {runs:<28} "
              f"{command.peak_rss_mb:>7.1f} MB {ratio:>7}")
    if isinstance(engine, float):
        ratio = f"{engine / du.best:.3f}" if du.samples else "-"
        print(f"{'open + check_store in-process (no start-up)':<52} {engine:>8.3f} "
              f"{'':<28} {'':>10} {ratio:>7}")
    else:
        print(f"{'open + check_store in-process':<52} FAILED: {engine}")
    if check.samples and du.samples:
        print(goal_line("crifs check / du -s", check.best / du.best, GOAL, "x"))
        return check.best / du.best
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tools = {"cstorage": PODMAN_TOOLS, "containerd": CONTAINERD_TOOLS}
    wanted = list(tools) if args.runtime == "both" else [args.runtime]
    for runtime in wanted:
        reason = missing_prerequisites(tools[runtime])
        if reason:
            print(f"cannot run: {reason}", file=sys.stderr)
            return 2
    base = args.keep or Path(tempfile.mkdtemp(prefix="crifs-bench-check-", dir="/var/tmp"))
    base.mkdir(parents=True, exist_ok=True)
    layout_dir: list[Path] = []

    def layout() -> Path:
        if not layout_dir:
            started = time.perf_counter()
            layout_dir.append(write_layout(base, args))
            print(f"wrote the OCI layout in {time.perf_counter() - started:.1f}s")
        return layout_dir[0]

    status = 0
    try:
        builders = {"cstorage": build_cstorage, "containerd": build_containerd}
        stores = [builders[runtime](base, args, layout) for runtime in wanted]
        shutil.rmtree(base / "layout", ignore_errors=True)
        print(f"stores in {base}: {args.layers} layers in {args.images} images, "
              f"{args.files} files each")
        for store in stores:
            print(f"  {store.runtime}: built in {store.build_seconds:.0f}s, planted "
                  + ", ".join(f"{n} {code}" for code, n in store.planted.items()))
        startup = Command("crifs --help (start-up)", crifs_argv("--help"))
        for store in stores:
            for cold in [False, True] if args.cold else [False]:
                output = base / f"check-{store.runtime}.json"
                commands = [
                    Command(f"du -s {store.root.name}", ["du", "-s", str(store.root)]),
                    Command("crifs check -o json",
                            crifs_argv(*store.crifs_args, "check", "-o", "json"),
                            ok_codes=(0, 1, 4), stdout=output),
                    Command("crifs check --no-measure -o json",
                            crifs_argv(*store.crifs_args, "check", "--no-measure", "-o",
                                       "json"), ok_codes=(0, 1, 4)),
                    startup,
                ]
                startup.samples, startup.failure = [], None
                if not cold:
                    run_rounds(commands, 1, cold=False)  # untimed: warms the caches
                    for command in commands:
                        command.samples = []
                run_rounds(commands, args.repeat, cold)
                engine = in_process(store, args.repeat, cold)
                report(store, commands, "caches dropped before each run" if cold
                       else "warm caches", engine)
                if commands[1].failure:
                    status = max(status, 2)
                elif output.exists():
                    status = max(status, verify(store, count_findings(output)))
    finally:
        if args.keep is None:
            unmount_under(base)
            shutil.rmtree(base, ignore_errors=True)
    return status


def verify(store: BenchStore, found: Counter[str]) -> int:
    """Print what the check found; 1 when a planted class was not found in full."""
    print("findings: " + ", ".join(f"{code} {n}" for code, n in sorted(found.items())))
    missing = {code: (found.get(code, 0), n) for code, n in store.planted.items()
               if found.get(code, 0) < n}
    for code, (got, want) in missing.items():
        print(f"WARNING: planted {want} {code}, the check found {got}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
