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
    resolver: LinkResolver, wanted: Mapping[int, tuple[bytes, bytes]]
) -> dict[int, bytes]:
    """Reading 3 for many links at once: ``{key: new_target}`` for those that have one.

    ``wanted`` maps a caller's key to ``(link_path, target)`` (absolute link path). One pass
    over the view's paths finds, for each wanted basename, whether it occurs exactly once.
    """
    by_name: dict[bytes, list[int]] = {}
    for key, (_, target) in wanted.items():
        name = target.rstrip(b"/").rpartition(b"/")[2]
        if name not in _NOT_NAMES:
            by_name.setdefault(name, []).append(key)
    if not by_name:
        return {}
    found = _find_names(resolver.view.paths(), by_name)
    fixes: dict[int, bytes] = {}
    for name, places in found.items():
        if len(places) != 1:
            continue
        place = b"/" + places[0]
        for key in by_name[name]:
            link_path = wanted[key][0]
            if place == link_path:
                continue
            new_target = relative_path(place, link_dir(link_path))
            if resolver.resolve_target(link_path[1:], new_target).ok:
                fixes[key] = new_target
    return fixes


def _find_names(
    all_paths: Iterable[bytes], names: Mapping[bytes, object]
) -> dict[bytes, list[bytes]]:
    """Where each of ``names`` occurs as a basename; stops counting a name at two places."""
    found: dict[bytes, list[bytes]] = {}
    # iterated twice below; a dict's keys can be, without a million-entry copy
    paths = all_paths if isinstance(all_paths, Collection) else list(all_paths)
    last = operator.itemgetter(2)
    basenames = map(last, map(bytes.rpartition, paths, repeat(b"/")))
    for path in compress(paths, map(names.__contains__, basenames)):  # C-level filter
        places = found.setdefault(path.rpartition(b"/")[2], [])
        if len(places) < 2:
            places.append(path)
    return found


def near_name_fixes(
    resolver: LinkResolver, wanted: Mapping[int, tuple[bytes, bytes, bytes]]
) -> dict[int, bytes]:
    """Reading 4 (see the module doc): ``{key: new_target}`` for the links that have one.

    ``wanted`` maps a caller's key to ``(link_path, target, looked_for)``, all absolute but the
    target; ``looked_for`` is the path the target named, whose last component is missing. The
    new target keeps the link's style: relative when the old one was.
    """
    by_dir: dict[bytes, list[int]] = {}
    for key, (_, _, looked_for) in list(wanted.items())[:NEAR_MAX_LINKS]:
        parent, _, name = looked_for.rpartition(b"/")
        if name not in _NOT_NAMES:
            by_dir.setdefault(parent.lstrip(b"/"), []).append(key)
    if not by_dir:
        return {}
    siblings: dict[bytes, list[bytes]] = {d: [] for d in by_dir}
    first = operator.itemgetter(0)
    paths = resolver.view.paths()
    paths = paths if isinstance(paths, Collection) else list(paths)
    parents = map(first, map(bytes.rpartition, paths, repeat(b"/")))
    for path in compress(paths, map(siblings.__contains__, parents)):  # C-level filter
        parent, _, name = path.rpartition(b"/")
        names = siblings[parent]
        if len(names) <= NEAR_MAX_SIBLINGS:
            names.append(name)
    fixes: dict[int, bytes] = {}
    for directory, keys in by_dir.items():
        names = siblings[directory]
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

