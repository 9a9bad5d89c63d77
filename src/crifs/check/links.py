"""The link audit: a verdict for every visible symlink, and the hard-link findings.

Each symlink is resolved from the rootfs root as the kernel would inside the container
(``crifs.fs.resolve``), then judged:

- ``ok``: it resolves.
- ``runtime_provided`` (info): it fails at a path under ``/proc``, ``/sys``, ``/dev`` or
  ``/run``, or at a file a runtime creates (``/etc/resolv.conf``, ``/etc/hosts``, ...): it works
  once the container runs (``/etc/mtab -> ../proc/self/mounts``).
- ``hidden_by_whiteout`` / ``hidden_by_opaque``: the missing component existed in a layer and
  a later one deleted it; failing that, the first missing component of a path a hop aimed at
  (a target joined with the rest of the path, read literally) did.
- ``loop``: ``ELOOP``, a cycle or a chain longer than 40 links.
- ``not_a_directory``: ``ENOTDIR``, a non-directory in the middle or before a trailing ``/``.
- ``host_only``: an absolute target missing in the image that exists on this host under
  ``host_root`` ("works on the build machine"); only ``os.lstat`` of that host path is done.
- ``broken``: any other missing target.

Severity (``SEVERITY``): ``ok`` has none; ``runtime_provided`` is ``info``; every other verdict
is ``error``, ``host_only`` included, since inside the container it is just as broken.

``layer_added`` is the layer providing the link; ``layer_broken`` the layer whose whiteout,
opaque directory or replacement removed what the link needs, else the highest layer after the
link's own that changed a path the resolution went through (a symlink re-pointed, a directory
replaced), else the link's own layer: the link never resolved. ``None`` for ``ok`` and
``runtime_provided``. ``fix`` is an ``ln -sf`` command (``crifs.check.fixes``) or ``None``.

Paths in verdicts are absolute rootfs paths (``b"/usr/bin/python"``); messages show bytes that
are not UTF-8 as ``\\xNN``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from crifs.check import fixes
from crifs.check.fixes import (
    PathScan,
    basename_fixes,
    ln_command,
    near_name_fixes,
    reading_fix,
    target_basename,
)
from crifs.check.hardlinks import HardlinkFinding, hardlink_findings
from crifs.check.verdicts import (
    RUNTIME_PATHS,
    SEVERITY,
    LinkVerdict,
    Verdict,
    export_runs,
    import_runs,
    make_verdict,
    near_candidates,
    run_bounds,
)
from crifs.fs.forked import ForkedJob, TaskNumbers
from crifs.fs.gcpause import gc_paused
from crifs.fs.listing import EntryKind, LayerListing
from crifs.fs.merged import OPAQUE, WHITEOUT, Deletion, MergedView, Node
from crifs.fs.resolve import (
    ELOOP,
    ENOENT,
    ENOTDIR,
    MAX_HOPS,
    LinkResolver,
    Resolution,
    reached_paths,
    resolve,
)

__all__ = [
    "RUNTIME_PATHS",
    "SEVERITY",
    "HardlinkFinding",
    "LinkAudit",
    "LinkVerdict",
    "Verdict",
    "audit",
    "judge_links",
]


_SYMLINK = EntryKind.SYMLINK
_DIR = EntryKind.DIR
# verdicts a fix is looked for: errors, but not loops (another reading of a loop rarely helps)
_FIXABLE = frozenset(v for v in Verdict if SEVERITY[v] == "error" and v is not Verdict.LOOP)
_PROGRESS_EVERY = 4096
# Judging with a forked helper (see judge_links) is off (0). Measured on a 2-vCPU VM: a
# 100k-member layer tar (14k links) judged in 0.34 s instead of 0.24 s (the fork, the
# helper's copy-on-write faults and its answer cost more than half the work); the 1M-entry
# benchmark tree (100k links) in ~0.6 s less, but the helper's own pages made the two
# processes hold ~400 MB in all instead of ~250 MB, over the 300 MB budget. To turn it on:
# at least this many links ...
PARALLEL_LINKS = 0
# ... and at most this many paths (the helper's own pages grow with the listing).
PARALLEL_MAX_PATHS = 400_000
_RUNS = 16  # runs of links the two processes take in turn: the last one is a small part
_NOT_VISIBLE = -2  # a path no lookup finds (see _Judge._change_at)


@dataclass
class LinkAudit:
    """What ``audit`` found for one stack of layers (given bottom first)."""

    layers: list[LayerListing]
    verdicts: list[LinkVerdict]
    hardlinks: list[HardlinkFinding]
    # ``ok`` links counted but not kept in ``verdicts`` (``audit(keep_ok=False)``)
    ok_left_out: int = 0

    @property
    def symlinks(self) -> int:
        """Every visible symlink audited, ``ok`` ones left out of ``verdicts`` included."""
        return len(self.verdicts) + self.ok_left_out

    def summary(self) -> dict[str, int]:
        """The number of symlinks per verdict, every verdict listed."""
        counts = {verdict.value: 0 for verdict in Verdict}
        for item in self.verdicts:
            counts[item.verdict.value] += 1
        counts[Verdict.OK.value] += self.ok_left_out
        return counts


def audit(
    layers: Sequence[LayerListing],
    *,
    host_root: str | None = "/",
    runtime_paths: Iterable[bytes] = RUNTIME_PATHS,
    progress: Callable[[int, int], None] | None = None,
    view: MergedView | None = None,
    keep_ok: bool = True,
) -> LinkAudit:
    """Audit every visible symlink and every hard link of ``layers`` (bottom first).

    ``host_root=None`` turns the host check off. ``progress(done, total)`` is called every few
    thousand symlinks. ``view`` may pass a ``MergedView`` already built from ``layers``.
    ``keep_ok=False`` leaves the ``ok`` verdicts out (only counted, in ``ok_left_out``):
    most links of an image resolve, and a report that does not show them need not build them.
    """
    stack = list(layers)
    with gc_paused():
        merged = view if view is not None else MergedView(stack)
        verdicts, judged = _judge_links(merged, host_root, runtime_paths, progress, keep_ok)
        ok_left_out = judged - len(verdicts)
        return LinkAudit(stack, verdicts, hardlink_findings(stack), ok_left_out)


def judge_links(
    view: MergedView,
    *,
    host_root: str | None = "/",
    runtime_paths: Iterable[bytes] = RUNTIME_PATHS,
    progress: Callable[[int, int], None] | None = None,
    keep_ok: bool = True,
) -> list[LinkVerdict]:
    """A verdict for every visible symlink of ``view``, sorted by path (``keep_ok=False``:
    every one but the ``ok`` verdicts).

    With :data:`PARALLEL_LINKS` links or more, a forked helper (``crifs.fs.forked``) shares
    the resolving: the sorted links are cut into :data:`_RUNS` runs, each process judges the
    next run when it is free, and the helper sends its runs back at the end (every verdict
    depends only on the view and its own link). The fixes of readings 3 and 4 need passes
    over every path; they are made here only, once for all links: the pass for basenames
    while the helper starts judging (for every target's basename), the one for near names
    at the end. If the helper fails, its runs are judged here.

    Memory: the helper shares this process's pages until either process writes one, and in
    CPython even reading an object writes its reference count (a dict lookup with an equal
    key object increments the stored key's): judging half the links of a million-entry tree
    made the helper ~150 MB of its own pages. So the helper is used only for views of at
    most :data:`PARALLEL_MAX_PATHS` paths, and is off by default (see there)."""
    return _judge_links(view, host_root, runtime_paths, progress, keep_ok)[0]


def _judge_links(
    view: MergedView,
    host_root: str | None,
    runtime_paths: Iterable[bytes],
    progress: Callable[[int, int], None] | None,
    keep_ok: bool,
) -> tuple[list[LinkVerdict], int]:
    """``judge_links``, and how many links were judged (``ok`` ones left out included)."""
    judge = _Judge(view, host_root, runtime_paths, keep_ok)
    parallel = (
        PARALLEL_LINKS
        and view.link_count() >= PARALLEL_LINKS
        and len(view) <= PARALLEL_MAX_PATHS
    )
    runs = _RUNS if parallel else 1
    numbers = TaskNumbers(runs) if parallel else None
    order = numbers.next if numbers is not None else iter([0, None]).__next__
    helper: ForkedJob | None = None
    names: PathScan | None = None
    try:
        if numbers is not None:

            def helper_job(_send: Callable[[bytes], None]) -> bytes:
                # each process lists the links itself (the same sorted list), in parallel
                links = list(view.symlink_nodes())
                return export_runs(judge.judge_runs(links, run_bounds(len(links), runs), order))

            helper = ForkedJob.start(helper_job)
        links = list(view.symlink_nodes())
        total = len(links)
        bounds = run_bounds(total, runs)
        if helper is not None:  # every basename a fix may look for: the targets' own
            wanted = {target_basename(node.entry.target) for _, node, _ in links}
            wanted.discard(None)
            names = PathScan(view.paths(), names=wanted)  # type: ignore[arg-type]
        parts = judge.judge_runs(links, bounds, order, progress, total)
    except BaseException:
        if helper is not None:
            helper.kill()
        raise
    finally:
        if numbers is not None:
            numbers.close()
    if helper is not None:
        delivered = helper.finish()
        theirs = import_runs(delivered[-1]) if delivered else None
        parts.update(theirs or {})
        missing = iter([number for number in range(runs) if number not in parts])
        parts.update(judge.judge_runs(links, bounds, lambda: next(missing, None)))
    if progress is not None:
        progress(total, total)
    verdicts = [verdict for number in range(runs) for verdict in parts[number]]
    if not keep_ok:  # the slow route may still have answered ok
        verdicts = [verdict for verdict in verdicts if verdict.verdict is not Verdict.OK]
    judge.add_fixes(verdicts, names)
    return verdicts, total


class _Judge:
    def __init__(
        self,
        view: MergedView,
        host_root: str | None,
        runtime_paths: Iterable[bytes],
        keep_ok: bool = True,
    ) -> None:
        self.view = view
        self.keep_ok = keep_ok
        self.resolver = LinkResolver(view)
        self.single = len(view.layers) <= 1
        self.host_root = os.fsencode(host_root) if host_root is not None else None
        runtime = tuple(runtime_paths)
        self.runtime_exact = frozenset(runtime)
        self.runtime_prefixes = tuple(path.rstrip(b"/") + b"/" for path in runtime)
        self._change_of: dict[bytes, int] = {}  # see _change_at

    def judge_runs(
        self,
        links: Sequence[tuple[bytes, Node, bool]],
        bounds: Sequence[tuple[int, int]],
        order: Callable[[], int | None],
        progress: Callable[[int, int], None] | None = None,
        total: int = 0,
    ) -> dict[int, list[LinkVerdict]]:
        """The verdicts (with the reading fixes) on the runs ``links[start:end]`` of
        ``bounds[i]``, for each ``i`` that ``order`` hands out until it gives ``None``.
        ``progress(done, total)`` is told how far this process is, ``done`` counted as if it
        judged all ``total`` links at its pace."""
        runs: dict[int, list[LinkVerdict]] = {}
        done = 0
        while (number := order()) is not None:
            start, end = bounds[number]
            runs[number] = self._verdicts(links[start:end], progress, done, total)
            done += end - start
        return runs

    def add_fixes(self, verdicts: list[LinkVerdict], names: PathScan | None = None) -> None:
        """Readings 3 and 4 (``crifs.check.fixes``) for the verdicts still without a fix,
        in place: the basename found once elsewhere, then a near name for the first
        ``NEAR_MAX_LINKS`` links left (a pass over every path each; ``names`` is the one for
        basenames made already, used when it covers them)."""
        wanted = {
            number: (item.path, item.target)
            for number, item in enumerate(verdicts)
            if item.fix is None and item.verdict in _FIXABLE
        }
        for number, new_target in basename_fixes(self.resolver, wanted, names).items():
            item = verdicts[number]
            verdicts[number] = dataclasses.replace(item, fix=ln_command(new_target, item.path))
        near = {
            number: (verdicts[number].path, verdicts[number].target, verdicts[number].resolved)
            for number in near_candidates(verdicts)[: fixes.NEAR_MAX_LINKS]
        }
        for number, new_target in near_name_fixes(self.resolver, near).items():
            item = verdicts[number]
            verdicts[number] = dataclasses.replace(item, fix=ln_command(new_target, item.path))

    def _verdicts(
        self,
        links: Sequence[tuple[bytes, Node, bool]],
        progress: Callable[[int, int], None] | None,
        done: int,
        total: int,
    ) -> list[LinkVerdict]:
        """The verdicts on ``links`` with their reading fixes (``judge_runs``)."""
        verdicts: list[LinkVerdict] = []
        append = verdicts.append
        resolve_link, direct = self.resolver.resolve, self.resolver.direct
        judge = self.verdict
        ok = Verdict.OK
        keep_ok = self.keep_ok
        for path, node, own in links:
            entry = node.entry
            target = entry.target
            # the common case, kept short: most links resolve, most of them in one hop
            resolved = direct(path, target) if own else None
            res = None
            if resolved is None:
                res = resolve_link(path, None, entry if own else None)
                resolved = res.resolved
            if res is None or res.errno is None:
                if not keep_ok:
                    done += 1
                    if progress is not None and done % _PROGRESS_EVERY == 0:
                        progress(min(done, total), total)
                    continue
                link = b"/" + path
                message = (
                    f"{link.decode('utf-8', 'backslashreplace')} -> "
                    f"{target.decode('utf-8', 'backslashreplace')}: resolves to "
                    f"{resolved.decode('utf-8', 'backslashreplace')}"
                )
                append(
                    make_verdict(link, target, ok, None, resolved, node.layer, None, None, message)
                )
            else:
                append(judge(path, node, res))
            done += 1
            if progress is not None and done % _PROGRESS_EVERY == 0:
                progress(min(done, total), total)
        return verdicts

    def verdict(self, path: bytes, node: Node, res: Resolution | None = None) -> LinkVerdict:
        """The verdict on the symlink at ``path``; ``res``, when given, is its resolution."""
        link = b"/" + path
        target = node.entry.target
        head = f"{_show(link)} -> {_show(target)}"
        followed: list[bytes] = []
        # the keys the hops aimed at, when the quick route answered: they stand in for the
        # walks that explain a failure in a stack (see _deletion and _changed_layer)
        reached: list[bytes] | None = None
        if not self.single or res is None or res.errno == ELOOP:
            # a loop's reason needs the links followed
            reached = []
            route = self.resolver.quick_route(path, followed, reached)
            if route is not None:
                res = route
            else:
                followed.clear()
                reached = None
                if res is None or res.errno == ELOOP:
                    res = self.resolver.resolve(path, followed)
        if res.errno is None:
            message = f"{head}: resolves to {_show(res.resolved)}"
            return make_verdict(
                link, target, Verdict.OK, None, res.resolved, node.layer, None, None, message
            )
        if res.errno != ELOOP and self._is_runtime(res):
            assert res.missing is not None
            message = (
                f"{head}: {_show(res.missing)} is missing in the image; "
                "the container runtime provides it at run time"
            )
            return make_verdict(
                link,
                target,
                Verdict.RUNTIME_PROVIDED,
                res.errno,
                res.resolved,
                node.layer,
                None,
                None,
                message,
            )
        gone = self._deletion(link, res, reached)
        kind, message = self._kind_and_message(head, link, target, res, gone, followed)
        if gone is not None:
            broken_by = gone.layer_deleted
        else:
            broken_by = self._changed_layer(link, node.layer, reached)
        fix = None
        if kind in _FIXABLE:
            new_target = reading_fix(self.resolver, link, target)
            fix = ln_command(new_target, link) if new_target is not None else None
        return make_verdict(
            link, target, kind, res.errno, res.resolved, node.layer, broken_by, fix, message
        )

    def _kind_and_message(
        self,
        head: str,
        link: bytes,
        target: bytes,
        res: Resolution,
        gone: Deletion | None,
        followed: list[bytes],
    ) -> tuple[Verdict, str]:
        missing = res.missing or res.resolved
        if res.errno == ELOOP:
            return Verdict.LOOP, f"{head}: {self._loop_reason(link, followed)}"
        if not target:
            return Verdict.BROKEN, f"{head}: the target is empty"
        needed = "" if missing == res.resolved else f" (needed for {_show(res.resolved)})"
        why = _deletion_reason(gone, missing)
        if res.errno == ENOTDIR:
            text = f"{head}: {_show(missing)} is not a directory{needed}{why}"
            return Verdict.NOT_A_DIRECTORY, text
        if missing == res.resolved:
            text = f"{head}: target {_show(missing)} does not exist{why}"
        else:
            text = f"{head}: {_show(missing)} does not exist{needed}{why}"
        if gone is not None and gone.how == WHITEOUT:
            return Verdict.HIDDEN_BY_WHITEOUT, text
        if gone is not None and gone.how == OPAQUE:
            return Verdict.HIDDEN_BY_OPAQUE, text
        if res.errno == ENOENT and self._on_host(target):
            return Verdict.HOST_ONLY, (
                f"{head}: target {_show(missing)} does not exist in the image but exists on "
                "this host, so the link works only where it was built"
            )
        return Verdict.BROKEN, text

    def _is_runtime(self, res: Resolution) -> bool:
        for path in (res.missing, res.resolved):
            if path is not None and (
                path in self.runtime_exact or path.startswith(self.runtime_prefixes)
            ):
                return True
        return False

    def _on_host(self, target: bytes) -> bool:
        if self.host_root is None or not target.startswith(b"/"):
            return False
        try:
            os.lstat(os.path.join(self.host_root, target.lstrip(b"/")))
        except (OSError, ValueError):
            return False
        return True

    def _deletion(
        self, link: bytes, res: Resolution, reached: list[bytes] | None
    ) -> Deletion | None:
        """Why what the link needs is gone: the missing component's deletion, else the
        deletion of the first missing component of a path a hop aimed at (its target joined
        with the rest of the path, read literally: a path the resolution would have reached
        had a later layer not deleted or replaced something)."""
        if self.single or res.errno == ELOOP:
            return None
        view = self.view
        if res.errno == ENOENT and res.missing is not None:
            gone = view.deletion(res.missing[1:])
            if gone is not None:
                return gone
        aims = reached_paths(view, link) if reached is None else [b"/" + k for k in reached]
        for aimed in aims:
            key = b""
            for name in aimed.split(b"/"):
                if not name:
                    continue
                key = key + b"/" + name if key else name
                if view.entry(key) is None:
                    gone = view.deletion(key)
                    if gone is not None:
                        return gone
                    break
        return None

    def _changed_layer(self, link: bytes, link_layer: int, reached: list[bytes] | None) -> int:
        """The highest layer above the link's that changed a path its resolution went
        through, else the link's own layer (it never resolved).

        The paths gone through are those a traced walk looks up; after a quick route
        (``reached`` given) they are, as a set, the visible leading parts of the link's own
        path and of every key a hop aimed at (a lookup stops at the first missing part, and
        at a symlink, whose target is the next key aimed at)."""
        if self.single:
            return link_layer
        changed = link_layer
        change_of = self._change_of
        if reached is None:
            for path in resolve(self.view, link, trace=True).trail:
                layer = change_of.get(path[1:])
                if layer is None:
                    layer = change_of[path[1:]] = self._change_at(path[1:])
                if layer > changed:
                    changed = layer
            return changed
        for key in (link[1:], *reached):
            end = 0
            while end >= 0:
                end = key.find(b"/", end + 1)
                part = key if end < 0 else key[:end]
                layer = change_of.get(part)
                if layer is None:
                    layer = change_of[part] = self._change_at(part)
                if layer == _NOT_VISIBLE:
                    break
                if layer > changed:
                    changed = layer
        return changed

    def _change_at(self, key: bytes) -> int:
        """The layer providing the visible ``key`` if a lookup of it sees a change there,
        else -1 (a directory over a directory changes nothing a lookup sees), or
        ``_NOT_VISIBLE``. Depends on ``key`` only, so it is kept for the next link."""
        view = self.view
        entry = view.entry(key)
        if entry is None:
            return _NOT_VISIBLE
        layer = view.provider(key)
        if entry.kind is _DIR and not self._replaced_non_dir(key, layer):
            return -1
        return layer

    def _replaced_non_dir(self, key: bytes, layer: int) -> bool:
        for listing in reversed(self.view.layers):
            if listing.index >= layer:
                continue
            lower = listing.entries.get(key)
            if lower is not None:
                return lower.kind is not _DIR
        return False

    def _loop_reason(self, link: bytes, followed: list[bytes]) -> str:
        """Cycle or long chain, from the links the quick route followed, else a traced walk."""
        links = followed
        if not links:
            traced = resolve(self.view, link, trace=True)
            links = [
                path[1:]
                for path in traced.trail
                if (entry := self.view.entry(path[1:])) is not None and entry.kind is _SYMLINK
            ]
        links = [b"/" + path for path in links]
        distinct = list(dict.fromkeys(links))
        if len(distinct) < len(links):
            shown = ", ".join(_show(path) for path in distinct[:4])
            more = ", ..." if len(distinct) > 4 else ""
            return f"symlink loop through {shown}{more}"
        return f"more than {MAX_HOPS} symlinks to follow (too many levels of symbolic links)"


def _deletion_reason(gone: Deletion | None, missing: bytes) -> str:
    """`` (deleted by layer 3 whiteout)`` and the like, or ``""``."""
    if gone is None:
        return ""
    cause_path = b"/" + gone.cause
    cause = _show(cause_path)
    added, deleted = gone.layer_added, gone.layer_deleted
    if gone.how == WHITEOUT:
        of = "" if cause_path == missing else f" of {cause}"
        return f" (added by layer {added}, deleted by layer {deleted} whiteout{of})"
    if gone.how == OPAQUE:
        return f" (added by layer {added}, hidden by layer {deleted} opaque directory {cause})"
    return f" (added by layer {added}, removed when layer {deleted} replaced {cause})"


def _show(path: bytes) -> str:
    return path.decode("utf-8", "backslashreplace")
