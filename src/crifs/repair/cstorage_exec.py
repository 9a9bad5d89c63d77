"""The containers/storage executor: files, layers, images and mount records of a c/storage store.

A ``DeleteLayer`` follows c/storage's own delete protocol (flag the record ``incomplete`` and
save, remove ``l/<link>`` and ``overlay/<id>``, the tar-split and the layer's big-data
directory, then drop the record and save), so after a kill -9 the store holds the intact
layer, a layer c/storage itself deletes on load, or leftovers the next run's journal removes.

The record saves are batched over the whole plan (:meth:`CStorageExecutor.batch`): one
``layers_mark`` step flags every layer to delete incomplete in one save per record file, the
per-layer removals follow (children first, as planned), and one ``layers_drop`` step drops all
their records in one save; with N layers that is 2 rewrites of ``layers.json`` instead of 2N.
The batched steps keep every per-layer check: a layer still used by a container, an image, a
mount or a child that is not deleted with it is left alone (its finding fails, its files
stay, and so do its parents), a layer re-created meanwhile is ``Gone``, an absent record is
success. After each JSON save the lock file's last-write token is renewed so a running
podman/CRI-O reloads.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

from crifs.cstorage import records_write as rw
from crifs.cstorage.paths import NON_LAYER_ENTRIES, StorePaths, is_safe_component
from crifs.cstorage.store import CStorageStore
from crifs.errors import CrifsError, UnsafePath
from crifs.fs.mounts import mount_table
from crifs.repair import fsops
from crifs.repair.actions import Action, DeleteImage, DeleteLayer, DropMountRecord, RemovePath
from crifs.repair.executor import BatchOutcome, Executor, Gone, Outcome
from crifs.repair.journal import Step
from crifs.repair.locks import CStorageWriteLocks

TAR_SPLIT_SUFFIX = ".tar-split.gz"
BATCHED = {"layer_mark": "layers_mark", "layer_drop": "layers_drop"}


class CStorageExecutor(Executor):
    """Repairs of a containers/storage store: files, layers, images and mount records."""

    def __init__(self, store: CStorageStore) -> None:
        self.paths: StorePaths = store.paths
        self.state_root = self.paths.graphroot
        super().__init__(self.state_root)
        self.scope = fsops.Scope([self.paths.graphroot], relative_bases=[self.paths.home])
        self._record_scope = fsops.Scope([self.paths.graphroot, self.paths.runroot])
        self.locks = CStorageWriteLocks(self.paths)
        self.records = rw.RecordBook(self.paths)
        self._links_by_layer: dict[str, list[str]] | None = None

    @contextlib.contextmanager
    def _held(self, timeout: float) -> Iterator[object]:
        self.locks.timeout = timeout
        with self.locks:
            yield self.locks

    def locked(self, timeout: float) -> contextlib.AbstractContextManager[object]:
        return self._held(timeout)

    def reload(self) -> None:
        self.records = rw.RecordBook(self.paths)
        self._links_by_layer = None

    def verify_locks(self) -> None:
        self.locks.verify()

    @property
    def record_scope(self) -> fsops.Scope:
        return self._record_scope

    def record_dirs(self) -> list[str]:
        files = [*self.records.layer_files, self.paths.images_json, self.paths.mountpoints_json]
        return sorted({os.path.dirname(f) for f in files})

    # -- expansion -------------------------------------------------------------------------

    def expand_one(self, action: Action) -> list[Step]:
        if isinstance(action, RemovePath):
            self.scope.locate(action.path)
            step: Step = {"op": "remove", "path": action.path}
            parent, name = os.path.split(os.path.normpath(action.path))
            if parent == self.paths.home and name not in NON_LAYER_ENTRIES:
                step["unless_layer"] = name
            elif parent == self.paths.layers_dir:
                step["unless_layer"] = name.removesuffix(TAR_SPLIT_SUFFIX)
            elif parent == self.paths.link_dir:
                step["link_entry"] = True
            return [step]
        if isinstance(action, DeleteLayer):
            return self._delete_layer_steps(_safe_id(action.layer_id, "layer"))
        if isinstance(action, DeleteImage):
            image_id = _safe_id(action.image_id, "image")
            return [{"op": "image_drop", "image": image_id},
                    {"op": "remove", "path": os.path.join(self.paths.images_dir, image_id),
                     "gate_image": image_id}]
        if isinstance(action, DropMountRecord):
            return [{"op": "mount_drop", "layer": _safe_id(action.layer_id, "layer")}]
        return super().expand_one(action)

    def _delete_layer_steps(self, layer_id: str) -> list[Step]:
        links = set(self._links_to(layer_id))
        raw = fsops.read_small(self.scope, self.paths.layer_link_file(layer_id))
        if raw is not None:
            name = raw.decode("utf-8", "surrogateescape").strip()
            if is_safe_component(name):
                links.add(name)
        link_steps = [{"op": "remove", "path": self.paths.link(name), "gate_layer": layer_id,
                       "link_of": layer_id} for name in sorted(links)]
        data = [self.paths.layer_dir(layer_id), self.paths.tar_split(layer_id),
                os.path.join(self.paths.layers_dir, layer_id)]
        return [{"op": "layer_mark", "layer": layer_id}, *link_steps,
                *({"op": "remove", "path": p, "gate_layer": layer_id} for p in data),
                {"op": "layer_drop", "layer": layer_id, "gate_layer": layer_id}]

    def batch(self, steps: list[Step]) -> list[Step]:
        """One ``layers_mark`` step in place of the plan's first ``layer_mark`` and one
        ``layers_drop`` in place of its last ``layer_drop``, each serving every layer (and
        finding) of the plan: every record is flagged before any layer's files go, and
        dropped after all of them went."""
        marks = [s for s in steps if s["op"] == "layer_mark"]
        if not marks:
            return steps
        pairs = [[s["layer"], s["group"]] for s in marks]
        groups = list(dict.fromkeys(int(s["group"]) for s in marks))
        last_drop = max((i for i, s in enumerate(steps) if s["op"] == "layer_drop"),
                        default=len(steps) - 1)
        out: list[Step] = []
        for index, step in enumerate(steps):
            if step is marks[0]:
                out.append({"op": "layers_mark", "group": groups[0], "groups": groups,
                            "layers": pairs})
            elif step["op"] not in BATCHED:
                out.append(step)
            if index == last_drop:
                out.append({"op": "layers_drop", "group": groups[0], "groups": groups,
                            "layers": pairs})
        return out

    def _links_to(self, layer_id: str) -> list[str]:
        """``l/`` entries whose target is ``../<layer_id>/diff`` (read once per plan)."""
        if self._links_by_layer is None:
            found: dict[str, list[str]] = {}
            with contextlib.suppress(OSError), os.scandir(self.paths.link_dir) as it:
                for entry in it:
                    if not entry.is_symlink():
                        continue
                    with contextlib.suppress(OSError):
                        owner = _link_layer(os.readlink(entry.path))
                        if owner is not None:
                            found.setdefault(owner, []).append(entry.name)
            self._links_by_layer = found
        return self._links_by_layer.get(layer_id, [])

    # -- execution -------------------------------------------------------------------------

    def run(self, step: Step) -> Outcome:
        op = step["op"]
        if "gate_layer" in step:
            self._gate_layer(str(step["gate_layer"]))
        if "gate_image" in step and self.records.image(str(step["gate_image"])) is not None:
            raise Gone(f"image {step['gate_image']} was re-created meanwhile; left alone")
        if op == "remove":
            kept = self._check_remove(step)
            if kept is not None:
                return kept, fsops.NOTHING
        if op in BATCHED:  # a journal of a crifs that saved once per layer
            batched = {**step, "op": BATCHED[op], "layers": [[step["layer"], step["group"]]]}
            line, freed, stopped = self.run_batch(batched, ())
            if stopped:
                raise next(iter(stopped.values()))
            return line, freed
        if op == "image_drop":
            return self._image_drop(str(step["image"]))
        if op == "mount_drop":
            return self._mount_drop(str(step["layer"]))
        return super().run(step)

    def run_batch(self, step: Step, skip: Collection[int]) -> BatchOutcome:
        if step["op"] == "layers_mark":
            return self._layers_mark(step, skip)
        if step["op"] == "layers_drop":
            return self._layers_drop(step, skip)
        return super().run_batch(step, skip)

    def _gate_layer(self, layer_id: str) -> None:
        entry = self.records.layer(layer_id)
        if entry is not None and not _incomplete(entry):
            raise Gone(f"layer {layer_id} is complete again (re-created meanwhile); left alone")

    def _check_remove(self, step: Step) -> str | None:
        """Refuse a removal that would break a live layer; a line instead of removing when the
        step is to be skipped (an ``l/`` entry that now belongs to another layer)."""
        path = str(step["path"])
        link_of = step.get("link_of")
        if link_of is not None:
            try:
                owner_now = _link_layer(os.readlink(path))
            except OSError:
                return None  # gone, or not a symlink: remove_path handles it
            if owner_now is not None and owner_now != link_of and \
                    self.records.layer(owner_now) is not None:
                return f"kept {path}: it is layer {owner_now}'s link, not {link_of}'s"
            return None
        owner = step.get("unless_layer")
        if owner is not None and self.records.layer(str(owner)) is not None:
            raise fsops.Refused(f"not removed: layer {owner} has a record; it is no orphan",
                                path=path)
        if step.get("link_entry"):
            try:
                layer_id = _link_layer(os.readlink(path))
            except OSError:
                return None
            if layer_id is None or self.records.layer(layer_id) is None:
                return None  # dangling, or the link of an orphan dir: not a live layer's
            raw = fsops.read_small(self.scope, self.paths.layer_link_file(layer_id))
            if raw is not None and raw.decode("utf-8", "surrogateescape").strip() == \
                    os.path.basename(path):
                raise fsops.Refused(f"not removed: it is layer {layer_id}'s own link",
                                    path=path)
        return None

    def _layers_mark(self, step: Step, skip: Collection[int]) -> BatchOutcome:
        """c/storage's first delete step for every live layer of ``step``, in one save per
        record file. An absent or already incomplete record is success; a layer that is
        mounted or still used (by something not deleted with it) is left complete and its
        groups are stopped."""
        live = _live_layers(step, skip)
        stopped: dict[int, CrifsError] = {}
        absent = already = 0
        complete: list[str] = []
        going: list[str] = []
        mounted: dict[str, str] = {}
        for layer_id in live:
            entry = self.records.layer(layer_id)
            if entry is None:
                absent += 1
            elif _incomplete(entry):
                already += 1
                going.append(layer_id)
            else:
                complete.append(layer_id)
                mount = _mount_blocker(self.paths.layer_dir(layer_id), self.scope)
                if mount is not None:
                    mounted[layer_id] = mount
        blocked = self.records.blockers(complete, going, kept=mounted)
        for layer_id, why in blocked.items():
            for group in live[layer_id]:
                stopped[group] = fsops.Refused(f"layer {layer_id} not deleted: {why}")
        flag = [layer_id for layer_id in complete if layer_id not in blocked]
        saves = self._save_layers(flag, rw.flag_incomplete_all)
        parts = [f"flagged {_count(len(flag), 'layer')} incomplete "
                 f"({_count(saves, 'record file save')})"]
        if already:
            parts.append(f"{already} already incomplete")
        if absent:
            parts.append(f"{absent} without a record")
        if blocked:
            parts.append(f"{len(blocked)} left alone")
        return ", ".join(parts), fsops.NOTHING, stopped

    def _layers_drop(self, step: Step, skip: Collection[int]) -> BatchOutcome:
        """c/storage's last delete step for every live layer of ``step``, in one save per
        record file. A layer that is complete again (re-created meanwhile) is ``Gone``."""
        live = _live_layers(step, skip)
        stopped: dict[int, CrifsError] = {}
        drop: list[str] = []
        for layer_id, groups in live.items():
            entry = self.records.layer(layer_id)
            if entry is None:
                continue
            if not _incomplete(entry):
                for group in groups:
                    stopped[group] = Gone(f"layer {layer_id} is complete again (re-created "
                                          "meanwhile); left alone")
                continue
            drop.append(layer_id)
        saves = self._save_layers(drop, rw.drop_ids)
        line = (f"dropped {_count(len(drop), 'layer record')} "
                f"({_count(saves, 'record file save')})")
        if len(drop) < len(live):
            line += f", {len(live) - len(drop)} without a record or left alone"
        return line, fsops.NOTHING, stopped

    def _save_layers(self, layer_ids: list[str],
                     change: Callable[[Collection[str]], Callable[[rw.Entries], bool]]) -> int:
        """Apply ``change(ids)`` to each record file holding some of ``layer_ids`` and save
        the changed ones (``layers.json`` before the volatile files); the number of saves."""
        by_file: dict[str, list[str]] = {}
        for layer_id in layer_ids:
            path = self.records.file_of_layer(layer_id)
            if path is not None:
                by_file.setdefault(path, []).append(layer_id)
        saves = 0
        for path in self.records.layer_files:
            if path not in by_file:
                continue
            entries = self.records.files[path]
            changed = change(by_file[path])(entries)
            self.records.changed()
            if changed:
                self._save(path, entries, self.paths.layers_lock)
                saves += 1
        return saves

    def _image_drop(self, image_id: str) -> Outcome:
        user = next((c for c in self.records.containers if c.get("image") == image_id), None)
        if user is not None:
            raise fsops.Refused(f"image {image_id} not deleted: container {user.get('id')} "
                                "uses it")
        entries = self.records.files.setdefault(self.paths.images_json, [])
        if not rw.drop_id(image_id)(entries):
            return f"image {image_id} has no record", fsops.NOTHING
        self._save(self.paths.images_json, entries, self.paths.images_lock)
        return f"dropped image {image_id} from images.json", fsops.NOTHING

    def _mount_drop(self, layer_id: str) -> Outcome:
        entries = self.records.files.setdefault(self.paths.mountpoints_json, [])
        live = {m.mount_point for m in mount_table()}
        for entry in entries:
            if entry.get("id") == layer_id and entry.get("path") in live:
                raise fsops.Refused(f"mount record of layer {layer_id} kept: "
                                    f"{entry.get('path')} is mounted")
        if not rw.drop_id(layer_id)(entries):
            return f"layer {layer_id} has no mount record", fsops.NOTHING
        self._save(self.paths.mountpoints_json, entries, self.paths.mountpoints_lock)
        return f"dropped the mount record of layer {layer_id}", fsops.NOTHING

    def _save(self, path: str, entries: rw.Entries, lock_path: str) -> None:
        fsops.write_file(self.record_scope, path, rw.encode_entries(entries),
                         mode=rw.record_mode(path), scratch=self.journal.scratch)
        self.locks.record_write(lock_path)


# -- helpers -----------------------------------------------------------------------------


def _live_layers(step: Step, skip: Collection[int]) -> dict[str, list[int]]:
    """layer id -> the groups (not in ``skip``) a batched step deletes it for."""
    live: dict[str, list[int]] = {}
    for layer_id, group in step["layers"]:
        if int(group) not in skip:
            live.setdefault(_safe_id(str(layer_id), "layer"), []).append(int(group))
    return live


def _mount_blocker(path: str, scope: fsops.Scope) -> str | None:
    reason = fsops.mount_refusal(path, scope.relative_bases)
    return f"{path} {reason}" if reason is not None else None


def _incomplete(entry: Mapping[str, Any]) -> bool:
    flags = entry.get("flags")
    return isinstance(flags, dict) and flags.get(rw.INCOMPLETE) is True


def _link_layer(target: str) -> str | None:
    """The layer id of an ``l/`` link target ``../<id>/diff``, else ``None``."""
    parts = target.split("/")
    if len(parts) == 3 and parts[0] == ".." and parts[2] == "diff" and \
            is_safe_component(parts[1]):
        return parts[1]
    return None


def _safe_id(value: str, what: str) -> str:
    if not is_safe_component(value):
        raise UnsafePath(f"{what} id {value!r} is not a single path component")
    return value


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"
