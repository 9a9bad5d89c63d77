"""Where the bytes of an image source are: the members of an OCI layout or unpacked
``docker save`` directory, or of an uncompressed archive of one, by normalised relative name.

An archive is never extracted: it is scanned once (``tarfile``, headers only) for member
offsets, and each member is read in place with ``pread``, small JSON documents whole, layers as
a ``FileRange`` streamed into ``read_layer_tar``. A member that is a symlink or hard link to
another one is followed inside the archive only (at most :data:`MAX_MEMBER_LINKS` links).
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from crifs.errors import BadInput, CorruptStore, UnsafePath, Unsupported
from crifs.fs.listing import normalize
from crifs.oci.tarlayer import FileRange, LayerSource

MAX_JSON = 64 << 20  # the largest JSON document (index, manifest, config) read whole
MAX_MEMBER_LINKS = 16
_COMPRESSED = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"\xfd7zXZ\x00": "xz",
               b"BZh": "bzip2"}


class CompressedArchive(Unsupported):
    """A compressed outer archive (crifs reads compressed layers, not compressed archives)."""


class SourceFiles:
    """Members of a layout root or an archive, by normalised relative name."""

    label: str

    def exists(self, member: str) -> bool:
        raise NotImplementedError

    def where(self, member: str) -> str:
        raise NotImplementedError

    def has_dir(self, member: str) -> bool:
        raise NotImplementedError

    def read(self, member: str, what: str) -> bytes:
        """A small member's bytes; ``CorruptStore`` naming it when missing or too big."""
        raise NotImplementedError

    @contextmanager
    def session(self) -> Iterator[None]:
        yield

    @contextmanager
    def layer(self, member: str, what: str) -> Iterator[LayerSource]:
        raise NotImplementedError
        yield  # pragma: no cover


def member_name(name: str, referrer: str, where: str) -> str:
    """A member name from a document, normalised; one that leaves the root is corrupt."""
    normal = normalize(os.fsencode(name))
    if not normal:
        raise CorruptStore(f"{referrer} names {name!r}, which is outside the image", path=where)
    return os.fsdecode(normal)


class DirFiles(SourceFiles):
    def __init__(self, root: str) -> None:
        self.root = root
        self.label = root
        self._real_root = os.path.realpath(root)

    def where(self, member: str) -> str:
        return os.path.join(self.root, member)

    def exists(self, member: str) -> bool:
        return os.path.lexists(self.where(member))

    def has_dir(self, member: str) -> bool:
        return os.path.isdir(self.where(member)) and not os.path.islink(self.where(member))

    def _checked(self, member: str, what: str) -> str:
        path = self.where(member)
        if not os.path.lexists(path):
            raise CorruptStore(f"{what} is missing", path=path)
        real = os.path.realpath(path)
        if not real.startswith(self._real_root.rstrip("/") + "/"):
            raise UnsafePath(f"{what} is a symlink out of the image directory", path=path)
        if not os.path.isfile(real):
            raise CorruptStore(f"{what} is not a regular file", path=path)
        return real

    def read(self, member: str, what: str) -> bytes:
        path = self._checked(member, what)
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_JSON + 1)
        except OSError as err:
            raise CorruptStore(f"cannot read {what}: {os.strerror(err.errno or 0)}",
                               path=self.where(member)) from None
        if len(data) > MAX_JSON:
            raise CorruptStore(f"{what} is larger than {MAX_JSON >> 20} MiB",
                               path=self.where(member))
        return data

    @contextmanager
    def layer(self, member: str, what: str) -> Iterator[LayerSource]:
        self._checked(member, what)
        yield self.where(member)


@dataclass(frozen=True, slots=True)
class _TarMember:
    offset: int  # of the data
    size: int
    type: bytes
    link: str


class TarFiles(SourceFiles):
    """An uncompressed tar, scanned once at construction; members read with ``pread``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.label = path
        self._fd: int | None = None
        self.members: dict[str, _TarMember] = {}
        try:
            with open(path, "rb") as f:
                head = f.read(6)
                for magic, name in _COMPRESSED.items():
                    if head.startswith(magic):
                        raise CompressedArchive(
                            f"{name}-compressed archive; decompress it first (crifs reads "
                            "compressed layers, not a compressed outer archive)", path=path)
                f.seek(0)
                with tarfile.open(fileobj=f, mode="r:", encoding="utf-8",
                                  errors="surrogateescape") as tar:
                    for info in tar:
                        self._add(info)
        except tarfile.ReadError as err:
            if not self.members:
                raise BadInput(f"is not a tar archive ({err})", path=path) from None
            raise CorruptStore(f"truncated or corrupt archive: {err}", path=path) from None
        except OSError as err:
            raise BadInput(f"cannot read: {os.strerror(err.errno or 0)}", path=path) from None

    def _add(self, info: tarfile.TarInfo) -> None:
        name = normalize(info.name.encode("utf-8", "surrogateescape"))
        if not name:
            return
        if info.issparse():
            return  # never a layout member; ignored rather than read wrongly
        link = info.linkname if (info.issym() or info.islnk()) else ""
        self.members[os.fsdecode(name)] = _TarMember(info.offset_data, info.size, info.type,
                                                     link)

    def where(self, member: str) -> str:
        return f"{self.path}:{member}"

    def exists(self, member: str) -> bool:
        return member in self.members

    def has_dir(self, member: str) -> bool:
        prefix = member + "/"
        return any(name.startswith(prefix) for name in self.members)

    def _resolve(self, member: str, what: str) -> _TarMember:
        """The regular-file member ``member`` is or links to (inside the archive only)."""
        name = member
        for _ in range(MAX_MEMBER_LINKS):
            found = self.members.get(name)
            if found is None:
                raise CorruptStore(f"{what} is missing", path=self.where(member))
            if found.type == tarfile.SYMTYPE:
                base = os.path.dirname(name).encode()
                target = found.link.encode("utf-8", "surrogateescape")
                joined = normalize(target if target.startswith(b"/") else base + b"/" + target)
                if not joined:
                    raise UnsafePath(f"{what} is a symlink out of the archive",
                                     path=self.where(member))
                name = os.fsdecode(joined)
                continue
            if found.type == tarfile.LNKTYPE:
                linked = normalize(found.link.encode("utf-8", "surrogateescape"))
                if not linked:
                    raise CorruptStore(f"{what} is a hard link out of the archive",
                                       path=self.where(member))
                name = os.fsdecode(linked)
                continue
            if found.type not in tarfile.REGULAR_TYPES:
                raise CorruptStore(f"{what} is not a regular file", path=self.where(member))
            return found
        raise CorruptStore(f"{what}: too many links", path=self.where(member))

    @contextmanager
    def session(self) -> Iterator[None]:
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise BadInput(f"cannot read: {os.strerror(err.errno or 0)}",
                           path=self.path) from None
        try:
            yield
        finally:
            os.close(self._fd)
            self._fd = None

    def read(self, member: str, what: str) -> bytes:
        found = self._resolve(member, what)
        if found.size > MAX_JSON:
            raise CorruptStore(f"{what} is larger than {MAX_JSON >> 20} MiB",
                               path=self.where(member))
        if self._fd is not None:
            data = os.pread(self._fd, found.size, found.offset)
        else:
            with self.session():
                assert self._fd is not None
                data = os.pread(self._fd, found.size, found.offset)
        if len(data) != found.size:
            raise CorruptStore(f"{what} is truncated", path=self.where(member))
        return data

    @contextmanager
    def layer(self, member: str, what: str) -> Iterator[LayerSource]:
        found = self._resolve(member, what)
        if self._fd is None:
            raise RuntimeError("layer() outside session()")
        yield FileRange(self._fd, found.offset, found.size, self.where(member))
