"""Deletion markers: the one place that knows how layers spell "this path is gone".

Two on-disk forms say the same thing:

- **OCI / Docker tar layers** (image-spec ``layer.md``): a member ``DIR/.wh.NAME`` deletes
  ``DIR/NAME`` from the layers below; ``DIR/.wh..wh..opq`` makes ``DIR`` opaque (its children in
  lower layers are hidden). Other ``.wh..wh.*`` names (``.wh..wh.plnk``, ``.wh..wh.aufs``) are
  legacy aufs bookkeeping and mean nothing for the rootfs.
- **overlayfs directories** (kernel ``Documentation/filesystems/overlayfs.rst``), as containerd's
  and containers/storage's overlay drivers store unpacked layers: a whiteout is a character
  device 0/0, or a zero-size regular file carrying ``overlay.whiteout``; an opaque directory
  carries ``overlay.opaque=y``. The xattrs live under ``trusted.`` (root) or ``user.``
  (``-o userxattr``, rootless).

Everything else in crifs asks these functions; no other module spells a marker.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
AUFS_META_PREFIX = b".wh..wh."
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
WHITEOUT_XATTRS = ("trusted.overlay.whiteout", "user.overlay.whiteout")

# What a marker is, as the first item of ``tar_marker``'s answer.
WHITEOUT = "whiteout"
OPAQUE = "opaque"
IGNORE = "ignore"

_NOT_NAMES = (b"", b".", b"..")


def tar_marker(path: bytes) -> tuple[str, bytes] | None:
    """What a normalised tar member path means as a deletion marker.

    ``("whiteout", deleted_path)`` for ``DIR/.wh.NAME``; ``("opaque", dir_path)`` for
    ``DIR/.wh..wh..opq`` (``b""`` when the root itself is opaque); ``("ignore", path)`` for aufs
    metadata (``.wh..wh.*``) and for malformed markers that name no file (a bare ``.wh.``,
    ``.wh..``, ``.wh...``): such a member neither deletes anything nor is a real file (a bare
    ``.wh.`` must not delete its directory, anchore/stereoscope#647). ``None`` for an ordinary
    entry.
    """
    parent, _, base = path.rpartition(b"/")
    if not base.startswith(WHITEOUT_PREFIX):
        return None
    if base == OPAQUE_MARKER:
        return (OPAQUE, parent)
    if base.startswith(AUFS_META_PREFIX):
        return (IGNORE, path)
    name = base[len(WHITEOUT_PREFIX) :]
    if name in _NOT_NAMES:
        return (IGNORE, path)
    return (WHITEOUT, parent + b"/" + name if parent else name)


def is_overlay_whiteout(st: os.stat_result, xattr_names: Iterable[str] = ()) -> bool:
    """True if an ``lstat`` result (plus the file's xattr names) is an overlayfs whiteout.

    A character device with device number 0/0, or a zero-size regular file carrying
    ``trusted.overlay.whiteout`` or ``user.overlay.whiteout``. The caller lists xattrs only for
    zero-size regular files; for every other entry the names are not needed.
    """
    mode = st.st_mode
    if stat.S_ISCHR(mode):
        return st.st_rdev == 0
    if stat.S_ISREG(mode) and st.st_size == 0:
        return any(name in WHITEOUT_XATTRS for name in xattr_names)
    return False


def is_overlay_opaque(xattrs: Mapping[str, bytes]) -> bool:
    """True if a directory's xattrs make it opaque: ``overlay.opaque`` is ``y``.

    The value ``x`` (set on a directory that holds xattr whiteouts) does not make it opaque.
    """
    return any(xattrs.get(name) == b"y" for name in OPAQUE_XATTRS)
