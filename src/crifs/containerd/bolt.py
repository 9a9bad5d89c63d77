"""Read-only, lock-free reader of bbolt ("bolt DB") files such as containerd's ``meta.db``.

Contract:

- ``open_bolt`` reads the meta pages, then everything below the high-water mark with one read,
  through an ``O_RDONLY`` descriptor. It never
  takes a lock (a live containerd holds ``LOCK_EX`` for its whole lifetime, so bbolt's own
  ``LOCK_SH`` would hang), never writes and never maps the file.
- The whole tree reachable from the chosen meta page is decoded and checked at open time, so a
  returned ``BoltFile`` is complete and its ``Bucket`` methods never raise. Every defect raises
  ``CorruptStore`` with a one-line message naming the page (``page 12: header id is 7``).
- bbolt gives no isolation to readers outside its process: a commit may reuse pages of an older
  transaction. After decoding, the meta pages are read again; when the newest valid txid moved,
  the file is read again (``retries`` times) and ``StoreChanged`` is raised if it never settles.
  Corruption seen in a read that was followed by a meta change is treated as that change.

Byte layout (bbolt ``internal/common``; native byte order, little-endian on x86_64 and arm64):
page header ``id u64, flags u16, count u16, overflow u32``; meta body at page offset 16
``magic, version, pageSize, flags u32; root pgid, root sequence, freelist, hwm pgid, txid,
checksum u64``; leaf element ``flags, pos, ksize, vsize u32``; branch element ``pos, ksize u32,
pgid u64``; ``pos`` is relative to the element itself. A bucket value starts with
``root pgid u64, sequence u64``; ``root == 0`` means an inline bucket whose leaf page follows.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from crifs.containerd.encoding import read_gotime, read_uvarint, read_varint
from crifs.errors import BadInput, CorruptStore, NotFound, StoreChanged

__all__ = [
    "BoltFile",
    "Bucket",
    "fnv1a64",
    "open_bolt",
    "read_gotime",
    "read_uvarint",
    "read_varint",
]

MAGIC = 0xED0CDAED
VERSION = 2
BRANCH_PAGE = 0x01
LEAF_PAGE = 0x02
META_PAGE = 0x04
FREELIST_PAGE = 0x10
BUCKET_LEAF_FLAG = 0x01
PGID_NO_FREELIST = 0xFFFF_FFFF_FFFF_FFFF
_TREE_PAGE_FLAGS = (BRANCH_PAGE, LEAF_PAGE)

PAGE_HEADER = struct.Struct("<QHHI")
META_BODY = struct.Struct("<IIIIQQQQQQ")
BUCKET_HEADER = struct.Struct("<QQ")
INLINE_HEAD = struct.Struct("<QQQHHI")  # bucket header, then an inline page's header
INLINE_HEAD_SIZE = 32
ELEMENT_SIZE = 16
PAGE_HEADER_SIZE = 16  # PAGE_HEADER.size, as a constant for the hot loops
BUCKET_HEADER_SIZE = 16
META_CHECKSUMMED_BYTES = 56  # the meta body up to, not including, its checksum field

# bbolt probes the second meta at 1024 << i for i < 15 when the first is unreadable.
MIN_PAGE_SIZE = 1024
MAX_PAGE_SIZE = 1024 << 14
# containerd nests about 7 deep; the limit only stops crafted files from exhausting the stack.
MAX_BUCKET_DEPTH = 64

_FNV64_OFFSET = 0xCBF29CE484222325
_FNV64_PRIME = 0x100000001B3
_U64_MASK = 0xFFFF_FFFF_FFFF_FFFF

_PAGE_FLAG_NAMES = {
    BRANCH_PAGE: "branch",
    LEAF_PAGE: "leaf",
    META_PAGE: "meta",
    FREELIST_PAGE: "freelist",
}


def fnv1a64(data: bytes) -> int:
    """FNV-1a 64-bit hash (Go ``hash/fnv.New64a``), the bolt meta checksum."""
    value = _FNV64_OFFSET
    for byte in data:
        value = ((value ^ byte) * _FNV64_PRIME) & _U64_MASK
    return value


class Bucket:
    """One bolt bucket: the root bucket, a nested bucket on its own pages, or an inline bucket.

    Entries are in key order (bytes order, as bolt keeps them). A key holds either a plain value
    or a sub-bucket, never both; an empty value is a value, not a bucket.
    """

    __slots__ = ("_entries", "root_pgid", "sequence")

    def __init__(self, entries: dict[bytes, bytes | Bucket], sequence: int, root_pgid: int):
        self._entries = entries
        self.sequence = sequence  # the bucket's NextSequence() counter
        self.root_pgid = root_pgid  # 0 for an inline bucket

    @property
    def inline(self) -> bool:
        """True when the bucket is stored inside its parent's leaf value."""
        return self.root_pgid == 0

    def get(self, key: bytes) -> bytes | None:
        """The plain value at ``key``; None if absent or a sub-bucket."""
        value = self._entries.get(key)
        return value if isinstance(value, bytes) else None

    def bucket(self, key: bytes) -> Bucket | None:
        """The sub-bucket at ``key``; None if absent or a plain value."""
        value = self._entries.get(key)
        return value if isinstance(value, Bucket) else None

    def items(self) -> Iterator[tuple[bytes, bytes | Bucket]]:
        """All entries in key order."""
        return iter(self._entries.items())

    def buckets(self) -> Iterator[tuple[bytes, Bucket]]:
        """Only the sub-buckets, in key order."""
        for key, value in self._entries.items():
            if isinstance(value, Bucket):
                yield key, value

    def values(self) -> Iterator[tuple[bytes, bytes]]:
        """Only the plain values, as (key, value) pairs in key order."""
        for key, value in self._entries.items():
            if isinstance(value, bytes):
                yield key, value

    def keys(self) -> Iterator[bytes]:
        """All keys in order."""
        return iter(self._entries)

    def text_keys(self) -> tuple[str, ...]:
        """All keys in order, decoded as UTF-8 with ``surrogateescape`` (bytes survive)."""
        return tuple([key.decode("utf-8", "surrogateescape") for key in self._entries])

    def text_values(self) -> dict[str, str]:
        """Only the plain values, keys and values decoded as in :meth:`text_keys`."""
        return {
            key.decode("utf-8", "surrogateescape"): value.decode("utf-8", "surrogateescape")
            for key, value in self._entries.items()
            if type(value) is bytes
        }

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        where = "inline" if self.inline else f"root={self.root_pgid}"
        return f"<Bucket {where} sequence={self.sequence} entries={len(self._entries)}>"


@dataclass(frozen=True, slots=True)
class BoltFile:
    """A consistent, fully decoded snapshot of a bolt file at transaction ``txid``."""

    path: str
    page_size: int
    txid: int
    root: Bucket  # the bucket at meta.root; containerd's top level holds "v1"
    high_water_mark: int  # meta.pgid: first page id never allocated
    freelist_pgid: int  # PGID_NO_FREELIST for containerd's meta.db (NoFreelistSync)
    meta_page: int  # 0 or 1: which meta page was authoritative
    file_size: int


@dataclass(frozen=True, slots=True)
class _Meta:
    page: int
    page_size: int
    root: int
    sequence: int
    freelist: int
    high_water_mark: int
    txid: int


def open_bolt(
    path: str | os.PathLike[str],
    *,
    retries: int = 3,
    _after_read: Callable[[int], None] | None = None,
) -> BoltFile:
    """Read and fully decode the bolt file at ``path`` without locking it.

    Raises ``NotFound`` if it does not exist, ``BadInput`` if it is not a readable regular
    file, ``CorruptStore`` for any defect and ``StoreChanged`` if its meta pages kept moving
    over ``retries`` re-reads. ``_after_read(attempt)`` is a test hook run after each read of the
    file, before the meta pages are read again.
    """
    name = os.fspath(path)
    fd = _open_read_only(name)
    try:
        first_txid = None
        for attempt in range(retries + 1):
            meta: _Meta | None = None
            error: CorruptStore | None = None
            result: BoltFile | None = None
            data = b""
            size = os.fstat(fd).st_size
            try:
                meta = _choose_meta(_file_reader(fd), name, size)
                # Pages at or past the high-water mark are never referenced by a valid tree:
                # bbolt grows files ahead of use, so this often skips a large tail.
                data = _read_upto(fd, min(size, meta.high_water_mark * meta.page_size))
            except CorruptStore as exc:
                error = exc
            if _after_read is not None:
                _after_read(attempt)
            if meta is not None and error is None:
                try:
                    result = _Decoder(data, meta, name, size).decode()
                except CorruptStore as exc:
                    error = exc
            if first_txid is None and meta is not None:
                first_txid = meta.txid
            if _meta_identity(meta) == _meta_identity(_reread_meta(fd, name)):
                if result is not None:
                    return result
                assert error is not None
                raise error
        reread = _reread_meta(fd, name)
        now = reread.txid if reread is not None else "unreadable"
        raise StoreChanged(
            f"changed during {retries + 1} reads (meta txid {first_txid} -> {now}); "
            "a writer is committing, try again",
            path=name,
        )
    finally:
        os.close(fd)


def _open_read_only(name: str) -> int:
    # O_NONBLOCK so a FIFO planted at the path cannot block the open; it is rejected below.
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise NotFound("no such bolt file", path=name) from None
    except OSError as exc:
        raise BadInput(f"cannot open bolt file: {exc.strerror}", path=name) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise BadInput(f"is {kind}, expected a bolt database file", path=name)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_upto(fd: int, limit: int) -> bytes:
    """The file's first ``limit`` bytes (fewer if it ends sooner), in as few reads as it takes."""
    chunks: list[bytes] = []
    offset = 0
    while offset < limit:
        chunk = os.pread(fd, limit - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


_Reader = Callable[[int, int], bytes]


def _file_reader(fd: int) -> _Reader:
    return lambda offset, length: os.pread(fd, length, offset)


def _reread_meta(fd: int, name: str) -> _Meta | None:
    size = os.fstat(fd).st_size
    try:
        return _choose_meta(_file_reader(fd), name, size)
    except CorruptStore:
        return None


def _meta_identity(meta: _Meta | None) -> tuple[int, int] | None:
    return None if meta is None else (meta.txid, meta.page_size)


def _parse_meta(read: _Reader, offset: int, page: int) -> _Meta | str:
    """The meta page at ``offset``, or the reason it is invalid (bbolt's order of checks)."""
    raw = read(offset, PAGE_HEADER.size + META_BODY.size)
    if len(raw) < PAGE_HEADER.size + META_BODY.size:
        return "missing (file too short)"
    (magic, version, page_size, _flags, root, sequence, freelist, hwm, txid,
     checksum) = META_BODY.unpack_from(raw, PAGE_HEADER.size)
    if magic != MAGIC:
        return f"bad magic 0x{magic:08x}"
    if version != VERSION:
        return f"bad version {version}"
    body = raw[PAGE_HEADER.size : PAGE_HEADER.size + META_CHECKSUMMED_BYTES]
    if fnv1a64(body) != checksum:
        return "bad checksum"
    if not _valid_page_size(page_size):
        return f"bad page size {page_size}"
    return _Meta(page, page_size, root, sequence, freelist, hwm, txid)


def _valid_page_size(size: int) -> bool:
    return MIN_PAGE_SIZE <= size <= MAX_PAGE_SIZE and size & (size - 1) == 0


def _choose_meta(read: _Reader, name: str, file_size: int) -> _Meta:
    """Pick the valid meta with the higher txid, finding the page size as bbolt does."""
    if file_size == 0:
        raise CorruptStore("empty file, not a bolt database", path=name)
    if file_size < PAGE_HEADER.size + META_BODY.size:
        raise CorruptStore(f"file is {file_size} bytes, too short for a bolt database", path=name)
    meta0 = _parse_meta(read, 0, 0)
    meta1: _Meta | str
    if isinstance(meta0, _Meta):
        meta1 = _parse_meta(read, meta0.page_size, 1)
        if isinstance(meta1, _Meta) and meta1.page_size != meta0.page_size:
            meta1 = f"page size {meta1.page_size} differs from meta0's {meta0.page_size}"
    else:
        meta1 = _probe_second_meta(read)
    candidates = [m for m in (meta0, meta1) if isinstance(m, _Meta)]
    if not candidates:
        raise CorruptStore(
            f"both meta pages are invalid (meta0: {meta0}, meta1: {meta1})", path=name
        )
    # Ties go to meta0, as in bbolt's DB.meta().
    return max(candidates, key=lambda m: (m.txid, -m.page))


def _probe_second_meta(read: _Reader) -> _Meta | str:
    first_reason: str | None = None
    for shift in range(15):
        offset = MIN_PAGE_SIZE << shift
        meta = _parse_meta(read, offset, 1)
        if isinstance(meta, _Meta) and meta.page_size == offset:
            return meta
        if offset == 4096:
            first_reason = meta if isinstance(meta, str) else "page size does not match offset"
    return f"{first_reason} at offset 4096, no valid meta at any offset 1024<<i"


class _Decoder:
    """Decodes every page reachable from one meta, checking each as bbolt's FastCheck would."""

    def __init__(self, data: bytes, meta: _Meta, name: str, file_size: int) -> None:
        self.data = data
        self.file_size = file_size
        self.meta = meta
        self.name = name
        self.page_size = meta.page_size
        self.seen: set[int] = set()

    def decode(self) -> BoltFile:
        meta = self.meta
        entries = self._tree(meta.root, "meta", 0)
        root = Bucket(entries, meta.sequence, meta.root)
        return BoltFile(
            path=self.name,
            page_size=meta.page_size,
            txid=meta.txid,
            root=root,
            high_water_mark=meta.high_water_mark,
            freelist_pgid=meta.freelist,
            meta_page=meta.page,
            file_size=self.file_size,
        )

    def _corrupt(self, message: str) -> CorruptStore:
        return CorruptStore(message, path=self.name)

    def _page(self, pgid: int, referrer_where: _Where) -> tuple[int, int, int, int]:
        """Check page ``pgid`` and claim it; returns (offset, end, flags, count)."""
        hwm = self.meta.high_water_mark
        data = self.data
        size = len(data)
        page_size = self.page_size
        offset = pgid * page_size
        if 2 <= pgid < hwm and offset + page_size <= size:
            page_id, flags, count, overflow = PAGE_HEADER.unpack_from(data, offset)
            end = offset + (overflow + 1) * page_size
            seen = self.seen
            # The common page: one test for all checks; any failure is explained below.
            if (page_id == pgid and flags in _TREE_PAGE_FLAGS
                    and not overflow and end <= size
                    and PAGE_HEADER_SIZE + count * ELEMENT_SIZE <= page_size
                    and pgid not in seen):
                seen.add(pgid)
                return offset, end, flags, count
        return self._checked_page(pgid, referrer_where)

    def _checked_page(self, pgid: int, referrer_where: _Where) -> tuple[int, int, int, int]:
        """``_page`` with every check spelled out: overflow pages and all defects."""
        hwm = self.meta.high_water_mark
        if pgid < 2:
            raise self._corrupt(f"page {pgid}: {_place(referrer_where)} points to a meta page")
        if pgid >= hwm:
            raise self._corrupt(
                f"page {pgid}: beyond the high-water mark {hwm} "
                f"(referenced by {_place(referrer_where)})"
            )
        size = len(self.data)
        page_size = self.page_size
        offset = pgid * page_size
        if offset + page_size > size:
            raise self._corrupt(f"page {pgid}: beyond the end of the file ({size} bytes)")
        page_id, flags, count, overflow = PAGE_HEADER.unpack_from(self.data, offset)
        if page_id != pgid:
            raise self._corrupt(f"page {pgid}: header id is {page_id}")
        if flags != BRANCH_PAGE and flags != LEAF_PAGE:
            kind = _PAGE_FLAG_NAMES.get(flags, "invalid")
            raise self._corrupt(
                f"page {pgid}: flags 0x{flags:02x} ({kind}), expected a branch or leaf page"
            )
        last = pgid + overflow
        if last >= hwm:
            raise self._corrupt(
                f"page {pgid}: overflow {overflow} runs past the high-water mark {hwm}"
            )
        span = (overflow + 1) * page_size
        end = offset + span
        if end > size:
            raise self._corrupt(
                f"page {pgid}: overflow {overflow} runs past the end of the file ({size} bytes)"
            )
        if PAGE_HEADER_SIZE + count * ELEMENT_SIZE > span:
            raise self._corrupt(f"page {pgid}: {count} elements do not fit in the page")
        seen = self.seen
        for claimed in range(pgid, last + 1):
            if claimed in seen:
                raise self._corrupt(f"page cycle at page {claimed}")
            seen.add(claimed)
        return offset, end, flags, count

    def _tree(self, root: int, referrer: _Where, depth: int) -> dict[bytes, bytes | Bucket]:
        """All entries of the B+tree at ``root``, in key order, walked without recursion."""
        entries: dict[bytes, bytes | Bucket] = {}
        offset, end, flags, count = self._page(root, referrer)
        if flags == LEAF_PAGE:  # the usual small bucket: one leaf page, no stack needed
            self._leaf(offset + PAGE_HEADER_SIZE, end, count, entries, root, None, depth)
            return entries
        last_key: bytes | None = None
        stack = self._children(root, offset, end, count)
        while stack:
            pgid, referrer = stack.pop()
            offset, end, flags, count = self._page(pgid, referrer)
            if flags == LEAF_PAGE:
                last_key = self._leaf(offset + PAGE_HEADER_SIZE, end, count, entries,
                                      pgid, last_key, depth)
            else:
                stack += self._children(pgid, offset, end, count)
        return entries

    def _children(self, pgid: int, offset: int, end: int, count: int) -> list[tuple[int, _Where]]:
        """The children of branch page ``pgid``, last first (the order to push them)."""
        fields = _branch_struct(count).unpack_from(self.data, offset + PAGE_HEADER_SIZE)
        children: list[tuple[int, _Where]] = []
        element = offset + PAGE_HEADER_SIZE
        for index in range(count):
            pos, ksize, child = fields[3 * index : 3 * index + 3]
            if element + pos + ksize > end:
                raise self._corrupt(f"page {pgid}: branch element {index} out of bounds")
            children.append((child, pgid))
            element += ELEMENT_SIZE
        children.reverse()
        return children

    def _leaf(
        self,
        elements: int,
        limit: int,
        count: int,
        entries: dict[bytes, bytes | Bucket],
        where: _Where,
        last_key: bytes | None,
        depth: int,
    ) -> bytes | None:
        """Add the ``count`` leaf elements at ``elements`` (all data before ``limit``).

        This loop runs once per key in the file; keep it lean.
        """
        data = self.data
        layout = _LEAF_STRUCTS.get(count) or _leaf_struct(count)
        fields = iter(layout.unpack_from(data, elements))
        element = elements
        bucket = self._bucket
        for flags, pos, ksize, vsize in zip(fields, fields, fields, fields, strict=False):
            key_end = element + pos + ksize
            value_end = key_end + vsize
            if value_end > limit:
                index = (element - elements) // ELEMENT_SIZE
                raise self._corrupt(f"{_place(where)}: leaf element {index} out of bounds")
            key = data[key_end - ksize : key_end]
            if last_key is not None and key <= last_key:
                raise self._corrupt(f"{_place(where)}: key {_show(key)} is out of order")
            last_key = key
            if flags & BUCKET_LEAF_FLAG:
                entries[key] = bucket(key_end, value_end, key, where, depth + 1)
            else:
                entries[key] = data[key_end:value_end]
            element += ELEMENT_SIZE
        return last_key

    def _bucket(self, start: int, end: int, key: bytes, where: _Where, depth: int) -> Bucket:
        """Decode the bucket whose header and optional inline page are ``data[start:end]``."""
        # The common inline bucket (a record's labels, children): header and page header in
        # one unpack, all checks in one test; anything else takes the spelled-out path.
        size = end - start
        if size == BUCKET_HEADER_SIZE and depth <= MAX_BUCKET_DEPTH:
            root, sequence = BUCKET_HEADER.unpack_from(self.data, start)
            if root:
                return Bucket(self._tree(root, (where, "bucket", key), depth), sequence, root)
        elif size >= INLINE_HEAD_SIZE and depth <= MAX_BUCKET_DEPTH:
            root, sequence, _, flags, count, _ = INLINE_HEAD.unpack_from(self.data, start)
            elements = start + INLINE_HEAD_SIZE
            if root == 0 and flags == LEAF_PAGE and elements + count * ELEMENT_SIZE <= end:
                entries: dict[bytes, bytes | Bucket] = {}
                if count:
                    self._leaf(elements, end, count, entries, (where, "inline bucket", key),
                               None, depth)
                return Bucket(entries, sequence, 0)
        return self._checked_bucket(start, end, key, where, depth)

    def _checked_bucket(
        self, start: int, end: int, key: bytes, where: _Where, depth: int
    ) -> Bucket:
        """``_bucket`` with every check spelled out: nested buckets and all defects."""
        if depth > MAX_BUCKET_DEPTH or end - start < BUCKET_HEADER_SIZE:
            label = f"{_place(where)}: bucket {_show(key)}"
            if depth > MAX_BUCKET_DEPTH:
                raise self._corrupt(f"{label} is nested deeper than {MAX_BUCKET_DEPTH} buckets")
            raise self._corrupt(
                f"{label} value is {end - start} bytes, shorter than a bucket header"
            )
        data = self.data
        root, sequence = BUCKET_HEADER.unpack_from(data, start)
        if root != 0:
            return Bucket(self._tree(root, (where, "bucket", key), depth), sequence, root)
        page = start + BUCKET_HEADER_SIZE
        elements = page + PAGE_HEADER_SIZE
        if elements > end:
            raise self._corrupt(
                f"{_place(where)}: bucket {_show(key)} is inline but too short for a page header"
            )
        _, flags, count, _ = PAGE_HEADER.unpack_from(data, page)
        if flags != LEAF_PAGE or elements + count * ELEMENT_SIZE > end:
            label = f"{_place(where)}: bucket {_show(key)} is inline"
            if flags != LEAF_PAGE:
                raise self._corrupt(f"{label} with page flags 0x{flags:02x}, not a leaf")
            raise self._corrupt(f"{label} but its {count} elements do not fit")
        entries: dict[bytes, bytes | Bucket] = {}
        if count:
            self._leaf(elements, end, count, entries, (where, "inline bucket", key), None, depth)
        return Bucket(entries, sequence, 0)


# Where a page or element sits, formatted only for an error message: "meta", a page id, or
# (parent place, "bucket" | "inline bucket", key) for what a bucket value leads to.
_Where = int | str | tuple["_Where", str, bytes]


def _place(where: _Where) -> str:
    if isinstance(where, int):
        return f"page {where}"
    if isinstance(where, str):
        return where
    parent, kind, key = where
    return f"{_place(parent)}: {kind} {_show(key)}"


_LEAF_STRUCTS: dict[int, struct.Struct] = {}
_BRANCH_STRUCTS: dict[int, struct.Struct] = {}


def _leaf_struct(count: int) -> struct.Struct:
    # One unpack per page is much faster than one per element.
    cached = _LEAF_STRUCTS.get(count)
    if cached is None:
        cached = _LEAF_STRUCTS[count] = struct.Struct(f"<{4 * count}I")
    return cached


def _branch_struct(count: int) -> struct.Struct:
    cached = _BRANCH_STRUCTS.get(count)
    if cached is None:
        cached = _BRANCH_STRUCTS[count] = struct.Struct("<" + "IIQ" * count)
    return cached


def _show(key: bytes) -> str:
    """A key for a one-line message: its repr, shortened."""
    text = repr(key)
    return text if len(text) <= 60 else text[:57] + "..."
