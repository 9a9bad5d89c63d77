"""The runtime's own locks, taken as a writer for the length of a repair.

containers/storage: POSIX ``fcntl`` write locks (``F_WRLCK``) on ``storage.lock``,
``overlay-layers/layers.lock``, ``overlay-images/images.lock``, ``containers.lock`` and the
runroot's ``overlay-layers/mountpoints.lock``, all or none, polling up to a timeout. After
rewriting a JSON file the matching lock file gets a new *last-write token*, exactly as
c/storage's ``pkg/lockfile`` ``RecordWrite``/``Touch`` writes it, so a long-lived CRI-O or
podman process notices the change and reloads: 64 bytes ``pwrite`` at offset 0 =
little-endian uint64 ``time.Now().UnixNano()``, little-endian uint64 per-process counter,
little-endian uint32 pid, 44 random bytes (unchanged from c/storage 1.43, podman 4.3.1's, to
go.podman.io/storage 1.59+). A CRI-O process serving the store is a refusal: it keeps state
in memory that a file-level repair would contradict.

containerd: ``flock(LOCK_EX | LOCK_NB)`` on ``meta.db`` and on every snapshotter's
``metadata.db`` (bbolt's own lock). containerd holds these for its whole life, so a held lock
means the daemon runs, and the repair is refused naming its pid: only the API (the printed
``ctr`` commands) may change a live store.

POSIX record locks belong to the process: closing *any* descriptor of a lock file releases
the lock. While a :class:`CStorageWriteLocks` is held, nothing in this process may open and
close those files (the store is re-read with ``take_locks=False``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import struct
import time
from collections.abc import Sequence

from crifs.cstorage.locks import lock_all
from crifs.cstorage.paths import StorePaths
from crifs.errors import Internal, StoreLocked, UnsafePath
from crifs.fs.locks import PROC_LOCKS, lock_holders

_BUSY = frozenset({errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK})
LAST_WRITE_SIZE = 64
_counter = itertools.count(1)


def last_write_token(now_ns: int | None = None, pid: int | None = None) -> bytes:
    """A new c/storage last-write token (see module doc); unique per call."""
    head = struct.pack("<QQI", now_ns if now_ns is not None else time.time_ns(),
                       next(_counter), pid if pid is not None else os.getpid())
    return head + os.urandom(LAST_WRITE_SIZE - len(head))


def cstorage_lock_files(paths: StorePaths) -> list[str]:
    """The lock files a c/storage writer takes, in c/storage's order (store, then layers,
    images, containers, mounts); both places of ``containers.lock`` when they differ."""
    graph_containers = os.path.join(paths.containers_dir, "containers.lock")
    run_containers = os.path.join(paths.run_containers_dir, "containers.lock")
    return list(dict.fromkeys([
        paths.storage_lock, paths.layers_lock, paths.images_lock,
        paths.containers_lock, graph_containers, run_containers, paths.mountpoints_lock,
    ]))


def describe_holders(path: str) -> str:
    """``pid 123 (podman)`` for every other process holding or awaiting a lock on ``path``."""
    me = os.getpid()
    parts = []
    for holder in lock_holders(path):
        if holder.pid == me or holder.blocked:
            continue
        name = holder.process_name() if holder.pid is not None else None
        who = f"pid {holder.pid}" if holder.pid is not None else "an open file description"
        parts.append(f"{who} ({name})" if name else who)
    return ", ".join(dict.fromkeys(parts)) or "another process"


class CStorageWriteLocks:
    """containers/storage's lock files held for writing (a context manager)."""

    def __init__(self, paths: StorePaths, timeout: float = 10.0) -> None:
        self.paths = paths
        self.timeout = timeout
        self._fds: dict[str, int] = {}
        self._locked: tuple[str, ...] = ()

    def __enter__(self) -> CStorageWriteLocks:
        refuse_if_crio(self.paths)
        opened = []
        try:
            for path in cstorage_lock_files(self.paths):
                fd = _open_for_writing(path)
                if fd is not None:
                    opened.append((path, fd))
            timeout = self.timeout
            locked = [path for path, _ in lock_all(
                opened, timeout, exclusive=True,
                busy_message=lambda busy: f"held by {describe_holders(busy)} for more than "
                f"{timeout:g} s; not repairing while the runtime uses the store")]
        except BaseException:
            for _, fd in opened:
                os.close(fd)  # closing releases whatever was taken
            raise
        self._fds = dict(opened)
        self._locked = tuple(locked)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def held(self) -> tuple[str, ...]:
        """The lock files locked for writing (a filesystem without record locks has none)."""
        return self._locked

    def verify(self) -> None:
        """``Internal`` when /proc/locks no longer shows one of our write locks: something in
        this process opened and closed a lock file, which drops POSIX locks silently."""
        if not os.path.exists(PROC_LOCKS):
            return
        me = os.getpid()
        for path in self._locked:
            if not any(h.pid == me and h.family == "POSIX" and h.mode == "WRITE"
                       and not h.blocked for h in lock_holders(path)):
                raise Internal("lost the write lock while re-checking the store (a lock file "
                               "was opened and closed in this process); nothing was changed",
                               path=path)

    def release(self) -> None:
        fds, self._fds, self._locked = self._fds, {}, ()
        for fd in fds.values():
            with contextlib.suppress(OSError):
                fcntl.lockf(fd, fcntl.LOCK_UN)
            os.close(fd)

    def record_write(self, lock_path: str) -> None:
        """Give ``lock_path`` a new last-write token (through the held descriptor: opening
        the file again would lose the lock when closed). A lock file crifs does not hold
        (missing directory) is skipped."""
        fd = self._fds.get(lock_path)
        if fd is None:
            return
        token = last_write_token()
        if os.pwrite(fd, token, 0) != len(token):
            raise OSError(errno.ENOSPC, "short write of the last-write token", lock_path)


def _open_for_writing(path: str) -> int | None:
    """c/storage creates a missing lock file (mode 0644); a missing directory means no
    c/storage process uses this part of the store yet."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY,
                       0o644)
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UnsafePath("lock file is a symlink; crifs does not follow it",
                             path=path) from None
        raise StoreLocked(f"cannot open for locking: {os.strerror(err.errno or 0)}",
                          path=path) from None


def refuse_if_crio(paths: StorePaths) -> None:
    """``StoreLocked`` when a CRI-O process runs on this graphroot."""
    from crifs.cstorage.store import _crio_processes  # one reader of CRI-O's command line

    mine = os.path.realpath(paths.graphroot)
    for pid, root in _crio_processes():
        if os.path.realpath(root) == mine:
            raise StoreLocked(f"crio (pid {pid}) runs on this store; stop it before a "
                              "file-level repair", path=paths.graphroot)


class ContainerdWriteLocks:
    """bbolt's exclusive flock on ``meta.db`` and each snapshotter ``metadata.db``, held for
    the whole repair; refused at once (no waiting) when containerd holds one."""

    def __init__(self, db_paths: Sequence[str]) -> None:
        self.db_paths = tuple(dict.fromkeys(db_paths))
        self._fds: list[int] = []

    def __enter__(self) -> ContainerdWriteLocks:
        try:
            for path in self.db_paths:
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue
                except OSError as err:
                    if err.errno == errno.ELOOP:
                        raise UnsafePath("database is a symlink; crifs does not follow it",
                                         path=path) from None
                    raise
                self._fds.append(fd)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as err:
                    if err.errno not in _BUSY:
                        raise
                    raise StoreLocked(
                        f"locked by {describe_holders(path)}: containerd is running, so only "
                        "its API may change this store (run the printed ctr commands, or stop "
                        "containerd and repeat)", path=path) from None
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)  # closing the description drops the flock
