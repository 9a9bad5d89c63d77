"""Shared helpers for the bolt reader/writer tests: sample trees, writers, corrupters."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck

from crifs.containerd.bolt import (
    PGID_NO_FREELIST,
    BoltFile,
    Bucket,
    open_bolt,
)
from crifs.containerd.boltwrite import (
    BoltLayout,
    build_bolt_layout,
    meta_page,
)
from crifs.containerd.encoding import (
    encode_gotime,
)

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
