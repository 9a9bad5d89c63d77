"""R1-R3: the storage roots themselves (both runtimes).

- **R1** a root (containerd ``root``/``state``/snapshotter roots; c/storage graphroot/runroot)
  behind a symlink that is relative or dangling, or whose directory has another owner than
  the store's own metadata file or a mode wider than the runtime creates. For c/storage any
  symlink in the graphroot's path is an error: the driver builds ``…/overlay/<id>/merged`` from
  the path as given and runc refuses a rootfs whose path is not its own realpath ("… is not an
  absolute path or is a symlink", containers/storage#165).
- **R2** a driver root on a filesystem the overlay driver cannot use: overlayfs, aufs or
  ecryptfs (overlay on overlay), a network or FUSE filesystem (the kernel refuses a remote
  upper dir), a filesystem without ``d_type`` (xfs ``ftype=0``), or c/storage's own cached
  probe saying overlay does not work there (``<runroot>/overlay/overlay-false``).
- **R3** configured paths that disagree with the disk: containerd ``config.toml`` ``root``/
  ``state``/``root_path`` versus the opened ones, storage.conf ``graphroot``/``runroot``
  versus the opened ones, and the paths podman recorded in its libpod database (podman refuses
  to start with "database configuration mismatch" when they differ).

Modes the runtimes create, confirmed in their sources: containerd ``CreateTopLevelDirectories``
makes ``root`` and ``state`` 0711 (v1.6.20 ``services/server/server.go``); the fix for
CVE-2024-25621 (containerd 910171e "Fix directory permissions", in 2.2 and backported, e.g.
Debian's 1.6.20~ds1-1+deb12u2) creates and chmods ``root`` to 0700 at every start, so 0711 is
the widest accepted. The overlayfs and native snapshotters ``MkdirAll(root, 0700)`` and
``snapshots/`` 0700. containers/storage ``GetStore`` makes graphroot and runroot 0700 (v1.43
``store.go``); 0711 is accepted, as user-namespaced setups need it traversable. Extra bits
are an error when others can write, a warning when they open the way to the layers (the root
and the directory below it both traversable), else info. Owner: the root must belong to
whoever owns the store's metadata file (``meta.db``, ``layers.json``): root for a rootful
store, the user for a rootless one.

Read-only and cheap: a few ``lstat``/``stat`` calls per root, ``/proc/self/mountinfo``, one
``readdir`` of a few entries for ``d_type``, and the libpod database's config bucket or row.
Repairs are commands and advice only: crifs never moves, re-links or re-owns a store root.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import stat
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from crifs.containerd import schema
from crifs.errors import CrifsError
from crifs.fs.dtype import records_d_type
from crifs.fs.mounts import fs_type
from crifs.fs.usage import Meter
from crifs.fsck.catalogue import severity_of
from crifs.fsck.findings import CheckOptions, Finding, Repair, Severity, reclaimable_of
from crifs.model import CONTAINERD, CSTORAGE, Store

if TYPE_CHECKING:
    from crifs.containerd.store import ContainerdStore
    from crifs.cstorage.store import CStorageStore

CONTAINERD_ROOT_MODE = 0o711
CONTAINERD_STATE_MODE = 0o711
SNAPSHOTTER_ROOT_MODE = 0o700
CSTORAGE_ROOT_MODE = 0o711

# Filesystems overlayfs refuses as upper dir: stacked ones (c/storage refuses them up front:
# "'overlay' is not supported over overlayfs"; kernel 6.1: "filesystem on … not supported as
# upperdir") and network/FUSE ones, whose dentries revalidate or which lack the xattrs and
# whiteouts overlay needs (kernel 6.1 on fuse-overlayfs: "upper fs missing required features").
STACKED_FS = frozenset({"overlay", "aufs", "ecryptfs"})
REMOTE_FS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "afs", "lustre",
    "gpfs", "vboxsf", "virtiofs", "ocfs2", "panfs", "ncpfs", "fuse", "fuseblk",
})
LIBPOD_DIR = "libpod"
LIBPOD_BOLT = "bolt_state.db"  # podman < 5 default
LIBPOD_SQLITE = "db.sql"  # podman >= 4.8 with database_backend = "sqlite"


def findings(store: Store, opts: CheckOptions, meter: Meter) -> list[Finding]:
    """R1, R2 and R3 findings of a ``ContainerdStore`` or a ``CStorageStore``."""
    # By runtime name, not isinstance: checking one runtime's store must not import the other.
    if store.runtime == CONTAINERD:
        return _containerd(cast("ContainerdStore", store), opts, meter)
    if store.runtime == CSTORAGE:
        return _cstorage(cast("CStorageStore", store))
    return []


# -- the roots of each runtime ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Root:
    """One directory the runtime keeps state in, and what the runtime makes of it."""

    label: str
    path: str
    max_mode: int
    symlink_is_error: bool = False  # c/storage graphroot: runc refuses symlinked rootfs paths
    # The directory below that, with this root, keeps other users away from the layers
    # (both are created 0700): a snapshotter's snapshots/, c/storage's overlay/ home.
    inner: str | None = None


def _containerd(store: ContainerdStore, opts: CheckOptions, meter: Meter) -> list[Finding]:
    roots = [_Root("containerd root", str(store.root), CONTAINERD_ROOT_MODE)]
    if store.state is not None:
        roots.append(_Root("containerd state dir", str(store.state), CONTAINERD_STATE_MODE))
    for name in store.snapshotter_names:
        db = store.snapshotter_db(name)
        if db is not None:
            roots.append(_Root(f"{name} snapshotter root", db.root, SNAPSHOTTER_ROOT_MODE,
                               inner=os.path.join(db.root, "snapshots")))
    found = _r1(store.runtime, roots, store.meta_db_path)
    overlay = store.snapshotter_db(schema.OVERLAYFS)
    if overlay is not None:
        found += _r2(store.runtime, f"{schema.OVERLAYFS} snapshotter root", overlay.root)
    return found + _r3_containerd(store, opts, meter)


def _cstorage(store: CStorageStore) -> list[Finding]:
    paths = store.paths
    roots = [
        _Root("graphroot", paths.graphroot, CSTORAGE_ROOT_MODE, symlink_is_error=True,
              inner=paths.home),
        _Root("runroot", paths.runroot, CSTORAGE_ROOT_MODE),
    ]
    found = _r1(store.runtime, roots, paths.layers_json, paths.storage_lock)
    home = paths.home
    if os.path.islink(home):
        found.append(_symlinked_home(store.runtime, home))
    mount_program = store.driver_settings.mount_program or os.path.exists(
        paths.has_mount_program)
    if not mount_program:
        driver_root = home if os.path.isdir(home) else paths.graphroot
        record = paths.feature_record("overlay", supported=False)
        found += _r2(store.runtime, "overlay driver home", driver_root,
                     record if os.path.isfile(record) else None)
    return found + _r3_cstorage(store)


# -- R1 ---------------------------------------------------------------------------------------


@dataclass
class _Problems:
    """What is wrong with one path: sentences, the worst severity, the fixing commands."""

    texts: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)
    severity: Severity = Severity.INFO

    def add(self, kind: str, severity: Severity, text: str, *commands: str,
            advice: str = "") -> None:
        self.kinds.append(kind)
        self.texts.append(text)
        self.commands.extend(c for c in commands if c not in self.commands)
        if advice:
            self.advice.append(advice)
        if _RANK[severity] < _RANK[self.severity]:
            self.severity = severity


_RANK = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.INFO: 2}


def _r1(runtime: str, roots: Sequence[_Root], *metadata_files: str) -> list[Finding]:
    """R1 for each root; the owner expected is that of the first metadata file that exists."""
    ref: os.stat_result | None = None
    metadata_file = metadata_files[0]
    for candidate in metadata_files:
        try:
            ref = os.stat(candidate)
        except OSError:
            continue
        metadata_file = candidate
        break
    out: list[Finding] = []
    for root in roots:
        finding = _root_finding(runtime, root, ref, metadata_file)
        if finding is not None:
            out.append(finding)
    return out


def _root_finding(runtime: str, root: _Root, ref: os.stat_result | None,
                  metadata_file: str) -> Finding | None:
    path = root.path
    problems = _Problems()
    evidence: dict[str, object] = {"root": root.label}
    links = _symlinks_in(path)
    if not root.symlink_is_error:
        # Only the root's own name (and a dangling link above it) matters here: the kernel
        # resolves any absolute link in the mount options the runtime builds.
        links = [(link, target) for link, target in links
                 if link == path or not os.path.exists(link)]
    for link, target in links:
        _symlink_problems(problems, root, link, target)
    if links:
        evidence["symlinks"] = [{"path": link, "target": target} for link, target in links]
    try:
        st = os.stat(path)
    except OSError:
        st = None  # absent (a state dir after a reboot) or dangling: reported above if so
    if st is not None and stat.S_ISDIR(st.st_mode):
        resolved = os.path.realpath(path)
        mode = stat.S_IMODE(st.st_mode)
        # Name the directory only when it is not the root's own path (a symlink's target).
        subject = "it" if resolved == os.path.normpath(path) else resolved
        evidence.update(resolved=resolved, uid=st.st_uid, mode=f"{mode:04o}")
        if ref is not None and st.st_uid != ref.st_uid:
            evidence.update(expected_uid=ref.st_uid, metadata_file=metadata_file)
            problems.add(
                "owner", Severity.ERROR,
                f"{subject} is owned by uid {st.st_uid} but the store's "
                f"{os.path.basename(metadata_file)} by uid {ref.st_uid}, so that user can "
                "change what the runtime serves from it",
                f"chown {ref.st_uid}:{ref.st_gid} {_q(resolved)}",
                advice=f"give {resolved} back to uid {ref.st_uid}, the store's owner")
        wider = mode & 0o777 & ~root.max_mode
        if wider:
            evidence["max_mode"] = f"{root.max_mode:04o}"
            severity, why = _widening(mode, wider, root)
            problems.add(
                "mode", severity,
                f"{subject} has mode {mode:04o}, wider than the {root.max_mode:04o} the "
                f"runtime creates ({why})",
                f"chmod {root.max_mode:04o} {_q(resolved)}",
                advice=f"tighten {resolved} to mode {root.max_mode:04o}")
    if not problems.kinds:
        return None
    evidence["problems"] = problems.kinds
    summary = "; ".join(problems.advice)
    return Finding(
        code="R1", severity=problems.severity, runtime=runtime, object=path,
        message=f"{root.label} {path}: " + "; ".join(problems.texts),
        path=path, repair=Repair(summary=summary, commands=tuple(problems.commands)),
        evidence=evidence,
    )


def _widening(mode: int, wider: int, root: _Root) -> tuple[Severity, str]:
    """How bad extra mode bits on a root are: writable by others is an error; a way for other
    users into the layers is a warning (setuid programs of image layers become theirs to run,
    as in moby's CVE-2021-41091); a listing they may read is only worth knowing."""
    if wider & 0o022:
        return Severity.ERROR, "other users can write to it"
    if root.inner is not None and mode & stat.S_IXOTH and _others_traverse(root.inner):
        return Severity.WARNING, (f"with {root.inner} open too, other users can walk into the "
                                  "layers and run the setuid programs images carry")
    return Severity.INFO, "other users can list it, but not reach the layers through it"


def _others_traverse(directory: str) -> bool:
    try:
        return bool(os.stat(directory).st_mode & stat.S_IXOTH)
    except OSError:
        return False


def _symlink_problems(problems: _Problems, root: _Root, link: str, target: str) -> None:
    resolved = os.path.realpath(link)
    if not os.path.exists(link):
        problems.add(
            "dangling", severity_of("R1"),
            f"{link} is a symlink to {target}, which does not exist",
            advice=f"mount the filesystem that holds {target}, or point {link} at the real "
                   f"store with `ln -sfn /absolute/store/path {link}`")
        return
    if root.symlink_is_error:
        problems.add(
            "symlink", severity_of("R1"),
            f"{link} is a symlink to {target}, and runc refuses a container rootfs whose "
            "path is not its realpath (\"…/merged is not an absolute path or is a symlink\", "
            "containers/storage#165)",
            *(_bind_mount_commands(link, resolved) if link == root.path else ()),
            advice=f"use the real path {os.path.realpath(root.path)} as graphroot "
                   "(storage.conf graphroot or --root), or replace the symlink with a bind "
                   "mount")
    elif not os.path.isabs(target):
        problems.add(
            "relative", Severity.WARNING,
            f"{link} is a relative symlink ({target}), which resolves differently once its "
            "parent directory is bind-mounted or seen from a chroot",
            f"ln -sfn {_q(resolved)} {_q(link)}",
            advice=f"make {link} an absolute symlink to {resolved}")


def _bind_mount_commands(link: str, resolved: str) -> tuple[str, ...]:
    def field(path: str) -> str:  # fstab writes a space in a path as \040
        return path.replace(" ", "\\040")

    fstab = f"{field(resolved)} {field(link)} none bind 0 0"
    return (f"rm {_q(link)}", f"mkdir -m 0700 {_q(link)}",
            f"mount --bind {_q(resolved)} {_q(link)}", f"echo {_q(fstab)} >> /etc/fstab")


def _symlinked_home(runtime: str, home: str) -> Finding:
    target = _readlink(home) or "?"
    return Finding(
        code="R1", severity=severity_of("R1"), runtime=runtime, object=home,
        message=f"overlay driver home {home} is a symlink to {target}: layer mount paths "
                "then contain a symlink, which runc refuses (containers/storage#165)",
        path=home,
        repair=Repair(summary=f"replace the symlink with a bind mount of {target}",
                      commands=_bind_mount_commands(home, os.path.realpath(home))),
        evidence={"root": "overlay driver home", "symlinks": [{"path": home,
                                                               "target": target}],
                  "problems": ["symlink"]},
    )


def _symlinks_in(path: str) -> list[tuple[str, str]]:
    """``(component, link text)`` for every symlink among the components of ``path``."""
    out: list[tuple[str, str]] = []
    current = "/"
    for part in os.path.normpath(path).split("/"):
        if not part:
            continue
        current = os.path.join(current, part)
        try:
            mode = os.lstat(current).st_mode
        except OSError:
            break
        if stat.S_ISLNK(mode):
            out.append((current, _readlink(current) or "?"))
    return out


def _q(path: str) -> str:
    """``path`` quoted for a shell command line."""
    return shlex.quote(path)


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


# -- R2 ---------------------------------------------------------------------------------------


def _r2(runtime: str, label: str, driver_root: str, failed_probe: str | None = None
        ) -> list[Finding]:
    """R2 for one driver root; ``failed_probe`` is c/storage's cached ``overlay-false``."""
    resolved = os.path.realpath(driver_root)
    if not os.path.isdir(resolved):
        return []
    problems = _Problems()
    fstype = fs_type(resolved)
    evidence: dict[str, object] = {"root": label, "resolved": resolved, "fs_type": fstype}
    advice = (f"put {driver_root} on a local filesystem with d_type (ext4, xfs with ftype=1, "
              "btrfs), e.g. a volume mounted there")
    if fstype in STACKED_FS:
        problems.add("stacked", Severity.ERROR,
                     f"it is on {fstype}, and overlayfs cannot use an {fstype} directory as "
                     "its upper dir (overlay on overlay: the mounts fail)", advice=advice)
    elif fstype is not None and (fstype in REMOTE_FS or fstype.startswith("fuse.")):
        problems.add("remote", Severity.ERROR,
                     f"it is on {fstype}, which overlayfs refuses as upper dir "
                     "(\"not supported as upperdir\")", advice=advice)
    d_type = records_d_type(resolved)
    evidence["d_type"] = d_type
    if d_type is False:
        problems.add("no_d_type", Severity.ERROR,
                     f"its filesystem{f' ({fstype})' if fstype else ''} does not record d_type "
                     "(xfs formatted with ftype=0), which overlay needs for whiteouts",
                     f"xfs_info {_q(resolved)} | grep ftype", advice=advice)
    if failed_probe is not None:
        reason = _read_probe(failed_probe)
        evidence["driver_probe"] = reason
        problems.add("probe", Severity.ERROR,
                     "the driver's own probe recorded that overlay does not work there"
                     + (f" ({reason})" if reason else ""),
                     f"rm {_q(failed_probe)}",
                     advice="fix the cause, then remove the cached probe result so the "
                            "driver probes again")
    if not problems.kinds:
        return []
    evidence["problems"] = problems.kinds
    return [Finding(
        code="R2", severity=problems.severity, runtime=runtime, object=driver_root,
        message=f"{label} {driver_root}: " + "; ".join(problems.texts),
        path=driver_root,
        repair=Repair(summary="; ".join(dict.fromkeys(problems.advice)),
                      commands=tuple(problems.commands)),
        evidence=evidence,
    )]


def _read_probe(record: str) -> str:
    """The reason c/storage cached with a failed overlay probe (may be empty)."""
    try:
        with open(record, "rb") as f:
            return f.read(4096).decode("utf-8", "replace").strip()
    except OSError:
        return ""


# -- R3 ---------------------------------------------------------------------------------------


def _same(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _r3(runtime: str, obj: str, message: str, summary: str, evidence: dict[str, object],
        severity: Severity | None = None, path: str | None = None,
        commands: tuple[str, ...] = ()) -> Finding:
    return Finding(code="R3", severity=severity or severity_of("R3"), runtime=runtime,
                   object=obj, message=message, path=path or obj,
                   repair=Repair(summary=summary, commands=commands), evidence=evidence)


def _r3_containerd(store: ContainerdStore, opts: CheckOptions, meter: Meter) -> list[Finding]:
    cfg = store.config
    if cfg.path is None:
        return []  # no configuration applies to this root (crifs ignored the host's)
    out: list[Finding] = []
    root = str(store.root)
    if not _same(cfg.root, root):
        has_meta = os.path.isfile(os.path.join(cfg.root, schema.METADATA_PLUGIN_DIR,
                                               schema.META_DB))
        consequence = ("a containerd started with it uses that other store" if has_meta else
                       "it holds no meta.db, so a containerd started with it starts empty")
        out.append(_r3(
            store.runtime, cfg.root,
            f"{cfg.path} sets root = {cfg.root}, but this store is {root}: {consequence}",
            f"set root = \"{root}\" in {cfg.path}, or run containerd with --root {root}",
            {"config": cfg.path, "key": "root", "configured": cfg.root, "opened": root,
             "configured_has_meta_db": has_meta}))
    if store.state is not None and not _same(cfg.state, str(store.state)):
        out.append(_r3(
            store.runtime, cfg.state,
            f"{cfg.path} sets state = {cfg.state}, but this store was opened with state "
            f"{store.state}: live mounts and tasks are looked for in the wrong place",
            f"open the store with --state {cfg.state}, or set state in {cfg.path}",
            {"config": cfg.path, "key": "state", "configured": cfg.state,
             "opened": str(store.state)}))
    for name, configured in sorted(cfg.snapshotter_root_paths.items()):
        default = os.path.join(root, schema.snapshotter_dir(name))
        if _same(configured, default):
            continue
        configured_db = os.path.isfile(os.path.join(configured, schema.SNAPSHOTTER_DB))
        default_db = os.path.isfile(os.path.join(default, schema.SNAPSHOTTER_DB))
        evidence: dict[str, object] = {
            "config": cfg.path, "key": f"{name}.root_path", "configured": configured,
            "default": default, "configured_has_metadata_db": configured_db,
            "default_has_metadata_db": default_db}
        if default_db and not configured_db:
            out.append(_r3(
                store.runtime, configured,
                f"{cfg.path} sets the {name} snapshotter's root_path = {configured}, which "
                f"holds no metadata.db, while {default} does: the snapshots there are "
                "invisible to containerd",
                f"remove root_path from {cfg.path}, or move {default} to {configured} with "
                "containerd stopped", evidence))
        elif default_db:
            finding = _r3(
                store.runtime, default,
                f"{default} still holds a {name} snapshotter database, but {cfg.path} moved "
                f"the snapshotter to {configured}: nothing uses the old directory",
                f"after checking that no containerd runs with the old settings, remove "
                f"{default}", evidence, path=default)
            if opts.measure:
                # An abandoned tree: measuring it walks only what nothing references.
                usage = reclaimable_of(meter.measure(default))
                finding = dataclasses.replace(finding, reclaimable=usage)
            out.append(finding)
    return out


def _r3_cstorage(store: CStorageStore) -> list[Finding]:
    cfg = store.config
    paths = store.paths
    out: list[Finding] = []
    if cfg.path is not None:
        same_graphroot = _same(cfg.graphroot, paths.graphroot)
        configured_is_store = os.path.isfile(os.path.join(
            cfg.graphroot, f"{paths.driver}-layers", "layers.json"))
        if not same_graphroot and not configured_is_store:
            out.append(_r3(
                store.runtime, cfg.graphroot,
                f"{cfg.path} sets graphroot = {cfg.graphroot}, which holds no store, while the "
                f"store is at {paths.graphroot}: CRI-O and podman without --root see an "
                "empty store",
                f"set graphroot = \"{paths.graphroot}\" in {cfg.path}",
                {"config": cfg.path, "key": "graphroot", "configured": cfg.graphroot,
                 "opened": paths.graphroot}))
        if same_graphroot and not _same(cfg.runroot, paths.runroot):
            out.append(_r3(
                store.runtime, cfg.runroot,
                f"{cfg.path} sets runroot = {cfg.runroot}, but this store was opened with "
                f"runroot {paths.runroot}: mount counts and container run dirs are in "
                f"{cfg.runroot}",
                f"open the store with --runroot {cfg.runroot}, or set runroot in {cfg.path}",
                {"config": cfg.path, "key": "runroot", "configured": cfg.runroot,
                 "opened": paths.runroot}))
    libpod = _libpod_mismatch(store)
    if libpod is not None:
        out.append(libpod)
    return out


def _libpod_mismatch(store: CStorageStore) -> Finding | None:
    """podman's database records the paths it was created with and refuses to start when
    they differ ("database configuration mismatch"); compare them with the opened store."""
    static_dir = os.path.join(store.paths.graphroot, LIBPOD_DIR)
    recorded: dict[str, str] | None = None
    db_path = ""
    for name, reader in ((LIBPOD_BOLT, _bolt_paths), (LIBPOD_SQLITE, _sqlite_paths)):
        db_path = os.path.join(static_dir, name)
        if os.path.isfile(db_path):
            recorded = reader(db_path)
            break
    if not recorded:
        return None
    opened = {"graph_root": store.paths.graphroot, "run_root": store.paths.runroot,
              "static_dir": static_dir}
    differ = {key: (recorded[key], opened[key]) for key in opened
              if recorded.get(key) and not _same(recorded[key], opened[key])}
    if not differ:
        return None
    what = ", ".join(f"{key.replace('_', '-')} {was} (this store: {now})"
                     for key, (was, now) in differ.items())
    return _r3(
        store.runtime, db_path,
        f"podman's database records {what}: podman refuses this store with "
        "\"database configuration mismatch\" (the store was moved or is opened with other "
        "paths)",
        "run podman with the recorded --root/--runroot, or move the store back (a bind "
        "mount of the store at the recorded path also works)",
        {"database": db_path, "recorded": recorded, "opened": opened,
         "mismatched": sorted(differ)},
        severity=Severity.ERROR, path=db_path)


def _bolt_paths(db_path: str) -> dict[str, str] | None:
    from crifs.containerd.bolt import Bucket, open_bolt  # podman's libpod state is bbolt too

    try:
        db = open_bolt(db_path)
    except CrifsError:
        return None
    config = db.root.bucket(b"runtime-config")
    if not isinstance(config, Bucket):
        return None
    values = config.text_values()
    return {"graph_root": values.get("graph-root", ""), "run_root": values.get("run-root", ""),
            "static_dir": values.get("static-dir", "")}


def _sqlite_paths(db_path: str) -> dict[str, str] | None:
    import sqlite3  # only for a podman whose libpod state is sqlite

    # immutable=1: no lock, no -shm/-wal files created next to podman's database.
    uri = f"file:{urllib.parse.quote(os.path.abspath(db_path))}?mode=ro&immutable=1"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
            row = conn.execute(
                "SELECT GraphRoot, RunRoot, StaticDir FROM DBConfig LIMIT 1").fetchone()
    except sqlite3.Error:
        return None
    if row is None:
        return None
    return {"graph_root": str(row[0] or ""), "run_root": str(row[1] or ""),
            "static_dir": str(row[2] or "")}
