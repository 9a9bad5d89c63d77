"""The pure-Python bolt reader and writer: round trips, corruption, live-change retries.

Files written by the real bbolt library and by a real containerd are covered in
``test_bolt_real.py``; everything here runs without Go or root.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crifs.containerd.bolt import (
    BUCKET_HEADER,
    PAGE_HEADER,
    PGID_NO_FREELIST,
    BoltFile,
    Bucket,
    fnv1a64,
    open_bolt,
)
from crifs.containerd.boltwrite import (
    BoltLayout,
    build_bolt,
    build_bolt_layout,
    meta_page,
    write_bolt,
)
from crifs.containerd.encoding import (
    encode_gotime,
    encode_uvarint,
    encode_varint,
    read_gotime,
    read_uvarint,
    read_varint,
)
from crifs.errors import BadInput, CorruptStore, NotFound, StoreChanged

# -- helpers ---------------------------------------------------------------------------------


def as_tree(bucket: Bucket) -> dict[bytes, Any]:
    """A bucket as nested dicts (sub-bucket) and bytes (value), like write_bolt's input."""
    return {
        key: as_tree(value) if isinstance(value, Bucket) else value
        for key, value in bucket.items()
    }


def sequences_of(bucket: Bucket, path: tuple[bytes, ...] = ()) -> dict[tuple[bytes, ...], int]:
    found = {path: bucket.sequence} if bucket.sequence else {}
    for key, child in bucket.buckets():
        found.update(sequences_of(child, (*path, key)))
    return found


def count_tree(tree: Mapping[bytes, object]) -> int:
    return sum(1 + (count_tree(v) if isinstance(v, Mapping) else 0) for v in tree.values())


def count_entries(bucket: Bucket) -> int:
    return sum(1 + (count_entries(v) if isinstance(v, Bucket) else 0) for _, v in bucket.items())


def write(tmp_path: Path, data: bytes | bytearray, name: str = "t.db") -> Path:
    path = tmp_path / name
    path.write_bytes(bytes(data))
    return path


def walk(path: Path, **kwargs: object) -> BoltFile:
    bolt = open_bolt(path, **kwargs)  # type: ignore[arg-type]
    count_entries(bolt.root)
    return bolt


TMP_PATH_OK = [HealthCheck.function_scoped_fixture]  # each example rewrites the same file

SAMPLE: dict[bytes, Any] = {
    b"v1": {
        b"version": b"\x06",
        b"default": {
            b"labels": {b"containerd.io/namespace.shareable": b"true"},
            b"empty-bucket": {},
            b"empty-value": b"",
            b"big": bytes(range(256)) * 90,  # 23 KiB: overflow pages
            b"snapshots": {
                b"overlayfs": {
                    f"sha256:{i:064x}".encode(): {
                        b"name": f"default/{i}/sha256:{i:064x}".encode(),
                        b"createdat": encode_gotime(datetime(2024, 1, 1, tzinfo=UTC)),
                        b"children": {f"child-{i}".encode(): b""},
                    }
                    for i in range(40)
                },
            },
        },
        b"many": {f"key-{i:06d}".encode(): f"value-{i}".encode() * (i % 7) for i in range(3000)},
    },
    b"\x00binary\xff": {b"\xff" * 100: b"\x00"},
}
SAMPLE_SEQUENCES = {
    (): 3,
    (b"v1", b"default", b"snapshots", b"overlayfs"): 81,
    (b"v1", b"default", b"labels"): 2,
    (b"v1", b"many"): 1 << 63,
}


def corruptible(**kwargs: object) -> tuple[BoltLayout, bytearray]:
    layout = build_bolt_layout(SAMPLE, sequences=SAMPLE_SEQUENCES, **kwargs)  # type: ignore[arg-type]
    return layout, bytearray(layout.data)


def pages_of_kind(layout: BoltLayout, kind: str) -> list[int]:
    return sorted(p for p, k in layout.page_kinds.items() if k == kind)


def rewrite_meta(data: bytearray, layout: BoltLayout, **changes: int) -> None:
    """Rewrite both meta pages with fields changed and a correct checksum."""
    for slot_txid in (layout.txid - 1, layout.txid):
        fields = {
            "page_size": layout.page_size, "root": layout.bucket_roots[()], "sequence": 3,
            "freelist": PGID_NO_FREELIST, "high_water_mark": layout.high_water_mark,
            "txid": slot_txid,
        }
        fields.update(changes)
        offset = (slot_txid % 2) * layout.page_size
        data[offset : offset + layout.page_size] = meta_page(**fields)


# -- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [4096, 16384])
@pytest.mark.parametrize("freelist", [False, True])
def test_round_trip_keeps_tree_sequences_and_layout(
    tmp_path: Path, page_size: int, freelist: bool
) -> None:
    path = tmp_path / "meta.db"
    write_bolt(path, SAMPLE, page_size=page_size, sequences=SAMPLE_SEQUENCES, txid=7,
               freelist=freelist)
    bolt = open_bolt(path)
    assert as_tree(bolt.root) == SAMPLE
    assert sequences_of(bolt.root) == SAMPLE_SEQUENCES
    assert (bolt.page_size, bolt.txid, bolt.meta_page) == (page_size, 7, 1)
    assert bolt.freelist_pgid == (2 if freelist else PGID_NO_FREELIST)
    assert bolt.file_size == bolt.high_water_mark * page_size
    assert os.stat(path).st_mode & 0o777 == 0o600
    ns = bolt.root.bucket(b"v1").bucket(b"default")  # type: ignore[union-attr]
    assert ns is not None
    # bbolt's rule: small buckets without sub-buckets are inline, the rest get pages.
    assert ns.bucket(b"labels").inline  # type: ignore[union-attr]
    assert ns.bucket(b"empty-bucket").inline  # type: ignore[union-attr]
    assert not ns.inline
    assert not bolt.root.bucket(b"v1").bucket(b"many").inline  # type: ignore[union-attr]


def test_bucket_accessors_tell_values_from_buckets(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    write_bolt(path, {b"b": {b"sub": {}, b"val": b"", b"x": b"1"}})
    bucket = open_bolt(path).root.bucket(b"b")
    assert bucket is not None
    assert bucket.get(b"val") == b""
    assert bucket.get(b"sub") is None and bucket.bucket(b"val") is None
    assert bucket.get(b"missing") is None and bucket.bucket(b"missing") is None
    assert isinstance(bucket.bucket(b"sub"), Bucket)
    assert b"sub" in bucket and b"val" in bucket and b"missing" not in bucket
    assert [k for k, _ in bucket.items()] == [b"sub", b"val", b"x"]
    assert [k for k, _ in bucket.buckets()] == [b"sub"]
    assert list(bucket.values()) == [(b"val", b""), (b"x", b"1")]
    assert list(bucket.keys()) == [b"sub", b"val", b"x"] and len(bucket) == 3
    assert "inline" in repr(bucket.bucket(b"sub"))


def test_many_keys_make_multi_level_branch_pages(tmp_path: Path) -> None:
    tree = {b"b": {f"{i:08d}".encode() * 4: b"v" * (i % 50) for i in range(20000)}}
    layout = build_bolt_layout(tree, page_size=1024)
    branches = pages_of_kind(layout, "branch")
    data = layout.data
    # Some branch page points at another branch page: at least two branch levels.
    child_kinds = set()
    for pgid in branches:
        count = PAGE_HEADER.unpack_from(data, pgid * 1024)[2]
        for index in range(count):
            elem = pgid * 1024 + 16 + 16 * index
            child_kinds.add(layout.page_kinds[struct.unpack_from("<Q", data, elem + 8)[0]])
    assert child_kinds == {"branch", "leaf"}
    assert as_tree(walk(write(tmp_path, data)).root) == tree


def test_big_values_use_overflow_pages(tmp_path: Path) -> None:
    tree = {b"b": {b"a": b"x" * 100_000, b"b": b"", b"c": os.urandom(9000)}}
    layout = build_bolt_layout(tree)
    assert "leaf overflow" in layout.page_kinds.values()
    assert as_tree(open_bolt(write(tmp_path, layout.data)).root) == tree


@pytest.mark.parametrize("page_size", [4096, 16384])
def test_inline_threshold_matches_bbolt(tmp_path: Path, page_size: int) -> None:
    # Inline page = 16-byte header + 16 per element + key + value; inline iff <= page_size/4.
    fits = page_size // 4 - 16 - 16 - 1
    tree = {b"r": {b"fits": {b"k": b"v" * fits}, b"over": {b"k": b"v" * (fits + 1)}}}
    root = open_bolt(write(tmp_path, build_bolt(tree, page_size=page_size))).root
    r = root.bucket(b"r")
    assert r is not None
    assert r.bucket(b"fits").inline  # type: ignore[union-attr]
    assert not r.bucket(b"over").inline  # type: ignore[union-attr]


def test_empty_database(tmp_path: Path) -> None:
    bolt = open_bolt(write(tmp_path, build_bolt({})))
    assert len(bolt.root) == 0 and bolt.high_water_mark == 3


def test_writer_rejects_what_bbolt_rejects() -> None:
    with pytest.raises(ValueError, match="key"):
        build_bolt({b"": b"x"})
    with pytest.raises(ValueError, match="key"):
        build_bolt({b"k" * 32769: b"x"})
    with pytest.raises(ValueError, match="maps to int"):
        build_bolt({b"k": 3})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="page size"):
        build_bolt({}, page_size=3000)
    with pytest.raises(ValueError, match="txid"):
        build_bolt({}, txid=0)
    with pytest.raises(ValueError, match="sequence"):
        build_bolt({b"a": {}}, sequences={(b"a",): -1})


keys = st.binary(min_size=1, max_size=12)
values = st.one_of(
    st.binary(max_size=40), st.binary(min_size=1000, max_size=6000), st.just(b"")
)
trees = st.recursive(
    st.dictionaries(keys, values, max_size=8),
    lambda children: st.dictionaries(keys, st.one_of(values, children), max_size=12),
    max_leaves=60,
)


@settings(max_examples=50, deadline=None, suppress_health_check=TMP_PATH_OK)
@given(tree=trees, page_size=st.sampled_from([1024, 4096, 16384]), txid=st.integers(1, 2**40),
       bulk=st.integers(0, 400))
def test_round_trip_property(
    tmp_path: Path, tree: dict[bytes, Any], page_size: int, txid: int, bulk: int
) -> None:
    tree = {b"root": tree, b"bulk": {i.to_bytes(4, "big"): b"x" * (i % 30) for i in range(bulk)}}
    bolt = open_bolt(write(tmp_path, build_bolt(tree, page_size=page_size, txid=txid)))  # type: ignore[arg-type]
    assert as_tree(bolt.root) == tree
    assert bolt.txid == txid


# -- scalar encodings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "encoded"),
    [(0, b"\x00"), (3, b"\x06"), (4, b"\x08"), (-1, b"\x01"), (63, b"\x7e"), (-64, b"\x7f"),
     (64, b"\x80\x01"), (-(1 << 63), b"\xff" * 9 + b"\x01"),
     ((1 << 63) - 1, b"\xfe" + b"\xff" * 8 + b"\x01")],
)
def test_varint_matches_go(value: int, encoded: bytes) -> None:
    assert encode_varint(value) == encoded
    assert read_varint(encoded) == value
    assert read_varint(encoded + b"trailing") == value  # Go ignores what follows


def test_uvarint_reports_length_and_rejects_bad_input() -> None:
    assert read_uvarint(b"\xac\x02rest") == (300, 2)
    assert read_uvarint(b"\x00\x07", offset=1) == (7, 1)
    assert read_uvarint(b"\xff" * 9 + b"\x01") == ((1 << 64) - 1, 10)
    for bad, reason in [(b"", "empty"), (b"\x80\x80", "truncated"),
                        (b"\xff" * 9 + b"\x02", "overflow"), (b"\x80" * 11, "overflow")]:
        with pytest.raises(ValueError, match=reason):
            read_uvarint(bad)
    with pytest.raises(ValueError):
        encode_uvarint(-1)
    with pytest.raises(ValueError):
        encode_varint(1 << 63)


@given(st.integers(-(1 << 63), (1 << 63) - 1))
def test_varint_round_trip(value: int) -> None:
    assert read_varint(encode_varint(value)) == value
    assert read_uvarint(encode_uvarint(abs(value))) == (abs(value), len(encode_uvarint(abs(value))))


def test_gotime_versions_and_errors() -> None:
    # Bytes from Go: time.Unix(1700000000, 123456789).UTC().MarshalBinary()
    utc = bytes.fromhex("010000000edce5e800075bcd15ffff")
    assert read_gotime(utc) == datetime.fromtimestamp(1700000000, UTC) + timedelta(
        microseconds=123456)  # nanoseconds truncated
    # Version 2: zone offset 3601 s has a leftover second (time.FixedZone("x", 3601)).
    v2 = bytes.fromhex("020000000edce5e80000000005003c01")
    assert read_gotime(v2) == datetime.fromtimestamp(1700000000, UTC)
    micros = datetime.fromtimestamp(1700000000, UTC) + timedelta(microseconds=123456)
    assert encode_gotime(micros) == bytes.fromhex("010000000edce5e800075bca00ffff")
    for bad, reason in [(b"", "empty"), (b"\x03" + utc[1:], "version 3"), (utc[:-1], "14 bytes"),
                        (utc[:9] + b"\xff\xff\xff\xff" + utc[13:], "nanoseconds"),
                        (b"\x01" + b"\x7f" + b"\xff" * 7 + utc[9:], "out of range")]:
        with pytest.raises(ValueError, match=reason):
            read_gotime(bad)


@given(st.datetimes(timezones=st.just(UTC)))
def test_gotime_round_trip(moment: datetime) -> None:
    assert read_gotime(encode_gotime(moment)) == moment


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


# -- speed -----------------------------------------------------------------------------------


def containerd_like_tree(snapshots: int) -> dict[bytes, Any]:
    created = encode_gotime(datetime(2024, 5, 1, tzinfo=UTC))
    keys = [f"sha256:{i:064x}".encode() for i in range(snapshots)]
    records: dict[bytes, Any] = {}
    for i, key in enumerate(keys):
        record: dict[bytes, Any] = {
            b"name": b"default/%d/" % (i + 1) + key,
            b"createdat": created,
            b"updatedat": created,
            b"labels": {b"containerd.io/snapshot.ref": key},
        }
        if i:
            record[b"parent"] = keys[i - 1]
        if i + 1 < snapshots:
            record[b"children"] = {keys[i + 1]: b""}
        records[key] = record
    return {b"v1": {b"version": b"\x06", b"default": {b"snapshots": {b"overlayfs": records}}}}


def test_ten_thousand_snapshots_parse_fast(tmp_path: Path) -> None:
    path = tmp_path / "meta.db"
    write_bolt(path, containerd_like_tree(10_000),
               sequences={(b"v1", b"default", b"snapshots", b"overlayfs"): 10_000})
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        bolt = open_bolt(path)
        entries = count_entries(bolt.root)
        best = min(best, time.perf_counter() - start)
    assert entries == count_tree(containerd_like_tree(10_000))
    print(f"\n10k snapshots: {os.path.getsize(path) >> 20} MiB, parse+walk {best * 1000:.0f} ms")
    assert best < 1.5, f"parse+walk took {best:.2f}s"


def test_mapping_input_is_accepted(tmp_path: Path) -> None:
    class Frozen(Mapping[bytes, bytes]):
        def __getitem__(self, key: bytes) -> bytes:
            return {b"k": b"v"}[key]

        def __iter__(self):  # type: ignore[no-untyped-def]
            return iter([b"k"])

        def __len__(self) -> int:
            return 1

    bolt = open_bolt(write(tmp_path, build_bolt({b"m": Frozen()})))
    assert as_tree(bolt.root) == {b"m": {b"k": b"v"}}
