"""Mount points and storage roots as this host sees them (``/proc/self/mountinfo``, statvfs).

Read-only: nothing here follows a symlink beyond ``readlink``/``realpath`` of the root itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from crifs.model import RootInfo

MOUNTINFO = "/proc/self/mountinfo"


def mount_points() -> list[tuple[str, str]]:
    """``(mount point, fs type)`` from /proc/self/mountinfo, in file order."""
    out: list[tuple[str, str]] = []
    try:
        with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        fields = line.split(" ")
        try:
            sep = fields.index("-")
        except ValueError:
            continue
        if len(fields) > sep + 1 and len(fields) > 4:
            out.append((_unescape(fields[4]), fields[sep + 1]))
    return out


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo.
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def fs_type(path: str, mounts: Iterable[tuple[str, str]] | None = None) -> str | None:
    """Filesystem type of the longest mount point containing ``path`` (later mounts win)."""
    best: tuple[int, str] | None = None
    for point, fstype in mounts if mounts is not None else mount_points():
        inside = path == point or point == "/" or path.startswith(point + "/")
        if inside and (best is None or len(point) >= best[0]):
            best = (len(point), fstype)
    return best[1] if best else None


def root_info(path: str) -> RootInfo:
    """Where ``path`` is, whether it is a symlink, its filesystem and free space."""
    exists = os.path.exists(path)
    is_link = os.path.islink(path)
    target = None
    if is_link:
        try:
            target = os.readlink(path)
        except OSError:
            target = None
    resolved = os.path.realpath(path) if exists or is_link else None
    free = total = None
    if exists:
        try:
            st = os.statvfs(path)
            free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
        except OSError:
            pass
    return RootInfo(
        path=path,
        exists=exists,
        is_symlink=is_link,
        symlink_target=target,
        resolved=resolved,
        fs_type=fs_type(resolved) if exists and resolved else None,
        free_bytes=free,
        total_bytes=total,
    )
