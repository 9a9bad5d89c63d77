"""The bolt reader on damaged files and on files that change while it reads.

Every damage must give either the data or a one-line ``CorruptStore`` naming the file: never
another exception, never a hang.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bolt_cases import (
    SAMPLE,
    SAMPLE_SEQUENCES,
    TMP_PATH_OK,
    as_tree,
    corruptible,
    pages_of_kind,
    rewrite_meta,
    walk,
    write,
)
from crifs.containerd.bolt import (
    BUCKET_HEADER,
    PAGE_HEADER,
    fnv1a64,
    open_bolt,
)
from crifs.containerd.boltwrite import (
    BoltLayout,
    build_bolt,
    build_bolt_layout,
)
from crifs.errors import BadInput, CorruptStore, NotFound, StoreChanged

# -- corruption: metas -----------------------------------------------------------------------


def test_missing_directory_and_fifo_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="no such bolt file"):
        open_bolt(tmp_path / "nope.db")
    with pytest.raises(BadInput, match="is a directory"):
        open_bolt(tmp_path)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(BadInput, match="not a regular file"):
        open_bolt(tmp_path / "fifo")  # and does not block on the FIFO


@pytest.mark.parametrize(("data", "message"), [
    (b"", "empty file, not a bolt database"),
    (b"x" * 50, "file is 50 bytes, too short"),
    (b"\0" * 8192, r"both meta pages are invalid \(meta0: bad magic 0x00000000, meta1: bad magic"),
])
def test_empty_short_and_garbage_files(tmp_path: Path, data: bytes, message: str) -> None:
    with pytest.raises(CorruptStore, match=message) as info:
        open_bolt(write(tmp_path, data))
    assert str(info.value).startswith(str(tmp_path / "t.db") + ": ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("offset", "value", "reason"), [
    (16, 0xDEADBEEF, "bad magic 0xdeadbeef"),
    (20, 3, "bad version 3"),
    (32, 99, "bad checksum"),  # root pgid changed, checksum not updated
])
def test_both_metas_invalid(tmp_path: Path, offset: int, value: int, reason: str) -> None:
    layout, data = corruptible()
    for page in (0, 1):
        struct.pack_into("<I", data, page * layout.page_size + offset, value)
    with pytest.raises(CorruptStore, match=rf"both meta pages are invalid \(meta0: {reason}, "
                                           rf"meta1: {reason}"):
        open_bolt(write(tmp_path, data))


def test_newer_meta_invalid_falls_back_to_older(tmp_path: Path) -> None:
    layout, data = corruptible(txid=5)
    data[1 * layout.page_size + 40] ^= 0xFF  # meta1 holds txid 5: break its checksum
    bolt = open_bolt(write(tmp_path, data))
    assert (bolt.txid, bolt.meta_page) == (4, 0)
    assert as_tree(bolt.root) == SAMPLE


def test_higher_txid_wins_and_meta0_may_be_newer(tmp_path: Path) -> None:
    layout, data = corruptible(txid=6)  # even txid: meta0 is the newer one
    bolt = open_bolt(write(tmp_path, data))
    assert (bolt.txid, bolt.meta_page) == (6, 0)


def test_bad_meta0_probes_page_size_from_meta1(tmp_path: Path) -> None:
    layout, data = corruptible(page_size=16384)
    data[16] ^= 1
    bolt = open_bolt(write(tmp_path, data))
    assert (bolt.page_size, bolt.txid, bolt.meta_page) == (16384, 1, 1)


def test_meta_with_impossible_page_size(tmp_path: Path) -> None:
    layout, data = corruptible()
    rewrite_meta(data, layout, page_size=3000)
    with pytest.raises(CorruptStore, match="meta0: bad page size 3000"):
        open_bolt(write(tmp_path, data))


# -- corruption: pages -----------------------------------------------------------------------


def test_truncated_file(tmp_path: Path) -> None:
    layout, data = corruptible()
    with pytest.raises(CorruptStore, match=r"page \d+: beyond the end of the file"):
        open_bolt(write(tmp_path, data[: -layout.page_size]))


def test_page_header_id_mismatch(tmp_path: Path) -> None:
    layout, data = corruptible()
    victim = pages_of_kind(layout, "leaf")[3]
    struct.pack_into("<Q", data, layout.page_offset(victim), 7)
    with pytest.raises(CorruptStore, match=rf"page {victim}: header id is 7$"):
        open_bolt(write(tmp_path, data))


def test_page_beyond_high_water_mark(tmp_path: Path) -> None:
    layout, data = corruptible()
    rewrite_meta(data, layout, high_water_mark=layout.bucket_roots[()] - 1)
    with pytest.raises(CorruptStore, match=r"beyond the high-water mark"):
        open_bolt(write(tmp_path, data))


def test_meta_page_as_tree_root(tmp_path: Path) -> None:
    layout, data = corruptible()
    rewrite_meta(data, layout, root=1)
    with pytest.raises(CorruptStore, match="page 1: meta points to a meta page"):
        open_bolt(write(tmp_path, data))


@pytest.mark.parametrize(("flags", "shown"), [(0x10, "0x10 (freelist)"), (0x04, "0x04 (meta)"),
                                              (0x03, "0x03 (invalid)"), (0x00, "0x00 (invalid)")])
def test_wrong_page_flags(tmp_path: Path, flags: int, shown: str) -> None:
    layout, data = corruptible()
    victim = pages_of_kind(layout, "leaf")[0]
    struct.pack_into("<H", data, layout.page_offset(victim) + 8, flags)
    with pytest.raises(CorruptStore, match=rf"page {victim}: flags {re.escape(shown)}, expected"):
        open_bolt(write(tmp_path, data))


def test_leaf_element_out_of_bounds(tmp_path: Path) -> None:
    layout, data = corruptible()
    victim = pages_of_kind(layout, "leaf")[0]
    struct.pack_into("<I", data, layout.page_offset(victim) + 16 + 4, 0xFFFFFF00)  # elem 0 pos
    with pytest.raises(CorruptStore, match=rf"page {victim}: leaf element 0 out of bounds"):
        open_bolt(write(tmp_path, data))


def test_leaf_value_size_out_of_bounds(tmp_path: Path) -> None:
    layout, data = corruptible()
    victim = pages_of_kind(layout, "leaf")[0]
    count = PAGE_HEADER.unpack_from(data, layout.page_offset(victim))[2]
    last = layout.page_offset(victim) + 16 + 16 * (count - 1)
    struct.pack_into("<I", data, last + 12, layout.page_size)  # vsize of the last element
    with pytest.raises(CorruptStore, match=rf"page {victim}: leaf element {count - 1} out of"):
        open_bolt(write(tmp_path, data))


def test_branch_element_out_of_bounds(tmp_path: Path) -> None:
    layout, data = corruptible()
    victim = pages_of_kind(layout, "branch")[0]
    struct.pack_into("<I", data, layout.page_offset(victim) + 16 + 16 + 4, 1 << 30)  # ksize
    with pytest.raises(CorruptStore, match=rf"page {victim}: branch element 1 out of bounds"):
        open_bolt(write(tmp_path, data))


def test_element_count_larger_than_page(tmp_path: Path) -> None:
    layout, data = corruptible()
    victim = pages_of_kind(layout, "branch")[0]
    struct.pack_into("<H", data, layout.page_offset(victim) + 10, 0xFFFF)
    with pytest.raises(CorruptStore, match=rf"page {victim}: 65535 elements do not fit"):
        open_bolt(write(tmp_path, data))


def test_overflow_past_high_water_mark(tmp_path: Path) -> None:
    layout, data = corruptible()
    victim = pages_of_kind(layout, "leaf")[0]
    struct.pack_into("<I", data, layout.page_offset(victim) + 12, 0xFFFFFFFF)
    with pytest.raises(CorruptStore, match=rf"page {victim}: overflow 4294967295 runs past"):
        open_bolt(write(tmp_path, data))


def test_branch_pointing_to_itself_is_a_cycle(tmp_path: Path) -> None:
    layout, data = corruptible()
    victim = pages_of_kind(layout, "branch")[0]
    struct.pack_into("<Q", data, layout.page_offset(victim) + 16 + 8, victim)
    with pytest.raises(CorruptStore, match=rf"page cycle at page {victim}$"):
        open_bolt(write(tmp_path, data))


def test_two_branch_elements_sharing_a_child(tmp_path: Path) -> None:
    layout, data = corruptible()
    victim = pages_of_kind(layout, "branch")[0]
    first_child = struct.unpack_from("<Q", data, layout.page_offset(victim) + 16 + 8)[0]
    struct.pack_into("<Q", data, layout.page_offset(victim) + 32 + 8, first_child)
    with pytest.raises(CorruptStore, match=rf"page cycle at page {first_child}"):
        open_bolt(write(tmp_path, data))


def test_overflow_range_overlapping_the_next_page(tmp_path: Path) -> None:
    layout, data = corruptible()
    leaves = pages_of_kind(layout, "leaf")
    victim = next(p for p in leaves if p + 1 in leaves)
    struct.pack_into("<I", data, layout.page_offset(victim) + 12, 1)  # now also covers p+1
    with pytest.raises(CorruptStore, match=rf"page cycle at page {victim + 1}"):
        open_bolt(write(tmp_path, data))


def value_offset(data: bytes | bytearray, value: bytes) -> int:
    offset = bytes(data).find(value)
    assert offset > 0 and bytes(data).find(value, offset + 1) == -1
    return offset


def plant_bucket_value(value: bytes) -> tuple[BoltLayout, bytearray]:
    """A file whose single entry x/a holds ``value`` flagged as a sub-bucket.

    The writer only makes well-formed buckets, so ``value`` is written as a plain value and
    its leaf element's flags are set to 0x01 afterwards.
    """
    layout = build_bolt_layout({b"x": {b"a": value}})
    data = bytearray(layout.data)
    x_root = layout.bucket_roots[(b"x",)]
    if x_root == 0:  # root page: header, element "x", key "x", bucket header, inline page hdr
        element = layout.page_offset(layout.bucket_roots[()]) + 16 + 16 + 1 + 16 + 16
    else:
        element = layout.page_offset(x_root) + 16
    pos = struct.unpack_from("<I", data, element + 4)[0]
    assert data[element + pos : element + pos + 1] == b"a"
    struct.pack_into("<I", data, element, 1)
    return layout, data


def test_sub_bucket_pointing_to_its_parents_page(tmp_path: Path) -> None:
    parent_page = build_bolt_layout({b"x": {b"a": b"\0" * 16}}).bucket_roots[()]
    layout, data = plant_bucket_value(BUCKET_HEADER.pack(parent_page, 0))
    assert layout.bucket_roots[()] == parent_page
    with pytest.raises(CorruptStore, match=rf"page cycle at page {parent_page}"):
        walk(write(tmp_path, data))


def test_bucket_value_shorter_than_header(tmp_path: Path) -> None:
    _, data = plant_bucket_value(b"\x01\x02\x03")
    with pytest.raises(CorruptStore, match=r"bucket b'a' value is 3 bytes, shorter than"):
        open_bolt(write(tmp_path, data))


def test_inline_bucket_with_branch_flags(tmp_path: Path) -> None:
    _, data = plant_bucket_value(BUCKET_HEADER.pack(0, 0) + PAGE_HEADER.pack(0, 0x01, 0, 0))
    with pytest.raises(CorruptStore, match=r"bucket b'a' is inline with page flags 0x01"):
        open_bolt(write(tmp_path, data))


def test_inline_bucket_elements_out_of_bounds(tmp_path: Path) -> None:
    page = PAGE_HEADER.pack(0, 0x02, 1, 0) + struct.pack("<IIII", 0, 16, 1, 50) + b"k"
    _, data = plant_bucket_value(BUCKET_HEADER.pack(0, 0) + page)
    with pytest.raises(CorruptStore, match=r"inline bucket b'a': leaf element 0 out of bounds"):
        open_bolt(write(tmp_path, data))


def nested_inline(depth: int) -> bytes:
    """An inline bucket holding an inline bucket ... ``depth`` levels (bbolt never writes this)."""
    value = BUCKET_HEADER.pack(0, 0) + PAGE_HEADER.pack(0, 0x02, 0, 0)
    for _ in range(depth):
        page = PAGE_HEADER.pack(0, 0x02, 1, 0) + struct.pack("<IIII", 1, 16, 1, len(value))
        value = BUCKET_HEADER.pack(0, 0) + page + b"n" + value
    return value


def test_nested_inline_buckets_are_read_up_to_a_depth_limit(tmp_path: Path) -> None:
    _, data = plant_bucket_value(nested_inline(10))
    bucket = open_bolt(write(tmp_path, data)).root.bucket(b"x").bucket(b"a")  # type: ignore[union-attr]
    for _ in range(10):
        bucket = bucket.bucket(b"n")  # type: ignore[union-attr]
    assert bucket is not None and len(bucket) == 0
    _, data = plant_bucket_value(nested_inline(200))
    with pytest.raises(CorruptStore, match="nested deeper than 64 buckets"):
        open_bolt(write(tmp_path, data, "deep.db"))


def test_keys_out_of_order(tmp_path: Path) -> None:
    layout = build_bolt_layout({b"b": {b"key-a": b"1", b"key-b": b"2"}})
    data = bytearray(layout.data)
    data[value_offset(data, b"key-b2") + 4] = ord("A")
    with pytest.raises(CorruptStore, match=r"key b'key-A' is out of order"):
        open_bolt(write(tmp_path, data))


# -- random damage ---------------------------------------------------------------------------

DAMAGE_BASE = build_bolt_layout(SAMPLE, sequences=SAMPLE_SEQUENCES, page_size=1024)


@settings(max_examples=300, deadline=None, suppress_health_check=TMP_PATH_OK)
@given(
    flips=st.lists(st.tuples(st.integers(0, len(DAMAGE_BASE.data) - 1), st.integers(1, 255)),
                   min_size=1, max_size=6),
    fix_checksums=st.booleans(),
    cut=st.one_of(st.none(), st.integers(0, len(DAMAGE_BASE.data))),
)
def test_random_damage_gives_data_or_corrupt_store(
    tmp_path: Path, flips: list[tuple[int, int]], fix_checksums: bool, cut: int | None
) -> None:
    data = bytearray(DAMAGE_BASE.data)
    for offset, mask in flips:
        data[offset] ^= mask
    if fix_checksums:  # let damage inside the metas through to the page walk
        for page in (0, 1):
            body = page * 1024 + 16
            struct.pack_into("<Q", data, body + 56, fnv1a64(bytes(data[body : body + 56])))
    if cut is not None:
        data = data[:cut]
    try:
        walk(write(tmp_path, data), retries=0)
    except CorruptStore as error:
        assert "\n" not in str(error)


@settings(max_examples=200, deadline=None, suppress_health_check=TMP_PATH_OK)
@given(flips=st.lists(st.tuples(st.integers(0, 1023), st.integers(0, 255)), max_size=8),
       page=st.sampled_from(sorted(p for p in DAMAGE_BASE.page_kinds if p >= 2)))
def test_random_damage_inside_one_page(
    tmp_path: Path, flips: list[tuple[int, int]], page: int
) -> None:
    data = bytearray(DAMAGE_BASE.data)
    for offset, value in flips:
        data[page * 1024 + offset] = value
    with contextlib.suppress(CorruptStore):
        walk(write(tmp_path, data), retries=0)


# -- reading while a writer commits ----------------------------------------------------------


def overwrite_in_place(path: Path, data: bytes) -> None:
    # Same inode, as a bbolt commit would (pwrite), so the reader's descriptor sees it.
    with open(path, "r+b") as out:
        out.write(data)
        out.truncate()


def test_meta_moving_after_read_triggers_a_re_read(tmp_path: Path) -> None:
    path = write(tmp_path, build_bolt({b"a": {b"k": b"old"}}, txid=4))
    newer = build_bolt({b"a": {b"k": b"new"}}, txid=5)
    attempts: list[int] = []

    def commit_once(attempt: int) -> None:
        attempts.append(attempt)
        if attempt == 0:
            overwrite_in_place(path, newer)

    bolt = open_bolt(path, _after_read=commit_once)
    assert attempts == [0, 1]
    assert (bolt.txid, bolt.root.bucket(b"a").get(b"k")) == (5, b"new")  # type: ignore[union-attr]


def test_torn_read_is_retried_not_reported_as_corrupt(tmp_path: Path) -> None:
    layout = build_bolt_layout({b"a": {b"k": b"v" * 2000}}, txid=8)
    torn = bytearray(layout.data)
    struct.pack_into("<Q", torn, layout.page_offset(layout.bucket_roots[()]), 999)
    path = write(tmp_path, torn)
    good = build_bolt({b"a": {b"k": b"v" * 2000}}, txid=9)

    def commit_after_first_read(attempt: int) -> None:
        if attempt == 0:
            overwrite_in_place(path, good)

    bolt = open_bolt(path, _after_read=commit_after_first_read)
    assert bolt.txid == 9


def test_stable_corruption_is_reported_after_one_read(tmp_path: Path) -> None:
    _, data = corruptible()
    data[16] ^= 1
    data[4096 + 16] ^= 1
    attempts: list[int] = []
    with pytest.raises(CorruptStore, match="both meta pages are invalid"):
        open_bolt(write(tmp_path, data), _after_read=attempts.append)
    assert attempts == [0]


def test_meta_that_never_settles_raises_store_changed(tmp_path: Path) -> None:
    path = write(tmp_path, build_bolt({b"a": {}}, txid=10))

    def keep_committing(attempt: int) -> None:
        overwrite_in_place(path, build_bolt({b"a": {}}, txid=11 + attempt))

    with pytest.raises(StoreChanged, match=r"changed during 3 reads \(meta txid 10 -> 13\)"):
        open_bolt(path, retries=2, _after_read=keep_committing)


def test_concurrent_commits_never_give_a_torn_result(tmp_path: Path) -> None:
    """A thread commits versions the way bbolt does; every read is one whole version.

    Like bbolt, a commit writes its data pages where the previous version does not live
    (two alternating page ranges here), then its one meta page in slot txid % 2.
    """
    def version(txid: int, first_pgid: int) -> BoltLayout:
        return build_bolt_layout({b"b": {b"v": b"%04d" % txid * 1000}}, txid=txid,
                                 first_pgid=first_pgid)

    pages = version(1, 2).high_water_mark - 2  # the same for every version
    versions = [version(txid, 2 + (txid % 2) * pages) for txid in range(1, 201)]
    path = tmp_path / "live.db"
    image = bytearray((2 + 2 * pages) * 4096)
    image[: len(versions[0].data)] = versions[0].data
    path.write_bytes(bytes(image))
    stop = threading.Event()

    def committer() -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            for layout in versions[1:]:
                if stop.is_set():
                    return
                first = 2 + (layout.txid % 2) * pages
                os.pwrite(fd, layout.data[first * 4096 :], first * 4096)
                slot = (layout.txid % 2) * 4096
                os.pwrite(fd, layout.data[slot : slot + 4096], slot)
                time.sleep(0.001)
        finally:
            os.close(fd)

    thread = threading.Thread(target=committer)
    thread.start()
    results = {"ok": 0, "changed": 0, "re_reads": 0}

    def count_re_reads(attempt: int) -> None:
        results["re_reads"] += attempt > 0

    try:
        while thread.is_alive() or not results["ok"]:
            try:
                bolt = open_bolt(path, retries=2, _after_read=count_re_reads)
            except StoreChanged:
                results["changed"] += 1
                continue
            value = bolt.root.bucket(b"b").get(b"v")  # type: ignore[union-attr]
            assert value == b"%04d" % bolt.txid * 1000
            results["ok"] += 1
    finally:
        stop.set()
        thread.join()
    assert results["ok"] > 0
    print(f"\nlive reads: {results}")
