"""What one layer holds, as a listing: the common input of the merged view and the link audit.

Every source (a layer tar, an OCI layout's blob, an overlay ``diff``/``fs`` directory, a plain
rootfs) is turned into one ``LayerListing``; the engines never touch the source again.

Paths are ``bytes``, relative to the rootfs root, normalised: no leading ``/``, no ``.`` or
empty components, no trailing ``/``; the root itself is ``b""``. Bytes, because file names in
layers need not be UTF-8 and a verdict must name the exact file.

Deletion markers are not entries: a source turns ``.wh.NAME`` (OCI tar) or a 0/0 character
device (overlayfs) into ``whiteouts``, and ``.wh..wh..opq`` or an ``overlay.opaque`` xattr into
``opaque``. The rules that recognise them live in ``crifs.oci.whiteout`` only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class EntryKind(StrEnum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"  # a tar hard-link member; ``target`` is the path it links to
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"
    SOCKET = "socket"


@dataclass(frozen=True, slots=True)
class Entry:
    """What one path of a layer is; the path itself is the key it is stored under.

    ``target``: the raw symlink target (exactly as stored, may be absolute, relative, empty or
    4096 bytes long), or for a tar hard link the normalised path of the member it links to.
    ``inode``: ``(st_dev, st_ino)`` for entries read from a directory (hard-link groups), else
    ``None``; ``nlink`` the link count the filesystem reports (1 for tar members).

    Frozen, so sources may share one instance among many paths: a walk of a million plain
    files keeps memory flat by storing ``PLAIN_FILE`` for every regular file whose details
    no engine needs (``nlink == 1``).
    """

    kind: EntryKind
    target: bytes = b""
    mode: int = 0
    size: int = 0
    uid: int = 0
    gid: int = 0
    inode: tuple[int, int] | None = None
    nlink: int = 1


PLAIN_FILE = Entry(EntryKind.FILE)
PLAIN_DIR = Entry(EntryKind.DIR)


@dataclass(slots=True)
class LayerListing:
    """Everything one layer says about the rootfs.

    ``index``: position in the stack, 0 = bottom. ``name``: how a user recognises the layer
    (``layer 2 sha256:ab12…``, a snapshot key, a c/storage layer id). ``ident``: the digest,
    key or id itself. ``source``: where it was read (a tar member, a directory).
    ``problems``: bad input that was tolerated (``../`` or absolute member names, duplicate
    entries), one sentence each, so a report can show them.
    """

    index: int
    name: str
    entries: dict[bytes, Entry] = field(default_factory=dict)
    whiteouts: set[bytes] = field(default_factory=set)
    opaque: set[bytes] = field(default_factory=set)
    ident: str | None = None
    source: str | None = None
    problems: list[str] = field(default_factory=list)


def normalize(path: bytes) -> bytes | None:
    """A member path in normal form, or ``None`` if it climbs out of the root (``..`` above it).

    ``/a//b/./c/`` → ``a/b/c``; ``./`` → ``b""``.
    """
    parts: list[bytes] = []
    for part in path.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            if not parts:
                return None
            parts.pop()
            continue
        parts.append(part)
    return b"/".join(parts)
