"""Shared by the link-audit benchmarks (``links_tree.py``, ``links_tar.py``).

Every command is run as its own child process and measured on its own: wall time with
``time.perf_counter`` around the child, peak RSS as GNU ``/usr/bin/time -f %M`` reports it for
exactly that command, and its CPU time (user + system, ``%U %S``). Not ``os.wait4`` from here:
Linux carries the RSS high-water mark of the process image that called exec into the new one,
so every child of this (larger) Python process would report at least this process's RSS.
Commands are run in interleaved rounds (every command once per round) so background noise hits
them alike; the best time of ``--repeat`` rounds is compared, the peak RSS is the largest seen.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: crifs verdicts that say the link resolves (or will, once a runtime provides the target).
RESOLVING_VERDICTS = frozenset({"ok", "runtime_provided"})
C_LOCALE = {**os.environ, "LC_ALL": "C"}
TIME = "/usr/bin/time"  # GNU time (Debian package "time")


@dataclass(frozen=True, slots=True)
class Sample:
    seconds: float
    max_rss_kb: int
    returncode: int
    cpu_seconds: float = 0.0  # user + system, the command and the children it waited for


@dataclass
class Command:
    """One row of a comparison: a command line, the exit codes that mean "it worked"."""

    label: str
    argv: list[str]
    ok_codes: tuple[int, ...] = (0,)
    stdout: Path | None = None  # where the output is kept (to count or compare), else discarded
    stderr: Path | None = None  # where the errors are kept (find reports loops there)
    samples: list[Sample] = field(default_factory=list)
    failure: str | None = None
    skipped: str | None = None
    after: Callable[[], None] | None = None  # called after each successful run (reads stdout)

    @property
    def best(self) -> float:
        return min(s.seconds for s in self.samples)

    @property
    def peak_rss_mb(self) -> float:
        return max(s.max_rss_kb for s in self.samples) / 1024

    @property
    def least_cpu(self) -> float:
        """The smallest CPU time of the runs: steadier than wall time on a shared VM (time
        stolen by other guests is not counted), and the work a command does on every core."""
        return min(s.cpu_seconds for s in self.samples)


def measure(argv: Sequence[str], stdout: Path | None = None,
            stderr: Path | None = None) -> tuple[Sample, str]:
    """Run ``argv`` once in the C locale (stable messages) under ``/usr/bin/time``; return its
    sample and the end of its stderr."""
    scratch = Path(tempfile.gettempdir()) / f"crifs-bench-{os.getpid()}"
    err_path, time_path = stderr or scratch.with_suffix(".err"), scratch.with_suffix(".time")
    with open(err_path, "wb") as err, open(stdout or os.devnull, "wb") as out:
        started = time.perf_counter()
        proc = subprocess.run([TIME, "-f", "%U %S %M", "-o", str(time_path), *argv],
                              stdout=out, stderr=err, env=C_LOCALE, check=False)
        seconds = time.perf_counter() - started
    tail = err_path.read_bytes()[-2000:].decode(errors="replace").strip()
    # time writes "Command exited with non-zero status N" before the figures: the last line.
    user, system, max_rss_kb = time_path.read_text().splitlines()[-1].split()
    time_path.unlink()
    if stderr is None:
        err_path.unlink()
    cpu = float(user) + float(system)
    return Sample(seconds, int(max_rss_kb), proc.returncode, cpu), tail


def run_rounds(commands: Sequence[Command], repeat: int) -> None:
    """Run every runnable command ``repeat`` times, interleaved; record samples or a failure."""
    for _ in range(repeat):
        for command in commands:
            if command.skipped or command.failure:
                continue
            sample, stderr = measure(command.argv, command.stdout, command.stderr)
            if sample.returncode not in command.ok_codes:
                last = stderr.splitlines()[-1] if stderr else "(no stderr)"
                command.failure = f"exit {sample.returncode}: {last}"
                continue
            command.samples.append(sample)
            if command.after:
                command.after()


def peak_total_pss_mb(argv: Sequence[str], interval: float = 0.02) -> tuple[float, int]:
    """Run ``argv`` once, untimed, sampling the proportional set size (PSS) of it and every
    process it forks (``/proc/PID/smaps_rollup``, every ``interval`` seconds); the largest sum
    seen, in MB, and the most processes seen at once.

    GNU time's figure is the peak RSS of the largest single process. A process that forks
    helpers shares its pages with them copy-on-write, so per-process RSS counts the shared
    pages in each helper again, and neither figure is what the command holds in all: the sum
    of the processes' PSS (each shared page split among its sharers) is. Sampling can miss a
    peak shorter than ``interval``."""
    proc = subprocess.Popen(list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=C_LOCALE)
    best, most = 0, 1
    while proc.poll() is None:
        pids = [proc.pid, *_descendants(proc.pid)]
        best = max(best, sum(_pss_kb(pid) for pid in pids))
        most = max(most, len(pids))
        time.sleep(interval)
    return best / 1024, most


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as children:
                found += [int(child) for child in children.read().split()]
    except OSError:
        return found
    for child in list(found):
        found += _descendants(child)
    return found


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def missing_tool(name: str) -> str | None:
    if shutil.which(name):
        return None
    return f"{name} not installed"


def print_table(title: str, commands: Sequence[Command], baseline: Command) -> None:
    """Side-by-side: best seconds, every run, peak RSS, best time as a multiple of baseline,
    and the least CPU time (user + system) of the runs."""
    print(f"\n{title}")
    versus = "x " + baseline.label.split()[0]
    print(f"{'command':<44} {'best s':>8} {'runs (s)':<26} {'peak RSS':>10} {versus:>9} "
          f"{'cpu s':>7}")
    for command in commands:
        if command.skipped or command.failure or not command.samples:
            why = command.skipped and f"skipped: {command.skipped}"
            print(f"{command.label:<44} {why or 'FAILED: ' + str(command.failure)}")
            continue
        runs = " ".join(f"{s.seconds:.3f}" for s in command.samples)
        ratio = (f"{command.best / baseline.best:.2f}" if baseline.samples else "-")
        print(f"{command.label:<44} {command.best:>8.3f} {runs:<26} "
              f"{command.peak_rss_mb:>7.1f} MB {ratio:>9} {command.least_cpu:>7.2f}")


def goal_line(what: str, value: float, limit: float, unit: str = "") -> str:
    verdict = "met" if value <= limit else "MISSED"
    return f"goal {what}: {value:.2f}{unit} (<= {limit:g}{unit}) {verdict}"


def crifs_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "crifs", *args]


def crifs_verdicts(json_path: Path) -> tuple[dict[bytes, str], dict[str, int]]:
    """Rootfs path (exact bytes) -> verdict for every link in a ``crifs links -o json`` document,
    and the summed per-verdict counts of all targets."""
    document = json.loads(json_path.read_bytes())
    verdicts: dict[bytes, str] = {}
    summary: dict[str, int] = {}
    for target in document["targets"]:
        for link in target.get("links", []):
            raw = link.get("path_b64")
            path = base64.b64decode(raw) if raw else link["path"].encode()
            verdicts[path] = link["verdict"]
        for verdict, count in target.get("summary", {}).items():
            summary[verdict] = summary.get(verdict, 0) + count
    return verdicts, summary


def crifs_supports_links() -> str | None:
    """None when ``python -m crifs links`` exists, else why not."""
    proc = subprocess.run(crifs_argv("links", "--help"), capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return f"crifs links --help failed: {lines[-1] if lines else proc.returncode}"


def filesystem_type(path: Path) -> str:
    """The type of the filesystem ``path`` is on, from the longest matching mount point."""
    real = os.path.realpath(path)
    best, kind = "", "unknown"
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            point = fields[1].replace("\\040", " ")
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, kind = point, fields[2]
    return kind
