"""Disk usage of a directory tree, measured the way containerd's ``fs.DiskUsage`` does.

Every entry under the root (the root itself included) is counted once per inode, so hard
links are counted once; ``disk_bytes`` is ``st_blocks * 512`` and ``apparent_bytes`` is the sum
of ``st_size``. Symlinks are counted as themselves and never followed; the walk never leaves
the filesystem tree it was given.
"""

from __future__ import annotations

import os

from crifs.errors import NotFound
from crifs.model import Usage


def disk_usage(root: str | os.PathLike[str]) -> Usage:
    """Usage of ``root`` and everything below it. Raises ``NotFound`` if ``root`` is missing."""
    root = os.fspath(root)
    usage = Meter().measure(root)
    if usage is None:
        raise NotFound("directory does not exist", path=root)
    return usage


class Meter:
    """Measures several trees with one set of inodes seen, so a hard link shared by two
    measured trees (or a tree measured twice) is counted once across all of them."""

    def __init__(self) -> None:
        self._seen: set[tuple[int, int]] = set()

    def measure(self, *paths: str) -> Usage | None:
        """What ``paths`` hold that this meter has not counted yet; ``None`` when none of them
        exists. A path may be a file or a symlink (counted as itself)."""
        seen = self._seen
        disk = apparent = inodes = 0
        found = False
        stack: list[str] = []
        for path in paths:
            try:
                st = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                continue
            found = True
            ident = (st.st_dev, st.st_ino)
            if ident not in seen:
                seen.add(ident)
                disk += st.st_blocks * 512
                apparent += st.st_size
                inodes += 1
            if _is_dir(st.st_mode):
                stack.append(path)
        if not found:
            return None
        while stack:
            current = stack.pop()
            try:
                it = os.scandir(current)
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                continue  # removed while we walked: count what is still there
            with it:
                for entry in it:
                    try:
                        est = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    ident = (est.st_dev, est.st_ino)
                    if ident not in seen:
                        seen.add(ident)
                        disk += est.st_blocks * 512
                        apparent += est.st_size
                        inodes += 1
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
        return Usage(disk_bytes=disk, inodes=inodes, apparent_bytes=apparent)


def _is_dir(mode: int) -> bool:
    return (mode & 0o170000) == 0o040000
