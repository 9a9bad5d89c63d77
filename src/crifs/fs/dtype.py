"""Whether a filesystem records the file type in directory entries (``d_type``).

overlayfs needs it for whiteouts; xfs formatted with ``ftype=0`` (and ext4 without the
``filetype`` feature) leave it ``DT_UNKNOWN``. containerd (``fs.SupportsDType``) and
containers/storage refuse such a root. Python's ``os.scandir`` hides ``d_type`` (it falls back
to ``lstat`` silently), so this reads entries through libc's ``readdir`` with ctypes.
Read-only: nothing is created to probe with.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass


class _Dirent64(ctypes.Structure):
    # glibc's struct dirent64 (the same layout on every 64-bit Linux ABI).
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64),
                ("d_reclen", ctypes.c_ushort), ("d_type", ctypes.c_ubyte),
                ("d_name", ctypes.c_char * 256)]


_DT_UNKNOWN = 0


@dataclass(frozen=True, slots=True)
class _DirCalls:
    opendir: Callable[[bytes], int | None]
    readdir: Callable[[int], ctypes._Pointer[_Dirent64]]
    closedir: Callable[[int], int]


@functools.cache
def _dir_calls() -> _DirCalls | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        readdir = getattr(libc, "readdir64", None) or libc.readdir
        opendir, closedir = libc.opendir, libc.closedir
    except (OSError, AttributeError):
        return None
    opendir.restype, opendir.argtypes = ctypes.c_void_p, [ctypes.c_char_p]
    readdir.restype, readdir.argtypes = ctypes.POINTER(_Dirent64), [ctypes.c_void_p]
    closedir.restype, closedir.argtypes = ctypes.c_int, [ctypes.c_void_p]
    return _DirCalls(opendir, readdir, closedir)


def records_d_type(directory: str, sample: int = 8) -> bool | None:
    """Whether the filesystem of ``directory`` fills in ``d_type`` in directory entries, as
    containerd's ``fs.SupportsDType`` asks (here without creating a probe entry).

    Reads at most ``sample`` entries besides ``.`` and ``..`` (xfs reports those as
    directories even without ftype). ``None`` when it cannot tell: an empty directory, a
    libc without ``readdir`` through ctypes, or a directory it cannot open.
    """
    calls = _dir_calls()
    if calls is None:
        return None
    handle = calls.opendir(os.fsencode(directory))
    if not handle:
        return None
    try:
        seen = 0
        while seen < sample:
            entry = calls.readdir(handle)
            if not entry:
                break
            if entry.contents.d_name in (b".", b".."):
                continue
            seen += 1
            if entry.contents.d_type == _DT_UNKNOWN:
                return False
        return True if seen else None
    finally:
        calls.closedir(handle)
