"""Layer listings kept between the targets of one run, so that the base layers many images
share are read once (``crifs links --all-images``, or an archive of several images: on a node
most images stack the same few bases, and reading a layer costs as much as auditing it)."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Hashable

from crifs.fs.listing import LayerListing

# About 100 MB of listings on a 2-vCPU VM's measure (190 MB per million entries); a bigger
# layer is read every time, never kept.
MAX_ENTRIES = 500_000


class LayerCache:
    """Listings by where they were read (``key``: a path and how it was read), the least
    recently used dropped first once the kept ones hold more than ``max_entries`` entries.

    A listing is never changed once read (the merged view copies what it changes), so one
    read serves every image that stacks the layer. What ``listing`` returns is a shallow copy
    with the position and name the layer has in the asking image and its own ``problems``
    list, so a caller may add a problem without touching the kept listing.
    """

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self.reads = 0  # listings read (not found kept)
        self.hits = 0  # listings served from what was kept
        self._kept: OrderedDict[Hashable, LayerListing] = OrderedDict()
        self._entries = 0

    def listing(
        self, key: Hashable, read: Callable[[], LayerListing], *, index: int, name: str
    ) -> LayerListing:
        """The listing kept under ``key``, else ``read()`` (kept when small enough)."""
        kept = self._kept.get(key)
        if kept is not None:
            self._kept.move_to_end(key)
            self.hits += 1
        else:
            kept = read()
            self.reads += 1
            self._keep(key, kept)
        return dataclasses.replace(kept, index=index, name=name, problems=list(kept.problems))

    def _keep(self, key: Hashable, listing: LayerListing) -> None:
        size = len(listing.entries)
        if size > self.max_entries:
            return
        self._kept[key] = listing
        self._entries += size
        while self._entries > self.max_entries:
            _, dropped = self._kept.popitem(last=False)
            self._entries -= len(dropped.entries)
