"""containers/storage record checks: S5 S6 S7 S8 S9 S10 S11 S13.

What each class compares (records as read at open, directories listed with ``lstat``/``scandir``,
never followed):

- S5  a ``layers.json`` record whose ``overlay/<id>`` is not a directory.
- S6  a directory in ``overlay/`` that the driver's ListLayers would return (everything but
      ``l``, ``staging``, ``tempdirs`` and non-directories) with no layer record: c/storage's
      "layer in lower level storage driver not accounted for".
- S7  a layer whose ``parent`` neither this store nor an additional image store has.
- S8  an image whose top layer or ``mapped-layers``, walked through parents, reach a layer no
      store has: podman's "layer not known".
- S9  a container whose RW layer has no record, or whose image no store has.
- S10 a layer flagged ``incomplete`` (an interrupted create or delete).
- S11 a layer no image or container reaches whose ``created`` is zero or older than
      ``opts.max_age``, and which has no child that stays.
- S13 a ``mountpoints.json`` entry with a count whose path is not mounted in any mount
      namespace of this host.

Reclaimable space of a layer is its ``overlay/<id>`` directory, ``overlay-layers/<id>.tar-split.gz``
and ``overlay-layers/<id>/``, measured only for layers a repair removes (orphans, incomplete and
unreferenced layers); referenced layers are never walked.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
from collections.abc import Iterable, Sequence

from crifs.cstorage.graph import LayerGraph, User, layer_graph
from crifs.cstorage.overlay import list_links
from crifs.cstorage.paths import StorePaths
from crifs.cstorage.records import ContainerRecord, ImageRecord, LayerRecord
from crifs.cstorage.store import CStorageStore
from crifs.fs.mounts import MOUNTINFO, mount_table
from crifs.fs.usage import Meter
from crifs.fsck.catalogue import severity_of
from crifs.fsck.findings import CheckOptions, Finding, Reclaimable, Repair, reclaimable_of
from crifs.model import CSTORAGE
from crifs.repair.actions import Action, DeleteImage, DeleteLayer, DropMountRecord, RemovePath

# -- helpers shared with cstorage_links ------------------------------------------------------


def layer_data_paths(paths: StorePaths, layer_id: str) -> tuple[str, str, str]:
    """What deleting a layer removes: its driver dir, tar-split and big-data dir."""
    return (paths.layer_dir(layer_id), paths.tar_split(layer_id),
            paths.layer_big_data_dir(layer_id))


def measure(meter: Meter, opts: CheckOptions, *paths: str) -> Reclaimable | None:
    """Reclaimable space of ``paths`` (``None`` when not measuring or none exists)."""
    if not opts.measure:
        return None
    return reclaimable_of(meter.measure(*paths))


def user_commands(graph: LayerGraph, users: Iterable[User]) -> tuple[str, ...]:
    """What a user runs to drop the images and containers that keep a broken layer: containers
    first (an image in use cannot be removed)."""
    users = list(users)
    commands = [container_remove_command(graph.containers[u.id]) for u in users
                if u.kind == "container" and u.id in graph.containers]
    commands += [f"podman rmi --force {u.name}" for u in users if u.kind == "image"]
    return tuple(commands)


def container_remove_command(container: ContainerRecord) -> str:
    """``crictl rm`` for a CRI-O container (its metadata names a pod), else ``podman rm``."""
    meta = container.metadata_fields()
    if "pod-id" in meta or "pod-name" in meta:
        return f"crictl rm {container.id}"
    return f"podman rm --force {container.id}"


def describe_users(users: Sequence[User], limit: int = 3) -> str:
    names = [f"{u.kind} {u.name}" for u in users[:limit]]
    more = f" and {len(users) - limit} more" if len(users) > limit else ""
    return ", ".join(names) + more


def finding(code: str, obj: str, message: str, *, path: str | None,
            reclaimable: Reclaimable | None = None, repair: Repair | None = None,
            evidence: dict[str, object] | None = None) -> Finding:
    return Finding(code=code, severity=severity_of(code), runtime=CSTORAGE, object=obj,
                   message=message, path=path, reclaimable=reclaimable, repair=repair,
                   evidence=evidence or {})


def is_real_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def delete_layer_repair(graph: LayerGraph, layer_id: str, summary: str, *, gc: bool) -> Repair:
    return Repair(summary=summary, actions=(DeleteLayer(layer_id),), gc=gc,
                  order=-graph.depth(layer_id))


# -- entry point -----------------------------------------------------------------------------


def findings(store: CStorageStore, opts: CheckOptions, meter: Meter) -> list[Finding]:
    """S5 S6 S7 S8 S9 S10 S11 S13 for ``store`` (read-only)."""
    graph = layer_graph(store)
    mounts = MountPoints()
    doomed = _doomed_layers(graph)
    out: list[Finding] = []
    out += _layers_without_dirs(graph, opts, meter, doomed)
    out += _orphan_dirs(graph, opts, meter, mounts)
    out += _unknown_parents(graph, opts, meter, doomed)
    out += _images_missing_layers(graph, opts, meter)
    out += _containers_missing_parts(graph)
    out += _incomplete_layers(graph, opts, meter)
    out += _unreferenced_layers(graph, opts, meter, doomed)
    out += _stale_mount_records(store, graph, mounts)
    return out


def _without_dir(graph: LayerGraph, layer_id: str) -> bool:
    return not graph.has_dir(layer_id)


def _unknown_parent(graph: LayerGraph, layer: LayerRecord) -> bool:
    return bool(layer.parent) and not graph.known_layer(layer.parent or "")


def _doomed_layers(graph: LayerGraph) -> set[str]:
    """Layers a repair deletes whatever their age: incomplete ones (podman deletes them on
    load), and broken ones (S5, S7) that no image or container reaches and whose children are
    all doomed too."""
    doomed = {layer.id for layer in graph.layers.values() if layer.incomplete}
    broken = [layer.id for layer in graph.layers.values()
              if layer.id not in doomed and not graph.reached(layer.id)
              and (_without_dir(graph, layer.id) or _unknown_parent(graph, layer))]
    changed = True
    while changed:
        changed = False
        for layer_id in broken:
            if layer_id not in doomed and all(
                    child in doomed for child in graph.children.get(layer_id, ())):
                doomed.add(layer_id)
                changed = True
    return doomed


# -- S5 --------------------------------------------------------------------------------------


def _layers_without_dirs(graph: LayerGraph, opts: CheckOptions, meter: Meter,
                         doomed: set[str]) -> list[Finding]:
    out = []
    paths = graph.paths
    for layer in graph.layers.values():
        if not _without_dir(graph, layer.id) or layer.incomplete:
            continue
        layer_dir = paths.layer_dir(layer.id)
        state = ("is not a directory" if os.path.lexists(layer_dir)
                 else "does not exist")
        users = graph.users_of(layer.id)
        evidence: dict[str, object] = {"layer": layer.id, "record_file": layer.source,
                                       "users": [u.name for u in users]}
        consequence = ("podman fails with 'stat …/overlay/<id>: no such file or directory' "
                       "mounting it")
        if layer.id not in doomed:
            message = (f"layer {layer.id} is recorded but its directory {state}: {consequence} "
                       f"(used by {describe_users(users) or 'child layers'})")
            repair = Repair(summary="remove what uses it and pull the images again",
                            commands=user_commands(graph, users))
            reclaimable = None
        else:
            message = (f"layer {layer.id} is recorded but its directory {state}; nothing uses "
                       "it: podman's size and prune commands trip over it")
            repair = delete_layer_repair(graph, layer.id, "delete the layer record", gc=True)
            reclaimable = measure(meter, opts, *layer_data_paths(paths, layer.id))
        out.append(finding("S5", layer.id, message, path=layer_dir, reclaimable=reclaimable,
                           repair=repair, evidence=evidence))
    return out


# -- S6 --------------------------------------------------------------------------------------


def _orphan_dirs(graph: LayerGraph, opts: CheckOptions, meter: Meter, mounts: MountPoints
                 ) -> list[Finding]:
    paths = graph.paths
    orphans = sorted(d for d in graph.dirs if d not in graph.layers)
    if not orphans:
        return []
    links_to: dict[str, list[str]] = {}
    for entry in list_links(paths) if is_real_dir(paths.link_dir) else []:
        if entry.layer_id is not None:
            links_to.setdefault(entry.layer_id, []).append(entry.name)
    out = []
    for layer_id in orphans:
        data = [p for p in layer_data_paths(paths, layer_id) if os.path.lexists(p)]
        links = [paths.link(name) for name in links_to.get(layer_id, ())]
        actions: tuple[Action, ...] = tuple(RemovePath(p) for p in (*links, *data))
        merged = paths.layer_merged(layer_id)
        evidence: dict[str, object] = {"layer": layer_id, "l_links": links_to.get(layer_id, []),
                                       "paths": data}
        if mounts.mounted(merged):
            evidence["mounted"] = merged
        message = (f"directory overlay/{layer_id} is in no layer record: left by a crash "
                   "during a layer delete or pull, nothing can use it and podman never frees it")
        out.append(finding(
            "S6", layer_id, message, path=paths.layer_dir(layer_id),
            reclaimable=measure(meter, opts, *data),
            repair=Repair(summary="remove the orphan directory", actions=actions, gc=True),
            evidence=evidence,
        ))
    return out


# -- S7 --------------------------------------------------------------------------------------


def _unknown_parents(graph: LayerGraph, opts: CheckOptions, meter: Meter,
                     doomed: set[str]) -> list[Finding]:
    out = []
    for layer in graph.layers.values():
        if not _unknown_parent(graph, layer) or layer.incomplete:
            continue
        users = graph.users_of(layer.id)
        evidence: dict[str, object] = {"layer": layer.id, "parent": layer.parent,
                                       "users": [u.name for u in users]}
        base = (f"layer {layer.id} names parent {layer.parent}, which no layer store has: "
                "c/storage reports 'layer is missing' and its lower chain cannot be verified")
        if layer.id not in doomed:
            message = f"{base} (used by {describe_users(users) or 'child layers'})"
            repair = Repair(summary="remove what uses it and pull the images again",
                            commands=user_commands(graph, users))
            reclaimable = None
        else:
            message = f"{base}; nothing uses it"
            repair = delete_layer_repair(graph, layer.id, "delete the layer", gc=True)
            reclaimable = measure(meter, opts, *layer_data_paths(graph.paths, layer.id))
        out.append(finding("S7", layer.id, message, path=graph.paths.layer_dir(layer.id),
                           reclaimable=reclaimable, repair=repair, evidence=evidence))
    return out


# -- S8 --------------------------------------------------------------------------------------


def _missing_layer_of(graph: LayerGraph, image: ImageRecord) -> str | None:
    for top in (image.layer, *image.mapped_layers):
        if not top:
            continue
        if not graph.known_layer(top):
            return top
        _, missing = graph.ancestors(top)
        if missing is not None:
            return missing
    return None


def _images_missing_layers(graph: LayerGraph, opts: CheckOptions, meter: Meter
                           ) -> list[Finding]:
    out = []
    for image in graph.images.values():
        missing = _missing_layer_of(graph, image)
        if missing is None:
            continue
        name = image.names[0] if image.names else image.id
        users = [c for c in graph.containers.values() if c.image == image.id]
        evidence: dict[str, object] = {"image": image.id, "names": list(image.names),
                                       "top_layer": image.layer, "missing_layer": missing,
                                       "containers": [c.id for c in users]}
        message = (f"image {name} needs layer {missing}, which no layer store has: podman "
                   "fails with 'layer not known' (podman images, run, image mount)")
        pull = f"podman pull {name}" if image.names else None
        if users:
            repair = Repair(
                summary="remove the containers of the image, then the image, and pull it again",
                commands=(*(container_remove_command(c) for c in users),
                          f"podman rmi --force {image.id}", *((pull,) if pull else ())),
            )
            reclaimable = None
        else:
            repair = Repair(summary="drop the image record" + (f"; then {pull}" if pull else ""),
                            actions=(DeleteImage(image.id),),
                            commands=(pull,) if pull else ())
            reclaimable = measure(meter, opts, graph.paths.image_dir(image.id))
        out.append(finding("S8", image.id, message, path=graph.paths.image_dir(image.id),
                           reclaimable=reclaimable, repair=repair, evidence=evidence))
    return out


# -- S9 --------------------------------------------------------------------------------------


def _containers_missing_parts(graph: LayerGraph) -> list[Finding]:
    out = []
    for container in graph.containers.values():
        problems = []
        layer_missing = not container.layer or container.layer not in graph.layers
        if layer_missing:
            problems.append(f"its layer {container.layer or '(none)'} has no record: podman "
                            "fails to start it with 'mounting storage for container …: layer "
                            "not known'")
        image_missing = bool(container.image) and not graph.known_image(container.image or "")
        if image_missing:
            problems.append(f"its image {container.image} is gone: 'podman container inspect' "
                            "fails with 'image not known'")
        if not problems:
            continue
        name = container.names[0] if container.names else container.id
        command = container_remove_command(container)
        out.append(finding(
            "S9", container.id, f"container {name}: " + "; ".join(problems),
            path=graph.paths.layer_dir(container.layer) if container.layer else None,
            repair=Repair(summary="remove the container (its data is lost or incomplete)",
                          commands=(command,)),
            evidence={"container": container.id, "names": list(container.names),
                      "layer": container.layer, "image": container.image,
                      "layer_missing": layer_missing, "image_missing": image_missing},
        ))
    return out


# -- S10 -------------------------------------------------------------------------------------


def _incomplete_layers(graph: LayerGraph, opts: CheckOptions, meter: Meter) -> list[Finding]:
    out = []
    for layer in graph.layers.values():
        if not layer.incomplete:
            continue
        users = graph.users_of(layer.id)
        message = (f"layer {layer.id} is flagged incomplete (an interrupted pull or delete): "
                   "podman deletes it on its next start ('Found incomplete layer')")
        if users:
            message += (f", after which {describe_users(users)} fail with 'layer not known'")
        out.append(finding(
            "S10", layer.id, message, path=graph.paths.layer_dir(layer.id),
            reclaimable=measure(meter, opts, *layer_data_paths(graph.paths, layer.id)),
            repair=delete_layer_repair(graph, layer.id, "delete the incomplete layer", gc=True),
            evidence={"layer": layer.id, "flags": dict(layer.flags),
                      "users": [u.name for u in users],
                      "children": list(graph.children.get(layer.id, ()))},
        ))
    return out


# -- S11 -------------------------------------------------------------------------------------


def _unreferenced_layers(graph: LayerGraph, opts: CheckOptions, meter: Meter,
                         doomed: set[str]) -> list[Finding]:
    now = opts.clock()
    candidates = {
        layer.id for layer in graph.layers.values()
        if layer.id not in doomed and not graph.reached(layer.id) and _old(layer, now, opts)
        and not _without_dir(graph, layer.id) and not _unknown_parent(graph, layer)
    }
    # A layer with a child that stays (too young, or a finding that keeps it) cannot go.
    changed = True
    while changed:
        changed = False
        for layer_id in sorted(candidates):
            kids = graph.children.get(layer_id, ())
            if any(k not in candidates and k not in doomed for k in kids):
                candidates.discard(layer_id)
                changed = True
    out = []
    for layer_id in sorted(candidates, key=lambda i: (-graph.depth(i), i)):
        layer = graph.layers[layer_id]
        created = layer.created.isoformat() if layer.created else None
        age = (f"created {created}" if created else "with no creation time")
        message = (f"layer {layer_id} is reached by no image or container ({age}): it holds "
                   "space that podman's prune commands never free")
        out.append(finding(
            "S11", layer_id, message, path=graph.paths.layer_dir(layer_id),
            reclaimable=measure(meter, opts, *layer_data_paths(graph.paths, layer_id)),
            repair=delete_layer_repair(graph, layer_id, "delete the unreferenced layer",
                                       gc=True),
            evidence={"layer": layer_id, "created": created, "parent": layer.parent,
                      "names": list(layer.names),
                      "age_seconds": int((now - layer.created).total_seconds())
                      if layer.created else None},
        ))
    return out


def _old(layer: LayerRecord, now: dt.datetime, opts: CheckOptions) -> bool:
    return layer.created is None or now - layer.created > opts.max_age


# -- S13 -------------------------------------------------------------------------------------


def _stale_mount_records(store: CStorageStore, graph: LayerGraph, mounts: MountPoints
                         ) -> list[Finding]:
    out = []
    for record in store.mountpoint_records:
        if record.count <= 0 or (record.path and mounts.mounted(record.path)):
            continue
        message = (f"mountpoints.json counts layer {record.id} as mounted {record.count} "
                   f"time(s) at {record.path or '(no path)'}, but nothing is mounted there: "
                   "podman mount / podman image mount list it as mounted")
        out.append(finding(
            "S13", record.id, message, path=store.paths.mountpoints_json,
            repair=Repair(summary="drop the stale mount record",
                          actions=(DropMountRecord(record.id),)),
            evidence={"layer": record.id, "mount_point": record.path, "count": record.count,
                      "layer_known": record.id in graph.layers},
        ))
    return out


class MountPoints:
    """Mount points as the host sees them, read on first use: our own namespace first, then
    every other mount namespace (a rootless podman mounts layers in its own, where ours cannot
    see them), read only when a path is not mounted in ours."""

    def __init__(self) -> None:
        self._own: set[str] | None = None
        self._others: set[str] | None = None

    def mounted(self, path: str) -> bool:
        candidates = {path, os.path.realpath(path)}
        if self._own is None:
            self._own = _mountinfo_points(MOUNTINFO)
        if candidates & self._own:
            return True
        if self._others is None:
            self._others = _other_namespaces_points()
        return bool(candidates & self._others)


def _other_namespaces_points() -> set[str]:
    points: set[str] = set()
    try:
        seen = {os.readlink("/proc/self/ns/mnt")}
        pids = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return points
    for pid in pids:
        try:
            namespace = os.readlink(f"/proc/{pid}/ns/mnt")
        except OSError:
            continue
        if namespace in seen:
            continue
        seen.add(namespace)
        points |= _mountinfo_points(f"/proc/{pid}/mountinfo")
    return points


def _mountinfo_points(path: str) -> set[str]:
    return {m.mount_point for m in mount_table(path)}
