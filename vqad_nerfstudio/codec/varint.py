"""LEB128 variable-length integers, scalar and vectorised.

An unsigned varint stores a value in groups of 7 bits, least significant group
first; every byte but the last of a value has its high bit (0x80) set. Values
are limited to 64 bits, i.e. at most 10 bytes. Signed values are mapped to
unsigned ones with the zigzag transform (0, -1, 1, -2, ... -> 0, 1, 2, 3, ...).
"""

from __future__ import annotations

import numpy as np

from .errors import FormatError

__all__ = [
    "encode_uvarint",
    "decode_uvarint",
    "encode_svarint",
    "decode_svarint",
    "encode_uvarints",
    "decode_uvarints",
]

MAX_VARINT_BYTES = 10
_U64_MAX = (1 << 64) - 1


def encode_uvarint(value: int) -> bytes:
    """Encode one unsigned integer (0 <= value < 2**64)."""
    value = int(value)
    if not 0 <= value <= _U64_MAX:
        raise ValueError(f"uvarint value {value} outside [0, 2**64 - 1]")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_uvarint(data: bytes, offset: int) -> tuple[int, int]:
    """Decode one unsigned varint at ``offset``; return ``(value, next_offset)``."""
    value = 0
    for i in range(MAX_VARINT_BYTES):
        pos = offset + i
        if pos >= len(data):
            raise FormatError(f"varint at byte {offset} runs past the end of the data ({len(data)} bytes)")
        byte = data[pos]
        value |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            if value > _U64_MAX:
                raise FormatError(f"varint at byte {offset} exceeds 64 bits")
            return value, pos + 1
    raise FormatError(f"varint at byte {offset} is longer than {MAX_VARINT_BYTES} bytes")


def encode_svarint(value: int) -> bytes:
    """Encode one signed integer (-2**63 <= value < 2**63) with zigzag + LEB128."""
    value = int(value)
    if not -(1 << 63) <= value < (1 << 63):
        raise ValueError(f"svarint value {value} outside [-2**63, 2**63 - 1]")
    return encode_uvarint(2 * value if value >= 0 else -2 * value - 1)


def decode_svarint(data: bytes, offset: int) -> tuple[int, int]:
    """Decode one zigzag varint at ``offset``; return ``(value, next_offset)``."""
    raw, offset = decode_uvarint(data, offset)
    return (raw >> 1) if raw % 2 == 0 else -((raw + 1) >> 1), offset


def encode_uvarints(values: np.ndarray) -> bytes:
    """Encode an array of unsigned integers as concatenated varints (vectorised)."""
    values = np.asarray(values)
    if values.size == 0:
        return b""
    if values.dtype.kind not in "ui":
        raise ValueError(f"varints need an integer array, got dtype {values.dtype}")
    if values.dtype.kind == "i" and values.min() < 0:
        raise ValueError(f"uvarint values must be >= 0, got minimum {values.min()}")
    v = values.ravel().astype(np.uint64)
    nbytes = np.ones(v.size, dtype=np.int64)
    for k in range(1, MAX_VARINT_BYTES):
        nbytes += v >= np.uint64(1 << (7 * k))
    starts = np.cumsum(nbytes) - nbytes
    out = np.empty(int(nbytes.sum()), dtype=np.uint8)
    for j in range(int(nbytes.max())):
        sel = nbytes > j
        group = ((v[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)).astype(np.uint8)
        group[nbytes[sel] - 1 > j] |= 0x80
        out[starts[sel] + j] = group
    return out.tobytes()


def decode_uvarints(data: bytes, offset: int, count: int) -> tuple[np.ndarray, int]:
    """Decode ``count`` consecutive varints at ``offset`` (vectorised).

    Returns ``(values as uint64 array, next_offset)``.
    """
    if count == 0:
        return np.zeros(0, dtype=np.uint64), offset
    available = min(len(data) - offset, count * MAX_VARINT_BYTES)
    window = np.frombuffer(data, dtype=np.uint8, count=max(available, 0), offset=min(offset, len(data)))
    ends = np.flatnonzero(window < 0x80)[:count]
    if ends.size < count and window.size == count * MAX_VARINT_BYTES:
        raise FormatError(f"a varint at byte {offset} or later is longer than {MAX_VARINT_BYTES} bytes")
    if ends.size < count:
        raise FormatError(f"{count} varints at byte {offset} run past the end of the data ({len(data)} bytes)")
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > MAX_VARINT_BYTES:
        bad = int(starts[np.argmax(lengths > MAX_VARINT_BYTES)])
        raise FormatError(f"varint at byte {offset + bad} is longer than {MAX_VARINT_BYTES} bytes")
    full = lengths == MAX_VARINT_BYTES
    if full.any() and (window[ends[full]] > 1).any():
        raise FormatError(f"a varint at byte {offset} or later exceeds 64 bits")
    seg = window[: ends[-1] + 1]
    position = np.arange(seg.size) - np.repeat(starts, lengths)
    parts = (seg & 0x7F).astype(np.uint64) << (7 * position).astype(np.uint64)
    values = np.bitwise_or.reduceat(parts, starts)
    return values, offset + int(ends[-1]) + 1
