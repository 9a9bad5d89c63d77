"""Suggested fixes for a broken symlink: another reading of its target that resolves.

Readings, tried in order, the first that resolves in the image wins:

1. an absolute target read relative to the link's directory (``/usr/lib/x`` → ``usr/lib/x``);
2. a relative target read as absolute from the rootfs root (``usr/lib/x`` → ``/usr/lib/x``);
3. the target's basename found exactly once elsewhere in the image, linked by a relative path
   from the link's directory (``../lib/x``); this one needs a pass over every path, so it runs
   once for all links that are still without a fix (``basename_fixes``);
4. a near miss: the one name in the directory where the target was looked for that is close
   to the missing name (``config.yml`` when ``config.yaml`` is there: a typo or a version
   bump; same first three bytes, length within three), again one pass for all links left
   (``near_name_fixes``). Bounded, so a million-entry
   tree with thousands of broken links stays fast: directories of at most
   :data:`NEAR_MAX_SIBLINGS` names, at most :data:`NEAR_MAX_LINKS` links.

A fix is printed as the ``ln -sf`` that would make it, shell-quoted; bytes that are not
printable UTF-8 are written in ``$'\\xNN'`` form, which bash, zsh, ksh and busybox sh read.
"""

from __future__ import annotations

import difflib
import operator
import shlex
from collections.abc import Collection, Iterable, Mapping
from itertools import compress, repeat

from crifs.fs.resolve import LinkResolver

_NOT_NAMES = (b"", b".", b"..")
NEAR_MAX_SIBLINGS = 256
NEAR_MAX_LINKS = 1000
NEAR_CUTOFF = 0.8  # difflib ratio: "config.yml" vs "config.yaml" is 0.95


def shell_quote(raw: bytes) -> str:
    """``raw`` as one shell word that gives back exactly these bytes."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and text.isprintable():
        return shlex.quote(text)
    out = []
    for byte in raw:
        if byte in (0x27, 0x5C):  # ' and \
            out.append("\\" + chr(byte))
        elif 0x20 <= byte < 0x7F:
            out.append(chr(byte))
        else:
            out.append(f"\\x{byte:02x}")  # always two digits: the next char is never eaten
    return "$'" + "".join(out) + "'"


def ln_command(new_target: bytes, link_path: bytes) -> str:
    """The ``ln -sf`` replacing the symlink at ``link_path`` (absolute) by one to ``new_target``."""
    dashes = "-- " if new_target.startswith(b"-") else ""
    return f"ln -sf {dashes}{shell_quote(new_target)} {shell_quote(link_path)}"


def relative_path(dest: bytes, start_dir: bytes) -> bytes:
    """A relative path from directory ``start_dir`` to ``dest``, both absolute and normalised."""
    dest_parts = [part for part in dest.split(b"/") if part]
    start_parts = [part for part in start_dir.split(b"/") if part]
    common = 0
    for mine, theirs in zip(dest_parts, start_parts, strict=False):
        if mine != theirs:
            break
        common += 1
    parts = [b".."] * (len(start_parts) - common) + dest_parts[common:]
    return b"/".join(parts) or b"."


def link_dir(link_path: bytes) -> bytes:
    """The absolute directory holding the symlink at absolute ``link_path``."""
    return link_path.rpartition(b"/")[0] or b"/"


def reading_fix(resolver: LinkResolver, link_path: bytes, target: bytes) -> bytes | None:
    """A new target from readings 1 and 2 (see the module doc) that resolves, else ``None``.

    ``link_path`` is absolute.
    """
    if target.startswith(b"/"):
        new_target = target.lstrip(b"/")
    elif target:
        new_target = b"/" + target
    else:
        return None
    if new_target and resolver.resolve_target(link_path[1:], new_target).ok:
        return new_target
    return None


def basename_fixes(
    resolver: LinkResolver,
    wanted: Mapping[int, tuple[bytes, bytes]],
    scan: PathScan | None = None,
) -> dict[int, bytes]:
    """Reading 3 for many links at once: ``{key: new_target}`` for those that have one.

    ``wanted`` maps a caller's key to ``(link_path, target)`` (absolute link path). One pass
    over the view's paths finds, for each wanted basename, whether it occurs exactly once;
    ``scan``, when given, is that pass already made (for at least these basenames).
    """
    by_name: dict[bytes, list[int]] = {}
    for key, (_, target) in wanted.items():
        name = target_basename(target)
        if name is not None:
            by_name.setdefault(name, []).append(key)
    if not by_name:
        return {}
    if scan is None or not scan.names.issuperset(by_name):
        scan = PathScan(resolver.view.paths(), names=by_name)
    fixes: dict[int, bytes] = {}
    for name, keys in by_name.items():
        places = scan.places.get(name)
        if places is None or len(places) != 1:
            continue
        place = b"/" + places[0]
        for key in keys:
            link_path = wanted[key][0]
            if place == link_path:
                continue
            new_target = relative_path(place, link_dir(link_path))
            if resolver.resolve_target(link_path[1:], new_target).ok:
                fixes[key] = new_target
    return fixes


def target_basename(target: bytes) -> bytes | None:
    """The name reading 3 looks for, or ``None`` when the target names none."""
    name = target.rstrip(b"/").rpartition(b"/")[2]
    return None if name in _NOT_NAMES else name


def near_directory(looked_for: bytes) -> bytes | None:
    """The directory (a key) reading 4 looks in, or ``None`` when the missing name is none."""
    parent, _, name = looked_for.rpartition(b"/")
    return None if name in _NOT_NAMES else parent.lstrip(b"/")


class PathScan:
    """A pass over every visible path (a million in a big rootfs: a few tenths of a second,
    so readings 3 and 4 share it): where each of ``names`` occurs as a basename (up to two
    places, as keys) and the names in each of ``dirs`` (up to ``NEAR_MAX_SIBLINGS + 1``:
    more means too many to choose from).

    Each kind is one C-level stream over the paths (``rpartition`` per path, filtered with
    ``compress``): a stream frees each split at once, which measured faster than splitting
    once into lists kept for both kinds (and ``rpartition`` faster than ``rsplit``). Only
    the paths that match are looked at in Python."""

    def __init__(
        self,
        paths: Iterable[bytes],
        *,
        names: Collection[bytes] = (),
        dirs: Collection[bytes] = (),
    ) -> None:
        self.places: dict[bytes, list[bytes]] = {}
        self.children: dict[bytes, list[bytes]] = {directory: [] for directory in dirs}
        self.names = frozenset(names)
        wanted_dirs = frozenset(dirs)
        if not self.names and not wanted_dirs:
            return
        # iterated once per kind; a dict's keys can be, without a million-entry copy
        every = paths if isinstance(paths, Collection) else list(paths)
        slash = repeat(b"/")
        if self.names:
            basenames = map(operator.itemgetter(2), map(bytes.rpartition, every, slash))
            for path in compress(every, map(self.names.__contains__, basenames)):
                places = self.places.setdefault(path.rpartition(b"/")[2], [])
                if len(places) < 2:
                    places.append(path)
        if wanted_dirs:
            parents = map(operator.itemgetter(0), map(bytes.rpartition, every, slash))
            for path in compress(every, map(wanted_dirs.__contains__, parents)):
                directory, _, name = path.rpartition(b"/")
                self._add_child(directory, name)

    def _add_child(self, directory: bytes, name: bytes) -> None:
        names = self.children[directory]
        if len(names) <= NEAR_MAX_SIBLINGS:
            names.append(name)


def near_name_fixes(
    resolver: LinkResolver,
    wanted: Mapping[int, tuple[bytes, bytes, bytes]],
    scan: PathScan | None = None,
) -> dict[int, bytes]:
    """Reading 4 (see the module doc): ``{key: new_target}`` for the links that have one.

    ``wanted`` maps a caller's key to ``(link_path, target, looked_for)``, all absolute but the
    target; ``looked_for`` is the path the target named, whose last component is missing. The
    new target keeps the link's style: relative when the old one was. Only the first
    ``NEAR_MAX_LINKS`` are looked at. ``scan``, when given, is the pass over every path
    already made (for at least the directories of these links).
    """
    by_dir: dict[bytes, list[int]] = {}
    for key, (_, _, looked_for) in list(wanted.items())[:NEAR_MAX_LINKS]:
        directory = near_directory(looked_for)
        if directory is not None:
            by_dir.setdefault(directory, []).append(key)
    if not by_dir:
        return {}
    if scan is None or not all(directory in scan.children for directory in by_dir):
        scan = PathScan(resolver.view.paths(), dirs=by_dir)
    fixes: dict[int, bytes] = {}
    for directory, keys in by_dir.items():
        names = scan.children[directory]
        if not names or len(names) > NEAR_MAX_SIBLINGS:
            continue
        for key in keys:
            link_path, target, looked_for = wanted[key]
            missing = looked_for.rpartition(b"/")[2]
            # A cheap pre-filter (same first bytes, similar length) keeps difflib to a few
            # candidates: comparing every sibling costs ~20 us a pair.
            head = missing[:3]
            likely = [n for n in names if n[:3] == head and abs(len(n) - len(missing)) <= 3]
            close = difflib.get_close_matches(missing, likely, n=2, cutoff=NEAR_CUTOFF)
            if len(close) != 1 and not (len(close) == 2 and _clearly_closer(missing, close)):
                continue
            place = b"/" + (directory + b"/" if directory else b"") + close[0]
            if place == link_path:
                continue
            new_target = (
                place if target.startswith(b"/") else relative_path(place, link_dir(link_path))
            )
            if resolver.resolve_target(link_path[1:], new_target).ok:
                fixes[key] = new_target
    return fixes


def _clearly_closer(name: bytes, close: list[bytes]) -> bool:
    """Of two candidates, the first is a clear winner (not a coin toss between siblings)."""
    first, second = (difflib.SequenceMatcher(None, name, c).ratio() for c in close)
    return first - second >= 0.05

