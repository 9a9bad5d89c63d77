"""The in-root resolver: chroot semantics and Linux's limits, checked against the host kernel
where a case can be built in a temp dir without leaving it."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crifs.fs.listing import PLAIN_DIR, PLAIN_FILE, Entry, EntryKind, LayerListing
from crifs.fs.merged import MergedView
from crifs.fs.resolve import MAX_HOPS, LinkResolver, reached_paths, resolve, resolve_link


def view_of(spec: dict[bytes, bytes]) -> MergedView:
    """A one-layer view from ``{path: "dir" | "file" | "->TARGET" | "=>HARDLINK_TARGET"}``."""
    entries: dict[bytes, Entry] = {}
    for path, what in spec.items():
        if what == b"dir":
            entries[path] = PLAIN_DIR
        elif what == b"file":
            entries[path] = PLAIN_FILE
        elif what.startswith(b"->"):
            entries[path] = Entry(EntryKind.SYMLINK, what[2:])
        elif what.startswith(b"=>"):
            entries[path] = Entry(EntryKind.HARDLINK, what[2:])
    return MergedView([LayerListing(0, "layer 0", entries)])


def chain(length: int) -> dict[bytes, bytes]:
    """l0 -> l1 -> ... -> l{length-1} -> end: resolving l0 follows ``length`` links."""
    spec = {b"l%d" % i: b"->l%d" % (i + 1) for i in range(length - 1)}
    spec[b"l%d" % (length - 1)] = b"->end"
    spec[b"end"] = b"file"
    return spec


def kernel_errno(root: Path, path: str) -> str | None:
    try:
        os.stat(root / path)
    except OSError as err:
        return errno.errorcode[err.errno or 0]
    return None


def build(root: Path, spec: dict[bytes, bytes]) -> None:
    for raw, what in sorted(spec.items()):
        path = os.path.join(os.fsencode(root), raw)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if what == b"dir":
            os.makedirs(path, exist_ok=True)
        elif what == b"file":
            open(path, "wb").close()
        else:
            os.symlink(what[2:], path)


@pytest.mark.parametrize(("length", "expected"), [(MAX_HOPS, None), (MAX_HOPS + 1, "ELOOP")])
def test_forty_links_resolve_the_41st_fails_like_the_kernel(
    tmp_path: Path, length: int, expected: str | None
) -> None:
    spec = chain(length)
    res = resolve(view_of(spec), b"/l0")
    assert res.errno == expected
    build(tmp_path, spec)
    assert kernel_errno(tmp_path, "l0") == expected
    if expected is None:
        assert res.hops == MAX_HOPS and res.resolved == b"/end"


def test_hops_count_intermediate_links_too(tmp_path: Path) -> None:
    # 20 links to reach a directory, then 21 more in the final name: 41 in all
    spec = chain(21)
    spec.update({b"d%d" % i: b"->d%d" % (i + 1) for i in range(19)})
    spec[b"d19"] = b"->dir"
    spec[b"dir"] = b"dir"
    spec[b"dir/x"] = b"->../l0"
    res = resolve(view_of(spec), b"/d0/x")
    build(tmp_path, spec)
    assert res.errno == kernel_errno(tmp_path, "d0/x") == "ELOOP"


@pytest.mark.parametrize(
    "spec",
    [
        {b"a": b"->b", b"b": b"->a"},
        {b"a": b"->a"},
        {b"a": b"->a/x"},
        {b"a": b"->./b/", b"b": b"->/a"},
        {b"a": b"->d/../a", b"d": b"dir"},
    ],
)
def test_loops_give_eloop(tmp_path: Path, spec: dict[bytes, bytes]) -> None:
    assert resolve(view_of(spec), b"/a").errno == "ELOOP"
    relative = {path: what.replace(b"->/", b"->") for path, what in spec.items()}
    build(tmp_path, relative)
    assert kernel_errno(tmp_path, "a") == "ELOOP"


def test_dotdot_clamps_at_root() -> None:
    view = view_of({b"etc": b"dir", b"etc/f": b"file", b"d": b"dir", b"d/l": b"->../../../etc/f"})
    res = resolve(view, b"/d/l")
    assert res.ok and res.resolved == b"/etc/f"
    assert resolve(view, b"/../../etc/f").resolved == b"/etc/f"


def test_absolute_target_restarts_at_rootfs_root() -> None:
    view = view_of(
        {
            b"etc": b"dir",
            b"etc/f": b"file",
            b"a": b"dir",
            b"a/b": b"dir",
            b"a/b/l": b"->/etc/f",
            b"a/b/etc": b"dir",
        }
    )
    res = resolve(view, b"/a/b/l")
    assert res.ok and res.resolved == b"/etc/f" and res.hops == 1


def test_dotdot_after_a_symlinked_directory_goes_to_the_physical_parent(tmp_path: Path) -> None:
    spec = {
        b"a": b"dir",
        b"a/b": b"dir",
        b"a/b/c": b"dir",
        b"a/b/x": b"file",
        b"l": b"->a/b/c",
        b"q": b"->l/../x",
    }
    view = view_of(spec)
    res = resolve(view, b"/q")
    assert res.ok and res.resolved == b"/a/b/x"
    build(tmp_path, spec)
    assert kernel_errno(tmp_path, "q") is None


def test_enotdir_for_a_file_in_the_middle_and_before_a_trailing_slash(tmp_path: Path) -> None:
    spec = {
        b"f": b"file",
        b"mid": b"->f/x",
        b"slash": b"->f/",
        b"dot": b"->f/.",
        b"up": b"->f/..",
        b"d": b"dir",
        b"dslash": b"->d/",
    }
    view = view_of(spec)
    build(tmp_path, spec)
    for name in (b"mid", b"slash", b"dot", b"up"):
        res = resolve(view, b"/" + name)
        assert res.errno == "ENOTDIR", name
        assert res.missing == b"/f", name
        assert kernel_errno(tmp_path, name.decode()) == "ENOTDIR", name
    assert resolve(view, b"/dslash").ok
    assert resolve(view, b"/f/").errno == "ENOTDIR"


def test_trailing_slash_follows_a_final_symlink_even_without_follow_final() -> None:
    view = view_of({b"d": b"dir", b"l": b"->d", b"f": b"file", b"lf": b"->f"})
    assert resolve(view, b"/l", follow_final=False).resolved == b"/l"
    assert resolve(view, b"/l/", follow_final=False).resolved == b"/d"
    assert resolve(view, b"/lf/", follow_final=False).errno == "ENOTDIR"


def test_usrmerge_link_with_usr_lib_missing() -> None:
    view = view_of({b"lib": b"->usr/lib", b"usr": b"dir", b"x": b"->/lib/ld-linux.so.2"})
    res = resolve(view, b"/x")
    assert res.errno == "ENOENT"
    assert res.missing == b"/usr/lib"
    assert res.resolved == b"/usr/lib/ld-linux.so.2"
    assert res.hops == 2


def test_missing_component_and_resolved_path_on_enoent() -> None:
    view = view_of({b"opt": b"dir", b"l": b"->opt/app/../lib/x/"})
    res = resolve(view, b"/l")
    assert res.errno == "ENOENT" and res.missing == b"/opt/app"
    assert res.resolved == b"/opt/lib/x"


def test_non_utf8_names() -> None:
    view = view_of({b"d\xff": b"dir", b"d\xff/f\xfe": b"file", b"l\x80": b"->d\xff/f\xfe"})
    res = resolve(view, b"/l\x80")
    assert res.ok and res.resolved == b"/d\xff/f\xfe"


def test_4096_byte_target_is_just_missing() -> None:
    target = b"/" + b"/".join([b"x" * 255] * 16)
    target = target[:4096]
    assert len(target) == 4096
    res = resolve(view_of({b"long": b"->" + target}), b"/long")
    assert res.errno == "ENOENT" and res.missing == b"/" + b"x" * 255


def test_empty_target_is_enoent() -> None:
    res = resolve(view_of({b"e": b"->"}), b"/e")
    assert res.errno == "ENOENT" and res.missing == b"/e"


def test_follow_final_false_stops_at_the_link() -> None:
    view = view_of({b"l": b"->nowhere"})
    res = resolve(view, b"/l", follow_final=False)
    assert res.ok and res.resolved == b"/l" and res.hops == 0
    assert resolve(view, b"/l").errno == "ENOENT"


def test_root_and_relative_paths() -> None:
    view = view_of({b"a": b"file"})
    assert resolve(view, b"/").resolved == b"/"
    assert resolve(view, b"").resolved == b"/"
    assert resolve(view, b"a").resolved == b"/a"


def test_trace_lists_every_existing_path_looked_up() -> None:
    view = view_of(
        {
            b"lib": b"->usr/lib",
            b"usr": b"dir",
            b"usr/lib": b"dir",
            b"usr/lib/x": b"file",
            b"l": b"->/lib/x",
        }
    )
    res = resolve(view, b"/l", trace=True)
    assert res.trail == (b"/l", b"/lib", b"/usr", b"/usr/lib", b"/usr/lib/x")
    assert resolve(view, b"/l").trail == ()


def test_tar_hard_link_to_a_symlink_is_followed() -> None:
    view = view_of({b"t": b"file", b"s": b"->t", b"h": b"=>s", b"hf": b"=>t", b"d": b"=>gone"})
    assert resolve(view, b"/h").resolved == b"/t"
    assert resolve(view, b"/hf").resolved == b"/hf"
    assert resolve(view, b"/hf/x").errno == "ENOTDIR"
    assert resolve(view, b"/d").ok  # a hard link whose source is unknown is still a file


def test_link_resolver_on_an_inconsistent_single_layer_walks_like_the_kernel() -> None:
    # a tar may hold a file "a" and a member "a/l": the kernel cannot get through "a"
    view = view_of({b"a": b"file", b"a/l": b"->/x", b"x": b"file"})
    assert not view.consistent
    assert resolve_link(view, b"a/l").errno == "ENOTDIR"
    assert resolve(view, b"/a/l").errno == "ENOTDIR"


NAMES = [b"a", b"b", b"c", b"..", b".", b""]
names = st.sampled_from([b"a", b"b", b"c"])
paths = st.lists(names, min_size=1, max_size=3).map(b"/".join)
targets = st.builds(
    lambda lead, parts, trail: lead + b"/".join(parts) + trail,
    st.sampled_from([b"", b"/", b"../", b"./", b"//"]),
    st.lists(st.sampled_from(NAMES), min_size=0, max_size=4),
    st.sampled_from([b"", b"/", b"/."]),
)
kinds = st.one_of(st.sampled_from([b"dir", b"file"]), targets.map(lambda t: b"->" + t))


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(paths, kinds, max_size=12))
def test_link_resolver_agrees_with_the_component_walk(spec: dict[bytes, bytes]) -> None:
    view = view_of(spec)
    resolver = LinkResolver(view)
    for path, node in view.symlinks():
        slow = resolve(view, b"/" + path)
        fast = resolver.resolve(path)
        assert (fast.errno, fast.resolved, fast.missing, fast.hops) == (
            slow.errno,
            slow.resolved,
            slow.missing,
            slow.hops,
        ), path
        if not view.consistent:
            continue  # resolve_target assumes the link's directory is a real directory
        as_target = resolver.resolve_target(path, node.entry.target)
        assert (as_target.errno, as_target.resolved) == (slow.errno, slow.resolved), path


def test_reached_paths_join_each_target_with_the_rest() -> None:
    view = view_of(
        {
            b"lib": b"->usr/lib",
            b"usr": b"dir",
            b"usr/lib": b"dir",
            b"l": b"->/lib/x/../y",
            b"e": b"->",
        }
    )
    assert reached_paths(view, b"/l") == [b"/lib/y", b"/usr/lib/y"]
    assert reached_paths(view, b"/lib/z/") == [b"/usr/lib/z"]
    assert reached_paths(view, b"/e") == []
