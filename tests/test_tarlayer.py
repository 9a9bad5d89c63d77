"""read_layer_tar: every member kind, deletion markers, hostile names, compression, corruption
and speed, with both readers (libarchive and the tarfile fallback) where they must agree."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import zstandard

from crifs.errors import CorruptStore, NotFound
from crifs.fs.listing import PLAIN_DIR, PLAIN_FILE, Entry, EntryKind
from crifs.oci.tarlayer import MAX_EXAMPLES, FileRange, read_layer_tar
from ocibuild import Entry as E
from ocibuild import Kind, layer

ENGINES = ("libarchive", "tarfile")


def member(name: str | bytes, kind: bytes = tarfile.REGTYPE, *, data: bytes = b"",
           link: str | bytes = "", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    """A raw tar member (no name clean-up, unlike ocibuild) for hostile-name tests."""
    info = tarfile.TarInfo(os.fsdecode(name) if isinstance(name, bytes) else name)
    info.type = kind
    info.mode = mode
    info.mtime = 1_700_000_000
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.linkname = os.fsdecode(link) if isinstance(link, bytes) else link
    return info, data


def raw_tar(*members: tuple[tarfile.TarInfo, bytes],
            fmt: int = tarfile.GNU_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt, encoding="utf-8",
                      errors="surrogateescape") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)
    return buffer.getvalue()


def write(tmp_path: Path, data: bytes, name: str = "layer.tar") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def read(path: Path, engine: str = "libarchive", **kw: object):  # noqa: ANN201 - LayerListing
    return read_layer_tar(path, index=3, name="layer 3 test", ident="sha256:feed",
                          engine=engine, **kw)  # type: ignore[arg-type]


KINDS_LAYER = (
    E("etc", "dir"),
    E("etc/passwd", "file", data=b"root:x:0:0::/root:/bin/sh\n"),
    E("etc/link", "symlink", target="passwd"),
    E("etc/abs", "symlink", target="/usr/lib/os-release"),
    E("etc/hard", "hardlink", target="etc/passwd"),
    E("run", "dir"),
    E("run/fifo", "fifo"),
    E("dev", "dir"),
    E("dev/null", "char", devmajor=1, devminor=3),
)


@pytest.mark.parametrize("engine", ENGINES)
def test_member_kinds_and_shared_plain_entries(tmp_path: Path, engine: str) -> None:
    listing = read(write(tmp_path, layer(*KINDS_LAYER)), engine)
    entries = listing.entries
    assert listing.index == 3 and listing.ident == "sha256:feed"
    assert listing.source == str(tmp_path / "layer.tar")
    assert entries[b"etc"] is PLAIN_DIR and entries[b"etc/passwd"] is PLAIN_FILE
    assert entries[b"etc/link"].kind is EntryKind.SYMLINK
    assert entries[b"etc/link"].target == b"passwd"
    assert entries[b"etc/abs"].target == b"/usr/lib/os-release"
    assert entries[b"etc/hard"] == Entry(EntryKind.HARDLINK, b"etc/passwd", 0o644)
    assert entries[b"run/fifo"].kind is EntryKind.FIFO
    assert entries[b"dev/null"].kind is EntryKind.CHAR
    assert not listing.whiteouts and not listing.opaque and not listing.problems


@pytest.mark.parametrize("engine", ENGINES)
def test_details_keep_mode_size_and_owner(tmp_path: Path, engine: str) -> None:
    data = layer(E("bin", "dir", mode=0o750, uid=7),
                 E("bin/tool", "file", data=b"x" * 1234, mode=0o4755, uid=1000, gid=100))
    listing = read(write(tmp_path, data), engine, details=True)
    assert listing.entries[b"bin/tool"] == Entry(EntryKind.FILE, b"", 0o4755, 1234, 1000, 100)
    assert listing.entries[b"bin"] == Entry(EntryKind.DIR, b"", 0o750, 0, 7, 0)


@pytest.mark.parametrize("engine", ENGINES)
def test_whiteouts_opaque_and_aufs_metadata(tmp_path: Path, engine: str) -> None:
    data = layer(
        E("etc", "dir"),
        E("etc/motd", "whiteout"),
        E("var/cache", "opaque"),
        E(".wh.toplevel", "file"),  # a root-level whiteout, written by hand
        E(".wh..wh.plnk", "dir"),
        E(".wh..wh.plnk/123.456", "file"),
        E("etc/motd", "file", data=b"new"),  # same layer: the entry stays, the marker hides
    )
    listing = read(write(tmp_path, data), engine)
    assert listing.whiteouts == {b"etc/motd", b"toplevel"}
    assert listing.opaque == {b"var/cache"}
    assert b"etc/motd" in listing.entries
    assert not any(b".wh." in p for p in listing.entries if not p.startswith(b".wh..wh.plnk/"))
    assert not listing.problems


@pytest.mark.parametrize("engine", ENGINES)
def test_hard_link_chains_keep_their_literal_targets(tmp_path: Path, engine: str) -> None:
    data = layer(E("a", "file", data=b"1"), E("b", "hardlink", target="a"),
                 E("c", "hardlink", target="b"), E("d", "hardlink", target="./x/../c"))
    entries = read(write(tmp_path, data), engine).entries
    assert [entries[k].target for k in (b"b", b"c", b"d")] == [b"a", b"b", b"c"]
    assert all(entries[k].kind is EntryKind.HARDLINK for k in (b"b", b"c", b"d"))


@pytest.mark.parametrize("engine", ENGINES)
def test_escaping_and_absolute_names(tmp_path: Path, engine: str) -> None:
    data = raw_tar(
        member("./", tarfile.DIRTYPE),
        member("../evil", data=b"x"),
        member("a/../../evil2", data=b"x"),
        member("/etc/passwd", data=b"x"),
        member("/abs/dir/", tarfile.DIRTYPE),
        member("ok/./x//y", data=b"x"),
        member("h1", tarfile.LNKTYPE, link="../../outside"),
        member("h2", tarfile.LNKTYPE, link="/etc/passwd"),
        member(".", tarfile.SYMTYPE, link="elsewhere"),
    )
    listing = read(write(tmp_path, data), engine)
    assert set(listing.entries) == {b"etc/passwd", b"abs/dir", b"ok/x/y", b"h2"}
    assert listing.entries[b"h2"].target == b"etc/passwd"
    text = "\n".join(listing.problems)
    assert "member ../evil climbs out of the layer root; skipped" in text
    assert "a/../../evil2 climbs out" in text
    assert "absolute member name /etc/passwd read as /etc/passwd" in text
    assert "hard link h1 -> ../../outside leaves the layer root" in text
    assert "hard link h2 has an absolute target /etc/passwd" in text
    assert "names the root but is a symlink" in text
    assert len(listing.problems) == 7


@pytest.mark.parametrize("engine", ENGINES)
def test_duplicates_later_member_wins(tmp_path: Path, engine: str) -> None:
    data = raw_tar(member("x", tarfile.SYMTYPE, link="first"), member("x", data=b"2"),
                   member("y", data=b"1"), member("./y", tarfile.SYMTYPE, link="last"))
    listing = read(write(tmp_path, data), engine)
    assert listing.entries[b"x"] is PLAIN_FILE
    assert listing.entries[b"y"].target == b"last"
    assert listing.problems == ["x is in the layer twice; the later member wins",
                                "y is in the layer twice; the later member wins"]


@pytest.mark.parametrize("engine", ENGINES)
def test_notable_holds_exactly_the_entries_that_are_not_plain(tmp_path: Path,
                                                              engine: str) -> None:
    """Duplicates included: a symlink replaced by a file leaves ``notable``, and the other
    way round it enters it."""
    data = raw_tar(member("x", tarfile.SYMTYPE, link="first"), member("x", data=b"2"),
                   member("y", data=b"1"), member("./y", tarfile.SYMTYPE, link="last"),
                   member("d", tarfile.DIRTYPE), member("d/h", tarfile.LNKTYPE, link="y"),
                   member("d/fifo", tarfile.FIFOTYPE), member("d/.wh.gone"))
    listing = read(write(tmp_path, data), engine)
    assert listing.notable == {
        path: entry for path, entry in listing.entries.items()
        if entry is not PLAIN_FILE and entry is not PLAIN_DIR
    }
    assert set(listing.notable) == {b"y", b"d/h", b"d/fifo"}
    assert read(write(tmp_path, data), engine, details=True).notable is None


def test_problems_are_capped_then_counted(tmp_path: Path) -> None:
    data = raw_tar(*(member(f"/abs{i}", data=b"") for i in range(MAX_EXAMPLES + 7)))
    listing = read(write(tmp_path, data))
    assert len(listing.entries) == MAX_EXAMPLES + 7
    assert len(listing.problems) == MAX_EXAMPLES + 1
    assert listing.problems[-1] == "... and 7 more problems of the same kind (absolute)"


NON_UTF8 = b"caf\xe9/\xff\xfe name"


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
@pytest.mark.parametrize("engine", ENGINES)
def test_non_utf8_names_and_targets_keep_their_bytes(tmp_path: Path, engine: str,
                                                     fmt: int) -> None:
    data = raw_tar(member(b"caf\xe9", tarfile.DIRTYPE), member(NON_UTF8, data=b"x"),
                   member(b"caf\xe9/l\xe9", tarfile.SYMTYPE, link=b"\xff\xfe name"),
                   member("snow\u2603", tarfile.SYMTYPE, link="\u2603"), fmt=fmt)
    entries = read(write(tmp_path, data), engine).entries
    assert entries[NON_UTF8] is PLAIN_FILE
    assert entries[b"caf\xe9/l\xe9"].target == b"\xff\xfe name"
    assert entries["snow\u2603".encode()].target == "\u2603".encode()


def test_non_utf8_pax_names_under_the_c_locale(tmp_path: Path) -> None:
    """libarchive converts pax names to the locale charset and warns when it cannot; the
    multibyte accessor must still give the exact bytes."""
    data = raw_tar(member("caf\u00e9", data=b""), member(NON_UTF8, data=b""),
                   fmt=tarfile.PAX_FORMAT)
    path = write(tmp_path, data)
    code = ("import sys; from crifs.oci.tarlayer import read_layer_tar; "
            "l = read_layer_tar(sys.argv[1], index=0, name='x', engine='libarchive'); "
            "print(sorted(l.entries), l.problems)")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    out = subprocess.run([sys.executable, "-c", code, str(path)], env=env,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == repr(sorted(["caf\u00e9".encode(), NON_UTF8])) + " []"
    assert out.stderr == ""  # no libarchive warning leaks out


@pytest.mark.parametrize("engine", ENGINES)
def test_4096_byte_link_targets_and_long_names(tmp_path: Path, engine: str) -> None:
    target = ("../" * 20 + "x" * 200 + "/") * 15
    target = (target + "y" * 4096)[:4096]
    name = "d/" + "n" * 250 + "/" + "m" * 250
    data = raw_tar(member(name, tarfile.SYMTYPE, link=target),
                   member("h", tarfile.LNKTYPE, link=name), fmt=tarfile.PAX_FORMAT)
    listing = read(write(tmp_path, data), engine)
    assert listing.entries[name.encode()].target == target.encode()
    assert len(listing.entries[name.encode()].target) == 4096
    assert listing.entries[b"h"].target == name.encode()


def _compressors() -> dict[str, object]:
    return {
        "gzip": lambda d: gzip.compress(d, mtime=0),
        "zstd": lambda d: zstandard.ZstdCompressor().compress(d),
        "xz": lzma.compress,
        "bzip2": bz2.compress,
        "none": lambda d: d,
    }


@pytest.mark.parametrize("compression", ["gzip", "zstd", "xz", "bzip2", "none"])
@pytest.mark.parametrize("engine", ENGINES)
def test_compression_is_detected(tmp_path: Path, engine: str, compression: str) -> None:
    if engine == "tarfile" and compression == "zstd":
        pass  # the fallback reads zstd through the zstandard package
    compress = _compressors()[compression]
    plain = read(write(tmp_path, layer(*KINDS_LAYER), "plain.tar"))
    listing = read(write(tmp_path, compress(layer(*KINDS_LAYER))), engine)  # type: ignore[operator]
    assert listing.entries == plain.entries


@pytest.mark.parametrize("engine", ENGINES)
def test_streams_and_file_ranges(tmp_path: Path, engine: str) -> None:
    data = gzip.compress(layer(*KINDS_LAYER), mtime=0)
    expected = read(write(tmp_path, data)).entries
    stream = io.BytesIO(data)
    assert read_layer_tar(stream, index=0, name="x", engine=engine).entries == expected  # type: ignore[arg-type]
    # a layer in the middle of a bigger file, as an OCI archive member
    outer = write(tmp_path, b"J" * 1536 + data + b"K" * 999, "outer.bin")
    fd = os.open(outer, os.O_RDONLY)
    try:
        window = FileRange(fd, 1536, len(data), f"{outer}:blobs/sha256/feed")
        listing = read_layer_tar(window, index=0, name="x", engine=engine)  # type: ignore[arg-type]
    finally:
        os.close(fd)
    assert listing.entries == expected
    assert listing.source == f"{outer}:blobs/sha256/feed"


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("cut", [700, 1100, 3796])
def test_truncated_archive_is_corrupt_store(tmp_path: Path, engine: str, cut: int) -> None:
    data = layer(E("a", "file", data=b"x" * 2000), E("b", "file", data=b"y" * 600))
    path = write(tmp_path, data[:cut])
    with pytest.raises(CorruptStore) as caught:
        read(path, engine)
    message = str(caught.value)
    assert message.startswith(f"{path}: layer sha256:feed: unreadable tar: ")
    assert "\n" not in message


@pytest.mark.parametrize("engine", ENGINES)
def test_truncated_compressed_and_garbage(tmp_path: Path, engine: str) -> None:
    data = gzip.compress(layer(*KINDS_LAYER, E("big", "file", data=os.urandom(50_000))))
    with pytest.raises(CorruptStore, match="unreadable tar"):
        read(write(tmp_path, data[: len(data) // 2]), engine)
    with pytest.raises(CorruptStore, match="unreadable tar"):
        read(write(tmp_path, os.urandom(4096)), engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_empty_input_is_an_empty_layer(tmp_path: Path, engine: str) -> None:
    assert read(write(tmp_path, b""), engine).entries == {}
    assert read(write(tmp_path, bytes(1024)), engine).entries == {}


def test_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="layer file does not exist"):
        read(tmp_path / "nope.tar")


def test_readers_agree_on_a_mixed_layer(tmp_path: Path) -> None:
    entries = [E("d", "dir")]
    for i in range(300):
        kinds: tuple[Kind, ...] = ("file", "symlink", "hardlink", "dir", "whiteout", "fifo")
        kind = kinds[i % 6]
        target = {"symlink": f"../t{i}", "hardlink": "d/f0"}.get(kind, "")
        entries.append(E(f"d/f{i}", kind, target=target, data=b"z" * i))
    entries.append(E("d/x", "opaque"))
    path = write(tmp_path, gzip.compress(layer(*entries), mtime=0))
    a, b = read(path, "libarchive", details=True), read(path, "tarfile", details=True)
    assert a.entries == b.entries
    assert a.whiteouts == b.whiteouts and a.opaque == b.opaque
    assert a.problems == b.problems


def test_speed_100k_members_against_tar_tf(tmp_path: Path) -> None:
    """Prints the ratio to ``tar -tf`` (the issue's goal is 2x); asserts a generous bound."""
    tar_tool = shutil.which("tar")
    if tar_tool is None:
        pytest.skip("no tar executable")
    path = tmp_path / "big.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for d in range(1000):
            info = tarfile.TarInfo(f"usr/share/pkg{d:04d}")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
            for f in range(99):
                info = tarfile.TarInfo(f"usr/share/pkg{d:04d}/file{f:03d}")
                if f % 10 == 0:
                    info.type = tarfile.SYMTYPE
                    info.linkname = f"../pkg{(d + 1) % 1000:04d}/file{f + 1:03d}"
                    tar.addfile(info)
                else:
                    info.size = f * 13
                    tar.addfile(info, io.BytesIO(b"x" * info.size))

    def best(run: object) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            run()  # type: ignore[operator]
            times.append(time.perf_counter() - start)
        return min(times)

    ours = best(lambda: read(path))
    theirs = best(lambda: subprocess.run([tar_tool, "-tf", str(path)],
                                         stdout=subprocess.DEVNULL, check=True))
    assert len(read(path).entries) == 100_000
    print(f"\n100k-member tar: crifs {ours:.3f} s, tar -tf {theirs:.3f} s, "
          f"ratio {ours / theirs:.1f}x")
    assert ours < max(20 * theirs, 3.0)


@pytest.mark.parametrize("engine", ENGINES)
def test_progress_counts_members(tmp_path: Path, engine: str, monkeypatch: pytest.MonkeyPatch
                                 ) -> None:
    from crifs.oci import tarlayer

    monkeypatch.setattr(tarlayer, "PROGRESS_EVERY", 4)
    members = [E("d", "dir"), *(E(f"d/f{n}", "file") for n in range(9)), E("d/.wh.gone", "file")]
    told: list[int] = []
    listing = read(write(tmp_path, layer(*members)), engine, progress=told.append)
    assert told == [4, 8, 11]  # every 4 members, then the total (the whiteout included)
    assert len(listing.entries) == 10 and listing.whiteouts == {b"d/gone"}
