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
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        raise NotFound("directory does not exist", path=root) from None
    seen: set[tuple[int, int]] = {(st.st_dev, st.st_ino)}
    disk = st.st_blocks * 512
    apparent = st.st_size
    stack = [root] if _is_dir(st.st_mode) else []
    while stack:
        current = stack.pop()
        try:
            it = os.scandir(current)
        except (FileNotFoundError, NotADirectoryError):
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
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
    return Usage(disk_bytes=disk, inodes=len(seen), apparent_bytes=apparent)


def _is_dir(mode: int) -> bool:
    return (mode & 0o170000) == 0o040000
