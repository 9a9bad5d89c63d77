"""The layer cache of --all-images: one read per layer, bounded, listings never shared
mutably."""

from __future__ import annotations

from crifs.fs.layer_cache import LayerCache
from crifs.fs.listing import PLAIN_FILE, LayerListing


def listing(size: int, name: str = "read") -> LayerListing:
    layer = LayerListing(0, name, entries={f"f{n}".encode(): PLAIN_FILE for n in range(size)})
    layer.problems.append("tolerated")
    return layer


def test_a_layer_is_read_once_and_served_at_each_position() -> None:
    cache = LayerCache(max_entries=100)
    reads: list[str] = []

    def read() -> LayerListing:
        reads.append("a")
        return listing(10)

    first = cache.listing("a", read, index=0, name="layer 0 a")
    first.problems.append("only the first image's")
    second = cache.listing("a", read, index=3, name="layer 3 a")
    assert reads == ["a"] and (cache.reads, cache.hits) == (1, 1)
    assert (second.index, second.name) == (3, "layer 3 a")
    assert (first.index, first.name) == (0, "layer 0 a")
    assert second.entries is first.entries  # shared, never copied
    assert second.problems == ["tolerated"]


def test_least_recently_used_dropped_and_big_layers_never_kept() -> None:
    cache = LayerCache(max_entries=25)
    read_count: dict[str, int] = {}

    def reader(key: str, size: int):  # noqa: ANN202
        def read() -> LayerListing:
            read_count[key] = read_count.get(key, 0) + 1
            return listing(size)

        return read

    for key in ("a", "b", "a", "c", "a", "b", "huge", "huge"):
        size = 30 if key == "huge" else 10
        cache.listing(key, reader(key, size), index=0, name=key)
    # a, b kept (20); a used again; c (30 > 25) drops b, the least recently used; a kept
    # throughout; b read again; huge never kept
    assert read_count == {"a": 1, "b": 2, "c": 1, "huge": 2}
