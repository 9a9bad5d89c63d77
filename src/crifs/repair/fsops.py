"""File-level changes inside a store that never follow a symlink and never touch a mount.

Every primitive here works through directory file descriptors: the store root is opened as
the user named it (it may itself be a symlink, as the runtime also follows it), and every
component below it is opened ``O_NOFOLLOW``, so a symlink planted anywhere in a store can
neither redirect a change outside the store nor make a deletion walk into the host.

Contracts:

- :func:`remove_path` unlinks a file or symlink (never its target) or deletes a directory
  tree, children first, unlinking symlinks inside it. It refuses (``Refused``) a path that is
  a mount point, has a mount below it, or is named by a live overlay mount's
  ``lowerdir``/``upperdir``/``workdir`` (read fresh from ``/proc/self/mountinfo`` for every
  call); while deleting it also stops at any directory on another mount than the tree's top.
  A directory is first renamed into ``trash`` (atomic: the runtime sees it present or gone);
  when that rename crosses a mount (``EXDEV``) it is deleted in place. A missing path is
  success.
- :func:`replace_symlink`, :func:`write_file` and :func:`make_dir` are idempotent: an
  existing correct result is success. A replacement is made under a scratch name and renamed
  into place, so the path is never missing. A directory in the way is refused. New entries
  get the owner of their parent directory (a rootless store stays owned by its user).
- Each change is followed by an ``fsync`` of the directories it changed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from crifs.errors import CrifsError, UnsafePath
from crifs.fs.mounts import overlay_dirs, parse_mount_table, read_mountinfo

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
SCRATCH_PREFIX = ".crifs-tmp-"
MakeFn = Callable[[int, str], None]
"""``make(dir_fd, name)``: creates a new entry under a temporary name."""


class Refused(CrifsError):
    """A change crifs will not make (a mount is involved, a directory is in the way)."""


@dataclass(frozen=True, slots=True)
class Freed:
    """What a removal freed: allocated bytes of inodes whose last link went, and entries."""

    disk_bytes: int = 0
    inodes: int = 0

    def __add__(self, other: Freed) -> Freed:
        return Freed(self.disk_bytes + other.disk_bytes, self.inodes + other.inodes)


NOTHING = Freed()


class Scope:
    """The roots a repair may change things under. ``relative_bases`` are the directories an
    overlay mount's relative ``lowerdir`` entries may be relative to (a runtime mounts from
    inside its layer home when the option string gets too long)."""

    def __init__(self, roots: Sequence[str], relative_bases: Sequence[str] = ()) -> None:
        self.roots = tuple(os.path.abspath(r) for r in roots)
        self.relative_bases = tuple(os.path.abspath(b) for b in relative_bases)

    def locate(self, path: str) -> tuple[str, list[str]]:
        """``(root, components below it)`` of ``path``; ``UnsafePath`` when it is outside
        every root, is a root itself or contains ``.``/``..``."""
        if not os.path.isabs(path):
            raise UnsafePath("is not an absolute path", path=path)
        parts = path.split("/")
        if any(p in (".", "..") for p in parts):
            raise UnsafePath("contains '.' or '..'", path=path)
        norm = os.path.normpath(path)
        for root in sorted(self.roots, key=len, reverse=True):
            if norm.startswith(root.rstrip("/") + "/"):
                rest = norm[len(root.rstrip("/")) + 1:]
                return root, [c for c in rest.split("/") if c]
        raise UnsafePath(f"is outside the store ({', '.join(self.roots)})", path=path)

    @contextlib.contextmanager
    def parent(self, path: str) -> Iterator[tuple[int, str]]:
        """``(fd of path's directory, last component)``, every directory below the root opened
        without following symlinks. ``FileNotFoundError`` when a directory on the way is
        missing; ``UnsafePath`` when one is a symlink or not a directory."""
        root, components = self.locate(path)
        fd = os.open(root, _DIR_FLAGS & ~os.O_NOFOLLOW)
        try:
            for name in components[:-1]:
                try:
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except OSError as err:
                    if err.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise UnsafePath(f"{name!r} on the way is a symlink or not a "
                                         "directory; crifs does not follow it",
                                         path=path) from None
                    raise
                os.close(fd)
                fd = child
            yield fd, components[-1]
        finally:
            os.close(fd)


def open_dir(path: str) -> int:
    """An fd of directory ``path``, not following a symlink at its last component."""
    return os.open(path, _DIR_FLAGS)


def fsync_dir(fd: int) -> None:
    with contextlib.suppress(OSError):  # EINVAL on filesystems that cannot sync a directory
        os.fsync(fd)


# -- mount guard -------------------------------------------------------------------------


def mount_refusal(path: str, relative_bases: Sequence[str] = ()) -> str | None:
    """Why ``path`` must not be removed because of a live mount, or ``None``.

    Compared as given and with its directory resolved (mountinfo shows resolved paths); an
    overlay's directories are compared as written and resolved (``l/<link>`` symlinks)."""
    candidates = {os.path.normpath(path),
                  os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))}

    def hits(other: str) -> bool:
        return any(other == c or other.startswith(c.rstrip("/") + "/") for c in candidates)

    points, overlays = _live_mounts(tuple(relative_bases))
    for point in points:
        if hits(point):
            return "is a mount point" if point in candidates else \
                f"has a mount below it ({point})"
    for point, named, forms in overlays:
        if any(hits(form) for form in forms):
            return f"is used by the overlay mount at {point} ({named})"
    return None


_OverlayUse = tuple[str, str, tuple[str, ...]]  # mount point, dir as named, its path forms
_mounts_cache: dict[tuple[str, ...], tuple[str, tuple[list[str], list[_OverlayUse]]]] = {}


def _live_mounts(relative_bases: tuple[str, ...]) -> tuple[list[str], list[_OverlayUse]]:
    """Mount points, and each overlay dir with its absolute and resolved forms. mountinfo is
    read on every call; the resolving is redone only when it changed (the kernel resolved
    those paths when it mounted, so later symlink changes do not move a live mount)."""
    text = read_mountinfo()
    cached = _mounts_cache.get(relative_bases)
    if cached is not None and cached[0] == text:
        return cached[1]
    points: list[str] = []
    overlays: list[_OverlayUse] = []
    for entry in parse_mount_table(text):
        points.append(entry.mount_point)
        for named in overlay_dirs(entry):
            bases = [named] if os.path.isabs(named) else [
                os.path.join(base, named) for base in relative_bases]
            forms = {form for b in bases for form in (os.path.normpath(b), os.path.realpath(b))}
            overlays.append((entry.mount_point, named, tuple(sorted(forms))))
    _mounts_cache.clear()  # one store per run: keep a single entry
    _mounts_cache[relative_bases] = (text, (points, overlays))
    return points, overlays


def _mount_id(fd: int) -> int | None:
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
            for line in f:
                if line.startswith("mnt_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


# -- remove ------------------------------------------------------------------------------


def remove_path(scope: Scope, path: str, trash: str | None = None) -> Freed:
    """Remove ``path`` (see module contract). Returns what was freed (``NOTHING`` if gone)."""
    try:
        with scope.parent(path) as (parent_fd, name):
            try:
                st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            except FileNotFoundError:
                return NOTHING
            reason = mount_refusal(path, scope.relative_bases)
            if reason is not None:
                raise Refused(f"not removed: {reason}", path=path)
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(name, dir_fd=parent_fd)
                fsync_dir(parent_fd)
                return _freed_by(st)
            if trash is not None:
                moved = _move_to_trash(parent_fd, name, trash)
                if moved is not None:
                    trash_fd, trash_name = moved
                    try:
                        return _remove_tree(trash_fd, trash_name)
                    finally:
                        os.close(trash_fd)
            freed = _remove_tree(parent_fd, name)
            fsync_dir(parent_fd)
            return freed
    except FileNotFoundError:
        return NOTHING  # a directory on the way is gone: so is the path


def empty_dir(path: str) -> Freed:
    """Delete everything inside directory ``path`` (the crifs trash), keeping ``path``."""
    try:
        fd = open_dir(path)
    except FileNotFoundError:
        return NOTHING
    freed = NOTHING
    try:
        for entry in _entries(fd):
            if entry.is_dir(follow_symlinks=False):
                freed = freed + _remove_tree(fd, entry.name)
            else:
                st = entry.stat(follow_symlinks=False)
                os.unlink(entry.name, dir_fd=fd)
                freed = freed + _freed_by(st)
        fsync_dir(fd)
    finally:
        os.close(fd)
    return freed


def _move_to_trash(parent_fd: int, name: str, trash: str) -> tuple[int, str] | None:
    """Rename ``name`` into ``trash``; ``(trash fd, new name)`` or ``None`` across mounts."""
    trash_fd = open_dir(trash)
    try:
        target = f"{name}-{secrets.token_hex(4)}"
        try:
            os.rename(name, target, src_dir_fd=parent_fd, dst_dir_fd=trash_fd)
        except OSError as err:
            if err.errno == errno.EXDEV:
                os.close(trash_fd)
                return None
            raise
        fsync_dir(parent_fd)
        fsync_dir(trash_fd)
        return trash_fd, target
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(trash_fd)
        raise


def _entries(fd: int) -> list[os.DirEntry[str]]:
    # Listed before anything is unlinked: never iterate a directory while changing it.
    with os.scandir(fd) as it:
        return list(it)


def _remove_tree(parent_fd: int, name: str) -> Freed:
    """Delete directory ``name`` under ``parent_fd`` and all below it, children first, never
    following a symlink and never entering a directory on another mount."""
    top_fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    top_mount = _mount_id(parent_fd)  # the tree must be on its parent's mount, all of it
    if top_mount is not None and _mount_id(top_fd) != top_mount:
        os.close(top_fd)
        raise Refused("not removed: it is a mount point", path=f"/proc/self/fd/{parent_fd}/{name}")
    # Frames of (parent fd, name in parent, own fd, entries still to handle).
    frames: list[tuple[int, str, int, list[os.DirEntry[str]]]] = []
    freed = NOTHING
    try:
        top_st = os.fstat(top_fd)
        frames.append((parent_fd, name, top_fd, _entries(top_fd)))
        while frames:
            pfd, dname, fd, todo = frames[-1]
            if not todo:
                frames.pop()
                os.close(fd)
                os.rmdir(dname, dir_fd=pfd)
                continue
            entry = todo.pop()
            if entry.is_dir(follow_symlinks=False):
                child = os.open(entry.name, _DIR_FLAGS, dir_fd=fd)
                if top_mount is not None and _mount_id(child) != top_mount:
                    os.close(child)
                    raise Refused("stopped: a mount appeared below while deleting",
                                  path=os.path.join(f"/proc/self/fd/{fd}", entry.name))
                frames.append((fd, entry.name, child, _entries(child)))
                freed = freed + _freed_by(os.fstat(child))
            else:
                st = entry.stat(follow_symlinks=False)
                os.unlink(entry.name, dir_fd=fd)
                freed = freed + _freed_by(st)
        return freed + _freed_by(top_st)
    finally:
        for _, _, fd, _ in frames:
            with contextlib.suppress(OSError):
                os.close(fd)


def _freed_by(st: os.stat_result) -> Freed:
    # An inode with other links elsewhere keeps its blocks; count only what really goes.
    if stat.S_ISDIR(st.st_mode) or st.st_nlink <= 1:
        return Freed(st.st_blocks * 512, 1)
    return Freed(0, 1)


# -- create / replace --------------------------------------------------------------------


def replace_symlink(scope: Scope, path: str, target: str, scratch: str | None = None) -> bool:
    """Make ``path`` a symlink to ``target``. Returns False when it already was one."""
    with scope.parent(path) as (parent_fd, name):
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            os.symlink(target, name, dir_fd=parent_fd)  # atomic by itself
            _adopt_owner(parent_fd, name)
            fsync_dir(parent_fd)
            return True
        if stat.S_ISDIR(st.st_mode):
            raise Refused("not replaced by a symlink: a directory is in the way", path=path)
        if stat.S_ISLNK(st.st_mode) and os.readlink(name, dir_fd=parent_fd) == target:
            return False

        def make(fd: int, tmp: str) -> None:
            os.symlink(target, tmp, dir_fd=fd)
            os.chown(tmp, st.st_uid, st.st_gid, dir_fd=fd, follow_symlinks=False)

        _rename_into_place(parent_fd, name, scratch, make)
        return True


def write_file(scope: Scope, path: str, data: bytes, mode: int = 0o644,
               scratch: str | None = None) -> bool:
    """Write ``data`` to ``path`` atomically. Returns False when it already held exactly that."""
    with scope.parent(path) as (parent_fd, name):
        owner: tuple[int, int] | None = None
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            pst = os.fstat(parent_fd)
            owner = (pst.st_uid, pst.st_gid)
        else:
            if stat.S_ISDIR(st.st_mode):
                raise Refused("not written: a directory is in the way", path=path)
            owner = (st.st_uid, st.st_gid)
            if (stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == mode
                    and st.st_size == len(data) and _read_at(parent_fd, name) == data):
                return False

        def make(fd: int, tmp: str) -> None:
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_CLOEXEC, mode, dir_fd=fd)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(out, view):]
                os.fchmod(out, mode)
                if owner is not None:
                    os.fchown(out, *owner)
                os.fsync(out)
            finally:
                os.close(out)

        _rename_into_place(parent_fd, name, scratch, make)
        return True


def make_dir(scope: Scope, path: str, mode: int = 0o700) -> bool:
    """Create directory ``path``. Returns False when a directory was already there."""
    with scope.parent(path) as (parent_fd, name):
        try:
            os.mkdir(name, mode, dir_fd=parent_fd)
        except FileExistsError:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                return False
            raise Refused("not created: something that is not a directory is in the way",
                          path=path) from None
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        try:
            os.fchmod(fd, mode)  # mkdir's mode is cut by the umask
            pst = os.fstat(parent_fd)
            os.fchown(fd, pst.st_uid, pst.st_gid)
        finally:
            os.close(fd)
        fsync_dir(parent_fd)
        return True


def remove_scratch(scope: Scope, directory: str) -> int:
    """Unlink ``.crifs-tmp-*`` files and symlinks a killed replacement left in ``directory``
    (its scratch name when the scratch dir was on another mount). Returns how many."""
    removed = 0
    try:
        with scope.parent(os.path.join(directory, SCRATCH_PREFIX)) as (fd, _):
            for entry in _entries(fd):
                if entry.name.startswith(SCRATCH_PREFIX) and not entry.is_dir(
                        follow_symlinks=False):
                    os.unlink(entry.name, dir_fd=fd)
                    removed += 1
            if removed:
                fsync_dir(fd)
    except (OSError, CrifsError):
        return removed
    return removed


def read_small(scope: Scope, path: str, limit: int = 1 << 16) -> bytes | None:
    """The bytes of regular file ``path`` (opened without following symlinks), or ``None``."""
    try:
        with scope.parent(path) as (parent_fd, name):
            return _read_at(parent_fd, name, limit)
    except (OSError, CrifsError):
        return None


def _read_at(dir_fd: int, name: str, limit: int = 1 << 26) -> bytes | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                     dir_fd=dir_fd)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _adopt_owner(parent_fd: int, name: str) -> None:
    pst = os.fstat(parent_fd)
    with contextlib.suppress(OSError):
        os.chown(name, pst.st_uid, pst.st_gid, dir_fd=parent_fd, follow_symlinks=False)


def _rename_into_place(parent_fd: int, name: str, scratch: str | None, make: MakeFn) -> None:
    """Create the new entry with ``make(dir_fd, tmp_name)`` in ``scratch`` (outside the
    runtime's directories) and rename it over ``name``; across mounts, in ``name``'s own
    directory under a ``.crifs-tmp-`` name instead."""
    tmp = f"{SCRATCH_PREFIX}{secrets.token_hex(6)}"
    if scratch is not None:
        scratch_fd = open_dir(scratch)
        try:
            make(scratch_fd, tmp)
            try:
                os.rename(tmp, name, src_dir_fd=scratch_fd, dst_dir_fd=parent_fd)
            except OSError as err:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=scratch_fd)
                if err.errno != errno.EXDEV:
                    raise
            else:
                fsync_dir(parent_fd)
                return
        finally:
            os.close(scratch_fd)
    make(parent_fd, tmp)
    try:
        os.rename(tmp, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=parent_fd)
        raise
    fsync_dir(parent_fd)
