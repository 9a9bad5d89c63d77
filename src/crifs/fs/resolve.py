"""Path resolution inside a rootfs, in memory, as the kernel does it in a chroot.

The rules are those of ``openat2(RESOLVE_IN_ROOT)`` and filepath-securejoin, with Linux's
limits (path_resolution(7)):

- components are looked up one at a time from the root; intermediate symlinks are followed;
- an absolute symlink target restarts at the rootfs root, never the host's;
- ``..`` goes to the physical parent of the directory reached, and clamps at the root;
- at most ``MAX_HOPS`` (40) symlinks are followed per resolution: the 41st gives ``ELOOP``;
- a non-directory followed by more components (``file/x``, ``file/..``) gives ``ENOTDIR``, and
  so does a trailing ``/`` (or ``/.``) on a non-directory; a trailing ``/`` also makes a final
  symlink be followed even when ``follow_final`` is false;
- an empty symlink target gives ``ENOENT``.

Nothing is opened, stat'ed or read on the host: the only input is a ``MergedView``. A tar hard
link resolves as the entry it shares its inode with (a hard link to a symlink is a symlink).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from crifs.fs.listing import Entry, EntryKind
from crifs.fs.merged import MergedView, fast_constructor

MAX_HOPS = 40

ENOENT = "ENOENT"
ELOOP = "ELOOP"
ENOTDIR = "ENOTDIR"

_DIR = EntryKind.DIR
_SYMLINK = EntryKind.SYMLINK
_HARDLINK = EntryKind.HARDLINK
_MUST_BE_DIR = b"."  # kept on the component stack for a trailing "/" or "/."
_SLASH = 0x2F


@dataclass(frozen=True, slots=True)
class Resolution:
    """Where a resolution ended.

    ``errno``: ``None`` when the path resolves, else ``"ENOENT"``, ``"ELOOP"`` or ``"ENOTDIR"``.
    ``resolved``: the absolute rootfs path reached (``b"/"`` for the root); on failure, the
    failing component joined lexically with what was still to be walked (the path the kernel
    was looking for), for ``ELOOP`` the symlink it gave up at.
    ``missing``: for ``ENOENT``/``ENOTDIR``, the absolute path of the component that is missing
    or is not a directory (for an empty symlink target, the symlink itself).
    ``hops``: symlinks followed (for ``ELOOP``, counting the one refused).
    ``trail``: with ``trace=True``, every existing path looked up, absolute, in order.
    """

    errno: str | None
    resolved: bytes
    missing: bytes | None
    hops: int
    trail: tuple[bytes, ...] = ()

    @property
    def ok(self) -> bool:
        return self.errno is None


_resolution: Callable[[str | None, bytes, bytes | None, int, tuple[bytes, ...]], Resolution]
_resolution = fast_constructor(Resolution)


def resolve(
    view: MergedView,
    path: bytes,
    *,
    follow_final: bool = True,
    max_hops: int = MAX_HOPS,
    trace: bool = False,
) -> Resolution:
    """Resolve ``path`` (absolute in the rootfs; a relative one starts at the root too).

    ``follow_final=False`` stops at a final symlink instead of following it (``lstat``).
    """
    trail: list[bytes] | None = [] if trace else None
    return _walk(view, b"", _components(path), 0, follow_final, max_hops, trail)


def reached_paths(view: MergedView, path: bytes, *, max_hops: int = MAX_HOPS) -> list[bytes]:
    """For each symlink followed while resolving ``path``, the absolute path that hop aimed
    at: its target joined with the rest of the path, read lexically (``/lib/x`` through
    ``/lib -> usr/lib`` gives ``/usr/lib/x``). Explains a failure: the path a hop reached may
    be one a later layer deleted."""
    reached: list[bytes] = []
    _walk(view, b"", _components(path), 0, True, max_hops, None, reached)
    return reached


def resolve_link(view: MergedView, path: bytes, *, max_hops: int = MAX_HOPS) -> Resolution:
    """What ``stat`` of the visible symlink at relative ``path`` reaches: the same answer as
    ``resolve(view, b"/" + path)``. To resolve many links of one view, use ``LinkResolver``."""
    return LinkResolver(view, max_hops=max_hops).resolve(path)


class LinkResolver:
    """Resolves the visible symlinks of one view, as ``resolve(view, b"/" + path)`` would.

    Faster when the view guarantees that every visible path's ancestors are directories
    (``view.consistent``): then a link whose target is plain names after optional leading
    ``../`` (the link's own directory is a real directory, so those are exact) reaches the
    lexical path whenever that path is visible, since a visible path's ancestors are all
    directories. That is one lookup per hop instead of one per component. A lexical path that
    is not visible is settled by its deepest visible ancestor: a directory means ``ENOENT`` at
    the next name, another non-symlink ``ENOTDIR``, and a symlink is followed in place (the
    rest of the path appended to its lexical target). Anything else (``./``, a trailing ``/``,
    a tar hard link, a loop through a symlink used as a directory) takes the
    component-by-component walk.
    """

    def __init__(self, view: MergedView, *, max_hops: int = MAX_HOPS) -> None:
        self.view = view
        self.max_hops = max_hops
        self._quick = view.consistent
        self._get = view.entry_getter()

    def resolve(
        self, path: bytes, chain: list[bytes] | None = None, entry: Entry | None = None
    ) -> Resolution:
        """As ``resolve(view, b"/" + path)``. When the quick route answered, ``chain`` (if
        given) holds the symlinks it followed (see ``follow_simple``); else it is emptied.
        ``entry``, when given, must be the visible entry at ``path`` (saves a lookup)."""
        quick = self._follow(path, 0, chain, entry) if self._quick else None
        if quick is not None:
            return quick
        if chain:
            chain.clear()
        return _walk(self.view, b"", _components(path), 0, True, self.max_hops, None)

    def direct(self, path: bytes, target: bytes) -> bytes | None:
        """The absolute path reached when the symlink at ``path`` whose target is ``target``
        (its own, visible entry) names, on the quick route, a visible entry that is neither
        a symlink nor a tar hard link: the common case, answered without a ``Resolution``
        (it would be ``ok`` after one hop). ``None``: ask ``resolve``."""
        if not self._quick:
            return None
        key = _lexical(path.rpartition(b"/")[0], target)
        if key is None:
            return None
        found = self._get(key)
        if found is None or found.kind is _SYMLINK or found.kind is _HARDLINK:
            return None
        return b"/" + key

    def follow_simple(self, path: bytes, chain: list[bytes] | None = None) -> Resolution | None:
        """The quick route's answer, or ``None`` when it does not apply. Each symlink followed
        is appended to ``chain`` when given (a cycle's first link appears twice).

        While only final symlinks are followed, the next link is a function of the current
        one, so a link met twice means a cycle: the answer is ``ELOOP`` without walking the 40
        hops, and the link the kernel would give up at is found by counting around the cycle.
        """
        if not self._quick:
            return None
        return self._follow(path, 0, chain)

    def quick_route(
        self, path: bytes, chain: list[bytes], reached: list[bytes]
    ) -> Resolution | None:
        """The quick route's answer for the link at ``path`` (as ``follow_simple``), or
        ``None``. ``reached`` gets the relative key each hop aimed at: the target joined with
        the rest of the path, read lexically (``reached_paths`` without the leading ``/``)."""
        if not self._quick:
            return None
        return self._follow(path, 0, chain, None, reached)

    def _follow(
        self,
        key: bytes,
        hops: int,
        chain: list[bytes] | None,
        entry: Entry | None = None,
        reached: list[bytes] | None = None,
    ) -> Resolution | None:
        """The quick route from relative ``key`` (whose visible entry is ``entry`` when
        given) with ``hops`` already counted; an ``ELOOP`` answer only when ``hops`` starts at
        0 and every link was final (else ``None``)."""
        get = self._get
        lookup = self.view.entry
        max_hops = self.max_hops
        followed = chain if chain is not None else []
        start = len(followed)
        seen: dict[bytes, int] | None = None
        cycles = hops == 0  # the cycle shortcut's counting assumes the chain starts here
        if entry is None:
            entry = get(key)
        while True:
            if entry is None:
                entry = lookup(key)  # an implicit directory
            if entry is None:
                # Not visible: its deepest visible ancestor decides (all of that one's
                # ancestors are directories, so the kernel gets there without a hop).
                parent = key
                while True:
                    parent = parent.rpartition(b"/")[0]
                    above = get(parent)
                    if above is None:
                        above = lookup(parent)  # an implicit directory, the root, or missing
                        if above is None:
                            continue
                    break
                kind = above.kind
                if kind is _DIR or not parent:  # the root is a directory whatever is listed
                    offset = len(parent) + 1 if parent else 0
                    end = key.find(b"/", offset)
                    missing = key if end < 0 else key[:end]
                    return _resolution(ENOENT, b"/" + key, b"/" + missing, hops, ())
                if kind is _HARDLINK:
                    return None
                if kind is not _SYMLINK:
                    return _resolution(ENOTDIR, b"/" + key, b"/" + parent, hops, ())
                # a symlink used as a directory: followed, then the rest of the path
                hops += 1
                if hops > max_hops:
                    return None  # the walk names the loop
                cycles = False
                seen = None
                followed.append(parent)
                following = _lexical(parent.rpartition(b"/")[0], above.target)
                if following is None:
                    return None
                key = following + key[len(parent) :]
                if reached is not None:
                    reached.append(key)
                entry = get(key)
                continue
            kind = entry.kind
            if kind is not _SYMLINK:
                if kind is _HARDLINK:
                    return None
                return _resolution(None, b"/" + key, None, hops, ())
            hops += 1
            if hops > max_hops:
                if not cycles:
                    return None
                return _resolution(ELOOP, b"/" + key, None, hops, ())
            if cycles:
                if hops == 2:
                    seen = {followed[start]: 0}
                if seen is not None:
                    first = seen.get(key)
                    if first is not None:
                        period = hops - 1 - first
                        give_up = followed[start + first + (max_hops - first) % period]
                        followed.append(key)
                        return _resolution(ELOOP, b"/" + give_up, None, max_hops + 1, ())
                    seen[key] = hops - 1
            followed.append(key)
            following = _lexical(key.rpartition(b"/")[0], entry.target)
            if following is None:
                return None
            key = following
            if reached is not None:
                reached.append(key)
            entry = get(key)

    def resolve_target(self, path: bytes, target: bytes) -> Resolution:
        """What a symlink at relative ``path`` would reach if its target were ``target``
        (the link counts as one hop; ``path``'s directory should be a visible directory)."""
        if not target:
            return _resolution(ENOENT, b"/" + path, b"/" + path, 1, ())
        directory = path.rpartition(b"/")[0]
        if self._quick:
            key = _lexical(directory, target)
            if key is not None:
                quick = self._follow(key, 1, None)
                if quick is not None:
                    return quick
        start = target if target.startswith(b"/") else directory + b"/" + target
        return _walk(self.view, b"", _components(start), 1, True, self.max_hops, None)


_NOT_PLAIN = re.compile(rb"(?:^|/)\.\.?(?:/|$)|//|/$|^$|^/")
_UP = b"../"


def _lexical(directory: bytes, target: bytes) -> bytes | None:
    """The key a plain target names from ``directory``, or ``None`` if it is not plain."""
    if target[:1] == b"/":
        directory = b""
        target = target.lstrip(b"/")
    if target[:3] == _UP:
        # "../../x": strip all leading "../" at once and climb as many directories
        rest = target.lstrip(b"./")
        ups = (len(target) - len(rest)) // 3
        if target[: ups * 3] != _UP * ups:
            ups = 0
            while target[:3] == _UP:
                ups += 1
                target = target[3:]
        else:
            target = target[ups * 3 :]
        parts = directory.rsplit(b"/", ups)
        directory = parts[0] if len(parts) > ups else b""
    # most targets hold no "." at a name's start and no doubled or trailing "/": two C-level
    # scans; the rest get the exact check
    if (
        b"/." in target
        or target[:1] in b"./"
        or b"//" in target
        or target[-1:] == b"/"
        or not target
    ) and _NOT_PLAIN.search(target) is not None:
        return None
    return directory + b"/" + target if directory else target


def _walk(
    view: MergedView,
    current: bytes,
    stack: list[bytes],
    hops: int,
    follow_final: bool,
    max_hops: int,
    trail: list[bytes] | None,
    reached: list[bytes] | None = None,
) -> Resolution:
    """Walk the component ``stack`` from directory ``current`` (a relative key).

    ``reached``, when given, gets for each symlink followed the absolute path that hop aims
    at: the target joined with what was still to walk, read lexically."""
    fast_get = view.entry_getter()  # plain dict lookups; ``view.entry`` for the misses
    lookup = view.entry
    pop = stack.pop
    while stack:
        name = pop()
        if name == _MUST_BE_DIR:
            continue  # ``current`` is always a directory once walked into
        if name == b"..":
            current = current.rpartition(b"/")[0]
            continue
        key = current + b"/" + name if current else name
        entry = fast_get(key)
        if entry is None:
            entry = lookup(key)  # an implicit directory, or missing
            if entry is None:
                return _failed(ENOENT, key, stack, hops, trail)
        if trail is not None:
            trail.append(b"/" + key)
        kind = entry.kind
        if kind is _DIR:
            current = key
            continue
        if kind is _HARDLINK:
            source = view.hardlink_source(key, entry)
            if source is not None:
                entry = source
                kind = source.kind
                if kind is _DIR:
                    current = key
                    continue
        if kind is _SYMLINK and (stack or follow_final):
            hops += 1
            if hops > max_hops:
                return _resolution(ELOOP, b"/" + key, None, hops, tuple(trail or ()))
            target = entry.target
            if not target:
                return _resolution(ENOENT, b"/" + key, b"/" + key, hops, tuple(trail or ()))
            if target[0] == _SLASH:
                current = b""
            stack.extend(_components(target))
            if reached is not None:
                reached.append(b"/" + _joined(current, stack))
            continue
        if stack:
            return _failed(ENOTDIR, key, stack, hops, trail)
        current = key
    return _resolution(None, b"/" + current, None, hops, tuple(trail or ()))


def _components(path: bytes) -> list[bytes]:
    """The components of ``path`` as a stack (last component first to pop: reversed order).

    Empty and ``.`` components are dropped, except that a trailing ``/`` or ``/.`` leaves a
    must-be-a-directory marker.
    """
    names = path.lstrip(b"/").split(b"/")
    if b"" in names or b"." in names:
        last = names[-1]
        names = [name for name in names if name and name != b"."]
        if names and last in (b"", b"."):
            names.append(_MUST_BE_DIR)
    names.reverse()
    return names


def _failed(
    errno: str, key: bytes, stack: list[bytes], hops: int, trail: list[bytes] | None
) -> Resolution:
    """A failure at ``key``; ``resolved`` is ``key`` plus the rest of the walk, read lexically."""
    resolved = b"/" + _joined(key, stack)
    return _resolution(errno, resolved, b"/" + key, hops, tuple(trail or ()))


def _joined(key: bytes, stack: list[bytes]) -> bytes:
    """``key`` followed by the components still on ``stack``, ``..`` applied lexically."""
    parts = key.split(b"/") if key else []
    for name in reversed(stack):
        if name == b"..":
            if parts:
                parts.pop()
        elif name != _MUST_BE_DIR:
            parts.append(name)
    return b"/".join(parts)
