"""Benchmark: list N containerd snapshots live with ``ctr`` vs offline with ``crifs``.

Builds a private containerd store holding ``--count`` committed snapshots (chains of
``--depth``, made by the same Prepare/Commit calls `ctr snapshots prepare/commit` makes, from a
thread pool, over gRPC or with ctr itself), then times
``ctr snapshots ls`` against the running daemon and ``python -m crifs --runtime containerd
--root ROOT snapshots ls -o json`` against the stopped daemon's root; best of ``--repeat``.

Needs root and the containerd package. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from runtimes import (  # noqa: E402 - reuses the test harness, put on sys.path above
    CONTAINERD_TOOLS,
    ContainerdDaemon,
    missing_prerequisites,
    unmount_under,
)

NAMESPACE = "bench"
MARKER = "bench-snapshots.json"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000, help="snapshots to create")
    parser.add_argument("--depth", type=int, default=10, help="length of each parent chain")
    parser.add_argument("--jobs", type=int, default=max(4, 4 * (os.cpu_count() or 1)),
                        help="concurrent ctr calls while building")
    parser.add_argument("--builder", choices=("grpc", "ctr"), default="grpc",
                        help="create snapshots over one gRPC channel (fast) or with ctr calls")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per tool (best wins)")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="build the store in DIR and keep it; reuse it if already built")
    return parser.parse_args(argv)


class CtrSnapshots:
    """Creates snapshots with the ctr CLI, one process per call (about 20 ms CPU each)."""

    def __init__(self, daemon: ContainerdDaemon) -> None:
        self.daemon = daemon

    def prepare(self, key: str, parent: str) -> None:
        self.daemon.ctr("snapshots", "prepare", key, *([parent] if parent else []),
                        namespace=NAMESPACE)

    def commit(self, name: str, key: str) -> None:
        self.daemon.ctr("snapshots", "commit", name, key, namespace=NAMESPACE)

    def close(self) -> None:
        pass


def _pb_string(field: int, value: str) -> bytes:
    data = value.encode()
    return _pb_varint(field << 3 | 2) + _pb_varint(len(data)) + data


def _pb_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _pb_label(field: int, key: str, value: str) -> bytes:
    entry = _pb_string(1, key) + _pb_string(2, value)
    return _pb_varint(field << 3 | 2) + _pb_varint(len(entry)) + entry


class GrpcSnapshots:
    """The same two calls as ``ctr snapshots prepare/commit``, sent over one gRPC channel.

    The requests are hand-encoded (only string fields and the labels map are needed):
    PrepareSnapshotRequest{1 snapshotter, 2 key, 3 parent, 4 labels} and
    CommitSnapshotRequest{1 snapshotter, 2 name, 3 key, 4 labels}. Like ctr, every snapshot gets
    a ``containerd.io/gc.root`` label so GC keeps it.
    """

    SERVICE = "/containerd.services.snapshots.v1.Snapshots/"

    def __init__(self, daemon: ContainerdDaemon) -> None:
        import grpc

        self.channel = grpc.insecure_channel(f"unix://{daemon.socket}")
        self.metadata = (("containerd-namespace", NAMESPACE),)
        self.calls = {
            name: self.channel.unary_unary(self.SERVICE + name, request_serializer=None,
                                           response_deserializer=None)
            for name in ("Prepare", "Commit")
        }
        self.root_label = _pb_label(4, "containerd.io/gc.root",
                                    time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def prepare(self, key: str, parent: str) -> None:
        request = _pb_string(1, "overlayfs") + _pb_string(2, key)
        if parent:
            request += _pb_string(3, parent)
        self.calls["Prepare"](request + self.root_label, metadata=self.metadata, timeout=60)

    def commit(self, name: str, key: str) -> None:
        request = _pb_string(1, "overlayfs") + _pb_string(2, name) + _pb_string(3, key)
        self.calls["Commit"](request + self.root_label, metadata=self.metadata, timeout=60)

    def close(self) -> None:
        self.channel.close()


def create_chain(client: CtrSnapshots | GrpcSnapshots, chain: int, depth: int) -> None:
    parent = ""
    for level in range(depth):
        name = f"bench-{chain:05d}-{level:03d}"
        client.prepare(f"{name}-active", parent)
        client.commit(name, f"{name}-active")
        parent = name


def build_store(daemon: ContainerdDaemon, count: int, depth: int, jobs: int,
                builder: str) -> float:
    """Create ``count`` committed snapshots in chains of ``depth``; return the seconds taken."""
    client = CtrSnapshots(daemon) if builder == "ctr" else GrpcSnapshots(daemon)
    depths = [depth] * (count // depth) + ([count % depth] if count % depth else [])
    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(create_chain, client, index, chain_depth)
                       for index, chain_depth in enumerate(depths)]
            for future in futures:
                future.result()
    finally:
        client.close()
    return time.perf_counter() - started


def best_of(repeat: int, run: Callable[[], str]) -> tuple[list[float], str]:
    times: list[float] = []
    output = ""
    for _ in range(repeat):
        started = time.perf_counter()
        output = run()
        times.append(time.perf_counter() - started)
    return times, output


def crifs_ls(root: Path, output: str = "json") -> str:
    argv = [sys.executable, "-m", "crifs", "--runtime", "containerd", "--root", str(root),
            "snapshots", "ls", "-o", output]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"crifs failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def crifs_count(output: str) -> int:
    document = json.loads(output)
    snapshots = document.get("snapshots", []) if isinstance(document, dict) else document
    return sum(1 for s in snapshots if s.get("namespace", NAMESPACE) == NAMESPACE)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    reason = missing_prerequisites(CONTAINERD_TOOLS)
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    base = args.keep or Path(tempfile.mkdtemp(prefix="crifs-bench-"))
    daemon = ContainerdDaemon(base)
    marker = base / MARKER
    try:
        daemon.start()
        if marker.exists() and json.loads(marker.read_text())["count"] == args.count:
            build_seconds = json.loads(marker.read_text())["build_seconds"]
            print(f"reusing store in {base} ({args.count} snapshots, built in "
                  f"{build_seconds:.1f}s)")
        else:
            existing = daemon.ctr("snapshots", "ls", namespace=NAMESPACE).count("\n") - 1
            if marker.exists() or existing > 0:
                raise SystemExit(f"{base} holds another or a half-built store; use a new --keep")
            build_seconds = build_store(daemon, args.count, args.depth, args.jobs,
                                        args.builder)
            marker.write_text(json.dumps({"count": args.count, "build_seconds": build_seconds}))
            print(f"created {args.count} snapshots with {args.builder} (chains of {args.depth}, "
                  f"{args.jobs} jobs) in {build_seconds:.1f}s ({args.count / build_seconds:.0f}/s)")
        ctr_times, ctr_out = best_of(
            args.repeat, lambda: daemon.ctr("snapshots", "ls", namespace=NAMESPACE))
        listed = len(ctr_out.splitlines()) - 1
        daemon.stop()  # crifs reads the store offline
        crifs_times, crifs_out = best_of(args.repeat, lambda: crifs_ls(daemon.root))
        found = crifs_count(crifs_out)
        table_times, _ = best_of(args.repeat, lambda: crifs_ls(daemon.root, "table"))
        # The floor no Python tool can go under: starting the interpreter that runs crifs.
        floor_times, _ = best_of(args.repeat, lambda: subprocess.run(
            [sys.executable, "-c", "pass"], check=True, capture_output=True).stdout.decode())
    finally:
        daemon.stop()
        if args.keep is None:
            unmount_under(base)
            shutil.rmtree(base, ignore_errors=True)

    rows = [
        ("ctr snapshots ls (live)", listed, ctr_times),
        ("crifs snapshots ls -o json (offline)", found, crifs_times),
        ("crifs snapshots ls, table (offline)", found, table_times),
        ("python -c pass (interpreter start)", 0, floor_times),
    ]
    print(f"\n{'command':<40} {'rows':>7} {'best':>9}   all runs")
    for label, count, times in rows:
        runs = " ".join(f"{t:.3f}" for t in times)
        print(f"{label:<40} {count:>7} {min(times):>8.3f}s   {runs}")
    print(f"ratio crifs/ctr (best): {min(crifs_times) / min(ctr_times):.2f} (json), "
          f"{min(table_times) / min(ctr_times):.2f} (table); goal <= 0.5")
    if found != listed:
        print(f"WARNING: crifs listed {found} snapshots in {NAMESPACE!r}, ctr {listed}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
