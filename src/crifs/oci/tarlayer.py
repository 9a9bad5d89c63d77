"""One layer tar read into a ``LayerListing``: headers only, nothing extracted, no data read.

The tar is streamed once with libarchive (through libarchive-c's ctypes binding, with a loop of
our own: three C calls for a plain member), which detects the compression from the data (gzip,
zstd, xz, bzip2, none) and reads ustar, pax and GNU headers; data blocks are skipped (seeked
over when the input is uncompressed and seekable). Python's ``tarfile`` is the fallback where
libarchive cannot be loaded; it is several times slower. (A header parser in Python was tried
for uncompressed tars: only ~20% faster than this loop on 100k members, not worth a second
parser of a format with this many dialects.)

Member names are the exact bytes of the header in both readers: libarchive's multibyte accessor
returns them unconverted even when they are not valid in the current locale (a pax ``path`` that
is not UTF-8, a GNU name in Latin-1); tarfile decodes with ``surrogateescape`` and encodes back.

Contract of :func:`read_layer_tar`:

- names are normalised with ``crifs.fs.listing.normalize``; an absolute name is read relative
  to the root and noted as a problem; a name that climbs out of the root (``../x``) is skipped
  and noted; the root itself (``./``) is not an entry;
- deletion markers go to ``whiteouts``/``opaque`` as ``crifs.oci.whiteout.tar_marker`` says;
  other aufs metadata (``.wh..wh.plnk`` …) is dropped;
- regular files and directories share ``PLAIN_FILE``/``PLAIN_DIR`` (as a directory walk stores
  them; the link audit needs only their kind) unless ``details=True``; symlinks, hard links
  and devices keep mode, size and owner, and are the listing's ``notable`` entries (``None``
  with ``details=True``);
- a hard link becomes ``EntryKind.HARDLINK`` whose ``target`` is the normalised path of the
  member it names (a link out of the root is skipped and noted);
- a path given twice: the later member wins and a problem is noted (the spec forbids it);
- a truncated or corrupt archive raises ``CorruptStore`` naming the file (and the layer's
  digest) with libarchive's own words, on one line; an empty input is an empty layer, and an
  archive cut exactly between two members (no end-of-archive blocks) cannot be told from a
  complete one, by us or by tar. Problems of one kind are noted :data:`MAX_EXAMPLES` times,
  then counted.
"""

from __future__ import annotations

import ctypes
import io
import os
import tarfile
from collections.abc import Callable, Iterator
from typing import IO, Any, BinaryIO, Literal

from crifs.errors import CorruptStore, NotFound
from crifs.fs.gcpause import gc_paused
from crifs.fs.listing import PLAIN_DIR, PLAIN_FILE, Entry, EntryKind, LayerListing, normalize
from crifs.oci import whiteout

MAX_EXAMPLES = 20  # problems of one kind spelled out before they are only counted
PROGRESS_EVERY = 8192  # members between two progress calls
_BLOCK = 1 << 20
_SHOWN_NAME = 160  # a 4096-byte name is cut in messages

# libarchive return codes and file types (archive.h, archive_entry.h)
_EOF, _WARN = 1, -20  # ARCHIVE_EOF; ARCHIVE_WARN (below it: FAILED, FATAL)
_AE_IFMT, _AE_IFREG, _AE_IFDIR = 0o170000, 0o100000, 0o040000
_KIND_OF_TYPE = {
    0o100000: EntryKind.FILE,
    0o040000: EntryKind.DIR,
    0o120000: EntryKind.SYMLINK,
    0o020000: EntryKind.CHAR,
    0o060000: EntryKind.BLOCK,
    0o010000: EntryKind.FIFO,
    0o140000: EntryKind.SOCKET,
}

# (raw name, kind, raw link target, permission bits, size, uid, gid)
Member = tuple[bytes, EntryKind, bytes, int, int, int, int]

Engine = Literal["auto", "libarchive", "tarfile"]


def read_layer_tar(
    source: LayerSource,
    *,
    index: int,
    name: str,
    ident: str | None = None,
    details: bool = False,
    engine: Engine = "auto",
    progress: Callable[[int], None] | None = None,
) -> LayerListing:
    """The listing of the layer tar ``source``: a path, a :class:`FileRange` or a readable
    binary stream (read from its current position, not closed).

    ``details``: keep mode, size and owner of regular files and directories too. ``engine``:
    ``auto`` (libarchive, else tarfile) or one reader only (for tests). ``progress``: told the
    number of members read so far every :data:`PROGRESS_EVERY` members and at the end. Raises
    ``NotFound`` when a path does not exist and ``CorruptStore`` for a truncated, corrupt or
    non-tar input.
    """
    origin = _origin(source)

    builder = _ListingBuilder(LayerListing(index=index, name=name, ident=ident, source=origin),
                             details, progress)
    try:
        with gc_paused():
            reader = _libarchive_reader() if engine != "tarfile" else None
            if reader is not None:
                reader.read(source, builder)
            elif engine == "libarchive":
                raise _ArchiveError("libarchive is not available")
            else:
                for member in _tarfile_members(source):
                    builder.add(*member)
                    builder.members += 1
                    if progress is not None and not builder.members % PROGRESS_EVERY:
                        progress(builder.members)
    except _ArchiveError as err:
        what = f"layer {ident}" if ident else name
        raise CorruptStore(f"{what}: unreadable tar: {err}", path=origin) from None
    builder.finish()
    if progress is not None:
        progress(builder.members)
    return builder.listing


def _origin(source: LayerSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fsdecode(source)
    label = getattr(source, "name", None)
    return os.fsdecode(label) if isinstance(label, (str, bytes)) else "<stream>"


class _ArchiveError(Exception):
    """The archive cannot be read on; ``str()`` is one line for the user."""


# -- turning members into a listing ------------------------------------------------------------


class _ListingBuilder:
    """Adds members to a listing and records what it had to tolerate (at most MAX_EXAMPLES
    sentences per kind of problem, then a count)."""

    def __init__(self, listing: LayerListing, details: bool,
                 progress: Callable[[int], None] | None = None) -> None:
        self.listing = listing
        self.progress = progress
        self.members = 0  # read so far, deletion markers and skipped members included
        self.entries = listing.entries
        self.details = details
        self.counts: dict[str, int] = {}
        # every entry that is not a shared plain one goes through ``add``: consumers of the
        # listing look only at these (with ``details`` every entry is its own: none kept)
        self.notable: dict[bytes, Entry] | None = None if details else {}
        listing.notable = self.notable

    def problem(self, kind: str, message: str) -> None:
        seen = self.counts.get(kind, 0) + 1
        self.counts[kind] = seen
        if seen <= MAX_EXAMPLES:
            self.listing.problems.append(message)

    def plain(self, raw: bytes, entry: Entry) -> None:
        """Add a member whose entry needs no link handling (the hot path of every reader)."""
        key = self.key(raw, entry.kind)
        if key is None:
            return
        raw = key
        entries = self.entries
        if raw in entries:
            self.duplicate(raw)
            if self.notable:
                self.notable.pop(raw, None)
        entries[raw] = entry

    def key(self, raw: bytes, kind: EntryKind) -> bytes | None:
        """``path``, with a quick answer for the common name that is normal already."""
        # Most names are normal already; the rest, and every deletion marker (".wh." starts
        # the name or follows a "/"), go through ``path``. The tests run on a latin-1 view:
        # ``in`` on str is several times faster than on bytes in CPython 3.11.
        if raw[:2] == b"./":
            raw = raw[2:]
        text = raw.decode("latin-1")
        if (not text or text[0] in "./" or text[-1] == "/" or "/." in text
                or "//" in text):
            return self.path(raw, kind)
        return raw

    def path(self, raw: bytes, kind: EntryKind) -> bytes | None:
        """The normalised path of a member, ``None`` when it is skipped (problems noted) or is a
        deletion marker (recorded as such)."""
        path = normalize(raw)
        if path is None:
            self.problem("escape", f"member {_show(raw)} climbs out of the layer root; skipped")
            return None
        if raw[:1] == b"/":
            self.problem("absolute", f"absolute member name {_show(raw)} read as /{_show(path)}")
        if not path:
            if kind is not EntryKind.DIR:
                self.problem("root", f"member {_show(raw)} names the root but is a {kind}; "
                                     "skipped")
            return None
        marker = whiteout.tar_marker(path)
        if marker is not None:
            what, marked = marker
            if what == whiteout.WHITEOUT:
                self.listing.whiteouts.add(marked)
            elif what == whiteout.OPAQUE:
                self.listing.opaque.add(marked)
            return None
        return path

    def duplicate(self, path: bytes) -> None:
        self.problem("duplicate", f"{_show(path)} is in the layer twice; the later member wins")

    def add(self, raw: bytes, kind: EntryKind, link: bytes, mode: int, size: int, uid: int,
            gid: int) -> None:
        """Add any member; ``link`` is the raw symlink text or hard-link member name."""
        if not self.details and kind is EntryKind.FILE:
            self.plain(raw, PLAIN_FILE)
            return
        if not self.details and kind is EntryKind.DIR:
            self.plain(raw, PLAIN_DIR)
            return
        path = self.key(raw, kind)
        if path is None:
            return
        if kind is EntryKind.HARDLINK:
            target = normalize(link)
            if not target:
                self.problem("escape", f"hard link {_show(path)} -> {_show(link)} leaves the "
                                       "layer root; skipped")
                return
            if link[:1] == b"/":
                self.problem("absolute", f"hard link {_show(path)} has an absolute target "
                                         f"{_show(link)}, read as /{_show(target)}")
            link = target
        if path in self.entries:
            self.duplicate(path)
        entry = self.entries[path] = Entry(kind, link, mode, size, uid, gid)
        if self.notable is not None:
            self.notable[path] = entry

    def finish(self) -> None:
        for kind, count in self.counts.items():
            if count > MAX_EXAMPLES:
                self.listing.problems.append(
                    f"... and {count - MAX_EXAMPLES} more problems of the same kind ({kind})")


def _show(name: bytes) -> str:
    text = name.decode("utf-8", "backslashreplace")
    return text if len(text) <= _SHOWN_NAME else text[:_SHOWN_NAME] + "…"


# -- sources -------------------------------------------------------------------------------------


class FileRange(io.RawIOBase):
    """A read-only, seekable view of ``size`` bytes at ``start`` of the open file ``fd``
    (``pread``, so several ranges may share one descriptor; the caller owns and closes it).
    ``name`` says where the bytes are in messages (``archive.tar:blobs/sha256/…``)."""

    def __init__(self, fd: int, start: int, size: int, name: str) -> None:
        super().__init__()
        self.fd, self.start, self.size, self._pos = fd, start, size, 0
        self.name = name

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self.size - self._pos)
        if want <= 0:
            return 0
        got = os.preadv(self.fd, [memoryview(buffer)[:want]], self.start + self._pos)
        self._pos += got
        return got

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


LayerSource = str | os.PathLike[str] | FileRange | BinaryIO | IO[bytes]


# -- libarchive --------------------------------------------------------------------------------

_READ_CB = ctypes.CFUNCTYPE(ctypes.c_ssize_t, ctypes.c_void_p, ctypes.c_void_p,
                            ctypes.POINTER(ctypes.c_void_p))
_SEEK_CB = ctypes.CFUNCTYPE(ctypes.c_longlong, ctypes.c_void_p, ctypes.c_void_p,
                            ctypes.c_longlong, ctypes.c_int)


class _Libarchive:
    """The few libarchive calls a listing needs, bound without libarchive-c's error checks
    (which log a warning per unconvertible name) so return codes are handled here."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        vp, ci, cp = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p

        def bind(name: str, argtypes: list[Any], restype: Any) -> Any:
            # lib[...] makes a fresh function object: libarchive-c's shared ones carry errcheck
            function = lib["archive_" + name]
            function.argtypes = argtypes
            function.restype = restype
            return function

        self.read_new = bind("read_new", [], vp)
        self.read_free = bind("read_free", [vp], ci)
        self.support_filter_all = bind("read_support_filter_all", [vp], ci)
        self.support_format_tar = bind("read_support_format_tar", [vp], ci)
        self.support_format_empty = bind("read_support_format_empty", [vp], ci)
        self.open_fd = bind("read_open_fd", [vp, ci, ctypes.c_size_t], ci)
        self.open_callbacks = bind("read_open2", [vp, vp, vp, _READ_CB, vp, vp], ci)
        self.set_seek = bind("read_set_seek_callback", [vp, _SEEK_CB], ci)
        self.next_header2 = bind("read_next_header2", [vp, vp], ci)
        self.error_string = bind("error_string", [vp], cp)
        self.entry_new = bind("entry_new", [], vp)
        self.entry_free = bind("entry_free", [vp], None)
        self.pathname = bind("entry_pathname", [vp], cp)
        self.filetype = bind("entry_filetype", [vp], ctypes.c_uint)
        self.perm = bind("entry_perm", [vp], ctypes.c_uint)
        self.size = bind("entry_size", [vp], ctypes.c_int64)
        self.uid = bind("entry_uid", [vp], ctypes.c_int64)
        self.gid = bind("entry_gid", [vp], ctypes.c_int64)
        self.hardlink = bind("entry_hardlink", [vp], cp)
        self.symlink = bind("entry_symlink", [vp], cp)

    def read(self, source: LayerSource, builder: _ListingBuilder) -> None:
        """Add every member of ``source`` to ``builder``."""
        archive = self.read_new()
        if not archive:
            raise MemoryError("archive_read_new")
        failure: list[BaseException] = []
        keep: list[object] = []  # callbacks must outlive the archive
        fd = -1
        try:
            self.support_filter_all(archive)
            self.support_format_tar(archive)
            self.support_format_empty(archive)
            if isinstance(source, (str, os.PathLike)):
                fd = _open_file(source)
                rc = self.open_fd(archive, fd, _BLOCK)
            else:
                rc = self._open_stream(archive, source, failure, keep)
            if rc < _WARN:
                self._fail(archive, failure)
            self._members(archive, builder, failure)
        finally:
            self.read_free(archive)
            if fd >= 0:
                os.close(fd)

    def _open_stream(self, archive: int, stream: FileRange | BinaryIO | IO[bytes],
                     failure: list[BaseException], keep: list[object]) -> int:
        buffer = ctypes.create_string_buffer(_BLOCK)
        address = ctypes.cast(buffer, ctypes.c_void_p)
        view = memoryview(buffer).cast("B")
        readinto = getattr(stream, "readinto", None)

        def read_cb(_a: int, _c: int, out: Any) -> int:
            try:
                if readinto is not None:
                    n = readinto(view)
                else:
                    chunk = stream.read(_BLOCK)
                    n = len(chunk)
                    view[:n] = chunk
                out[0] = address.value
                return n or 0
            except BaseException as err:  # noqa: BLE001 - must not unwind through C
                failure.append(err)
                return -1

        def seek_cb(_a: int, _c: int, offset: int, whence: int) -> int:
            try:
                return stream.seek(offset, whence)
            except BaseException as err:  # noqa: BLE001 - must not unwind through C
                failure.append(err)
                return -1

        read_c, seek_c = _READ_CB(read_cb), _SEEK_CB(seek_cb)
        keep += [buffer, read_c, seek_c]
        try:
            seekable = stream.seekable()
        except (AttributeError, OSError, ValueError):
            seekable = False
        if seekable:
            self.set_seek(archive, seek_c)
        return int(self.open_callbacks(archive, None, None, read_c, None, None))

    def _members(self, archive: int, builder: _ListingBuilder,
                 failure: list[BaseException]) -> None:
        # The hot loop: three C calls for a plain file or directory; pointers are passed as
        # c_void_p objects, which ctypes converts faster than ints.
        entry = ctypes.c_void_p(self.entry_new())
        handle = ctypes.c_void_p(archive)
        next_header, pathname, filetype = self.next_header2, self.pathname, self.filetype
        hardlink, symlink, perm = self.hardlink, self.symlink, self.perm
        size, uid, gid = self.size, self.uid, self.gid
        plain, add, entries = builder.plain, builder.add, builder.entries
        file_entry, dir_entry = (None, None) if builder.details else (PLAIN_FILE, PLAIN_DIR)
        kinds, file_kind = _KIND_OF_TYPE, EntryKind.FILE
        progress, every = builder.progress, PROGRESS_EVERY
        members = 0
        try:
            while True:
                rc = next_header(handle, entry)
                if rc == _EOF:
                    return
                members += 1
                if progress is not None and not members % every:
                    builder.members = members
                    progress(members)
                if rc < _WARN:  # _WARN is only an unconvertible name: the bytes are intact
                    self._fail(archive, failure)
                raw = pathname(entry) or b""
                ftype = filetype(entry) & _AE_IFMT
                link = None
                if ftype == _AE_IFDIR:
                    plain_entry = dir_entry
                    if raw[-1:] == b"/":
                        raw = raw[:-1]
                elif ftype == _AE_IFREG or ftype == 0:  # libarchive gives hard links type 0
                    link = hardlink(entry)
                    plain_entry = file_entry if link is None else None
                else:
                    plain_entry = None
                if plain_entry is not None:
                    # _ListingBuilder.plain inlined for the common case (the test of its key).
                    text = raw.decode("latin-1")
                    if (not text or text[0] in "./" or text[-1] == "/" or "/." in text
                            or "//" in text or raw in entries):
                        plain(raw, plain_entry)
                    else:
                        entries[raw] = plain_entry
                    continue
                if link is not None:
                    kind = EntryKind.HARDLINK
                else:
                    kind = kinds.get(ftype, file_kind)
                    link = (symlink(entry) or b"") if kind is EntryKind.SYMLINK else b""
                add(raw, kind, link, perm(entry), size(entry), uid(entry), gid(entry))
        finally:
            builder.members = members
            self.entry_free(entry)

    def _fail(self, archive: int, failure: list[BaseException]) -> None:
        if failure:
            err = failure[0]
            detail = os.strerror(err.errno) if isinstance(err, OSError) and err.errno else err
            raise _ArchiveError(f"reading failed: {detail}")
        message = self.error_string(archive)
        text = message.decode("utf-8", "replace") if message else "unknown libarchive error"
        raise _ArchiveError(" ".join(text.split()))


def _open_file(path: str | os.PathLike[str]) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound("layer file does not exist", path=os.fsdecode(path)) from None
    except OSError as err:
        raise CorruptStore(f"cannot open: {os.strerror(err.errno or 0)}",
                           path=os.fsdecode(path)) from None


_LIBARCHIVE: list[_Libarchive | None] = []


def _libarchive_reader() -> _Libarchive | None:
    """The bound library, or ``None`` when libarchive-c or libarchive.so is missing."""
    if not _LIBARCHIVE:
        try:
            from libarchive import ffi  # type: ignore[import-untyped]

            _LIBARCHIVE.append(_Libarchive(ffi.libarchive))
        except (ImportError, OSError, AttributeError):
            _LIBARCHIVE.append(None)
    return _LIBARCHIVE[0]


# -- tarfile fallback --------------------------------------------------------------------------

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_TARFILE_KINDS = {
    tarfile.REGTYPE: EntryKind.FILE, tarfile.AREGTYPE: EntryKind.FILE,
    tarfile.CONTTYPE: EntryKind.FILE, tarfile.GNUTYPE_SPARSE: EntryKind.FILE,
    tarfile.DIRTYPE: EntryKind.DIR, tarfile.SYMTYPE: EntryKind.SYMLINK,
    tarfile.LNKTYPE: EntryKind.HARDLINK, tarfile.CHRTYPE: EntryKind.CHAR,
    tarfile.BLKTYPE: EntryKind.BLOCK, tarfile.FIFOTYPE: EntryKind.FIFO,
}


def _tarfile_members(source: LayerSource) -> Iterator[Member]:
    """Members read with ``tarfile`` in stream mode (zstd through ``zstandard``)."""
    owned: IO[bytes] | None = None
    stream: Any
    if isinstance(source, (str, os.PathLike)):
        fd = _open_file(source)
        owned = stream = os.fdopen(fd, "rb")
    elif isinstance(source, FileRange):
        stream = io.BufferedReader(source)
    else:
        stream = source
    try:
        head = _peek(stream, 4)
        if not head:
            return  # an empty input is an empty layer, as libarchive reads it
        if head == _ZSTD_MAGIC:
            import zstandard

            stream = zstandard.ZstdDecompressor().stream_reader(stream)
        errors: tuple[type[BaseException], ...] = (tarfile.TarError, EOFError, OSError,
                                                    ValueError)
        try:
            import zstandard

            errors += (zstandard.ZstdError,)
        except ImportError:
            pass
        try:
            with tarfile.open(fileobj=stream, mode="r|*", encoding="utf-8",
                              errors="surrogateescape") as tar:
                for info in tar:
                    yield _tarfile_member(info)
        except errors as err:
            raise _ArchiveError(" ".join(str(err).split()) or type(err).__name__) from None
    finally:
        if owned is not None:
            owned.close()


def _peek(stream: IO[bytes], n: int) -> bytes:
    """The first ``n`` bytes of ``stream``, leaving it where it was: the stream must be
    buffered (have ``peek``) or seekable."""
    peek = getattr(stream, "peek", None)
    if peek is not None:
        return bytes(peek(n)[:n])
    position = stream.tell()
    head = stream.read(n)
    stream.seek(position)
    return head


def _tarfile_member(info: tarfile.TarInfo) -> Member:
    def raw(text: str) -> bytes:
        return text.encode("utf-8", "surrogateescape")

    kind = _TARFILE_KINDS.get(info.type, EntryKind.FILE)
    name = raw(info.name)
    if kind is EntryKind.DIR and not name.endswith(b"/"):
        name += b"/"
    link = raw(info.linkname) if kind in (EntryKind.SYMLINK, EntryKind.HARDLINK) else b""
    return (name, kind, link, info.mode & 0o7777, info.size, info.uid, info.gid)
