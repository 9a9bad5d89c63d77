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

A big tree is walked by two processes (see ``_Walker.walk_shared``): after
:data:`PARALLEL_AFTER` entries the directories still to walk are handed out one at a time to
this process and to a forked helper (``crifs.fs.forked``), which sends its part back as it
goes. The listing is the same as a walk by one process (only the order of ``problems`` may
differ); if the helper fails, its directories are walked here.

The listing says ``dirs_complete`` (every entry's parent is a listed directory) and fills
``notable`` (the symlinks, devices and hard-linked files), so consumers skip passes over every
entry.

Errors: a missing root is ``NotFound``, a root that is a symlink ``UnsafePath`` (crifs follows
no symlink, not even the first: the message names the real path to pass instead), a root that
is not a directory ``BadInput``. Below the root, anything unreadable (permission denied, a
directory removed during the walk) becomes a sentence in ``problems`` and the walk goes on.
"""

from __future__ import annotations

import errno
import os
import pickle
import stat
from array import array
from collections.abc import Callable, Iterable
from functools import partial
from itertools import compress, islice, repeat
from operator import eq

from crifs.errors import BadInput, NotFound, UnsafePath
from crifs.fs.forked import ForkedJob, TaskNumbers
from crifs.fs.gcpause import gc_paused
from crifs.fs.listing import (
    PLAIN_DIR,
    PLAIN_FILE,
    Entry,
    EntryKind,
    LayerListing,
    fast_constructor,
)
from crifs.fs.mounts import mount_points
from crifs.oci import whiteout

MAX_EXAMPLES = 20  # problems of one kind spelled out before they are only counted
GROUPS, STAT_ALL, OFF = "groups", "all", "off"  # hard-link modes, see read_layer_dir
# A tree with more entries than this is walked by two processes (0: never). Below it, a fork
# costs more than it saves.
PARALLEL_AFTER = 20_000
PROGRESS_DIRS = 256  # directories walked between two progress calls (one process)
# Directories handed out in turn: enough that the last one to finish is a small part of the
# walk, few enough that splitting the top of the tree into them is quick.
_PARALLEL_TASKS = 64
_NUL = b"\0"

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

# A directory still to walk: (its path on the host, its key in the listing, holds xattr
# whiteouts)
_Task = tuple[bytes, bytes, bool]


def read_layer_dir(
    path: str | bytes | os.PathLike[str],
    *,
    index: int,
    name: str,
    ident: str | None = None,
    overlay: bool = True,
    hardlinks: str = GROUPS,
    progress: Callable[[int], None] | None = None,
) -> LayerListing:
    """The listing of the directory tree at ``path`` (see the module doc for what is read).

    ``overlay``: read overlayfs whiteouts and opaque directories (``False`` for a plain
    rootfs, where a 0/0 character device is just a device). ``hardlinks``: how regular files
    are checked for hard links: ``groups`` (default) groups them by the inode number the
    directory entry carries (free) and ``lstat``s only the files that share one, so a group
    inside the layer gets identities and link counts, but a file linked only to something
    outside the layer looks plain; ``all`` ``lstat``s every regular file (exact link counts,
    several times slower on a big tree); ``off`` stores every regular file as ``PLAIN_FILE``.
    ``progress``: told the number of entries found so far now and then (every
    :data:`PROGRESS_DIRS` directories, or each directory a helper walked) and at the end.
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
    listing = LayerListing(index=index, name=name, ident=ident, source=shown)
    walker = _Walker(overlay, hardlinks, _mounts_below(root), progress)
    with gc_paused():
        walker.walk(root)
        walker.fill(listing, root)
    if progress is not None:
        progress(len(listing.entries))
    return listing


class _Walker:
    """What one process found: the listing's ``entries`` and ``notable`` dicts, and flat
    lists gathered since the last ``flush`` (appending to a list costs a fraction of an
    insert into a million-entry dict; ``flush`` moves them in C). ``fill`` makes the listing.

    ``files[i]`` has the directory-entry inode number ``file_inodes[i]`` (``groups`` mode
    only, then kept whole for ``stat_groups``), likewise a helper's ``helper_files`` and
    ``helper_inodes``; ``links[i]`` is a symlink whose target is ``targets[i]``; ``others``
    holds every entry that is neither plain nor a plain symlink (devices, hard-linked
    files)."""

    def __init__(self, overlay: bool, hardlinks: str, mounted: set[bytes],
                 progress: Callable[[int], None] | None = None) -> None:
        self.overlay = overlay
        self.hardlinks = hardlinks
        self.mounted = mounted
        self.progress = progress
        self.reset()

    def reset(self) -> None:
        self.entries: dict[bytes, Entry] = {}
        self.notable: dict[bytes, Entry] = {}
        self.reset_pending()
        # a helper's files and their inode numbers (kept apart: see walk_shared)
        self.helper_files: list[bytes] = []
        self.helper_inodes = array("Q")
        self.flushed_helper_files = 0
        self.inodes_distinct: bool | None = None  # known for all inode numbers, or None
        self.helper_inodes_distinct: bool | None = None  # what the helper said of its own

    def reset_pending(self) -> None:
        """Forget what was found since the last ``export`` (a helper's next chunk)."""
        self.dirs: list[bytes] = []
        self.files: list[bytes] = []
        self.flushed_files = 0  # files[:flushed_files] are in entries already
        self.file_inodes = array("Q")
        self.links: list[bytes] = []
        self.targets: list[bytes] = []
        self.others: dict[bytes, Entry] = {}
        self.whiteouts: set[bytes] = set()
        self.opaque: set[bytes] = set()
        self.examples: list[tuple[str, str]] = []  # (kind, message), MAX_EXAMPLES per kind
        self.counts: dict[str, int] = {}

    def problem(self, kind: str, message: str) -> None:
        seen = self.counts.get(kind, 0) + 1
        self.counts[kind] = seen
        if seen <= MAX_EXAMPLES:
            self.examples.append((kind, message))

    def seen(self) -> int:
        """Entries found so far (before any helper starts)."""
        pending = len(self.dirs) + len(self.files) - self.flushed_files + len(self.links)
        return len(self.entries) + pending + len(self.others)

    def flush(self) -> None:
        """Move what the lists gathered since the last flush into ``entries`` and
        ``notable``, in C (directories first, so a parent comes before its children).
        ``files`` stays whole in ``groups`` mode, where ``stat_groups`` needs it."""
        entries = self.entries
        entries.update(zip(self.dirs, repeat(PLAIN_DIR)))
        self.dirs = []
        entries.update(zip(self.files[self.flushed_files :], repeat(PLAIN_FILE)))
        entries.update(zip(self.helper_files[self.flushed_helper_files :], repeat(PLAIN_FILE)))
        if self.hardlinks == GROUPS:
            self.flushed_files = len(self.files)
            self.flushed_helper_files = len(self.helper_files)
        else:
            self.files, self.helper_files = [], []
        made = dict(zip(self.links, map(_symlink_entry, self.targets), strict=True))
        self.links, self.targets = [], []
        made.update(self.others)
        self.others = {}
        entries.update(made)
        self.notable.update(made)

    # -- walking ------------------------------------------------------------------------

    def walk(self, root: bytes) -> None:
        """Walk the tree at ``root``: alone, or with a helper once it proves big."""
        stack: list[_Task] = [(root, b"", self.overlay and self.dir_xattrs(root, b""))]
        scan = self.scan_dir
        limit = PARALLEL_AFTER
        progress, scanned = self.progress, 0
        while stack and (not limit or self.seen() < limit):
            scan(stack.pop(), stack)
            scanned += 1
            if progress is not None and not scanned % PROGRESS_DIRS:
                progress(self.seen())
        if stack:
            tasks = _split(stack, scan)
            self.flush()
            self.walk_shared(tasks)
            self.flush()

    def walk_tasks(
        self,
        tasks: list[_Task],
        order: Callable[[], int | None],
        after: Callable[[int], None] | None = None,
    ) -> None:
        """Walk the subtrees ``tasks[i]`` for each ``i`` that ``order`` hands out, until it
        gives ``None``, calling ``after(i)`` when one is done."""
        scan = self.scan_dir
        while (number := order()) is not None:
            stack = [tasks[number]]
            while stack:
                scan(stack.pop(), stack)
            if after is not None:
                after(number)

    def scan_dir(self, task: _Task, stack: list[_Task]) -> None:
        """List one directory; its subdirectories go on ``stack``."""
        dir_path, dir_key, xwhiteouts = task
        prefix = dir_key + b"/" if dir_key else b""
        try:
            scanner = os.scandir(dir_path)
        except OSError as err:
            self.problem("unreadable", f"cannot list /{_show(dir_key)}: "
                                       f"{os.strerror(err.errno or 0)}; its contents are "
                                       "not audited")
            return
        # Locals for the hot loop: ~1M iterations in a big rootfs.
        overlay, mounted, readlink = self.overlay, self.mounted, os.readlink
        stat_all, by_inode = self.hardlinks == STAT_ALL, self.hardlinks == GROUPS
        add_file, add_inode, add_dir = self.files.append, self.file_inodes.append, self.dirs.append
        add_link, add_target = self.links.append, self.targets.append
        with scanner:
            try:
                for entry in scanner:
                    key = prefix + entry.name
                    try:
                        if entry.is_file(follow_symlinks=False):
                            if xwhiteouts and self.xattr_whiteout(entry):
                                self.whiteouts.add(key)
                            elif stat_all:
                                self.regular(key, entry.stat(follow_symlinks=False))
                            elif by_inode:
                                inode = entry.inode()
                                add_file(key)
                                add_inode(inode)
                            else:
                                add_file(key)
                        elif entry.is_dir(follow_symlinks=False):
                            add_dir(key)
                            if mounted and key in mounted:
                                self.problem("mount", f"/{_show(key)} is another filesystem "
                                                      "mounted here; not descended into")
                                continue
                            stack.append((entry.path, key,
                                          overlay and self.dir_xattrs(entry.path, key)))
                        elif entry.is_symlink():
                            target = readlink(entry.path)
                            add_link(key)
                            add_target(target)
                        else:
                            self.special(key, entry.stat(follow_symlinks=False))
                    except OSError as err:
                        self.problem("unreadable", f"cannot read /{_show(key)}: "
                                                   f"{os.strerror(err.errno or 0)}; left out")
            except OSError as err:
                self.problem("unreadable", f"cannot list /{_show(dir_key)}: "
                                           f"{os.strerror(err.errno or 0)}")

    def regular(self, key: bytes, st: os.stat_result) -> None:
        """A regular file with its ``lstat``: an xattr-less plain file or a hard link."""
        if st.st_nlink > 1:
            self.others[key] = _hard_linked(st)
        else:
            self.files.append(key)

    def xattr_whiteout(self, entry: os.DirEntry[bytes]) -> bool:
        st = entry.stat(follow_symlinks=False)
        return st.st_size == 0 and whiteout.is_overlay_whiteout(
            st, os.listxattr(entry.path, follow_symlinks=False))

    def special(self, key: bytes, st: os.stat_result) -> None:
        """A device, FIFO or socket (or a whiteout)."""
        if self.overlay and whiteout.is_overlay_whiteout(st):
            self.whiteouts.add(key)
            return
        kind = _KIND_OF_MODE.get(stat.S_IFMT(st.st_mode), EntryKind.FILE)
        self.others[key] = Entry(kind, b"", stat.S_IMODE(st.st_mode), st.st_size, st.st_uid,
                                 st.st_gid, (st.st_dev, st.st_ino), st.st_nlink)

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
            self.opaque.add(key)
        return _XWHITEOUT_DIR in found.values()

    # -- two processes --------------------------------------------------------------------

    def walk_shared(self, tasks: list[_Task]) -> None:
        """Walk ``tasks`` with a forked helper (a ``ForkedJob``), each process taking the next
        task number when it is free. The helper sends what it found after each task, and
        this process adds that to its dicts between its own tasks: the dicts grow while the
        helper still walks, instead of all at the end (inserting half a million keys takes
        a few tenths of a second). Whatever the helper did not deliver (it failed) is walked
        here."""
        numbers = TaskNumbers(len(tasks))
        done: set[int] = set()
        helper: ForkedJob | None = None

        def helper_job(send: Callable[[bytes], None]) -> bytes:
            self.reset()  # the helper's own findings only
            every = array("Q")

            def send_task(number: int) -> None:
                every.extend(self.file_inodes)
                send(self.export([number]))
                self.reset_pending()

            self.walk_tasks(tasks, numbers.next, send_task)
            return self.export([], distinct=len(set(every)) == len(every))  # here, in parallel

        def between(number: int) -> None:
            done.add(number)
            if helper is not None:
                for chunk in helper.chunks():
                    done.update(self.absorb(chunk))
            self.flush()
            if self.progress is not None:
                self.progress(self.seen())

        try:
            helper = ForkedJob.start(helper_job) if len(tasks) > 1 else None
            try:
                self.walk_tasks(tasks, numbers.next, between)
            except BaseException:
                if helper is not None:
                    helper.kill()
                raise
        finally:
            numbers.close()
        # While the helper finishes: are this process's inode numbers distinct (the common
        # case, no hard links)? Then only the helper's need a look after it is done.
        mine = set(self.file_inodes)
        self.inodes_distinct = len(mine) == len(self.file_inodes)
        rest = helper.finish() if helper is not None else []
        for chunk in rest or ():
            done.update(self.absorb(chunk))
        self.flush()
        if helper is not None:
            if rest is None or self.helper_inodes_distinct is None:
                self.inodes_distinct = None  # not known: stat_groups looks
            else:
                self.inodes_distinct = (self.inodes_distinct and self.helper_inodes_distinct
                                        and mine.isdisjoint(self.helper_inodes))
        del mine
        missing = [number for number in range(len(tasks)) if number not in done]
        if missing:
            self.inodes_distinct = None
            self.walk_tasks(tasks, _handing_out(missing), lambda _: self.flush())

    def export(self, done: list[int], *, distinct: bool | None = None) -> bytes:
        """What this (helper) process found since the last export, for ``absorb`` in the
        parent: the task numbers ``done`` and, in the last one, whether all its inode
        numbers were ``distinct``."""
        header = (done, self.examples, self.counts, self.others, self.whiteouts, self.opaque,
                  len(self.dirs), len(self.files), len(self.links), distinct)
        blobs = [_NUL.join(self.dirs), _NUL.join(self.files), _NUL.join(self.links),
                 _NUL.join(self.targets), self.file_inodes.tobytes()]
        head = pickle.dumps((header, [len(blob) for blob in blobs]),
                            protocol=pickle.HIGHEST_PROTOCOL)
        return b"".join([len(head).to_bytes(8, "little"), head, *blobs])

    def absorb(self, data: bytes) -> list[int]:
        """Add a helper's ``export`` to what this process found; the task numbers it did
        (none when ``data`` is not a whole export: then nothing is added)."""
        try:
            size = int.from_bytes(data[:8], "little")
            header, lengths = pickle.loads(data[8 : 8 + size])
            (done, examples, counts, others, whiteouts, opaque, n_dirs, n_files, n_links,
             distinct) = header
            blobs, offset = [], 8 + size
            for length in lengths:
                blobs.append(data[offset : offset + length])
                offset += length
            dirs, files, links, targets, inodes = blobs
            if offset != len(data) or len(inodes) % self.helper_inodes.itemsize:
                return []
            dir_keys, file_keys = _split_keys(dirs, n_dirs), _split_keys(files, n_files)
            link_keys, link_targets = _split_keys(links, n_links), _split_keys(targets, n_links)
        except (ValueError, TypeError, EOFError, pickle.UnpicklingError):
            return []
        self.dirs += dir_keys
        self.helper_files += file_keys
        self.links += link_keys
        self.targets += link_targets
        self.helper_inodes.frombytes(inodes)
        if distinct is not None:
            self.helper_inodes_distinct = bool(distinct)
        self.others.update(others)
        self.whiteouts |= whiteouts
        self.opaque |= opaque
        for kind, message in examples:
            seen = self.counts.get(kind, 0) + 1
            self.counts[kind] = seen
            if seen <= MAX_EXAMPLES:
                self.examples.append((kind, message))
        for kind, count in counts.items():
            shown = sum(1 for k, _ in examples if k == kind)
            self.counts[kind] = self.counts.get(kind, 0) + count - shown
        return list(done)

    # -- the listing ----------------------------------------------------------------------

    def fill(self, listing: LayerListing, root: bytes) -> None:
        """Turn what was found into ``listing``'s entries, look for hard-link groups and
        write the problems."""
        self.flush()
        entries, notable = self.entries, self.notable
        if self.file_inodes or self.helper_inodes:
            self.stat_groups(entries, notable, root)
        listing.entries = entries
        listing.notable = notable
        listing.whiteouts = self.whiteouts
        listing.opaque = self.opaque
        listing.dirs_complete = True
        for _, message in self.examples:
            listing.problems.append(message)
        for kind, count in self.counts.items():
            if count > MAX_EXAMPLES:
                listing.problems.append(
                    f"... and {count - MAX_EXAMPLES} more problems of the same kind ({kind})")

    def stat_groups(
        self, entries: dict[bytes, Entry], notable: dict[bytes, Entry], root: bytes
    ) -> None:
        """``lstat`` the regular files that share a directory-entry inode number with another
        one (hard-link groups inside the layer), keep their identity and link count in
        ``entries`` and ``notable``.

        ``file_inodes[i]`` is the inode number of ``files[i]`` (the same for the helper's).
        Most trees have no hard links: one set of the numbers tells (C-level; ``walk_shared``
        may know already). Else the shared numbers are the equal neighbours of the sorted
        numbers: every step runs in C (``sorted``, ``map``, ``compress``). Inode numbers come
        out of a walk mostly ascending, which makes the sort close to linear."""
        if self.inodes_distinct:
            return
        inodes, keys = self.file_inodes + self.helper_inodes, self.files + self.helper_files
        if self.inodes_distinct is None and len(set(inodes)) == len(inodes):
            return
        ordered = sorted(inodes)
        shared = set(compress(ordered, map(eq, ordered, islice(ordered, 1, None))))
        del ordered
        for key in compress(keys, map(shared.__contains__, inodes)):
            try:
                st = os.lstat(root + b"/" + key)
            except OSError as err:
                self.problem("unreadable", f"cannot read /{_show(key)}: "
                                           f"{os.strerror(err.errno or 0)}")
                continue
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                entries[key] = notable[key] = _hard_linked(st)


def _handing_out(numbers: Iterable[int]) -> Callable[[], int | None]:
    items = iter(numbers)
    return lambda: next(items, None)


def _split(stack: list[_Task], scan: Callable[[_Task, list[_Task]], None]) -> list[_Task]:
    """Tasks for two walkers: the directories still to walk, split level by level (every
    shallowest one listed here, its subdirectories becoming tasks) until there are
    :data:`_PARALLEL_TASKS`, so that no single task is a big part of the tree. Shallow ones
    first: they tend to be the biggest, and the walkers take tasks in order."""
    tasks = list(stack)
    scans = 0
    while 0 < len(tasks) < _PARALLEL_TASKS and scans < 4 * _PARALLEL_TASKS:
        shallowest = min(map(_depth, tasks))
        level = [task for task in tasks if _depth(task) == shallowest]
        tasks = [task for task in tasks if _depth(task) != shallowest]
        for task in level:  # fewer than _PARALLEL_TASKS
            scan(task, tasks)
        scans += len(level)
    tasks.sort(key=_depth)
    return tasks


def _depth(task: _Task) -> int:
    return task[1].count(b"/")


def _split_keys(blob: bytes, count: int) -> list[bytes]:
    return blob.split(_NUL) if count else []


def _hard_linked(st: os.stat_result) -> Entry:
    return Entry(EntryKind.FILE, b"", stat.S_IMODE(st.st_mode), st.st_size, st.st_uid,
                 st.st_gid, (st.st_dev, st.st_ino), st.st_nlink)


_new_entry = fast_constructor(Entry)
_SYMLINK = EntryKind.SYMLINK


def _symlink_entry(target: bytes) -> Entry:
    """``Entry(EntryKind.SYMLINK, target)`` in half the time (the frozen dataclass's
    ``__init__`` goes through ``object.__setattr__`` per field): ~0.1 s on a tree with 100k
    symlinks. The same object: the defaults here are the dataclass's (checked below)."""
    return _new_entry(_SYMLINK, target, 0, 0, 0, 0, None, 1)


if _symlink_entry(b"t") != Entry(_SYMLINK, b"t"):  # the dataclass's defaults changed
    _symlink_entry = partial(Entry, _SYMLINK)  # noqa: F811


def _show(name: bytes) -> str:
    text = name.decode("utf-8", "backslashreplace")
    return text if len(text) <= 160 else text[:160] + "…"


def _mounts_below(root: bytes) -> set[bytes]:
    """Keys (paths relative to ``root``) of the mount points strictly below it."""
    real = os.path.realpath(root).rstrip(b"/") + b"/"
    return {os.fsencode(point)[len(real):] for point, _ in mount_points()
            if os.fsencode(point).startswith(real)}
