"""Benchmark: audit every symlink of a big directory tree, crifs vs ``find -xtype l`` and
``symlinks -r``, with a bare Python ``os.scandir`` walk as the floor.

Targets (positional, default ``generated``):
  generated  a seeded tree of ``--entries`` entries with ``--symlinks`` symlinks (a quarter
             broken in the tree's own root: missing targets, chains of 2-10 hops, loops,
             ENOTDIR, absolute targets, ``..`` escapes), written to disk (never tmpfs)
  debian     a ``debootstrap --variant=minbase bookworm`` rootfs (needs root and debootstrap)
  DIR        any existing directory tree

Each tree: best of ``--repeat`` warm-cache runs of every command, side by side with peak RSS
and ratios to find, then the broken-link sets of find, symlinks and crifs compared where they
must agree. Exit 0 when every run worked and the sets agree, 1 when they disagree, 2 when a
command failed. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from links_measure import (
    RESOLVING_VERDICTS,
    TIME,
    Command,
    crifs_argv,
    crifs_supports_links,
    crifs_verdicts,
    filesystem_type,
    goal_line,
    missing_tool,
    peak_total_pss_mb,
    print_table,
    run_rounds,
)

GENERATOR_VERSION = 1
FANOUT = 8  # children per directory: 50,000 dirs are 6 levels deep
ABSENT_TOP = "crifs-bench-absent"  # exists neither on the host nor in the tree
HOST_TARGETS = ("/usr/bin/env", "/etc/passwd", "/bin/sh", "/usr/lib/os-release")
RUNTIME_TARGETS = ("/proc/self/mounts", "/dev/null", "/etc/resolv.conf", "/etc/hosts")
DEBIAN_SUITE = "bookworm"

# Share of the symlinks per kind. "L" kinds resolve the same on the host and in the tree's own
# root (relative, never above the root, never through an absolute link), so find and crifs
# must agree on them; "H" kinds depend on where "/" is and differ by design.
LINK_KINDS: tuple[tuple[str, float], ...] = (
    ("L file", 0.36),         # relative path to a file elsewhere (../../d12/f7), resolves
    ("L sibling", 0.08),      # file in the same directory, resolves
    ("L dir", 0.08),          # relative path to a directory, resolves
    ("L via-dirlink", 0.08),  # through an earlier directory link (dl/f3), resolves
    ("L chain", 0.15),        # 2-10 links in a row, 2/3 end at a file, 1/3 at a missing name
    ("L loop", 0.02),         # cycles of 1-5 links: ELOOP
    ("L missing", 0.12),      # missing name, or missing directory component: ENOENT
    ("L notdir", 0.02),       # f7/x or f7/ through a regular file: ENOTDIR
    ("H abs-tree", 0.04),     # /d3/d25/f9: resolves in the tree's root, not on the host
    ("H abs-absent", 0.03),   # /crifs-bench-absent/...: missing everywhere
    ("H escape", 0.01),       # ../ x40 then usr/lib/os-release: host file; in-root clamps: broken
    ("H host-only", 0.005),   # /usr/bin/env etc.: on the host, not in the tree
    ("H runtime", 0.005),     # /proc/self/mounts, /dev/null, /etc/resolv.conf: runtime provides
)

GROUP_MEAN = {"L chain": 6, "L loop": 3}

WALK_SCRIPT = """
import os, sys
entries = links = 0
stack = [os.fsencode(sys.argv[1])]
while stack:
    with os.scandir(stack.pop()) as it:
        for e in it:
            entries += 1
            if e.is_dir(follow_symlinks=False):
                stack.append(e.path)
            elif e.is_symlink():
                os.readlink(e.path)
                links += 1
print(entries, links)
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[3:10]))
    parser.add_argument("targets", nargs="*", default=["generated"],
                        help="generated | debian | DIR (default: generated)")
    parser.add_argument("--entries", type=int, default=1_000_000, help="generated: entries")
    parser.add_argument("--symlinks", type=int, default=100_000, help="generated: symlinks")
    parser.add_argument("--dirs", type=int, help="generated: directories (default entries/20)")
    parser.add_argument("--seed", type=int, default=1, help="generated: random seed")
    parser.add_argument("--jobs", type=int, default=16, help="generated: writer threads")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per command")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="build trees in DIR and keep them; reuse them when already built")
    parser.add_argument("--mirror", default="http://deb.debian.org/debian",
                        help="debian: the mirror debootstrap downloads from")
    parser.add_argument("--no-table", action="store_true", help="skip the crifs table run")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------- generated tree


@dataclass
class TreePlan:
    """What the generated tree holds; cheap to recompute from the parameters (no disk I/O).

    Directory ``k`` (1..dirs) is ``d{k}`` under directory ``(k - 1) // FANOUT``; 0 is the
    root. File ``j`` is ``f{j}`` in directory ``j % (dirs + 1)``. Symlink ``i`` is ``L{i}``
    or ``H{i}`` (its kind's class) in the directory it was planned in.
    """

    dirs: list[tuple[str, ...]]
    files: int
    links: dict[int, list[tuple[str, str]]] = field(default_factory=dict)
    kinds: Counter[str] = field(default_factory=Counter)
    broken: set[bytes] = field(default_factory=set)  # rootfs paths of links broken in-root
    link_count: int = 0

    def file_parts(self, j: int) -> tuple[str, ...]:
        return (*self.dirs[j % len(self.dirs)], f"f{j}")

    def add(self, kind: str, dir_index: int, target: str, broken: bool) -> tuple[str, ...]:
        name = f"{kind[0]}{self.link_count}"
        self.link_count += 1
        self.links.setdefault(dir_index, []).append((name, target))
        self.kinds[kind] += 1
        parts = (*self.dirs[dir_index], name)
        if broken:
            self.broken.add(("/" + "/".join(parts)).encode())
        return parts


def relative(from_dir: tuple[str, ...], to: tuple[str, ...]) -> str:
    """The ``../``-path from directory ``from_dir`` to ``to``; never climbs above the root."""
    common = 0
    while common < min(len(from_dir), len(to)) and from_dir[common] == to[common]:
        common += 1
    return "/".join([".."] * (len(from_dir) - common) + list(to[common:])) or "."


def plan_tree(entries: int, symlinks: int, dir_count: int, seed: int) -> TreePlan:
    files = entries - dir_count - symlinks
    if files < 1 or dir_count < 1:
        raise SystemExit("--entries must exceed --dirs + --symlinks")
    dirs: list[tuple[str, ...]] = [()]
    for k in range(1, dir_count + 1):
        dirs.append((*dirs[(k - 1) // FANOUT], f"d{k}"))
    plan = TreePlan(dirs, files)
    rng = random.Random(seed)
    kinds = [kind for kind, _ in LINK_KINDS]
    # The shares are of links; a chain (2-10, mean 6) or loop (1-5, mean 3) adds several a pick.
    weights = [weight / GROUP_MEAN.get(kind, 1) for kind, weight in LINK_KINDS]
    dir_links: list[tuple[int, tuple[str, ...], int]] = []  # (dir, link parts, target dir)

    def a_dir() -> int:
        return rng.randrange(len(dirs))

    def a_file() -> tuple[str, ...]:
        return plan.file_parts(rng.randrange(files))

    while plan.link_count < symlinks:
        kind = rng.choices(kinds, weights)[0]
        here = a_dir()
        where = dirs[here]
        if kind == "L file":
            plan.add(kind, here, relative(where, a_file()), False)
        elif kind == "L sibling":
            j = here + len(dirs) * rng.randrange(max(1, (files - here) // len(dirs)))
            plan.add(kind, here, f"f{j}" if j < files else relative(where, a_file()), False)
        elif kind == "L dir":
            target_dir = a_dir()  # may be an ancestor: a cycle for walkers, fine to resolve
            parts = plan.add(kind, here, relative(where, dirs[target_dir]), False)
            if target_dir < files:
                dir_links.append((here, parts, target_dir))
        elif kind == "L via-dirlink" and dir_links:
            _, link_parts, target_dir = rng.choice(dir_links)
            target = relative(where, link_parts) + f"/f{target_dir}"
            plan.add(kind, here, target, False)
        elif kind == "L chain":
            hops = min(rng.randint(2, 10), symlinks - plan.link_count)
            broken = rng.random() < 1 / 3
            chain_dirs = [a_dir() for _ in range(hops)]
            names = [(*dirs[d], f"L{plan.link_count + n}") for n, d in enumerate(chain_dirs)]
            for n, d in enumerate(chain_dirs):
                if n + 1 < hops:
                    target = relative(dirs[d], names[n + 1])
                elif broken:
                    target = relative(dirs[d], (*dirs[a_dir()], f"gone{plan.link_count}"))
                else:
                    target = relative(dirs[d], a_file())
                plan.add(kind, d, target, broken)
        elif kind == "L loop":
            size = min(rng.randint(1, 5), symlinks - plan.link_count)
            loop_dirs = [a_dir() for _ in range(size)]
            names = [(*dirs[d], f"L{plan.link_count + n}") for n, d in enumerate(loop_dirs)]
            for n, d in enumerate(loop_dirs):
                plan.add(kind, d, relative(dirs[d], names[(n + 1) % size]), True)
        elif kind == "L missing":
            other = dirs[a_dir()]
            tail = ("gone", "f1") if rng.random() < 0.5 else (f"gone{plan.link_count}",)
            plan.add(kind, here, relative(where, (*other, *tail)), True)
        elif kind == "L notdir":
            through = relative(where, a_file())
            plan.add(kind, here, through + ("/" if rng.random() < 0.3 else "/x"), True)
        elif kind == "H abs-tree":
            plan.add(kind, here, "/" + "/".join(a_file()), False)
        elif kind == "H abs-absent":
            plan.add(kind, here, f"/{ABSENT_TOP}/{plan.link_count}/lib.so", True)
        elif kind == "H escape":
            plan.add(kind, here, "../" * 40 + "usr/lib/os-release", True)
        elif kind == "H host-only":
            plan.add(kind, here, rng.choice(HOST_TARGETS), True)
        elif kind == "H runtime":
            plan.add(kind, here, rng.choice(RUNTIME_TARGETS), False)
    return plan


def write_tree(root: Path, plan: TreePlan, jobs: int) -> None:
    """Create the planned tree under the (new) ``root``: ``mkdir``/``mknod``/``symlink``
    relative to one directory fd at a time, from ``jobs`` threads (directories level by level,
    then the files and links of every directory). Threads because each create waits on the
    filesystem far longer than it holds the GIL: on a 2-vCPU VM's ext4 one thread manages about
    1,000 creates/s and 16 threads about 30,000/s."""
    root.mkdir(parents=True)
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    dir_total = len(plan.dirs)

    def open_dir(k: int) -> int:
        return os.open("/".join(plan.dirs[k]) or ".", os.O_RDONLY | os.O_DIRECTORY,
                       dir_fd=root_fd)

    def children(k: int) -> range:
        return range(k * FANOUT + 1, min(k * FANOUT + FANOUT, dir_total - 1) + 1)

    def make_children(k: int) -> None:
        fd = open_dir(k)
        try:
            for child in children(k):
                os.mkdir(f"d{child}", dir_fd=fd)
        finally:
            os.close(fd)

    def fill(first: int) -> None:
        file_mode = stat.S_IFREG | 0o644
        for k in range(first, min(first + 64, dir_total)):
            fd = open_dir(k)
            try:
                for j in range(k, plan.files, dir_total):
                    os.mknod(f"f{j}", file_mode, dir_fd=fd)
                for name, target in plan.links.get(k, ()):
                    os.symlink(target, name, dir_fd=fd)
            finally:
                os.close(fd)

    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            level = [0]
            while level:  # a level's directories exist before their children are made
                list(pool.map(make_children, level))
                level = [child for k in level for child in children(k)]
            list(pool.map(fill, range(0, dir_total, 64)))
    finally:
        os.close(root_fd)


def generated_tree(base: Path, args: argparse.Namespace) -> tuple[Path, TreePlan]:
    dir_count = args.dirs or args.entries // 20
    params = {"version": GENERATOR_VERSION, "entries": args.entries, "symlinks": args.symlinks,
              "dirs": dir_count, "seed": args.seed}
    name = f"tree-e{args.entries}-s{args.symlinks}-d{dir_count}-seed{args.seed}"
    root, marker = base / name, base / f"{name}.json"
    started = time.perf_counter()
    plan = plan_tree(args.entries, args.symlinks, dir_count, args.seed)
    planned = time.perf_counter() - started
    if marker.exists() and json.loads(marker.read_text()).get("params") == params:
        built = json.loads(marker.read_text())["build_seconds"]
        print(f"reusing {root} (built in {built:.1f}s)")
        return root, plan
    if root.exists():  # ours, half-built by an interrupted run
        print(f"removing half-built {root}")
        shutil.rmtree(root)
    for top in {parts[0] for parts in plan.dirs[1:FANOUT + 1]} | {ABSENT_TOP}:
        if os.path.lexists("/" + top):
            print(f"WARNING: /{top} exists on this host: absolute targets may resolve on it")
    started = time.perf_counter()
    write_tree(root, plan, args.jobs)
    os.sync()
    built = time.perf_counter() - started
    marker.write_text(json.dumps({"params": params, "build_seconds": built}))
    print(f"built {root}: {args.entries:,} entries ({dir_count:,} dirs, {plan.files:,} files, "
          f"{plan.link_count:,} symlinks) in {built:.1f}s (planned in {planned:.1f}s)")
    return root, plan


# ---------------------------------------------------------------------------- debian rootfs


def debian_rootfs(base: Path, mirror: str) -> tuple[Path | None, str | None]:
    """A cached minbase rootfs under ``base``, or (None, why it cannot be built)."""
    root, marker = base / f"debian-{DEBIAN_SUITE}-minbase", base / f"debian-{DEBIAN_SUITE}.json"
    if marker.exists():
        print(f"reusing {root}")
        return root, None
    if os.geteuid() != 0:
        return None, "debootstrap needs root"
    if missing_tool("debootstrap"):
        return None, "debootstrap not installed (apt-get install debootstrap)"
    if root.exists():
        shutil.rmtree(root)
    print(f"debootstrap --variant=minbase {DEBIAN_SUITE} {root} {mirror} ...", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(["debootstrap", "--variant=minbase", DEBIAN_SUITE, str(root), mirror],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()
        return None, f"debootstrap failed: {last[-1] if last else proc.returncode}"
    seconds = time.perf_counter() - started
    marker.write_text(json.dumps({"suite": DEBIAN_SUITE, "mirror": mirror,
                                  "build_seconds": seconds}))
    print(f"debootstrap done in {seconds:.1f}s")
    return root, None


# ---------------------------------------------------------------------------- comparison


LOOP_MESSAGE = b"': Too many levels of symbolic links"


def host_broken(output: Path, root: Path, prefix: bytes = b"") -> set[bytes]:
    """Rootfs paths from ``find ROOT -xtype l`` lines, or from the lines that start with
    ``prefix``: ``symlinks`` output (``dangling: PATH -> TARGET``) or find's C-locale loop errors
    (``find: 'PATH': Too many levels of symbolic links``)."""
    root_bytes = os.fsencode(root)
    paths = set()
    for line in output.read_bytes().splitlines():
        if prefix:
            if not line.startswith(prefix):
                continue
            line = line[len(prefix):].split(b" -> ", 1)[0]
            if line.endswith(LOOP_MESSAGE):
                line = line[:-len(LOOP_MESSAGE)]
            elif prefix.startswith(b"find"):
                continue
        if line.startswith(root_bytes + b"/"):
            paths.add(line[len(root_bytes):])
    return paths


def is_host_independent(path: bytes) -> bool:
    return path.rsplit(b"/", 1)[-1].startswith(b"L")


def print_differences(name: str, paths: set[bytes], verdicts: dict[bytes, str] | None) -> None:
    if not paths:
        return
    shown = ", ".join(p.decode(errors="replace")
                      + (f" ({verdicts[p]})" if verdicts and p in verdicts else "")
                      for p in sorted(paths)[:4])
    print(f"  {name}: {len(paths):,}, e.g. {shown}")


def agreement(broken: dict[str, set[bytes] | None], verdicts: dict[bytes, str] | None,
              generated: bool) -> bool:
    """Print each tool's broken-link count; for a generated tree, True when the tools that
    must agree on host-independent links (generator, find, crifs) have equal sets."""
    present = {name: paths for name, paths in broken.items() if paths is not None}
    groups: list[tuple[str, Callable[[bytes], bool]]] = [("all", lambda p: True)]
    if generated:
        groups = [("host-independent L* (must agree)", is_host_independent),
                  ("host-dependent H* (differ by design)", lambda p: not is_host_independent(p)),
                  *groups]
    print(f"\n{'broken links':<38}" + "".join(f"{name:>16}" for name in present))
    for label, keep in groups:
        print(f"{label:<38}" + "".join(f"{sum(1 for p in paths if keep(p)):>16,}"
                                      for paths in present.values()))
    find, crifs = present.get("find -xtype l"), present.get("crifs")
    if not generated:
        if find is not None and crifs is not None:
            print_differences("only find -xtype l", find - crifs, verdicts)
            print_differences("only crifs", crifs - find, verdicts)
        return True
    expected = {p for p in present.get("generator", set()) if is_host_independent(p)}
    same = True
    for name, paths in (("find", find), ("crifs", crifs)):
        if paths is None:
            continue
        mine = {p for p in paths if is_host_independent(p)}
        print_differences(f"L* {name} says broken, generator not", mine - expected, verdicts)
        print_differences(f"L* generator says broken, {name} not", expected - mine, verdicts)
        print(f"host-independent broken set of {name} equals the generator's: "
              f"{'yes' if mine == expected else 'NO'}")
        same = same and mine == expected
    return same


def bench_tree(title: str, root: Path, args: argparse.Namespace, work: Path,
               plan: TreePlan | None) -> int:
    """Time every command on ``root``, print the table and comparisons; return an exit code."""
    fs = filesystem_type(root)
    print(f"\n== {title}: {root} (filesystem {fs})"
          + ("  WARNING: tmpfs, times not comparable with a disk" if fs == "tmpfs" else ""))
    crifs_json = work / "crifs.json"
    crifs_missing = crifs_supports_links()
    table_skipped = crifs_missing or ("--no-table" if args.no_table else None)
    commands = [
        find := Command("find DIR -xtype l", ["find", str(root), "-xtype", "l"], ok_codes=(0, 1),
                        stdout=work / "find.out", stderr=work / "find.err"),
        symlinks := Command("symlinks -r DIR", ["symlinks", "-r", str(root)],
                            stdout=work / "symlinks.out", skipped=missing_tool("symlinks")),
        walk := Command("python scandir+readlink walk (floor)",
                        [sys.executable, "-c", WALK_SCRIPT, str(root)], stdout=work / "walk.out"),
        crifs := Command("crifs links DIR -o json", crifs_argv("links", str(root), "-o", "json"),
                         ok_codes=(0, 1), stdout=crifs_json, skipped=crifs_missing),
        Command("crifs links DIR (table)", crifs_argv("links", str(root), "-o", "table"),
                ok_codes=(0, 1), skipped=table_skipped),
        startup := Command("crifs links --help (crifs start-up)", crifs_argv("links", "--help"),
                           skipped=crifs_missing),
        Command("python -c pass (interpreter start)", [sys.executable, "-c", "pass"]),
    ]
    # Warm the dentry and inode caches once, untimed, so every command sees the same cache.
    subprocess.run(["find", str(root), "-xtype", "l"], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False)
    run_rounds(commands, args.repeat)
    print_table(f"{title}: best of {args.repeat}, warm cache", commands, find)
    if walk.samples:
        entries, links = (walk.stdout or Path(os.devnull)).read_text().split()
        print(f"tree: {int(entries):,} entries, {int(links):,} symlinks (from the scandir walk)")
    crifs_worked = bool(crifs.samples) and not crifs.failure
    if crifs_worked and find.samples:
        print(goal_line("crifs json / find", crifs.best / find.best, 0.5))
        print(goal_line("crifs peak RSS", crifs.peak_rss_mb, 300, " MB"))
        total, processes = peak_total_pss_mb(crifs.argv)
        print(goal_line(f"crifs peak memory, all {processes} processes (sum of PSS, sampled)",
                        total, 300, " MB"))
        if startup.samples:
            work_s = crifs.best - startup.best
            print(f"crifs json without its start-up (minus links --help): {work_s:.3f}s = "
                  f"{work_s / find.best:.2f} x find")
    if not find.samples:
        return 2
    find_set = host_broken(find.stdout, root) if find.stdout else set()
    # find -xtype l leaves out links whose stat fails with ELOOP: it reports them as errors.
    find_loops = host_broken(find.stderr, root, b"find: '") if find.stderr else set()
    print(f"find -xtype l: {len(find_set):,} listed, and {len(find_loops):,} loops (ELOOP) "
          "reported on stderr instead; both count as broken below")
    broken: dict[str, set[bytes] | None] = {}
    if plan is not None:
        print(f"generator: {plan.link_count:,} symlinks: "
              + ", ".join(f"{k} {n:,}" for k, n in sorted(plan.kinds.items())))
        broken["generator"] = plan.broken
    broken["find -xtype l"] = find_set | find_loops
    if symlinks.samples and symlinks.stdout:
        broken["symlinks -r"] = host_broken(symlinks.stdout, root, b"dangling: ")
    verdicts = None
    if crifs_worked:
        verdicts, summary = crifs_verdicts(crifs_json)
        print("crifs verdicts: " + ", ".join(f"{v} {n:,}" for v, n in sorted(summary.items())))
        broken["crifs"] = {p for p, v in verdicts.items() if v not in RESOLVING_VERDICTS}
    agree = agreement(broken, verdicts, plan is not None)
    if any(c.failure for c in commands):
        return 2
    return 0 if agree else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("find", TIME):
        if missing_tool(tool):
            print(f"cannot run: {tool} missing", file=sys.stderr)
            return 2
    base = args.keep or Path(tempfile.mkdtemp(prefix="crifs-bench-links-", dir="/var/tmp"))
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="crifs-bench-out-", dir="/var/tmp"))
    status = 0
    try:
        for target in args.targets:
            if target == "generated":
                root, plan = generated_tree(base, args)
                status = max(status, bench_tree("generated tree", root, args, work, plan))
            elif target == "debian":
                debian, why = debian_rootfs(base, args.mirror)
                if debian is None:
                    print(f"\n== debian rootfs: skipped: {why}")
                    continue
                status = max(status, bench_tree("debian minbase rootfs", debian, args, work,
                                                None))
            else:
                status = max(status, bench_tree("directory", Path(target).resolve(), args,
                                                work, None))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
