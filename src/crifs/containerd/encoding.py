"""Scalar encodings containerd stores inside its bolt values.

Decoders follow Go's ``encoding/binary`` and ``time`` exactly where containerd depends on them,
so crifs sees the value containerd sees. Every decoder raises ``ValueError`` with a short reason
on bad input; callers know the file and key and turn that into a ``CorruptStore``.

Encoders are the inverse, for ``crifs demo`` and tests that hand-build stores.
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta

__all__ = [
    "encode_gotime",
    "encode_uvarint",
    "encode_varint",
    "read_gotime",
    "read_uvarint",
    "read_varint",
]

_MAX_VARINT_LEN = 10  # binary.MaxVarintLen64
_U64_MASK = (1 << 64) - 1

# Go's zero time is 0001-01-01 UTC; MarshalBinary stores seconds since then.
_GO_EPOCH = datetime(1, 1, 1, tzinfo=UTC)
_GOTIME_V1 = struct.Struct(">BqiH")  # version, seconds, nanoseconds, zone offset (minutes)
_GOTIME_UTC_OFFSET = 0xFFFF  # offset -1 means "UTC" rather than a fixed zone


def read_uvarint(b: bytes, offset: int = 0) -> tuple[int, int]:
    """Decode a Go ``binary.Uvarint`` at ``b[offset:]``: return (value, bytes used).

    Trailing bytes are left alone, as in Go. Raises ValueError when the input ends inside the
    number or the number does not fit in 64 bits.
    """
    value = 0
    shift = 0
    end = min(len(b), offset + _MAX_VARINT_LEN)
    for index in range(offset, end):
        byte = b[index]
        if byte < 0x80:
            if index - offset == _MAX_VARINT_LEN - 1 and byte > 1:
                raise ValueError("varint overflows 64 bits")
            return value | (byte << shift), index - offset + 1
        value |= (byte & 0x7F) << shift
        shift += 7
    if end - offset == _MAX_VARINT_LEN:
        raise ValueError("varint overflows 64 bits")
    raise ValueError("truncated varint" if end > offset else "empty varint")


def read_varint(b: bytes, offset: int = 0) -> int:
    """Decode a Go ``binary.Varint`` (zigzag) at ``b[offset:]``; trailing bytes are ignored."""
    unsigned, _ = read_uvarint(b, offset)
    return (unsigned >> 1) ^ -(unsigned & 1)


def read_gotime(b: bytes) -> datetime:
    """Decode Go ``time.Time.MarshalBinary`` (version 1 or 2) into an aware UTC datetime.

    The instant is kept and the zone dropped; nanoseconds are truncated to microseconds.
    Raises ValueError on a wrong length, an unknown version, nanoseconds outside [0, 1e9) or a
    year that ``datetime`` cannot hold.
    """
    if not b:
        raise ValueError("empty time value")
    version = b[0]
    if version not in (1, 2):
        raise ValueError(f"unsupported time encoding version {version}")
    want = 15 if version == 1 else 16
    if len(b) != want:
        raise ValueError(f"time value is {len(b)} bytes, expected {want} for version {version}")
    _, seconds, nanos, _offset_minutes = _GOTIME_V1.unpack_from(b)
    if not 0 <= nanos < 1_000_000_000:
        raise ValueError(f"time nanoseconds {nanos} out of range")
    try:
        return _GO_EPOCH + timedelta(seconds=seconds, microseconds=nanos // 1000)
    except OverflowError:
        raise ValueError(f"time {seconds}s after year 1 is out of range") from None


def encode_uvarint(value: int) -> bytes:
    """Go ``binary.PutUvarint`` of a value in [0, 2**64)."""
    if not 0 <= value <= _U64_MASK:
        raise ValueError(f"uvarint {value} out of range")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_varint(value: int) -> bytes:
    """Go ``binary.PutVarint`` (zigzag) of a value in [-2**63, 2**63)."""
    if not -(1 << 63) <= value < (1 << 63):
        raise ValueError(f"varint {value} out of range")
    return encode_uvarint(((value << 1) ^ (value >> 63)) & _U64_MASK)


def encode_gotime(moment: datetime) -> bytes:
    """Go ``time.MarshalBinary`` of ``moment`` as a UTC time (version 1, offset -1).

    A naive datetime is taken to be UTC, as containerd always writes ``time.Now().UTC()``.
    """
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    delta = moment - _GO_EPOCH
    seconds = delta.days * 86400 + delta.seconds
    return _GOTIME_V1.pack(1, seconds, delta.microseconds * 1000, _GOTIME_UTC_OFFSET)
