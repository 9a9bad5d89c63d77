"""Hard-link findings, layer by layer.

Tar layers (members of kind ``HARDLINK``; image-spec ``layer.md``): a hard link names a member
it shares data with. Within one layer that is plain; otherwise:

- ``cross_layer`` (warning): the target is not in this layer but in a lower one. The spec
  leaves this undefined (opencontainers/image-spec#1204); Docker and BuildKit never write it
  (they duplicate the data, moby/moby#5632), and an unpacker that applies the layer into an
  empty directory (an overlay upper dir) cannot create it.
- ``whited_out`` (error): the target existed in a lower layer but was deleted before this
  layer (by a later layer's whiteout, opaque directory or replacement), or by this layer's own
  whiteout or opaque directory.
- ``dangling`` (error): the target is nowhere in the stack, is a directory, or the chain of
  link names loops.
- ``chained`` (info): the target is itself a hard-link member (buildah writes such chains,
  containers/buildah#6297); the chain is followed to its end, which is then judged as above.

Directory layers (entries carrying ``inode``): the paths sharing an inode form a group; when
the filesystem's link count differs from the paths seen, ``nlink_mismatch`` says so: ``info``
when more links exist than were seen (they live in another layer's directory, e.g. a
``cp -al`` clone or containers/storage's hard-link dedup, or outside any layer), ``warning``
when fewer (the tree changed during the walk).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import compress, repeat
from typing import Any

from crifs.fs.listing import Entry, EntryKind, LayerListing
from crifs.fs.merged import MergedView

CROSS_LAYER = "cross_layer"
WHITED_OUT = "whited_out"
DANGLING = "dangling"
CHAINED = "chained"
NLINK_MISMATCH = "nlink_mismatch"

_HARDLINK = EntryKind.HARDLINK
_DIR = EntryKind.DIR
_MAX_CHAIN = 64


@dataclass(frozen=True, slots=True)
class HardlinkFinding:
    """One hard-link problem. ``path`` and ``target`` are absolute rootfs paths (``target`` is
    ``b""`` for an inode group); ``layer`` is the index of the layer holding the link."""

    code: str
    severity: str
    path: bytes
    target: bytes
    layer: int
    message: str


def hardlink_groups(layer: LayerListing) -> list[list[bytes]]:
    """The hard-link groups of one layer, each a sorted list of relative paths.

    Tar members are grouped by the end of their link chain (the end first); directory entries
    by inode. Groups of one path are left out.
    """
    groups: dict[object, list[bytes]] = {}
    for path, entry in layer.entries.items():
        if entry.kind is _HARDLINK:
            end = _chain(layer.entries, path, entry)[-1]
            groups.setdefault(("tar", end), [end]).append(path)
        elif entry.inode is not None and entry.kind is not _DIR:
            groups.setdefault(entry.inode, []).append(path)
    found = [sorted(set(paths)) for paths in groups.values()]
    return sorted((paths for paths in found if len(paths) > 1), key=lambda paths: paths[0])


def hardlink_findings(layers: Sequence[LayerListing]) -> list[HardlinkFinding]:
    """Every hard-link finding of a stack given bottom first, layer by layer, by path."""
    stack = list(layers)
    below = _ViewsBelow(stack)
    findings: list[HardlinkFinding] = []
    for pos, layer in enumerate(stack):
        findings.extend(_tar_findings(pos, layer, below))
        findings.extend(_inode_findings(layer))
    return findings


class _ViewsBelow:
    """The merged view of the layers under a position, built when first asked for."""

    def __init__(self, layers: list[LayerListing]) -> None:
        self._layers = layers
        self._views: dict[int, MergedView] = {}

    def at(self, pos: int) -> MergedView:
        view = self._views.get(pos)
        if view is None:
            view = self._views[pos] = MergedView(self._layers[:pos])
        return view


def _chain(entries: dict[bytes, Entry], path: bytes, entry: Entry) -> list[bytes]:
    """``path`` and the names its link chain passes through in this layer, to the end."""
    names = [path]
    seen = {path}
    target = entry.target
    for _ in range(_MAX_CHAIN):
        names.append(target)
        found = entries.get(target)
        if found is None or found.kind is not _HARDLINK or target in seen:
            break
        seen.add(target)
        target = found.target
    return names


def _tar_findings(pos: int, layer: LayerListing, below: _ViewsBelow) -> list[HardlinkFinding]:
    entries = layer.entries
    index = layer.index
    findings: list[HardlinkFinding] = []
    for path in sorted(_paths_where(layer, "kind", operator.is_, _HARDLINK)):
        names = _chain(entries, path, entries[path])
        end = names[-1]
        link, shown_end = _show(b"/" + path), _show(b"/" + end)
        if len(names) > 2:
            via = " -> ".join(_show(b"/" + name) for name in names[1:])
            findings.append(
                HardlinkFinding(
                    CHAINED,
                    "info",
                    b"/" + path,
                    b"/" + end,
                    index,
                    f"hard link {link} points at another hard link ({via}); "
                    "the chain is followed to its end",
                )
            )
        found = entries.get(end)
        if found is not None:
            if found.kind is _HARDLINK:
                message = f"hard link {link}: the chain of link names loops at {shown_end}"
                findings.append(_finding(DANGLING, "error", path, end, index, message))
            elif found.kind is _DIR:
                message = f"hard link {link} points at the directory {shown_end}"
                findings.append(_finding(DANGLING, "error", path, end, index, message))
            continue
        findings.extend(_outside_layer(pos, layer, path, end, below))
    return findings


def _outside_layer(
    pos: int, layer: LayerListing, path: bytes, end: bytes, below: _ViewsBelow
) -> list[HardlinkFinding]:
    """Judge a hard link whose target is not a member of its own layer."""
    index = layer.index
    link, shown_end = _show(b"/" + path), _show(b"/" + end)
    view = below.at(pos) if pos else None
    lower = view.entry(end) if view is not None else None
    if view is not None and lower is not None and lower.kind is not _DIR:
        added = view.provider(end)
        if _deleted_by_own_markers(layer, end):
            message = (
                f"hard link {link} points at {shown_end} from layer {added}, "
                f"which this layer ({index}) deletes with a whiteout or opaque directory"
            )
            return [_finding(WHITED_OUT, "error", path, end, index, message)]
        message = (
            f"hard link {link} points at {shown_end} in lower layer {added}: cross-layer hard "
            "links are undefined (Docker and BuildKit copy the data instead)"
        )
        return [_finding(CROSS_LAYER, "warning", path, end, index, message)]
    gone = view.deletion(end) if view is not None else None
    if gone is not None:
        message = (
            f"hard link {link} points at {shown_end}, added by layer {gone.layer_added} and "
            f"deleted by layer {gone.layer_deleted} ({gone.how})"
        )
        return [_finding(WHITED_OUT, "error", path, end, index, message)]
    if lower is not None:
        message = f"hard link {link} points at the directory {shown_end}"
    else:
        message = f"hard link {link} points at {shown_end}, which no layer up to {index} has"
    return [_finding(DANGLING, "error", path, end, index, message)]


def _deleted_by_own_markers(layer: LayerListing, path: bytes) -> bool:
    if path in layer.whiteouts:
        return True
    parent = path
    while parent:
        parent = parent.rpartition(b"/")[0]
        if parent in layer.opaque or (parent and parent in layer.whiteouts):
            return True
    return False


def _inode_findings(layer: LayerListing) -> list[HardlinkFinding]:
    groups: dict[tuple[int, int], list[bytes]] = {}
    nlinks: dict[tuple[int, int], int] = {}
    entries = layer.entries
    for path in _paths_where(layer, "inode", operator.is_not, None):
        entry = entries[path]
        if entry.kind is _DIR or entry.inode is None:
            continue
        groups.setdefault(entry.inode, []).append(path)
        nlinks[entry.inode] = max(nlinks.get(entry.inode, 0), entry.nlink)
    findings: list[HardlinkFinding] = []
    for inode, paths in groups.items():
        nlink = nlinks[inode]
        seen = len(paths)
        if nlink == seen:
            continue
        paths.sort()
        first = b"/" + paths[0]
        names = ", ".join(_show(b"/" + p) for p in paths[:3]) + (", ..." if seen > 3 else "")
        if nlink > seen:
            severity = "info"
            why = (
                f"the other {nlink - seen} link(s) live outside this layer "
                "(another layer's directory, a cp -al clone, or hard-link dedup)"
            )
        else:
            severity = "warning"
            why = "fewer links than paths: the tree changed while it was read"
        message = f"inode shared by {seen} path(s) here ({names}) has {nlink} links: {why}"
        findings.append(HardlinkFinding(NLINK_MISMATCH, severity, first, b"", layer.index, message))
    findings.sort(key=lambda finding: finding.path)
    return findings


def _paths_where(
    layer: LayerListing, field: str, test: Callable[[Any, Any], bool], value: object
) -> Iterator[bytes]:
    """The paths whose entry's ``field`` passes ``test(field_value, value)``, filtered without
    a Python-level loop. Only the layer's ``notable`` entries can pass (plain files and
    directories carry no inode and are no hard links), so when the layer has them only those
    are looked at; else every entry (a million-entry layer takes a few hundredths of a
    second)."""
    entries = layer.entries if layer.notable is None else layer.notable
    values = map(operator.attrgetter(field), entries.values())
    return compress(entries.keys(), map(test, values, repeat(value)))


def _finding(
    code: str, severity: str, path: bytes, target: bytes, layer: int, message: str
) -> HardlinkFinding:
    return HardlinkFinding(code, severity, b"/" + path, b"/" + target, layer, message)


def _show(path: bytes) -> str:
    return path.decode("utf-8", "backslashreplace")
