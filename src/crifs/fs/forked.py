"""Sharing CPU-bound work with a forked child of this process.

A big walk or audit holds its data in this process already; a forked child sees it without a
copy (copy-on-write) and without starting a second interpreter, so on a 2-vCPU VM the work of
both processes runs at once. ``ForkedJob`` runs a job in the child and hands its output back
in chunks; ``TaskNumbers`` shares out task numbers so that whichever process is free takes
the next one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
import warnings
from collections.abc import Callable


class ForkedJob:
    """``job(send)`` run in a forked child of this process, for CPU-bound work on data this
    process already holds: the child sees it without a copy (copy-on-write) and no second
    interpreter starts. ``send(chunk)`` hands bytes back while the job runs; what ``job``
    returns is the last chunk. Chunks go through a file with no name, and each one's end
    through a pipe, so the parent takes only whole chunks (``chunks``) without waiting.

    The child runs only ``job`` and leaves with ``os._exit``: no exit handlers, no flush of
    buffers it inherited, no exception unwinding into the caller's code. ``finish`` waits
    for it; ``kill`` stops it. Every started job must end in one of the two (the child is
    reaped there)."""

    def __init__(self, pid: int, data: int, ends: int) -> None:
        self.pid, self._data, self._ends = pid, data, ends
        self._taken = 0  # chunks before this offset of the data file were handed out
        self._whole = 0  # offset up to which the child said its chunks are whole

    @classmethod
    def start(cls, job: Callable[[Callable[[bytes], None]], bytes]) -> ForkedJob | None:
        """The running job, or ``None`` when this process cannot fork safely: no ``fork``, or
        other threads (a forked child gets only the calling thread, and a lock another
        thread held stays locked in the child)."""
        if not hasattr(os, "fork") or threading.active_count() > 1:
            return None
        try:
            data = _unnamed_file()
        except OSError:
            return None
        ends_read, ends_write = os.pipe()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # 3.12: fork with threads
                pid = os.fork()
        except OSError:
            for fd in (data, ends_read, ends_write):
                os.close(fd)
            return None
        if pid == 0:  # the child: never returns
            _run_child(job, data, ends_write)
        os.close(ends_write)
        os.set_blocking(ends_read, False)
        return cls(pid, data, ends_read)

    def chunks(self) -> list[bytes]:
        """The whole chunks sent since the last call; never waits."""
        try:
            ends = os.read(self._ends, 1 << 16)  # 8-byte writes: whole ones only
        except BlockingIOError:
            ends = b""
        if ends:
            self._whole = int.from_bytes(ends[-8:], "little")
        return self._take(self._whole) or []

    def kill(self) -> None:
        """Stop the child and reap it (the caller gave up, e.g. on an interrupt)."""
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)
        self.finish()

    def finish(self) -> list[bytes] | None:
        """Wait for the child: the chunks not handed out yet, the last one being what
        ``job`` returned; ``None`` if the job failed (chunks handed out before are whole).
        If waiting is interrupted, the child is killed and reaped first."""
        try:
            _, status = os.waitpid(self.pid, 0)
        except BaseException:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self._close()
            raise
        try:
            if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
                return None
            return self._take(os.fstat(self._data).st_size)
        finally:
            self._close()

    def _take(self, end: int) -> list[bytes] | None:
        """The chunks between the last one taken and ``end``; ``None`` if they are not
        whole."""
        if end <= self._taken:
            return []
        data = os.pread(self._data, end - self._taken, self._taken)
        chunks, offset = [], 0
        while offset + 8 <= len(data):
            size = int.from_bytes(data[offset : offset + 8], "little")
            if offset + 8 + size > len(data):
                break
            chunks.append(data[offset + 8 : offset + 8 + size])
            offset += 8 + size
        if offset != end - self._taken:
            return None
        self._taken = end
        return chunks

    def _close(self) -> None:
        os.close(self._data)
        os.close(self._ends)


def _run_child(job: Callable[[Callable[[bytes], None]], bytes], data: int, ends: int) -> None:
    """The forked child of ``ForkedJob.start``: run ``job``, then leave."""
    code = 1
    written = 0

    def send(chunk: bytes) -> None:
        nonlocal written
        record = memoryview(b"".join([len(chunk).to_bytes(8, "little"), chunk]))
        written += len(record)
        while record:
            record = record[os.write(data, record) :]
        os.write(ends, written.to_bytes(8, "little"))

    try:
        send(job(send))
        code = 0
    except BaseException:  # noqa: BLE001, S110 - nothing may unwind into the caller
        pass
    finally:
        os._exit(code)


class TaskNumbers:
    """Task numbers 0..n-1 shared out between processes: all written to a pipe up front and
    read 4 bytes at a time (a pipe read that small is atomic, so each number reaches one
    reader). Made before the fork; each process calls ``next`` until it gives ``None``."""

    def __init__(self, count: int) -> None:
        self._read, write = os.pipe()
        try:
            os.write(write, b"".join(n.to_bytes(4, "little") for n in range(count)))
        finally:
            os.close(write)

    def next(self) -> int | None:
        token = os.read(self._read, 4)
        return int.from_bytes(token, "little") if len(token) == 4 else None

    def close(self) -> None:
        os.close(self._read)


def _unnamed_file() -> int:
    """A descriptor of a file with no name (memory-backed where possible)."""
    if hasattr(os, "memfd_create"):
        try:
            return os.memfd_create("crifs-walk", os.MFD_CLOEXEC)
        except OSError:
            pass
    with tempfile.TemporaryFile() as handle:
        return os.dup(handle.fileno())
