"""layers.json, images.json, containers.json and mountpoints.json decoded into plain records.

Each file is a JSON array of objects (containers/storage ``Layer``, ``Image``, ``Container``,
``layerMountPoint``). An empty or missing file is an empty list, as containers/storage treats
it. Anything else that is not an array of objects with the expected field types raises
``CorruptStore`` naming the file and the problem, e.g. ``…/layers.json: line 3 column 5:
Expecting ','`` or ``…/layers.json: entry 4 has no id`` (entries are numbered from 1).

Unknown fields are ignored; the decoded object is kept in ``raw`` for callers that need more.
IDs are checked to be single path components, because they are joined into paths.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from crifs.cstorage.paths import is_safe_component
from crifs.errors import CorruptStore

_ZERO_TIME_YEAR = 1  # Go's zero time.Time, "0001-01-01T00:00:00Z": no time recorded
_RFC3339 = re.compile(
    r"(?P<base>\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2})(?:\.(?P<frac>\d+))?"
    r"(?P<tz>[Zz]|[+-]\d{2}:\d{2})"
)


@dataclass(frozen=True, slots=True)
class LayerRecord:
    """One ``layers.json`` / ``volatile-layers.json`` entry."""

    id: str
    names: tuple[str, ...] = ()
    parent: str | None = None
    metadata: str | None = None
    mountlabel: str | None = None
    created: dt.datetime | None = None
    compressed_diff_digest: str | None = None
    compressed_size: int | None = None
    diff_digest: str | None = None
    diff_size: int | None = None
    compression: int | None = None
    flags: Mapping[str, object] = field(default_factory=dict)
    big_data_names: tuple[str, ...] = ()
    source: str = ""  # the JSON file the record came from
    raw: Mapping[str, object] = field(default_factory=dict)

    @property
    def incomplete(self) -> bool:
        return self.flags.get("incomplete") is True


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One ``images.json`` entry. ``layer`` is the top layer id."""

    id: str
    digest: str | None = None
    names: tuple[str, ...] = ()
    names_history: tuple[str, ...] = ()
    layer: str | None = None
    mapped_layers: tuple[str, ...] = ()
    metadata: str | None = None
    big_data_names: tuple[str, ...] = ()
    big_data_sizes: Mapping[str, int] = field(default_factory=dict)
    big_data_digests: Mapping[str, str] = field(default_factory=dict)
    created: dt.datetime | None = None
    flags: Mapping[str, object] = field(default_factory=dict)
    raw: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ContainerRecord:
    """One ``containers.json`` / ``volatile-containers.json`` entry. ``layer`` is its RW layer;
    ``metadata`` is the engine's JSON string (podman/CRI-O put ``image-name`` etc. there)."""

    id: str
    names: tuple[str, ...] = ()
    image: str | None = None
    layer: str | None = None
    metadata: str | None = None
    created: dt.datetime | None = None
    flags: Mapping[str, object] = field(default_factory=dict)
    source: str = ""
    raw: Mapping[str, object] = field(default_factory=dict)

    @property
    def mount_opts(self) -> tuple[str, ...]:
        """The ``MountOpts`` flag: mount options that replace storage.conf's mountopt."""
        value = self.flags.get("MountOpts")
        if isinstance(value, list):
            return tuple(v for v in value if isinstance(v, str))
        return ()

    @property
    def volatile(self) -> bool:
        return self.flags.get("Volatile") is True

    @property
    def mount_label(self) -> str:
        value = self.flags.get("MountLabel")
        return value if isinstance(value, str) else ""

    def metadata_fields(self) -> Mapping[str, object]:
        """``metadata`` decoded when it is a JSON object, else ``{}`` (it is free-form)."""
        if not self.metadata:
            return {}
        try:
            value = json.loads(self.metadata)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


@dataclass(frozen=True, slots=True)
class MountPointRecord:
    """One ``mountpoints.json`` entry (runroot): a layer mounted ``count`` times at ``path``."""

    id: str
    path: str
    count: int


_R = TypeVar("_R", LayerRecord, ImageRecord, ContainerRecord)

# -- file level ------------------------------------------------------------------------------


def decode_array(path: str, data: bytes) -> list[Mapping[str, Any]]:
    """``data`` (the bytes of ``path``) as a JSON array of objects; empty data is ``[]``."""
    if not data.strip():
        return []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorruptStore(f"byte {err.start}: not UTF-8 text", path=path) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise CorruptStore(f"line {err.lineno} column {err.colno}: {err.msg}", path=path) from None
    except RecursionError:
        raise CorruptStore("JSON nested too deeply", path=path) from None
    if value is None:  # Go's json.Unmarshal leaves the slice empty for null
        return []
    if not isinstance(value, list):
        raise CorruptStore(f"expected a JSON array, found {_json_type(value)}", path=path)
    for number, entry in enumerate(value, 1):
        if not isinstance(entry, dict):
            raise CorruptStore(f"entry {number} is {_json_type(entry)}, not an object",
                               path=path)
    return value


def parse_layers(path: str, data: bytes) -> list[LayerRecord]:
    """Decode a ``layers.json`` or ``volatile-layers.json``."""
    records = []
    for number, obj in enumerate(decode_array(path, data), 1):
        f = _Fields(path, number, obj)
        records.append(LayerRecord(
            id=f.id(),
            names=f.strings("names"),
            parent=f.optional_id("parent"),
            metadata=f.string("metadata"),
            mountlabel=f.string("mountlabel"),
            created=f.time("created"),
            compressed_diff_digest=f.string("compressed-diff-digest"),
            compressed_size=f.integer("compressed-size"),
            diff_digest=f.string("diff-digest"),
            diff_size=f.integer("diff-size"),
            compression=f.integer("compression"),
            flags=f.mapping("flags"),
            big_data_names=f.strings("big-data-names"),
            source=path,
            raw=obj,
        ))
    return records


def parse_images(path: str, data: bytes) -> list[ImageRecord]:
    """Decode an ``images.json``."""
    records = []
    for number, obj in enumerate(decode_array(path, data), 1):
        f = _Fields(path, number, obj)
        records.append(ImageRecord(
            id=f.id(),
            digest=f.string("digest"),
            names=f.strings("names"),
            names_history=f.strings("names-history"),
            layer=f.optional_id("layer"),
            mapped_layers=f.strings("mapped-layers"),
            metadata=f.string("metadata"),
            big_data_names=f.strings("big-data-names"),
            big_data_sizes=f.typed_mapping("big-data-sizes", _is_int, "integers"),
            big_data_digests=f.typed_mapping("big-data-digests", _is_str, "strings"),
            created=f.time("created"),
            flags=f.mapping("flags"),
            raw=obj,
        ))
    return records


def parse_containers(path: str, data: bytes) -> list[ContainerRecord]:
    """Decode a ``containers.json`` or ``volatile-containers.json``."""
    records = []
    for number, obj in enumerate(decode_array(path, data), 1):
        f = _Fields(path, number, obj)
        records.append(ContainerRecord(
            id=f.id(),
            names=f.strings("names"),
            image=f.string("image"),
            layer=f.optional_id("layer"),
            metadata=f.string("metadata"),
            created=f.time("created"),
            flags=f.mapping("flags"),
            source=path,
            raw=obj,
        ))
    return records


def parse_mountpoints(path: str, data: bytes) -> list[MountPointRecord]:
    """Decode a runroot ``mountpoints.json``."""
    records = []
    for number, obj in enumerate(decode_array(path, data), 1):
        f = _Fields(path, number, obj)
        records.append(MountPointRecord(
            id=f.id(), path=f.string("path") or "", count=f.integer("count") or 0,
        ))
    return records


def merge_by_id(*record_lists: list[_R]) -> list[_R]:
    """Concatenate, keeping the first record of each id (containers/storage skips later
    duplicates between the main and the volatile file)."""
    seen: set[str] = set()
    merged: list[_R] = []
    for records in record_lists:
        for record in records:
            if record.id not in seen:
                seen.add(record.id)
                merged.append(record)
    return merged


def parse_go_time(text: str) -> dt.datetime | None:
    """An RFC 3339 (nano) time as Go writes it; Go's zero time gives ``None``.

    Raises ``ValueError`` for text that is not such a time.
    """
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    frac = (match.group("frac") or "")[:6].ljust(6, "0")
    tz = match.group("tz")
    tz = "+00:00" if tz in ("Z", "z") else tz
    value = dt.datetime.fromisoformat(f"{match.group('base').replace(' ', 'T')}.{frac}{tz}")
    if value.year == _ZERO_TIME_YEAR and value.replace(tzinfo=None) == dt.datetime(1, 1, 1):
        return None
    return value.astimezone(dt.UTC)


# -- field access ----------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


class _Fields:
    """Typed reads of one entry's fields; a bad type is a ``CorruptStore`` naming the entry."""

    def __init__(self, path: str, number: int, obj: Mapping[str, Any]) -> None:
        self.path = path
        self.number = number
        self.obj = obj

    def _bad(self, what: str) -> CorruptStore:
        return CorruptStore(f"entry {self.number} {what}", path=self.path)

    def _check(self, key: str, ok: Callable[[object], bool], want: str) -> object:
        value = self.obj.get(key)
        if value is not None and not ok(value):
            raise self._bad(f"field {key!r} is {_json_type(value)}, not {want}")
        return value

    def id(self) -> str:
        value = self.obj.get("id")
        if value is None or value == "":
            raise self._bad("has no id")
        if not isinstance(value, str):
            raise self._bad(f"has an id that is {_json_type(value)}, not a string")
        if not is_safe_component(value):
            raise self._bad(f"has id {value!r}, which is not a single path component")
        return value

    def optional_id(self, key: str) -> str | None:
        value = self.string(key)
        if value is not None and not is_safe_component(value):
            raise self._bad(f"field {key!r} is {value!r}, not a single path component")
        return value

    def string(self, key: str) -> str | None:
        value = self._check(key, _is_str, "a string")
        return value if isinstance(value, str) and value != "" else None

    def integer(self, key: str) -> int | None:
        value = self._check(key, _is_int, "an integer")
        return value if isinstance(value, int) else None

    def strings(self, key: str) -> tuple[str, ...]:
        value = self._check(
            key, lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v),
            "an array of strings",
        )
        return tuple(value) if isinstance(value, list) else ()

    def mapping(self, key: str) -> Mapping[str, object]:
        value = self._check(key, lambda v: isinstance(v, dict), "an object")
        return value if isinstance(value, dict) else {}

    def typed_mapping(self, key: str, ok: Callable[[object], bool], want: str
                      ) -> dict[str, Any]:
        value = self._check(
            key, lambda v: isinstance(v, dict) and all(ok(x) for x in v.values()),
            f"an object of {want}",
        )
        return value if isinstance(value, dict) else {}

    def time(self, key: str) -> dt.datetime | None:
        value = self._check(key, _is_str, "a string")
        if not isinstance(value, str) or value == "":
            return None
        try:
            return parse_go_time(value)
        except ValueError:
            raise self._bad(f"field {key!r} is {value!r}, not an RFC 3339 time") from None
