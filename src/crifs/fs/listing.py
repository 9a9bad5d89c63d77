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

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


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

    Two hints a source may give while listing, so that consumers can skip a pass over every
    entry (on a million-entry layer each such pass costs a few tenths of a second):

    - ``notable``: when not ``None``, exactly the entries that are not the shared
      ``PLAIN_FILE`` or ``PLAIN_DIR`` (the same objects as in ``entries``): symlinks, hard
      links, devices, files with an inode. A source keeps it exact while listing; code that
      changes ``entries`` afterwards must change it too or set it to ``None``. ``None``:
      unknown, scan ``entries``.
    - ``dirs_complete``: ``True`` when the parent path of every entry, whiteout and opaque
      directory is itself listed as a directory (or is the root), and every opaque directory
      is listed, as a directory walk guarantees: then the layer implies no directories of its
      own. ``False`` (the default) promises nothing.
    """

    index: int
    name: str
    entries: dict[bytes, Entry] = field(default_factory=dict)
    whiteouts: set[bytes] = field(default_factory=set)
    opaque: set[bytes] = field(default_factory=set)
    ident: str | None = None
    source: str | None = None
    problems: list[str] = field(default_factory=list)
    notable: dict[bytes, Entry] | None = None
    dirs_complete: bool = False


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


def fast_constructor(cls: type) -> Callable[..., Any]:
    """A constructor for a frozen slotted dataclass that sets its slots directly.

    The generated ``__init__`` of a frozen class goes through ``object.__setattr__`` per field
    and costs about three times as much, which shows when a million links are judged. The
    returned function takes every field positionally, in declaration order, and runs no
    ``__post_init__``; the instance is equal to one made the normal way. Built once per class,
    the way ``dataclasses`` builds ``__init__``.
    """
    names: tuple[str, ...] = cls.__slots__  # type: ignore[attr-defined]
    setters = {f"set{i}": cls.__dict__[name].__set__ for i, name in enumerate(names)}
    args = ", ".join(f"a{i}" for i in range(len(names)))
    body = "".join(f"    set{i}(obj, a{i})\n" for i in range(len(names)))
    source = f"def make({args}):\n    obj = new(cls)\n{body}    return obj\n"
    namespace: dict[str, Any] = {"new": object.__new__, "cls": cls, **setters}
    exec(source, namespace)  # noqa: S102 - fixed template over the class's own slot names
    return namespace["make"]  # type: ignore[no-any-return]
