"""Mount points and storage roots as this host sees them (``/proc/self/mountinfo``, statvfs).

Read-only: nothing here follows a symlink beyond ``readlink``/``realpath`` of the root itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

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


@dataclass(frozen=True, slots=True)
class MountEntry:
    """One line of /proc/self/mountinfo: where, what, and the filesystem's own options."""

    mount_point: str
    fs_type: str
    source: str
    super_options: tuple[str, ...]


# Options of an overlay mount that name directories the mount is built from (the ``+``
# forms are the kernel >= 6.5 append syntax).
_OVERLAY_DIR_OPTIONS = ("lowerdir", "upperdir", "workdir", "lowerdir+", "datadir+")


def read_mountinfo(mountinfo: str = MOUNTINFO) -> str:
    """The text of ``mountinfo`` (undecodable bytes surrogate-escaped); ``""`` if unreadable."""
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except OSError:
        return ""


def mount_table(mountinfo: str = MOUNTINFO) -> list[MountEntry]:
    """Every mount of this process's mount namespace, in file order; ``[]`` if unreadable."""
    return parse_mount_table(read_mountinfo(mountinfo))


def parse_mount_table(text: str) -> list[MountEntry]:
    """The entries of a mountinfo text (see :func:`mount_table`)."""
    out: list[MountEntry] = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-")
        except ValueError:
            continue
        if len(fields) < sep + 4 or len(fields) < 5:
            continue
        # Super options are comma-separated with commas inside values escaped as \054, so
        # split first and unescape each option.
        options = tuple(_unescape(o) for o in fields[sep + 3].split(","))
        out.append(MountEntry(_unescape(fields[4]), fields[sep + 1], _unescape(fields[sep + 2]),
                              options))
    return out


def overlay_dirs(entry: MountEntry) -> list[str]:
    """The lower, upper and work directories an overlay mount names, as written at mount time
    (absolute, or relative to the directory the mounter worked in). ``[]`` for other types."""
    if entry.fs_type != "overlay":
        return []
    dirs: list[str] = []
    for option in entry.super_options:
        key, eq, value = option.partition("=")
        if not eq or key not in _OVERLAY_DIR_OPTIONS:
            continue
        dirs.extend(d for d in _split_lowers(value) if d)
    return dirs


def _split_lowers(value: str) -> list[str]:
    # lowerdir is ':'-separated; a ':' inside a path is written as '\:'.
    parts, current, i = [], [], 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            current.append(value[i + 1])
            i += 2
            continue
        if ch == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts
