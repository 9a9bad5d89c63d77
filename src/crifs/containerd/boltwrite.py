"""Build a new bbolt file from a nested dict, for ``crifs demo`` and tests.

This never edits an existing store: it lays out a fresh, compact file that the real bbolt
library opens, checks (``tx.Check``) and can keep writing to. A ``dict`` value is a bucket, a
``bytes`` value a plain value. Layout choices follow bbolt's own writer where readers can tell:

- a bucket with no sub-buckets whose inline page fits in ``page_size / 4`` is stored inline
  (``Bucket.inlineable``); every other bucket gets its own leaf pages, and branch pages when
  its entries need more than one leaf;
- an entry too large for one page gets overflow pages;
- meta0 and meta1 are both valid; the one with ``txid`` is authoritative and the other holds
  ``txid - 1`` with the same root, as if the last commit rewrote nothing else;
- by default there is no freelist page (``freelist = 0xFFFF...``, as in containerd's meta.db
  opened with ``NoFreelistSync``); ``freelist=True`` writes an empty freelist page at page 2.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar, Union

from crifs.containerd.bolt import (
    BRANCH_PAGE,
    BUCKET_HEADER,
    BUCKET_LEAF_FLAG,
    ELEMENT_SIZE,
    FREELIST_PAGE,
    LEAF_PAGE,
    MAGIC,
    MAX_PAGE_SIZE,
    META_BODY,
    META_CHECKSUMMED_BYTES,
    META_PAGE,
    MIN_PAGE_SIZE,
    PAGE_HEADER,
    PGID_NO_FREELIST,
    VERSION,
    fnv1a64,
)

__all__ = ["BoltLayout", "Tree", "build_bolt", "build_bolt_layout", "meta_page", "write_bolt"]

Tree = Mapping[bytes, Union[bytes, "Tree"]]
BucketPath = tuple[bytes, ...]
_T = TypeVar("_T")

MAX_KEY_SIZE = 32768  # bbolt MaxKeySize
MAX_VALUE_SIZE = (1 << 31) - 2  # bbolt MaxValueSize
_MAX_ELEMENTS_PER_PAGE = 0xFFFE  # node.write panics at 0xFFFF
_LEAF_ELEMENT = struct.Struct("<IIII")
_BRANCH_ELEMENT = struct.Struct("<IIQ")


@dataclass
class BoltLayout:
    """A built file plus where things landed, so tests can corrupt precise bytes."""

    data: bytes
    page_size: int
    txid: int
    high_water_mark: int
    bucket_roots: dict[BucketPath, int] = field(default_factory=dict)  # 0 = inline
    # "leaf", "branch", "leaf overflow", "branch overflow", "freelist", "free"
    page_kinds: dict[int, str] = field(default_factory=dict)
    page_owner: dict[int, BucketPath] = field(default_factory=dict)

    def page_offset(self, pgid: int) -> int:
        return pgid * self.page_size


def write_bolt(
    path: str | os.PathLike[str],
    tree: Tree,
    *,
    page_size: int = 4096,
    sequences: Mapping[BucketPath, int] | None = None,
    txid: int = 1,
    freelist: bool = False,
    mode: int = 0o600,
) -> None:
    """Write a new bolt file at ``path`` (replacing any file there atomically)."""
    data = build_bolt(tree, page_size=page_size, sequences=sequences, txid=txid,
                      freelist=freelist)
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    fd, temp = tempfile.mkstemp(prefix=".boltwrite-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, mode)
        os.replace(temp, target)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def build_bolt(
    tree: Tree,
    *,
    page_size: int = 4096,
    sequences: Mapping[BucketPath, int] | None = None,
    txid: int = 1,
    freelist: bool = False,
    first_pgid: int | None = None,
) -> bytes:
    """The bytes of a new bolt file holding ``tree``; see the module doc for the layout."""
    return build_bolt_layout(tree, page_size=page_size, sequences=sequences, txid=txid,
                             freelist=freelist, first_pgid=first_pgid).data


def build_bolt_layout(
    tree: Tree,
    *,
    page_size: int = 4096,
    sequences: Mapping[BucketPath, int] | None = None,
    txid: int = 1,
    freelist: bool = False,
    first_pgid: int | None = None,
) -> BoltLayout:
    """Like ``build_bolt`` but also report each bucket's root page and each page's kind.

    ``first_pgid`` starts the data pages later, leaving free pages before them (listed in the
    freelist page when there is one), as a file that has seen commits has. Raises ValueError
    for an unusable page size, txid, key, value or first page.
    """
    if not (MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE and page_size & (page_size - 1) == 0):
        raise ValueError(f"page size {page_size} is not a power of two in 1 KiB..16 MiB")
    if not 1 <= txid < (1 << 64):
        raise ValueError(f"txid {txid} must be at least 1 (meta txid-1 is written too)")
    lowest = 3 if freelist else 2
    start = lowest if first_pgid is None else first_pgid
    free_ids = list(range(lowest, start))
    if start < lowest or (freelist and 8 * (len(free_ids) + 1) > page_size - PAGE_HEADER.size):
        raise ValueError(f"first page {start} must be >= {lowest} and its free pages fit a page")
    builder = _Builder(page_size, dict(sequences or {}), first_pgid=start)
    root = builder.bucket_pages(tree, ())
    hwm = builder.next_pgid
    freelist_pgid = 2 if freelist else PGID_NO_FREELIST
    root_sequence = builder.sequences.get((), 0)

    out = bytearray(hwm * page_size)
    for slot_txid in (txid - 1, txid):
        slot = slot_txid % 2
        out[slot * page_size : slot * page_size + page_size] = meta_page(
            page_size=page_size, root=root, sequence=root_sequence, freelist=freelist_pgid,
            high_water_mark=hwm, txid=slot_txid,
        )
    if freelist:
        PAGE_HEADER.pack_into(out, 2 * page_size, 2, FREELIST_PAGE, len(free_ids), 0)
        struct.pack_into(f"<{len(free_ids)}Q", out, 2 * page_size + PAGE_HEADER.size, *free_ids)
        builder.layout_kinds[2] = "freelist"
    for free in free_ids:
        builder.layout_kinds[free] = "free"
    for pgid, page in builder.pages:
        out[pgid * page_size : pgid * page_size + len(page)] = page
    return BoltLayout(
        data=bytes(out), page_size=page_size, txid=txid, high_water_mark=hwm,
        bucket_roots=builder.bucket_roots, page_kinds=builder.layout_kinds,
        page_owner=builder.page_owner,
    )


def meta_page(
    *,
    page_size: int,
    root: int,
    sequence: int,
    freelist: int,
    high_water_mark: int,
    txid: int,
    magic: int = MAGIC,
    version: int = VERSION,
) -> bytes:
    """One meta page (``page_size`` bytes) with a correct checksum, stored in slot txid % 2."""
    body = bytearray(META_BODY.size)
    META_BODY.pack_into(body, 0, magic, version, page_size, 0, root, sequence, freelist,
                        high_water_mark, txid, 0)
    checksum = fnv1a64(bytes(body[:META_CHECKSUMMED_BYTES]))
    struct.pack_into("<Q", body, META_CHECKSUMMED_BYTES, checksum)
    page = bytearray(page_size)
    PAGE_HEADER.pack_into(page, 0, txid % 2, META_PAGE, 0, 0)
    page[PAGE_HEADER.size : PAGE_HEADER.size + META_BODY.size] = body
    return bytes(page)


class _Builder:
    """Allocates pages bottom-up: sub-buckets before the leaves that point at them."""

    def __init__(self, page_size: int, sequences: dict[BucketPath, int], first_pgid: int):
        self.page_size = page_size
        self.sequences = sequences
        self.next_pgid = first_pgid
        self.pages: list[tuple[int, bytes]] = []
        self.bucket_roots: dict[BucketPath, int] = {}
        self.layout_kinds: dict[int, str] = {}
        self.page_owner: dict[int, BucketPath] = {}

    def bucket_value(self, tree: Tree, path: BucketPath) -> bytes:
        """The value stored under a sub-bucket's key: header, plus the page if inline."""
        entries = self._entries(tree, path)
        sequence = self._sequence(path)
        if self._inlineable(entries):
            self.bucket_roots[path] = 0
            return BUCKET_HEADER.pack(0, sequence) + _leaf_page(0, entries, self.page_size)
        return BUCKET_HEADER.pack(self._tree_pages(entries, path), sequence)

    def bucket_pages(self, tree: Tree, path: BucketPath) -> int:
        """Write a bucket on its own pages (always, for the root bucket); return its root."""
        self._sequence(path)
        return self._tree_pages(self._entries(tree, path), path)

    def _sequence(self, path: BucketPath) -> int:
        sequence = self.sequences.get(path, 0)
        if not 0 <= sequence < (1 << 64):
            raise ValueError(f"sequence {sequence} of bucket {path!r} is not a u64")
        return sequence

    def _entries(self, tree: Tree, path: BucketPath) -> list[tuple[int, bytes, bytes]]:
        entries: list[tuple[int, bytes, bytes]] = []
        for key in sorted(tree):
            if not isinstance(key, bytes) or not 0 < len(key) <= MAX_KEY_SIZE:
                raise ValueError(f"bucket {path!r}: key {key!r} must be 1..{MAX_KEY_SIZE} bytes")
            value = tree[key]
            if isinstance(value, bytes):
                if len(value) > MAX_VALUE_SIZE:
                    raise ValueError(f"bucket {path!r}: value of {key!r} is too large")
                entries.append((0, key, value))
            elif isinstance(value, Mapping):
                entries.append((BUCKET_LEAF_FLAG, key, self.bucket_value(value, (*path, key))))
            else:
                raise ValueError(f"bucket {path!r}: {key!r} maps to {type(value).__name__}")
        return entries

    def _inlineable(self, entries: list[tuple[int, bytes, bytes]]) -> bool:
        size = PAGE_HEADER.size
        for flags, key, value in entries:
            if flags & BUCKET_LEAF_FLAG:
                return False
            size += ELEMENT_SIZE + len(key) + len(value)
        return size <= self.page_size // 4

    def _allocate(self, size: int) -> int:
        pgid = self.next_pgid
        self.next_pgid += -(-size // self.page_size)
        return pgid

    def _tree_pages(self, entries: list[tuple[int, bytes, bytes]], path: BucketPath) -> int:
        level: list[tuple[bytes, int]] = []
        for chunk in _chunks(entries, self.page_size, lambda e: len(e[1]) + len(e[2])):
            pgid = self._allocate(_page_size_of(chunk, lambda e: len(e[1]) + len(e[2])))
            self._add_page(pgid, _leaf_page(pgid, chunk, self.page_size), "leaf", path)
            level.append((chunk[0][1] if chunk else b"", pgid))
        while len(level) > 1:
            parents: list[tuple[bytes, int]] = []
            for group in _chunks(level, self.page_size, lambda e: len(e[0])):
                pgid = self._allocate(_page_size_of(group, lambda e: len(e[0])))
                self._add_page(pgid, _branch_page(pgid, group, self.page_size), "branch", path)
                parents.append((group[0][0], pgid))
            level = parents
        self.bucket_roots[path] = level[0][1]
        return level[0][1]

    def _add_page(self, pgid: int, page: bytes, kind: str, path: BucketPath) -> None:
        self.pages.append((pgid, page))
        for covered in range(pgid, pgid + len(page) // self.page_size):
            self.layout_kinds[covered] = kind if covered == pgid else f"{kind} overflow"
            self.page_owner[covered] = path


def _chunks(items: list[_T], page_size: int, data_size: Callable[[_T], int]) -> list[list[_T]]:
    """Split items into pages greedily; a page always takes at least one item."""
    chunks: list[list[_T]] = []
    current: list[_T] = []
    size = PAGE_HEADER.size
    for item in items:
        item_size = ELEMENT_SIZE + data_size(item)
        if current and (size + item_size > page_size or len(current) >= _MAX_ELEMENTS_PER_PAGE):
            chunks.append(current)
            current, size = [], PAGE_HEADER.size
        current.append(item)
        size += item_size
    chunks.append(current)  # an empty bucket still has one (empty) leaf page
    return chunks


def _page_size_of(chunk: list[_T], data_size: Callable[[_T], int]) -> int:
    return PAGE_HEADER.size + sum(ELEMENT_SIZE + data_size(item) for item in chunk)


def _leaf_page(pgid: int, entries: list[tuple[int, bytes, bytes]], page_size: int) -> bytes:
    """A leaf page (padded to whole pages), or an inline page (unpadded) when pgid is 0."""
    body = bytearray()
    elements = bytearray()
    data_start = ELEMENT_SIZE * len(entries)
    for index, (flags, key, value) in enumerate(entries):
        pos = data_start + len(body) - ELEMENT_SIZE * index
        elements += _LEAF_ELEMENT.pack(flags, pos, len(key), len(value))
        body += key
        body += value
    page = PAGE_HEADER.pack(pgid, LEAF_PAGE, len(entries), 0) + elements + body
    return _pad(pgid, page, page_size)


def _branch_page(pgid: int, children: list[tuple[bytes, int]], page_size: int) -> bytes:
    body = bytearray()
    elements = bytearray()
    data_start = ELEMENT_SIZE * len(children)
    for index, (key, child) in enumerate(children):
        pos = data_start + len(body) - ELEMENT_SIZE * index
        elements += _BRANCH_ELEMENT.pack(pos, len(key), child)
        body += key
    page = PAGE_HEADER.pack(pgid, BRANCH_PAGE, len(children), 0) + elements + body
    return _pad(pgid, page, page_size)


def _pad(pgid: int, page: bytes, page_size: int) -> bytes:
    if pgid == 0:
        return page
    pages = -(-len(page) // page_size)
    if pages > 1:
        page = page[:12] + struct.pack("<I", pages - 1) + page[16:]
    return page + bytes(pages * page_size - len(page))
