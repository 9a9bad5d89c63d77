"""Turning model values into JSON-safe values, the one way every command does it.

- ``datetime`` → RFC 3339 UTC string; enums → their value; mappings → dicts; tuples → lists.
- A string holding bytes that are not UTF-8 (kept by ``os.fsdecode`` as surrogates) is written
  with those bytes as ``\\xNN`` escapes, and the exact bytes go in a sibling field
  ``<name>_b64``: ``path`` gets ``path_b64``. Nothing is dropped or replaced silently.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import enum
import operator
import os
from collections.abc import Callable, Mapping
from typing import Any

from crifs.model import Snapshot, Usage


def is_exact_text(text: str) -> bool:
    """True when ``text`` holds no undecodable bytes (no surrogate escapes)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def escape_text(text: str) -> str:
    """``text`` with each undecodable byte written as ``\\xNN``."""
    if is_exact_text(text):
        return text
    raw = os.fsencode(text)
    return raw.decode("utf-8", errors="backslashreplace")


def b64_of(text: str) -> str:
    return base64.b64encode(os.fsencode(text)).decode("ascii")


def rfc3339(value: dt.datetime) -> str:
    """RFC 3339 in UTC with a ``Z``, microseconds only when present."""
    if value.tzinfo is not dt.UTC:
        value = value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
    return value.isoformat()[:-6] + "Z"  # drop "+00:00"; microseconds only when non-zero


def to_jsonable(value: Any) -> Any:
    """A JSON-safe copy of ``value`` (dataclass, mapping, list, scalar)."""
    kind = type(value)
    if kind is str:
        return value if is_exact_text(value) else escape_text(value)
    if value is None or kind is int or kind is bool or kind is float:
        return value
    if kind is dt.datetime:
        return rfc3339(value)
    if kind is tuple and not value:
        return []
    if kind is dict:
        if not value:
            return {}
        return {
            (k if type(k) is str and k.isascii() else escape_text(str(k))): (
                v if type(v) is str and v.isascii() else to_jsonable(v)
            )
            for k, v in value.items()
        }
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dt.datetime):
        return rfc3339(value)
    if isinstance(value, str):
        return escape_text(value)
    if isinstance(value, Mapping):
        return {escape_text(str(k)): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return record(value)
    return value


_FIELDS: dict[type, tuple[tuple[str, ...], Callable[[Any], tuple[Any, ...]]]] = {}
_ENUM_TYPES: set[type] = set()


def _fields_of(kind: type, obj: Any) -> tuple[tuple[str, ...], Callable[[Any], tuple[Any, ...]]]:
    names = tuple(f.name for f in dataclasses.fields(obj))
    # attrgetter of several names returns their values as one tuple, in one C call.
    getter = operator.attrgetter(*names) if len(names) > 1 else (
        lambda o, n=names[0]: (getattr(o, n),)
    )
    fields = _FIELDS[kind] = (names, getter)
    return fields


def record(obj: Any, **extra: Any) -> dict[str, Any]:
    """A dataclass as a JSON record, with ``<field>_b64`` for every non-UTF-8 string field.

    Runs once per listed object (10,000 times for a big snapshot listing), so the common
    values (ASCII strings, ``None``, ints, empty containers, enums, UTC datetimes, nested
    dataclasses) are converted here without a call to ``to_jsonable``; the result is the same.
    """
    kind = type(obj)
    if kind is Snapshot and not extra and _SNAPSHOT_FAST:
        fast = _snapshot_record(obj)
        if fast is not None:
            return fast
    fields = _FIELDS.get(kind) or _fields_of(kind, obj)
    names, getter = fields
    out: dict[str, Any] = {}
    last_time: Any = None
    last_text = ""
    for name, value in zip(names, getter(obj), strict=True):
        vtype = type(value)
        if value is None or vtype is int or (vtype is str and value.isascii()):
            out[name] = value
        elif vtype is dt.datetime and value.tzinfo is dt.UTC:
            # created and updated are often the very same object: format it once.
            if value is not last_time:
                last_time = value
                last_text = value.isoformat()[:-6] + "Z"
            out[name] = last_text
        elif vtype in _ENUM_TYPES:
            out[name] = value.value
        elif (vtype is dict or vtype is tuple) and not value:
            out[name] = {} if vtype is dict else []
        elif vtype in _FIELDS:
            out[name] = record(value)
        else:
            if isinstance(value, enum.Enum) and all(
                not isinstance(m.value, str) or m.value.isascii() for m in vtype
            ):
                _ENUM_TYPES.add(vtype)
            add_field(out, name, value)
    for name, value in extra.items():
        add_field(out, name, value)
    return out


# The fields _snapshot_record writes, in order; if the model gains a field it is not used.
_SNAPSHOT_FIELDS = (
    "runtime", "key", "kind", "snapshotter", "namespace", "parent", "id", "backend_key", "path",
    "labels", "created", "updated", "stored_usage", "names", "flags", "details",
)
_SNAPSHOT_FAST = tuple(f.name for f in dataclasses.fields(Snapshot)) == _SNAPSHOT_FIELDS
_snapshot_values = operator.attrgetter(*_SNAPSHOT_FIELDS)
_USAGE_FAST = tuple(f.name for f in dataclasses.fields(Usage)) == (
    "disk_bytes", "inodes", "apparent_bytes")


def _usage_record(usage: Usage) -> dict[str, Any]:
    disk, inodes, apparent = usage.disk_bytes, usage.inodes, usage.apparent_bytes
    if (_USAGE_FAST and type(disk) is int and type(inodes) is int
            and (apparent is None or type(apparent) is int)):
        return {"disk_bytes": disk, "inodes": inodes, "apparent_bytes": apparent}
    return record(usage)


def _snapshot_record(snap: Snapshot) -> dict[str, Any] | None:
    """``record(snap)`` for the usual snapshot (ASCII text, UTC times), else None.

    A listing makes one record per snapshot; spelling the fields out here costs a third of
    the generic loop. The result is exactly what the generic loop gives.
    """
    (runtime, key, kind, snapshotter, namespace, parent, snapshot_id, backend_key, path, labels,
     created, updated, stored, names, flags, details) = _snapshot_values(snap)
    if not (
        runtime.isascii() and key.isascii() and snapshotter.isascii()
        and (namespace is None or namespace.isascii())
        and (parent is None or parent.isascii())
        and (snapshot_id is None or snapshot_id.isascii())
        and (backend_key is None or backend_key.isascii())
        and (path is None or path.isascii())
        and (created is None or (type(created) is dt.datetime and created.tzinfo is dt.UTC))
        and (updated is None or (type(updated) is dt.datetime and updated.tzinfo is dt.UTC))
        and type(kind) in _ENUM_TYPES
    ):
        return None
    created_text = None if created is None else created.isoformat()[:-6] + "Z"
    if updated is created:
        updated_text = created_text
    else:
        updated_text = None if updated is None else updated.isoformat()[:-6] + "Z"
    return {
        "runtime": runtime,
        "key": key,
        "kind": kind.value,
        "snapshotter": snapshotter,
        "namespace": namespace,
        "parent": parent,
        "id": snapshot_id,
        "backend_key": backend_key,
        "path": path,
        "labels": to_jsonable(labels) if labels else {},
        "created": created_text,
        "updated": updated_text,
        "stored_usage": None if stored is None else _usage_record(stored),
        "names": to_jsonable(names) if names else [],
        "flags": to_jsonable(flags) if flags else {},
        "details": to_jsonable(details) if details else {},
    }


def add_field(out: dict[str, Any], name: str, value: Any) -> None:
    out[name] = to_jsonable(value)
    if isinstance(value, str) and not is_exact_text(value):
        out[f"{name}_b64"] = b64_of(value)


def human_size(size: float) -> str:
    """Size as ctr prints it (``units.CustomSize("%02.1f %s", size, 1024, …)``)."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB"]
    i = 0
    while size >= 1024 and i < len(units) - 1:
        size /= 1024
        i += 1
    return f"{size:.1f} {units[i]}"
