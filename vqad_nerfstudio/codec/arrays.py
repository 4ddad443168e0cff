"""Self-describing records for raw numpy arrays and ordered sets of named arrays.

Array record: dtype code (u8), ndim (u8), ndim x u32 shape, then the elements in
C order, little-endian. Named arrays: u32 count, then per entry a u16 name
length, the UTF-8 name and an array record.
"""

from __future__ import annotations

import math
import struct
from typing import Mapping

import numpy as np

from .errors import FormatError

__all__ = ["DTYPE_CODES", "encode_array", "decode_array", "encode_named_arrays", "decode_named_arrays"]

DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.bool_),
    2: np.dtype("<u1"),
    3: np.dtype("<i1"),
    4: np.dtype("<u2"),
    5: np.dtype("<i2"),
    6: np.dtype("<u4"),
    7: np.dtype("<i4"),
    8: np.dtype("<u8"),
    9: np.dtype("<i8"),
    10: np.dtype("<f2"),
    11: np.dtype("<f4"),
    12: np.dtype("<f8"),
}
_CODE_OF = {dtype: code for code, dtype in DTYPE_CODES.items()}
_MAX_DIM = (1 << 32) - 1


def encode_array(a: np.ndarray) -> bytes:
    """Serialise an array of a supported dtype (see ``DTYPE_CODES``) with its shape."""
    a = np.asarray(a)
    code = _CODE_OF.get(a.dtype.newbyteorder("<"))
    if code is None:
        raise ValueError(f"unsupported dtype {a.dtype}; supported: {', '.join(str(d) for d in DTYPE_CODES.values())}")
    if a.ndim > 255:
        raise ValueError(f"at most 255 dimensions, got {a.ndim}")
    if any(d > _MAX_DIM for d in a.shape):
        raise ValueError(f"dimensions must be < 2**32, got shape {a.shape}")
    head = struct.pack(f"<BB{a.ndim}I", code, a.ndim, *a.shape)
    return head + np.ascontiguousarray(a, dtype=DTYPE_CODES[code]).tobytes()


def _read_array(data: bytes, offset: int) -> tuple[np.ndarray, int]:
    start = offset
    if len(data) - offset < 2:
        raise FormatError(f"array record at byte {start}: ends inside its dtype/ndim fields")
    code, ndim = data[offset], data[offset + 1]
    dtype = DTYPE_CODES.get(code)
    if dtype is None:
        raise FormatError(f"array record at byte {start}: unknown dtype code {code}")
    offset += 2
    if len(data) - offset < 4 * ndim:
        raise FormatError(f"array record at byte {start}: ends inside its shape")
    shape = struct.unpack_from(f"<{ndim}I", data, offset)
    offset += 4 * ndim
    nbytes = math.prod(shape) * dtype.itemsize
    if len(data) - offset < nbytes:
        left = len(data) - offset
        raise FormatError(f"array record at byte {start}: shape {shape} needs {nbytes} bytes, {left} left")
    try:
        a = np.frombuffer(data, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset).reshape(shape).copy()
    except ValueError as exc:
        raise FormatError(f"array record at byte {start}: shape {shape} is not representable: {exc}") from None
    if dtype == np.bool_ and a.view(np.uint8).max(initial=0) > 1:
        raise FormatError(f"array record at byte {start}: bool elements must be 0 or 1")
    return a, offset + nbytes


def decode_array(data: bytes) -> np.ndarray:
    """Parse one array record (exactly, no trailing bytes); returns a native-endian copy."""
    data = bytes(data)
    a, end = _read_array(data, 0)
    if end != len(data):
        raise FormatError(f"array record: {len(data) - end} unexpected trailing bytes")
    return a.astype(a.dtype.newbyteorder("="), copy=False)


def encode_named_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Serialise named arrays in the mapping's iteration order."""
    parts = [struct.pack("<I", len(arrays))]
    for name, a in arrays.items():
        if not isinstance(name, str):
            raise ValueError(f"array names must be str, got {name!r}")
        raw = name.encode("utf-8")
        if len(raw) > 0xFFFF:
            raise ValueError(f"array name longer than 65535 UTF-8 bytes: {name[:40]!r}...")
        parts += [struct.pack("<H", len(raw)), raw, encode_array(a)]
    return b"".join(parts)


def decode_named_arrays(data: bytes) -> dict[str, np.ndarray]:
    """Inverse of :func:`encode_named_arrays`; preserves order."""
    data = bytes(data)
    if len(data) < 4:
        raise FormatError("named arrays: ends inside the entry count")
    (count,) = struct.unpack_from("<I", data, 0)
    offset = 4
    out: dict[str, np.ndarray] = {}
    for index in range(count):
        if len(data) - offset < 2:
            raise FormatError(f"named arrays: entry {index} ends inside its name length")
        (length,) = struct.unpack_from("<H", data, offset)
        offset += 2
        raw = data[offset : offset + length]
        if len(raw) != length:
            raise FormatError(f"named arrays: entry {index} ends inside its name")
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"named arrays: entry {index} name is not valid UTF-8") from None
        if name in out:
            raise FormatError(f"named arrays: duplicate name {name!r}")
        offset += length
        a, offset = _read_array(data, offset)
        out[name] = a.astype(a.dtype.newbyteorder("="), copy=False)
    if offset != len(data):
        raise FormatError(f"named arrays: {len(data) - offset} unexpected trailing bytes")
    return out
