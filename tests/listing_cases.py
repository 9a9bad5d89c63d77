"""Hand-written layer listings for the engine tests."""

from __future__ import annotations

from crifs.fs.listing import PLAIN_DIR, PLAIN_FILE, Entry, EntryKind, LayerListing


def layer(index: int, spec: dict[bytes, bytes]) -> LayerListing:
    """A listing from ``{path: what}``: ``dir``, ``file``, ``wh`` (whiteout), ``opq`` (opaque
    dir), ``->TARGET`` (symlink), ``=>TARGET`` (tar hard link)."""
    listing = LayerListing(index, f"layer {index}")
    for path, what in spec.items():
        if what == b"dir":
            listing.entries[path] = PLAIN_DIR
        elif what == b"file":
            listing.entries[path] = PLAIN_FILE
        elif what == b"wh":
            listing.whiteouts.add(path)
        elif what == b"opq":
            listing.opaque.add(path)
            listing.entries[path] = PLAIN_DIR
        elif what.startswith(b"->"):
            listing.entries[path] = Entry(EntryKind.SYMLINK, what[2:])
        elif what.startswith(b"=>"):
            listing.entries[path] = Entry(EntryKind.HARDLINK, what[2:])
        else:
            raise AssertionError(what)
    return listing
