"""The pure-Python bolt reader and writer: round trips, encodings, speed.

Corruption and live-change retries are in ``test_bolt_corruption.py``; files written by the real
bbolt library and by a real containerd in ``test_bolt_real.py``.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bolt_cases import (
    SAMPLE,
    SAMPLE_SEQUENCES,
    TMP_PATH_OK,
    as_tree,
    count_entries,
    count_tree,
    pages_of_kind,
    sequences_of,
    walk,
    write,
)
from crifs.containerd.bolt import (
    PAGE_HEADER,
    PGID_NO_FREELIST,
    Bucket,
    open_bolt,
)
from crifs.containerd.boltwrite import (
    build_bolt,
    build_bolt_layout,
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
