"""The merged view: OCI/overlay apply semantics, provenance and deletions."""

from __future__ import annotations

import time
import tracemalloc

from crifs.fs.listing import PLAIN_DIR, PLAIN_FILE, EntryKind, LayerListing
from crifs.fs.merged import OPAQUE, REPLACED, WHITEOUT, MergedView, Node
from listing_cases import layer


def kinds(view: MergedView) -> dict[bytes, str]:
    return {path: str(entry.kind) for path, entry in view.items() if path}


def test_whiteout_deletes_lower_path_and_records_who() -> None:
    view = MergedView(
        [
            layer(0, {b"etc": b"dir", b"etc/a": b"file", b"etc/b": b"file"}),
            layer(1, {b"etc": b"dir", b"etc/a": b"wh"}),
        ]
    )
    assert view.node(b"etc/a") is None
    assert view.node(b"etc/b") is not None
    gone = view.deletion(b"etc/a")
    assert gone is not None
    assert (gone.layer_added, gone.layer_deleted, gone.how, gone.cause) == (
        0,
        1,
        WHITEOUT,
        b"etc/a",
    )
    assert gone.entry.kind is EntryKind.FILE


def test_whiteout_in_bottom_layer_deletes_nothing_and_is_not_an_entry() -> None:
    view = MergedView([layer(0, {b"a": b"wh", b"b": b"file"}), layer(1, {b"c": b"file"})])
    assert view.node(b"a") is None
    assert view.deletion(b"a") is None
    assert kinds(view) == {b"b": "file", b"c": "file"}


def test_whiteout_applies_only_to_lower_layers_same_layer_entry_wins() -> None:
    view = MergedView(
        [
            layer(0, {b"a": b"dir", b"a/old": b"file"}),
            layer(1, {b"a": b"wh", b"a/new": b"file"}),
        ]
    )
    # the whiteout removed the lower directory; the same layer's a/new re-creates a
    assert view.node(b"a/old") is None
    node = view.node(b"a/new")
    assert node is not None and node.layer == 1
    a = view.node(b"a")
    assert a is not None and a.entry.kind is EntryKind.DIR and a.layer == 1
    assert view.deletion(b"a") is None  # a exists again
    old = view.deletion(b"a/old")
    assert old is not None and old.how == WHITEOUT and old.cause == b"a"


def test_same_layer_whiteout_and_entry_at_one_path_keeps_the_entry() -> None:
    replaced = layer(1, {b"f": b"->x"})
    replaced.whiteouts.add(b"f")
    view = MergedView([layer(0, {b"f": b"file"}), replaced])
    node = view.node(b"f")
    assert node is not None and node.entry.kind is EntryKind.SYMLINK and node.layer == 1
    assert view.deletion(b"f") is None


def test_opaque_hides_lower_children_but_not_same_layer_ones() -> None:
    view = MergedView(
        [
            layer(0, {b"d": b"dir", b"d/x": b"file", b"d/sub": b"dir", b"d/sub/y": b"file"}),
            layer(1, {b"d": b"opq", b"d/z": b"file"}),
        ]
    )
    assert kinds(view) == {b"d": "dir", b"d/z": "file"}
    for path in (b"d/x", b"d/sub", b"d/sub/y"):
        gone = view.deletion(path)
        assert gone is not None and gone.how == OPAQUE and gone.cause == b"d", path
        assert gone.layer_deleted == 1


def test_opaque_root_hides_everything_below() -> None:
    top = layer(1, {b"new": b"file"})
    top.opaque.add(b"")
    view = MergedView([layer(0, {b"etc": b"dir", b"etc/x": b"file"}), top])
    assert kinds(view) == {b"new": "file"}


def test_directory_replaced_by_file_removes_subtree() -> None:
    view = MergedView(
        [
            layer(0, {b"d": b"dir", b"d/x": b"dir", b"d/x/y": b"file"}),
            layer(1, {b"d": b"file"}),
        ]
    )
    assert kinds(view) == {b"d": "file"}
    gone = view.deletion(b"d/x/y")
    assert gone is not None and (gone.how, gone.cause, gone.layer_deleted) == (REPLACED, b"d", 1)
    assert view.deletion(b"d") is None


def test_symlink_replacing_directory_removes_subtree() -> None:
    view = MergedView(
        [
            layer(0, {b"lib": b"dir", b"lib/libc.so": b"file", b"usr": b"dir"}),
            layer(1, {b"lib": b"->usr/lib"}),
        ]
    )
    assert kinds(view) == {b"lib": "symlink", b"usr": "dir"}
    assert view.deletion(b"lib/libc.so") is not None


def test_directory_over_directory_merges() -> None:
    view = MergedView(
        [
            layer(0, {b"d": b"dir", b"d/x": b"file"}),
            layer(1, {b"d": b"dir", b"d/y": b"file"}),
        ]
    )
    assert kinds(view) == {b"d": "dir", b"d/x": "file", b"d/y": "file"}
    d, x = view.node(b"d"), view.node(b"d/x")
    assert d is not None and d.layer == 1
    assert x is not None and x.layer == 0


def test_whiteout_of_the_link_itself() -> None:
    view = MergedView([layer(0, {b"l": b"->t", b"t": b"file"}), layer(1, {b"l": b"wh"})])
    assert list(view.symlinks()) == []
    gone = view.deletion(b"l")
    assert gone is not None and gone.entry.kind is EntryKind.SYMLINK


def test_whiteout_is_never_applied_through_a_symlink() -> None:
    # anchore/stereoscope#694: lib/x is a literal path; usr/lib/x must survive
    view = MergedView(
        [
            layer(
                0, {b"lib": b"->usr/lib", b"usr": b"dir", b"usr/lib": b"dir", b"usr/lib/x": b"file"}
            ),
            layer(1, {b"lib/x": b"wh"}),
        ]
    )
    assert view.node(b"usr/lib/x") is not None
    assert view.deletion(b"usr/lib/x") is None
    # the whiteout's layer has a directory lib (as unpacking into an overlay upper dir makes)
    lib = view.node(b"lib")
    assert lib is not None and lib.entry.kind is EntryKind.DIR and lib.layer == 1


def test_opaque_marker_on_a_lower_symlink_leaves_its_target_alone() -> None:
    top = LayerListing(1, "layer 1", opaque={b"lib"})
    view = MergedView(
        [
            layer(
                0, {b"lib": b"->usr/lib", b"usr": b"dir", b"usr/lib": b"dir", b"usr/lib/x": b"file"}
            ),
            top,
        ]
    )
    assert view.node(b"usr/lib/x") is not None
    lib = view.node(b"lib")
    assert lib is not None and lib.entry.kind is EntryKind.DIR


def test_implicit_parent_directories_exist() -> None:
    single = MergedView([layer(0, {b"a/b/c": b"file"})])
    for view in (single, MergedView([layer(0, {b"x": b"file"}), layer(1, {b"a/b/c": b"file"})])):
        a = view.node(b"a")
        assert a is not None and a.entry.kind is EntryKind.DIR
        assert view.node(b"a/b") is not None
        assert view.node(b"a/b/c/d") is None
        assert view.node(b"") is not None  # the root
    assert len(single) == 3
    assert single.node(b"a") == Node(PLAIN_DIR, 0)


def test_implicit_parent_replaces_lower_file() -> None:
    view = MergedView([layer(0, {b"a": b"file"}), layer(1, {b"a/b": b"file"})])
    a = view.node(b"a")
    assert a is not None and a.entry.kind is EntryKind.DIR and a.layer == 1


def test_readded_path_has_no_deletion_and_new_provider() -> None:
    view = MergedView(
        [
            layer(0, {b"f": b"file"}),
            layer(1, {b"f": b"wh"}),
            layer(2, {b"f": b"->x"}),
        ]
    )
    node = view.node(b"f")
    assert node is not None and node.layer == 2
    assert view.deletion(b"f") is None


def test_latest_deletion_wins() -> None:
    view = MergedView(
        [
            layer(0, {b"d": b"dir", b"d/f": b"file"}),
            layer(1, {b"d": b"wh"}),
            layer(2, {b"d": b"dir", b"d/f": b"file"}),
            layer(3, {b"d": b"opq"}),
        ]
    )
    gone = view.deletion(b"d/f")
    assert gone is not None and (gone.layer_added, gone.layer_deleted, gone.how) == (2, 3, OPAQUE)


def test_symlinks_sorted_and_hardlink_to_symlink_counts() -> None:
    view = MergedView([layer(0, {b"z": b"->a", b"b": b"->c", b"h": b"=>z", b"f": b"file"})])
    got = [(path, node.entry.target) for path, node in view.symlinks()]
    assert got == [(b"b", b"c"), (b"h", b"a"), (b"z", b"a")]


def test_single_layer_view_shares_the_dict() -> None:
    entries = {b"d%d" % i: PLAIN_FILE for i in range(100_000)}
    listing = LayerListing(0, "big", entries)
    tracemalloc.start()
    view = MergedView([listing])
    assert view.node(b"d5") is not None
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1_000_000, peak  # a copy of 100k entries would take several MB
    assert len(view) == 100_000


def test_ten_layers_of_200k_entries_merge_fast() -> None:
    layers = []
    for index in range(10):
        listing = LayerListing(index, f"layer {index}")
        for d in range(200):
            directory = b"usr/share/d%d" % d
            listing.entries[directory] = PLAIN_DIR
            for f in range(100):
                listing.entries[directory + b"/f%d-%d" % (index % 3, f)] = PLAIN_FILE
        listing.entries[b"usr"] = PLAIN_DIR
        listing.entries[b"usr/share"] = PLAIN_DIR
        if index:
            listing.whiteouts.add(b"usr/share/d%d" % index)
            listing.opaque.add(b"usr/share/d%d" % (index + 50))
        layers.append(listing)
    started = time.perf_counter()
    view = MergedView(layers)
    elapsed = time.perf_counter() - started
    assert elapsed < 1.5, elapsed
    gone = view.deletion(b"usr/share/d59/f1-0")
    assert gone is not None and (gone.layer_added, gone.layer_deleted, gone.how) == (7, 9, OPAQUE)
    assert view.deletion(b"usr/share/d59/f0-0") is None  # layer 9 re-adds its own
    assert len(view) > 50_000


def _hinted(listing: LayerListing) -> LayerListing:
    """The same listing with the hints a directory walk gives."""
    plain = (PLAIN_FILE, PLAIN_DIR)
    return LayerListing(
        listing.index, listing.name, dict(listing.entries), set(listing.whiteouts),
        set(listing.opaque),
        notable={k: e for k, e in listing.entries.items() if e not in plain},
        dirs_complete=True,
    )


def test_walk_hints_give_the_same_view() -> None:
    """``notable`` and ``dirs_complete`` only save passes: a view of a hinted listing answers
    as one of the same listing without hints (one layer and a stack)."""
    bottom = layer(0, {b"d": b"dir", b"d/f": b"file", b"d/l": b"->f", b"h": b"=>d/l",
                       b"e": b"dir", b"e/x": b"->../d", b"g": b"dir"})
    top = layer(1, {b"d": b"dir", b"d/l": b"->../e", b"e": b"opq", b"e/y": b"file",
                    b"g": b"dir", b"g/gone": b"wh", b"n": b"->nowhere"})
    for stack in ([bottom], [bottom, top]):
        plain, hinted = MergedView(stack), MergedView([_hinted(x) for x in stack])
        assert list(hinted.symlink_nodes()) == list(plain.symlink_nodes())
        assert sorted(hinted.paths()) == sorted(plain.paths())
        assert hinted.consistent == plain.consistent
        for path in plain.paths():
            assert hinted.node(path) == plain.node(path)
            assert hinted.deletion(path) == plain.deletion(path)


def test_notable_is_trusted_for_the_symlink_list() -> None:
    """With ``notable`` given, only its entries are looked at for symlinks (the contract:
    every non-plain entry is in it)."""
    listing = layer(0, {b"a": b"->b", b"b": b"file"})
    listing.notable = {}
    assert list(MergedView([listing]).symlinks()) == []
    listing.notable = {b"a": listing.entries[b"a"]}
    assert [path for path, _ in MergedView([listing]).symlinks()] == [b"a"]
