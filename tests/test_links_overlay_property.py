"""Property test with the kernel as the oracle.

Hypothesis generates small layer stacks (dirs, files, symlinks with relative, absolute and
``..`` targets, chains and loops, whiteouts, opaque dirs), writes them as overlayfs layer
directories (whiteouts as 0/0 character devices, opaque dirs with ``trusted.overlay.opaque=y``),
mounts them read-only with the real overlayfs, and compares:

- the merged tree the kernel shows with ``MergedView`` built from the same directories;
- for every visible symlink, what ``stat`` says inside a ``chroot`` of the mount (ok, ENOENT,
  ELOOP, ENOTDIR; for ok, the inode reached) with ``resolve``.

Needs root (mknod, trusted xattrs, mount, chroot); skips with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from crifs.check.links import Verdict, audit
from crifs.fs.listing import PLAIN_DIR, PLAIN_FILE, Entry, EntryKind, LayerListing
from crifs.fs.merged import MergedView
from crifs.fs.resolve import resolve
from crifs.oci.whiteout import OPAQUE_XATTRS, is_overlay_opaque, is_overlay_whiteout

NAMES = ("a", "b", "c")
UNIVERSE = (
    [n for n in NAMES] + [f"{p}/{n}" for p in NAMES for n in NAMES] + ["a/a/a", "a/b/c", "b/c/a"]
)
KINDS = ("dir", "file", "link", "wh", "opq")

_CHILD = r"""
import errno, json, os, sys
paths = [bytes.fromhex(h) for h in json.loads(sys.stdin.read())]
os.chroot(sys.argv[1])
os.chdir("/")
out = []
for path in paths:
    try:
        st = os.stat(path)
        out.append([None, st.st_ino])
    except OSError as err:
        out.append([errno.errorcode[err.errno], 0])
print(json.dumps(out))
"""


def _overlay_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (mknod, trusted.* xattrs, mount -t overlay, chroot)"
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "mount/umount not installed"
    probe = tempfile.mkdtemp(prefix="crifs-ovl-probe-")
    try:
        lower = [os.path.join(probe, name) for name in ("l0", "l1", "mnt")]
        for path in lower:
            os.mkdir(path)
        try:
            os.setxattr(lower[1], OPAQUE_XATTRS[0], b"y")
        except OSError as err:
            return f"trusted xattrs not supported under {probe}: {err}"
        done = subprocess.run(
            [
                "mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                f"lowerdir={lower[1]}:{lower[0]}",
                lower[2],
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            return f"overlayfs mount failed: {done.stderr.strip()}"
        subprocess.run(["umount", lower[2]], check=True)
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    return None


@pytest.fixture(scope="module")
def overlayfs() -> None:
    """Skips the module's tests, with the reason, when the kernel oracle cannot be used."""
    reason = _overlay_unavailable()
    if reason is not None:
        pytest.skip(f"overlay oracle: {reason}")


targets = st.builds(
    lambda lead, parts, trail: lead + "/".join(parts) + trail,
    st.sampled_from(["", "", "/", "./"]),
    st.lists(st.sampled_from([*NAMES, "..", "."]), min_size=1, max_size=4),
    st.sampled_from(["", "", "", "/"]),
)
entry_specs = st.one_of(
    st.sampled_from(["dir", "file", "wh", "opq"]), targets.map(lambda t: "->" + t)
)
layer_specs = st.dictionaries(st.sampled_from(UNIVERSE), entry_specs, max_size=9)
stacks = st.lists(layer_specs, min_size=2, max_size=4)


def consistent(spec: dict[str, str]) -> dict[str, str]:
    """Drop entries below a non-directory of the same layer; missing parents become dirs."""
    kept: dict[str, str] = {}
    for path in sorted(spec, key=lambda p: p.count("/")):
        parts = path.split("/")
        ancestors = ["/".join(parts[:i]) for i in range(1, len(parts))]
        if any(kept.get(a, "dir") not in ("dir", "opq") for a in ancestors):
            continue
        for ancestor in ancestors:
            kept.setdefault(ancestor, "dir")
        kept[path] = spec[path]
    return kept


def write_layer(root: str, spec: dict[str, str]) -> None:
    os.mkdir(root)
    for path in sorted(spec, key=lambda p: p.count("/")):
        what = spec[path]
        full = os.path.join(root, path)
        if what in ("dir", "opq"):
            os.mkdir(full)
            if what == "opq":
                os.setxattr(full, OPAQUE_XATTRS[0], b"y")
        elif what == "file":
            with open(full, "wb") as handle:
                handle.write(path.encode())
        elif what == "wh":
            os.mknod(full, stat.S_IFCHR | 0o600, os.makedev(0, 0))
        else:
            os.symlink(what[2:], full)


def read_layer(root: str, index: int) -> LayerListing:
    """A tiny overlay-dir reader for this test (the real one is crifs.fs.walk)."""
    listing = LayerListing(index, f"layer {index}")
    stack = [b""]
    base = os.fsencode(root)
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(base, rel) if rel else base) as it:
            for item in it:
                path = rel + b"/" + item.name if rel else item.name
                st_ = item.stat(follow_symlinks=False)
                if is_overlay_whiteout(st_):
                    listing.whiteouts.add(path)
                elif item.is_dir(follow_symlinks=False):
                    listing.entries[path] = PLAIN_DIR
                    xattrs = {}
                    for name in OPAQUE_XATTRS:
                        with contextlib.suppress(OSError):
                            xattrs[name] = os.getxattr(item.path, name, follow_symlinks=False)
                    if is_overlay_opaque(xattrs):
                        listing.opaque.add(path)
                    stack.append(path)
                elif item.is_symlink():
                    listing.entries[path] = Entry(EntryKind.SYMLINK, os.readlink(item.path))
                else:
                    listing.entries[path] = PLAIN_FILE
    return listing


def kernel_tree(mnt: str) -> dict[bytes, str]:
    tree: dict[bytes, str] = {}
    stack = [b""]
    base = os.fsencode(mnt)
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(base, rel) if rel else base) as it:
            for item in it:
                path = rel + b"/" + item.name if rel else item.name
                try:
                    # readdir of a directory only one layer has lists its whiteouts too;
                    # lookup is what resolution uses, and it says they do not exist
                    os.lstat(item.path)
                except FileNotFoundError:
                    continue
                if item.is_symlink():
                    tree[path] = "->" + os.fsdecode(os.readlink(item.path))
                elif item.is_dir(follow_symlinks=False):
                    tree[path] = "dir"
                    stack.append(path)
                else:
                    tree[path] = "file"
    return tree


def view_tree(view: MergedView) -> dict[bytes, str]:
    tree: dict[bytes, str] = {}
    for path, entry in view.items():
        if not path:
            continue
        if entry.kind is EntryKind.SYMLINK:
            tree[path] = "->" + os.fsdecode(entry.target)
        else:
            tree[path] = "dir" if entry.kind is EntryKind.DIR else "file"
    return tree


def kernel_stat_in_chroot(mnt: str, paths: list[bytes]) -> list[tuple[str | None, int]]:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, mnt],
        input=json.dumps([p.hex() for p in paths]),
        capture_output=True,
        text=True,
        check=True,
    )
    return [(code, ino) for code, ino in json.loads(done.stdout)]


@contextlib.contextmanager
def overlay_mount(layer_dirs: list[str], mnt: str) -> Iterator[None]:
    """Mount ``layer_dirs`` (bottom first) read-only at ``mnt``; always unmounted after."""
    lowers = ":".join(reversed(layer_dirs))
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lowers}", mnt],
        check=True,
        capture_output=True,
    )
    try:
        yield
    finally:
        subprocess.run(["umount", mnt], check=True)


def walk_reader() -> Callable[..., LayerListing] | None:
    """The sources helper's ``read_layer_dir`` when it exists, to cross-check it too."""
    try:
        module = importlib.import_module("crifs.fs.walk")
    except ImportError:
        return None
    reader: Callable[..., LayerListing] | None = getattr(module, "read_layer_dir", None)
    return reader


KERNEL_VERDICTS = {
    None: {Verdict.OK},
    "ELOOP": {Verdict.LOOP},
    "ENOTDIR": {Verdict.NOT_A_DIRECTORY},
    "ENOENT": {Verdict.BROKEN, Verdict.HIDDEN_BY_WHITEOUT, Verdict.HIDDEN_BY_OPAQUE},
}


@settings(
    max_examples=int(os.environ.get("CRIFS_OVERLAY_EXAMPLES", "80")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(stacks)
def test_merged_view_and_resolver_agree_with_overlayfs(
    overlayfs: None, specs: list[dict[str, str]]
) -> None:
    work = tempfile.mkdtemp(prefix="crifs-ovl-")
    mnt = os.path.join(work, "mnt")
    try:
        os.mkdir(mnt)
        layer_dirs = []
        for index, spec in enumerate(specs):
            layer_dir = os.path.join(work, f"l{index}")
            write_layer(layer_dir, consistent(spec))
            layer_dirs.append(layer_dir)
        listings = [read_layer(d, index) for index, d in enumerate(layer_dirs)]
        view = MergedView(listings)
        with overlay_mount(layer_dirs, mnt):
            assert view_tree(view) == kernel_tree(mnt)
            links = [path for path, _ in view.symlinks()]
            kernel = kernel_stat_in_chroot(mnt, [b"/" + path for path in links])
            for path, (code, ino) in zip(links, kernel, strict=True):
                event(f"kernel: {code or 'ok'}")
                res = resolve(view, b"/" + path)
                assert res.errno == code, (path, res, code)
                if code is None:
                    reached = os.path.join(os.fsencode(mnt), res.resolved[1:])
                    assert os.lstat(reached).st_ino == ino, (path, res)
        verdicts = audit(listings, host_root=None, runtime_paths=()).verdicts
        for item, (code, _) in zip(verdicts, kernel, strict=True):
            assert item.verdict in KERNEL_VERDICTS[code], (item, code)
        fixed = [item for item in verdicts if item.fix is not None]
        for item in fixed[:2]:
            event("fix checked by the kernel")
            assert fix_works_in_kernel(work, layer_dirs, item.fix or ""), item
        reader = walk_reader()
        if reader is not None:
            theirs = [reader(d, index=i, name=f"layer {i}") for i, d in enumerate(layer_dirs)]
            assert view_tree(MergedView(theirs)) == view_tree(view)
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["umount", mnt], check=False)
        shutil.rmtree(work, ignore_errors=True)


def fix_works_in_kernel(work: str, layer_dirs: list[str], fix: str) -> bool:
    """Apply an ``ln -sf NEW LINK`` fix as one more layer on top and ask the kernel."""
    words = shlex.split(fix)
    assert words[:2] == ["ln", "-sf"], fix
    new_target, link = words[-2], words[-1]
    top = tempfile.mkdtemp(prefix="fix-", dir=work)
    os.makedirs(os.path.join(top, os.path.dirname(link.lstrip("/"))), exist_ok=True)
    os.symlink(new_target, os.path.join(top, link.lstrip("/")))
    mnt = tempfile.mkdtemp(prefix="fixmnt-", dir=work)
    with overlay_mount([*layer_dirs, top], mnt):
        [(code, _)] = kernel_stat_in_chroot(mnt, [os.fsencode(link)])
    return code is None
