"""containers/storage overlay link checks: S1 S2 S3 S4 S12.

The overlay driver names each layer by a 26-character base32 **link** (``overlay/<id>/link``)
and keeps ``overlay/l/<link> -> ../<id>/diff``; a child's ``lower`` file lists its parents as
``l/<link>`` entries, parent first (``lower-layers``, c/storage >= 1.63, lists their ids).
podman 4.3.1 repairs missing ``l/`` links lazily (``recreateSymlinks``): it recreates them from
the ``link`` files, rewrites ``link`` files from the ``l/`` entries, and fails the whole repair,
and the mount that needed it, on any entry it cannot account for.

How a name is judged (``l/`` entries are read with ``readlink`` only, never followed):

- an entry is **valid** for layer A when it is a symlink to exactly ``../A/diff`` and
  ``overlay/A`` is a directory;
- a layer **claims** a name when its ``link`` file (whitespace stripped) holds it.

Classes, for layers with a record and a directory (orphans are S6, missing dirs S5):

- S1  A claims X and ``l/X`` is missing, or is not valid for anyone: recreate it.
- S2  ``l/X`` is not valid and no layer claims X (dangling): remove it.
- S3  A's ``link`` file is missing, not a 26-char base32 name, or names an entry valid for
      another layer: rewrite it (to a name already pointing at A, else the name A's children's
      ``lower`` files use for A, else a new one) and create the entry if needed.
- S4  A's ``lower``/``lower-layers`` names a link nobody can resolve, a layer that has no
      directory, or a layer other than the record's parent chain at that position, or A has a
      parent but no lower file. Repaired by writing the chain the records give, when every
      parent is known with a directory and a link name.
- S12 ``overlay/l`` itself is a symlink, a file, or missing while layers exist: replace it by a
      directory holding every layer's link (S1/S2 are then not reported separately).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

from crifs.cstorage.graph import LayerGraph, layer_graph
from crifs.cstorage.overlay import (
    MAX_DEPTH,
    LinkEntry,
    link_target_layer,
    list_links,
    read_small_file,
)
from crifs.cstorage.paths import LINK_DIR, StorePaths, is_safe_component
from crifs.cstorage.store import CStorageStore
from crifs.errors import CrifsError
from crifs.fs.usage import Meter
from crifs.fsck.cstorage_records import (
    delete_layer_repair,
    describe_users,
    finding,
    is_real_dir,
    layer_data_paths,
    measure,
    user_commands,
)
from crifs.fsck.findings import CheckOptions, Finding, Repair
from crifs.repair.actions import Action, CreateSymlink, MakeDir, RemovePath, WriteFile

LINK_NAME = re.compile(r"[A-Z2-7]{26}")
# Repairs of overlay/l itself run before anything that creates entries in it.
_FIRST = -1_000_000


def read_driver_file(path: str) -> str | None:
    """Text of a small driver file (``link``, ``lower``, ``lower-layers``); ``None`` when it
    does not exist; never followed through a symlink; anything but a regular file is
    ``CorruptStore``."""
    return read_small_file(path)


def link_target(layer_id: str) -> str:
    """The target the driver gives ``l/<link>`` of ``layer_id``."""
    return f"../{layer_id}/diff"


def is_link_name(text: str) -> bool:
    return LINK_NAME.fullmatch(text) is not None


@dataclass(slots=True)
class _Survey:
    """What the link checks read once: the state of ``overlay/l``, its entries, each layer's
    ``link`` file and which layers claim which name."""

    paths: StorePaths
    graph: LayerGraph
    l_state: str  # "ok", "missing", "symlink", "not a directory"
    l_target: str | None
    entries: dict[str, LinkEntry]
    layers: list[str]  # recorded layers with a directory, in record order
    link_text: dict[str, str | None] = field(default_factory=dict)
    link_problem: dict[str, str] = field(default_factory=dict)
    claims: dict[str, list[str]] = field(default_factory=dict)
    planned: dict[str, str] = field(default_factory=dict)  # S3: layer -> name written

    def valid_for(self, name: str) -> str | None:
        """The layer ``l/<name>`` is valid for, if any."""
        entry = self.entries.get(name)
        if entry is None or entry.layer_id is None:
            return None
        return entry.layer_id if self.graph.has_dir(entry.layer_id) else None

    def name_of(self, layer_id: str) -> str | None:
        """The link name the layer has after repair: its valid link file, else the S3 plan."""
        text = self.link_text.get(layer_id)
        if text is not None and layer_id not in self.link_problem:
            return text
        return self.planned.get(layer_id)


def findings(store: CStorageStore, opts: CheckOptions, meter: Meter) -> list[Finding]:
    """S1 S2 S3 S4 S12 for ``store`` (read-only)."""
    paths = store.paths
    if not is_real_dir(paths.home):
        return []
    survey = _survey(store)
    out: list[Finding] = []
    out += _link_files(survey)  # S3 first: S4 and S12 use the names it plans
    if survey.l_state == "ok":
        out += _missing_and_dangling(survey)
    else:
        out += _overlay_l(survey)
    out += _lower_chains(survey, opts, meter)
    return out


def _survey(store: CStorageStore) -> _Survey:
    paths = store.paths
    graph = layer_graph(store)
    l_state, l_target = _l_state(paths.link_dir)
    entries = ({e.name: e for e in list_links(paths)} if l_state == "ok" else {})
    layers = [lid for lid in graph.layers if graph.has_dir(lid)]
    survey = _Survey(paths, graph, l_state, l_target, entries, layers)
    for layer_id in layers:
        try:
            text = read_driver_file(f"{paths.home}/{layer_id}/link")
        except CrifsError as err:
            survey.link_text[layer_id] = None
            survey.link_problem[layer_id] = err.message
            continue
        if text is None:
            survey.link_text[layer_id] = None
            survey.link_problem[layer_id] = "is missing"
            continue
        name = text.strip()
        survey.link_text[layer_id] = name
        if not is_link_name(name):
            survey.link_problem[layer_id] = f"holds {name[:40]!r}, not a 26-character link name"
            continue
        survey.claims.setdefault(name, []).append(layer_id)
    return survey


def _l_state(link_dir: str) -> tuple[str, str | None]:
    try:
        mode = os.lstat(link_dir).st_mode
    except FileNotFoundError:
        return "missing", None
    if stat.S_ISLNK(mode):
        try:
            return "symlink", os.readlink(link_dir)
        except OSError:
            return "symlink", None
    if stat.S_ISDIR(mode):
        return "ok", None
    return "not a directory", None


# -- S3 --------------------------------------------------------------------------------------


def _link_files(survey: _Survey) -> list[Finding]:
    out = []
    paths = survey.paths
    for layer_id in survey.layers:
        problem = survey.link_problem.get(layer_id)
        name = survey.link_text.get(layer_id)
        if problem is None and name is not None:
            owner = survey.valid_for(name)
            claimants = survey.claims.get(name, [])
            if owner is not None and owner != layer_id:
                problem = f"names l/{name}, which points at layer {owner}"
            elif owner is None and claimants[0] != layer_id:
                problem = f"names l/{name}, which layer {claimants[0]}'s link file also names"
        if problem is None:
            continue
        new_name = _choose_name(survey, layer_id)
        survey.planned[layer_id] = new_name
        actions: list[Action] = [WriteFile(paths.layer_link_file(layer_id), new_name)]
        if survey.valid_for(new_name) != layer_id:
            actions.append(CreateSymlink(paths.link(new_name), link_target(layer_id)))
        out.append(finding(
            "S3", layer_id,
            f"the link file of layer {layer_id} {problem}: "
            f"{_link_file_consequence(survey, layer_id, name, new_name)}",
            path=paths.layer_link_file(layer_id),
            repair=Repair(summary=f"write link name {new_name}", actions=tuple(actions),
                          order=_FIRST + 1),
            evidence={"layer": layer_id, "link": name, "problem": problem,
                      "new_link": new_name},
        ))
    return out


def _link_file_consequence(survey: _Survey, layer_id: str, name: str | None, new_name: str
                           ) -> str:
    """What podman 4.3.1 does about the link file (the first three observed with podman)."""
    has_entry = survey.valid_for(new_name) == layer_id
    if name is None and has_entry:
        return (f"podman warns 'Can't read parent link' and rewrites it from l/{new_name} "
                "when it creates a layer on top of it")
    if name is None:
        return ("podman fails with 'recreating the links: … reading name of symlink for "
                f"\"{layer_id}\"' when it creates a layer on top of it or repairs links")
    if not is_link_name(name) and has_entry:
        return ("mounts of layers on top of it fail with 'recreating the missing symlinks: "
                "reached 10 iterations in overlay graph driver's recreateSymlink, giving up'")
    if not is_link_name(name):
        return ("layers created on top of it name that text in their lower files, which "
                "only resolves once podman's link repair has created it")
    owner = survey.valid_for(name)
    if owner is not None and owner != layer_id:
        return f"mounts of layers stacked on it use layer {owner}'s files"
    return ("podman's link repair points that entry at one of the layers claiming it, and the "
            "other's children mount the wrong files")


def _choose_name(survey: _Survey, layer_id: str) -> str:
    """An entry already valid for the layer, else the name its children's lower files use for
    it, else a new name derived from the layer id (the same on every run)."""
    def free(name: str) -> bool:
        return all(c == layer_id for c in survey.claims.get(name, [])) and \
            name not in survey.planned.values()

    for name, entry in sorted(survey.entries.items()):
        if entry.layer_id == layer_id and is_link_name(name) and free(name) and \
                survey.valid_for(name) == layer_id:
            return name
    used: set[str] = set()
    for child in survey.graph.children.get(layer_id, ()):
        lowers = _lower_entries(survey.paths, child)
        if lowers:
            used.add(lowers[0])
    if len(used) == 1:
        (first,) = used
        prefix, _, name = first.partition("/")
        if prefix == LINK_DIR and is_link_name(name) and free(name) and \
                name not in survey.entries:
            return name
    seed = layer_id.encode()
    for counter in range(1000):
        digest = hashlib.sha256(b"crifs-link:%s:%d" % (seed, counter)).digest()
        name = base64.b32encode(digest).decode("ascii")[:26]
        if name not in survey.entries and free(name) and name not in survey.claims:
            return name
    raise AssertionError("no free link name")  # 1000 sha256 collisions: unreachable


def _lower_entries(paths: StorePaths, layer_id: str) -> list[str] | None:
    try:
        text = read_driver_file(f"{paths.home}/{layer_id}/lower")
    except CrifsError:
        return None
    return [e for e in text.strip().split(":") if e] if text is not None else None


# -- S1 S2 -----------------------------------------------------------------------------------


def _missing_and_dangling(survey: _Survey) -> list[Finding]:
    out = []
    paths = survey.paths
    for layer_id in survey.layers:
        if layer_id in survey.link_problem or layer_id in survey.planned:
            continue
        name = survey.link_text[layer_id]
        assert name is not None
        if survey.valid_for(name) is not None or survey.claims[name][0] != layer_id:
            continue  # valid, or another layer's (S3 for this one)
        entry = survey.entries.get(name)
        link_path = paths.link(name)
        actions: list[Action] = []
        if entry is None:
            state = "does not exist"
        else:
            state = _entry_state(entry, paths)
            if is_real_dir(link_path):
                actions.append(RemovePath(link_path))
        actions.append(CreateSymlink(link_path, link_target(layer_id)))
        message = (f"l/{name}, the link of layer {layer_id}, {state}: podman warns 'Can't read "
                   "link … attempting to recreate the missing symlinks' on the next mount and "
                   "fails it if that repair hits any other fault")
        out.append(finding(
            "S1", layer_id, message, path=link_path,
            repair=Repair(summary=f"create l/{name} -> {link_target(layer_id)}",
                          actions=tuple(actions)),
            evidence={"layer": layer_id, "link": name,
                      "target": entry.target if entry is not None else None},
        ))
    for name, entry in sorted(survey.entries.items()):
        if survey.valid_for(name) is not None or name in survey.claims or \
                name in survey.planned.values():
            continue
        state = _entry_state(entry, paths)
        if entry.layer_id is not None:
            consequence = ("podman fails with 'recreating the missing symlinks: correcting link "
                           f"for layer {entry.layer_id}' whenever it must recreate another link")
        else:
            consequence = "podman's link repair removes or trips over it"
        out.append(finding(
            "S2", f"{LINK_DIR}/{name}", f"l/{name} {state}: {consequence}",
            path=paths.link(name),
            repair=Repair(summary=f"remove l/{name}", actions=(RemovePath(paths.link(name)),)),
            evidence={"link": name, "target": entry.target, "layer": entry.layer_id},
        ))
    return out


def _entry_state(entry: LinkEntry, paths: StorePaths) -> str:
    if entry.target is None:
        return "is not a symlink"
    if entry.layer_id is None:
        return f"points to {entry.target!r}, not to ../<layer id>/diff"
    if not is_real_dir(f"{paths.home}/{entry.layer_id}"):
        return f"points to layer {entry.layer_id}, whose directory does not exist"
    return f"points to {entry.target!r}"


# -- S12 -------------------------------------------------------------------------------------


def _overlay_l(survey: _Survey) -> list[Finding]:
    paths = survey.paths
    if survey.l_state == "missing" and not survey.layers:
        return []
    actions: list[Action] = []
    if survey.l_state != "missing":
        actions.append(RemovePath(paths.link_dir))
    # podman 4.3.1 makes overlay/l 0755 (its home is 0700), when it creates and recreates it
    actions.append(MakeDir(paths.link_dir, 0o755))
    links = 0
    for layer_id in survey.layers:
        name = survey.name_of(layer_id)
        if name is not None and layer_id not in survey.planned:
            actions.append(CreateSymlink(paths.link(name), link_target(layer_id)))
            links += 1
    if survey.l_state == "symlink":
        message = (f"overlay/l is a symlink to {survey.l_target!r}: the relative l/ links "
                   "resolve against its target and mounts fail (containers/podman#24900)")
    elif survey.l_state == "missing":
        message = ("overlay/l is missing: podman recreates it empty and must rebuild every "
                   "layer's link on the next mounts, failing on any other link fault")
    else:
        message = "overlay/l is not a directory: podman fails with 'mkdir …/overlay/l: not a " \
                  "directory' on every command"
    return [finding(
        "S12", "overlay/l", message, path=paths.link_dir,
        repair=Repair(summary="replace overlay/l by a directory with every layer's link",
                      actions=tuple(actions), order=_FIRST),
        evidence={"state": survey.l_state, "target": survey.l_target,
                  "links_to_create": links},
    )]


# -- S4 --------------------------------------------------------------------------------------


def _lower_chains(survey: _Survey, opts: CheckOptions, meter: Meter) -> list[Finding]:
    out = []
    paths, graph = survey.paths, survey.graph
    planned_owner = {name: lid for lid, name in survey.planned.items()}
    resolved: dict[str, tuple[str | None, str | None]] = {}  # an entry recurs in every child
    healthy: dict[str, str | None] = {}
    for layer_id in survey.layers:
        chain, missing_parent = graph.ancestors(layer_id)
        if missing_parent is None and 0 < len(chain) <= MAX_DEPTH:
            # Most layers are healthy: one string compare instead of resolving every entry.
            try:
                text = read_driver_file(paths.layer_lower_file(layer_id))
            except CrifsError:
                text = None  # _check_lower reports it
            if (text is not None and not os.path.lexists(
                    paths.layer_lower_layers_file(layer_id))
                    and text.strip() == _healthy_lower(survey, chain, healthy)):
                continue
        problems, source, by_ids = _check_lower(survey, layer_id, chain, missing_parent,
                                                planned_owner, resolved)
        if not problems:
            continue
        out.append(_lower_finding(survey, opts, meter, layer_id, chain, missing_parent,
                                  problems, source or paths.layer_lower_file(layer_id),
                                  by_ids))
    return out


def _healthy_lower(survey: _Survey, chain: list[str], memo: dict[str, str | None]
                   ) -> str | None:
    """The exact ``lower`` text of a layer whose parent chain is ``chain`` when every
    ancestor's link is valid (``None`` when one is not). Memoised per parent: ``memo[p]`` is
    the text of any child of ``p``, built from the base up, iteratively (chains may be deep)."""
    if chain[0] in memo:
        return memo[chain[0]]
    known = next((i for i, lid in enumerate(chain) if lid in memo), len(chain))
    below: str | None = memo[chain[known]] if known < len(chain) else ""
    for lid in reversed(chain[:known]):
        name = survey.link_text.get(lid)
        valid = (name is not None and lid not in survey.link_problem
                 and survey.valid_for(name) == lid)
        text = None if below is None or not valid else (
            f"l/{name}:{below}" if below else f"l/{name}")
        memo[lid] = below = text
    return memo[chain[0]]


def _check_lower(survey: _Survey, layer_id: str, chain: list[str], missing_parent: str | None,
                 planned_owner: dict[str, str],
                 cache: dict[str, tuple[str | None, str | None]] | None = None,
                 ) -> tuple[list[str], str | None, bool]:
    """(problems, the file checked, whether it lists ids) for one layer."""
    paths = survey.paths
    complete = missing_parent is None
    layer_dir = f"{paths.home}/{layer_id}"
    ids_file, links_file = f"{layer_dir}/lower-layers", f"{layer_dir}/lower"
    try:
        ids_text = read_driver_file(ids_file)
        links_text = None if ids_text is not None else read_driver_file(links_file)
    except CrifsError as err:
        return [err.message], err.path, False
    if ids_text is not None:
        entries = [e for e in ids_text.strip().split(":") if e]
        resolved = [_cached(cache, "id:" + e, partial(_resolve_id, survey, e))
                    for e in entries]
        source, by_ids = ids_file, True
    elif links_text is not None:
        entries = [e for e in links_text.strip().split(":") if e]
        resolved = [_cached(cache, e, partial(_resolve_link, survey, e, planned_owner))
                    for e in entries]
        source, by_ids = links_file, False
    else:
        if chain and complete:
            return [f"has parent {chain[0]} but no lower file: the driver mounts it without "
                    "its parent layers"], None, False
        return [], None, False
    problems = [p for _, p in resolved if p]
    if len(entries) > MAX_DEPTH:
        problems.append(f"lists {len(entries)} lowers, more than the {MAX_DEPTH} the driver "
                        "mounts")
    if complete:
        if len(entries) != len(chain):
            problems.append(f"lists {len(entries)} lowers, but its parent chain has "
                            f"{len(chain)} layers")
        for position, ((found, _), expected) in enumerate(zip(resolved, chain, strict=False)):
            if found is not None and found != expected:
                problems.append(f"entry {position + 1} ({entries[position]}) is layer {found}, "
                                f"but its parent chain has {expected} there")
    return problems, source, by_ids


def _cached(cache: dict[str, tuple[str | None, str | None]] | None, key: str,
            resolve: Callable[[], tuple[str | None, str | None]]
            ) -> tuple[str | None, str | None]:
    if cache is None:
        return resolve()
    found = cache.get(key)
    if found is None:
        found = cache[key] = resolve()
    return found


def _resolve_id(survey: _Survey, entry: str) -> tuple[str | None, str | None]:
    if not is_safe_component(entry):
        return None, f"names {entry!r}, which is not a layer id"
    if survey.graph.has_dir(entry) or any(
            is_real_dir(os.path.join(home, entry)) for home in survey.graph.additional_homes):
        return entry, None
    return None, f"names layer {entry}, which has no directory: the mount fails"


def _resolve_link(survey: _Survey, entry: str, planned_owner: dict[str, str]
                  ) -> tuple[str | None, str | None]:
    prefix, _, name = entry.partition("/")
    if prefix != LINK_DIR or not is_safe_component(name):
        return None, f"has entry {entry!r}, which is not of the form l/<link>"
    owner = survey.valid_for(name)
    if owner is not None:
        return owner, None
    claimants = survey.claims.get(name, [])
    if claimants:
        return claimants[0], None  # S1 / S12 recreates the entry
    if name in planned_owner:
        return planned_owner[name], None  # S3 recreates it
    for home in survey.graph.additional_homes:
        target = _readlink(os.path.join(home, LINK_DIR, name))
        layer = link_target_layer(target) if target is not None else None
        if layer is not None and is_real_dir(os.path.join(home, layer)):
            return layer, None
    entry_obj = survey.entries.get(name)
    if entry_obj is not None:
        return None, (f"names l/{name}, which {_entry_state(entry_obj, survey.paths)}: "
                      "the mount fails")
    return None, (f"names l/{name}, which does not exist and no layer's link file names: "
                  f"podman fails with 'readlink …/overlay/l/{name}: no such file or directory'")


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _lower_finding(survey: _Survey, opts: CheckOptions, meter: Meter, layer_id: str,
                   chain: list[str], missing_parent: str | None, problems: Sequence[str],
                   source: str, by_ids: bool) -> Finding:
    graph = survey.graph
    canonical = _canonical_lower(survey, chain, by_ids) if missing_parent is None else None
    users = graph.users_of(layer_id)
    reclaimable = None
    if canonical is not None:
        repair = Repair(summary=f"rewrite {os.path.basename(source)} from the layer records",
                        actions=(WriteFile(source, canonical),))
    elif not graph.referenced(layer_id):
        repair = delete_layer_repair(graph, layer_id, "delete the layer (nothing uses it)",
                                     gc=False)
        reclaimable = measure(meter, opts, *layer_data_paths(survey.paths, layer_id))
    else:
        repair = Repair(summary="remove what uses the layer and pull the images again",
                        commands=user_commands(graph, users))
    extra = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
    used = f"; used by {describe_users(users)}" if users else ""
    return finding(
        "S4", layer_id,
        f"the {os.path.basename(source)} file of layer {layer_id} {problems[0]}{extra}{used}",
        path=source, reclaimable=reclaimable, repair=repair,
        evidence={"layer": layer_id, "problems": list(problems), "parent_chain": chain,
                  "missing_parent": missing_parent, "rewrite": canonical},
    )


def _canonical_lower(survey: _Survey, chain: list[str], by_ids: bool) -> str | None:
    """The lower file the records imply, when every parent is in this store with a directory
    and (for ``lower``) a link name; ``None`` when the fix is not unambiguous."""
    if not chain or len(chain) > MAX_DEPTH:
        return None
    if any(parent not in survey.graph.layers or not survey.graph.has_dir(parent)
           for parent in chain):
        return None
    if by_ids:
        return ":".join(chain)
    names = [survey.name_of(parent) for parent in chain]
    if any(name is None for name in names):
        return None
    return ":".join(f"{LINK_DIR}/{name}" for name in names)
