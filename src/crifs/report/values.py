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
import os
from collections.abc import Mapping
from typing import Any


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


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def record(obj: Any, **extra: Any) -> dict[str, Any]:
    """A dataclass as a JSON record, with ``<field>_b64`` for every non-UTF-8 string field.

    Runs once per listed object (10,000 times for a big snapshot listing): plain ASCII strings,
    ``None`` and ints take the first branch without a call.
    """
    kind = type(obj)
    names = _FIELD_NAMES.get(kind)
    if names is None:
        names = _FIELD_NAMES[kind] = tuple(f.name for f in dataclasses.fields(obj))
    out: dict[str, Any] = {}
    for name in names:
        value = getattr(obj, name)
        if value is None or (type(value) is str and value.isascii()) or type(value) is int:
            out[name] = value
        else:
            add_field(out, name, value)
    for name, value in extra.items():
        add_field(out, name, value)
    return out


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
