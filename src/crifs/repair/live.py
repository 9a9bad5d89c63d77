"""Repairs of a running containerd, made through its API the way ``ctr`` makes them.

While containerd runs it holds bbolt's flock on ``meta.db`` and every snapshotter
``metadata.db`` and keeps state in memory, so crifs changes no file of its store. When those
locks are held *and* the daemon answers on its socket, each planned finding's ``repair.calls``
(the API equivalents of its ``ctr`` commands, see :class:`crifs.repair.actions.ApiCall`) are
made instead:

1. The store is re-read and re-checked; planned findings no longer found are ``gone``.
2. Findings run in ``repair.order`` (children first, stale children entries before any
   removal), each call logged like a file step. A call whose object is already gone
   (``NotFound``) is done. A removal of a snapshot whose directory is mounted (or used by a
   live overlay mount) is refused, as crifs refuses removing a mounted directory itself. The
   first failing call stops its finding (``failed``); the run goes on with the next.
3. The calls that only make containerd's GC run (on a ``crifs-gc-trigger`` snapshot, blob or
   lease: :func:`crifs.containerd.snapshot_index.is_gc_trigger`) are made once each, after
   every other call, and the run ends with one synchronous GC (a lease created and deleted with
   ``sync``): containerd then prunes backend records, runs the snapshotter's ``Cleanup`` (the
   orphan directories) and its content GC (orphan blob files and ingests) before answering, so
   the re-check afterwards sees the result.

Findings whose repair has no calls (file actions such as a native snapshotter's orphan dirs,
which no containerd code removes) are left for a run while containerd is stopped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from crifs.containerd.config import DEFAULT_ADDRESS
from crifs.containerd.snapshot_index import GC_TRIGGER, SnapshotIndex, api_call, is_gc_trigger
from crifs.errors import CrifsError, StoreLocked
from crifs.fs.locks import lock_holders
from crifs.fsck.findings import Finding
from crifs.repair import fsops
from crifs.repair.actions import ApiCall
from crifs.repair.executor import label, still_found
from crifs.repair.locks import ContainerdWriteLocks, describe_holders

if TYPE_CHECKING:
    from crifs.containerd.client import ContainerdClient
    from crifs.containerd.store import ContainerdStore
    from crifs.model import Store
    from crifs.repair.apply import ApplyResult

Log = Callable[[str], None]
PROBE_TIMEOUT_S = 5.0


def address_of(store: ContainerdStore, address: str | None) -> str:
    """The socket to use: ``address`` (``--address``), else the store config's ``[grpc]
    address``, else ``/run/containerd/containerd.sock``."""
    return address or store.config.grpc_address or DEFAULT_ADDRESS


def held_by_daemon(db_paths: Sequence[str], *, passive: bool = False) -> str | None:
    """The database a running containerd holds locked, or ``None`` when none is held. The
    locks are tried (taken and released at once), or with ``passive`` only looked up in
    ``/proc/locks``, which takes no lock (for a dry run)."""
    if passive:
        me = os.getpid()
        return next((p for p in db_paths if any(h.pid != me and not h.blocked
                                                for h in lock_holders(p))), None)
    try:
        with ContainerdWriteLocks(db_paths):
            return None
    except StoreLocked as err:
        return err.path or db_paths[0]


def connect(db_paths: Sequence[str], address: str, *,
            passive: bool = False) -> ContainerdClient | None:
    """A client of the daemon holding ``db_paths``, or ``None`` when no daemon holds them
    (repair offline). ``StoreLocked`` (one line) when they are held but nothing answers at
    ``address``: then only the printed ``ctr`` commands, run against the right socket, or a
    run with containerd stopped can repair the store. ``passive``: see
    :func:`held_by_daemon`."""
    locked = held_by_daemon(db_paths, passive=passive)
    if locked is None:
        return None
    from crifs.containerd.client import ContainerdClient, DaemonUnavailable, peer_pid

    holder = describe_holders(locked)
    client = ContainerdClient(address)
    try:
        client.version(timeout=PROBE_TIMEOUT_S)
    except DaemonUnavailable as err:
        client.close()
        raise StoreLocked(
            f"locked by {holder}: containerd is running, but {err.message}: run the printed "
            "ctr commands against it, name its socket with --address, or stop containerd and "
            "repeat", path=locked) from None
    # The default socket may belong to another containerd than the one holding this store.
    holders = {h.pid for h in lock_holders(locked) if h.pid is not None and not h.blocked}
    answering = peer_pid(address)
    if holders and answering is not None and answering not in holders:
        client.close()
        raise StoreLocked(
            f"locked by {holder}: containerd is running, but the daemon answering at "
            f"{client.target} is pid {answering}, another containerd: name this store's "
            "socket with --address, or stop containerd and repeat", path=locked)
    return client


def daemon_answers(store: ContainerdStore, address: str | None) -> bool:
    """Whether a repair of ``store`` now would go through the API (its DBs are held by a
    daemon that answers on its socket). Takes no lock; loads grpc only when the DBs are
    held."""
    try:
        client = connect(db_paths(store), address_of(store, address), passive=True)
    except StoreLocked:
        return False
    if client is None:
        return False
    client.close()
    return True


def db_paths(store: ContainerdStore) -> list[str]:
    """``meta.db`` and every snapshotter ``metadata.db`` crifs read: what containerd locks."""
    dbs = [db for name in store.snapshotter_names
           if (db := store.snapshotter_db(name)) is not None]
    return [store.meta_db_path, *(db.db_path for db in dbs)]


def apply_live(client: ContainerdClient, planned: Sequence[Finding], *,
               reopen: Callable[[], Store], check: Callable[[Store], list[Finding]], log: Log,
               result: ApplyResult) -> None:
    """Repair ``planned`` through ``client`` (see module doc); outcomes go to ``result``."""
    from crifs.containerd.client import DaemonUnavailable
    from crifs.containerd.store import ContainerdStore

    store = reopen()
    assert isinstance(store, ContainerdStore)
    found = {f.identity for f in check(store)}
    chosen = still_found(planned, found, lambda f: bool(f.repair and f.repair.calls), log,
                         result.gone)
    if not chosen:
        return
    log(f"containerd is running: repairing through its API at {client.target}")
    guard = _MountGuard(store)
    triggers: dict[ApiCall, None] = {}
    waiting: list[Finding] = []  # done once containerd's GC has run
    made = 0
    for finding in chosen:
        assert finding.repair is not None
        own = [c for c in finding.repair.calls if not is_gc_trigger(c)]
        error = _run_calls(client, own, guard, label(finding), log)
        made += len(own)
        if error is not None:
            result.failed.append((finding, str(error)))
            log(f"{label(finding)}: failed: {error}")
            if isinstance(error, DaemonUnavailable):
                result.failed += [(f, str(error)) for f in waiting]
                _fail_rest(chosen, finding, str(error), result)
                return
            continue
        later = [c for c in finding.repair.calls if is_gc_trigger(c)]
        if later:
            triggers.update(dict.fromkeys(later))
            waiting.append(finding)
        else:
            result.applied.append(finding)
    if not made and not triggers:
        return
    error = _run_calls(client, _gc_pass(list(triggers), chosen), guard,
                       "GC pass", log)
    if error is not None:
        log(f"containerd's GC: failed: {error}")
        result.failed += [(f, f"containerd's GC: {error}") for f in waiting]
    else:
        result.applied += waiting


def _gc_pass(triggers: list[ApiCall], chosen: Sequence[Finding]) -> list[ApiCall]:
    """The trigger calls (snapshot and blob ones first, each once), then one synchronous GC."""
    marks = [c for c in triggers if c.service != "leases"]
    namespace = next((c.namespace for c in triggers if c.service == "leases"), None)
    if namespace is None:
        first = chosen[0].repair
        namespace = first.calls[0].namespace if first is not None and first.calls else "default"
    return [*marks, api_call("leases", "Create", namespace, id=GC_TRIGGER),
            api_call("leases", "Delete", namespace, id=GC_TRIGGER, sync="true")]


def _run_calls(client: ContainerdClient, calls: Sequence[ApiCall], guard: _MountGuard,
               name: str, log: Log) -> CrifsError | None:
    """Make ``calls`` in order; the first error, or ``None``."""
    for call in calls:
        try:
            guard.check(call)
            line = client.run(call)
        except CrifsError as err:
            return err
        log(f"{line} ({name})")
    return None


def _fail_rest(chosen: Sequence[Finding], failed: Finding, error: str,
               result: ApplyResult) -> None:
    after = False
    for finding in chosen:
        if after:
            result.failed.append((finding, error))
        after = after or finding is failed


class _MountGuard:
    """Refuses removing a snapshot whose directory is mounted or used by a live overlay
    mount: containerd's Cleanup would delete it under the mount."""

    def __init__(self, store: ContainerdStore) -> None:
        self.store = store
        self.index = SnapshotIndex.of(store)

    def check(self, call: ApiCall) -> None:
        if (call.service, call.method) != ("snapshots", "Remove"):
            return
        fields = dict(call.fields)
        key = (call.namespace, fields.get("snapshotter", ""), fields.get("key", ""))
        record = self.index.records.get(key)
        db = self.store.snapshotter_db(key[1])
        if record is None or db is None or not record.name:
            return
        backend = db.records.get(record.name)
        if backend is None or backend.id is None:
            return
        directory = db.snapshot_dir(backend.id)
        reason = fsops.mount_refusal(directory, [os.path.join(db.root, "snapshots")])
        if reason is not None:
            raise fsops.Refused(f"snapshot {key[2]} not removed: its directory {directory} "
                                f"{reason}")


