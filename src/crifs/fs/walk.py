"""One layer directory (an overlay ``diff``/``fs`` dir, a plain rootfs) read into a listing.

The walk is iterative ``os.scandir`` on bytes paths (names are kept as their exact bytes), and
never follows a symlink: kinds come from the directory entry type (``d_type``), a symlink is only
``readlink``-ed, and an ``lstat`` happens only where the answer needs one (on a 2-vCPU VM an
``lstat`` costs more than the rest of the walk per entry):

- a device, FIFO or socket (a 0/0 character device is an overlay whiteout);
- regular files that share an inode number with another one in the layer (hard-link groups,
  found from the inode number the directory entry carries; see ``hardlinks``); every other
  regular file is the shared ``PLAIN_FILE`` and every directory ``PLAIN_DIR``, which keeps
  memory flat;
- the zero-size files of a directory marked as holding xattr whiteouts (below).

The walk does not descend into another filesystem mounted inside the tree (a ``/proc`` in a
rootfs); it learns the mount points once from ``/proc/self/mountinfo`` and says so in
``problems``.

With ``overlay=True`` the directory is read as an overlayfs layer: each directory's xattr
names are listed (``overlay.opaque=y`` makes it opaque); the zero-size regular files of a
directory marked ``overlay.opaque=x`` are checked for an ``overlay.whiteout`` xattr (the kernel
looks for those xattr whiteouts only there, ``Documentation/filesystems/overlayfs.rst``); 0/0
character devices are whiteouts. The rules themselves are ``crifs.oci.whiteout``'s.

Errors: a missing root is ``NotFound``, a root that is a symlink ``UnsafePath`` (crifs follows
no symlink, not even the first: the message names the real path to pass instead), a root that
is not a directory ``BadInput``. Below the root, anything unreadable (permission denied, a
directory removed during the walk) becomes a sentence in ``problems`` and the walk goes on.
"""

from __future__ import annotations

import errno
import os
import stat
from array import array
from collections.abc import Callable
from itertools import compress, islice
from operator import eq

from crifs.errors import BadInput, NotFound, UnsafePath
from crifs.fs.gcpause import gc_paused
from crifs.fs.listing import PLAIN_DIR, PLAIN_FILE, Entry, EntryKind, LayerListing
from crifs.fs.mounts import mount_points
from crifs.oci import whiteout

MAX_EXAMPLES = 20  # problems of one kind spelled out before they are only counted
GROUPS, STAT_ALL, OFF = "groups", "all", "off"  # hard-link modes, see read_layer_dir

_KIND_OF_MODE = {
    stat.S_IFREG: EntryKind.FILE,
    stat.S_IFDIR: EntryKind.DIR,
    stat.S_IFLNK: EntryKind.SYMLINK,
    stat.S_IFCHR: EntryKind.CHAR,
    stat.S_IFBLK: EntryKind.BLOCK,
    stat.S_IFIFO: EntryKind.FIFO,
    stat.S_IFSOCK: EntryKind.SOCKET,
}
_OVERLAY_XATTRS = frozenset(whiteout.OPAQUE_XATTRS)
_XWHITEOUT_DIR = b"x"  # overlay.opaque value of a directory holding xattr whiteouts


def read_layer_dir(
    path: str | bytes | os.PathLike[str],
    *,
    index: int,
    name: str,
    ident: str | None = None,
    overlay: bool = True,
    hardlinks: str = GROUPS,
) -> LayerListing:
    """The listing of the directory tree at ``path`` (see the module doc for what is read).

    ``overlay``: read overlayfs whiteouts and opaque directories (``False`` for a plain
    rootfs, where a 0/0 character device is just a device). ``hardlinks``: how regular files
    are checked for hard links: ``groups`` (default) groups them by the inode number the
    directory entry carries (free) and ``lstat``s only the files that share one, so a group
    inside the layer gets identities and link counts, but a file linked only to something
    outside the layer looks plain; ``all`` ``lstat``s every regular file (exact link counts,
    several times slower on a big tree); ``off`` stores every regular file as ``PLAIN_FILE``.
    """
    if hardlinks not in (GROUPS, STAT_ALL, OFF):
        raise BadInput(f"unknown hard-link mode {hardlinks!r} (use groups, all or off)")
    root = os.fsencode(path)
    shown = os.fsdecode(root)
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        raise NotFound("directory does not exist", path=shown) from None
    except OSError as err:
        raise BadInput(f"cannot read: {os.strerror(err.errno or 0)}", path=shown) from None
    if stat.S_ISLNK(st.st_mode):
        real = os.fsdecode(os.path.realpath(root))
        raise UnsafePath(f"is a symlink; crifs does not follow symlinks, pass the real "
                         f"path instead: {real}", path=shown)
    if not stat.S_ISDIR(st.st_mode):
        raise BadInput("is not a directory", path=shown)
    walker = _Walker(LayerListing(index=index, name=name, ident=ident, source=shown),
                     overlay, hardlinks, _mounts_below(root))
    with gc_paused():
        walker.walk(root)
    return walker.finish()


class _Walker:
    def __init__(self, listing: LayerListing, overlay: bool, hardlinks: str,
                 mounted: set[bytes]) -> None:
        self.listing = listing
        self.overlay = overlay
        self.hardlinks = hardlinks
        self.mounted = mounted
        self.counts: dict[str, int] = {}

    def problem(self, kind: str, message: str) -> None:
        seen = self.counts.get(kind, 0) + 1
        self.counts[kind] = seen
        if seen <= MAX_EXAMPLES:
            self.listing.problems.append(message)

    def finish(self) -> LayerListing:
        for kind, count in self.counts.items():
            if count > MAX_EXAMPLES:
                self.listing.problems.append(
                    f"... and {count - MAX_EXAMPLES} more problems of the same kind ({kind})")
        return self.listing

    def walk(self, root: bytes) -> None:
        # Locals for the hot loop: ~1M iterations in a big rootfs.
        entries = self.listing.entries
        whiteouts = self.listing.whiteouts
        overlay, mode, mounted = self.overlay, self.hardlinks, self.mounted
        stat_all, by_inode = mode == STAT_ALL, mode == GROUPS
        # d_ino and key of every regular file, in step; shared inode numbers are looked for
        # once after the walk (see stat_groups). Measured on 1M entries, that costs less CPU
        # than a dict keyed by inode filled in the loop, and lowers the walk's peak RSS (the
        # array holds no int objects).
        file_inodes = array("Q")
        file_keys: list[bytes] = []
        add_inode, add_file_key = file_inodes.append, file_keys.append
        readlink, plain_file, plain_dir = os.readlink, PLAIN_FILE, PLAIN_DIR
        symlink_entry = _symlink_entry
        # (directory path on the host, its key in the listing, holds xattr whiteouts)
        stack: list[tuple[bytes, bytes, bool]] = [
            (root, b"", overlay and self.dir_xattrs(root, b""))]
        while stack:
            dir_path, dir_key, xwhiteouts = stack.pop()
            prefix = dir_key + b"/" if dir_key else b""
            try:
                scanner = os.scandir(dir_path)
            except OSError as err:
                self.problem("unreadable", f"cannot list /{_show(dir_key)}: "
                                           f"{os.strerror(err.errno or 0)}; its contents are "
                                           "not audited")
                continue
            with scanner:
                try:
                    for entry in scanner:
                        key = prefix + entry.name
                        try:
                            if entry.is_file(follow_symlinks=False):
                                if xwhiteouts and self.xattr_whiteout(entry):
                                    whiteouts.add(key)
                                elif stat_all:
                                    self.regular(key, entry.stat(follow_symlinks=False))
                                else:
                                    entries[key] = plain_file
                                    if by_inode:
                                        add_inode(entry.inode())
                                        add_file_key(key)
                            elif entry.is_dir(follow_symlinks=False):
                                entries[key] = plain_dir
                                if mounted and key in mounted:
                                    self.problem("mount", f"/{_show(key)} is another "
                                                          "filesystem mounted here; not "
                                                          "descended into")
                                    continue
                                stack.append((entry.path, key,
                                              overlay and self.dir_xattrs(entry.path, key)))
                            elif entry.is_symlink():
                                entries[key] = symlink_entry(readlink(entry.path))
                            else:
                                self.special(key, entry.stat(follow_symlinks=False))
                        except OSError as err:
                            self.problem("unreadable", f"cannot read /{_show(key)}: "
                                                       f"{os.strerror(err.errno or 0)}; left out")
                except OSError as err:
                    self.problem("unreadable", f"cannot list /{_show(dir_key)}: "
                                               f"{os.strerror(err.errno or 0)}")
        if file_keys:
            self.stat_groups(root, file_inodes, file_keys)

    def stat_groups(self, root: bytes, file_inodes: array[int], file_keys: list[bytes]) -> None:
        """``lstat`` the regular files that share a directory-entry inode number with another
        one (hard-link groups inside the layer) and keep their identity and link count.

        ``file_inodes[i]`` is the inode number of ``file_keys[i]``. The shared numbers are the
        equal neighbours of the sorted numbers: every step runs in C (``sorted``, ``map``,
        ``compress``), and a sorted list needs half the memory of a set of the same numbers
        (this runs while the listing is at its largest). Inode numbers come out of a walk
        mostly ascending, which makes the sort close to linear."""
        ordered = sorted(file_inodes)
        shared = set(compress(ordered, map(eq, ordered, islice(ordered, 1, None))))
        del ordered
        if not shared:
            return
        for key in compress(file_keys, map(shared.__contains__, file_inodes)):
            try:
                st = os.lstat(root + b"/" + key)
            except OSError as err:
                self.problem("unreadable", f"cannot read /{_show(key)}: "
                                           f"{os.strerror(err.errno or 0)}")
                continue
            if stat.S_ISREG(st.st_mode):
                self.regular(key, st)

    def regular(self, key: bytes, st: os.stat_result) -> None:
        """A regular file with its ``lstat``: an xattr-less plain file or a hard link."""
        if st.st_nlink > 1:
            self.listing.entries[key] = Entry(
                EntryKind.FILE, b"", stat.S_IMODE(st.st_mode), st.st_size, st.st_uid,
                st.st_gid, (st.st_dev, st.st_ino), st.st_nlink)
        else:
            self.listing.entries[key] = PLAIN_FILE

    def xattr_whiteout(self, entry: os.DirEntry[bytes]) -> bool:
        st = entry.stat(follow_symlinks=False)
        return st.st_size == 0 and whiteout.is_overlay_whiteout(
            st, os.listxattr(entry.path, follow_symlinks=False))

    def special(self, key: bytes, st: os.stat_result) -> None:
        """A device, FIFO or socket (or a whiteout)."""
        if self.overlay and whiteout.is_overlay_whiteout(st):
            self.listing.whiteouts.add(key)
            return
        kind = _KIND_OF_MODE.get(stat.S_IFMT(st.st_mode), EntryKind.FILE)
        self.listing.entries[key] = Entry(kind, b"", stat.S_IMODE(st.st_mode), st.st_size,
                                          st.st_uid, st.st_gid, (st.st_dev, st.st_ino),
                                          st.st_nlink)

    def dir_xattrs(self, path: bytes, key: bytes) -> bool:
        """Read a directory's overlay xattrs: record it opaque (``y``); ``True`` when it is
        marked as holding xattr whiteouts (``x``)."""
        try:
            names = os.listxattr(path, follow_symlinks=False)
        except OSError as err:
            if err.errno not in (errno.ENOTSUP, errno.ENODATA):
                self.problem("xattr", f"cannot list the xattrs of /{_show(key)}: "
                                      f"{os.strerror(err.errno or 0)}")
            return False
        found: dict[str, bytes] = {}
        for xattr in names:
            if xattr in _OVERLAY_XATTRS:
                try:
                    found[xattr] = os.getxattr(path, xattr, follow_symlinks=False)
                except OSError:
                    continue
        if not found:
            return False
        if whiteout.is_overlay_opaque(found):
            self.listing.opaque.add(key)
        return _XWHITEOUT_DIR in found.values()


def _plain_symlink_entry_maker() -> Callable[[bytes], Entry]:
    """A fast ``lambda target: Entry(EntryKind.SYMLINK, target)``.

    ``Entry`` is a frozen dataclass, whose ``__init__`` sets each of its eight fields through
    ``object.__setattr__`` (~2 us a symlink on a 2-vCPU VM). Filling the slots through their
    descriptors gives the same object (same class, equality and hash) in about half the
    time: ~0.1 s on a tree with 100k symlinks. Used only while the slots are exactly the
    fields this knows and the result equals the constructor's; else the constructor is used.
    """
    fields = ("kind", "target", "mode", "size", "uid", "gid", "inode", "nlink")

    def constructed(target: bytes) -> Entry:
        return Entry(EntryKind.SYMLINK, target)

    if getattr(Entry, "__slots__", None) != fields:
        return constructed
    setters = [getattr(Entry, name).__set__ for name in fields]
    set_kind, set_target, set_mode, set_size, set_uid, set_gid, set_inode, set_nlink = setters
    new, kind = object.__new__, EntryKind.SYMLINK

    def symlink_entry(target: bytes) -> Entry:
        made = new(Entry)
        set_kind(made, kind)
        set_target(made, target)
        set_mode(made, 0)
        set_size(made, 0)
        set_uid(made, 0)
        set_gid(made, 0)
        set_inode(made, None)
        set_nlink(made, 1)
        return made

    # the defaults above must be the dataclass's: same object as the constructor's, or not used
    return symlink_entry if symlink_entry(b"t") == constructed(b"t") else constructed


_symlink_entry = _plain_symlink_entry_maker()


def _show(name: bytes) -> str:
    text = name.decode("utf-8", "backslashreplace")
    return text if len(text) <= 160 else text[:160] + "…"


def _mounts_below(root: bytes) -> set[bytes]:
    """Keys (paths relative to ``root``) of the mount points strictly below it."""
    real = os.path.realpath(root).rstrip(b"/") + b"/"
    return {os.fsencode(point)[len(real):] for point, _ in mount_points()
            if os.fsencode(point).startswith(real)}
