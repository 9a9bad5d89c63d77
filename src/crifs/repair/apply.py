"""The repair executor: runs the actions of planned findings on a store, safely.

Flow of :func:`apply`:

1. Take the runtime's locks as a writer (``crifs.repair.locks``): containers/storage's lock
   files all or none (``StoreLocked`` naming the holder after ``lock_timeout``; refused while
   CRI-O serves the store); containerd's bbolt flocks. While containerd holds those, no file
   is touched: when the daemon answers on its socket the findings' API calls are made instead
   (``crifs.repair.live``), else the repair is refused (``StoreLocked``).
2. Finish the store's unfinished journal (``crifs.repair.journal``) and empty its trash.
3. Re-read the store (``reopen``, which must not take c/storage's read locks: releasing them
   would release our write locks) and re-run ``check``: only planned findings whose identity
   is still found are repaired; the rest are ``gone``.
4. Expand each finding's actions into primitive steps, ordered by ``repair.order`` then plan
   order, write the plan to the journal, and run the steps one by one, each journaled (begin,
   done). A step re-checks its own preconditions when it runs, so a step resumed after a kill
   or run after an earlier failure never acts on a stale view. A failing step stops its
   finding (``failed``) and the run goes on with the next finding.

A c/storage ``DeleteLayer`` follows c/storage's own delete protocol (flag the record
``incomplete`` and save, remove ``l/<link>`` and ``overlay/<id>``, the tar-split and the
layer's big-data directory, then drop the record and save), so after a kill -9 the store
holds the intact layer, a layer c/storage itself deletes on load, or leftovers the next run's
journal removes. After each JSON save the lock file's last-write token is renewed so a running
podman/CRI-O reloads.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from crifs.containerd.store import ContainerdStore
from crifs.cstorage import records_write as rw
from crifs.cstorage.paths import NON_LAYER_ENTRIES, StorePaths, is_safe_component
from crifs.cstorage.store import CStorageStore
from crifs.errors import CrifsError, Internal, UnsafePath
from crifs.fs.mounts import mount_table
from crifs.fsck.findings import Finding
from crifs.model import Store
from crifs.repair import fsops
from crifs.repair.actions import (
    Action,
    CreateSymlink,
    DeleteImage,
    DeleteLayer,
    DropMountRecord,
    MakeDir,
    RemovePath,
    WriteFile,
)
from crifs.repair.journal import Journal, Step
from crifs.repair.locks import ContainerdWriteLocks, CStorageWriteLocks

Log = Callable[[str], None]
TAR_SPLIT_SUFFIX = ".tar-split.gz"


@dataclass
class ApplyResult:
    """What a run did. ``gone``: planned but no longer found under the lock (or changed by
    someone else meanwhile). ``resumed``: steps of an interrupted earlier run finished now.
    ``freed``: space actually released by removals (inodes whose last link went)."""

    applied: list[Finding] = field(default_factory=list)
    failed: list[tuple[Finding, str]] = field(default_factory=list)
    gone: list[Finding] = field(default_factory=list)
    resumed: int = 0
    freed: fsops.Freed = fsops.NOTHING


def apply(store: Store, planned: Sequence[Finding], *, reopen: Callable[[], Store],
          check: Callable[[Store], list[Finding]], log: Log,
          lock_timeout: float = 10.0, address: str | None = None) -> ApplyResult:
    """Repair ``planned`` findings of ``store`` (see module doc). Raises ``StoreLocked`` (one
    line naming the holder) when the runtime holds the store and (containerd) does not answer
    on its API socket ``address`` (default: the config's, else containerd's default),
    ``UnsafePath`` when crifs' state directory is unsafe; every per-finding problem is
    reported in the result instead."""
    executor = executor_for(store)
    result = ApplyResult()
    if isinstance(executor, ContainerdExecutor):
        from crifs.repair import live

        assert isinstance(store, ContainerdStore)
        client = live.connect(executor.db_paths, live.address_of(store, address))
        if client is not None:
            with client:
                live.apply_live(client, planned, reopen=reopen, check=check, log=log,
                                result=result)
            return result
        if planned and not any(f.repair is not None and f.repair.actions for f in planned):
            return result  # only API calls, and no daemon to make them: nothing to do
    with executor.locked(lock_timeout):
        journal = executor.journal
        try:
            _resume(journal, executor, log, result)
            found = {f.identity for f in check(reopen())}
            executor.verify_locks()
            chosen: list[tuple[int, int, Finding]] = []
            for index, finding in enumerate(planned):
                if finding.repair is None or not finding.repair.actions:
                    continue
                if finding.identity not in found:
                    result.gone.append(finding)
                    log(f"{_label(finding)}: no longer found; nothing to do")
                    continue
                chosen.append((finding.repair.order, index, finding))
            chosen.sort(key=lambda c: (c[0], c[1]))
            _execute(journal, executor, [f for _, _, f in chosen], log, result)
            journal.clear()
        finally:
            journal.close()
    return result


def _execute(journal: Journal, executor: Executor, findings: Sequence[Finding], log: Log,
             result: ApplyResult) -> None:
    executor.reload()
    groups: list[tuple[Finding, list[Step]]] = []
    number = 0
    for finding in findings:
        assert finding.repair is not None
        try:
            steps = executor.expand(finding.repair.actions)
        except (CrifsError, OSError) as err:
            result.failed.append((finding, _message(err)))
            log(f"{_label(finding)}: not repaired: {_message(err)}")
            continue
        for step in steps:
            number += 1
            step.update(n=number, group=len(groups))
        groups.append((finding, steps))
    if number:
        journal.prepare()
        journal.start([s for _, steps in groups for s in steps],
                      [_identity(f) for f, _ in groups])
    for finding, steps in groups:
        status, why, _ = _run_steps(journal, executor, steps, _label(finding), log, result)
        if status == "applied":
            result.applied.append(finding)
        elif status == "gone":
            result.gone.append(finding)
        else:
            result.failed.append((finding, why or "failed"))
    if number:
        journal.end()


def _resume(journal: Journal, executor: Executor, log: Log, result: ApplyResult) -> None:
    unfinished = journal.unfinished()  # first: it refuses a symlinked state directory
    result.freed = result.freed + journal.empty_trash()
    if unfinished is None:
        return
    journal.prepare()
    journal.adopt(unfinished.run)
    executor.reload()
    touched = {os.path.dirname(str(s["path"])) for s in unfinished.steps
               if s.get("op") in ("write", "symlink")}
    for directory in sorted(touched | set(executor.record_dirs())):
        fsops.remove_scratch(executor.record_scope, directory)
    remaining = unfinished.remaining()
    if remaining:
        log(f"finishing an interrupted repair: {len(remaining)} step(s)")
    by_group: dict[int, list[Step]] = {}
    for step in remaining:
        by_group.setdefault(int(step["group"]), []).append(step)
    for group, steps in by_group.items():
        label = _group_label(unfinished.groups, group)
        _, _, finished = _run_steps(journal, executor, steps, label, log, result)
        result.resumed += finished
    journal.end()
    result.freed = result.freed + journal.empty_trash()


def _run_steps(journal: Journal, executor: Executor, steps: Sequence[Step], label: str,
               log: Log, result: ApplyResult) -> tuple[str, str | None, int]:
    """Run one finding's steps; ``(applied|failed|gone, why, steps finished)``."""
    finished = 0
    for step in steps:
        journal.begin(step)
        try:
            line, freed = executor.run(step)
        except Gone as err:
            journal.abandon(int(step["group"]), str(err))
            log(f"{label}: {err}")
            return "gone", str(err), finished
        except (CrifsError, OSError) as err:
            why = _message(err)
            journal.abandon(int(step["group"]), why)
            log(f"{label}: failed: {why}")
            return "failed", why, finished
        except Exception as err:
            # A bug: abandon the group so a re-run does not hit it again and again.
            journal.abandon(int(step["group"]), repr(err))
            raise Internal(f"step {step.get('n')} ({step.get('op')}) of {label}: "
                           f"{err!r}") from err
        journal.done(step)
        finished += 1
        result.freed = result.freed + freed
        log(f"{line} ({label}{_size(freed)})")
    return "applied", None, finished


# -- executors ---------------------------------------------------------------------------


class Gone(CrifsError):
    """The object a step acts on was changed by someone else meanwhile: leave it alone."""


Outcome = tuple[str, fsops.Freed]


class Executor:
    """Runs primitive steps on one store. Subclasses add their runtime's locks and ops."""

    state_root: str
    scope: fsops.Scope

    def __init__(self, journal_root: str) -> None:
        self.journal = Journal(journal_root)

    def locked(self, timeout: float) -> contextlib.AbstractContextManager[object]:
        raise NotImplementedError

    def reload(self) -> None:
        """Re-read whatever the steps' preconditions consult (under the locks)."""

    def verify_locks(self) -> None:
        """``Internal`` when a lock taken by :meth:`locked` is no longer held."""

    def record_dirs(self) -> list[str]:
        """Directories of the record files the executor rewrites."""
        return []

    @property
    def record_scope(self) -> fsops.Scope:
        return self.scope

    def expand(self, actions: Sequence[Action]) -> list[Step]:
        steps: list[Step] = []
        for action in actions:
            steps.extend(self.expand_one(action))
        return steps

    def expand_one(self, action: Action) -> list[Step]:
        if isinstance(action, RemovePath):
            self.scope.locate(action.path)
            return [{"op": "remove", "path": action.path}]
        if isinstance(action, CreateSymlink):
            self.scope.locate(action.path)
            return [{"op": "symlink", "path": action.path, "target": action.target}]
        if isinstance(action, WriteFile):
            self.scope.locate(action.path)
            return [{"op": "write", "path": action.path, "content": action.content,
                     "mode": action.mode}]
        if isinstance(action, MakeDir):
            self.scope.locate(action.path)
            return [{"op": "mkdir", "path": action.path, "mode": action.mode}]
        raise fsops.Refused(f"{action.action} is not an action for this kind of store")

    def run(self, step: Step) -> Outcome:
        op = step["op"]
        path = str(step.get("path", ""))
        if op == "remove":
            freed = fsops.remove_path(self.scope, path, trash=self.journal.trash)
            return (f"removed {path}" if freed.inodes else f"{path} already gone"), freed
        if op == "symlink":
            target = str(step["target"])
            if not os.path.isdir(os.path.join(os.path.dirname(path), target)):
                raise fsops.Refused(f"not linked: target {target} is not a directory, the "
                                    "link would dangle", path=path)
            changed = fsops.replace_symlink(self.scope, path, target,
                                            scratch=self.journal.scratch)
            return (f"linked {path} -> {target}" if changed else f"{path} already links "
                    f"to {target}"), fsops.NOTHING
        if op == "write":
            data = str(step["content"]).encode("utf-8", "surrogateescape")
            changed = fsops.write_file(self.scope, path, data, int(step.get("mode", 0o644)),
                                       scratch=self.journal.scratch)
            return (f"wrote {path}" if changed else f"{path} already up to date"), fsops.NOTHING
        if op == "mkdir":
            changed = fsops.make_dir(self.scope, path, int(step.get("mode", 0o700)))
            return (f"created {path}/" if changed else f"{path}/ exists"), fsops.NOTHING
        raise fsops.Refused(f"unknown journal step {op!r} (journal from a newer crifs?)")


class ContainerdExecutor(Executor):
    """File-level repairs of a stopped containerd's root (orphan dirs, blobs, ingests); a
    running one is repaired through its API (``crifs.repair.live``)."""

    def __init__(self, store: ContainerdStore) -> None:
        self.state_root = str(store.root)
        super().__init__(self.state_root)
        dbs = [db for name in store.snapshotter_names
               if (db := store.snapshotter_db(name)) is not None]
        self.scope = fsops.Scope([self.state_root, *(db.root for db in dbs)],
                                 relative_bases=[os.path.join(db.root, "snapshots")
                                                 for db in dbs])
        self.db_paths = [store.meta_db_path, *(db.db_path for db in dbs)]

    def locked(self, timeout: float) -> contextlib.AbstractContextManager[object]:
        return ContainerdWriteLocks(self.db_paths)


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
        if op == "layer_mark":
            return self._layer_mark(str(step["layer"]))
        if op == "layer_drop":
            return self._layer_drop(str(step["layer"]))
        if op == "image_drop":
            return self._image_drop(str(step["image"]))
        if op == "mount_drop":
            return self._mount_drop(str(step["layer"]))
        return super().run(step)

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

    def _layer_mark(self, layer_id: str) -> Outcome:
        entry = self.records.layer(layer_id)
        if entry is None:
            return f"layer {layer_id} has no record", fsops.NOTHING
        if _incomplete(entry):
            return f"layer {layer_id} is already flagged incomplete", fsops.NOTHING
        blocker = self.records.blocker(layer_id) or _mount_blocker(
            self.paths.layer_dir(layer_id), self.scope)
        if blocker is not None:
            raise fsops.Refused(f"layer {layer_id} not deleted: {blocker}")
        self._save_layers(layer_id, rw.flag_incomplete(layer_id))
        return f"flagged layer {layer_id} incomplete", fsops.NOTHING

    def _layer_drop(self, layer_id: str) -> Outcome:
        if not self._save_layers(layer_id, rw.drop_id(layer_id)):
            return f"layer {layer_id} has no record", fsops.NOTHING
        return f"dropped layer {layer_id} from its record file", fsops.NOTHING

    def _save_layers(self, layer_id: str, change: Callable[[rw.Entries], bool]) -> bool:
        path = self.records.file_of_layer(layer_id)
        if path is None:
            return False
        entries = self.records.files[path]
        if not change(entries):
            return False
        self._save(path, entries, self.paths.layers_lock)
        return True

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


def executor_for(store: Store) -> Executor:
    """The executor of ``store``'s runtime."""
    if isinstance(store, CStorageStore):
        return CStorageExecutor(store)
    if isinstance(store, ContainerdStore):
        return ContainerdExecutor(store)
    raise fsops.Refused(f"crifs cannot repair a {type(store).__name__}")


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


def _identity(finding: Finding) -> dict[str, Any]:
    return {"code": finding.code, "runtime": finding.runtime, "namespace": finding.namespace,
            "object": finding.object}


def _label(finding: Finding) -> str:
    return f"{finding.code} {finding.object}"


def _group_label(groups: Sequence[Mapping[str, Any]], group: int) -> str:
    if 0 <= group < len(groups):
        return f"{groups[group].get('code')} {groups[group].get('object')}"
    return f"group {group}"


def _message(err: BaseException) -> str:
    if isinstance(err, CrifsError):
        return str(err)
    if isinstance(err, OSError):
        where = f"{err.filename}: " if err.filename else ""
        return f"{where}{err.strerror or err}"
    return str(err)


def _size(freed: fsops.Freed) -> str:
    if not freed.inodes:
        return ""
    value, unit = float(freed.disk_bytes), "B"
    for next_unit in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, next_unit
    shown = f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
    return f", {shown}, {freed.inodes} inode{'s' if freed.inodes != 1 else ''}"
