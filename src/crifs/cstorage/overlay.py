"""The overlay driver's side of a store: ``link``, ``lower``, ``lower-layers``, ``l/`` links and
the mount the driver builds for a layer.

Lower chain (what a layer stacks on, uppermost first):

- ``lower-layers`` (containers/storage >= 1.63): parent-first layer ids; the driver mounts
  ``<home>/<id>/diff``.
- else ``lower``: ``l/<link>`` entries, parent first. The driver (<= 1.59, podman 4.3.1's 1.43
  included) puts the **symlink path itself**, ``<home>/l/<link>``, into ``lowerdir``; we resolve
  each link only to know and check its layer: ``os.readlink`` and the ``../<id>/diff`` target
  taken apart in memory. An ``l/`` link is never followed with ``stat``/``open``.
- neither file: a base layer; an empty chain.

Mount options, as ``drivers/overlay/overlay.go get()`` builds them (checked against the kernel's
mountinfo for podman 4.3.1):

- RW: ``lowerdir=<lowers>,upperdir=<dir>/diff,workdir=<dir>/work``
- RO: ``lowerdir=<dir>/diff:<lowers>``
- ``<lowers>`` starts with the layer's own ``diff1..N`` dirs, then each lower followed by its
  ``<lower>/../diffN`` siblings; with no lowers at all it is ``<dir>/empty``.
- Then the option list: the caller's options (a container's ``MountOpts``, ``ro`` for an
  image mount) or else storage.conf's ``mountopt``; ``metacopy=on`` dropped when the driver
  found the kernel not using it; ``volatile`` when requested; SELinux ``context=``.
- When that string reaches the page size, the driver switches to paths relative to its home
  (``l/<link>`` lowers, ``<id>/diff``, ``<id>/work``) and mounts from inside the home;
  :func:`build_mount` then returns those relative options (``Mount.source`` stays ``overlay``;
  the paths are relative to the driver home).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass

from crifs.cstorage.paths import LINK_DIR, NON_LAYER_ENTRIES, StorePaths, is_safe_component
from crifs.errors import CorruptStore
from crifs.model import Mount

MAX_DEPTH = 500  # the driver refuses deeper lower chains ("max depth exceeded")
LOWER_LAYERS = "lower-layers"
L_LINKS = "l/ links"
_SMALL_FILE_LIMIT = 1 << 20


@dataclass(frozen=True, slots=True)
class Lower:
    """One entry of a layer's lower chain.

    ``mount_path`` is what the driver puts into ``lowerdir``; ``rel_path`` is the same relative
    to the driver home (used when options exceed a page); ``layer_id`` the layer it resolves
    to; ``layer_dir`` that layer's directory (which may be in an additional image store);
    ``link`` the ``l/`` symlink path for ``lower``-file chains, ``None`` for ``lower-layers``.
    """

    mount_path: str
    rel_path: str
    layer_id: str
    layer_dir: str
    link: str | None = None


@dataclass(frozen=True, slots=True)
class LinkEntry:
    """One entry of ``<home>/l``: its name, raw target (``None`` if it is not a symlink) and the
    layer id the target names when it has the driver's ``../<id>/diff`` shape."""

    name: str
    target: str | None
    layer_id: str | None


def read_small_file(path: str) -> str | None:
    """Text of a small driver file, ``None`` when it does not exist. Never follows a symlink in
    place of the file; anything else unreadable is ``CorruptStore`` naming the file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise CorruptStore(f"cannot read: {os.strerror(err.errno or 0)}", path=path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CorruptStore("is not a regular file", path=path)
        # Sized by fstat: a read into a limit-sized buffer costs ~0.8 ms per call.
        data = os.read(fd, min(st.st_size + 1, _SMALL_FILE_LIMIT))
    except OSError as err:
        raise CorruptStore(f"cannot read: {os.strerror(err.errno or 0)}", path=path) from None
    finally:
        os.close(fd)
    return os.fsdecode(data)


def read_link_name(paths: StorePaths, layer_id: str) -> str | None:
    """The layer's ``link`` file, whitespace stripped (the driver's repair strips ``\\n``)."""
    text = read_small_file(paths.layer_link_file(layer_id))
    return text.strip() if text is not None else None


def has_lower_layers(paths: StorePaths, layer_id: str) -> bool:
    return os.path.lexists(paths.layer_lower_layers_file(layer_id))


def lower_chain(paths: StorePaths, layer_id: str, additional_homes: Sequence[str] = ()
                ) -> list[Lower]:
    """The layer's lowers, uppermost first, resolved as the driver resolves them.

    Raises ``CorruptStore`` naming the file or link when an entry is malformed, an ``l/`` link
    is missing, is not a symlink or points somewhere else than ``../<id>/diff``, or a lower
    layer's directory is gone.
    """
    lower_layers = read_small_file(paths.layer_lower_layers_file(layer_id))
    if lower_layers is not None:
        ids = _split_entries(lower_layers)
        _check_depth(paths.layer_lower_layers_file(layer_id), ids)
        return [_lower_by_id(paths, lower_id, layer_id, additional_homes) for lower_id in ids]
    lower = read_small_file(paths.layer_lower_file(layer_id))
    if lower is None:
        return []
    entries = _split_entries(lower)
    _check_depth(paths.layer_lower_file(layer_id), entries)
    return [_lower_by_link(paths, entry, layer_id, additional_homes) for entry in entries]


def _split_entries(text: str) -> list[str]:
    # The driver writes no newline; tolerate one (and skip empty entries, as get() does).
    return [entry for entry in text.strip().split(":") if entry]


def _check_depth(path: str, entries: list[str]) -> None:
    if len(entries) > MAX_DEPTH:
        raise CorruptStore(
            f"{len(entries)} lower layers, more than the {MAX_DEPTH} the driver mounts",
            path=path,
        )


def _lower_by_id(paths: StorePaths, lower_id: str, layer_id: str,
                 additional_homes: Sequence[str]) -> Lower:
    source = paths.layer_lower_layers_file(layer_id)
    if not is_safe_component(lower_id):
        raise CorruptStore(f"entry {lower_id!r} is not a layer id", path=source)
    for home in (paths.home, *additional_homes):
        layer_dir = os.path.join(home, lower_id)
        if _is_real_dir(layer_dir):
            diff = os.path.join(layer_dir, "diff")
            return Lower(diff, os.path.join(lower_id, "diff"), lower_id, layer_dir)
    raise CorruptStore(f"lower layer {lower_id} has no directory {paths.layer_dir(lower_id)}",
                       path=source)


def _lower_by_link(paths: StorePaths, entry: str, layer_id: str,
                   additional_homes: Sequence[str]) -> Lower:
    source = paths.layer_lower_file(layer_id)
    prefix, _, name = entry.partition("/")
    if prefix != LINK_DIR or not is_safe_component(name):
        raise CorruptStore(f"entry {entry!r} is not of the form l/<link>", path=source)
    for home in (paths.home, *additional_homes):
        link_path = os.path.join(home, LINK_DIR, name)
        if os.path.lexists(link_path):
            target_id = resolve_link(link_path)
            layer_dir = os.path.join(home, target_id)
            if not _is_real_dir(layer_dir):
                raise CorruptStore(f"points to layer {target_id}, whose directory "
                                   f"{layer_dir} does not exist", path=link_path)
            return Lower(os.path.join(home, entry), entry, target_id, layer_dir, link_path)
    raise CorruptStore(
        f"missing, but layer {layer_id} lists it in {source} (the driver would try to "
        "recreate it from the layers' link files)",
        path=paths.link(name),
    )


def resolve_link(link_path: str) -> str:
    """The layer id an ``l/`` symlink names, read with ``readlink`` only.

    Raises ``CorruptStore`` naming the link when it is not a symlink or its target is not the
    driver's ``../<id>/diff``.
    """
    try:
        target = os.readlink(link_path)
    except FileNotFoundError:
        raise CorruptStore("missing", path=link_path) from None
    except OSError as err:
        what = "not a symlink" if err.errno == errno.EINVAL else os.strerror(err.errno or 0)
        raise CorruptStore(f"{what} (expected a symlink to ../<layer id>/diff)",
                           path=link_path) from None
    layer_id = link_target_layer(target)
    if layer_id is None:
        raise CorruptStore(f"points to {target!r}, not to ../<layer id>/diff", path=link_path)
    return layer_id


def link_target_layer(target: str) -> str | None:
    """``<id>`` when ``target`` is exactly ``../<id>/diff`` (the only shape the driver writes and
    the only one its repair keeps), else ``None``."""
    parts = target.split("/")
    if len(parts) == 3 and parts[0] == ".." and parts[2] == "diff" and is_safe_component(parts[1]):
        return parts[1]
    return None


def list_links(paths: StorePaths) -> list[LinkEntry]:
    """Every entry of ``<home>/l`` (sorted by name); ``[]`` when the directory is missing."""
    entries = []
    try:
        it = os.scandir(paths.link_dir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    with it:
        for entry in it:
            target = None
            if entry.is_symlink():
                try:
                    target = os.readlink(entry.path)
                except OSError:
                    target = None
            layer_id = link_target_layer(target) if target is not None else None
            entries.append(LinkEntry(entry.name, target, layer_id))
    entries.sort(key=lambda e: e.name)
    return entries


def list_layer_dirs(paths: StorePaths) -> list[str]:
    """Directory names in the driver home that count as layers (the driver's ListLayers)."""
    try:
        it = os.scandir(paths.home)
    except (FileNotFoundError, NotADirectoryError):
        return []
    with it:
        return sorted(e.name for e in it
                      if e.name not in NON_LAYER_ENTRIES and e.is_dir(follow_symlinks=False))


# -- options ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DriverSettings:
    """What decides the option list besides the layer: storage.conf and the driver's cached
    feature probes in ``<runroot>/overlay``. ``None`` for a probe means not recorded."""

    mountopt: str = ""
    mount_program: str = ""
    using_metacopy: bool | None = None
    supports_volatile: bool | None = None
    disable_volatile: bool = False
    selinux_enabled: bool = False


def read_driver_settings(paths: StorePaths, mountopt: str, mount_program: str,
                         disable_volatile: bool = False) -> DriverSettings:
    """Settings for ``paths`` from storage.conf values plus the runroot's probe cache."""
    return DriverSettings(
        mountopt=mountopt,
        mount_program=mount_program,
        using_metacopy=False if mount_program else
        _cached_feature(paths, f"metacopy({mountopt})"),
        supports_volatile=True if mount_program else _cached_feature(paths, "volatile"),
        disable_volatile=disable_volatile,
        selinux_enabled=os.path.isdir("/sys/fs/selinux") and
        os.path.exists("/sys/fs/selinux/enforce"),
    )


def _cached_feature(paths: StorePaths, feature: str) -> bool | None:
    if os.path.lexists(paths.feature_record(feature, True)):
        return True
    if os.path.lexists(paths.feature_record(feature, False)):
        return False
    return None


def option_list(settings: DriverSettings, requested: Sequence[str], volatile: bool = False
                ) -> list[str]:
    """The driver's ``optsList``: ``requested`` if any, else storage.conf's mountopt (which can
    hold an empty string, as Go's ``strings.Split("", ",")`` does: it only counts for length)."""
    global_opts = settings.mountopt.split(",")
    opts = list(requested) if requested else list(global_opts)
    if requested and "metacopy=on" in global_opts and "metacopy=on" not in opts \
            and settings.using_metacopy:
        opts.append("metacopy=on")
    if settings.using_metacopy is False:
        opts = [o for o in opts if o != "metacopy=on"]
    if volatile and not settings.disable_volatile and "volatile" not in opts \
            and settings.supports_volatile is not False:
        opts.append("volatile")
    return opts


def build_mount(paths: StorePaths, layer_id: str, lowers: Sequence[Lower], *,
                options: Sequence[str], mount_label: str = "",
                settings: DriverSettings | None = None) -> Mount:
    """The overlay mount the driver builds for ``layer_id`` on top of ``lowers``.

    ``options`` is the driver's option list (see :func:`option_list`); it containing ``ro``
    selects the read-only form. Raises ``CorruptStore`` when even the relative form would not
    fit in a page (the driver fails that mount).
    """
    settings = settings or DriverSettings()
    read_only = "ro" in options
    layer_dir = paths.layer_dir(layer_id)
    abs_lowers, rel_lowers = _lowerdirs(paths, layer_id, lowers)
    diff, work = os.path.join(layer_dir, "diff"), os.path.join(layer_dir, "work")
    extra = list(options)
    if mount_label and settings.selinux_enabled:
        extra.append(f'context="{mount_label}"')

    data = _option_data(read_only, abs_lowers, diff, diff, work)
    mount_type, source = "overlay", "overlay"
    if settings.mount_program:
        mount_type = "fuse." + os.path.basename(settings.mount_program)
        source = os.path.basename(settings.mount_program)
    elif len(",".join(data + extra)) >= os.sysconf("SC_PAGE_SIZE"):
        # The driver's mountFrom fallback: paths relative to its home, except the RO upper.
        data = _option_data(read_only, rel_lowers, diff, os.path.join(layer_id, "diff"),
                            os.path.join(layer_id, "work"))
        if len(",".join(data + extra)) >= os.sysconf("SC_PAGE_SIZE"):
            raise CorruptStore(
                f"mount options for layer {layer_id} exceed the page size even with relative "
                "paths; the driver cannot mount it",
                path=paths.layer_lower_file(layer_id),
            )
    return Mount(type=mount_type, source=source,
                 options=tuple(o for o in data + extra if o != ""))


def _option_data(read_only: bool, lowers: list[str], ro_upper: str, upper: str, work: str
                 ) -> list[str]:
    if read_only:
        return [f"lowerdir={ro_upper}:{':'.join(lowers)}"]
    return [f"lowerdir={':'.join(lowers)}", f"upperdir={upper}", f"workdir={work}"]


def _lowerdirs(paths: StorePaths, layer_id: str, lowers: Sequence[Lower]
               ) -> tuple[list[str], list[str]]:
    """(absolute, home-relative) lowerdir lists, ``diffN`` extras included."""
    abs_lowers: list[str] = []
    rel_lowers: list[str] = []
    own_link = None
    number = 1
    while _is_real_dir(paths.layer_extra_diff(layer_id, number)):
        if own_link is None:
            own_link = read_link_name(paths, layer_id) or ""
        abs_lowers.append(paths.layer_extra_diff(layer_id, number))
        rel_lowers.append(f"{LINK_DIR}/{own_link}/../diff{number}")
        number += 1
    for lower in lowers:
        abs_lowers.append(lower.mount_path)
        rel_lowers.append(lower.rel_path)
        number = 1
        # Checked on the real layer dir: the link is never followed.
        while _is_real_dir(os.path.join(lower.layer_dir, f"diff{number}")):
            # Not cleaned, like the driver's dumbJoin: ".." is resolved by the kernel.
            abs_lowers.append(f"{lower.mount_path}/../diff{number}")
            rel_lowers.append(f"{lower.rel_path}/../diff{number}")
            number += 1
    if not abs_lowers:
        abs_lowers.append(paths.layer_empty(layer_id))
        rel_lowers.append(os.path.join(layer_id, "empty"))
    return abs_lowers, rel_lowers


def _is_real_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False
