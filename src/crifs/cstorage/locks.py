"""The store's read locks, taken the way a containers/storage reader takes them.

containers/storage guards each JSON file with a POSIX ``fcntl`` record lock on a sibling
``*.lock`` file (``storage.lock``, ``overlay-layers/layers.lock``, ``overlay-images/
images.lock``, ``overlay-containers/containers.lock``, runroot ``overlay-layers/
mountpoints.lock``); readers take it shared (``F_RDLCK``), writers exclusive.

Contract of :func:`read_locks`:

- Lock files are opened ``O_RDONLY | O_NOFOLLOW``: never created, written or followed. A
  missing lock file (or a symlink in its place, or one on a filesystem without record locks)
  is skipped and the data is read without that lock.
- All locks are taken together or not at all: when one is held for writing, the ones already
  taken are released before waiting, so a writer that needs several locks is never kept
  waiting by us while we wait for another.
- Polls until ``timeout`` seconds have passed, then raises ``StoreLocked`` naming the file and
  the writer (``…/layers.lock: held for writing by pid 123 (podman) for more than 10 s``).
- POSIX record locks belong to the process: a lock this process already holds on the same
  file through another descriptor is converted and released with ours. Take store locks from
  one place per process.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Callable, Iterator, Sequence

from crifs.errors import StoreLocked
from crifs.fs.locks import lock_holders

DEFAULT_TIMEOUT_S = 10.0
_POLL_INTERVAL_S = 0.02
_BUSY_ERRNOS = frozenset({errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK})


@contextlib.contextmanager
def read_locks(lock_paths: Sequence[str], timeout: float = DEFAULT_TIMEOUT_S
               ) -> Iterator[list[str]]:
    """Hold shared locks on every existing file of ``lock_paths`` for the ``with`` body.

    Yields the paths actually locked (for reporting). Raises ``StoreLocked`` when a writer
    holds one of them for longer than ``timeout`` seconds.
    """
    opened = [(path, fd) for path in lock_paths if (fd := _open_lock_file(path)) is not None]
    try:
        locked = lock_all(opened, timeout)
        try:
            yield [path for path, _ in locked]
        finally:
            for _, fd in locked:
                _unlock(fd)
    finally:
        for _, fd in opened:
            os.close(fd)


def _open_lock_file(path: str) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError:
        # Missing, a symlink (ELOOP), unreadable: containers/storage would create or fail;
        # a reader that may not write just goes on without this lock.
        return None


def lock_all(opened: Sequence[tuple[str, int]], timeout: float, *, exclusive: bool = False,
             busy_message: Callable[[str], str] | None = None) -> list[tuple[str, int]]:
    """Lock every ``(path, fd)`` shared (or ``exclusive``), all or none: on a busy one,
    release what was taken and retry until ``timeout``, then ``StoreLocked`` with
    ``busy_message(path)`` (default: who writes it). A filesystem without record locks
    (ENOLCK, EINVAL) is passed over, as c/storage does; for a writer any other error is
    raised, a reader goes on without that lock."""
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    deadline = time.monotonic() + max(timeout, 0.0)
    while True:
        locked: list[tuple[str, int]] = []
        busy: str | None = None
        for path, fd in opened:
            try:
                fcntl.lockf(fd, mode | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno in _BUSY_ERRNOS:
                    busy = path
                    break
                if exclusive and err.errno not in (errno.ENOLCK, errno.EINVAL):
                    raise
                continue
            locked.append((path, fd))
        if busy is None:
            return locked
        for _, fd in locked:
            _unlock(fd)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            message = (busy_message(busy) if busy_message is not None
                       else f"{describe_writers(busy)} for more than {timeout:g} s")
            raise StoreLocked(message, path=busy)
        time.sleep(min(_POLL_INTERVAL_S, remaining))


def _unlock(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.lockf(fd, fcntl.LOCK_UN)


def describe_writers(path: str) -> str:
    """``held for writing by pid 123 (podman)``, from /proc/locks; vaguer when unknown."""
    writers = [h for h in lock_holders(path) if not h.blocked and h.mode == "WRITE"]
    if not writers:
        return "held for writing by another process"
    parts = []
    for holder in writers:
        if holder.pid is None:
            parts.append(f"an open file description ({holder.family} lock)")
            continue
        name = holder.process_name()
        parts.append(f"pid {holder.pid} ({name})" if name else f"pid {holder.pid}")
    return "held for writing by " + ", ".join(parts)
