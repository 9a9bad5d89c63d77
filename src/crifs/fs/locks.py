"""Who holds a lock on a file, read passively from ``/proc/locks``.

Looking never takes a lock, so it cannot block a daemon that is starting, and it works for
both lock families the runtimes use: containerd's bbolt holds ``flock(LOCK_EX)`` on
``meta.db`` for the daemon's lifetime; containers/storage takes POSIX ``fcntl`` record locks on
its ``*.lock`` files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

PROC_LOCKS = "/proc/locks"


@dataclass(frozen=True, slots=True)
class LockHolder:
    pid: int | None  # None for OFD locks, which belong to no process
    family: str  # FLOCK, POSIX, OFDLCK, LEASE
    mode: str  # READ or WRITE
    blocked: bool  # a waiter ("->" line), not a holder

    def process_name(self) -> str | None:
        if self.pid is None:
            return None
        try:
            with open(f"/proc/{self.pid}/comm", encoding="utf-8", errors="replace") as f:
                return f.read().strip()
        except OSError:
            return None


def lock_holders(path: str | os.PathLike[str], proc_locks: str = PROC_LOCKS) -> list[LockHolder]:
    """Locks held (or waited for) on ``path``'s inode. ``[]`` if the file or /proc is missing."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return []
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    try:
        with open(proc_locks, encoding="ascii", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return []
    holders = []
    for line in lines:
        fields = line.split()
        blocked = len(fields) > 1 and fields[1] == "->"
        if blocked:
            del fields[1]
        if len(fields) < 6:
            continue
        family, mode, pid_s, ident = fields[1], fields[3], fields[4], fields[5]
        parts = ident.split(":")
        if len(parts) != 3:
            continue
        try:
            got = (int(parts[0], 16), int(parts[1], 16), int(parts[2]))
            pid = int(pid_s)
        except ValueError:
            continue
        if got == want:
            holders.append(LockHolder(pid if pid > 0 else None, family, mode, blocked))
    return holders
